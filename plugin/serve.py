"""``pacsclip serve``: the worker runs as a child process next to the node."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30


def worker_command(config: Path | None, overrides: Mapping[str, Any]) -> list[str]:
    """``pacsclip [root options] worker``, with the same config file and overrides."""
    command = [str(Path(sys.executable).with_name("pacsclip"))]
    if config is not None:
        command += ["--config", str(config)]
    for key, value in overrides.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return [*command, "worker"]


@contextmanager
def run_worker_process(config: Path | None, overrides: Mapping[str, Any]) -> Iterator[None]:
    """Start a worker for the time of the block; stop it (SIGTERM, then SIGKILL) after."""
    process = subprocess.Popen(worker_command(config, overrides))
    logger.info("worker process %d started", process.pid)
    try:
        yield
    finally:
        process.terminate()  # Celery's warm shutdown: the running task finishes first
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "worker %d did not stop in %d s; killing it", process.pid, STOP_TIMEOUT_S
            )
            process.kill()
            process.wait()
        logger.info("worker process stopped")
