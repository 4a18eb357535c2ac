"""Report labels (table ``report_label``), reports waiting for their study (``unlinked_report``),
and the labeled studies with each model's scores, for validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plugin.catalog.models import (
    Analysis,
    ImageEmbedding,
    Instance,
    ReportLabels,
    Site,
    Study,
    UnlinkedReport,
)
from plugin.catalog.reports import ReportText, reports_not_in


def reports_without_labels(session: Session, labeler_version: str) -> list[ReportText]:
    """Every stored report that this labeler version has not labeled, oldest first."""
    done = select(ReportLabels.report_id).where(ReportLabels.labeler_version == labeler_version)
    return reports_not_in(session, done)


def store_labels(
    session: Session,
    report_id: int,
    study_id: int,
    labeler_version: str,
    labels: Mapping[str, str | None],
) -> None:
    session.add(
        ReportLabels(
            report_id=report_id,
            study_id=study_id,
            labeler_version=labeler_version,
            labels=dict(labels),
        )
    )


def studies_by_accession(session: Session, accession: str) -> list[int]:
    return list(session.scalars(select(Study.id).where(Study.accession_number == accession)))


def keep_unlinked(
    session: Session,
    *,
    source: str,
    study_uid: str | None,
    accession: str | None,
    digest: str,
    text: str,
    reason: str,
) -> tuple[int, bool]:
    """Keep a report that names no known study; the same text from the same source once."""
    found = _unlinked_id(session, source, digest)
    if found is not None:
        return found, False
    row = UnlinkedReport(
        source=source,
        study_instance_uid=study_uid,
        accession_number=accession,
        digest=digest,
        text=text,
        reason=reason,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # the same report arrived twice at once: keep the first
        session.rollback()
        first = _unlinked_id(session, source, digest)
        if first is None:
            raise
        return first, False
    return row.id, True


def _unlinked_id(session: Session, source: str, digest: str) -> int | None:
    return session.scalar(
        select(UnlinkedReport.id).where(
            UnlinkedReport.source == source, UnlinkedReport.digest == digest
        )
    )


@dataclass(frozen=True)
class WaitingReport:
    id: int
    source: str
    study_instance_uid: str | None
    accession_number: str | None
    digest: str
    text: str
    reason: str
    received_at: datetime


def waiting_reports(session: Session, study_id: int | None = None) -> list[WaitingReport]:
    """Unlinked reports not linked since, oldest first; with ``study_id``, only those that
    name that study (by UID or accession number)."""
    query = (
        select(UnlinkedReport)
        .where(UnlinkedReport.linked_at.is_(None))
        .order_by(UnlinkedReport.received_at, UnlinkedReport.id)
    )
    if study_id is not None:
        study = session.get(Study, study_id)
        if study is None:
            return []
        names_it = UnlinkedReport.study_instance_uid == study.study_instance_uid
        if study.accession_number:
            names_it = names_it | (UnlinkedReport.accession_number == study.accession_number)
        query = query.where(names_it)
    rows = session.scalars(query)
    return [
        WaitingReport(
            r.id,
            r.source,
            r.study_instance_uid,
            r.accession_number,
            r.digest,
            r.text,
            r.reason,
            r.received_at,
        )
        for r in rows
    ]


def mark_linked(session: Session, unlinked_id: int) -> None:
    row = session.get(UnlinkedReport, unlinked_id)
    if row is not None:
        row.linked_at = datetime.now(UTC)


@dataclass(frozen=True)
class ScoredStudy:
    """One analysis of a labeled study: the model, its finding scores and thresholds."""

    study_id: int
    study_instance_uid: str
    site: str
    received_at: datetime
    model: str  # name@version
    role: str  # live | shadow: how it ran on this study
    scored: bool  # False when the study was out of the model's distribution
    probabilities: dict[str, float]
    thresholds: dict[str, float]


def scored_labeled_studies(
    session: Session, labeler_version: str, *, site: str | None, since: datetime | None
) -> list[ScoredStudy]:
    """The newest analysis per (study, model) of every study with labels of this version,
    oldest study first."""
    labeled = select(ReportLabels.study_id).where(ReportLabels.labeler_version == labeler_version)
    newest = (
        select(func.max(Analysis.id))
        .where(Analysis.study_id.in_(labeled))
        .group_by(Analysis.study_id, Analysis.algorithm_name, Analysis.algorithm_version)
    )
    query = (
        select(
            Analysis.study_id,
            Study.study_instance_uid,
            Site.key,
            Study.received_at,
            Analysis.algorithm_name,
            Analysis.algorithm_version,
            Analysis.priority,
            Analysis.findings,
            Analysis.role,
        )
        .join(Study, Study.id == Analysis.study_id)
        .join(Site, Site.id == Study.site_id)
        .where(Analysis.id.in_(newest))
        .order_by(Study.received_at, Analysis.id)
    )
    if site is not None:
        query = query.where(Site.key == site)
    if since is not None:
        query = query.where(Study.received_at >= since)
    result = []
    for (
        study_id,
        uid,
        site_key,
        received,
        name,
        version,
        priority,
        findings,
        role,
    ) in session.execute(query):
        result.append(
            ScoredStudy(
                study_id=study_id,
                study_instance_uid=uid,
                site=site_key,
                received_at=received,
                model=f"{name}@{version}",
                role=role,
                scored=priority != "not_scored",
                probabilities={
                    str(f["name"]): float(f["probability"])  # type: ignore[arg-type]
                    for f in findings
                    if "probability" in f
                },
                thresholds={
                    str(f["name"]): float(f["threshold"])  # type: ignore[arg-type]
                    for f in findings
                    if f.get("threshold") is not None
                },
            )
        )
    return result


def study_labels(
    session: Session, study_ids: list[int], labeler_version: str
) -> dict[int, dict[str, str | None]]:
    """Per study, the labels of its newest report (a final report supersedes a preliminary)."""
    rows = session.execute(
        select(ReportLabels.study_id, ReportLabels.labels)
        .where(
            ReportLabels.study_id.in_(study_ids), ReportLabels.labeler_version == labeler_version
        )
        .order_by(ReportLabels.report_id)
    )
    return {study_id: labels for study_id, labels in rows}


def study_uid_of(session: Session, study_id: int) -> str | None:
    return session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))


def scored_image_paths(
    session: Session, study_ids: Sequence[int], model_ref: str
) -> dict[int, list[str]]:
    """Per study, the spool paths of the images ``model_ref`` scored (those it embedded)."""
    rows = session.execute(
        select(ImageEmbedding.study_id, Instance.path)
        .join(Instance, Instance.sop_instance_uid == ImageEmbedding.sop_instance_uid)
        .where(ImageEmbedding.study_id.in_(list(study_ids)), ImageEmbedding.model_ref == model_ref)
        .order_by(ImageEmbedding.study_id, Instance.path)
    )
    paths: dict[int, list[str]] = {}
    for study_id, path in rows:
        paths.setdefault(study_id, []).append(path)
    return paths
