"""``pacsclip worker``: a Celery worker process for the analysis and dispatch queues."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from celery.signals import worker_ready

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
    if settings.worker_metrics_port is not None:
        store = MonitorStore(settings.data_dir / "monitoring")
        context.metrics.registry.register(MonitoringGauges(store.latest))
        port = settings.worker_metrics_port

        # Served once the worker consumes (warmed up, connected), so that an answer on the
        # metrics port also says the worker is ready.
        def serve_metrics(**_: object) -> None:
            context.metrics.serve(settings.api_host, port)

        worker_ready.connect(serve_metrics, weak=False)
    register(app)
    context.warm_up()
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
