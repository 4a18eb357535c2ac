"""``pacsclip model finetune --queue`` through a real Celery worker process on the training queue
(SQLite broker and result backend): progress comes back, the bundle is installed inactive, and a
bad request fails the task with its reason."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.models.registry import Registry
from plugin.settings import Settings
from tests.finetune_fixtures import build_tiny_parent, write_pairs
from tests.integration.conftest import PACSCLIP, worker_env


@pytest.fixture
def training_worker(tmp_path: Path, make_settings: object) -> Iterator[tuple[Settings, Path]]:
    settings: Settings = make_settings()  # type: ignore[operator]
    parent = build_tiny_parent(tmp_path / "parent")
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [PACSCLIP, "worker", "--queues", "training"],
        env=worker_env(settings, parent),
        stdout=log,
        stderr=log,
    )
    try:
        yield settings, parent
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()


def _finetune(
    settings: Settings, parent: Path, pairs: Path, version: str
) -> subprocess.CompletedProcess[str]:
    command = [PACSCLIP, "model", "finetune", "--from", str(parent), "--pairs", str(pairs)]
    command += ["--version", version, "--rank", "8", "--epochs", "100", "--queue"]
    return subprocess.run(
        command,
        env=worker_env(settings, parent),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_finetune_runs_on_the_training_queue(
    training_worker: tuple[Settings, Path], tmp_path: Path
) -> None:
    settings, parent = training_worker
    done = _finetune(settings, parent, write_pairs(tmp_path / "pairs", 40), "2.0.0")
    assert done.returncode == 0, done.stderr
    assert "queued fine-tuning task" in done.stderr
    assert "training: " in done.stderr  # progress read from the task's state
    assert "installed tiny-clip@2.0.0 (not active" in done.stdout
    registry = Registry.for_data_dir(settings.data_dir)
    assert registry.active() is None
    installed = registry.info("tiny-clip", "2.0.0")
    assert installed.checksums_ok
    assert installed.manifest.lineage is not None
    assert installed.manifest.lineage.parent == "tiny-clip@1.0.0"

    failed = _finetune(settings, parent, write_pairs(tmp_path / "few", 4), "2.0.1")
    assert failed.returncode == 2
    assert "failed: fine-tuning needs at least 10 image-report pairs, got 4" in failed.stderr
