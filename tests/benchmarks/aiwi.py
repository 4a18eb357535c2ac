"""IHE AIW-I against the push path, in one ``pacsclip serve``: how long from the moment a study
is asked for to the moment its results are in the PACS, pulled as a UPS-RS workitem or pushed
by C-STORE.

Run from the repository root with the project's virtualenv:

    .venv/bin/python tests/benchmarks/aiwi.py [--runs 10] [--warmup 1] [--poll-interval 2]
        [--tmp-dir DIR]

Debian's Orthanc (with its DICOMweb plugin) is the PACS; the test peer
``tests/peers/ups_task_manager.py`` is the Task Manager, its WADO-RS and STOW-RS forwarded to
Orthanc. ``pacsclip serve`` runs with the built-in demo model, regions and SEG on, the
out-of-distribution guard off (the demo model's guard does not score RG1), Orthanc as the only
caller and destination, and ``ups_url`` set, so its task performer runs beside the node with
``ups_poll_interval_s`` = ``--poll-interval`` (default: the setting's default, 2 s).

Each run takes two fresh copies of RG1 (the real PA chest radiograph of pydicom-data, one
image), uploads both to Orthanc (not timed), then, in an order that alternates:
- push: from the start of Orthanc's synchronous ``POST /modalities/pacsclip/store`` to the
  study being ``delivered`` in pacsclip's API (SR, overlays and SEG stored in Orthanc);
- pull: from the Task Manager creating the triage workitem (RAD-80, as the Task Requester
  would) to the workitem being COMPLETED (its outputs stored in Orthanc by STOW-RS).
The pull time includes the wait for the performer's next poll: half the poll interval on
average. Both paths run the same analysis on the same worker.

Prints the median and p95 of each path and the ratio pull / push of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pydicom import dcmread  # noqa: E402

from tests.benchmarks.e2e import (  # noqa: E402
    HOST,
    NODE_AET,
    SCENARIOS,
    ServeConfig,
    check_tools,
    pacsclip_command,
    percentile,
    serve_env,
    stop_serve,
    wait_ready,
    write_rg1_copy,
)
from tests.peers.orthanc import OrthancServer  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402
from tests.peers.ups_task_manager import TaskManager, triage_workitem  # noqa: E402

POLL_S = 0.05
RESULT_TIMEOUT_S = 120.0
TOKEN = "aiwi-benchmark-token"


def study_state(config: ServeConfig, study_uid: str) -> str | None:
    request = urllib.request.Request(
        f"{config.api_url}/api/studies/{study_uid}",
        headers={"Authorization": f"Bearer {config.token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return str(json.loads(answer.read())["state"])
    except OSError:
        return None


def wait_until(what: str, done: callable, timeout_s: float = RESULT_TIMEOUT_S) -> float:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} after {timeout_s:.0f} s")


def push_once(orthanc: OrthancServer, config: ServeConfig, folder: Path) -> float:
    [path] = write_rg1_copy(folder)
    study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    orthanc.upload(path)
    orthanc_id = orthanc.find_study(study_uid)
    assert orthanc_id is not None
    started = time.monotonic()
    orthanc.store_to_modality("pacsclip", [orthanc_id])
    ended = wait_until("push: not delivered", lambda: study_state(config, study_uid) == "delivered")
    return ended - started


def pull_once(orthanc: OrthancServer, manager: TaskManager, folder: Path) -> float:
    [path] = write_rg1_copy(folder)
    ds = dcmread(path, stop_before_pixels=True)
    study_uid = str(ds.StudyInstanceUID)
    orthanc.upload(path)
    workitem = triage_workitem(
        study_uid,
        str(ds.SeriesInstanceUID),
        [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))],
        retrieve_url=f"{manager.base_url}/studies/{study_uid}",
        output_url=f"{manager.base_url}/studies",
    )
    started = time.monotonic()
    uid = manager.schedule(workitem)

    def finished() -> bool:
        state = str(manager.workitem(uid).ProcedureStepState)
        if state == "CANCELED":
            raise RuntimeError(f"workitem {uid} was cancelled: {manager.workitem(uid)}")
        return state == "COMPLETED"

    ended = wait_until("pull: workitem not completed", finished)
    return ended - started


def line(label: str, values: list[float]) -> str:
    return (
        f"{label:<6} n={len(values):<3} median {statistics.median(values):.2f} s  "
        f"p95 {percentile(values, 95):.2f} s  min {min(values):.2f} s  max {max(values):.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--tmp-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    check_tools()
    pacsclip_command()
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        node_port = free_port()
        modalities = {"pacsclip": (NODE_AET, HOST, node_port)}
        with (
            OrthancServer(modalities=modalities, workdir=root / "orthanc", dicomweb=True) as pacs,
            TaskManager(dicomweb_upstream=f"{pacs.url}/dicom-web") as manager,
        ):
            config = ServeConfig(
                data_dir=root / "data",
                node_port=node_port,
                api_port=free_port(),
                worker_metrics_port=free_port(),
                token=TOKEN,
                orthanc_dicom_port=pacs.dicom_port,
                scenario=SCENARIOS["default"],
                broker_url=None,
                model_bundle=None,
                ood_guard=False,
            )
            config.data_dir.mkdir()
            env = serve_env(config) | {
                "PACSCLIP_UPS_URL": manager.base_url,
                "PACSCLIP_UPS_POLL_INTERVAL_S": str(args.poll_interval),
            }
            log = root / "serve.log"
            import subprocess

            with log.open("wb") as out:
                serve = subprocess.Popen(
                    [str(pacsclip_command()), "serve"],
                    cwd=root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                print(f"pacsclip serve ready in {wait_ready(serve, config, log):.1f} s", flush=True)
                push: list[float] = []
                pull: list[float] = []
                for n in range(args.warmup + args.runs):
                    folder = root / f"run-{n}"
                    order = ("push", "pull") if n % 2 == 0 else ("pull", "push")
                    times = {}
                    for path in order:
                        if path == "push":
                            times[path] = push_once(pacs, config, folder / "push")
                        else:
                            times[path] = pull_once(pacs, manager, folder / "pull")
                    kind = "warm-up" if n < args.warmup else f"run {n - args.warmup + 1}"
                    print(f"{kind}: push {times['push']:.2f} s, pull {times['pull']:.2f} s")
                    if n >= args.warmup:
                        push.append(times["push"])
                        pull.append(times["pull"])
            finally:
                print(f"pacsclip serve {stop_serve(serve, log)}")
    print(f"\nRG1, demo model, regions and SEG on; ups_poll_interval_s = {args.poll_interval:g}")
    print(line("push", push))
    print(line("pull", pull))
    ratio = statistics.median(pull) / statistics.median(push)
    print(f"pull / push (medians): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
