"""Jobs held back by an outage, sent again as soon as their destination is back.

A job whose retries ran out while its destination was unreachable is dead-lettered as
``replayable``; a job still retrying may wait minutes for its next try. The DICOM node (one
per deployment) checks every few seconds which destinations hold such jobs (replayable dead
letters, or pending jobs whose next retry is more than ``destination_probe_interval_s`` away)
and probes each at most that often: C-ECHO for a DICOM node, a QIDO-RS search for a DICOMweb
service, a TCP connect for the STAT webhook and the HL7 receiver. One that answers gets its
dead letters replayed as ``pacsclip jobs retry --all --destination NAME`` does
(``plugin.delivery.jobs.replay_all``) and an early attempt of its waiting jobs
(``plugin.delivery.jobs.bring_forward``), with a log line and an audit entry
(``dispatch_replayed``) that name the destination and the counts. Jobs dead-lettered for a
reason that sending again cannot fix (a refused SOP class, a receiver that rejected the flag)
wait for an operator.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog import dispatch_jobs
from plugin.catalog.repository import audit
from plugin.delivery.destinations import stow_destination
from plugin.delivery.dimse import Destination, echo
from plugin.delivery.jobs import bring_forward, replay_all
from plugin.delivery.stow import answers
from plugin.settings import Settings

logger = logging.getLogger(__name__)

# How often the catalog is read for destinations with dead letters; probes are rarer.
CHECK_INTERVAL_S: Final = 5.0
PROBE_TIMEOUT_S: Final = 10.0
REPLAY_EVENT: Final = "dispatch_replayed"  # the audit entry of a replay (no patient data)


def destinations_to_probe(
    waiting: Mapping[str, int],
    probed_at: Mapping[str, float],
    now: float,
    interval_s: float,
) -> list[str]:
    """The destinations with jobs waiting for them (``waiting``: counts per name) that were
    not probed in the last ``interval_s`` seconds (never probed: at once), by name."""
    return sorted(
        name
        for name, count in waiting.items()
        if count > 0 and (name not in probed_at or now - probed_at[name] >= interval_s)
    )


def probe(name: str, settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the destination ``name`` (a configured destination, or ``webhook``/``hl7``)
    answers now. One the settings no longer name never does."""
    timeout_s = min(timeout_s, settings.dispatch_timeout_s)
    if name == dispatch_jobs.WEBHOOK:
        if not settings.webhook_url:
            return False
        parts = urllib.parse.urlsplit(settings.webhook_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return _connects(parts.hostname or "", port, timeout_s)
    if name == dispatch_jobs.HL7:
        if not (settings.hl7_host and settings.hl7_port):
            return False
        return _connects(settings.hl7_host, settings.hl7_port, timeout_s)
    config = next((d for d in settings.destinations if d.name == name), None)
    if config is None:
        return False
    if config.url is not None:
        return answers(stow_destination(config), timeout_s=timeout_s)
    if config.ae_title is None or config.host is None or config.port is None:
        return False  # the settings validator forbids it
    node = Destination(
        name=name,
        ae_title=config.ae_title,
        host=config.host,
        port=config.port,
        tls=config.tls,
        tls_ca=config.tls_ca,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
    )
    return echo(node, calling_ae_title=settings.ae_title, timeout_s=timeout_s)


def _connects(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class RecoveryMetrics:
    """Probes and replays of the destination check, in a process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Counter(
            "pacsclip_destination_probes",
            "Probes of destinations holding dead-lettered jobs, by whether they answered",
            ["destination", "answered"],
            registry=registry,
        )
        self.replayed = Counter(
            "pacsclip_replayed_dispatch_jobs",
            "Jobs queued again because their destination answered again: dead letters "
            "(was=failed) and jobs waiting on a long backoff (was=pending)",
            ["destination", "was"],
            registry=registry,
        )


class DestinationRecovery:
    """Probes destinations that jobs wait for and sends those jobs when they answer.

    ``enqueue(job_id, early)`` queues a dispatch; ``early`` for a pending job brought forward."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        enqueue: Callable[[int, bool], None],
        metrics: RecoveryMetrics,
        *,
        answers_now: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.enqueue = enqueue
        self.metrics = metrics
        self.answers_now = answers_now or (lambda name: probe(name, settings))
        self.clock = clock
        self.wall_clock = wall_clock
        self.probed_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="destination-probe", daemon=True)

    def check(self) -> dict[str, list[int]]:
        """One round: probe what is due; the job ids queued again, per destination."""
        interval = self.settings.destination_probe_interval_s
        # A retry due sooner than the next probe would come needs no help.
        later_than = self.wall_clock() + timedelta(seconds=interval)
        with self.sessions() as session:
            waiting = dispatch_jobs.jobs_to_replay(session, later_than)
        # A destination nothing waits for is forgotten: when one does, it is probed at once.
        self.probed_at = {k: v for k, v in self.probed_at.items() if k in waiting}
        now = self.clock()
        replayed: dict[str, list[int]] = {}
        for name in destinations_to_probe(waiting, self.probed_at, now, interval):
            self.probed_at[name] = now
            answered = self.answers_now(name)
            self.metrics.probes.labels(destination=name, answered=str(answered).lower()).inc()
            if not answered:
                logger.info(
                    "destination %s does not answer (%d jobs wait for it); next probe in %.0f s",
                    name,
                    waiting[name],
                    interval,
                )
                continue
            dead = replay_all(
                self.sessions, lambda j: self.enqueue(j, False), name, replayable_only=True
            )
            early = bring_forward(self.sessions, lambda j: self.enqueue(j, True), name, later_than)
            self.metrics.replayed.labels(destination=name, was="failed").inc(len(dead))
            self.metrics.replayed.labels(destination=name, was="pending").inc(len(early))
            detail = (
                f"destination {name} answers again: {len(dead)} dead-lettered jobs queued "
                f"again, {len(early)} waiting jobs brought forward"
            )
            logger.warning("%s", detail)
            with self.sessions.begin() as session:
                audit(session, REPLAY_EVENT, None, detail=detail)
            replayed[name] = dead + early
        return replayed

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.drain_timeout_s)

    def _run(self) -> None:
        pause = min(CHECK_INTERVAL_S, self.settings.destination_probe_interval_s)
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:
                # The catalog or the broker away for a moment: the next round tries again.
                logger.exception("destination check failed; next in %.0f s", pause)
            if self._stop.wait(pause):
                return
