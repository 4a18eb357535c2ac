"""``pacsclip worker``: a Celery worker process for the analysis and dispatch queues."""

from __future__ import annotations

from collections.abc import Sequence

from plugin.settings import Settings
from worker.app import QUEUES, make_celery
from worker.tasks import WorkerContext, register


def main(settings: Settings, queues: Sequence[str] = QUEUES) -> None:
    app = make_celery(settings)
    app.pacsclip = context = WorkerContext(settings)
    if settings.worker_metrics_port is not None:
        context.metrics.serve(settings.api_host, settings.worker_metrics_port)
    register(app)
    app.worker_main(
        [
            "worker",
            f"--pool={settings.worker_pool}",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={','.join(queues)}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
