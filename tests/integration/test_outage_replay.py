"""Deliveries outlast an outage: Orthanc (the PACS) and the STAT webhook are down while
studies are analysed, every job is dead-lettered, and when both answer again on the same
ports every result and every STAT flag arrives once, with no operator action.

Time is compressed by the settings: the retries run out in about two seconds (as the default
two-hour schedule would in a long outage), the outage then lasts several probe intervals,
and the node probes every second instead of every minute.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from pydicom import dcmread
from sqlalchemy import select

from plugin.catalog.models import Analysis, DispatchJob, ResultObject, Study
from tests.integration.conftest import Pipeline
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import OrthancServer
from tests.peers.ports import free_port

STUDIES = 3


class FlagReceiver(http.server.BaseHTTPRequestHandler):
    """The worklist's webhook endpoint: keeps each STAT flag it accepts."""

    received: ClassVar[list[dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def flag_receiver(port: int) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FlagReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def job_states(run: Pipeline) -> list[tuple[str, str]]:
    with run.node.sessions() as session:
        return [(j.kind, j.state) for j in session.scalars(select(DispatchJob))]


def wait_until(predicate: Callable[[], bool], what: str, run: Pipeline, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what}: jobs {job_states(run)}; log:\n{run.log.read_text()[-3000:]}"
            )
        assert run.worker.poll() is None, f"the worker died:\n{run.log.read_text()[-3000:]}"
        time.sleep(0.2)


def result_uids(run: Pipeline, study_uid: str) -> list[str]:
    with run.node.sessions() as session:
        return sorted(
            session.scalars(
                select(ResultObject.sop_instance_uid)
                .join(Analysis, Analysis.id == ResultObject.analysis_id)
                .join(Study, Study.id == Analysis.study_id)
                .where(Study.study_instance_uid == study_uid, Analysis.role == "live")
            )
        )


def orthanc_uids(orthanc: OrthancServer, study_uid: str) -> list[str]:
    study = orthanc.find_study(study_uid)
    if study is None:
        return []
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(study))


def test_dead_letters_are_replayed_once_orthanc_and_the_webhook_are_back(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    http_port, dicom_port, hook_port = free_port(), free_port(), free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - name: all-ct-stat\n    match: {modality: [CT]}\n"
        "    priority: stat\n"
    )
    FlagReceiver.received = []
    # Nothing listens on Orthanc's or the webhook's ports: the outage has begun.
    run = pipeline(
        rules_file=rules,
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
        ],
        webhook_url=f"http://127.0.0.1:{hook_port}/flags",
        dispatch_max_retries=2,
        dispatch_backoff_s=0.2,
        dispatch_backoff_max_s=0.5,
        destination_probe_interval_s=1.0,
        replay_dead_letters=True,
    )
    study_uids = []
    for n in range(STUDIES):
        [source] = ct_small_copies(1, tmp_path / f"src{n}")
        study_uids.append(str(dcmread(source).StudyInstanceUID))
        assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]

    # Every job (results and STAT flag of each study) spends its retries and is dead-lettered.
    expected_failed = sorted([("results", "failed"), ("webhook", "failed")] * STUDIES)
    wait_until(lambda: sorted(job_states(run)) == expected_failed, "dead letters", run, 60)
    # The outage goes on; the node keeps probing and replays nothing while nobody answers.
    registry = run.node.metrics.registry
    silent = {"destination": "pacs", "answered": "false"}
    before = registry.get_sample_value("pacsclip_destination_probes_total", silent) or 0
    time.sleep(2.5)
    assert (registry.get_sample_value("pacsclip_destination_probes_total", silent) or 0) > before
    assert sorted(job_states(run)) == expected_failed

    workdir = tmp_path / "orthanc"
    with (
        OrthancServer(workdir=workdir, http_port=http_port, dicom_port=dicom_port) as orthanc,
        flag_receiver(hook_port),
    ):
        expected_delivered = sorted([("results", "delivered"), ("webhook", "delivered")] * STUDIES)
        wait_until(lambda: sorted(job_states(run)) == expected_delivered, "replay", run, 45)
        for study_uid in study_uids:
            run.wait_for_state(study_uid, "delivered", timeout_s=10)
        time.sleep(2)  # nothing more arrives later

        for study_uid in study_uids:
            sent = result_uids(run, study_uid)
            assert len(sent) >= 2  # the SR and the overlay (and a SEG with regions)
            assert orthanc_uids(orthanc, study_uid) == sent
        assert orthanc.get("/statistics")["CountInstances"] == sum(
            len(result_uids(run, uid)) for uid in study_uids
        )
    flagged = sorted(payload["study_instance_uid"] for payload in FlagReceiver.received)
    assert flagged == sorted(study_uids)  # each STAT flag once
    replayed = {
        name: registry.get_sample_value(
            "pacsclip_replayed_dispatch_jobs_total", {"destination": name, "was": "failed"}
        )
        for name in ("pacs", "webhook")
    }
    assert replayed == {"pacs": STUDIES, "webhook": STUDIES}


def test_a_job_on_a_long_backoff_is_sent_as_soon_as_orthanc_answers(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    http_port, dicom_port = free_port(), free_port()
    run = pipeline(
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
        ],
        dispatch_backoff_s=120.0,  # the next retry would come long after Orthanc is back
        dispatch_backoff_max_s=120.0,
        destination_probe_interval_s=1.0,
        replay_dead_letters=True,
    )
    [source] = ct_small_copies(1, tmp_path / "src")
    study_uid = str(dcmread(source).StudyInstanceUID)
    assert storescu([source], "127.0.0.1", run.node.port, aec="PACSCLIP").statuses == [0]

    def waiting() -> bool:
        with run.node.sessions() as session:
            job = session.scalar(select(DispatchJob))
            return job is not None and job.attempts == 1 and job.next_attempt_at is not None

    wait_until(waiting, "a first failed attempt", run, 60)
    with OrthancServer(
        workdir=tmp_path / "orthanc", http_port=http_port, dicom_port=dicom_port
    ) as orthanc:
        run.wait_for_state(study_uid, "delivered", timeout_s=30)
        assert orthanc_uids(orthanc, study_uid) == result_uids(run, study_uid)
    assert job_states(run) == [("results", "delivered")]
    pending = {"destination": "pacs", "was": "pending"}
    registry = run.node.metrics.registry
    assert registry.get_sample_value("pacsclip_replayed_dispatch_jobs_total", pending) == 1
