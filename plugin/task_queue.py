"""The task queue both processes share: the Celery app, its queues and the task names.

The node sends tasks by name and the worker runs them; both build their app here, so neither
imports the other (and the node never imports the model runtime).
"""

from __future__ import annotations

from typing import Final

from celery import Celery
from kombu.entity import Exchange, Queue
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

from plugin.settings import Settings

ANALYSE_STUDY: Final = "pacsclip.analyse_study"
DISPATCH_RESULT: Final = "pacsclip.dispatch_result"
# Runs only on workers started with `pacsclip worker --queues training`.
FINETUNE_BUNDLE: Final = "pacsclip.finetune_bundle"

STAT_QUEUE: Final = "stat"
ROUTINE_QUEUE: Final = "routine"
DISPATCH_QUEUE: Final = "dispatch"
TRAINING_QUEUE: Final = "training"
# Most urgent first: STAT analyses, the deliveries of finished results, routine analyses.
# A worker reads its queues in this order (Redis: strictly; SQLite: in turn).
QUEUES: Final = (STAT_QUEUE, DISPATCH_QUEUE, ROUTINE_QUEUE, TRAINING_QUEUE)
WORKER_QUEUES: Final = (STAT_QUEUE, DISPATCH_QUEUE, ROUTINE_QUEUE)


def analysis_queue(priority: str) -> str:
    """The queue of a study's analysis: STAT studies have one of their own."""
    return STAT_QUEUE if priority == "stat" else ROUTINE_QUEUE


SQLA_PREFIX: Final = "sqla+"


class PollingSQLAlchemyTransport(SQLAlchemyTransport):
    """kombu's SQLAlchemy transport, polling 20 times a second instead of once: an idle worker
    otherwise adds up to 1 s to each task it is sent (a poll is one indexed SQLite query).

    Set as a class because the transport hands its options to ``create_engine``, so
    ``polling_interval`` cannot go through ``broker_transport_options``."""

    polling_interval = 0.05


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``: the node uses it to send tasks by name, the worker to run
    them."""
    broker_url = settings.effective_broker_url
    embedded = broker_url.startswith(SQLA_PREFIX)
    app = Celery(
        "pacsclip",
        broker=broker_url.removeprefix(SQLA_PREFIX),
        backend=settings.effective_result_backend_url,
    )
    if embedded:
        app.conf.broker_transport = PollingSQLAlchemyTransport
    app.conf.update(
        # One direct exchange per queue, routing key = queue name: a task sent to "stat" is
        # routed to the stat queue whatever the broker.
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        task_default_queue=ROUTINE_QUEUE,
        task_default_exchange=ROUTINE_QUEUE,
        task_default_routing_key=ROUTINE_QUEUE,
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
        broker_transport_options={
            # Redis hands an unacknowledged task to another worker after this long.
            "visibility_timeout": settings.task_visibility_timeout_s,
            # Queues are read in the order of QUEUES (stat first), not in turn.
            "queue_order_strategy": "priority",
        }
        if settings.effective_broker_url.startswith(("redis", "rediss"))
        else {},
    )
    return app
