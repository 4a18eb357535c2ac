"""Local validation through real processes: studies sent by DCMTK storescu, reports arriving as
SRs from Orthanc, as HL7 ORU^R01 messages to `pacsclip hl7-listen` and as a CSV, a shadow model
beside the live one, and `pacsclip validate`.

Nothing of the shadow model may reach the PACS: every object pacsclip stores into Orthanc names
the live model's version, none the shadow's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from plugin.catalog.db import open_catalog
from plugin.catalog.models import StudyReport
from plugin.demo.studies import write_demo_studies
from plugin.models.registry import builtin_bundle_dirs
from tests.integration.conftest import PACSCLIP, Pipeline, worker_env
from tests.peers.hl7_client import exchange, oru
from tests.peers.orthanc import OrthancServer
from tests.peers.pacsclip_process import PacsclipProcess, wait_until
from tests.peers.ports import free_port

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

STUDIES = 12
SHADOW_VERSION = "2026.12.0-shadow"


def report_sr(image: Path, text: str) -> Dataset:
    """A radiologist's report as a Basic Text SR from the PACS, in the study of ``image``."""
    source = dcmread(image, stop_before_pixels=True)
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = source.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.Manufacturer = "RIS vendor"
    ds.PatientID = source.PatientID  # Orthanc files a study under its patient
    ds.PatientName = source.PatientName
    ds.AccessionNumber = source.AccessionNumber
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "121071", "DCM"
    concept.CodeMeaning = "Finding"
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = [concept]
    finding.TextValue = text
    ds.ContentSequence = [finding]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def shadow_copy_of_demo(dest: Path) -> Path:
    shutil.copytree(builtin_bundle_dirs()[0], dest)
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["version"] = SHADOW_VERSION
    (dest / "bundle.json").write_text(json.dumps(manifest))
    return dest


def cli(run: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    env = worker_env(run.settings, run.bundle)
    env.update(PACSCLIP_VALIDATION_MIN_POSITIVES="2", PACSCLIP_VALIDATION_MIN_NEGATIVES="2")
    return subprocess.run(
        [PACSCLIP, *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_validate_reports_live_and_shadow_and_no_shadow_result_reaches_the_pacs(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    demo = builtin_bundle_dirs()[0]
    node_port = free_port()
    modalities = {"pacsclip": ("PACSCLIP", "127.0.0.1", node_port)}
    with OrthancServer(modalities=modalities, workdir=tmp_path / "orthanc") as orthanc:
        destination = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1"}
        run = pipeline(
            bundle=demo,
            dicom_port=node_port,
            destinations=[{**destination, "port": orthanc.dicom_port}],
        )
        for command in (
            ["model", "install", str(shadow_copy_of_demo(tmp_path / "shadow"))],
            ["model", "shadow", "pacsclip-demo", SHADOW_VERSION],
        ):
            done = cli(run, "--data-dir", str(run.settings.data_dir), *command)
            assert done.returncode == 0, done.stdout + done.stderr
        run.restart_worker()  # workers read the shadow list when they start

        demo_dir = tmp_path / "demo"
        write_demo_studies(demo_dir, count=STUDIES, seed=7, site=None, shift=None)
        sent = subprocess.run(
            ["/usr/bin/storescu", "+sd", "+r", "-aec", "PACSCLIP", "127.0.0.1", str(node_port),
             str(demo_dir / "studies")],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        reports = (demo_dir / "reports.csv").read_text().splitlines()[1:]
        uids = [line.split(",", 1)[0] for line in reports]
        for uid in uids:
            run.wait_for_state(uid, "delivered", timeout_s=120)

        # Three reports come from the PACS as SRs; the rest as a CSV export.
        for line in reports[:3]:
            uid, text = line.split(",", 1)
            sr = tmp_path / f"{uid}.sr.dcm"
            (image,) = (demo_dir / "studies" / uid).glob("*.dcm")
            report_sr(image, text).save_as(sr, enforce_file_format=True)
            stored = orthanc.upload(sr)
            orthanc.store_to_modality("pacsclip", [stored["ID"]])
        # Three more as HL7 ORU^R01 from the RIS, naming the study by its accession number.
        accessions = {
            row.split(",")[0]: row.split(",")[1]
            for row in (demo_dir / "truth.csv").read_text().splitlines()[1:]
        }
        hl7_port = free_port()
        hl7_log = tmp_path / "hl7-listen.log"
        listener = PacsclipProcess(
            ["hl7-listen", "--host", "127.0.0.1", "--port", str(hl7_port)],
            worker_env(run.settings, run.bundle),
            hl7_log,
        )
        listener.start()
        try:
            wait_until(
                lambda: (
                    f"listening on 127.0.0.1:{hl7_port}" in hl7_log.read_text()
                    or not listener.alive()
                ),
                180,
                "pacsclip hl7-listen listening",
            )
            with socket.create_connection(("127.0.0.1", hl7_port), timeout=60) as conn:
                for n, line in enumerate(reports[3:6]):
                    uid, text = line.split(",", 1)
                    code, control, _ = exchange(conn, oru(f"ORU{n}", accessions[uid], text))
                    assert (code, control) == ("AA", f"ORU{n}")
        finally:
            stopped = listener.stop(timeout_s=30)
        assert stopped == 0, hl7_log.read_text()[-3000:]
        csv_path = tmp_path / "rest.csv"
        csv_path.write_text("study_uid,text\n" + "\n".join(reports[6:]) + "\n")
        imported = cli(run, "--data-dir", str(run.settings.data_dir), "report", "import",
                       str(csv_path), "--json")  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["linked"] == STUDIES - 6

        sessions = open_catalog(run.settings.effective_database_url).sessions
        deadline = time.monotonic() + 120
        from_pacs = 0
        while time.monotonic() < deadline and from_pacs < 3:
            with sessions() as session:
                from_pacs = (
                    session.scalar(select(func.count()).where(StudyReport.source == "sr")) or 0
                )
            time.sleep(0.5)
        assert from_pacs == 3, f"{from_pacs} SR reports kept; worker log:\n{run.log.read_text()}"
        with sessions() as session:
            by_source = dict(
                session.execute(
                    select(StudyReport.source, func.count()).group_by(StudyReport.source)
                ).all()
            )
        assert by_source == {"sr": 3, "hl7": 3, "csv": STUDIES - 6}

        done = cli(run, "--data-dir", str(run.settings.data_dir), "validate", "--json")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        (site,) = answer["sites"]
        roles = {m["model"]: m["role"] for m in site["models"]}
        assert roles == {
            "pacsclip-demo@2026.11.1": "live",
            f"pacsclip-demo@{SHADOW_VERSION}": "shadow",
        }
        live, shadow = site["models"]
        assert live["studies"] == shadow["studies"] == STUDIES
        with_figures = [n for n, f in live["findings"].items() if f["enough"]]
        assert with_figures, live["findings"]
        for name in with_figures:
            # The same weights under another version: the same scores, a zero difference.
            assert shadow["findings"][name]["auroc"] == live["findings"][name]["auroc"]
            assert shadow["versus_live"][name]["auroc_difference"] == 0.0

        # Everything pacsclip stored into Orthanc names the live version, nothing the shadow's.
        ours = 0
        for uid in uids:
            for instance in orthanc.study_instances(orthanc.find_study(uid) or ""):
                data = orthanc.instance_file(instance["ID"])
                assert SHADOW_VERSION.encode() not in data
                if dcmread_manufacturer(data) == "pacsclip":
                    ours += 1
                    assert b"2026.11.1" in data
        assert ours >= STUDIES  # at least one SR per study from the live model


def dcmread_manufacturer(data: bytes) -> str:
    from io import BytesIO

    return str(dcmread(BytesIO(data), stop_before_pixels=True).get("Manufacturer", ""))
