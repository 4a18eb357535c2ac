"""The last hour of this process' Prometheus figures, for the operations page's small plots.

A ring buffer of samples read from the process' own registry (no Prometheus server needed):
a background thread samples every ``interval_s`` while the HTTP server runs, and a page view
takes a sample when the last one is older than that (so the plots also fill without the
thread, e.g. in tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

# What the plots show: what this process counts itself (under `pacsclip serve` the node runs
# in it; the worker is another process with its own registry) and the catalog gauges, which
# hold the whole pipeline's picture whichever process did the work.
PLOTTED: Final = (
    ("pacsclip_received_instances_total", "instances received"),
    ("pacsclip_complete_studies_total", "studies complete"),
    ('pacsclip_studies{state="receiving"}', "studies receiving"),
    ('pacsclip_studies{state="queued"}', "studies queued"),
    ('pacsclip_studies{state="analysed"}', "studies analysed"),
    ('pacsclip_studies{state="delivered"}', "studies delivered"),
    ('pacsclip_studies{state="failed"}', "studies failed"),
    ("pacsclip_failed_dispatch_jobs", "dead letters waiting"),
)
WINDOW_S: Final = 3600.0


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    points: list[tuple[float, float]]  # (unix time, value)

    @property
    def latest(self) -> float | None:
        return self.points[-1][1] if self.points else None

    def svg_points(self, width: int = 240, height: int = 48, now: float | None = None) -> str:
        """The points as an SVG polyline's ``points``: the last hour left to right."""
        if not self.points:
            return ""
        end = now if now is not None else self.points[-1][0]
        start = end - WINDOW_S
        values = [v for _, v in self.points]
        low, high = min(values), max(values)
        span = high - low or 1.0
        out = []
        for t, v in self.points:
            x = (t - start) / WINDOW_S * width
            y = height - (v - low) / span * (height - 4) - 2
            out.append(f"{max(0.0, x):.1f},{y:.1f}")
        return " ".join(out)


def read_samples(registry: CollectorRegistry) -> dict[str, float]:
    """The registry's samples by ``name{label="value"}``."""
    values: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return values


class MetricsHistory:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        interval_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self.interval_s = interval_s
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, float]]] = deque(
            maxlen=int(WINDOW_S / interval_s) + 1
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        now = self._clock()
        values = read_samples(self._registry)
        with self._lock:
            self._samples.append((now, values))

    def sample_if_due(self, max_age_s: float | None = None) -> None:
        """Sample when the newest sample is older than ``max_age_s`` (default: the interval):
        a page shows current figures."""
        with self._lock:
            last = self._samples[-1][0] if self._samples else None
        limit = self.interval_s if max_age_s is None else max_age_s
        if last is None or self._clock() - last >= limit:
            self.sample()

    def series(self, plotted: Iterable[tuple[str, str]] = PLOTTED) -> list[Series]:
        with self._lock:
            samples = list(self._samples)
        horizon = self._clock() - WINDOW_S
        recent = [(t, v) for t, v in samples if t >= horizon]
        return [
            Series(key, label, [(t, v[key]) for t, v in recent if key in v])
            for key, label in plotted
            if any(key in v for _, v in recent)
        ]

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="metrics-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
