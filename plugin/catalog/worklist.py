"""The dashboard's reads: worklist pages (keyset pagination), a study's images, its priors
and its source files, and the sites to filter on.

A page lists STAT studies first, then the others, each group by received time. It is at most
two index range scans on (received_at, id) — the STAT group on (priority, received_at, id),
the rest on (received_at, id), optionally within a state (migration 0006) — and everything
shown per row is then read for that page's ids only, so a page costs the same on the first
page and the thousandth, with 100 or 100,000 studies.

A finding counts as one only when its stored decision is "present", as in the SR: a score in
the undetermined zone around the threshold is shown apart, never as a finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

from sqlalchemy import ColumnElement, exists, func, or_, select, tuple_
from sqlalchemy.orm import Session

from plugin.catalog.models import (
    Analysis,
    DispatchJob,
    Instance,
    ResultObject,
    RevisitScore,
    Series,
    Site,
    Study,
)

Order = Literal["newest", "oldest"]
MAX_PAGE = 200


STAT: Final = "stat"
PRESENT: Final = "present"
UNDETERMINED: Final = "indeterminate"  # the SR's "Undetermined" (SCT 373068000)


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the (received_at, id) of its last row, and whether that row is in
    the STAT group (listed first)."""

    received_at: datetime
    study_id: int
    stat: bool = False

    def token(self) -> str:
        moment = f"{self.received_at.isoformat()}~{self.study_id}"
        return f"stat~{moment}" if self.stat else moment

    @classmethod
    def parse(cls, token: str) -> Cursor:
        """ValueError with what is wrong when the token is not one this module made."""
        stat = token.startswith("stat~")
        moment, sep, study_id = token.removeprefix("stat~").rpartition("~")
        if not sep or not study_id.isdigit():
            raise ValueError(f"page cursor {token!r} is not [stat~]<ISO time>~<id>")
        try:
            when = datetime.fromisoformat(moment)
        except ValueError as exc:
            raise ValueError(f"page cursor {token!r} has no valid time") from exc
        return cls(when, int(study_id), stat)


@dataclass(frozen=True)
class WorklistQuery:
    state: str | None = None
    priority: str | None = None
    site: str | None = None
    revisit_flagged: bool | None = None
    order: Order = "newest"
    after: Cursor | None = None
    limit: int = 50


@dataclass(frozen=True)
class FindingSummary:
    name: str
    display: str
    probability: float
    threshold: float


@dataclass(frozen=True)
class WorklistRow:
    study_instance_uid: str
    state: str
    priority: str | None
    site: str
    received_at: datetime
    study_description: str | None
    modalities: str
    instances: int
    revisit_flagged: bool
    # Shown to the logged-in reader only; never put in a URL or a log line.
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    findings: list[FindingSummary] = field(default_factory=list)  # decision "present"
    undetermined: list[FindingSummary] = field(default_factory=list)  # in the zone
    algorithm: str | None = None  # "name version" of the newest analysis
    synthetic: bool = False


@dataclass(frozen=True)
class WorklistPage:
    rows: list[WorklistRow]
    next_cursor: Cursor | None


def worklist_page(session: Session, query: WorklistQuery) -> WorklistPage:
    """One page of studies, STAT first, each group in ``query.order`` with its filters;
    ``next_cursor`` is None on the last page."""
    limit = max(1, min(query.limit, MAX_PAGE))
    after = query.after
    keys: list[tuple[int, datetime, bool]] = []
    if query.priority in (None, STAT) and (after is None or after.stat):
        stats = _page_keys(session, query, Study.priority == STAT, after, limit + 1)
        keys += [(study_id, received_at, True) for study_id, received_at in stats]
    if query.priority != STAT and len(keys) <= limit:
        others = or_(Study.priority.is_(None), Study.priority != STAT)
        rest_after = None if after is None or after.stat else after
        rest = _page_keys(session, query, others, rest_after, limit + 1 - len(keys))
        keys += [(study_id, received_at, False) for study_id, received_at in rest]
    next_cursor = None
    if len(keys) > limit:
        study_id, received_at, stat = keys[limit - 1]
        next_cursor = Cursor(received_at, study_id, stat)
    rows = _rows(session, [k[0] for k in keys[:limit]])
    return WorklistPage(rows, next_cursor)


def _page_keys(
    session: Session,
    query: WorklistQuery,
    group: ColumnElement[bool],
    after: Cursor | None,
    limit: int,
) -> list[tuple[int, datetime]]:
    """The ids and received times of at most ``limit`` studies of one group (STAT or the
    rest) after ``after``: one index range scan."""
    key = tuple_(Study.received_at, Study.id)
    newest = query.order == "newest"
    select_ids = (
        select(Study.id, Study.received_at)
        .where(group)
        .order_by(
            *(
                (Study.received_at.desc(), Study.id.desc())
                if newest
                else (Study.received_at.asc(), Study.id.asc())
            )
        )
    )
    if query.state:
        select_ids = select_ids.where(Study.state == query.state)
    if query.priority:
        select_ids = select_ids.where(Study.priority == query.priority)
    if query.site:
        select_ids = select_ids.where(
            Study.site_id.in_(select(Site.id).where(Site.key == query.site))
        )
    if query.revisit_flagged is not None:
        flagged = exists().where(RevisitScore.study_id == Study.id, RevisitScore.flagged.is_(True))
        select_ids = select_ids.where(flagged if query.revisit_flagged else ~flagged)
    if after is not None:
        bound = tuple_(after.received_at, after.study_id)
        select_ids = select_ids.where(key < bound if newest else key > bound)
    return [(k.id, k.received_at) for k in session.execute(select_ids.limit(limit))]


def _rows(session: Session, ids: Sequence[int]) -> list[WorklistRow]:
    if not ids:
        return []
    studies = session.execute(
        select(Study, Site.key).join(Site, Site.id == Study.site_id).where(Study.id.in_(ids))
    ).all()
    counts = dict(
        session.execute(
            select(Series.study_id, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        ).all()
    )
    modalities: dict[int, set[str]] = {}
    for owner, modality in session.execute(
        select(Series.study_id, Series.modality).where(Series.study_id.in_(ids))
    ):
        if modality:
            modalities.setdefault(owner, set()).add(modality)
    flagged = set(
        session.scalars(
            select(RevisitScore.study_id).where(
                RevisitScore.study_id.in_(ids), RevisitScore.flagged.is_(True)
            )
        )
    )
    newest: dict[int, Analysis] = {}
    for analysis in session.scalars(
        select(Analysis)
        .where(Analysis.study_id.in_(ids), Analysis.role == "live")
        .order_by(Analysis.generation, Analysis.id)
    ):
        newest[analysis.study_id] = analysis
    by_id = {
        study.id: WorklistRow(
            study_instance_uid=study.study_instance_uid,
            state=study.state,
            priority=study.priority,
            site=site_key,
            received_at=study.received_at,
            study_description=study.study_description,
            modalities="\\".join(sorted(modalities.get(study.id, set()))),
            instances=int(counts.get(study.id, 0)),
            revisit_flagged=study.id in flagged,
            patient_name=study.patient_name,
            patient_id=study.patient_id,
            accession_number=study.accession_number,
            study_date=study.study_date,
            findings=finding_summaries(newest.get(study.id), PRESENT),
            undetermined=finding_summaries(newest.get(study.id), UNDETERMINED),
            algorithm=_algorithm(newest.get(study.id)),
            synthetic=bool(newest[study.id].synthetic) if study.id in newest else False,
        )
        for study, site_key in studies
    }
    return [by_id[i] for i in ids if i in by_id]


def finding_summaries(analysis: Analysis | None, decision: str) -> list[FindingSummary]:
    """The analysis's findings whose stored decision is ``decision``, most probable first.

    The decision is the one the SR reports: a probability at or above the threshold that
    falls in the undetermined zone is "indeterminate", not "present". A row without a
    decision (or without numbers) is no finding.
    """
    if analysis is None:
        return []
    found = []
    for f in analysis.findings:
        probability, threshold = _number(f.get("probability")), _number(f.get("threshold"))
        if f.get("decision") == decision and probability is not None and threshold is not None:
            name = str(f.get("name", ""))
            found.append(
                FindingSummary(name, str(f.get("display") or name), probability, threshold)
            )
    return sorted(found, key=lambda s: -s.probability)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _algorithm(analysis: Analysis | None) -> str | None:
    return None if analysis is None else f"{analysis.algorithm_name} {analysis.algorithm_version}"


def site_keys(session: Session) -> list[str]:
    return list(session.scalars(select(Site.key).order_by(Site.key)))


@dataclass(frozen=True)
class PatientFacts:
    """What the catalog recorded of a study's header (shown to the logged-in reader only)."""

    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None  # DICOM DA, YYYYMMDD
    study_description: str | None


def patient_facts(session: Session, study_uid: str) -> PatientFacts | None:
    row = session.execute(
        select(
            Study.patient_name,
            Study.patient_id,
            Study.accession_number,
            Study.study_date,
            Study.study_description,
        ).where(Study.study_instance_uid == study_uid)
    ).one_or_none()
    return None if row is None else PatientFacts(*row)


MAX_PRIORS: Final = 100


@dataclass(frozen=True)
class Prior:
    """Another study of the same patient (by Patient ID) in the catalog."""

    study_instance_uid: str
    study_date: str | None  # DICOM DA, YYYYMMDD
    accession_number: str | None
    study_description: str | None
    modalities: str
    site: str
    state: str
    priority: str | None
    received_at: datetime


def priors(session: Session, study_uid: str) -> list[Prior]:
    """The other studies with the study's Patient ID, newest study date first (undated ones
    last), then by received time; none when the study has no Patient ID."""
    patient_id = session.scalar(
        select(Study.patient_id).where(Study.study_instance_uid == study_uid)
    )
    if not patient_id:
        return []
    rows = session.execute(
        select(Study, Site.key)
        .join(Site, Site.id == Study.site_id)
        .where(Study.patient_id == patient_id, Study.study_instance_uid != study_uid)
        .order_by(
            Study.study_date.is_(None),
            Study.study_date.desc(),
            Study.received_at.desc(),
            Study.id.desc(),
        )
        .limit(MAX_PRIORS)
    ).all()
    modalities: dict[int, set[str]] = {}
    for owner, modality in session.execute(
        select(Series.study_id, Series.modality).where(
            Series.study_id.in_([study.id for study, _ in rows])
        )
    ):
        if modality:
            modalities.setdefault(owner, set()).add(modality)
    return [
        Prior(
            study_instance_uid=study.study_instance_uid,
            study_date=study.study_date,
            accession_number=study.accession_number,
            study_description=study.study_description,
            modalities="\\".join(sorted(modalities.get(study.id, set()))),
            site=site_key,
            state=study.state,
            priority=study.priority,
            received_at=study.received_at,
        )
        for study, site_key in rows
    ]


@dataclass(frozen=True)
class StoredImage:
    """Where an image of a study is kept: an instance in the spool or a result object."""

    root: Literal["spool", "results"]
    path: str  # relative to that root


def stored_image(session: Session, study_uid: str, sop_instance_uid: str) -> StoredImage | None:
    """The file of a received instance or a result object of this study; None if neither."""
    spooled = session.scalar(
        select(Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study_uid, Instance.sop_instance_uid == sop_instance_uid)
    )
    if spooled is not None:
        return StoredImage("spool", spooled)
    made = session.scalar(
        select(ResultObject.path)
        .join(Analysis, Analysis.id == ResultObject.analysis_id)
        .join(Study, Study.id == Analysis.study_id)
        .where(
            Study.study_instance_uid == study_uid,
            ResultObject.sop_instance_uid == sop_instance_uid,
        )
    )
    return None if made is None else StoredImage("results", made)


def first_instances(session: Session, study_uids: Sequence[str]) -> dict[str, str]:
    """Per study, the SOP Instance UID of its first cataloged instance (its thumbnail)."""
    first = (
        select(Study.study_instance_uid, func.min(Instance.id).label("instance_id"))
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(Study.study_instance_uid.in_(list(study_uids)))
        .group_by(Study.study_instance_uid)
        .subquery()
    )
    rows = session.execute(
        select(first.c.study_instance_uid, Instance.sop_instance_uid).join(
            Instance, Instance.id == first.c.instance_id
        )
    ).all()
    return {uid: sop for uid, sop in rows}


@dataclass(frozen=True)
class Delivery:
    job_id: int
    generation: int
    algorithm: str
    destination: str
    state: str  # pending | delivered | failed
    attempts: int
    objects: int
    last_error: str | None
    updated_at: datetime


def study_deliveries(session: Session, study_uid: str) -> list[Delivery]:
    """The dispatch jobs of every analysis of the study, newest analysis first."""
    jobs = session.scalars(
        select(DispatchJob)
        .join(Analysis, Analysis.id == DispatchJob.analysis_id)
        .join(Study, Study.id == Analysis.study_id)
        .where(Study.study_instance_uid == study_uid)
        .order_by(Analysis.id.desc(), DispatchJob.id)
    )
    return [
        Delivery(
            job_id=job.id,
            generation=job.analysis.generation,
            algorithm=f"{job.analysis.algorithm_name} {job.analysis.algorithm_version}",
            destination=job.destination,
            state=job.state,
            attempts=job.attempts,
            objects=len(job.analysis.objects) if job.kind == "results" else 0,
            last_error=job.last_error,
            updated_at=job.updated_at,
        )
        for job in jobs
    ]
