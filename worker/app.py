"""The Celery application: broker, result backend and queues from settings."""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from plugin.settings import Settings

QUEUES = ("stat", "routine", "dispatch", "training")


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``; the node uses it to send tasks by name, the worker to run
    them, so the node never imports the worker's modules (or the model runtime)."""
    app = Celery(
        "pacsclip",
        broker=settings.effective_broker_url,
        backend=settings.effective_result_backend_url,
    )
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="routine",
        # A task is acknowledged when it has finished, and a worker that dies mid-task gives
        # it back: tasks are idempotent (deterministic result UIDs), so running one twice is
        # harmless while losing one is not.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Redis hands an unacknowledged task to another worker after this long.
        broker_transport_options={"visibility_timeout": settings.task_visibility_timeout_s}
        if settings.effective_broker_url.startswith(("redis", "rediss"))
        else {},
    )
    return app
