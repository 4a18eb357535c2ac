"""``/metrics`` and ``/health`` of a standalone node and of a worker, as separate ``pacsclip``
processes on loopback, and the dashboard's plots reading a node that is not its process."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from plugin.dashboard.metrics_history import MetricsHistory, scrape
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import storescu
from tests.peers.pacsclip_process import PacsclipProcess, pacsclip_env, wait_until
from tests.peers.ports import free_port

NODE_AET = "PACSCLIP"
UP_WITHIN_S = 30
RECEIVED = "pacsclip_received_instances_total"
# Celery's line once a worker consumes ("pacsclip-PID@HOST ready.").
WORKER_READY = re.compile(r"@\S+ ready\.")


def get(url: str) -> tuple[int, bytes]:
    """Status and body; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class RunningNode:
    process: PacsclipProcess
    dicom_port: int
    metrics_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """``pacsclip node`` with one receiver process, its probes on a port of their own."""
    root = tmp_path_factory.mktemp("node")
    running = RunningNode(
        PacsclipProcess(
            ["node"],
            pacsclip_env(
                {
                    "PACSCLIP_DATA_DIR": str(root / "data"),
                    "PACSCLIP_DICOM_HOST": "127.0.0.1",
                    "PACSCLIP_DICOM_PORT": str(dicom_port := free_port()),
                    "PACSCLIP_NODE_METRICS_PORT": str(metrics_port := free_port()),
                    "PACSCLIP_QUIET_PERIOD_S": "0.5",
                    "PACSCLIP_MIN_FREE_DISK_MB": "0",
                    "PACSCLIP_RECEIVER_PROCESSES": "1",
                }
            ),
            root / "node.log",
        ),
        dicom_port,
        metrics_port,
    )
    running.process.start()
    try:
        yield running
    finally:
        running.process.stop()


def received(node: RunningNode) -> float:
    return scrape(node.url("/metrics")).get(RECEIVED, 0.0)


def test_a_standalone_node_is_healthy_and_counts_what_it_receives(
    node: RunningNode, tmp_path: Path
) -> None:
    wait_until(
        lambda: get(node.url("/health"))[0] == 200 or not node.process.alive(),
        UP_WITHIN_S,
        "the node's /health answering 200",
    )
    status, body = get(node.url("/health"))
    assert status == 200, node.log()
    assert json.loads(body) == {"status": "ok", "reason": f"listening on port {node.dicom_port}"}
    before = received(node)

    sent = storescu(ct_small_copies(1, tmp_path), "127.0.0.1", node.dicom_port, aec=NODE_AET)

    assert sent.statuses == [0x0000], sent.stdout + sent.stderr
    wait_until(lambda: received(node) == before + 1, 10, "the receive counter counting it")
    status, text = get(node.url("/metrics"))
    assert status == 200
    assert b"pacsclip_received_to_complete_seconds_bucket" in text  # the node's histograms


def test_the_dashboard_plots_what_a_separate_node_received(node: RunningNode) -> None:
    wait_until(lambda: received(node) >= 1, UP_WITHIN_S, "an instance received by the node")
    local = CollectorRegistry()  # the API process's: it received nothing itself
    history = MetricsHistory(local, scrape_urls=[node.url("/metrics")])

    history.sample()

    plotted = {series.key: series for series in history.series()}
    assert plotted[RECEIVED].latest == received(node)
    assert history.unreachable == set()


def worker(root: Path, bundle: Path) -> tuple[PacsclipProcess, str]:
    """A worker on the embedded broker, in a data directory that a node made before it."""
    (root / "data").mkdir()
    port = free_port()
    process = PacsclipProcess(
        ["worker", "--queues", "routine"],
        pacsclip_env(
            {
                "PACSCLIP_DATA_DIR": str(root / "data"),
                "PACSCLIP_MODEL_BUNDLE": str(bundle),
                "PACSCLIP_INFERENCE_THREADS": "1",
                "PACSCLIP_API_HOST": "127.0.0.1",
                "PACSCLIP_WORKER_METRICS_PORT": str(port),
                "PACSCLIP_WORKER_POOL": "solo",
            }
        ),
        root / "worker.log",
    )
    return process, f"http://127.0.0.1:{port}"


def test_a_worker_whose_model_fails_to_load_is_not_ready_and_says_why(tmp_path: Path) -> None:
    process, url = worker(tmp_path, tmp_path / "no-such-bundle")
    process.start()
    try:
        # Consuming (Celery's ready line) does not make it ready: the model never ran.
        wait_until(
            lambda: bool(WORKER_READY.search(process.log.read_text())) or not process.alive(),
            UP_WITHIN_S,
            "the worker consuming",
        )
        status, body = get(f"{url}/health")
        metrics_status = get(f"{url}/metrics")[0]
    finally:
        process.kill9()  # its shutdown is not what this test is about, and takes seconds

    assert status == 503, process.log.read_text()[-3000:]
    answer = json.loads(body)
    assert answer["status"] == "unavailable"
    assert answer["reason"].startswith("model failed to load: ")
    assert "no-such-bundle" in answer["reason"]
    assert metrics_status == 200  # its figures can still be scraped


def test_a_worker_is_ready_once_its_model_ran_and_it_consumes(
    tmp_path: Path, bundle_dir: Path
) -> None:
    process, url = worker(tmp_path, bundle_dir)
    process.start()
    try:
        wait_until(
            lambda: get(f"{url}/health")[0] == 200 or not process.alive(),
            UP_WITHIN_S,
            "the worker's /health answering 200",
        )
        status, body = get(f"{url}/health")
        log = process.log.read_text()
    finally:
        process.kill9()

    assert status == 200, log[-3000:]
    assert re.fullmatch(r"model \S+@\S+ loaded and ran once", json.loads(body)["reason"])
    assert WORKER_READY.search(log)
