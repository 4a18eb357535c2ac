"""Cold start: the node, three workers and the API started at the same instant on a fresh
catalog, as a Kubernetes rollout or ``docker compose up --scale worker=3`` starts them.

Every process creates or migrates the schemas it uses when it starts (the catalog, the
embedded broker's tables); each round checks that all of them come up, none logs an error,
and a study sent to the node is analysed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.pacsclip_process import PacsclipProcess, pacsclip_env
from tests.peers.ports import free_port
from tests.peers.postgres import scratch_database
from tests.peers.rabbitmq import rabbitmq_vhost
from tests.unit.test_schema_lock import (
    PROCESSES,
    migrate_while_another_waits,
    open_and_close_catalog,
    start_together,
)

TOKEN = "cold-start-token"
NODE_AET = "PACSCLIP"
WORKERS = 3
UP_WITHIN_S = 30
ANALYSED_WITHIN_S = 60
STOP_WITHIN_S = 20
SQLITE_ROUNDS = 2
POSTGRES_ROUNDS = 1
# Celery's line once a worker consumes ("pacsclip-PID@HOST ready.").
WORKER_READY = re.compile(r"@\S+ ready\.")
# plugin.logs formats the level as a word of its own.
TROUBLE = re.compile(r" (ERROR|CRITICAL) |Traceback")


class Cluster:
    """The node, WORKERS workers and the API as separate ``pacsclip`` processes."""

    def __init__(self, root: Path, bundle: Path, urls: Mapping[str, str]) -> None:
        root.mkdir(parents=True)
        self.dicom_port, self.api_port = free_port(), free_port()
        env = pacsclip_env(
            {
                "PACSCLIP_DATA_DIR": str(root / "data"),
                "PACSCLIP_DICOM_HOST": "127.0.0.1",
                "PACSCLIP_DICOM_PORT": str(self.dicom_port),
                "PACSCLIP_API_HOST": "127.0.0.1",
                "PACSCLIP_API_PORT": str(self.api_port),
                "PACSCLIP_API_TOKEN": TOKEN,
                "PACSCLIP_QUIET_PERIOD_S": "0.5",
                "PACSCLIP_MIN_FREE_DISK_MB": "0",
                "PACSCLIP_RECEIVER_PROCESSES": "1",
                "PACSCLIP_MODEL_BUNDLE": str(bundle),
                "PACSCLIP_INFERENCE_THREADS": "1",
                **urls,
            }
        )
        names = ["node", *(f"worker-{n}" for n in range(1, WORKERS + 1)), "api"]
        self.processes = {
            name: PacsclipProcess([name.split("-")[0]], env, root / f"{name}.log") for name in names
        }

    def start(self) -> None:
        for process in self.processes.values():
            process.start()

    def stop(self) -> None:
        # All signalled first: a worker's warm shutdown takes seconds, and in turn they add up.
        for process in self.processes.values():
            if process.alive():
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WITHIN_S
        for process in self.processes.values():
            if process.process is not None:
                with suppress(subprocess.TimeoutExpired):
                    process.process.wait(max(0.0, deadline - time.monotonic()))
            process.stop()

    def logs(self) -> dict[str, str]:
        return {name: p.log.read_text(errors="replace") for name, p in self.processes.items()}

    def describe(self) -> str:
        return "\n".join(f"--- {name}\n{log[-3000:]}" for name, log in self.logs().items())

    def api_get(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def not_ready(self) -> list[str]:
        """The processes not serving yet; raises when one has exited."""
        dead = [name for name, p in self.processes.items() if not p.alive()]
        if dead:
            raise AssertionError(f"{', '.join(dead)} exited:\n{self.describe()}")
        waiting = [
            name
            for name, log in self.logs().items()
            if name.startswith("worker") and not WORKER_READY.search(log)
        ]
        if self.api_get("/api/health")[0] != 200:
            waiting.append("api")
        if echoscu("127.0.0.1", self.dicom_port, aec=NODE_AET, timeout_s=5).returncode != 0:
            waiting.append("node")
        return waiting

    def wait_until_up(self, started: float) -> float:
        waiting = self.not_ready()
        while waiting and time.monotonic() - started < UP_WITHIN_S:
            time.sleep(0.25)
            waiting = self.not_ready()
        assert not waiting, f"not up {UP_WITHIN_S} s after start: {waiting}\n{self.describe()}"
        return time.monotonic() - started

    def analysed(self, study_uid: str) -> bool:
        status, body = self.api_get(f"/api/studies/{study_uid}")
        return status == 200 and json.loads(body)["state"] == "analysed"


def cold_start_round(root: Path, bundle: Path, urls: Mapping[str, str]) -> None:
    cluster = Cluster(root, bundle, urls)
    started = time.monotonic()
    cluster.start()
    try:
        up_s = cluster.wait_until_up(started)
        [source] = ct_small_copies(1, root / "study")
        study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        sent = storescu([source], "127.0.0.1", cluster.dicom_port, aec=NODE_AET, timeout_s=30)
        assert sent.statuses == [0], sent.stdout[-2000:] + sent.stderr[-2000:]
        deadline = time.monotonic() + ANALYSED_WITHIN_S
        while not cluster.analysed(study_uid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.analysed(study_uid), f"study not analysed\n{cluster.describe()}"
        assert cluster.not_ready() == []
        analysed_s = time.monotonic() - started
        print(f"{root.name}: all up after {up_s:.1f} s, study analysed after {analysed_s:.1f} s")
    finally:
        cluster.stop()
    for name, log in cluster.logs().items():
        troubles = [line for line in log.splitlines() if TROUBLE.search(line)]
        assert not troubles, f"{name} logged errors:\n{log[-4000:]}"


def test_node_workers_and_api_start_together_on_a_fresh_data_directory(
    tmp_path: Path, bundle_dir: Path
) -> None:
    for n in range(SQLITE_ROUNDS):
        cold_start_round(tmp_path / f"sqlite-{n}", bundle_dir, {})


@pytest.mark.postgres
def test_node_workers_and_api_start_together_on_a_fresh_postgres_database(
    tmp_path: Path, bundle_dir: Path
) -> None:
    # As deploy/ runs them: catalog and task results in PostgreSQL, tasks on RabbitMQ.
    with rabbitmq_vhost() as broker_url:
        for n in range(POSTGRES_ROUNDS):
            with scratch_database("pacsclip_cold") as url:
                urls = {
                    "PACSCLIP_DATABASE_URL": url,
                    "PACSCLIP_RESULT_BACKEND_URL": f"db+{url}",
                    "PACSCLIP_BROKER_URL": broker_url,
                }
                cold_start_round(tmp_path / f"postgres-{n}", bundle_dir, urls)


@pytest.mark.postgres
def test_processes_migrating_a_fresh_postgres_catalog_at_once_all_succeed() -> None:
    with scratch_database("pacsclip_cold") as url:
        assert start_together(open_and_close_catalog, url) == [0] * PROCESSES
        engine = create_engine(url)
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT count(*) FROM alembic_version")) == 1
        engine.dispose()


@pytest.mark.postgres
def test_a_process_waits_for_the_one_migrating_a_postgres_catalog(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with scratch_database("pacsclip_cold") as url:
        migrate_while_another_waits(url, caplog)
