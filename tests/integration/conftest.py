"""A pacsclip DICOM node running in this process on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from dicom_node.celery_publisher import CeleryPublisher
from dicom_node.node import DicomNode
from dicom_node.publish import StudyCompleted
from plugin.catalog.db import open_catalog
from plugin.catalog.models import Study
from plugin.settings import Settings
from plugin.task_queue import make_celery
from tests.models_fixtures import TinyImageTower, build_bundle, export_image_tower


class RecordingPublisher:
    """Test double for the worker queue: keeps every completion it is given."""

    def __init__(self) -> None:
        self.events: list[StudyCompleted] = []
        self._changed = threading.Condition()

    def publish(self, event: StudyCompleted) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 15) -> list[StudyCompleted]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.events) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.events)} completions, expected {count}")
                self._changed.wait(left)
            return list(self.events)


class RunningNode:
    def __init__(self, node: DicomNode, publisher: RecordingPublisher) -> None:
        self.node = node
        self.publisher = publisher
        self.settings = node.settings

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def sessions(self) -> Any:
        return self.node.sessions


@pytest.fixture
def start_node(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningNode]]:
    started: list[DicomNode] = []

    def start(settings: Settings | None = None, **overrides: Any) -> RunningNode:
        settings = settings or make_settings(**overrides)
        publisher = RecordingPublisher()
        node = DicomNode(
            settings, open_catalog(settings.effective_database_url), publisher=publisher
        )
        node.start()
        started.append(node)
        return RunningNode(node, publisher)

    yield start
    for node in started:
        node.stop()


# --- a worker process beside an in-process node ------------------------------------------

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    return build_bundle(root / "tiny", export_image_tower(TinyImageTower(), root / "tower.onnx"))


def worker_env(settings: Settings, bundle: Path | None) -> dict[str, str]:
    """``bundle`` None: the registry's live model (``demo_model`` decides about the demo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    if bundle is not None:
        env["PACSCLIP_MODEL_BUNDLE"] = str(bundle)
    env.update(
        PACSCLIP_DATA_DIR=str(settings.data_dir),
        PACSCLIP_DATABASE_URL=settings.effective_database_url,
        PACSCLIP_BROKER_URL=settings.effective_broker_url,
        PACSCLIP_RESULT_BACKEND_URL=settings.effective_result_backend_url,
        PACSCLIP_DEMO_MODEL=settings.demo_model,
        PACSCLIP_INFERENCE_THREADS="1",
        PACSCLIP_DESTINATIONS=json.dumps([d.model_dump() for d in settings.destinations]),
        PACSCLIP_DISPATCH_MAX_RETRIES=str(settings.dispatch_max_retries),
        PACSCLIP_DISPATCH_BACKOFF_S=str(settings.dispatch_backoff_s),
        PACSCLIP_TASK_VISIBILITY_TIMEOUT_S=str(settings.task_visibility_timeout_s),
        PACSCLIP_DISPATCH_BACKOFF_MAX_S=str(settings.dispatch_backoff_max_s),
        PACSCLIP_OOD_GUARD=str(settings.ood_guard).lower(),
        PACSCLIP_RESULT_REGIONS=str(settings.result_regions).lower(),
        PACSCLIP_RESULT_SEG=str(settings.result_seg).lower(),
    )
    if settings.webhook_url:
        env["PACSCLIP_WEBHOOK_URL"] = settings.webhook_url
    return env


# A worker whose analysis sleeps first, so a test can kill it in the middle of a task.
# Test instrumentation of pacsclip's own code, run in the worker process only.
SLOW_WORKER = """
import sys, time
from plugin import analysis
delay = float(sys.argv[1])
analyse = analysis.StudyAnalyser.analyse
def slow(self, *args, **kwargs):
    time.sleep(delay)
    return analyse(self, *args, **kwargs)
analysis.StudyAnalyser.analyse = slow
from plugin.cli.main import run
sys.argv = ["pacsclip", "worker"]
run()
"""


class Pipeline:
    """An in-process node publishing to a real Celery worker process."""

    def __init__(self, settings: Settings, node: DicomNode, bundle: Path | None, log: Path) -> None:
        self.settings, self.node, self.bundle, self.log = settings, node, bundle, log
        self.worker = self.start_worker()

    def start_worker(self, slow_analysis_s: float = 0.0) -> subprocess.Popen[bytes]:
        command = (
            [sys.executable, "-c", SLOW_WORKER, str(slow_analysis_s)]
            if slow_analysis_s > 0
            else [PACSCLIP, "worker"]
        )
        with self.log.open("ab") as log:
            return subprocess.Popen(
                command, env=worker_env(self.settings, self.bundle), stdout=log, stderr=log
            )

    def restart_worker(self, slow_analysis_s: float = 0.0) -> None:
        self.stop_worker()
        self.worker = self.start_worker(slow_analysis_s)

    def stop_worker(self) -> None:
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()

    def wait_for_state(self, study_uid: str, state: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        seen: str | None = None
        while time.monotonic() < deadline:
            with self.node.sessions() as session:
                study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
                seen = None if study is None else study.state
                if seen == state:
                    return
            assert self.worker.poll() is None, f"the worker died; log:\n{self.log.read_text()}"
            time.sleep(0.2)
        # What the node and the worker were doing, so a failure on CI can be diagnosed.
        raise TimeoutError(
            f"study {study_uid} did not reach {state} in {timeout_s} s (it is {seen}; the node "
            f"tracks {self.node.tracker.tracking()}); worker log tail:\n"
            f"{self.log.read_text()[-4000:]}"
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PACSCLIP, "--data-dir", str(self.settings.data_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=worker_env(self.settings, self.bundle),
        )


@pytest.fixture
def pipeline(
    make_settings: Callable[..., Settings], bundle_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Pipeline]]:
    started: list[Pipeline] = []

    def start(
        *,
        slow_analysis_s: float = 0.0,
        bundle: Path | None = None,
        registry: bool = False,
        replay_dead_letters: bool = False,
        **overrides: Any,
    ) -> Pipeline:
        """``bundle``: the worker's model (default: the tiny test bundle, which has no
        out-of-distribution reference and so scores every image); ``registry``: none, the
        data directory's registry says what is live; ``replay_dead_letters``: the node
        probes destinations with dead letters and replays them (as ``pacsclip node`` does)."""
        model = None if registry else bundle or bundle_dir
        settings = make_settings(model_bundle=model, **overrides)
        catalog = open_catalog(settings.effective_database_url)
        publisher = CeleryPublisher(make_celery(settings), catalog.sessions)
        node = DicomNode(
            settings,
            catalog,
            publisher=publisher,
            enqueue_dispatch=publisher.dispatch if replay_dead_letters else None,
        )
        run = Pipeline(settings, node, model, tmp_path / "worker.log")
        if slow_analysis_s > 0:
            run.restart_worker(slow_analysis_s)
        node.start()
        started.append(run)
        return run

    yield start
    for run in started:
        run.node.stop()
        run.stop_worker()
