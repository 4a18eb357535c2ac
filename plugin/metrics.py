"""Prometheus metrics of one pacsclip process: stage counters and latency histograms.

The DICOM node, the Celery worker and the HTTP API are separate processes, so each builds its
own `PacsclipMetrics` in `main()` and exposes its own registry: the node counts `received` and
`complete`, the worker `analysed`, `delivered` and `failed`. The API process additionally
reports gauges read from the catalog at scrape time (`CatalogGauges`), which give the
pipeline-wide picture whichever process did the work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from plugin.study_state import StudyState

# From a fraction of a second (a small study on Redis) to minutes (a quiet period, a slow
# destination); the 1-5 s range is dense because the end-to-end target is p95 <= 3 s.
STEP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Stage(StrEnum):
    RECEIVED = "received"  # one instance stored and cataloged
    COMPLETE = "complete"  # one study declared complete
    ANALYSED = "analysed"  # one study analysed by a model
    DELIVERED = "delivered"  # one result object (SR or SC) accepted by a destination
    FAILED = "failed"  # one study or dispatch job given up on


_COUNTERS: Final[dict[Stage, tuple[str, str]]] = {
    Stage.RECEIVED: ("pacsclip_received_instances", "Instances stored and cataloged"),
    Stage.COMPLETE: ("pacsclip_complete_studies", "Studies declared complete"),
    Stage.ANALYSED: ("pacsclip_analysed_studies", "Studies analysed"),
    Stage.DELIVERED: ("pacsclip_delivered_objects", "Result objects delivered"),
    Stage.FAILED: ("pacsclip_failed", "Studies or dispatch jobs that failed for good"),
}

DISPATCH_OUTCOMES: Final = ("delivered", "retried", "failed")

# The latency a stage reports, measured from the previous stage of the same study.
_LATENCIES: Final[dict[Stage, tuple[str, str]]] = {
    Stage.COMPLETE: (
        "pacsclip_received_to_complete_seconds",
        "Seconds from a study's first instance to its completion",
    ),
    Stage.ANALYSED: (
        "pacsclip_complete_to_analysed_seconds",
        "Seconds from a study's completion to its analysis result",
    ),
    Stage.DELIVERED: (
        "pacsclip_analysed_to_delivered_seconds",
        "Seconds from a study's analysis to the delivery of a result object",
    ),
}


class PacsclipMetrics:
    """The counters and histograms of one process, in a registry of their own.

    A registry per instance (not prometheus_client's global one) keeps processes and tests
    independent: two apps built in one test run never clash on metric names.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters = {
            stage: Counter(name, doc, registry=self.registry)
            for stage, (name, doc) in _COUNTERS.items()
        }
        self._latencies = {
            stage: Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)
            for stage, (name, doc) in _LATENCIES.items()
        }
        self._analysis_duration = Histogram(
            "pacsclip_analysis_duration_seconds",
            "Seconds the model pipeline ran for one study",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._analysis_steps = Histogram(
            "pacsclip_analysis_step_seconds",
            "Seconds one step of a study's analysis took (read, decode, inference, saliency, "
            "build, write, record)",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self._ood_inputs = Counter(
            "pacsclip_ood_inputs",
            "Images out of the model's distribution (stored and indexed, not scored), per "
            "site and model",
            ["site", "model"],
            registry=self.registry,
        )
        self._dispatch_attempts = Counter(
            "pacsclip_dispatch_attempts",
            "Attempts of dispatch jobs by kind (results, webhook, hl7) and outcome "
            "(delivered, retried, failed: dead-lettered)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._catalog_gauges: CatalogGauges | None = None

    def observe_stage(self, stage: Stage | str, seconds: float | None = None) -> None:
        """Count one event of `stage`; `seconds` is its latency from the previous stage."""
        stage = Stage(stage)
        histogram = self._latencies.get(stage)
        if seconds is not None and histogram is None:
            # Checked before counting, so a wrong call leaves the metrics as they were.
            raise ValueError(f"stage {stage} has no latency histogram")
        self._counters[stage].inc()
        if seconds is not None and histogram is not None:
            histogram.observe(seconds)

    def observe_analysis_duration(self, seconds: float) -> None:
        self._analysis_duration.observe(seconds)

    def observe_analysis_steps(self, steps: Mapping[str, float]) -> None:
        for step, seconds in steps.items():
            self._analysis_steps.labels(step=step).observe(seconds)

    def observe_ood_inputs(self, site: str, model: str, count: int = 1) -> None:
        """Count ``count`` images of a study from ``site`` that ``model`` (name@version) found
        out of its distribution."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._ood_inputs.labels(site=site, model=model).inc(count)

    def observe_dispatch(self, kind: str, outcome: str) -> None:
        """Count one attempt of a dispatch job of ``kind`` that ended in ``outcome``."""
        if outcome not in DISPATCH_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(DISPATCH_OUTCOMES)}")
        self._dispatch_attempts.labels(kind=kind, outcome=outcome).inc()

    def include_catalog(self, read: Callable[[], CatalogSnapshot | None]) -> None:
        """Report catalog gauges at each scrape; calling it again replaces the reader."""
        if self._catalog_gauges is not None:
            self.registry.unregister(self._catalog_gauges)
        self._catalog_gauges = CatalogGauges(read)
        self.registry.register(self._catalog_gauges)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Expose this registry on its own HTTP port (for the node and worker processes).

        The caller stops it with `server.shutdown()` and joins the thread.
        """
        return start_http_server(port, addr=host, registry=self.registry)


@dataclass(frozen=True)
class CatalogSnapshot:
    """Counts read from the catalog; `failed_dispatch_jobs` is None where no job table exists."""

    studies_by_state: Mapping[str, int] = field(default_factory=dict)
    failed_dispatch_jobs: int | None = None


class CatalogGauges:
    """A collector that reads the catalog when Prometheus scrapes, not on every state change.

    Gauges computed at scrape time stay right across processes and restarts, which counters
    incremented in one process cannot. `read` returns None when the database cannot be read;
    the scrape then still succeeds and reports `pacsclip_catalog_up 0`.
    """

    def __init__(self, read: Callable[[], CatalogSnapshot | None]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering does not query the database.
        return self._families(CatalogSnapshot(failed_dispatch_jobs=0), up=True)

    def collect(self) -> Iterable[Metric]:
        snapshot = self._read()
        if snapshot is None:
            return self._families(CatalogSnapshot(), up=False)
        return self._families(snapshot, up=True)

    @staticmethod
    def _families(snapshot: CatalogSnapshot, *, up: bool) -> list[Metric]:
        up_gauge = GaugeMetricFamily(
            "pacsclip_catalog_up", "1 when the catalog could be read at this scrape"
        )
        up_gauge.add_metric([], 1.0 if up else 0.0)
        families: list[Metric] = [up_gauge]
        if not up:
            return families
        studies = GaugeMetricFamily(
            "pacsclip_studies", "Studies in the catalog by state", labels=["state"]
        )
        # Every state is reported, zeros included, so a series never vanishes from a graph.
        for state in StudyState:
            studies.add_metric([state.value], float(snapshot.studies_by_state.get(state, 0)))
        families.append(studies)
        if snapshot.failed_dispatch_jobs is not None:
            families.append(
                GaugeMetricFamily(
                    "pacsclip_failed_dispatch_jobs",
                    "Dispatch jobs dead-lettered and waiting for an operator",
                    value=float(snapshot.failed_dispatch_jobs),
                )
            )
        return families
