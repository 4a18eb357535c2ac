"""``/health`` and ``/metrics`` of a process without an HTTP API: what they answer, and when
the DICOM node counts as ready."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

from sqlalchemy.orm import sessionmaker

from dicom_node.node import DicomNode
from plugin.catalog.db import make_engine, open_catalog
from plugin.metrics import PacsclipMetrics, Stage
from plugin.probes import ProbeServer, Readiness
from plugin.settings import Settings


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_says_why_until_ready_and_metrics_are_served_throughout() -> None:
    metrics = PacsclipMetrics()
    metrics.observe_stage(Stage.ANALYSED)
    readiness = Readiness("loading the model")
    server = ProbeServer("127.0.0.1", 0, metrics.registry, readiness.check).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        loading = get(f"{base}/health")
        readiness.set_not_ready("model failed to load: bad checksum")
        failed = get(f"{base}/health")
        readiness.set_ready("model m@1 loaded and ran once")
        ready = get(f"{base}/health")
        status, text = get(f"{base}/metrics")
    finally:
        server.stop()

    assert loading == (503, b'{"status": "unavailable", "reason": "loading the model"}')
    assert failed[0] == 503
    assert json.loads(failed[1])["reason"] == "model failed to load: bad checksum"
    assert ready[0] == 200
    assert json.loads(ready[1]) == {"status": "ok", "reason": "model m@1 loaded and ran once"}
    assert status == 200
    assert b"pacsclip_analysed_studies_total 1.0" in text


def test_the_node_is_ready_while_it_listens_and_its_catalog_answers(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    node = DicomNode(settings, open_catalog(settings.effective_database_url))
    before = node.health()
    node.start()
    try:
        port = node.port
        listening = node.health()
        # A catalog that cannot be opened (its folder does not exist).
        node.sessions = sessionmaker(make_engine(f"sqlite:///{settings.data_dir}/no/such.db"))
        no_catalog = node.health()
    finally:
        node.stop()
    after = node.health()

    assert (before.ready, before.reason) == (False, "not listening (starting or stopping)")
    assert (listening.ready, listening.reason) == (True, f"listening on port {port}")
    assert (no_catalog.ready, no_catalog.reason) == (False, "catalog unreachable: OperationalError")
    assert not after.ready
