"""Catalog reads and writes used by the DICOM node and the command line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from plugin.catalog.models import AuditEvent, Instance, QuarantineEntry, Series, Study, utcnow
from plugin.catalog.records import Peer
from plugin.study_state import StudyState


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
    )


def mark_complete(
    session: Session, study_uid: str, *, reason: str, routing: dict[str, Any], priority: str
) -> bool:
    """Move a receiving study to complete; False when it is not receiving any more."""
    result = session.execute(
        update(Study)
        .where(Study.study_instance_uid == study_uid, Study.state == StudyState.RECEIVING)
        .values(
            state=StudyState.COMPLETE,
            completed_at=utcnow(),
            completion_reason=reason,
            routing=routing,
            priority=priority,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


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
    )
    return detail


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


def cataloged_paths(session: Session) -> set[str]:
    return set(session.scalars(select(Instance.path)).all())
