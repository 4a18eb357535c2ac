"""Radiology reports linked to studies (table ``study_report``) and their text embeddings
(table ``report_embedding``): kept once per text, embedded once per model version."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plugin.catalog.models import ReportEmbedding, Study, StudyReport


def keep_report(
    session: Session, study_id: int, source: str, digest: str, text: str
) -> tuple[int, bool]:
    """The id of the study's report with this source and text digest, added (flushed, not
    committed) when there is none; and whether it was added."""
    report = _find_report(session, study_id, source, digest)
    if report is not None:
        return report.id, False
    report = StudyReport(study_id=study_id, source=source, digest=digest, text=text)
    session.add(report)
    try:
        session.flush()
    except IntegrityError:  # the same text arrived twice at once
        session.rollback()
        report = _find_report(session, study_id, source, digest)
        if report is None:
            raise
        return report.id, False
    return report.id, True


def report_embedded(session: Session, report_id: int, model_ref: str) -> bool:
    """Whether the report has an embedding under this model version."""
    found = session.scalar(
        select(ReportEmbedding.id).where(
            ReportEmbedding.report_id == report_id, ReportEmbedding.model_ref == model_ref
        )
    )
    return found is not None


def add_report_embedding(
    session: Session,
    report_id: int,
    study_id: int,
    model_ref: str,
    vector: npt.NDArray[np.float32],
) -> None:
    session.add(
        ReportEmbedding(
            report_id=report_id,
            study_id=study_id,
            model_ref=model_ref,
            dim=int(vector.shape[0]),
            vector=vector.astype("<f4").tobytes(),
        )
    )


@dataclass(frozen=True)
class ReportText:
    id: int
    study_id: int
    text: str


def reports_not_in(session: Session, done: Select[int]) -> list[ReportText]:
    """Every stored report whose id ``done`` does not list, oldest first: the reports some
    step (an embedding, a labeler version) has not reached yet."""
    rows = session.execute(
        select(StudyReport.id, StudyReport.study_id, StudyReport.text)
        .where(StudyReport.id.not_in(done))
        .order_by(StudyReport.id)
    )
    return [ReportText(report_id, study_id, text) for report_id, study_id, text in rows]


def reports_without_embedding(session: Session, model_ref: str) -> list[ReportText]:
    """Every stored report that has no embedding under this model version."""
    done = select(ReportEmbedding.report_id).where(ReportEmbedding.model_ref == model_ref)
    return reports_not_in(session, done)


@dataclass(frozen=True)
class EmbeddedReport:
    """A report found through one of its embeddings, with its study's identity."""

    study_instance_uid: str
    patient_id: str | None
    source: str
    text: str


def reports_of_embeddings(
    session: Session, embedding_ids: Iterable[int]
) -> dict[int, EmbeddedReport]:
    """Embedding row id -> the report it embeds (ids not in the catalog are left out)."""
    rows = session.execute(
        select(
            ReportEmbedding.id,
            Study.study_instance_uid,
            Study.patient_id,
            StudyReport.source,
            StudyReport.text,
        )
        .join(StudyReport, StudyReport.id == ReportEmbedding.report_id)
        .join(Study, Study.id == StudyReport.study_id)
        .where(ReportEmbedding.id.in_(list(embedding_ids)))
    )
    return {
        key: EmbeddedReport(study_uid, patient_id, source, text)
        for key, study_uid, patient_id, source, text in rows
    }


def _find_report(session: Session, study_id: int, source: str, digest: str) -> StudyReport | None:
    return session.scalar(
        select(StudyReport).where(
            StudyReport.study_id == study_id,
            StudyReport.source == source,
            StudyReport.digest == digest,
        )
    )
