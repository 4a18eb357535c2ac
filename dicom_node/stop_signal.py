"""SIGTERM and SIGINT as a flag that the main loop polls.

The handler only records the signal. Setting a threading or multiprocessing Event from a
handler takes the Event's lock, and a signal that lands while the main thread holds that
lock (inside ``Event.wait``) deadlocks the process: seen when a supervisor signals the node
and its receiver processes at once.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopSignal:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, *, sigint: bool = True) -> StopSignal:
        """Handle SIGTERM (and SIGINT, unless ``sigint`` is False: then it is ignored)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle if sigint else signal.SIG_IGN)
        return self

    @property
    def received(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
