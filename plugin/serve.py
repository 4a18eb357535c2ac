"""``pacsclip serve``: the worker runs as a child process, the HTTP API in a thread, next to
the DICOM node in the main thread."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugin.settings import Settings

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


def build_api(settings: Settings, metrics: Any | None = None) -> Any:
    """The FastAPI app over the catalog, with result objects served from the results folder."""
    from plugin.api import create_app
    from plugin.catalog import repository
    from plugin.catalog.db import open_catalog
    from plugin.metrics import PacsclipMetrics
    from plugin.retrieval.service import service_for

    catalog = open_catalog(settings.effective_database_url)

    def object_file(session: Any, study_uid: str, sop_instance_uid: str) -> Path | None:
        relative = repository.result_object_path(session, study_uid, sop_instance_uid)
        return None if relative is None else settings.results_dir / relative

    return create_app(
        settings,
        catalog.sessions,
        metrics or PacsclipMetrics(),
        results_for=repository.results_for,
        object_file=object_file,
        failed_dispatch_jobs=repository.count_failed_jobs,
        retrieval=service_for(settings, catalog.sessions),
    )


@contextmanager
def run_api_thread(settings: Settings, metrics: Any | None = None) -> Iterator[None]:
    """Serve the HTTP API from a thread for the time of the block."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            build_api(settings, metrics),
            host=settings.api_host,
            port=settings.api_port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, name="http-api", daemon=True)
    thread.start()
    logger.info("HTTP API on %s:%d", settings.api_host, settings.api_port)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=STOP_TIMEOUT_S)
