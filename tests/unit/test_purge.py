"""``pacsclip purge``: after it, no file under the data directory and no row of any table holds
the patient's ID or UIDs, while another patient's data is untouched. Studies arrive through
the DICOM node and are analysed by the worker's own code; reports, revisit scores, waiting
reports, a quarantined object, rendered images and HL7 messages are added as they would be."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from sqlalchemy import MetaData, create_engine, select
from typer.testing import CliRunner

from dicom_node.node import DicomNode
from dicom_node.publish import StudyCompleted
from dicom_node.spool import Quarantine
from plugin.catalog.db import open_catalog
from plugin.catalog.models import ReportLabels, RevisitScore, Study, UnlinkedReport
from plugin.catalog.records import Peer
from plugin.catalog.reports import add_report_embedding, keep_report
from plugin.catalog.repository import record_quarantine
from plugin.cli.main import app
from plugin.dashboard.images import PngCache
from plugin.demo.studies import write_demo_studies
from plugin.hl7_inbound.inbox import Inbox, inbox_dir
from plugin.retrieval.index import read_info
from plugin.retrieval.store import Kind
from plugin.settings import Settings
from tests.peers.postgres import scratch_database
from worker.tasks import WorkerContext

GONE = "PAT-PURGE-7731"
KEPT = "PAT-KEEP-4410"


class Completions:
    def __init__(self) -> None:
        self.events: list[StudyCompleted] = []
        self.changed = threading.Condition()

    def publish(self, event: StudyCompleted) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait_for(self, count: int) -> list[StudyCompleted]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.events) >= count, timeout=15):
                raise TimeoutError(f"{len(self.events)} studies complete, expected {count}")
            return list(self.events)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    with scratch_database("pacsclip_purge") as url:
        yield url


def hl7_report(patient_id: str, accession: str) -> bytes:
    segments = [
        "MSH|^~\\&|RIS|HOSP|PACSCLIP|HOSP|20261206120000||ORU^R01|CTRL-1|P|2.5",
        f"PID|1||{patient_id}^^^HOSP||DOE^JANE",
        f"OBR|1||{accession}|71020^CHEST XRAY",
        "OBX|1|TX|IMP^Impression||No acute findings.",
    ]
    return "\r".join(segments).encode() + b"\r"


def receive(settings: Settings, files: list[Path]) -> list[StudyCompleted]:
    """C-STORE the files to a node in this process and wait until every study is complete."""
    completions = Completions()
    node = DicomNode(settings, open_catalog(settings.effective_database_url), publisher=completions)
    node.start()
    try:
        ae = AE(ae_title="STORESCU")
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=settings.ae_title)
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()
        studies = len({dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in files})
        return completions.wait_for(studies)
    finally:
        node.stop()


def stored_everywhere(settings: Settings, tmp_path: Path) -> dict[str, list[str]]:
    """Three studies (two of GONE, one of KEPT) received, analysed, indexed, reported on,
    scored for revisit, rendered, with a quarantined object and HL7 messages; returns each
    patient's strings that must (not) survive a purge."""
    write_demo_studies(tmp_path / "demo", count=3, seed=11)
    files = sorted((tmp_path / "demo" / "studies").glob("*/*.dcm"))
    strings: dict[str, list[str]] = {GONE: [GONE], KEPT: [KEPT]}
    for n, path in enumerate(files):
        ds = dcmread(path)
        ds.PatientID = GONE if n < 2 else KEPT
        ds.save_as(path, enforce_file_format=True)
        strings[ds.PatientID] += [
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            ds.AccessionNumber,
        ]
    events = receive(settings, files)

    context = WorkerContext(settings)
    catalog = context.catalog
    for event in events:
        outcome = context.analyser.analyse(event.study_instance_uid, event.generation)
        assert outcome.created
        context.update_index()
    bundle = context.analyser.model.bundle
    dim = bundle.manifest.embedding_dim
    with catalog.sessions.begin() as session:
        for study in session.scalars(select(Study)):
            # A report as the intake keeps it: text, labels, a text-tower embedding.
            text = f"No acute findings. Patient {study.patient_id}."
            report_id, _ = keep_report(
                session, study.id, "api", sha256(text.encode()).hexdigest(), text
            )
            session.add(
                ReportLabels(
                    report_id=report_id, study_id=study.id, labeler_version="test",
                    labels={"effusion": "absent"},
                )
            )  # fmt: skip
            vector = np.random.default_rng(study.id).normal(size=dim).astype(np.float32)
            add_report_embedding(
                session, report_id, study.id, bundle.ref, vector / np.linalg.norm(vector)
            )
            session.add(
                RevisitScore(
                    study_id=study.id, encounter_id=f"ENC-{study.patient_id}", risk=0.7,
                    flagged=True, threshold=0.5, algorithm_name="revisit",
                    algorithm_version="1", method="test", triage_linked=[],
                )
            )  # fmt: skip
            session.add(
                UnlinkedReport(
                    source="hl7", accession_number=study.accession_number, digest=study.id * "0",
                    text="Addendum.", reason="waiting for its study",
                )
            )  # fmt: skip
    context.indexes.rebuild(Kind.REPORTS, bundle.ref, dim)
    quarantine = Quarantine(settings.quarantine_dir)
    refused = dcmread(files[0])
    refused.SOPInstanceUID = refused.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.999.1")
    strings[GONE].append("1.2.3.999.1")
    data = tmp_path / "refused.dcm"
    refused.save_as(data, enforce_file_format=True)
    put = quarantine.put(data.read_bytes(), {"reason": "test", "sop": "1.2.3.999.1"})
    with catalog.sessions.begin() as session:
        record_quarantine(
            session, path=put.relative_path, size_bytes=put.size_bytes, reason="test",
            status=0xA900, peer=Peer("STORESCU", "127.0.0.1"),
            sop_class_uid=str(refused.SOPClassUID), sop_instance_uid="1.2.3.999.1",
        )  # fmt: skip
    cache = PngCache(settings.data_dir / "dashboard-cache")
    for path in sorted(settings.spool_dir.glob("*/*/*.dcm")):
        cache.png(path, path.stem, 160)
    inbox = Inbox(inbox_dir(settings.data_dir))
    for patient in (GONE, KEPT):
        inbox.keep(hl7_report(patient, strings[patient][4]), "CTRL-1", datetime.now(UTC))
    # pacsclip's own result objects carry the patient's identity too.
    for patient in (GONE, KEPT):
        for study_uid in strings[patient][1::4]:
            for result in (settings.results_dir / study_uid).glob("*.dcm"):
                strings[patient].append(result.stem)
    return strings


def files_holding(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return found


def outside_catalog(found: list[str]) -> list[str]:
    """Files other than the SQLite catalog (whose log moves into the file at a purge)."""
    return [f for f in found if not f.startswith("catalog.sqlite3")]


def rows_holding(url: str, needles: list[str]) -> list[str]:
    """Every table of the database (reflected, not only pacsclip's models), every value."""
    engine = create_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    found = []
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(table.select()):
                for value in row:
                    text = value if isinstance(value, bytes) else str(value).encode()
                    found += [f"{table.name}: {n}" for n in needles if n.encode() in text]
    engine.dispose()
    return found


def index_sizes(data_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(data_dir)): read_info(p).count
        for p in sorted((data_dir / "retrieval").rglob("*.index"))
    }


def test_purge_by_patient_leaves_no_trace_and_spares_the_other_patient(
    make_settings: Callable[..., Settings], tmp_path: Path, database_url: str | None
) -> None:
    settings = make_settings(database_url=database_url, result_regions=False)
    strings = stored_everywhere(settings, tmp_path)
    url = settings.effective_database_url
    kept_before = outside_catalog(files_holding(settings.data_dir, strings[KEPT]))
    kept_rows = rows_holding(url, strings[KEPT])
    assert files_holding(settings.data_dir, strings[GONE])  # the scan sees what is there
    assert rows_holding(url, strings[GONE])
    sizes_before = index_sizes(settings.data_dir)
    assert sizes_before and all(count == 3 for count in sizes_before.values())
    env = {"PACSCLIP_DATA_DIR": str(settings.data_dir)}
    if database_url:
        env["PACSCLIP_DATABASE_URL"] = database_url
    runner = CliRunner()

    declined = runner.invoke(app, ["purge", "--patient-id", GONE], env=env, input="n\n")
    assert declined.exit_code == 1 and "cannot be undone" in declined.output
    assert rows_holding(url, [GONE])

    result = runner.invoke(app, ["purge", "--patient-id", GONE, "--yes"], env=env)

    assert result.exit_code == 0, result.output
    assert "purged 2 studies" in result.output
    assert files_holding(settings.data_dir, strings[GONE]) == []
    assert rows_holding(url, strings[GONE]) == []
    assert outside_catalog(files_holding(settings.data_dir, strings[KEPT])) == kept_before
    assert rows_holding(url, strings[KEPT]) == kept_rows
    assert {k: 1 for k in sizes_before} == index_sizes(settings.data_dir)
    catalog = open_catalog(url)
    with catalog.sessions() as session:
        kept = [(s.patient_id, s.state, len(s.series)) for s in session.scalars(select(Study))]
    assert kept == [(KEPT, "analysed", 1)]
    audit = runner.invoke(app, ["audit", "list", "--event", "purge", "--json"], env=env)
    assert audit.exit_code == 0, audit.output
    assert audit.output.count('"event": "purge"') == 1
    assert "by patient-id" in audit.output and "study=2" in audit.output

    again = runner.invoke(app, ["purge", "--patient-id", GONE, "--yes"], env=env)
    assert again.exit_code == 1 and "nothing was removed" in again.output

    # By study: the other patient's only study, with its report, HL7 message and index entries.
    study = runner.invoke(app, ["purge", "--study", strings[KEPT][1], "--yes", "--json"], env=env)
    assert study.exit_code == 0, study.output
    assert json.loads(study.output)["studies"] == 1
    assert files_holding(settings.data_dir, strings[KEPT]) == []
    assert rows_holding(url, strings[KEPT]) == []
    assert index_sizes(settings.data_dir) == {k: 0 for k in sizes_before}


def test_purge_refuses_without_exactly_one_selector(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    env: dict[str, Any] = {"PACSCLIP_DATA_DIR": str(settings.data_dir)}
    runner = CliRunner()
    neither = runner.invoke(app, ["purge", "--yes"], env=env)
    both = runner.invoke(app, ["purge", "--patient-id", "X", "--study", "1.2", "--yes"], env=env)
    unknown = runner.invoke(app, ["purge", "--study", "1.2.3", "--yes"], env=env)
    assert neither.exit_code == both.exit_code == 2
    assert "one of them" in neither.output
    assert unknown.exit_code == 1 and "nothing was removed" in unknown.output
