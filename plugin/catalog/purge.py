"""Every catalog row about one patient or one study, found and deleted (``pacsclip purge``).

A purge is chosen by Patient ID (every study of that patient) or by Study Instance UID. The
rows keyed by those studies go (series, instances, analyses with their result objects and
dispatch jobs, reports with their labels and embeddings, image embeddings, revisit scores),
and so do the rows that name their UIDs without a key: audit entries, quarantine entries of
their SOP Instance UIDs (or of files the caller found to belong to them) and reports still
waiting for their study. One ``purge`` audit entry records what was removed, by counts only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Delete, Engine, delete, or_, select, text
from sqlalchemy.orm import Session

from plugin.catalog.models import (
    Analysis,
    AuditEvent,
    DispatchJob,
    ImageEmbedding,
    Instance,
    QuarantineEntry,
    ReportEmbedding,
    ReportLabels,
    ResultObject,
    RevisitScore,
    Series,
    Study,
    StudyReport,
    UnlinkedReport,
)
from plugin.catalog.repository import audit

PURGE_EVENT: Final = "purge"
# Long IN lists are split: SQLite allows at most 32766 bound parameters per statement.
CHUNK: Final = 500


@dataclass(frozen=True)
class PurgeTarget:
    """What the catalog holds about the studies chosen, read before anything is deleted."""

    by: str  # "patient-id" or "study"
    study_ids: tuple[int, ...]
    study_uids: tuple[str, ...]
    series_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    result_sop_instance_uids: tuple[str, ...]
    instance_paths: tuple[str, ...]  # relative to the spool directory
    result_paths: tuple[str, ...]  # relative to the results directory
    accession_numbers: tuple[str, ...]
    quarantine_paths: tuple[str, ...]  # entries of the instances' SOP Instance UIDs
    image_model_refs: tuple[str, ...]  # model versions whose image index holds their vectors
    report_model_refs: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def uids(self) -> tuple[str, ...]:
        """Every UID of the studies: study, series, instances and pacsclip's own results."""
        return (
            *self.study_uids,
            *self.series_uids,
            *self.sop_instance_uids,
            *self.result_sop_instance_uids,
        )


def find_purge_target(
    session: Session, *, patient_id: str | None = None, study_uid: str | None = None
) -> PurgeTarget | None:
    """The studies of ``patient_id`` or the study ``study_uid`` (exactly one of them), and
    everything keyed by them; None when no study matches."""
    if (patient_id is None) == (study_uid is None):
        raise ValueError("give a patient id or a study uid")
    query = select(Study.id, Study.study_instance_uid, Study.accession_number)
    if patient_id is not None:
        query = query.where(Study.patient_id == patient_id)
    else:
        query = query.where(Study.study_instance_uid == study_uid)
    studies = session.execute(query.order_by(Study.id)).all()
    if not studies:
        return None
    ids = [int(row.id) for row in studies]
    series = _rows(session, select(Series.id, Series.series_instance_uid), Series.study_id, ids)
    series_ids = [int(row.id) for row in series]
    instances = _rows(
        session, select(Instance.sop_instance_uid, Instance.path), Instance.series_id, series_ids
    )
    analyses = [int(row.id) for row in _rows(session, select(Analysis.id), Analysis.study_id, ids)]
    results = _rows(
        session,
        select(ResultObject.sop_instance_uid, ResultObject.path),
        ResultObject.analysis_id,
        analyses,
    )
    sop_uids = [str(row.sop_instance_uid) for row in instances]
    quarantined = _rows(
        session, select(QuarantineEntry.path), QuarantineEntry.sop_instance_uid, sop_uids
    )
    image_refs = _rows(
        session, select(ImageEmbedding.model_ref).distinct(), ImageEmbedding.study_id, ids
    )
    report_refs = _rows(
        session, select(ReportEmbedding.model_ref).distinct(), ReportEmbedding.study_id, ids
    )
    return PurgeTarget(
        by="patient-id" if patient_id is not None else "study",
        study_ids=tuple(ids),
        study_uids=tuple(str(row.study_instance_uid) for row in studies),
        series_uids=tuple(str(row.series_instance_uid) for row in series),
        sop_instance_uids=tuple(sop_uids),
        result_sop_instance_uids=tuple(str(row.sop_instance_uid) for row in results),
        instance_paths=tuple(str(row.path) for row in instances),
        result_paths=tuple(str(row.path) for row in results),
        accession_numbers=tuple(
            sorted({str(row.accession_number) for row in studies if row.accession_number})
        ),
        quarantine_paths=tuple(str(row.path) for row in quarantined),
        image_model_refs=tuple(sorted({str(row.model_ref) for row in image_refs})),
        report_model_refs=tuple(sorted({str(row.model_ref) for row in report_refs})),
        counts={
            "studies": len(ids),
            "series": len(series_ids),
            "instances": len(instances),
            "analyses": len(analyses),
            "result_objects": len(results),
        },
    )


def delete_purge_target(
    session: Session, target: PurgeTarget, *, quarantine_paths: Collection[str] = ()
) -> dict[str, int]:
    """Delete every row about the target's studies (and the quarantine entries at
    ``quarantine_paths``), add the one ``purge`` audit entry, and return rows deleted per
    table. The caller commits."""
    ids = list(target.study_ids)
    reports = select(StudyReport.id).where(StudyReport.study_id.in_(ids)).scalar_subquery()
    analyses = select(Analysis.id).where(Analysis.study_id.in_(ids)).scalar_subquery()
    series = select(Series.id).where(Series.study_id.in_(ids)).scalar_subquery()
    removed: dict[str, int] = {}

    def run(table: str, statement: Delete) -> None:
        result: Any = session.execute(statement.execution_options(synchronize_session=False))
        removed[table] = removed.get(table, 0) + int(result.rowcount or 0)

    # Children before parents, so that foreign keys hold at every step.
    run("report_label", delete(ReportLabels).where(ReportLabels.report_id.in_(reports)))
    run("report_label", delete(ReportLabels).where(ReportLabels.study_id.in_(ids)))
    run("report_embedding", delete(ReportEmbedding).where(ReportEmbedding.report_id.in_(reports)))
    run("report_embedding", delete(ReportEmbedding).where(ReportEmbedding.study_id.in_(ids)))
    run("study_report", delete(StudyReport).where(StudyReport.study_id.in_(ids)))
    run("revisit_score", delete(RevisitScore).where(RevisitScore.study_id.in_(ids)))
    run("image_embedding", delete(ImageEmbedding).where(ImageEmbedding.study_id.in_(ids)))
    run("dispatch_job", delete(DispatchJob).where(DispatchJob.analysis_id.in_(analyses)))
    run("result_object", delete(ResultObject).where(ResultObject.analysis_id.in_(analyses)))
    run("analysis", delete(Analysis).where(Analysis.study_id.in_(ids)))
    run("instance", delete(Instance).where(Instance.series_id.in_(series)))
    run("series", delete(Series).where(Series.study_id.in_(ids)))
    run("study", delete(Study).where(Study.id.in_(ids)))
    sops = [*target.sop_instance_uids, *target.result_sop_instance_uids]
    for chunk in _chunks(sops):
        run(
            "quarantine_entry",
            delete(QuarantineEntry).where(QuarantineEntry.sop_instance_uid.in_(chunk)),
        )
    for chunk in _chunks(sorted(set(quarantine_paths))):
        run("quarantine_entry", delete(QuarantineEntry).where(QuarantineEntry.path.in_(chunk)))
    for chunk in _chunks(target.study_uids):
        run("audit_event", delete(AuditEvent).where(AuditEvent.study_instance_uid.in_(chunk)))
    for chunk in _chunks(sops):
        run("audit_event", delete(AuditEvent).where(AuditEvent.sop_instance_uid.in_(chunk)))
    waiting = [UnlinkedReport.study_instance_uid.in_(target.study_uids)]
    if target.accession_numbers:
        waiting.append(UnlinkedReport.accession_number.in_(target.accession_numbers))
    run("unlinked_report", delete(UnlinkedReport).where(or_(*waiting)))
    audit(session, PURGE_EVENT, None, detail=purge_summary(target.by, removed))
    return removed


def purge_summary(by: str, removed: dict[str, int]) -> str:
    """The audit entry's text: how the studies were chosen and how many rows went, never
    the Patient ID or a UID (a purge must not leave behind what it removed)."""
    counts = ", ".join(f"{table}={count}" for table, count in sorted(removed.items()) if count)
    return f"by {by}: {counts or 'no rows'}"


def enable_secure_delete(session: Session) -> None:
    """SQLite: overwrite deleted rows with zeros on this connection, so that the file keeps
    no trace of them (PostgreSQL reuses the space after VACUUM)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("PRAGMA secure_delete = ON"))


def checkpoint_sqlite(engine: Engine) -> bool:
    """SQLite in WAL mode: copy the log into the database file and empty it, so that old
    page images (with the deleted rows) leave the disk. False when a reader held it back."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        busy = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").scalar()
    return not busy


def _rows(session: Session, query: Any, column: Any, keys: Sequence[Any]) -> list[Any]:
    found: list[Any] = []
    for chunk in _chunks(keys):
        found.extend(session.execute(query.where(column.in_(chunk))).all())
    return found


def _chunks(items: Sequence[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), CHUNK):
        yield list(items[start : start + CHUNK])
