"""The node's cap on concurrent associations, and connections whose close never comes."""

from __future__ import annotations

import multiprocessing
import threading

from dicom_node.association_limit import AssociationLimit


class FakeAssociation:
    """An association as the limit sees it: its DUL thread."""

    def __init__(self) -> None:
        self._release = threading.Event()
        self.dul = threading.Thread(target=self._release.wait)
        self.dul.start()

    def reactor_dies(self) -> None:
        self._release.set()
        self.dul.join()


def test_the_cap_counts_open_connections() -> None:
    limit = AssociationLimit(2, multiprocessing.Value("i", 0))
    first, second, third = FakeAssociation(), FakeAssociation(), FakeAssociation()
    limit.opened(first)
    limit.opened(second)
    assert not limit.exceeded()
    limit.opened(third)
    assert limit.exceeded()
    limit.closed(third)
    assert not limit.exceeded()
    limit.closed(third)  # a second close of the same connection changes nothing
    limit.opened(third)
    assert limit.exceeded()
    for assoc in (first, second, third):
        assoc.reactor_dies()


def test_a_connection_whose_reactor_died_without_a_close_frees_its_place() -> None:
    # Found by the fuzzer: garbage PDUs can end pynetdicom's reactor thread with an invalid
    # event for its state; no connection-closed event follows, and 10 such connections made
    # the node refuse every sender until it was restarted.
    counter = multiprocessing.Value("i", 0)
    limit = AssociationLimit(1, counter)
    stuck, sender = FakeAssociation(), FakeAssociation()
    limit.opened(stuck)
    limit.opened(sender)
    assert limit.exceeded()

    stuck.reactor_dies()

    assert not limit.exceeded()
    assert counter.value == 1
    limit.closed(stuck)  # a late close is not counted twice
    assert counter.value == 1
    sender.reactor_dies()
