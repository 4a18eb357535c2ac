"""A dispatch job's lifecycle: what it sends, one delivery attempt, retry or dead letter, replay.

A job sends result objects to a destination, or a STAT flag to the webhook or the HL7
receiver (its ``kind``); both go through the same attempts, retries and dead letters.
The dispatch task calls ``deliver`` once per attempt and maps the answer: ``RetryLater`` to a
retry after ``countdown_s``, the others to its return value. Retryable errors are retried
``dispatch_max_retries`` times with capped exponential backoff and jitter; then, or at once
for an error that
sending again cannot fix, the job is dead-lettered (state "failed") until ``replay``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog import dispatch_jobs
from plugin.catalog.repository import stat_flag
from plugin.delivery.destinations import send
from plugin.delivery.notifications import configured, send_notification
from plugin.delivery.outcome import DispatchError
from plugin.settings import DestinationConfig, Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFiles:
    job_id: int
    destination: DestinationConfig | None  # None when the settings no longer name it
    files: list[Path]
    state: str
    kind: str = dispatch_jobs.RESULTS
    analysis_id: int = 0


@dataclass(frozen=True)
class Delivered:
    objects: int  # result objects sent; 0 for a STAT flag
    since_analysed_s: float
    kind: str = dispatch_jobs.RESULTS


@dataclass(frozen=True)
class RetryLater:
    error: DispatchError
    countdown_s: float
    kind: str = dispatch_jobs.RESULTS


@dataclass(frozen=True)
class StillWaiting:
    """An early attempt failed; the job's scheduled retry stays."""

    error: DispatchError
    kind: str = dispatch_jobs.RESULTS


@dataclass(frozen=True)
class DeadLettered:
    error: DispatchError
    kind: str = dispatch_jobs.RESULTS


@dataclass(frozen=True)
class NotSent:
    """Nothing was sent: the job is no longer pending (a redelivered task), or its
    destination is not configured (then it is dead-lettered as "failed")."""

    state: str


DeliveryOutcome = Delivered | RetryLater | StillWaiting | DeadLettered | NotSent


def job_files(sessions: sessionmaker[Session], settings: Settings, job_id: int) -> JobFiles:
    """What one dispatch job sends, and where."""
    with sessions() as session:
        job = dispatch_jobs.job_to_send(session, job_id)
    destination = next((d for d in settings.destinations if d.name == job.destination), None)
    files = [settings.results_dir / path for path in job.object_paths]
    return JobFiles(job.job_id, destination, files, job.state, job.kind, job.analysis_id)


def retry_countdown(
    error: DispatchError,
    attempt: int,
    settings: Settings,
    jitter: Callable[[], float] | None = None,
) -> float | None:
    """Seconds to wait before the next attempt, or None when the job is to be dead-lettered.

    attempt counts the retries made so far (0 on the first attempt). The delay doubles up to
    ``dispatch_backoff_max_s`` and varies by up to 20%, so that the jobs a destination's
    outage held back do not all come back in the same second."""
    if not error.retryable or attempt >= settings.dispatch_max_retries:
        return None
    return _delay_s(settings, attempt) * (jitter or (lambda: random.uniform(0.8, 1.2)))()


def retry_schedule_s(settings: Settings) -> float:
    """How long a retryable failure is retried before its dead letter, without jitter."""
    return sum(_delay_s(settings, a) for a in range(settings.dispatch_max_retries))


def _delay_s(settings: Settings, attempt: int) -> float:
    # The exponent is capped: 2.0**attempt overflows long before a retry count could.
    doubled = settings.dispatch_backoff_s * 2.0 ** min(attempt, 60)
    return min(settings.dispatch_backoff_max_s, doubled)


def deliver(
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: int,
    *,
    attempt: int,
    early: bool = False,
) -> DeliveryOutcome:
    """Send a pending job's objects to its destination and record what came of it.

    ``early``: an attempt brought forward because the destination answered again while the
    job waited on a long backoff; when it fails for a retryable reason the job keeps the retry
    already scheduled (``StillWaiting``) instead of scheduling another."""
    job = job_files(sessions, settings, job_id)
    if job.state != "pending":
        return NotSent(job.state)
    results = job.kind == dispatch_jobs.RESULTS
    if (job.destination is None) if results else not configured(job.kind, settings):
        with sessions.begin() as session:
            dispatch_jobs.record_dead_letter(
                session, job_id, f"{job.kind} destination not configured"
            )
        return NotSent("failed")
    name = job.destination.name if job.destination is not None else job.kind
    try:
        if job.destination is not None:
            send(job.destination, job.files, settings)
        else:
            with sessions() as session:
                flag = stat_flag(session, job.analysis_id)
            send_notification(job.kind, job.analysis_id, flag, settings)
    except DispatchError as exc:
        if early and exc.retryable:
            with sessions.begin() as session:
                dispatch_jobs.record_retry(session, job_id, str(exc))
            logger.warning("job %d to %s: early attempt failed: %s", job_id, name, exc)
            return StillWaiting(exc, job.kind)
        countdown = retry_countdown(exc, attempt, settings)
        if countdown is not None:
            with sessions.begin() as session:
                dispatch_jobs.record_retry(session, job_id, str(exc), retry_in_s=countdown)
            logger.warning("job %d to %s failed, retry in %.1f s: %s", job_id, name, countdown, exc)
            return RetryLater(exc, countdown, job.kind)
        with sessions.begin() as session:
            dispatch_jobs.record_dead_letter(session, job_id, str(exc), replayable=exc.retryable)
        logger.error("job %d to %s dead-lettered: %s", job_id, name, exc)
        return DeadLettered(exc, job.kind)
    with sessions.begin() as session:
        delivered = dispatch_jobs.record_delivered(session, job_id)
    return Delivered(delivered.objects, delivered.since_analysed_s, job.kind)


def replay(sessions: sessionmaker[Session], job_id: int) -> None:
    """Put a dead-lettered job back to pending; the caller queues it for dispatch again.

    LookupError when there is no such job, ValueError when it is not dead-lettered."""
    with sessions.begin() as session:
        dispatch_jobs.requeue_failed_job(session, job_id)


def bring_forward(
    sessions: sessionmaker[Session],
    enqueue_early: Callable[[int], None],
    destination: str,
    later_than: datetime,
) -> list[int]:
    """Queue an early attempt of each pending job of ``destination`` whose next retry is due
    after ``later_than``: what the destination probe does once the destination answers. The
    ids."""
    with sessions.begin() as session:
        job_ids = dispatch_jobs.bring_forward(session, destination, later_than)
    for job_id in job_ids:
        enqueue_early(job_id)
    return job_ids


def replay_all(
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
    destination: str | None = None,
    *,
    replayable_only: bool = False,
) -> list[int]:
    """Put every dead-lettered job (of ``destination``; only those whose retries ran out on
    a retryable error with ``replayable_only``) back to pending and queue each with
    ``enqueue``: what ``pacsclip jobs retry --all`` and the destination probe do. The ids."""
    with sessions.begin() as session:
        job_ids = dispatch_jobs.requeue_all_failed_jobs(
            session, destination, replayable_only=replayable_only
        )
    for n, job_id in enumerate(job_ids):
        try:
            enqueue(job_id)
        except BaseException:
            # The broker is away: the jobs not queued go back to the dead letters (replayed
            # at the next try), not left pending with no task to send them.
            with sessions.begin() as session:
                dispatch_jobs.return_to_dead_letters(session, job_ids[n:])
            raise
    return job_ids
