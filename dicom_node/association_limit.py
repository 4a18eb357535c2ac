"""The cap on concurrent associations, counted across every receiver process of the node.

The kernel spreads connections over the receiver processes by a hash, so one process may
hold most of them: a per-process cap would refuse associations while the node has room.
"""

from __future__ import annotations

from multiprocessing.sharedctypes import Synchronized


class AssociationLimit:
    def __init__(self, maximum: int, counter: Synchronized[int]) -> None:
        self.maximum = maximum
        self._counter = counter  # open connections, shared by the processes

    def opened(self) -> None:
        with self._counter.get_lock():
            self._counter.value += 1

    def closed(self) -> None:
        with self._counter.get_lock():
            self._counter.value -= 1

    def exceeded(self) -> bool:
        """True when the connections open now, the asking one included, are over the cap."""
        return self._counter.value > self.maximum
