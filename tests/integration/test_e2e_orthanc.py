"""Orthanc as the hospital PACS: a study pushed to pacsclip comes back with an SR and an overlay."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from pydicom import dcmread

from tests.integration.conftest import Pipeline
from tests.peers.data import ct_small_copies
from tests.peers.orthanc import OrthancServer
from tests.peers.ports import free_port

REDIS_URL = "redis://127.0.0.1:6379/14"  # a database of its own, emptied around each test


def orthanc_study_modalities(orthanc: OrthancServer, study_uid: str) -> list[str]:
    study = orthanc.find_study(study_uid)
    if study is None:
        return []
    return sorted(
        str(dcmread_bytes(orthanc.instance_file(i["ID"])).Modality)
        for i in orthanc.study_instances(study)
    )


def dcmread_bytes(data: bytes) -> object:
    from io import BytesIO

    return dcmread(BytesIO(data), stop_before_pixels=True)


def wait_for_modalities(
    orthanc: OrthancServer, study_uid: str, expected: list[str], timeout_s: float = 90
) -> None:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        seen = orthanc_study_modalities(orthanc, study_uid)
        if seen == expected:
            return
        time.sleep(0.3)
    raise TimeoutError(f"Orthanc has {seen}, expected {expected}")


def push_study(orthanc: OrthancServer, tmp_path: Path) -> str:
    [source] = ct_small_copies(1, tmp_path / "src")
    orthanc.upload(source)
    study_uid = str(dcmread(source).StudyInstanceUID)
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None
    orthanc.store_to_modality("pacsclip", [study_id])
    return study_uid


@pytest.fixture
def redis_broker() -> str:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.skip(f"no Redis server on 127.0.0.1:6379: {exc}")
    return REDIS_URL


def start_with_orthanc(
    pipeline: Callable[..., Pipeline], orthanc: OrthancServer, node_port: int, **settings: object
) -> Pipeline:
    destination = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1"}
    return pipeline(
        dicom_port=node_port,
        allowed_callers=["ORTHANC"],
        destinations=[{**destination, "port": orthanc.dicom_port}],
        **settings,
    )


@pytest.mark.parametrize("broker", ["sqlite", "redis"])
def test_results_come_back_into_the_same_study_in_orthanc(
    pipeline: Callable[..., Pipeline],
    tmp_path: Path,
    broker: str,
    request: pytest.FixtureRequest,
) -> None:
    extra: dict[str, object] = {}
    if broker == "redis":
        extra = {
            "broker_url": request.getfixturevalue("redis_broker"),
            "result_backend_url": REDIS_URL,
        }
    node_port = free_port()
    modalities = {"pacsclip": ("PACSCLIP", "127.0.0.1", node_port)}
    with OrthancServer(modalities=modalities, workdir=tmp_path / "orthanc") as orthanc:
        run = start_with_orthanc(pipeline, orthanc, node_port, **extra)
        study_uid = push_study(orthanc, tmp_path)

        wait_for_modalities(orthanc, study_uid, ["CT", "OT", "SR"])
        run.wait_for_state(study_uid, "delivered")


def test_orthanc_down_during_dispatch_is_retried_until_it_is_back(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    node_port, http_port, dicom_port = free_port(), free_port(), free_port()
    modalities = {"pacsclip": ("PACSCLIP", "127.0.0.1", node_port)}
    workdir = tmp_path / "orthanc"
    with OrthancServer(
        modalities=modalities, workdir=workdir, http_port=http_port, dicom_port=dicom_port
    ) as orthanc:
        # The analysis takes a few seconds, so that Orthanc is surely stopped before the
        # first delivery: a fast worker could otherwise deliver while Orthanc shuts down.
        run = start_with_orthanc(
            pipeline,
            orthanc,
            node_port,
            dispatch_max_retries=8,
            dispatch_backoff_s=1.0,
            slow_analysis_s=4.0,
        )
        study_uid = push_study(orthanc, tmp_path)
    # Orthanc is down now; pacsclip analyses and keeps trying to deliver.
    run.wait_for_state(study_uid, "analysed")
    time.sleep(2)
    with OrthancServer(
        modalities=modalities, workdir=workdir, http_port=http_port, dicom_port=dicom_port
    ) as orthanc:
        wait_for_modalities(orthanc, study_uid, ["CT", "OT", "SR"])
        run.wait_for_state(study_uid, "delivered")
    with run.node.sessions() as session:
        from plugin.catalog.dispatch_jobs import recent_jobs

        [job] = recent_jobs(session)
    assert job["state"] == "delivered"
    assert job["attempts"] >= 2  # at least one failed try while Orthanc was down


def test_worker_killed_mid_task_is_redelivered_and_orthanc_gets_one_sr(
    pipeline: Callable[..., Pipeline],
    tmp_path: Path,
    redis_broker: str,
) -> None:
    node_port = free_port()
    modalities = {"pacsclip": ("PACSCLIP", "127.0.0.1", node_port)}
    with OrthancServer(modalities=modalities, workdir=tmp_path / "orthanc") as orthanc:
        run = start_with_orthanc(
            pipeline,
            orthanc,
            node_port,
            broker_url=redis_broker,
            result_backend_url=REDIS_URL,
            task_visibility_timeout_s=10,
            dispatch_backoff_max_s=5.0,
            slow_analysis_s=6.0,
        )
        study_uid = push_study(orthanc, tmp_path)
        run.wait_for_state(study_uid, "queued")
        time.sleep(3)  # the worker has taken the task and is inside it
        run.worker.send_signal(signal.SIGKILL)
        run.worker.wait(timeout=10)
        run.restart_worker(slow_analysis_s=0.0)

        # Redelivered once its visibility timeout (10 s) has run out, not at kombu's default
        # sweep of every 100 s.
        wait_for_modalities(orthanc, study_uid, ["CT", "OT", "SR"], timeout_s=45)
        run.wait_for_state(study_uid, "delivered")
        time.sleep(2)  # nothing more arrives later
        assert orthanc_study_modalities(orthanc, study_uid) == ["CT", "OT", "SR"]
