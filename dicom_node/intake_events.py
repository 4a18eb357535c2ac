"""What the receivers tell the node: plain, picklable events, in the order they happened.

A receiver (a thread of the node, or a receiver process) answers each C-STORE once the file
is durable in the spool, then sends one of these; the node's recorder writes them to the
catalog in batches and drives study completion from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from plugin.catalog.records import Peer, ReceivedObject

# (receiver process id, association object id): unique across the receiver processes.
AssociationKey = tuple[int, int]


@dataclass(frozen=True)
class AssociationOpened:
    association: AssociationKey
    calling_ae_title: str


@dataclass(frozen=True)
class AssociationClosed:
    association: AssociationKey


@dataclass(frozen=True)
class AssociationRejected:
    peer: Peer
    detail: str = "calling AE not allowed"


@dataclass(frozen=True)
class InstanceSpooled:
    obj: ReceivedObject
    peer: Peer
    association: AssociationKey | None
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ObjectQuarantined:
    path: str
    size_bytes: int
    reason: str
    status: int
    peer: Peer
    sop_class_uid: str | None
    sop_instance_uid: str | None


@dataclass(frozen=True)
class StoreFailed:
    peer: Peer
    study_instance_uid: str
    sop_instance_uid: str
    status: int
    detail: str


IntakeEvent = (
    AssociationOpened
    | AssociationClosed
    | AssociationRejected
    | InstanceSpooled
    | ObjectQuarantined
    | StoreFailed
)


class EventSink(Protocol):
    """A ``queue.Queue`` or a ``multiprocessing.Queue``."""

    def put(self, event: IntakeEvent) -> None: ...
