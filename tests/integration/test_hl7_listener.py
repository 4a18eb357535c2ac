"""``pacsclip hl7-listen`` as a real process on a free loopback port: ORU^R01 reports over MLLP
are kept, linked to their study (or kept waiting for it), labeled and acknowledged; other
messages are refused; SIGTERM stops it with exit code 0."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import ReportLabels, Site, Study, StudyReport, UnlinkedReport
from plugin.hl7_inbound.inbox import inbox_dir
from tests.peers.hl7_client import ACK_TIMEOUT_S, exchange, oru
from tests.peers.pacsclip_process import PacsclipProcess, pacsclip_env, wait_until
from tests.peers.ports import free_port

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

START_TIMEOUT_S = 180  # imports, the catalog and the labeler (medspacy) before it listens


ADT = (
    b"MSH|^~\\&|ADT|GENERAL|PACSCLIP|GENERAL|20250304050607||ADT^A01^ADT_A01|ADT-1|P|2.5\r"
    b"PID|1||PID-77^^^GENERAL||DOE^JANE\r"
)


def add_study(catalog: Catalog, accession: str) -> str:
    uid = generate_uid()
    with catalog.sessions.begin() as session:
        session.add(
            Study(
                study_instance_uid=uid,
                site=Site(key="GENERAL"),
                state="analysed",
                calling_ae_title="PACS",
                accession_number=accession,
            )
        )
    return uid


class Listener:
    def __init__(self, process: PacsclipProcess, port: int, data_dir: Path) -> None:
        self.process = process
        self.port = port
        self.data_dir = data_dir

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=ACK_TIMEOUT_S)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return open_catalog(f"sqlite:///{(data_dir / 'catalog.sqlite3').resolve()}")


@pytest.fixture
def listener(tmp_path: Path, catalog: Catalog) -> Iterator[Listener]:
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "hl7-listen.log"
    process = PacsclipProcess(
        ["hl7-listen", "--host", "127.0.0.1", "--port", str(port)],
        pacsclip_env({"PACSCLIP_DATA_DIR": str(data_dir), "PACSCLIP_LOG_LEVEL": "INFO"}),
        log,
    )
    process.start()
    try:
        wait_until(
            lambda: f"listening on 127.0.0.1:{port}" in log.read_text() or not process.alive(),
            START_TIMEOUT_S,
            "pacsclip hl7-listen listening",
        )
        assert process.alive(), log.read_text()[-4000:]
        yield Listener(process, port, data_dir)
    finally:
        process.stop(timeout_s=30)


def test_reports_over_mllp_are_kept_linked_labeled_and_acknowledged(
    listener: Listener, catalog: Catalog, tmp_path: Path
) -> None:
    study_uid = add_study(catalog, "ACC-100")
    known = oru("MSG-1", "ACC-100", "Large right pneumothorax.\\.br\\No pleural effusion.")
    unknown = oru("MSG-2", "ACC-404", "Heart size is normal.")

    with listener.connect() as conn:
        assert exchange(conn, known) == ("AA", "MSG-1", "")
        code, acked, text = exchange(conn, unknown)
        assert (code, acked) == ("AA", "MSG-2")
        assert text.startswith("waiting for study:")
        # Sent again (the sender did not see the ACK): acknowledged, stored once.
        assert exchange(conn, known) == ("AA", "MSG-1", "")
        assert exchange(conn, ADT)[:2] == ("AR", "ADT-1")
        assert exchange(conn, b"this is not HL7")[0] == "AR"
        assert "cannot parse" in exchange(conn, b"\x00\x01garbage|^~")[2]

    with catalog.sessions() as session:
        reports = session.scalars(select(StudyReport)).all()
        assert [(r.source, r.text) for r in reports] == [
            ("hl7", "Large right pneumothorax.\nNo pleural effusion.")
        ]
        assert session.get(Study, reports[0].study_id).study_instance_uid == study_uid
        labels = session.scalars(select(ReportLabels)).all()
        assert [row.report_id for row in labels] == [reports[0].id]
        assert labels[0].labels["pneumothorax"] == "present"
        assert labels[0].labels["pleural_effusion"] == "absent"
        waiting = session.scalars(select(UnlinkedReport)).all()
        assert [(w.source, w.accession_number, w.linked_at) for w in waiting] == [
            ("hl7", "ACC-404", None)
        ]

    kept = sorted(inbox_dir(listener.data_dir).glob("*.hl7"))
    assert sorted(p.read_bytes() for p in kept) == sorted(
        [known, unknown, known, ADT, b"this is not HL7", b"\x00\x01garbage|^~"]
    )
    assert [p.name.split("-", 1)[1] for p in kept[:4]] == [
        "MSG-1.hl7",
        "MSG-2.hl7",
        "MSG-1.hl7",
        "ADT-1.hl7",
    ]

    # Stopped by its PID while a sender keeps a quiet connection open: exit code 0.
    with listener.connect():
        assert listener.process.stop(timeout_s=30) == 0
    log = (tmp_path / "hl7-listen.log").read_text()
    assert "hl7 listener stopped" in log
    # What it logs of the messages: control ids and outcomes, not the patient or the text.
    for patient_data in ("ACC-100", "DOE", "PID-77", "Large right", "Heart size"):
        assert patient_data not in log


def test_a_report_over_the_size_limit_is_kept_refused_and_the_next_one_served(
    listener: Listener, catalog: Catalog, tmp_path: Path
) -> None:
    add_study(catalog, "ACC-200")
    large = oru("MSG-BIG", "ACC-200", "Large right pneumothorax. " + "x" * (2 << 20))
    after = oru("MSG-3", "ACC-200", "Small left pleural effusion.")

    with listener.connect() as conn:
        assert exchange(conn, large) == (
            "AR",
            "MSG-BIG",
            f"message of {len(large)} bytes is larger than the limit of 1048576 bytes",
        )
        assert exchange(conn, after) == ("AA", "MSG-3", "")

    inbox = inbox_dir(listener.data_dir)
    (oversize,) = inbox.glob("*.oversize.hl7")
    assert oversize.name.endswith("-MSG-BIG.oversize.hl7")
    assert oversize.read_bytes() == large
    assert [p.read_bytes() for p in inbox.glob("*-MSG-3.hl7")] == [after]
    with catalog.sessions() as session:
        texts = [r.text for r in session.scalars(select(StudyReport))]
        assert texts == ["Small left pleural effusion."]
    log = (tmp_path / "hl7-listen.log").read_text()
    assert f"{len(large)} bytes, over the limit of 1048576" in log
    assert "Large right" not in log and "DOE" not in log
