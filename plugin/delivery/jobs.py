"""A dispatch job's lifecycle: what it sends, one delivery attempt, retry or dead letter, replay.

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
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog import dispatch_jobs
from plugin.delivery.destinations import send
from plugin.delivery.outcome import DispatchError
from plugin.settings import DestinationConfig, Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFiles:
    job_id: int
    destination: DestinationConfig | None  # None when the settings no longer name it
    files: list[Path]
    state: str


@dataclass(frozen=True)
class Delivered:
    objects: int
    since_analysed_s: float


@dataclass(frozen=True)
class RetryLater:
    error: DispatchError
    countdown_s: float


@dataclass(frozen=True)
class DeadLettered:
    error: DispatchError


@dataclass(frozen=True)
class NotSent:
    """Nothing was sent: the job is no longer pending (a redelivered task), or its
    destination is not configured (then it is dead-lettered as "failed")."""

    state: str


DeliveryOutcome = Delivered | RetryLater | DeadLettered | NotSent


def job_files(sessions: sessionmaker[Session], settings: Settings, job_id: int) -> JobFiles:
    """What one dispatch job sends, and where."""
    with sessions() as session:
        job = dispatch_jobs.job_to_send(session, job_id)
    destination = next((d for d in settings.destinations if d.name == job.destination), None)
    files = [settings.results_dir / path for path in job.object_paths]
    return JobFiles(job.job_id, destination, files, job.state)


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
    sessions: sessionmaker[Session], settings: Settings, job_id: int, *, attempt: int
) -> DeliveryOutcome:
    """Send a pending job's objects to its destination and record what came of it."""
    job = job_files(sessions, settings, job_id)
    if job.state != "pending":
        return NotSent(job.state)
    if job.destination is None:
        with sessions.begin() as session:
            dispatch_jobs.record_dead_letter(session, job_id, "destination not configured")
        return NotSent("failed")
    name = job.destination.name
    try:
        send(job.destination, job.files, settings)
    except DispatchError as exc:
        countdown = retry_countdown(exc, attempt, settings)
        if countdown is not None:
            with sessions.begin() as session:
                dispatch_jobs.record_retry(session, job_id, str(exc))
            logger.warning("job %d to %s failed, retry in %.1f s: %s", job_id, name, countdown, exc)
            return RetryLater(exc, countdown)
        with sessions.begin() as session:
            dispatch_jobs.record_dead_letter(session, job_id, str(exc))
        logger.error("job %d to %s dead-lettered: %s", job_id, name, exc)
        return DeadLettered(exc)
    with sessions.begin() as session:
        delivered = dispatch_jobs.record_delivered(session, job_id)
    return Delivered(delivered.objects, delivered.since_analysed_s)


def replay(sessions: sessionmaker[Session], job_id: int) -> None:
    """Put a dead-lettered job back to pending; the caller queues it for dispatch again.

    LookupError when there is no such job, ValueError when it is not dead-lettered."""
    with sessions.begin() as session:
        dispatch_jobs.requeue_failed_job(session, job_id)
