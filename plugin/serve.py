"""``pacsclip serve``: the worker runs as a child process, the HTTP API in a thread, next to
the DICOM node in the main thread."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from plugin.settings import Settings

logger = logging.getLogger(__name__)

API_STOP_TIMEOUT_S = 2


def worker_command(config: Path | None, overrides: Mapping[str, Any]) -> list[str]:
    """``pacsclip [root options] worker``, with the same config file and overrides."""
    command = [str(Path(sys.executable).with_name("pacsclip"))]
    if config is not None:
        command += ["--config", str(config)]
    for key, value in overrides.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return [*command, "worker"]


class WorkerProcess:
    """The worker child of ``pacsclip serve``."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def begin_stop(self) -> None:
        """SIGTERM: Celery's warm shutdown (no new task; the running one finishes)."""
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self, timeout_s: float) -> None:
        self.begin_stop()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "worker %d did not stop in %.0f s; killing it", self.process.pid, timeout_s
            )
            self.process.kill()
            self.process.wait()
        logger.info("worker process stopped")


@contextmanager
def run_worker_process(
    config: Path | None, overrides: Mapping[str, Any], *, stop_timeout_s: float
) -> Iterator[WorkerProcess]:
    """Start a worker for the time of the block; stop it (SIGTERM, then SIGKILL) after."""
    worker = WorkerProcess(subprocess.Popen(worker_command(config, overrides)))
    logger.info("worker process %d started", worker.process.pid)
    try:
        yield worker
    finally:
        worker.stop(stop_timeout_s)


def build_api(settings: Settings, metrics: Any | None = None) -> Any:
    """The FastAPI app over the catalog (result objects served from the results folder) with
    the web dashboard."""
    from plugin.api import create_app
    from plugin.catalog import dispatch_jobs, repository
    from plugin.catalog.db import open_catalog
    from plugin.dashboard import mount_dashboard
    from plugin.metrics import PacsclipMetrics
    from plugin.retrieval.service import service_for

    catalog = open_catalog(settings.effective_database_url)

    def object_file(session: Any, study_uid: str, sop_instance_uid: str) -> Path | None:
        relative = repository.result_object_path(session, study_uid, sop_instance_uid)
        return None if relative is None else settings.results_dir / relative

    metrics = metrics or PacsclipMetrics()
    retrieval = service_for(settings, catalog.sessions)
    app = create_app(
        settings,
        catalog.sessions,
        metrics,
        results_for=repository.results_for,
        object_file=object_file,
        failed_dispatch_jobs=dispatch_jobs.count_failed_jobs,
        retrieval=retrieval,
    )
    mount_dashboard(
        app,
        settings,
        catalog.sessions,
        metrics,
        retrieval=retrieval,
        rule_tester=partial(routing_decision, settings),
        enqueue_dispatch=partial(enqueue_dispatch, settings),
    )
    return app


def routing_decision(settings: Settings, ds: Any, calling_ae_title: str) -> dict[str, object]:
    """The decision the configured rules (read afresh: the file may have been edited) make
    for one file; RulesError (a ValueError) when the rules file cannot be used."""
    from dicom_node.routing import RoutingInput, default_rules, load_rules

    rules = load_rules(settings.rules_file) if settings.rules_file else default_rules()
    return rules.decide(RoutingInput.from_dataset(ds, calling_ae_title)).as_dict()


def enqueue_dispatch(settings: Settings, job_id: int) -> None:
    """Queue a replayed dispatch job (as ``pacsclip jobs retry`` does)."""
    from plugin.task_queue import DISPATCH_QUEUE, DISPATCH_RESULT, make_celery

    make_celery(settings).send_task(DISPATCH_RESULT, args=[job_id], queue=DISPATCH_QUEUE)


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
            timeout_graceful_shutdown=API_STOP_TIMEOUT_S,
        )
    )
    thread = threading.Thread(target=server.run, name="http-api", daemon=True)
    thread.start()
    logger.info("HTTP API on %s:%d", settings.api_host, settings.api_port)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=API_STOP_TIMEOUT_S + 1)
