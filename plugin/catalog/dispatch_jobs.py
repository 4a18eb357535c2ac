"""Dispatch jobs as delivery and the operator see them: what a job sends, each attempt's
outcome, the dead-letter list (jobs in state "failed") and its replay.

A job's ``kind`` says what it delivers: ``results`` (the analysis's objects to a configured
destination), or the STAT flag to the webhook (``webhook``) or the HL7 receiver (``hl7``),
whose destination is the kind itself.

The functions take a session and leave committing to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from plugin.catalog.models import DispatchJob, Study, utcnow
from plugin.study_state import StudyState

RESULTS: Final = "results"
WEBHOOK: Final = "webhook"
HL7: Final = "hl7"
NOTIFICATION_KINDS: Final = (WEBHOOK, HL7)


@dataclass(frozen=True)
class JobToSend:
    job_id: int
    destination: str  # a destination name from the settings, or the notification kind
    object_paths: list[str]  # relative to the results folder
    state: str
    kind: str = RESULTS
    analysis_id: int = 0


@dataclass(frozen=True)
class DeliveredJob:
    objects: int
    since_analysed_s: float


def job_to_send(session: Session, job_id: int) -> JobToSend:
    """The destination, result objects and state of one job; LookupError when there is none."""
    job = _job(session, job_id)
    paths = [o.path for o in job.analysis.objects] if job.kind == RESULTS else []
    return JobToSend(job.id, job.destination, paths, job.state, job.kind, job.analysis_id)


def add_notification_jobs(session: Session, analysis_id: int, kinds: list[str]) -> list[int]:
    """A pending job per notification kind (``webhook``, ``hl7``) for the analysis's STAT
    flag; a kind that already has one is left as it is. The ids of the new jobs."""
    if any(kind not in NOTIFICATION_KINDS for kind in kinds):
        raise ValueError(f"notification kinds are {', '.join(NOTIFICATION_KINDS)}")
    existing = set(
        session.scalars(select(DispatchJob.kind).where(DispatchJob.analysis_id == analysis_id))
    )
    jobs = [
        DispatchJob(analysis_id=analysis_id, kind=kind, destination=kind, state="pending")
        for kind in kinds
        if kind not in existing
    ]
    session.add_all(jobs)
    session.flush()
    return [job.id for job in jobs]


def record_retry(
    session: Session, job_id: int, error: str, *, retry_in_s: float | None = None
) -> None:
    """A failed attempt that will be retried: counted and explained, still pending.

    ``retry_in_s``: when the scheduled retry is due (None: an early attempt, whose job keeps
    the retry already scheduled)."""
    job = _job(session, job_id)
    job.attempts += 1
    job.updated_at = utcnow()
    job.last_error = error
    if retry_in_s is not None:
        job.next_attempt_at = job.updated_at + timedelta(seconds=retry_in_s)


def record_dead_letter(
    session: Session, job_id: int, error: str, *, replayable: bool = False
) -> None:
    """The last attempt failed: the job is failed (dead-lettered) with its error.

    ``replayable``: the retries ran out on an error that sending again could fix, so the job
    is replayed when its destination answers again (plugin.delivery.recovery)."""
    job = _job(session, job_id)
    job.attempts += 1
    job.updated_at = utcnow()
    job.last_error = error
    job.state = "failed"
    job.replayable = replayable
    job.next_attempt_at = None


def record_delivered(session: Session, job_id: int) -> DeliveredJob:
    """The job is delivered; its study is delivered once every job of its analysis is.

    Returns the number of objects of the job and the seconds since its analysis."""
    job = _job(session, job_id)
    job.attempts += 1
    job.updated_at = job.delivered_at = utcnow()
    job.last_error = None
    job.state = "delivered"
    job.next_attempt_at = None
    analysis = job.analysis
    study = session.get(Study, analysis.study_id)
    if (
        job.kind == RESULTS
        and study is not None
        and study.state == StudyState.ANALYSED
        and study.generation == analysis.generation
        # The study is delivered when its results are; a STAT flag is a notification.
        and all(j.state == "delivered" for j in analysis.jobs if j.kind == RESULTS)
    ):
        study.state = StudyState.DELIVERED
    since_analysed_s = (job.updated_at - analysis.created_at).total_seconds()
    objects = len(analysis.objects) if job.kind == RESULTS else 0
    return DeliveredJob(objects, since_analysed_s)


def recent_jobs(
    session: Session, *, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Jobs newest first, optionally only those in one state, as the CLI lists them."""
    query = select(DispatchJob).order_by(DispatchJob.id.desc()).limit(limit)
    if state:
        query = query.where(DispatchJob.state == state)
    return [
        {
            "id": job.id,
            "kind": job.kind,
            "state": job.state,
            "destination": job.destination,
            "attempts": job.attempts,
            "last_error": job.last_error,
            "study_instance_uid": job.analysis.study.study_instance_uid,
            "algorithm": f"{job.analysis.algorithm_name} {job.analysis.algorithm_version}",
            "updated_at": job.updated_at.isoformat(),
        }
        for job in session.scalars(query)
    ]


def requeue_failed_job(session: Session, job_id: int) -> None:
    """Put a dead-lettered (failed) job back to pending for a replay.

    LookupError when there is no such job, ValueError when it is not failed."""
    job = _job(session, job_id)
    if job.state != "failed":
        raise ValueError(f"job {job_id} is {job.state}; only failed jobs are replayed")
    job.state = "pending"
    job.replayable = False
    job.updated_at = utcnow()


def requeue_all_failed_jobs(
    session: Session, destination: str | None = None, *, replayable_only: bool = False
) -> list[int]:
    """Put every dead-lettered job (of ``destination``, when given; only the replayable ones
    with ``replayable_only``) back to pending; their ids, oldest first, for the caller to
    queue."""
    query = select(DispatchJob).where(DispatchJob.state == "failed").order_by(DispatchJob.id)
    if destination is not None:
        query = query.where(DispatchJob.destination == destination)
    if replayable_only:
        query = query.where(DispatchJob.replayable.is_(True))
    jobs = list(session.scalars(query))
    for job in jobs:
        job.state = "pending"
        job.replayable = False
        job.updated_at = utcnow()
    return [job.id for job in jobs]


def return_to_dead_letters(session: Session, job_ids: list[int]) -> None:
    """Jobs put back to pending for a replay that could not be queued: failed again, and
    replayable, so that the next replay takes them."""
    for job_id in job_ids:
        job = _job(session, job_id)
        if job.state == "pending":
            job.state = "failed"
            job.replayable = True
            job.updated_at = utcnow()


def jobs_to_replay(session: Session, later_than: datetime) -> dict[str, int]:
    """Per destination (a notification's destination is its kind), how many jobs wait for it
    to come back: replayable dead letters, and pending jobs whose next retry is due only after
    ``later_than`` (a long backoff)."""
    query = (
        select(DispatchJob.destination, func.count(DispatchJob.id))
        .where(_waiting(later_than))
        .group_by(DispatchJob.destination)
    )
    return {destination: int(count) for destination, count in session.execute(query)}


def bring_forward(session: Session, destination: str, later_than: datetime) -> list[int]:
    """The pending jobs of ``destination`` whose next retry is due after ``later_than``,
    marked as brought forward (so that each is queued early once); their ids, oldest first.
    Their scheduled retries stay: the first attempt that delivers ends the job."""
    jobs = list(
        session.scalars(
            select(DispatchJob)
            .where(
                DispatchJob.destination == destination,
                DispatchJob.state == "pending",
                DispatchJob.next_attempt_at > later_than,
            )
            .order_by(DispatchJob.id)
        )
    )
    for job in jobs:
        job.next_attempt_at = None
    return [job.id for job in jobs]


def _waiting(later_than: datetime) -> ColumnElement[bool]:
    return or_(
        and_(DispatchJob.state == "failed", DispatchJob.replayable.is_(True)),
        and_(DispatchJob.state == "pending", DispatchJob.next_attempt_at > later_than),
    )


def count_failed_jobs(session: Session) -> int:
    """How many jobs are dead-lettered and wait for an operator."""
    return int(
        session.scalar(select(func.count(DispatchJob.id)).where(DispatchJob.state == "failed")) or 0
    )


def _job(session: Session, job_id: int) -> DispatchJob:
    job = session.get(DispatchJob, job_id)
    if job is None:
        raise LookupError(f"no dispatch job {job_id}")
    return job
