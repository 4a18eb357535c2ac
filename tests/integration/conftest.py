"""A pacsclip DICOM node running in this process on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dicom_node.node import DicomNode
from dicom_node.publish import StudyCompleted
from plugin.catalog.db import open_catalog
from plugin.settings import Settings


class RecordingPublisher:
    """Test double for the worker queue: keeps every completion it is given."""

    def __init__(self) -> None:
        self.events: list[StudyCompleted] = []
        self._changed = threading.Condition()

    def publish(self, event: StudyCompleted) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 15) -> list[StudyCompleted]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.events) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.events)} completions, expected {count}")
                self._changed.wait(left)
            return list(self.events)


class RunningNode:
    def __init__(self, node: DicomNode, publisher: RecordingPublisher) -> None:
        self.node = node
        self.publisher = publisher
        self.settings = node.settings

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def sessions(self) -> Any:
        return self.node.sessions


@pytest.fixture
def start_node(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningNode]]:
    started: list[DicomNode] = []

    def start(settings: Settings | None = None, **overrides: Any) -> RunningNode:
        settings = settings or make_settings(**overrides)
        publisher = RecordingPublisher()
        node = DicomNode(
            settings, open_catalog(settings.effective_database_url), publisher=publisher
        )
        node.start()
        started.append(node)
        return RunningNode(node, publisher)

    yield start
    for node in started:
        node.stop()
