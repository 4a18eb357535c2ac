"""Accepting and refusing received objects: spool, catalog, quarantine, completion signal.

The order is the durability promise: bytes fsynced to the spool, then the catalog
commit, then Success. A refused object is quarantined with its reason.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom import Dataset
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import status
from dicom_node.completion import CompletionTracker
from dicom_node.received import InvalidObject
from dicom_node.spool import Quarantine, Spool
from plugin.catalog import repository
from plugin.catalog.records import Peer, ReceivedObject, StoreOutcome
from plugin.catalog.writer import CatalogWriter
from plugin.errors import OutOfResources
from plugin.site import site_key

logger = logging.getLogger(__name__)

ERROR_COMMENT_MAX = 64  # ErrorComment is LO


def status_dataset(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return ds


@dataclass
class Receiver:
    spool: Spool
    quarantine: Quarantine
    catalog: CatalogWriter
    sessions: sessionmaker[Session]
    tracker: CompletionTracker
    site_tags: list[str]
    clock: Callable[[], float]
    on_new_study: Callable[[str], None] | None = None
    on_stored: Callable[[], None] | None = None

    def accept(
        self, obj: ReceivedObject, data: bytes, peer: Peer, association: int | None
    ) -> int | Dataset:
        digest = hashlib.sha256(data).hexdigest()
        try:
            outcome = self._store(obj, data, digest, peer)
        except OutOfResources as exc:
            logger.error("refused instance: %s (calling AE %s)", exc, peer.calling_ae_title)
            self._audit_failure(peer, obj, status.OUT_OF_RESOURCES, str(exc))
            return status_dataset(status.OUT_OF_RESOURCES, "Out of resources: disk space low")
        except (OSError, SQLAlchemyError) as exc:
            logger.exception("storing instance %s failed", obj.sop_instance_uid)
            self._audit_failure(peer, obj, status.PROCESSING_FAILURE, type(exc).__name__)
            return status_dataset(status.PROCESSING_FAILURE, "Processing failure; please retry")
        if self.on_stored is not None:
            self.on_stored()
        if outcome is not StoreOutcome.DUPLICATE:
            first = self.tracker.instance_received(
                obj.study_instance_uid,
                association,
                self.clock(),
                new=outcome is StoreOutcome.STORED,
            )
            if first and self.on_new_study is not None:
                self.on_new_study(obj.study_instance_uid)
        return status.SUCCESS

    def _store(self, obj: ReceivedObject, data: bytes, digest: str, peer: Peer) -> StoreOutcome:
        # A resent identical object is rewritten with the same bytes (atomic, harmless)
        # so that the common case costs one catalog transaction, not two.
        rel = self.spool.relative_path(
            obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid
        )
        self.spool.write(rel, data)
        recorded = self.catalog.record_instance(
            obj,
            site_key=site_key(self.site_tags, obj.tag_values(peer.calling_ae_title)),
            peer=peer,
            path=rel,
            size_bytes=len(data),
            sha256=digest,
        )
        if recorded.reopened:
            logger.info("study %s reopened by a late instance", obj.study_instance_uid)
        return recorded.outcome

    def _audit_failure(self, peer: Peer, obj: ReceivedObject, code: int, detail: str) -> None:
        try:
            self.catalog.audit(
                "failed",
                peer,
                status=code,
                study_instance_uid=obj.study_instance_uid,
                sop_instance_uid=obj.sop_instance_uid,
                detail=detail,
            )
        except SQLAlchemyError:
            logger.exception("could not write the audit event for a failed store")

    def refuse(
        self,
        problem: InvalidObject,
        data: bytes,
        peer: Peer,
        *,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
    ) -> Dataset:
        code = problem.problem.value
        logger.warning(
            "refused object from calling AE %s: %s (status 0x%04X)",
            peer.calling_ae_title,
            problem.detail,
            code,
        )
        reason = {
            "reason": problem.detail,
            "status": f"0x{code:04X}",
            "calling_ae_title": peer.calling_ae_title,
            "peer_host": peer.host,
            "affected_sop_class_uid": sop_class_uid,
            "affected_sop_instance_uid": sop_instance_uid,
            "received_at": datetime.now(UTC).isoformat(),
        }
        try:
            self.spool.check_free_space(len(data))
            kept = self.quarantine.put(data, reason)
            with self.sessions() as session:
                repository.record_quarantine(
                    session,
                    path=kept.relative_path,
                    size_bytes=kept.size_bytes,
                    reason=problem.detail,
                    status=code,
                    peer=peer,
                    sop_class_uid=sop_class_uid,
                    sop_instance_uid=sop_instance_uid,
                )
                session.commit()
        except (OSError, SQLAlchemyError, OutOfResources):
            logger.exception("could not quarantine a refused object")
        return status_dataset(code, problem.detail)
