"""pynetdicom event handlers: thin, with their dependencies bound at server start."""

from __future__ import annotations

import logging
import os
import socket
from io import BytesIO
from typing import cast

from pydicom import Dataset
from pynetdicom import events, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_node.association_limit import AssociationLimit
from dicom_node.intake import Receiver
from dicom_node.intake_events import (
    AssociationClosed,
    AssociationKey,
    AssociationOpened,
    AssociationRejected,
    EventSink,
)
from dicom_node.object_checks import InvalidObject, inspect_dataset, read_whole
from dicom_node.security import CallerPolicy
from plugin import dicom_status as status
from plugin.catalog.records import Peer

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
# A-ASSOCIATE-RJ: rejected-permanent, by the service user, called AE title not recognised.
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
# A-ASSOCIATE-RJ: rejected-transient, by the service provider, local limit exceeded.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


def association_key(event: events.Event) -> AssociationKey:
    return (os.getpid(), id(event.assoc))


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
            lambda: read_whole(cast(BytesIO, request.DataSet), transfer_syntax),
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
    return receiver.accept(
        obj, event.encoded_dataset(include_meta=True), peer, association_key(event)
    )


def handle_association_request(
    event: events.Event, policy: CallerPolicy, limit: AssociationLimit, sink: EventSink
) -> None:
    primitive = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
    calling = primitive.calling_ae_title.strip()
    peer = Peer(calling_ae_title=calling, host=event.assoc.requestor.address)
    if limit.exceeded():
        logger.warning(
            "rejected association from calling AE %s: %d associations open already",
            calling,
            limit.maximum,
        )
        _reject(event, REJECT_LOCAL_LIMIT)
        return
    if not policy.allows(calling, peer.host or ""):
        logger.warning("rejected association from calling AE %s at %s", calling, peer.host)
        _reject(event, REJECT_CALLING_AE)
        sink.put(AssociationRejected(peer))
        return
    called = primitive.called_ae_title.strip()
    if not policy.recognises_called(called):
        logger.warning(
            "rejected association from calling AE %s at %s: called AE title %s is not ours",
            calling,
            peer.host,
            called,
        )
        _reject(event, REJECT_CALLED_AE)
        sink.put(AssociationRejected(peer, detail=f"called AE title {called!r} not ours"))


def _reject(event: events.Event, reason: tuple[int, int, int]) -> None:
    event.assoc.acse.send_reject(*reason)
    # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is
    # on the wire before the server closes the socket.
    event.assoc.kill()


def handle_connection_open(event: events.Event, limit: AssociationLimit) -> None:
    limit.opened(event.assoc)
    # Responses are small writes; without TCP_NODELAY each one can wait for a delayed ACK.
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_accepted(event: events.Event, sink: EventSink) -> None:
    sink.put(AssociationOpened(association_key(event), _peer(event).calling_ae_title))


def handle_connection_close(event: events.Event, limit: AssociationLimit, sink: EventSink) -> None:
    limit.closed(event.assoc)
    # Also for associations never accepted: the node ignores keys it does not know.
    sink.put(AssociationClosed(association_key(event)))


def store_handlers(
    receiver: Receiver, policy: CallerPolicy, limit: AssociationLimit, sink: EventSink
) -> list[evt.EventHandlerType]:
    """The receiving side's handlers, bound to their dependencies."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_REQUESTED, handle_association_request, [policy, limit, sink]),
        (evt.EVT_CONN_OPEN, handle_connection_open, [limit]),
        (evt.EVT_ACCEPTED, handle_accepted, [sink]),
        (evt.EVT_CONN_CLOSE, handle_connection_close, [limit, sink]),
    ]
