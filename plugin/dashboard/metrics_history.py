"""The last hour of pacsclip's Prometheus figures, for the operations page's small plots.

A ring buffer of samples read from the process' own registry (no Prometheus server needed),
plus the ``/metrics`` of the other processes named in ``metrics_scrape_urls`` (a standalone
node, the workers), each read with a timeout and added up by series: a counter of several
workers is their sum. A process that does not answer is left out of that sample (logged once)
and the plots go on with the others. A background thread samples every ``interval_s`` while
the HTTP server runs, and a page view takes a sample when the last one is older than that (so
the plots also fill without the thread, e.g. in tests).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

# What the plots show: what the node counts (in this process under `pacsclip serve`, else read
# from the node's /metrics) and the catalog gauges, which hold the whole pipeline's picture
# whichever process did the work.
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
SCRAPE_TIMEOUT_S: Final = 2.0


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
    return _samples(registry.collect())


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> dict[str, float]:
    """The samples another process serves on ``url`` (Prometheus text format), by
    ``name{label="value"}``; OSError when it does not answer in ``timeout_s``, ValueError when
    the answer is not that format."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    return _samples(text_string_to_metric_families(text))


def _samples(families: Iterable[Metric]) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return values


class MetricsHistory:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        scrape_urls: Iterable[str] = (),
        scrape_timeout_s: float = SCRAPE_TIMEOUT_S,
        interval_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self.scrape_urls = tuple(scrape_urls)
        self.scrape_timeout_s = scrape_timeout_s
        self.unreachable: set[str] = set()  # scrape URLs that failed at the last sample
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
        for url in self.scrape_urls:
            for key, value in self._scrape(url).items():
                if not key.endswith("_created"):  # a start time: not a figure to add up
                    values[key] = values.get(key, 0.0) + value
        with self._lock:
            self._samples.append((now, values))

    def _scrape(self, url: str) -> dict[str, float]:
        try:
            values = scrape(url, self.scrape_timeout_s)
        except (OSError, ValueError) as exc:
            if url not in self.unreachable:
                logger.warning("metrics of %s not read (plots go on without them): %s", url, exc)
                self.unreachable.add(url)
            return {}
        if url in self.unreachable:
            logger.info("metrics of %s read again", url)
            self.unreachable.discard(url)
        return values

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
