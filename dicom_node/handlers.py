"""pynetdicom event handlers: thin, with their dependencies bound at server start."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from io import BytesIO
from typing import cast

from pydicom import Dataset
from pynetdicom import events
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_node import status
from dicom_node.completion import CompletionTracker
from dicom_node.received import InvalidObject, inspect_dataset, read_header
from dicom_node.receiver import Receiver
from dicom_node.security import CallerPolicy
from plugin.catalog.records import Peer

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


def _peer(event: events.Event) -> Peer:
    requestor = event.assoc.requestor
    return Peer(calling_ae_title=requestor.ae_title.strip(), host=requestor.address)


def handle_echo(event: events.Event) -> int:
    return status.SUCCESS


def handle_store(event: events.Event, receiver: Receiver) -> int | Dataset:
    request = cast(C_STORE, event.request)
    peer = _peer(event)
    sop_class_uid = str(request.AffectedSOPClassUID)
    sop_instance_uid = str(request.AffectedSOPInstanceUID)
    transfer_syntax = event.context.transfer_syntax
    try:
        obj = inspect_dataset(
            lambda: read_header(cast(BytesIO, request.DataSet), transfer_syntax),
            requested_sop_class_uid=sop_class_uid,
            requested_sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=str(transfer_syntax),
        )
    except InvalidObject as problem:
        return receiver.refuse(
            problem,
            event.encoded_dataset(include_meta=True),
            peer,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
        )
    # The bytes as received, with a file meta header: no decode, no transcoding.
    return receiver.accept(obj, event.encoded_dataset(include_meta=True), peer, id(event.assoc))


def handle_association_request(
    event: events.Event, policy: CallerPolicy, record: Callable[[Peer], None]
) -> None:
    primitive = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
    calling = primitive.calling_ae_title.strip()
    peer = Peer(calling_ae_title=calling, host=event.assoc.requestor.address)
    if not policy.allows(calling, peer.host or ""):
        logger.warning("rejected association from calling AE %s at %s", calling, peer.host)
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is
        # on the wire before the server closes the socket.
        event.assoc.kill()
        record(peer)


def handle_connection_open(event: events.Event, tracker: CompletionTracker) -> None:
    # Responses are small writes; without TCP_NODELAY each one can wait for a delayed ACK.
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tracker.association_started(id(event.assoc))


def handle_connection_close(
    event: events.Event, tracker: CompletionTracker, clock: Callable[[], float]
) -> None:
    tracker.association_ended(id(event.assoc), clock())
