"""From a complete study to results at a destination, through a real Celery worker process."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydicom import dcmread
from sqlalchemy import func, select

from plugin.catalog import repository
from plugin.catalog.models import ImageEmbedding
from plugin.models.registry import DEMO_BUNDLE_DIR
from plugin.results import AlgorithmIdentity, ResultUids
from tests.integration.conftest import Pipeline
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import storescp, storescu
from tests.peers.ports import free_port


def test_study_is_analysed_and_results_reach_the_destination(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    with storescp(port, out, aet="PACS"):
        run = pipeline(
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]
        )
        [source] = ct_small_copies(1, tmp_path / "src")
        study_uid = str(dcmread(source).StudyInstanceUID)

        assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        run.wait_for_state(study_uid, "delivered")

    received = [dcmread(p) for p in out.iterdir()]
    modalities = sorted(str(ds.Modality) for ds in received)
    assert modalities == ["OT", "SR"]
    assert {str(ds.StudyInstanceUID) for ds in received} == {study_uid}
    uids = ResultUids(study_uid, AlgorithmIdentity("tiny-clip", "1.0.0", synthetic=True), 1)
    assert str(uids.sr_instance) in {str(ds.SOPInstanceUID) for ds in received}
    with run.node.sessions() as session:
        [result] = repository.results_for(session, study_uid)
        embeddings = session.scalar(select(func.count(ImageEmbedding.id)))
    assert result["algorithm"] == {"name": "tiny-clip", "version": "1.0.0", "synthetic": True}
    assert result["dispatch"] == [{"destination": "pacs", "state": "delivered", "attempts": 1}]
    assert {o["kind"] for o in result["objects"]} == {"SR", "SC"}
    assert embeddings == 1  # the analysed image's embedding is kept for retrieval


def test_a_real_ct_is_not_scored_by_the_synthetic_demo_model(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    with storescp(port, out, aet="PACS"):
        run = pipeline(
            bundle=DEMO_BUNDLE_DIR,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        )
        [source] = ct_small_copies(1, tmp_path / "src")
        study_uid = str(dcmread(source).StudyInstanceUID)

        assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        run.wait_for_state(study_uid, "delivered")

    # An SR that says why nothing was scored; no overlay, since there is no finding to show.
    [sr] = [dcmread(p) for p in out.iterdir()]
    assert sr.Modality == "SR"
    evaluations = sr.ContentSequence[-1].ContentSequence
    texts = [str(item.TextValue) for item in evaluations if "TextValue" in item]
    assert any(t.startswith("Out of distribution for model pacsclip-demo version") for t in texts)
    with run.node.sessions() as session:
        [result] = repository.results_for(session, study_uid)
        [study] = repository.list_studies(session)
        embeddings = session.scalar(select(func.count(ImageEmbedding.id)))
    assert (result["priority"], result["findings"], result["triggered_by"]) == (
        "not_scored",
        [],
        [],
    )
    assert result["ood"]["status"] == "out_of_distribution"
    assert result["ood"]["distance"] > result["ood"]["threshold"]
    assert result["ood"]["model"]["name"] == "pacsclip-demo"
    assert study["priority"] == "not_scored"  # the worklist flag
    assert embeddings == 1  # stored and indexed for retrieval all the same


def test_unreachable_destination_is_retried_then_dead_lettered_and_replayable(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    port = free_port()
    run = pipeline(
        destinations=[{"name": "down", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        dispatch_max_retries=1,
        dispatch_backoff_s=0.2,
    )
    [source] = ct_small_copies(1, tmp_path / "src")
    study_uid = str(dcmread(source).StudyInstanceUID)
    storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP")
    run.wait_for_state(study_uid, "analysed")

    deadline = time.monotonic() + 60
    failed: list[dict[str, Any]] = []
    while not failed and time.monotonic() < deadline:
        listed = run.cli("jobs", "list", "--state", "failed", "--json")
        failed = json.loads(listed.stdout) if listed.returncode == 0 else []
        time.sleep(0.3)
    [job] = failed
    assert job["destination"] == "down"
    assert job["attempts"] == 2  # the first try and one retry
    assert "down" in job["last_error"] or "127.0.0.1" in job["last_error"]

    out = tmp_path / "pacs"
    out.mkdir()
    elsewhere = run.cli("jobs", "retry", "--all", "--destination", "archive")
    assert (elsewhere.returncode, elsewhere.stdout) == (0, "0 jobs queued for dispatch again\n")
    with storescp(port, out, aet="PACS"):
        replay = run.cli("jobs", "retry", "--all", "--destination", "down")
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout == "1 jobs queued for dispatch again\n"
        run.wait_for_state(study_uid, "delivered")
    assert len(list(out.iterdir())) == 2


class WebhookReceiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_stat_result_calls_the_webhook(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - name: all-ct-stat\n    match: {modality: [CT]}\n"
        "    priority: stat\n"
    )
    WebhookReceiver.received = []
    server = http.server.HTTPServer(("127.0.0.1", 0), WebhookReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run = pipeline(
            rules_file=rules,
            webhook_url=f"http://127.0.0.1:{server.server_address[1]}/flags",
        )
        [source] = ct_small_copies(1, tmp_path / "src")
        study_uid = str(dcmread(source).StudyInstanceUID)
        storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP")
        run.wait_for_state(study_uid, "analysed")
        deadline = time.monotonic() + 20
        while not WebhookReceiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
        thread.join(timeout=5)

    [payload] = WebhookReceiver.received
    assert payload["study_instance_uid"] == study_uid
    assert payload["priority"] == "stat"
    assert payload["algorithm"]["name"] == "tiny-clip"
    assert "AI result - not for diagnosis" in payload["disclaimer"]
    assert "synthetic demo model" in payload["disclaimer"]


def test_the_worker_loads_its_model_before_the_first_study(
    pipeline: Callable[..., Pipeline],
) -> None:
    run = pipeline()
    deadline = time.monotonic() + 60
    while "model tiny-clip@" not in run.log.read_text():
        assert time.monotonic() < deadline, f"model not loaded at start:\n{run.log.read_text()}"
        assert run.worker.poll() is None, run.log.read_text()
        time.sleep(0.2)
    with run.node.sessions() as session:
        assert repository.list_studies(session) == []  # nothing was sent to make it load


def test_with_no_live_model_nothing_is_sent_until_one_goes_live(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    """The deploy examples' start (demo_model shadow): the demo scores in shadow, the study
    ends shadow_only and nothing reaches the PACS; once the demo is made live on purpose,
    `studies requeue` sends the study's results."""
    from plugin.catalog.models import Analysis, DispatchJob
    from plugin.demo.studies import write_demo_studies

    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    demo = write_demo_studies(tmp_path / "demo", count=1, seed=11)
    [source] = demo.studies_dir.glob("*/*.dcm")
    study_uid = str(dcmread(source).StudyInstanceUID)
    with storescp(port, out, aet="PACS"):
        run = pipeline(
            registry=True,
            demo_model="shadow",
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        )
        assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        run.wait_for_state(study_uid, "shadow_only")
        with run.node.sessions() as session:
            analyses = [(a.algorithm_name, a.role) for a in session.scalars(select(Analysis))]
            jobs = session.scalar(select(func.count(DispatchJob.id)))
        assert analyses == [("pacsclip-demo", "shadow")] and jobs == 0
        assert list(out.iterdir()) == []

        listed = run.cli("model", "list")
        assert "shadow@*" in listed.stdout, listed.stdout + listed.stderr
        version = next(
            line.split()[0] for line in listed.stdout.splitlines() if "pacsclip-demo@" in line
        )
        name, number = version.split("@")
        promoted = run.cli("model", "promote", name, number, "--force", "--reason", "pilot")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        run.restart_worker()
        requeued = run.cli("studies", "requeue", "--state", "shadow_only")
        assert requeued.returncode == 0, requeued.stdout + requeued.stderr
        run.wait_for_state(study_uid, "delivered")

    received = sorted(str(dcmread(p).Modality) for p in out.iterdir())
    assert "SR" in received
    with run.node.sessions() as session:
        roles = {(a.algorithm_name, a.role) for a in session.scalars(select(Analysis))}
    assert roles == {("pacsclip-demo", "live")}  # the live run replaced the shadow record


def test_a_model_activated_while_the_worker_runs_analyses_the_next_study(
    pipeline: Callable[..., Pipeline], bundle_dir: Path, tmp_path: Path
) -> None:
    """No restart: the worker notices the registry change before its next study."""
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    [first] = ct_small_copies(1, tmp_path / "first")
    [second] = ct_small_copies(1, tmp_path / "second")
    uids = [str(dcmread(p).StudyInstanceUID) for p in (first, second)]
    with storescp(port, out, aet="PACS"):
        run = pipeline(
            registry=True,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        )
        worker_pid = run.worker.pid
        assert storescu([first], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        run.wait_for_state(uids[0], "delivered")

        installed = run.cli("model", "install", str(bundle_dir), "--activate")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert storescu([second], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        run.wait_for_state(uids[1], "delivered")
        assert run.worker.pid == worker_pid and run.worker.poll() is None

    with run.node.sessions() as session:
        algorithms = [repository.results_for(session, uid)[0]["algorithm"] for uid in uids]
    assert [a["name"] for a in algorithms] == ["pacsclip-demo", "tiny-clip"]
    tiny = AlgorithmIdentity("tiny-clip", "1.0.0", synthetic=True)
    received = {str(dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert str(ResultUids(uids[1], tiny, 1).sr_instance) in received  # tiny-clip's SR went out
    assert "registry changed: now model tiny-clip@1.0.0 loaded and ran once" in run.log.read_text()


def test_a_study_routed_to_retrieval_only_is_indexed_and_nothing_is_sent(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    from plugin.catalog.models import Analysis, DispatchJob

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - name: ct-search-only\n    match: {modality: [CT]}\n"
        "    pipelines: [retrieval]\n"
    )
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    with storescp(port, out, aet="PACS"):
        run = pipeline(
            rules_file=rules,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        )
        [source] = ct_small_copies(1, tmp_path / "src")
        study_uid = str(dcmread(source).StudyInstanceUID)
        assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]
        run.wait_for_state(study_uid, "analysed")

    assert list(out.iterdir()) == []
    with run.node.sessions() as session:
        analyses = session.scalar(select(func.count(Analysis.id)))
        jobs = session.scalar(select(func.count(DispatchJob.id)))
        embeddings = session.scalar(select(func.count(ImageEmbedding.id)))
    assert (analyses, jobs, embeddings) == (0, 0, 1)
    index = run.settings.data_dir / "retrieval"
    assert any(index.rglob("*")), "the similar-case index was not written"
