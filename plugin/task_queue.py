"""The task queue both processes share: the Celery app, its queues and the task names.

The node sends tasks by name and the worker runs them; both build their app here, so neither
imports the other (and the node never imports the model runtime).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from celery import Celery
from kombu.entity import Exchange, Queue
from kombu.transport.sqlalchemy import Channel as SQLAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from plugin.catalog.schema_lock import BROKER_SCHEMA, schema_lock
from plugin.settings import Settings

logger = logging.getLogger(__name__)

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


class SchemaLockedSQLAlchemyChannel(SQLAlchemyChannel):
    """kombu's SQLAlchemy channel (as of kombu 5.7) made safe for processes that start
    together on a fresh broker database.

    ``_open`` creates the broker's tables once per process (``metadata.create_all``: check,
    then CREATE TABLE), so it runs under the broker's schema lock. ``_get_or_create`` inserts
    a queue's row when it finds none, and only an OperationalError is handled there; when
    another process inserted the same queue in between, the unique name fails the commit,
    and the row the other process made is the one to use.
    """

    def _open(self) -> Any:
        url = self.connection.client.hostname
        if url in self._engines:
            return self._engines[url]
        lock_engine = create_engine(url, poolclass=NullPool)
        try:
            with schema_lock(lock_engine, BROKER_SCHEMA):
                return super()._open()
        finally:
            lock_engine.dispose()

    def _get_or_create(self, queue: str) -> Any:
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            logger.info("queue %s was declared by another process meanwhile", queue)
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()


class PollingSQLAlchemyTransport(SQLAlchemyTransport):
    """kombu's SQLAlchemy transport, polling 20 times a second instead of once: an idle worker
    otherwise adds up to 1 s to each task it is sent (a poll is one indexed SQLite query).

    Set as a class because the transport hands its options to ``create_engine``, so
    ``polling_interval`` cannot go through ``broker_transport_options``."""

    Channel = SchemaLockedSQLAlchemyChannel
    polling_interval = 0.05


def restore_interval_s(visibility_timeout_s: int) -> int:
    """How often a Redis worker looks for tasks whose visibility timeout ran out."""
    return max(1, min(10, visibility_timeout_s // 10))


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
            # ... once a worker's sweep finds it: kombu (5.7) sweeps every 10 s times a
            # throttle of 10, so a killed worker's task came back up to 100 s late. A sweep
            # every tenth of the timeout (at most 10 s), each one a scan, keeps it on time.
            "unacked_restore_interval": restore_interval_s(settings.task_visibility_timeout_s),
            "unacked_restore_throttle": 1,
            # Queues are read in the order of QUEUES (stat first), not in turn.
            "queue_order_strategy": "priority",
        }
        if settings.effective_broker_url.startswith(("redis", "rediss"))
        else {},
    )
    return app
