"""Every HL7 message received, kept as it came before anything else is done with it.

``DATA_DIR/hl7/inbox/<UTC time>-<control id>.hl7``, the bytes between the MLLP start and end
blocks, written durably (temp file, fsync, rename, directory fsync) so that a message that was
answered is on disk, whatever the answer. A message that cannot be parsed is kept too: it is the
evidence for the sender's operators. A message over the size limit is streamed to disk as it
arrives, at most a cap of bytes, and kept as ``...<control id>.oversize.hl7`` (whole) or
``...<control id>.oversize-truncated.hl7`` (its first cap bytes). The files hold patient data;
the site's retention policy says how long they stay (nothing here deletes them).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Final

from plugin.durable import fsync_dir, write_durably

INCOMING: Final = ".incoming"
SUFFIX: Final = ".hl7"
OVERSIZE_SUFFIX: Final = ".oversize.hl7"
TRUNCATED_SUFFIX: Final = ".oversize-truncated.hl7"
# Enough of a message's start to read its MSH without keeping the message in memory.
HEAD_BYTES: Final = 64 * 1024
NO_CONTROL_ID: Final = "no-control-id"
_NOT_IN_NAME: Final = re.compile(r"[^A-Za-z0-9._-]")
MAX_ID_CHARS: Final = 64


def inbox_dir(data_dir: Path) -> Path:
    return data_dir / "hl7" / "inbox"


def file_name(received_at: datetime, control_id: str) -> str:
    """``<UTC time to the microsecond>-<control id>``; the id reduced to letters, digits and
    ``._-`` so that no id can name a path outside the inbox."""
    safe = _NOT_IN_NAME.sub("_", control_id)[:MAX_ID_CHARS].lstrip(".") or NO_CONTROL_ID
    return f"{received_at.strftime('%Y%m%dT%H%M%S%fZ')}-{safe}"


class Inbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._incoming = root / INCOMING
        missing = [p for p in (root.parent, root, self._incoming) if not p.exists()]
        self._incoming.mkdir(parents=True, exist_ok=True)
        for created in missing:
            fsync_dir(created.parent)
        # A name is chosen and written under the lock: two messages with the same id in the
        # same microsecond (two connections) never share a name.
        self._names = threading.Lock()

    def keep(self, raw: bytes, control_id: str, received_at: datetime) -> Path:
        """Write one message durably and return its path (a second message with the same
        time and id gets ``-2``, ``-3``... rather than replacing the first)."""
        with self._names:
            path = self._free_path(file_name(received_at, control_id), SUFFIX)
            write_durably(path, raw, self._incoming)
        return path

    def receive_oversize(self, cap: int) -> OversizeMessage:
        """A temp file for a message over the size limit, to be written as it arrives."""
        return OversizeMessage(self._incoming / f"{uuid.uuid4().hex}.part", cap)

    def keep_oversize(
        self, message: OversizeMessage, control_id: str, received_at: datetime
    ) -> Path:
        """Make a received oversize message durable under its name in the inbox."""
        suffix = TRUNCATED_SUFFIX if message.truncated else OVERSIZE_SUFFIX
        with self._names:
            path = self._free_path(file_name(received_at, control_id), suffix)
            message.move_to(path)
        fsync_dir(path.parent)
        return path

    def _free_path(self, stem: str, suffix: str) -> Path:
        path = self.root / f"{stem}{suffix}"
        n = 1
        while path.exists():
            n += 1
            path = self.root / f"{stem}-{n}{suffix}"
        return path

    def messages(self) -> list[Path]:
        return sorted(self.root.glob(f"*{SUFFIX}"))

    def discard_incomplete(self) -> int:
        """Remove temp files of writes a crash interrupted (never answered); returns how many."""
        stale = list(self._incoming.glob("*.part"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


class OversizeMessage:
    """A message over the size limit, written to a temp file block by block as it arrives: the
    first ``cap`` bytes are stored, the rest only counted."""

    def __init__(self, tmp: Path, cap: int) -> None:
        self.cap = cap
        self.received = 0
        self.head = b""
        self._tmp = tmp
        self._fd: int | None = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        # Writes run in a worker thread; a reader cancelled meanwhile discards from the event
        # loop: the descriptor is closed only between writes, never under one.
        self._lock = threading.Lock()

    @property
    def stored(self) -> int:
        return min(self.received, self.cap)

    @property
    def truncated(self) -> bool:
        return self.received > self.cap

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                return
            if len(self.head) < HEAD_BYTES:
                self.head += data[: HEAD_BYTES - len(self.head)]
            view = memoryview(data)[: max(self.cap - self.received, 0)]
            while view:
                view = view[os.write(self._fd, view) :]
            self.received += len(data)

    def move_to(self, path: Path) -> None:
        with self._lock:
            if self._fd is None:
                raise FileNotFoundError(f"{self._tmp.name} was discarded")
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
            os.replace(self._tmp, path)

    def discard(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._tmp.unlink(missing_ok=True)
