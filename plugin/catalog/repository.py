"""Catalog reads and writes used by the DICOM node and the command line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from plugin.catalog.models import (
    Analysis,
    AuditEvent,
    Instance,
    QuarantineEntry,
    ResultObject,
    RevisitScore,
    Series,
    Study,
    utcnow,
)
from plugin.catalog.records import Peer
from plugin.disclaimers import NOT_FOR_DIAGNOSIS
from plugin.errors import InvalidTransition
from plugin.study_state import StudyState, can_transition, transition


def audit(
    session: Session,
    event: str,
    peer: Peer | None,
    *,
    status: int | None = None,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    detail: str | None = None,
) -> None:
    session.add(
        AuditEvent(
            event=event,
            calling_ae_title=peer.calling_ae_title if peer else None,
            peer_host=peer.host if peer else None,
            status=status,
            study_instance_uid=study_instance_uid,
            sop_instance_uid=sop_instance_uid,
            detail=detail,
        )
    )


def record_quarantine(
    session: Session,
    *,
    path: str,
    size_bytes: int,
    reason: str,
    status: int,
    peer: Peer,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
) -> None:
    session.add(
        QuarantineEntry(
            path=path,
            size_bytes=size_bytes,
            reason=reason,
            status=status,
            calling_ae_title=peer.calling_ae_title,
            peer_host=peer.host,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
        )
    )
    audit(session, "rejected", peer, status=status, detail=reason)


@dataclass(frozen=True)
class ReceivingStudy:
    study_instance_uid: str
    received_at: datetime
    instances: int


def receiving_studies(session: Session) -> list[ReceivingStudy]:
    rows = session.execute(
        select(Study.study_instance_uid, Study.received_at, func.count(Instance.id))
        .outerjoin(Series, Series.study_id == Study.id)
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Study.state == StudyState.RECEIVING)
        .group_by(Study.id)
    ).all()
    return [ReceivingStudy(uid, at, n) for uid, at, n in rows]


@dataclass(frozen=True)
class StudyFacts:
    """What routing rules look at, gathered over every series of a study."""

    study_instance_uid: str
    site_key: str
    calling_ae_title: str
    modalities: frozenset[str]
    body_parts: frozenset[str]
    series_descriptions: frozenset[str]
    institution_name: str | None
    needs_reanalysis: bool
    pipelines: list[str]
    destinations: list[str]
    age_s: float  # since the first instance arrived


def study_facts(session: Session, study_uid: str) -> StudyFacts | None:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    series = study.series

    def values(attr: Callable[[Series], str | None]) -> frozenset[str]:
        return frozenset(v for v in (attr(s) for s in series) if v)

    return StudyFacts(
        study_instance_uid=study_uid,
        site_key=study.site.key,
        calling_ae_title=study.calling_ae_title,
        modalities=values(lambda s: s.modality),
        body_parts=values(lambda s: s.body_part_examined),
        series_descriptions=values(lambda s: s.series_description),
        institution_name=study.institution_name,
        needs_reanalysis=study.needs_reanalysis,
        pipelines=list((study.routing or {}).get("pipelines", [])),  # type: ignore[call-overload]
        destinations=list((study.routing or {}).get("destinations", [])),  # type: ignore[call-overload]
        age_s=(utcnow() - study.received_at).total_seconds(),
    )


def mark_complete(
    session: Session, study_uid: str, *, reason: str, routing: dict[str, Any], priority: str
) -> int | None:
    """Move a receiving study to complete and return its new generation; None when it is
    not receiving any more (someone else completed it)."""
    result = session.execute(
        update(Study)
        .where(Study.study_instance_uid == study_uid, Study.state == StudyState.RECEIVING)
        .values(
            state=StudyState.COMPLETE,
            completed_at=utcnow(),
            completion_reason=reason,
            routing=routing,
            priority=priority,
            generation=Study.generation + 1,
        )
        .returning(Study.generation)
    )
    return result.scalar_one_or_none()


def force_state(session: Session, study_uid: str, state: StudyState) -> None:
    """Set a study's state without the transition check (recovery paths only)."""
    session.execute(update(Study).where(Study.study_instance_uid == study_uid).values(state=state))


def set_state(session: Session, study_uid: str, state: StudyState) -> None:
    """Move a study along the state machine; refuses transitions it does not allow."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise LookupError(f"no study {study_uid} in the catalog")
    study.state = transition(StudyState(study.state), state)


def requeue(session: Session, study_uids: list[str], state: StudyState | None) -> list[StaleStudy]:
    """Move the studies named (or every study in ``state``) back to queued for a new
    analysis, and say what to send; LookupError or InvalidTransition name the study that
    cannot be queued (nothing is changed then)."""
    query = select(Study)
    if study_uids:
        query = query.where(Study.study_instance_uid.in_(study_uids))
    if state is not None:
        query = query.where(Study.state == state)
    studies = list(session.scalars(query))
    missing = set(study_uids) - {s.study_instance_uid for s in studies}
    if missing:
        where = f" in state {state}" if state else ""
        raise LookupError(f"no study {sorted(missing)[0]} in the catalog{where}")
    for study in studies:
        if not can_transition(StudyState(study.state), StudyState.QUEUED):
            raise InvalidTransition(
                f"study {study.study_instance_uid} is {study.state}: only shadow_only and "
                "failed studies are queued again"
            )
        if study.originals_pruned_at is not None and not _has_instances(session, study.id):
            raise InvalidTransition(
                f"study {study.study_instance_uid}: retention deleted its received images; "
                "send the study again from the PACS to analyse it"
            )
        study.state = StudyState.QUEUED
    return [
        StaleStudy(s.study_instance_uid, s.generation, s.priority or "routine") for s in studies
    ]


def _has_instances(session: Session, study_id: int) -> bool:
    query = select(Instance.id).join(Series).where(Series.study_id == study_id).limit(1)
    return session.scalar(query) is not None


def set_expected_instances(session: Session, study_uid: str, count: int) -> None:
    session.execute(
        update(Study).where(Study.study_instance_uid == study_uid).values(expected_instances=count)
    )


def _study_summary(study: Study, instances: int) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "site": study.site.key,
        "instances": instances,
        "received_at": study.received_at.isoformat(),
        "completed_at": study.completed_at.isoformat() if study.completed_at else None,
        "priority": study.priority,
        "needs_reanalysis": study.needs_reanalysis,
        "calling_ae_title": study.calling_ae_title,
    }


def list_studies(
    session: Session,
    *,
    state: str | None = None,
    priority: str | None = None,
    revisit_flagged: bool | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    counts = (
        select(Series.study_id, func.count(Instance.id).label("n"))
        .join(Instance, Instance.series_id == Series.id)
        .group_by(Series.study_id)
        .subquery()
    )
    query = (
        select(Study, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.study_id == Study.id)
        .order_by(Study.received_at.desc(), Study.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Study.state == state)
    if priority:
        query = query.where(Study.priority == priority)
    if revisit_flagged is not None:
        flagged = select(RevisitScore.study_id).where(RevisitScore.flagged.is_(True))
        query = query.where(Study.id.in_(flagged) if revisit_flagged else Study.id.not_in(flagged))
    return [_study_summary(study, n) for study, n in session.execute(query).all()]


def study_detail(session: Session, study_uid: str) -> dict[str, Any] | None:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    series = [
        {
            "series_instance_uid": s.series_instance_uid,
            "modality": s.modality,
            "body_part_examined": s.body_part_examined,
            "series_description": s.series_description,
            "series_number": s.series_number,
            "instances": [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "path": i.path,
                    "size_bytes": i.size_bytes,
                    "sha256": i.sha256,
                    "received_at": i.received_at.isoformat(),
                }
                for i in s.instances
            ],
        }
        for s in study.series
    ]
    detail = _study_summary(study, sum(len(s.instances) for s in study.series))
    detail.update(
        completion_reason=study.completion_reason,
        expected_instances=study.expected_instances,
        routing=study.routing,
        series=series,
        revisit=study_revisit(session, study.id),
    )
    return detail


def latest_findings(
    session: Session, study_ids: Sequence[int], *, algorithm: tuple[str, str] | None = None
) -> dict[int, dict[str, float]]:
    """Per study, the finding probabilities of its newest analysis (of one algorithm's
    name and version, when given)."""
    query = (
        select(Analysis.study_id, Analysis.findings)
        .where(Analysis.study_id.in_(list(study_ids)), Analysis.role == "live")
        .order_by(Analysis.generation, Analysis.id)
    )
    if algorithm is not None:
        name, version = algorithm
        query = query.where(Analysis.algorithm_name == name, Analysis.algorithm_version == version)
    latest: dict[int, dict[str, float]] = {}
    for study_id, findings in session.execute(query):
        latest[study_id] = {
            str(f["name"]): float(f["probability"])  # type: ignore[arg-type]
            for f in findings
            if "name" in f and "probability" in f
        }
    return latest


def study_revisit(session: Session, study_id: int) -> list[dict[str, Any]]:
    """Revisit risks of encounters linked to the study, newest first."""
    rows = session.scalars(
        select(RevisitScore)
        .where(RevisitScore.study_id == study_id)
        .order_by(RevisitScore.created_at.desc(), RevisitScore.id.desc())
    )
    return [
        {
            "encounter_id": r.encounter_id,
            "risk": round(r.risk, 4),
            "flagged": r.flagged,
            "threshold": r.threshold,
            "algorithm": {"name": r.algorithm_name, "version": r.algorithm_version},
            "method": r.method,
            "triage_linked": r.triage_linked,
            "notices": [NOT_FOR_DIAGNOSIS],
            "scored_at": r.created_at.isoformat(),
        }
        for r in rows
    ]


def list_quarantine(session: Session, *, limit: int = 100) -> list[dict[str, Any]]:
    entries = session.scalars(
        select(QuarantineEntry).order_by(QuarantineEntry.at.desc()).limit(limit)
    ).all()
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "path": e.path,
            "reason": e.reason,
            "status": f"0x{e.status:04X}",
            "calling_ae_title": e.calling_ae_title,
            "peer_host": e.peer_host,
            "sop_class_uid": e.sop_class_uid,
            "sop_instance_uid": e.sop_instance_uid,
            "size_bytes": e.size_bytes,
        }
        for e in entries
    ]


def audit_events(session: Session, *, event: str | None = None) -> Sequence[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.id)
    if event:
        query = query.where(AuditEvent.event == event)
    return session.scalars(query).all()


def recent_audit_events(
    session: Session,
    *,
    events: Sequence[str] = (),
    study_uid: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The newest audit entries first, as plain data (``pacsclip audit list``, the operations
    page); ``offset`` newer ones skipped."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    if events:
        query = query.where(AuditEvent.event.in_(list(events)))
    if study_uid:
        query = query.where(AuditEvent.study_instance_uid == study_uid)
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "event": e.event,
            "calling_ae_title": e.calling_ae_title,
            "peer_host": e.peer_host,
            "study_instance_uid": e.study_instance_uid,
            "sop_instance_uid": e.sop_instance_uid,
            "status": e.status,
            "detail": e.detail,
        }
        for e in session.scalars(query)
    ]


def audit_event_names(session: Session) -> list[str]:
    """Every event name the audit log holds, sorted (the operations page's filter)."""
    return sorted(session.scalars(select(AuditEvent.event).distinct()))


def cataloged_paths(session: Session) -> set[str]:
    return set(session.scalars(select(Instance.path)).all())


@dataclass(frozen=True)
class StaleStudy:
    study_instance_uid: str
    generation: int
    priority: str


def stale_queued(session: Session, older_than: datetime) -> list[StaleStudy]:
    """Studies completed long ago whose current generation has no analysis yet: their task
    was lost (a broker without redelivery, a failed send) and must be sent again."""
    analysed = select(Analysis.id).where(
        Analysis.study_id == Study.id,
        Analysis.generation == Study.generation,
        Analysis.role == "live",
    )
    rows = session.execute(
        select(Study.study_instance_uid, Study.generation, Study.priority).where(
            Study.state.in_([StudyState.COMPLETE, StudyState.QUEUED]),
            Study.completed_at < older_than,
            ~analysed.exists(),
        )
    ).all()
    return [StaleStudy(uid, gen, prio or "routine") for uid, gen, prio in rows]


def results_for(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """The analyses of a study, newest first, with their objects and delivery states."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return []
    analyses = session.scalars(
        select(Analysis).where(Analysis.study_id == study.id).order_by(Analysis.id.desc())
    )
    return [
        {
            "generation": a.generation,
            "algorithm": {
                "name": a.algorithm_name,
                "version": a.algorithm_version,
                "synthetic": a.synthetic,
            },
            "role": a.role,
            "priority": a.priority,
            "triggered_by": a.triggered_by,
            "findings": a.findings,
            "ood": a.ood,
            "created_at": a.created_at.isoformat(),
            "objects": [
                {
                    "kind": o.kind,
                    "sop_instance_uid": o.sop_instance_uid,
                    "series_instance_uid": o.series_instance_uid,
                }
                for o in a.objects
            ],
            "dispatch": [
                {"destination": j.destination, "state": j.state, "attempts": j.attempts}
                for j in a.jobs
            ],
        }
        for a in analyses
    ]


def result_object_path(session: Session, study_uid: str, sop_instance_uid: str) -> str | None:
    """Where a result object of this study is kept (relative to the results folder)."""
    return session.scalar(
        select(ResultObject.path)
        .join(Analysis)
        .join(Study, Study.id == Analysis.study_id)
        .where(
            Study.study_instance_uid == study_uid,
            ResultObject.sop_instance_uid == sop_instance_uid,
        )
    )


def stat_flag(session: Session, analysis_id: int) -> dict[str, Any]:
    """What a STAT notification says: the analysis with the study's identity."""
    analysis = session.get(Analysis, analysis_id)
    if analysis is None:
        raise LookupError(f"no analysis {analysis_id}")
    study = analysis.study
    return {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "patient_id": study.patient_id,
        "priority": analysis.priority,
        "triggered_by": analysis.triggered_by,
        "findings": analysis.findings,
        "algorithm": {
            "name": analysis.algorithm_name,
            "version": analysis.algorithm_version,
            "synthetic": analysis.synthetic,
        },
    }
