"""Durable file writes: a file is visible under its name only once its bytes are on disk."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync directory."""
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


FileStamp = tuple[int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """(inode, size, modification time in ns) of ``path``; None when it does not exist.

    A file written here is renamed over the old one, so every write changes its inode: two
    equal stamps mean the file was not rewritten in between. One ``stat``, nothing read.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
