"""Where complete studies go: the interface the worker plugs its task queue into."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyCompleted:
    study_instance_uid: str
    site_key: str
    reason: str
    reanalysis: bool
    generation: int
    priority: str
    pipelines: tuple[str, ...]
    destinations: tuple[str, ...]


class CompletionPublisher(Protocol):
    def publish(self, event: StudyCompleted) -> None: ...


class LoggingPublisher:
    """Records completions in the log only; used when no worker queue is configured."""

    def publish(self, event: StudyCompleted) -> None:
        logger.info(
            "study complete study_uid=%s reason=%s priority=%s pipelines=%s reanalysis=%s",
            event.study_instance_uid,
            event.reason,
            event.priority,
            ",".join(event.pipelines) or "-",
            event.reanalysis,
        )
