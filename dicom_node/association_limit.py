"""The cap on concurrent associations, counted across every receiver process of the node.

The kernel spreads connections over the receiver processes by a hash, so one process may
hold most of them: a per-process cap would refuse associations while the node has room.
"""

from __future__ import annotations

import threading
from multiprocessing.sharedctypes import Synchronized
from typing import Any


class AssociationLimit:
    def __init__(self, maximum: int, counter: Synchronized[int]) -> None:
        self.maximum = maximum
        self._counter = counter  # open connections, shared by the processes
        # This process's connections, to release those whose connection-closed event never
        # comes: pynetdicom's reactor thread dies on some malformed PDUs (an invalid event for
        # its state) without closing the association, and each such connection would
        # otherwise hold a place until the node restarts.
        self._open: dict[int, Any] = {}
        self._lock = threading.Lock()

    def opened(self, assoc: Any) -> None:
        with self._lock:
            self._open[id(assoc)] = assoc
        with self._counter.get_lock():
            self._counter.value += 1

    def closed(self, assoc: Any) -> None:
        with self._lock:
            known = self._open.pop(id(assoc), None) is not None
        if known:
            with self._counter.get_lock():
                self._counter.value -= 1

    def exceeded(self) -> bool:
        """True when the connections open now, the asking one included, are over the cap."""
        self._release_dead()
        return self._counter.value > self.maximum

    def _release_dead(self) -> None:
        with self._lock:
            dead = [key for key, assoc in self._open.items() if reactor_died(assoc)]
            for key in dead:
                del self._open[key]
        if dead:
            with self._counter.get_lock():
                self._counter.value -= len(dead)


def reactor_died(assoc: Any) -> bool:
    """The association's DUL thread was started and has ended: nothing serves it any more."""
    dul = getattr(assoc, "dul", None)
    return dul is not None and dul.ident is not None and not dul.is_alive()
