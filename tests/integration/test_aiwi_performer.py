"""IHE AIW-I through real processes: Orthanc holds the studies, the test's UPS-RS Task Manager
schedules triage workitems (its WADO-RS and STOW-RS go to Orthanc's DICOMweb), two
``pacsclip performer`` processes take them and a real Celery worker analyses them.

- each workitem is claimed by one performer only (the other gets the Task Manager's 409);
- the performer that holds a workitem is killed with SIGKILL while its analysis runs, and
  the workitem is still completed once after a restart;
- SR, overlays and SEG reach Orthanc by STOW-RS and are the very objects the push path makes
  for the same study (same SOP Instance UIDs, same content but the creation times);
- a workitem whose inputs cannot be retrieved is cancelled with the reason, one with another
  task code is left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from plugin.catalog.db import open_catalog
from plugin.catalog.models import UpsWorkitem
from plugin.settings import Settings, load_settings
from tests.integration.conftest import SLOW_WORKER, Pipeline, worker_env
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import stop_process, storescp
from tests.peers.orthanc import OrthancServer, dicomweb_installed
from tests.peers.pacsclip_process import PacsclipProcess
from tests.peers.ports import free_port
from tests.peers.ups_task_manager import TaskManager, triage_workitem

pytestmark = pytest.mark.skipif(
    not dicomweb_installed(), reason="Debian's orthanc-dicomweb plugin is not installed"
)

CT = "1.2.840.10008.5.1.4.1.1.2"
# Attributes that say when an object was made: the only ones allowed to differ between the
# push path's copy and the performer's.
WHEN_MADE = (
    "SeriesDate",
    "SeriesTime",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "TimeOfSecondaryCapture",
    "DateOfSecondaryCapture",
    "ContributionDateTime",
)
RESULT_MODALITIES = ("SR", "OT", "SEG")


def result_objects(files: list[bytes]) -> dict[str, Dataset]:
    """pacsclip's result objects among these files, by SOP Instance UID."""
    datasets = [dcmread(BytesIO(data)) for data in files]
    return {str(ds.SOPInstanceUID): ds for ds in datasets if ds.Modality in RESULT_MODALITIES}


def content(ds: Dataset) -> dict[str, str]:
    """Each attribute as DICOM JSON, but the moments the object was made at."""
    copy = Dataset(ds)
    for keyword in WHEN_MADE:
        if keyword in copy:
            delattr(copy, keyword)
    for item in copy.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return {tag: json.dumps(value, sort_keys=True) for tag, value in copy.to_json_dict().items()}


def differences(ours: Dataset, theirs: Dataset) -> list[str]:
    a, b = content(ours), content(theirs)
    return [
        f"{tag}: {a.get(tag, '-')[:120]} != {b.get(tag, '-')[:120]}"
        for tag in sorted(set(a) | set(b))
        if a.get(tag) != b.get(tag)
    ]


def upload_study(orthanc: OrthancServer, out_dir: Path, images: int) -> tuple[str, list[Dataset]]:
    paths = ct_small_copies(images, out_dir)
    for path in paths:
        orthanc.upload(path)
    datasets = [dcmread(path, stop_before_pixels=True) for path in paths]
    return str(datasets[0].StudyInstanceUID), datasets


def schedule(manager: TaskManager, study_uid: str, datasets: list[Dataset], **kw: Any) -> str:
    workitem = triage_workitem(
        study_uid,
        str(datasets[0].SeriesInstanceUID) if datasets else generate_uid(),
        [(CT, str(ds.SOPInstanceUID)) for ds in datasets] or [(CT, generate_uid())],
        retrieve_url=f"{manager.base_url}/studies/{study_uid}",
        output_url=f"{manager.base_url}/studies",
        **kw,
    )
    return manager.schedule(workitem)


def state_changes(manager: TaskManager, uid: str, to: str) -> list[dict[str, Any]]:
    """The accepted state changes of a workitem to ``to``."""
    return [
        h
        for h in manager.history(uid)
        if h["op"] == "change_state" and h["state_after"] == to and h["status"] < 300
        and h["state_before"] != to
    ]  # fmt: skip


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
    raise TimeoutError(f"{what} did not happen in {timeout_s} s\n{tails}")


@pytest.fixture
def slow_worker(tmp_path: Path, bundle_dir: Path) -> Iterator[Callable[[Settings], Path]]:
    """A worker of the performers' deployment whose analysis takes 3 s more, so that a
    performer can be killed while it waits on one."""
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings) -> Path:
        log = tmp_path / "performer-worker.log"
        with log.open("ab") as out:
            started.append(
                subprocess.Popen(
                    [sys.executable, "-c", SLOW_WORKER, "3"],
                    env=worker_env(settings, bundle_dir),
                    stdout=out,
                    stderr=out,
                )
            )
        return log

    yield start
    for process in started:
        stop_process(process, timeout_s=20)


def test_two_performers_a_kill_and_the_same_objects_as_the_push_path(
    pipeline: Callable[..., Pipeline],
    slow_worker: Callable[[Settings], Path],
    bundle_dir: Path,
    tmp_path: Path,
) -> None:
    node_port, scp_port = free_port(), free_port()
    modalities = {"pacsclip": ("PACSCLIP", "127.0.0.1", node_port)}
    with (
        OrthancServer(modalities=modalities, workdir=tmp_path / "orthanc", dicomweb=True) as pacs,
        TaskManager(dicomweb_upstream=f"{pacs.url}/dicom-web") as manager,
        storescp(scp_port, tmp_path / "push-results"),
    ):
        first_uid, first = upload_study(pacs, tmp_path / "first", images=2)
        second_uid, second = upload_study(pacs, tmp_path / "second", images=1)

        # The push path, for reference: Orthanc sends the first study to a pacsclip node of
        # its own deployment, whose results go to a DCMTK storescp.
        push = pipeline(
            dicom_port=node_port,
            allowed_callers=["ORTHANC"],
            destinations=[
                {"name": "ref", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}
            ],
        )
        study_id = pacs.find_study(first_uid)
        assert study_id is not None
        pacs.store_to_modality("pacsclip", [study_id])
        push.wait_for_state(first_uid, "delivered")
        pushed = result_objects([p.read_bytes() for p in (tmp_path / "push-results").iterdir()])
        assert {"SR", "OT"} <= {ds.Modality for ds in pushed.values()}

        # The performers' deployment: its own data directory and catalog.
        settings = load_settings(
            data_dir=tmp_path / "performing",
            model_bundle=bundle_dir,
            min_free_disk_mb=0,
            ups_url=manager.base_url,
        )
        open_catalog(settings.effective_database_url)  # migrated before the processes start
        worker_log = slow_worker(settings)
        workitems = {
            "first": schedule(manager, first_uid, first),
            "second": schedule(manager, second_uid, second),
            "missing": schedule(manager, generate_uid(), []),
            "other": schedule(manager, second_uid, second, code_value="OTHER-VENDOR-TASK"),
        }
        env = {
            **worker_env(settings, bundle_dir),
            "PACSCLIP_UPS_URL": manager.base_url,
            "PACSCLIP_UPS_POLL_INTERVAL_S": "0.3",
            "TCP_NODELAY": "1",
        }
        performers = {
            ae: PacsclipProcess(["performer", "--ae-title", ae], env, tmp_path / f"{ae}.log")
            for ae in ("PERFORMER_A", "PERFORMER_B")
        }
        logs = [worker_log, *(p.log for p in performers.values())]
        for process in performers.values():
            process.start()
        try:
            catalog = open_catalog(settings.effective_database_url)

            def holder_of_first_while_analysing() -> str | None:
                with catalog.sessions() as session:
                    row = session.scalar(
                        select(UpsWorkitem).where(
                            UpsWorkitem.workitem_uid == workitems["first"],
                            UpsWorkitem.step == "queued",
                        )
                    )
                    return None if row is None else row.performer

            wait_for(
                "a performer waiting on the first study's analysis",
                lambda: holder_of_first_while_analysing() is not None,
                60,
                logs,
            )
            holder = holder_of_first_while_analysing()
            assert holder is not None
            performers[holder].kill9()
            performers[holder].start()

            def finished(name: str) -> bool:
                state = manager.workitem(workitems[name]).ProcedureStepState
                return str(state) in ("COMPLETED", "CANCELED")

            wait_for(
                "every workitem of ours finished",
                lambda: all(finished(n) for n in ("first", "second", "missing")),
                90,
                logs,
            )
        finally:
            for process in performers.values():
                process.stop()

        # Each workitem was claimed once, completed once, by one performer.
        for name in ("first", "second"):
            uid = workitems[name]
            assert len(state_changes(manager, uid, "IN PROGRESS")) == 1, manager.history(uid)
            assert len(state_changes(manager, uid, "COMPLETED")) == 1, manager.history(uid)
        with catalog.sessions() as session:
            rows = session.scalars(select(UpsWorkitem)).all()
        by_workitem: dict[str, dict[str, str]] = {}
        for row in rows:
            by_workitem.setdefault(row.workitem_uid, {})[row.performer] = row.step
        for name in ("first", "second"):
            steps = sorted(by_workitem[workitems[name]].values())
            assert steps.count("completed") == 1, by_workitem[workitems[name]]
            assert set(steps) <= {"completed", "taken"}, steps
        assert workitems["other"] not in by_workitem
        assert [h["op"] for h in manager.history(workitems["other"])] == ["create"]
        assert str(manager.workitem(workitems["other"]).ProcedureStepState) == "SCHEDULED"

        # The unretrievable inputs: cancelled, and the reason says why.
        missing = manager.workitem(workitems["missing"])
        assert str(missing.ProcedureStepState) == "CANCELED"
        [progress] = missing.ProcedureStepProgressInformationSequence
        assert "WADO-RS retrieve of the inputs failed" in progress.ReasonForCancellation
        assert "404" in progress.ReasonForCancellation

        # The outputs: in Orthanc's study, listed in the workitem, the same as the push path's.
        study_id = pacs.find_study(first_uid)
        assert study_id is not None
        stored = result_objects(
            [pacs.instance_file(i["ID"]) for i in pacs.study_instances(study_id)]
        )
        assert set(stored) == set(pushed)
        for uid, ds in stored.items():
            assert not differences(ds, pushed[uid]), (ds.Modality, differences(ds, pushed[uid]))
        done = manager.workitem(workitems["first"])
        [performed] = done.UnifiedProcedureStepPerformedProcedureSequence
        listed = {
            str(ref.ReferencedSOPInstanceUID)
            for item in performed.OutputInformationSequence
            for ref in item.ReferencedSOPSequence
        }
        assert listed == set(stored)
        assert performed.PerformedStationNameCodeSequence[0].CodeValue in performers
