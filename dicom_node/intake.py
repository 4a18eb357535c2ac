"""Accepting and refusing received objects: spool or quarantine, then tell the node.

The order is the durability promise: bytes fsynced to the spool (file, rename, directory),
then the event to the node's recorder, then Success. The spool is the journal: the recorder
catalogs in batches, and at start the node catalogs any spooled file the catalog lacks.
A refused object is quarantined with its reason.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom import Dataset

from dicom_node.intake_events import (
    AssociationKey,
    EventSink,
    InstanceSpooled,
    ObjectQuarantined,
    StoreFailed,
)
from dicom_node.object_checks import InvalidObject
from dicom_node.spool import Quarantine, Spool
from plugin import dicom_status as status
from plugin.catalog.records import Peer, ReceivedObject
from plugin.errors import OutOfResources

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
    events: EventSink

    def accept(
        self, obj: ReceivedObject, data: bytes, peer: Peer, association: AssociationKey | None
    ) -> int | Dataset:
        # A resent identical object is rewritten with the same bytes (atomic, harmless);
        # the recorder tells a duplicate from a replacement by the digest.
        try:
            rel = self.spool.relative_path(
                obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid
            )
            self.spool.write(rel, data)
        except OutOfResources as exc:
            logger.error("refused instance: %s (calling AE %s)", exc, peer.calling_ae_title)
            self._failed(peer, obj, status.OUT_OF_RESOURCES, str(exc))
            return status_dataset(status.OUT_OF_RESOURCES, "Out of resources: disk space low")
        except OSError as exc:
            logger.exception("spooling instance %s failed", obj.sop_instance_uid)
            self._failed(peer, obj, status.PROCESSING_FAILURE, type(exc).__name__)
            return status_dataset(status.PROCESSING_FAILURE, "Processing failure; please retry")
        self.events.put(
            InstanceSpooled(
                obj=obj,
                peer=peer,
                association=association,
                path=rel,
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        return status.SUCCESS

    def _failed(self, peer: Peer, obj: ReceivedObject, code: int, detail: str) -> None:
        self.events.put(
            StoreFailed(
                peer=peer,
                study_instance_uid=obj.study_instance_uid,
                sop_instance_uid=obj.sop_instance_uid,
                status=code,
                detail=detail,
            )
        )

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
        except (OSError, OutOfResources):
            logger.exception("could not quarantine a refused object")
        else:
            self.events.put(
                ObjectQuarantined(
                    path=kept.relative_path,
                    size_bytes=kept.size_bytes,
                    reason=problem.detail,
                    status=code,
                    peer=peer,
                    sop_class_uid=sop_class_uid,
                    sop_instance_uid=sop_instance_uid,
                )
            )
        return status_dataset(code, problem.detail)
