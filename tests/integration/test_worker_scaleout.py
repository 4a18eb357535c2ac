"""Several worker processes on one host share one RabbitMQ broker, and each takes work."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from tests.integration.conftest import SLOW_WORKER, Pipeline, worker_env
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import stop_process, storescu
from tests.peers.rabbitmq import rabbitmq_vhost

STUDIES = 6


def test_two_workers_on_one_host_both_consume_from_rabbitmq(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    with rabbitmq_vhost() as broker_url:
        # Each analysis takes at least 1 s, so one worker cannot drain the queue alone.
        run = pipeline(broker_url=broker_url, slow_analysis_s=1.0)
        second_log = tmp_path / "worker-2.log"
        with second_log.open("ab") as log:
            second = subprocess.Popen(
                [sys.executable, "-c", SLOW_WORKER, "1.0"],
                env=worker_env(run.settings, run.bundle),
                stdout=log,
                stderr=log,
            )
        try:
            study_uids = []
            for n in range(STUDIES):
                [source] = ct_small_copies(1, tmp_path / f"src{n}")
                study_uids.append(str(dcmread(source).StudyInstanceUID))
                assert storescu([source], "127.0.0.1", run.node.port, aec="MODALITY").statuses == [
                    0
                ]
            for study_uid in study_uids:
                run.wait_for_state(study_uid, "analysed", timeout_s=120)
            assert second.poll() is None, second_log.read_text()
        finally:
            stop_process(second, timeout_s=20)
            run.stop_worker()

    logs = {"first": run.log.read_text(), "second": second_log.read_text()}
    assert "ResourceLocked" not in logs["second"], logs["second"]
    for name, text in logs.items():
        assert "pacsclip.analyse_study" in text and "succeeded" in text, (
            f"{name} worker ran no task"
        )
