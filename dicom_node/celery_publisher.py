"""Completion published to the worker queue: the analysis task, sent by name (and replayed
dispatch jobs, sent by name too)."""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.publish import StudyCompleted
from plugin.catalog import repository
from plugin.study_state import StudyState
from plugin.task_queue import ANALYSE_STUDY, DISPATCH_QUEUE, DISPATCH_RESULT, analysis_queue

logger = logging.getLogger(__name__)


class CeleryPublisher:
    """Sends ``pacsclip.analyse_study`` to the queue named by the study's priority."""

    def __init__(self, app: Celery, sessions: sessionmaker[Session]) -> None:
        self.app = app
        self.sessions = sessions

    def connect(self) -> None:
        """Open the broker connection and declare the analysis queues now, so that the first
        complete study is not the one that waits for them. A broker that is down is logged:
        the first send connects (and the node's requeue check covers a failed one)."""
        try:
            self.app.backend  # noqa: B018 (built on first use: a send builds its result)
            with self.app.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=1, interval_start=0)
                for queue in self.app.amqp.queues.values():
                    producer.maybe_declare(queue)
        except Exception as exc:  # kombu raises its own, the transport's and OSError
            logger.warning("broker not reachable at start: %s", exc)

    def dispatch(self, job_id: int, early: bool = False) -> None:
        """Queue a dispatch job: a dead letter replayed when its destination is back, or
        (``early``) an early attempt of a job waiting on a long backoff."""
        kwargs = {"early": True} if early else {}
        self.app.send_task(DISPATCH_RESULT, args=[job_id], kwargs=kwargs, queue=DISPATCH_QUEUE)

    def publish(self, event: StudyCompleted) -> None:
        if not event.pipelines:
            logger.info("study %s: routing runs no pipeline", event.study_instance_uid)
            return
        self.analyse(event.study_instance_uid, event.generation, event.priority)

    def analyse(self, study_uid: str, generation: int, priority: str) -> str:
        """Queue a complete study's analysis; the id of the task sent."""
        queue = analysis_queue(priority)
        # Queued before the send: a fast worker may finish before this returns. If the send
        # fails, the node's requeue check sends the study again later.
        with self.sessions() as session:
            repository.set_state(session, study_uid, StudyState.QUEUED)
            session.commit()
        sent = self.app.send_task(
            ANALYSE_STUDY,
            args=[study_uid, generation],
            # The queue is the priority: a message priority would be read as "lowest" by
            # Redis (its 0 is the highest) and ignored by RabbitMQ queues without one.
            queue=queue,
        )
        logger.info("study %s generation %d queued on %s", study_uid, generation, queue)
        return str(sent.id)

    def failure(self, task_id: str) -> str | None:
        """The type of the exception a task failed with, from the result backend, once it
        has (its message may quote a dataset: the worker's log has it); None while it waits,
        runs or retries, and after it succeeded."""
        result = self.app.AsyncResult(task_id)
        if result.state != "FAILURE":
            return None
        return type(result.result).__name__
