"""Shutdown's drain: wait for associations that are served, not for dead ones."""

from __future__ import annotations

import time
from typing import Any, cast

from dicom_node.receiving import ReusePortAssociationServer, drain
from tests.unit.test_association_limit import FakeAssociation


class DrainedAssociation(FakeAssociation):
    def __init__(self) -> None:
        super().__init__()
        self.aborted_blocking: list[bool] = []

    def abort(self, block: bool = True) -> None:
        self.aborted_blocking.append(block)
        self.reactor_dies()


class FakeServer:
    def __init__(self, *associations: Any) -> None:
        self.active_associations = list(associations)
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True


def run_drain(server: FakeServer, timeout_s: float) -> tuple[int, float]:
    started = time.monotonic()
    left = drain(cast(ReusePortAssociationServer, server), timeout_s)
    return left, time.monotonic() - started


def test_an_association_whose_reactor_died_does_not_hold_up_shutdown() -> None:
    # Found by the fuzzer: after malformed PDUs, dozens of such associations made the drain
    # wait its whole period and then abort each one for 0.1 s, past the supervisor's patience.
    dead = [DrainedAssociation() for _ in range(20)]
    for assoc in dead:
        assoc.reactor_dies()
    server = FakeServer(*dead)

    left, took = run_drain(server, timeout_s=5.0)

    assert server.shut_down
    assert left == 0
    assert took < 1.0
    assert all(a.aborted_blocking == [] for a in dead)


def test_a_served_association_is_waited_for_then_aborted_without_blocking() -> None:
    live = DrainedAssociation()
    server = FakeServer(live)

    left, took = run_drain(server, timeout_s=0.3)

    assert left == 1
    assert live.aborted_blocking == [False]
    assert 0.3 <= took < 2.0
