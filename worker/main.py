"""``pacsclip worker``: a Celery worker process for the analysis and dispatch queues."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from celery.signals import worker_ready

from plugin.probes import ProbeServer
from plugin.settings import Settings
from plugin.task_queue import WORKER_QUEUES, make_celery
from plugin.validation.monitoring import MonitoringGauges, MonitorStore
from worker.tasks import WorkerContext, register


def default_node_name() -> str:
    """``pacsclip-PID@HOST``: unique per process, so several workers on one host can share a
    broker (RabbitMQ gives each node name one exclusive pidbox queue)."""
    return f"pacsclip-{os.getpid()}@{socket.gethostname()}"


def main(
    settings: Settings, queues: Sequence[str] = WORKER_QUEUES, *, node_name: str | None = None
) -> None:
    app = make_celery(settings)
    app.pacsclip = context = WorkerContext(settings)
    probes = None
    if settings.worker_metrics_port is not None:
        store = MonitorStore(settings.data_dir / "monitoring")
        context.metrics.registry.register(MonitoringGauges(store.latest))
        # Up from the start: /health answers 503 with the reason until the model loaded and
        # ran once and the worker consumes.
        probes = ProbeServer(
            settings.api_host,
            settings.worker_metrics_port,
            context.metrics.registry,
            context.readiness.check,
        ).start()
    try:
        register(app)
        ready_with = context.warm_up()
        if ready_with is not None:

            def consuming(**_: object) -> None:
                context.readiness.set_ready(ready_with)

            worker_ready.connect(consuming, weak=False)
        app.worker_main(
            [
                "worker",
                f"--hostname={node_name or default_node_name()}",
                f"--pool={settings.worker_pool}",
                f"--concurrency={settings.worker_concurrency}",
                f"--queues={','.join(queues)}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        if probes is not None:
            probes.stop()
