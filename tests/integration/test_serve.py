"""``pacsclip serve`` as an operator runs it: one command, node + worker + API, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.ports import free_port
from tests.peers.ups_task_manager import TaskManager, triage_workitem

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))
TOKEN = "test-token-4f1c"


def get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout_s} s")


def serve_env(data_dir: Path, dicom_port: int, api_port: int, bundle: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    env.update(
        PACSCLIP_DATA_DIR=str(data_dir),
        PACSCLIP_DICOM_HOST="127.0.0.1",
        PACSCLIP_DICOM_PORT=str(dicom_port),
        PACSCLIP_API_PORT=str(api_port),
        PACSCLIP_API_TOKEN=TOKEN,
        PACSCLIP_QUIET_PERIOD_S="0.5",
        PACSCLIP_MIN_FREE_DISK_MB="0",
        PACSCLIP_MODEL_BUNDLE=str(bundle),
        PACSCLIP_INFERENCE_THREADS="1",
    )
    return env


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc), read while they run."""
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found |= {child} | descendants(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except (FileNotFoundError, ProcessLookupError):
        return "(gone)"


def test_serve_receives_analyses_reports_and_stops_cleanly(
    tmp_path: Path, bundle_dir: Path
) -> None:
    dicom_port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = serve_env(tmp_path / "data", dicom_port, api_port, bundle_dir)
    # With ups_url, serve runs the AIW-I task performer beside the node.
    manager = TaskManager().start()
    env.update(PACSCLIP_UPS_URL=manager.base_url, PACSCLIP_UPS_POLL_INTERVAL_S="0.5")
    nowhere = manager.schedule(
        triage_workitem(
            generate_uid(),
            generate_uid(),
            [("1.2.840.10008.5.1.4.1.1.2", generate_uid())],
            retrieve_url=f"{manager.base_url}/studies/1.2.3",
        )
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([PACSCLIP, "serve"], env=env, stdout=out, stderr=out)
    try:
        wait_until(
            lambda: echoscu("127.0.0.1", dicom_port, aec="PACSCLIP").returncode == 0,
            60,
            "the node did not answer C-ECHO",
        )
        wait_until(lambda: get(f"{api}/api/health", None)[0] == 200, 30, "no API health")
        # Two studies of the same patient with the same image: each is the other's prior.
        [source] = ct_small_copies(1, tmp_path / "src")
        [repeat] = ct_small_copies(1, tmp_path / "repeat")
        study_uid = str(dcmread(source).StudyInstanceUID)
        repeat_uid = str(dcmread(repeat).StudyInstanceUID)
        assert storescu([source], "127.0.0.1", dicom_port, aec="PACSCLIP").statuses == [0]
        assert storescu([repeat], "127.0.0.1", dicom_port, aec="PACSCLIP").statuses == [0]

        def analysed(uid: str) -> dict[str, Any] | None:
            status, body = get(f"{api}/api/studies/{uid}")
            detail = json.loads(body) if status == 200 else None
            return detail if detail and detail["state"] == "analysed" else None

        detail = wait_until(lambda: analysed(study_uid), 90, "the study was not analysed")
        wait_until(lambda: analysed(repeat_uid), 90, "the second study was not analysed")
        [result] = detail["results"]
        assert result["algorithm"]["name"] == "tiny-clip"
        sr = next(o for o in result["objects"] if o["kind"] == "SR")
        status, sr_bytes = get(f"{api}{sr['link']}")
        assert status == 200
        assert b"DICM" in sr_bytes[:132]
        assert get(f"{api}/api/studies")[0] == 200
        assert get(f"{api}/api/studies", token="wrong")[0] == 401
        metrics = get(f"{api}/metrics")[1].decode()
        assert "pacsclip_received_instances_total 2.0" in metrics
        assert 'pacsclip_studies{state="analysed"} 2.0' in metrics

        # The worker indexed both images; the API finds the prior, behind the token.
        [index_file] = (tmp_path / "data" / "retrieval").glob("tiny-clip@*/images.index")
        assert json.loads(index_file.with_name("images.index.json").read_text())["count"] == 2
        status, body = get(f"{api}/api/studies/{study_uid}/similar")
        assert status == 200, body
        similar = json.loads(body)
        assert similar["model"]["name"] == "tiny-clip"
        assert [p["study_instance_uid"] for p in similar["priors"]] == [repeat_uid]
        assert similar["priors"][0]["similarity"] > 0.99
        assert similar["similar"] == []
        assert get(f"{api}/api/studies/{study_uid}/similar", token="wrong")[0] == 401

        wait_until(
            lambda: str(manager.workitem(nowhere).ProcedureStepState) == "CANCELED",
            30,
            "the performer did not take the workitem",
        )
        [progress] = manager.workitem(nowhere).ProcedureStepProgressInformationSequence
        assert "names no Output Destination" in progress.ReasonForCancellation
    finally:
        manager.stop()
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(timeout=40)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
            raise
    assert code == 0, log.read_text()[-3000:]
    assert "worker process stopped" in log.read_text()


def test_sigterm_drains_the_open_association_and_every_process_exits_within_10_s(
    tmp_path: Path, bundle_dir: Path
) -> None:
    dicom_port, api_port = free_port(), free_port()
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [PACSCLIP, "serve"],
            env=serve_env(data, dicom_port, api_port, bundle_dir),
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(
            lambda: echoscu("127.0.0.1", dicom_port, aec="PACSCLIP").returncode == 0,
            60,
            "the node did not answer C-ECHO",
        )
        children = descendants(serve.pid)
        assert len(children) >= 2, "expected the worker and the receiver processes"
        files = ct_small_copies(200, tmp_path / "src")
        sender, finish = storescu(
            [tmp_path / "src"], "127.0.0.1", dicom_port, aec="PACSCLIP", popen=True
        )
        wait_until(
            lambda: (
                len(list((data / "spool").glob("*/*/*.dcm"))) >= 20 or sender.poll() is not None
            ),
            30,
            "nothing was received",
        )
        assert sender.poll() is None, "storescu finished before SIGTERM; send more files"
        serve.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = serve.wait(timeout=15)
        took = time.monotonic() - signalled
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    result = finish()

    assert code == 0, log.read_text()[-3000:]
    assert took <= 10, f"shutdown took {took:.1f} s"
    # The association in progress was allowed to finish: every image was acknowledged...
    assert result.statuses == [0] * len(files), result.stdout[-2000:]
    # ...and recorded before the node exited, and no process of serve is left behind (an
    # orphan may take a moment to be reaped: multiprocessing's resource tracker exits when it
    # reads the end of its pipe from the exited node).
    deadline = time.monotonic() + 3
    while [pid for pid in children if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(pid, process_name(pid)) for pid in children if running(pid)] == []
    listed = subprocess.run(
        [PACSCLIP, "--data-dir", str(data), "studies", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [study] = json.loads(listed.stdout)
    assert study["instances"] == len(files)
