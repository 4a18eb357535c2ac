"""Knowing when a study is complete.

A study is complete when every association that delivered to it has ended and no
instance arrived for the quiet period, or when the expected instance count is
reached, or when the hard maximum wait has passed since its first instance.
A study that came over one association completes sooner, a short grace after that
association is released, unless its sender has another association open: senders that
spread a study over several associations keep the quiet period.
``CompletionTracker`` is the pure bookkeeping, driven by explicit timestamps so
tests need no clock; ``CompletionMonitor`` runs it on a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

logger = logging.getLogger(__name__)


class CompletionReason(StrEnum):
    QUIET_PERIOD = "quiet_period"
    EXPECTED_COUNT = "expected_count"
    MAX_WAIT = "max_wait"
    ASSOCIATION_RELEASED = "association_released"


@dataclass
class _Tracked:
    first_seen: float
    last_seen: float
    instances: int = 0
    expected: int | None = None
    associations: set[Hashable] = field(default_factory=set)  # open ones
    delivered_by: set[Hashable] = field(default_factory=set)  # every one, open or ended
    sender: str | None = None  # calling AE title of the association(s)
    released_at: float | None = None


@dataclass
class _Open:
    calling_ae_title: str
    studies: set[str] = field(default_factory=set)


class CompletionTracker:
    """Thread-safe per-study bookkeeping; ``due`` hands each complete study out once.

    ``release_grace_s`` set: a study delivered over a single association is complete that
    long after the association ended, if no association of the same sender is open then.
    """

    def __init__(
        self, *, quiet_period_s: float, max_wait_s: float, release_grace_s: float | None = None
    ) -> None:
        self.quiet_period_s = quiet_period_s
        self.max_wait_s = max_wait_s
        self.release_grace_s = release_grace_s
        self._studies: dict[str, _Tracked] = {}
        self._open: dict[Hashable, _Open] = {}
        self._sender_ended: dict[str, float] = {}  # calling AE -> end of its last association
        self._lock = threading.Lock()

    def instance_received(
        self, study_uid: str, association: Hashable | None, now: float, *, new: bool = True
    ) -> bool:
        """Record an instance; returns True when the study was not tracked before."""
        with self._lock:
            tracked = self._studies.get(study_uid)
            first = tracked is None
            if tracked is None:
                tracked = self._studies[study_uid] = _Tracked(first_seen=now, last_seen=now)
            tracked.last_seen = now
            if new:
                tracked.instances += 1
            opened = self._open.get(association) if association is not None else None
            if opened is not None:
                tracked.associations.add(association)
                tracked.delivered_by.add(association)
                tracked.sender = opened.calling_ae_title
                opened.studies.add(study_uid)
            return first

    def resume(self, study_uid: str, *, first_seen: float, instances: int, now: float) -> None:
        """Track a study found receiving in the catalog after a restart."""
        with self._lock:
            self._studies[study_uid] = _Tracked(
                first_seen=first_seen, last_seen=now, instances=instances
            )

    def set_expected(self, study_uid: str, expected: int) -> None:
        with self._lock:
            if study_uid in self._studies:
                self._studies[study_uid].expected = expected

    def association_started(self, association: Hashable, calling_ae_title: str = "") -> None:
        with self._lock:
            self._open[association] = _Open(calling_ae_title)

    def association_ended(self, association: Hashable, now: float) -> None:
        with self._lock:
            opened = self._open.pop(association, None)
            if opened is not None:
                self._sender_ended[opened.calling_ae_title] = now
            for study_uid in opened.studies if opened is not None else ():
                tracked = self._studies.get(study_uid)
                if tracked is not None:
                    tracked.associations.discard(association)
                    # The quiet period counts from the end of the last association.
                    tracked.last_seen = max(tracked.last_seen, now)
                    tracked.released_at = now

    def due(self, now: float) -> list[tuple[str, CompletionReason]]:
        """Studies that are complete at ``now``; each is removed from tracking."""
        done: list[tuple[str, CompletionReason]] = []
        with self._lock:
            for study_uid, t in self._studies.items():
                reason = self._reason(t, now)
                if reason is not None:
                    done.append((study_uid, reason))
            for study_uid, _ in done:
                del self._studies[study_uid]
        return done

    def _reason(self, t: _Tracked, now: float) -> CompletionReason | None:
        if t.expected is not None and t.instances >= t.expected:
            return CompletionReason.EXPECTED_COUNT
        if now - t.first_seen >= self.max_wait_s:
            return CompletionReason.MAX_WAIT
        if t.associations:
            return None
        if now - t.last_seen >= self.quiet_period_s:
            return CompletionReason.QUIET_PERIOD
        if self._released(t, now):
            return CompletionReason.ASSOCIATION_RELEASED
        return None

    def _released(self, t: _Tracked, now: float) -> bool:
        """One association brought the whole study, it ended, and its sender has been idle
        for the grace."""
        grace = self.release_grace_s
        if grace is None or t.released_at is None or t.sender is None:
            return False
        idle_since = max(t.released_at, self._sender_ended.get(t.sender, t.released_at))
        return (
            len(t.delivered_by) == 1
            and t.last_seen <= t.released_at
            and now - idle_since >= grace
            and not any(o.calling_ae_title == t.sender for o in self._open.values())
        )

    def tracking(self) -> list[str]:
        with self._lock:
            return list(self._studies)


class CompletionHandler(Protocol):
    def __call__(self, study_uid: str, reason: CompletionReason) -> None: ...


class CompletionMonitor:
    """Checks the tracker on a thread and hands complete studies to ``on_complete``."""

    def __init__(
        self,
        tracker: CompletionTracker,
        on_complete: CompletionHandler,
        *,
        interval_s: float,
        clock: Callable[[], float],
        periodic: Callable[[], None] | None = None,
        periodic_interval_s: float = 30.0,
    ) -> None:
        self.tracker = tracker
        self.on_complete = on_complete
        self.interval_s = interval_s
        self.clock = clock
        self.periodic = periodic
        self.periodic_interval_s = periodic_interval_s
        self._next_periodic = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def check(self) -> None:
        for study_uid, reason in self.tracker.due(self.clock()):
            try:
                self.on_complete(study_uid, reason)
            except Exception:
                # Put it back so the next check retries; the study is not lost.
                logger.exception("completing study %s failed; will retry", study_uid)
                now = self.clock()
                self.tracker.resume(study_uid, first_seen=now, instances=0, now=now)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
            if self.periodic is not None and self.clock() >= self._next_periodic:
                self._next_periodic = self.clock() + self.periodic_interval_s
                try:
                    self.periodic()
                except Exception:
                    logger.exception(
                        "periodic check failed; next try in %.0f s", self.periodic_interval_s
                    )
