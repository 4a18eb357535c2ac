"""Studies as other modules look them up: a row id by UID, the spool paths of their
instances, counts per state, and the attributes retrieval filters on and shows."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from plugin.catalog.models import Instance, Series, Site, Study


def study_id_of(session: Session, study_uid: str) -> int | None:
    """The catalog row id of a study; None when the study is not in the catalog."""
    return session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))


def count_by_state(session: Session) -> dict[str, int]:
    """How many studies are in each state (states without studies are left out)."""
    rows = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    return {state: count for state, count in rows}


def instance_paths(session: Session, study_id: int) -> list[str]:
    """Spool paths of every instance of the study, in the order they were cataloged."""
    return list(
        session.scalars(
            select(Instance.path)
            .join(Series)
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
        )
    )


def instance_paths_of_classes(
    session: Session, study_uid: str, sop_class_uids: Collection[str]
) -> list[str]:
    """Spool paths of the study's instances of the given SOP classes."""
    return list(
        session.scalars(
            select(Instance.path)
            .join(Series)
            .join(Study)
            .where(
                Study.study_instance_uid == study_uid,
                Instance.sop_class_uid.in_(sop_class_uids),
            )
        )
    )


@dataclass(frozen=True)
class StudyAttributes:
    """What a retrieval answer shows of a study."""

    id: int
    study_instance_uid: str
    patient_id: str | None
    site: str
    study_date: str | None
    priority: str | None
    modality: str | None  # the modalities of its series, sorted, joined with a backslash


def study_attributes(session: Session, study_ids: Iterable[int]) -> dict[int, StudyAttributes]:
    """Attributes of the studies with these row ids (ids not in the catalog are left out)."""
    ids = list(study_ids)
    rows = session.execute(
        select(
            Study.id,
            Study.study_instance_uid,
            Study.patient_id,
            Site.key,
            Study.study_date,
            Study.priority,
        )
        .join(Site, Site.id == Study.site_id)
        .where(Study.id.in_(ids))
    ).all()
    modalities = _modalities(session, ids)
    return {
        row.id: StudyAttributes(
            id=row.id,
            study_instance_uid=row.study_instance_uid,
            patient_id=row.patient_id,
            site=row.key,
            study_date=row.study_date,
            priority=row.priority,
            modality=modalities.get(row.id),
        )
        for row in rows
    }


def study_patient(session: Session, study_uid: str) -> tuple[int, str | None] | None:
    """A study's row id and Patient ID; None when the study is not in the catalog."""
    row = session.execute(
        select(Study.id, Study.patient_id).where(Study.study_instance_uid == study_uid)
    ).first()
    return None if row is None else (row.id, row.patient_id)


def studies_matching(
    session: Session,
    *,
    site: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    modality: str | None = None,
) -> set[int]:
    """Row ids of the studies of a site, within Study Dates (DICOM DA strings, inclusive)
    and with a series of a modality; each condition applies when given."""
    query = select(Study.id).join(Site, Site.id == Study.site_id)
    if site is not None:
        query = query.where(Site.key == site)
    if date_from is not None:
        query = query.where(Study.study_date >= date_from)
    if date_to is not None:
        query = query.where(Study.study_date <= date_to)
    if modality is not None:
        query = query.where(
            Study.id.in_(select(Series.study_id).where(Series.modality == modality.upper()))
        )
    return set(session.scalars(query))


def _modalities(session: Session, study_ids: Iterable[int]) -> dict[int, str]:
    out: dict[int, set[str]] = {}
    query = select(Series.study_id, Series.modality).where(Series.study_id.in_(list(study_ids)))
    for owner, modality in session.execute(query):
        if modality:
            out.setdefault(owner, set()).add(modality)
    return {study: "\\".join(sorted(values)) for study, values in out.items()}
