from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.spool import Quarantine, Spool
from plugin.errors import OutOfResources


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0)
    rel = spool.relative_path("1.2", "1.2.3", "1.2.3.4")

    spooled = spool.write(rel, b"DICM-bytes")

    assert rel == "1.2/1.2.3/1.2.3.4.dcm"
    assert spool.read(rel) == b"DICM-bytes"
    assert spooled.size_bytes == 10
    assert spool.files() == [rel]
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_paths_cannot_leave_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)

    with pytest.raises(ValueError, match="escapes"):
        spool.relative_path("..", "..", "outside")


def test_full_disk_is_refused_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=2**62)

    with pytest.raises(OutOfResources, match="below the threshold"):
        spool.write("1/2/3.dcm", b"x")
    assert spool.files() == []


def test_incomplete_transfers_are_discarded_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0)
    (tmp_path / ".incoming" / "abc.part").write_bytes(b"half")

    assert spool.discard_incomplete() == 1
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_quarantine_keeps_the_object_and_its_reason(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path)

    kept = quarantine.put(b"bad bytes", {"reason": "StudyInstanceUID missing"})

    assert (tmp_path / kept.relative_path).read_bytes() == b"bad bytes"
    sidecar = (tmp_path / kept.relative_path).with_suffix(".json")
    assert json.loads(sidecar.read_text())["reason"] == "StudyInstanceUID missing"
