"""Dispatch jobs as delivery and the operator see them: what a job sends, each attempt's
outcome, the dead-letter list (jobs in state "failed") and its replay.

The functions take a session and leave committing to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from plugin.catalog.models import DispatchJob, Study, utcnow
from plugin.study_state import StudyState


@dataclass(frozen=True)
class JobToSend:
    job_id: int
    destination: str  # a destination name from the settings
    object_paths: list[str]  # relative to the results folder
    state: str


@dataclass(frozen=True)
class DeliveredJob:
    objects: int
    since_analysed_s: float


def job_to_send(session: Session, job_id: int) -> JobToSend:
    """The destination, result objects and state of one job; LookupError when there is none."""
    job = _job(session, job_id)
    paths = [o.path for o in job.analysis.objects]
    return JobToSend(job.id, job.destination, paths, job.state)


def record_retry(session: Session, job_id: int, error: str) -> None:
    """A failed attempt that will be retried: counted and explained, still pending."""
    job = _job(session, job_id)
    job.attempts += 1
    job.updated_at = utcnow()
    job.last_error = error


def record_dead_letter(session: Session, job_id: int, error: str) -> None:
    """The last attempt failed: the job is failed (dead-lettered) with its error."""
    job = _job(session, job_id)
    job.attempts += 1
    job.updated_at = utcnow()
    job.last_error = error
    job.state = "failed"


def record_delivered(session: Session, job_id: int) -> DeliveredJob:
    """The job is delivered; its study is delivered once every job of its analysis is.

    Returns the number of objects of the job and the seconds since its analysis."""
    job = _job(session, job_id)
    job.attempts += 1
    job.updated_at = job.delivered_at = utcnow()
    job.last_error = None
    job.state = "delivered"
    analysis = job.analysis
    study = session.get(Study, analysis.study_id)
    if (
        study is not None
        and study.state == StudyState.ANALYSED
        and study.generation == analysis.generation
        and all(j.state == "delivered" for j in analysis.jobs)
    ):
        study.state = StudyState.DELIVERED
    since_analysed_s = (job.updated_at - analysis.created_at).total_seconds()
    return DeliveredJob(len(analysis.objects), since_analysed_s)


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
    job.updated_at = utcnow()


def requeue_all_failed_jobs(session: Session, destination: str | None = None) -> list[int]:
    """Put every dead-lettered job (of ``destination``, when given) back to pending; their ids,
    oldest first, for the caller to queue."""
    query = select(DispatchJob).where(DispatchJob.state == "failed").order_by(DispatchJob.id)
    if destination is not None:
        query = query.where(DispatchJob.destination == destination)
    jobs = list(session.scalars(query))
    for job in jobs:
        job.state = "pending"
        job.updated_at = utcnow()
    return [job.id for job in jobs]


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
