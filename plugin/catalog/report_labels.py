"""Report labels (table ``report_label``), reports waiting for their study (``unlinked_report``),
and the labeled studies with each model's scores, for validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, case, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import Over
from sqlalchemy.sql.functions import FunctionElement

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

NOT_SCORED = "not_scored"  # the priority of an analysis of a study out of the model's distribution
LABELED = ("present", "absent")  # the report labels that make a study count for a finding


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
    where: ColumnElement[bool] = Analysis.id.in_(_newest_analyses(labeler_version))
    if site is not None:
        where &= Site.key == site
    if since is not None:
        where &= Study.received_at >= since
    return _scored_studies(session, where)


def monitored_studies(session: Session, labeler_version: str, *, newest: int) -> list[ScoredStudy]:
    """What the monitoring window reads of `scored_labeled_studies`, oldest study first: per
    site and model, its newest scored analysis, and for each of the model's findings the
    analyses of the ``newest`` latest studies whose report (the newest one) says it present or
    absent. They are chosen in the database: a site's history is not loaded to find them."""
    findings = _model_findings(session)
    newer_report = aliased(ReportLabels)
    later_analysis = aliased(Analysis)
    # Correlated NOT EXISTS rather than IN (grouped subquery), as both look up an index on
    # study_id: SQLite would scan a whole IN list again for each row of an inner loop.
    scored = (
        select(
            Analysis.id,
            Study.site_id,
            Analysis.algorithm_name,
            Analysis.algorithm_version,
            Study.received_at,
            *(
                case((ReportLabels.labels[f].as_string().in_(LABELED), 1), else_=0).label(
                    f"labeled_{i}"
                )
                for i, f in enumerate(findings)
            ),
        )
        .join(Analysis, Analysis.study_id == ReportLabels.study_id)
        .join(Study, Study.id == Analysis.study_id)
        .where(
            ReportLabels.labeler_version == labeler_version,
            Analysis.priority != NOT_SCORED,
            ~exists().where(
                newer_report.study_id == ReportLabels.study_id,
                newer_report.labeler_version == labeler_version,
                newer_report.report_id > ReportLabels.report_id,
            ),
            ~exists().where(
                later_analysis.study_id == Analysis.study_id,
                later_analysis.algorithm_name == Analysis.algorithm_name,
                later_analysis.algorithm_version == Analysis.algorithm_version,
                later_analysis.id > Analysis.id,
            ),
        )
        .subquery()
    )

    def newest_first(function: FunctionElement[Any]) -> Over[Any]:
        # One window for every count: the database sorts the rows once.
        return function.over(
            partition_by=(scored.c.site_id, scored.c.algorithm_name, scored.c.algorithm_version),
            order_by=(scored.c.received_at.desc(), scored.c.id.desc()),
        )

    labeled = [scored.c[f"labeled_{i}"] for i in range(len(findings))]
    counted = select(
        scored.c.id,
        newest_first(func.row_number()).label("position"),
        *labeled,
        *(newest_first(func.sum(c)).label(f"seen_{i}") for i, c in enumerate(labeled)),
    ).subquery()
    chosen = select(counted.c.id).where(
        or_(
            counted.c.position == 1,
            *(
                (counted.c[f"labeled_{i}"] == 1) & (counted.c[f"seen_{i}"] <= newest)
                for i in range(len(findings))
            ),
        )
    )
    return _scored_studies(session, Analysis.id.in_(chosen))


def _model_findings(session: Session) -> list[str]:
    """The findings of every model, from its newest scored analysis (a version's findings are
    those of its bundle, which never changes)."""
    newest = (
        select(func.max(Analysis.id))
        .where(Analysis.priority != NOT_SCORED)
        .group_by(Analysis.algorithm_name, Analysis.algorithm_version)
    )
    names = {
        str(f["name"])
        for findings in session.scalars(select(Analysis.findings).where(Analysis.id.in_(newest)))
        for f in findings
        if "probability" in f
    }
    return sorted(names)


def _newest_analyses(labeler_version: str) -> Select[int]:
    labeled = select(ReportLabels.study_id).where(ReportLabels.labeler_version == labeler_version)
    return (
        select(func.max(Analysis.id))
        .where(Analysis.study_id.in_(labeled))
        .group_by(Analysis.study_id, Analysis.algorithm_name, Analysis.algorithm_version)
    )


def _scored_studies(session: Session, where: ColumnElement[bool]) -> list[ScoredStudy]:
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
        .where(where)
        .order_by(Study.received_at, Analysis.id)
    )
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
                scored=priority != NOT_SCORED,
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
