"""Kill -9 of the node in the middle of an association: nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Instance, Study
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.ports import free_port

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))


class NodeProcess:
    """``pacsclip node`` as a real separate process, as an operator runs it."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "PACSCLIP_DATA_DIR": str(self.data_dir),
            "PACSCLIP_DICOM_HOST": "127.0.0.1",
            "PACSCLIP_DICOM_PORT": str(self.port),
            "PACSCLIP_QUIET_PERIOD_S": "0.5",
            "PACSCLIP_MIN_FREE_DISK_MB": "0",
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [PACSCLIP, "node"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while echoscu("127.0.0.1", self.port, aec="PACSCLIP").returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"node did not start; log:\n{self.log.read_text()}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path / "data", free_port(), tmp_path / "node.log")
    try:
        yield node
    finally:
        node.stop()


def test_kill_9_mid_association_loses_no_acknowledged_instance(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    files = ct_small_copies(200, tmp_path / "src")
    spool = node_process.data_dir / "spool"
    node_process.start()

    sender, finish = storescu(
        [tmp_path / "src"], "127.0.0.1", node_process.port, aec="PACSCLIP", popen=True
    )
    deadline = time.monotonic() + 60
    while len(list(spool.glob("*/*/*.dcm"))) < 60:
        assert time.monotonic() < deadline, "the node received too little to test a crash"
        assert sender.poll() is None, "storescu finished before the node could be killed"
        time.sleep(0.02)
    node_process.kill()
    result = finish()

    acknowledged = [path for path, code in result.sent if code == 0]
    # The last spooled file may not have been answered yet when the node died.
    assert 50 <= len(acknowledged) < len(files)
    assert result.returncode != 0  # the association broke off

    node_process.start()  # recovery runs before the node listens again
    node_process.stop()

    catalog = open_catalog(f"sqlite:///{node_process.data_dir / 'catalog.sqlite3'}")
    with catalog.sessions() as session:
        cataloged = {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}
        study = session.scalar(select(Study))
    assert study is not None
    for path in acknowledged:
        sent = dcmread(path)
        assert sent.SOPInstanceUID in cataloged, f"acknowledged {path.name} is not cataloged"
        stored = dcmread(spool / cataloged[sent.SOPInstanceUID])
        assert stored.PixelData == sent.PixelData
    # Nothing half-written is visible: every spooled file is whole and cataloged.
    on_disk = list(spool.glob("*/*/*.dcm"))
    assert len(on_disk) == len(cataloged)
    for path in on_disk:
        dcmread(path).PixelData  # noqa: B018 - reading all of it proves the file is whole
    assert list((spool / ".incoming").glob("*.part")) == []
