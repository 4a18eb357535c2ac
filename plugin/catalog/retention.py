"""The rows retention reads and changes: what may go, oldest first, and how the catalog says
that it went.

Only finished studies lose anything: analysed (with no delivery still pending), delivered,
shadow_only or failed. A study still receiving, complete or queued is never touched. A study
whose received originals went keeps its row, series, analyses and results; its instance rows
go with the files (nothing is analysed from files that are gone) and ``originals_pruned_at``
says when.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, and_, delete, exists, func, select, update
from sqlalchemy.orm import Session

from plugin.catalog.models import (
    Analysis,
    DispatchJob,
    ImageEmbedding,
    Instance,
    QuarantineEntry,
    ReportEmbedding,
    ResultObject,
    Series,
    Study,
)
from plugin.study_state import StudyState

FINISHED: Final = (
    StudyState.ANALYSED,
    StudyState.DELIVERED,
    StudyState.SHADOW_ONLY,
    StudyState.FAILED,
)


@dataclass(frozen=True)
class StudyOriginals:
    study_id: int
    study_instance_uid: str
    at: datetime  # completed (received, when never completed)
    paths: tuple[str, ...]  # relative to the spool directory


@dataclass(frozen=True)
class AnalysisResults:
    analysis_id: int
    study_instance_uid: str
    at: datetime
    paths: tuple[str, ...]  # relative to the results directory


@dataclass(frozen=True)
class QuarantinedObject:
    entry_id: int
    at: datetime
    path: str  # relative to the quarantine directory


def _finished() -> ColumnElement[bool]:
    """The study (``Study`` in the query) is finished and no delivery of it is pending."""
    pending = exists(
        select(DispatchJob.id)
        .join(Analysis, DispatchJob.analysis_id == Analysis.id)
        .where(Analysis.study_id == Study.id, DispatchJob.state == "pending")
    )
    return and_(Study.state.in_(FINISHED), ~pending)


def originals_to_prune(
    session: Session, *, before: datetime | None, limit: int
) -> list[StudyOriginals]:
    """Finished studies completed before ``before`` (any, when None) that still have their
    originals, oldest first."""
    at = func.coalesce(Study.completed_at, Study.received_at)
    query = (
        select(Study.id, Study.study_instance_uid, at.label("at"))
        .where(_finished(), Study.originals_pruned_at.is_(None))
        .order_by(at, Study.id)
        .limit(limit)
    )
    if before is not None:
        query = query.where(at < before)
    studies = session.execute(query).all()
    paths: dict[int, list[str]] = {int(row.id): [] for row in studies}
    if paths:
        rows = session.execute(
            select(Series.study_id, Instance.path)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(list(paths)))
        )
        for study_id, path in rows:
            paths[int(study_id)].append(str(path))
    return [
        StudyOriginals(int(row.id), str(row.study_instance_uid), row.at, tuple(paths[row.id]))
        for row in studies
    ]


def mark_originals_pruned(session: Session, study_id: int, now: datetime) -> None:
    """The study's spool files are gone: its instance rows go, and the study says when."""
    series = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
    session.execute(
        delete(Instance)
        .where(Instance.series_id.in_(series))
        .execution_options(synchronize_session=False)
    )
    session.execute(update(Study).where(Study.id == study_id).values(originals_pruned_at=now))


def results_to_prune(
    session: Session, *, before: datetime | None, limit: int
) -> list[AnalysisResults]:
    """Analyses of finished studies, made before ``before``, with result objects that every
    destination received (a dead-lettered job keeps its objects for a replay), oldest first."""
    undelivered = exists(
        select(DispatchJob.id).where(
            DispatchJob.analysis_id == Analysis.id, DispatchJob.state != "delivered"
        )
    )
    with_objects = exists(select(ResultObject.id).where(ResultObject.analysis_id == Analysis.id))
    query = (
        select(Analysis.id, Analysis.created_at, Study.study_instance_uid)
        .join(Study, Analysis.study_id == Study.id)
        .where(_finished(), with_objects, ~undelivered)
        .order_by(Analysis.created_at, Analysis.id)
        .limit(limit)
    )
    if before is not None:
        query = query.where(Analysis.created_at < before)
    analyses = session.execute(query).all()
    paths: dict[int, list[str]] = {int(row.id): [] for row in analyses}
    if paths:
        rows = session.execute(
            select(ResultObject.analysis_id, ResultObject.path).where(
                ResultObject.analysis_id.in_(list(paths))
            )
        )
        for analysis_id, path in rows:
            paths[int(analysis_id)].append(str(path))
    return [
        AnalysisResults(
            int(row.id), str(row.study_instance_uid), row.created_at, tuple(paths[row.id])
        )
        for row in analyses
    ]


def forget_result_objects(session: Session, analysis_id: int) -> None:
    """The analysis's result files are gone; its findings and delivery history stay."""
    session.execute(delete(ResultObject).where(ResultObject.analysis_id == analysis_id))


def quarantine_to_prune(
    session: Session, *, before: datetime | None, limit: int
) -> list[QuarantinedObject]:
    query = select(QuarantineEntry.id, QuarantineEntry.at, QuarantineEntry.path)
    if before is not None:
        query = query.where(QuarantineEntry.at < before)
    rows = session.execute(query.order_by(QuarantineEntry.at, QuarantineEntry.id).limit(limit))
    return [QuarantinedObject(int(row.id), row.at, str(row.path)) for row in rows]


def forget_quarantined(session: Session, entry_id: int) -> None:
    session.execute(delete(QuarantineEntry).where(QuarantineEntry.id == entry_id))


@dataclass(frozen=True)
class ExpiredEmbeddings:
    images: dict[str, int]  # model version -> rows
    reports: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(self.images.values()) + sum(self.reports.values())


def expired_embeddings(session: Session, before: datetime) -> ExpiredEmbeddings:
    """Embeddings of finished studies made before ``before``, counted per model version."""
    found: list[dict[str, int]] = []
    for table in (ImageEmbedding, ReportEmbedding):
        rows = session.execute(
            select(table.model_ref, func.count())
            .join(Study, table.study_id == Study.id)
            .where(table.created_at < before, _finished())
            .group_by(table.model_ref)
        )
        found.append({str(ref): int(count) for ref, count in rows})
    return ExpiredEmbeddings(images=found[0], reports=found[1])


def delete_expired_embeddings(session: Session, before: datetime) -> int:
    """Delete the rows ``expired_embeddings`` counts; returns how many went."""
    finished = select(Study.id).where(_finished()).scalar_subquery()
    deleted = 0
    for table in (ImageEmbedding, ReportEmbedding):
        result: Any = session.execute(
            delete(table)
            .where(table.created_at < before, table.study_id.in_(finished))
            .execution_options(synchronize_session=False)
        )
        deleted += int(result.rowcount or 0)
    return deleted
