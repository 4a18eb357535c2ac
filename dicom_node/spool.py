"""Durable files: the spool of accepted objects and the quarantine of refused ones.

A file becomes visible under its final name only after its bytes are fsynced, and
the directory entry is fsynced before the caller may answer Success.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from plugin.durable import fsync_dir, write_durably
from plugin.errors import OutOfResources

logger = logging.getLogger(__name__)

INCOMING = ".incoming"
_UID_NAME = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class SpooledFile:
    relative_path: str
    size_bytes: int


class Spool:
    """Accepted objects, filed as ``<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``."""

    def __init__(self, root: Path, *, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._incoming = root / INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        # The UIDs were validated already; checked again here (digits and dots, no empty
        # component) so that a name can never climb out of the spool if validation changes.
        # A pattern, not Path.resolve(): this runs for every instance received.
        uids = (study_uid, series_uid, sop_instance_uid)
        if not all(_UID_NAME.fullmatch(uid) for uid in uids):
            raise ValueError("spool path escapes the spool directory")
        return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def check_free_space(self, incoming_bytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfResources(
                f"free disk {free // 2**20} MiB is below the threshold "
                f"{self.min_free_bytes // 2**20} MiB"
            )

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._dirs_lock:
            missing = [p for p in (directory.parent, directory) if not p.exists()]
            directory.mkdir(parents=True, exist_ok=True)
            for created in missing:
                fsync_dir(created.parent)
            self._known_dirs.add(directory)

    def write(self, rel: str, data: bytes) -> SpooledFile:
        self.check_free_space(len(data))
        path = self.root / rel
        self._ensure_dir(path.parent)
        write_durably(path, data, self._incoming)
        return SpooledFile(rel, len(data))

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def files(self) -> list[str]:
        """Relative paths of every spooled object (for reconciliation after a crash)."""
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.glob("*/*/*.dcm")
            if not p.name.startswith(".")
        )

    def discard_incomplete(self) -> int:
        """Remove temp files of transfers that never got a Success; returns how many."""
        stale = list(self._incoming.glob("*.part"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


@dataclass(frozen=True)
class QuarantinedFile:
    relative_path: str
    size_bytes: int


class Quarantine:
    """Refused objects with a JSON sidecar giving the reason, for the operator."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._incoming = root / INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, reason: Mapping[str, object]) -> QuarantinedFile:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{uuid.uuid4().hex[:12]}"
        write_durably(
            self.root / f"{name}.json", json.dumps(reason, indent=2).encode(), self._incoming
        )
        write_durably(self.root / f"{name}.dcm", data, self._incoming)
        return QuarantinedFile(f"{name}.dcm", len(data))
