"""The node's recorder: the receivers' events become catalog rows, then completion input.

One thread drains the event queue. A batch is what arrives within 10 ms of its first event
(at most 500): one transaction for all its instances, so the catalog keeps up with several
receivers without a transaction per C-STORE. Completion tracking sees an instance only after
its row is committed, so a study is never completed with rows still missing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.completion import CompletionTracker
from dicom_node.intake_events import (
    AssociationClosed,
    AssociationOpened,
    AssociationRejected,
    InstanceSpooled,
    IntakeEvent,
    ObjectQuarantined,
    StoreFailed,
)
from plugin.catalog import repository
from plugin.catalog.records import Recorded, SpooledInstance, StoreOutcome
from plugin.catalog.writer import CatalogWriter
from plugin.site import site_key

logger = logging.getLogger(__name__)

MAX_BATCH = 500
BATCH_WINDOW_S = 0.01  # gather a batch this long after its first event (or MAX_BATCH rows)
RETRY_MAX_S = 5.0


class EventSource(Protocol):
    """A ``queue.Queue`` or a ``multiprocessing.Queue``."""

    def get(self, block: bool = True, timeout: float | None = None) -> IntakeEvent: ...

    def get_nowait(self) -> IntakeEvent: ...


@dataclass
class IntakeRecorder:
    events: EventSource
    writer: CatalogWriter
    sessions: sessionmaker[Session]
    tracker: CompletionTracker
    site_tags: list[str]
    clock: Callable[[], float]
    on_new_study: Callable[[str], None] | None = None
    on_stored: Callable[[], None] | None = None

    def run(self, stop: threading.Event) -> None:
        """Record events until ``stop`` is set and the queue is empty."""
        while True:
            batch = self._next_batch(timeout_s=0.05)
            if batch:
                self.record(batch, stop)
            elif stop.is_set():
                return

    def _next_batch(self, timeout_s: float) -> list[IntakeEvent]:
        try:
            batch = [self.events.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        closes = time.monotonic() + BATCH_WINDOW_S
        while len(batch) < MAX_BATCH:
            left = closes - time.monotonic()
            try:
                batch.append(
                    self.events.get(timeout=left) if left > 0 else self.events.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def record(self, batch: Sequence[IntakeEvent], stop: threading.Event | None = None) -> None:
        spooled = [e for e in batch if isinstance(e, InstanceSpooled)]
        recorded = self._catalog(spooled, stop) if spooled else []
        outcomes = {id(e): r for e, r in zip(spooled, recorded, strict=True)}
        self._write_audits(batch)
        for event in batch:
            self._track(event, outcomes)

    def _catalog(
        self, spooled: Sequence[InstanceSpooled], stop: threading.Event | None
    ) -> list[Recorded | None]:
        """Commit the batch; retry while the database is unavailable. ``None`` for an
        instance left to the spool reconciliation at the next start."""
        items = [
            SpooledInstance(
                obj=e.obj,
                site_key=site_key(self.site_tags, e.obj.tag_values(e.peer.calling_ae_title)),
                peer=e.peer,
                path=e.path,
                size_bytes=e.size_bytes,
                sha256=e.sha256,
            )
            for e in spooled
        ]
        delay = 0.1
        while True:
            try:
                return list(self.writer.record_instances(items))
            except IntegrityError:
                logger.exception(
                    "a batch of %d instances conflicts; cataloging one by one", len(items)
                )
                return [self._catalog_one(item) for item in items]
            except SQLAlchemyError:
                if stop is not None and stop.is_set():
                    logger.error(
                        "catalog unavailable at shutdown: %d spooled instances are cataloged "
                        "at the next start",
                        len(items),
                    )
                    return [None] * len(items)
                logger.exception("catalog write failed; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _catalog_one(self, item: SpooledInstance) -> Recorded | None:
        try:
            [recorded] = self.writer.record_instances([item])
        except SQLAlchemyError:
            logger.exception(
                "instance %s not cataloged; the next start catalogs it from the spool",
                item.obj.sop_instance_uid,
            )
            return None
        return recorded

    def _write_audits(self, batch: Sequence[IntakeEvent]) -> None:
        rows = [
            e for e in batch if isinstance(e, ObjectQuarantined | StoreFailed | AssociationRejected)
        ]
        if not rows:
            return
        try:
            with self.sessions() as session:
                for event in rows:
                    _audit(session, event)
                session.commit()
        except SQLAlchemyError:
            logger.exception("could not write %d audit or quarantine rows", len(rows))

    def _track(self, event: IntakeEvent, outcomes: dict[int, Recorded | None]) -> None:
        if isinstance(event, AssociationOpened):
            self.tracker.association_started(event.association, event.calling_ae_title)
        elif isinstance(event, AssociationClosed):
            self.tracker.association_ended(event.association, self.clock())
        elif isinstance(event, InstanceSpooled):
            recorded = outcomes[id(event)]
            if recorded is None:
                return
            if self.on_stored is not None:
                self.on_stored()
            if recorded.reopened:
                logger.info("study %s reopened by a late instance", event.obj.study_instance_uid)
            if recorded.outcome is StoreOutcome.DUPLICATE:
                return
            first = self.tracker.instance_received(
                event.obj.study_instance_uid,
                event.association,
                self.clock(),
                new=recorded.outcome is StoreOutcome.STORED,
            )
            if first and self.on_new_study is not None:
                self.on_new_study(event.obj.study_instance_uid)


def _audit(session: Session, event: ObjectQuarantined | StoreFailed | AssociationRejected) -> None:
    if isinstance(event, ObjectQuarantined):
        repository.record_quarantine(
            session,
            path=event.path,
            size_bytes=event.size_bytes,
            reason=event.reason,
            status=event.status,
            peer=event.peer,
            sop_class_uid=event.sop_class_uid,
            sop_instance_uid=event.sop_instance_uid,
        )
    elif isinstance(event, StoreFailed):
        repository.audit(
            session,
            "failed",
            event.peer,
            status=event.status,
            study_instance_uid=event.study_instance_uid,
            sop_instance_uid=event.sop_instance_uid,
            detail=event.detail,
        )
    else:
        repository.audit(session, "association_rejected", event.peer, detail=event.detail)
