"""Every HL7 message received, kept as it came before anything else is done with it.

``DATA_DIR/hl7/inbox/<UTC time>-<control id>.hl7``, the bytes between the MLLP start and end
blocks, written durably (temp file, fsync, rename, directory fsync) so that a message that was
answered is on disk, whatever the answer. A message that cannot be parsed is kept too: it is the
evidence for the sender's operators. The files hold patient data; the site's retention policy
says how long they stay (nothing here deletes them).
"""

from __future__ import annotations

import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Final

from plugin.durable import fsync_dir, write_durably

INCOMING: Final = ".incoming"
SUFFIX: Final = ".hl7"
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
        stem = file_name(received_at, control_id)
        with self._names:
            path = self.root / f"{stem}{SUFFIX}"
            n = 1
            while path.exists():
                n += 1
                path = self.root / f"{stem}-{n}{SUFFIX}"
            write_durably(path, raw, self._incoming)
        return path

    def messages(self) -> list[Path]:
        return sorted(self.root.glob(f"*{SUFFIX}"))

    def discard_incomplete(self) -> int:
        """Remove temp files of writes a crash interrupted (never answered); returns how many."""
        stale = list(self._incoming.glob("*.part"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)
