"""Image-report pairs for fine-tuning: every image instance of each study that has a report
(table ``study_report``), with the study's report text."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from plugin.catalog.models import Instance, Series, Study, StudyReport


@dataclass(frozen=True)
class ReportPair:
    study_id: int
    path: str  # relative to the spool directory
    report: str
    sources: tuple[str, ...]  # where the study's reports came from (sr, hl7, api)


def report_image_pairs(session: Session, skip_sop_classes: Collection[str]) -> list[ReportPair]:
    """One pair per image instance of a reported study; several reports of one study are
    joined in the order they arrived. Instances of ``skip_sop_classes`` (the reports' own SRs)
    are left out."""
    reports: dict[int, list[tuple[str, str]]] = {}
    rows = session.execute(
        select(StudyReport.study_id, StudyReport.source, StudyReport.text).order_by(StudyReport.id)
    )
    for study_id, source, text in rows:
        reports.setdefault(study_id, []).append((source, text))
    if not reports:
        return []
    instances = session.execute(
        select(Study.id, Instance.path)
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(Study.id.in_(list(reports)), Instance.sop_class_uid.not_in(list(skip_sop_classes)))
        .order_by(Study.id, Instance.id)
    )
    return [
        ReportPair(
            study_id,
            path,
            "\n".join(text for _, text in reports[study_id]),
            tuple(sorted({source for source, _ in reports[study_id]})),
        )
        for study_id, path in instances
    ]
