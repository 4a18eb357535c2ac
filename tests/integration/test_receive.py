"""Receiving over DICOM from real senders: DCMTK storescu/echoscu and pynetdicom as an SCU."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from plugin import dicom_status as status
from plugin.catalog import repository
from plugin.catalog.models import Instance, Study
from tests.integration.conftest import RunningNode
from tests.peers.data import ct_small_copies, rg1
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.ports import free_port

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))


def spooled(node: RunningNode) -> list[Path]:
    return sorted(node.settings.spool_dir.glob("*/*/*.dcm"))


def instance_count(node: RunningNode) -> int:
    with node.sessions() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def audited(node: RunningNode, count: int, event: str | None = None) -> list[str]:
    """The audit events once there are ``count`` of them: the node answers a C-STORE when
    the file is spooled and catalogs it (and audits) a few ms later."""
    deadline = time.monotonic() + 10
    while True:
        with node.sessions() as session:
            events = [e.event for e in repository.audit_events(session, event=event)]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def cli(node: RunningNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            PACSCLIP,
            "--data-dir",
            str(node.settings.data_dir),
            "--database-url",
            node.settings.effective_database_url,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_storescu_study_is_spooled_cataloged_and_completed(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    files = ct_small_copies(3, tmp_path / "src")

    result = storescu(files, "127.0.0.1", node.port, aec="PACSCLIP")

    assert result.statuses == [status.SUCCESS] * 3
    sent = {dcmread(f).SOPInstanceUID: dcmread(f) for f in files}
    stored = [dcmread(p) for p in spooled(node)]
    assert {ds.SOPInstanceUID for ds in stored} == set(sent)
    for ds in stored:
        assert ds.PixelData == sent[ds.SOPInstanceUID].PixelData
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    study_uid = stored[0].StudyInstanceUID
    [event] = node.publisher.wait_for(1)
    assert event.study_instance_uid == study_uid
    # One association brought the whole study: complete once it was released.
    assert event.reason == "association_released"
    assert event.reanalysis is False
    assert event.site_key == "STORESCU|JFK IMAGING CENTER"
    with node.sessions() as session:
        detail = repository.study_detail(session, study_uid)
    assert detail is not None
    assert detail["state"] == "complete"
    assert detail["instances"] == 3
    assert detail["routing"]["pipelines"] == ["triage"]


@pytest.mark.parametrize(
    ("encoding", "transfer_syntax", "extra"),
    [("uncompressed", ExplicitVRLittleEndian, ()), ("j2k", JPEG2000Lossless, ("-xv",))],
)
def test_real_chest_radiograph_arrives_intact(
    start_node: Callable[..., RunningNode],
    encoding: Any,
    transfer_syntax: str,
    extra: tuple[str, ...],
) -> None:
    node = start_node()
    source = rg1(encoding)

    result = storescu([source], "127.0.0.1", node.port, aec="PACSCLIP", extra_args=extra)

    assert result.statuses == [status.SUCCESS]
    [path] = spooled(node)
    stored, sent = dcmread(path), dcmread(source)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax  # stored as received
    assert stored.PixelData == sent.PixelData
    assert stored.SOPInstanceUID == sent.SOPInstanceUID


def test_echo_from_dcmtk_and_from_the_cli(start_node: Callable[..., RunningNode]) -> None:
    node = start_node()

    assert echoscu("127.0.0.1", node.port, aec="PACSCLIP").returncode == 0
    out = cli(node, "echo", "127.0.0.1", str(node.port), "--aec", "PACSCLIP")
    assert out.returncode == 0, out.stderr
    assert "success" in out.stdout


def test_unknown_calling_ae_is_rejected_and_audited(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(
        allowed_callers=["PACS1", {"ae_title": "PACS2", "host": "127.0.0.2"}],
    )
    files = ct_small_copies(1, tmp_path / "src")

    stranger = storescu(files, "127.0.0.1", node.port, aec="PACSCLIP", aet="STRANGER")
    wrong_host = storescu(files, "127.0.0.1", node.port, aec="PACSCLIP", aet="PACS2")
    allowed = storescu(files, "127.0.0.1", node.port, aec="PACSCLIP", aet="PACS1")

    assert stranger.association_rejected
    assert wrong_host.association_rejected
    assert allowed.statuses == [status.SUCCESS]
    audited(node, 3)  # two rejected associations, one stored instance
    assert instance_count(node) == 1
    with node.sessions() as session:
        rejected = repository.audit_events(session, event="association_rejected")
    assert [(e.calling_ae_title, e.peer_host) for e in rejected] == [
        ("STRANGER", "127.0.0.1"),
        ("PACS2", "127.0.0.1"),
    ]


def _echo_association(port: int, called: str) -> Any:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
    return assoc


def test_called_ae_title_is_checked_when_asked(start_node: Callable[..., RunningNode]) -> None:
    checking = start_node(check_called_ae_title=True)

    wrong = _echo_association(checking.port, "NOT-PACSCLIP")
    right = _echo_association(checking.port, "PACSCLIP")

    assert wrong.is_rejected
    rejection = wrong.acceptor.primitive
    # Rejected permanent, by the service user: called AE title not recognised.
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x07)
    assert right.is_released
    audited(checking, 1)
    with checking.sessions() as session:
        [rejected] = repository.audit_events(session, event="association_rejected")
    assert (rejected.calling_ae_title, rejected.detail) == (
        "PACS1",
        "called AE title 'NOT-PACSCLIP' not ours",
    )

    # Off by default: any called AE title is accepted, as before the setting existed.
    lenient = start_node(data_dir=checking.settings.data_dir.with_name("lenient"))
    assert _echo_association(lenient.port, "NOT-PACSCLIP").is_released


def _send_raw(port: int, path: Path, sop_class: str, sop_instance: str, data: bytes) -> Dataset:
    """C-STORE arbitrary dataset bytes: in chunked mode pynetdicom sends a file's dataset
    as it is, taking the SOP class and instance from the file meta header."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + data)
    ae = AE(ae_title="BADSENDER")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSCLIP")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def test_bad_objects_get_specific_status_and_are_quarantined(
    start_node: Callable[..., RunningNode], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = start_node()
    base = dcmread(ct_small_copies(1, tmp_path / "src")[0])
    base.file_meta = Dataset()
    base.preamble = None

    missing = copy.deepcopy(base)
    del missing.StudyInstanceUID
    invalid = copy.deepcopy(base)
    invalid.SeriesInstanceUID = "1.2.abc.3"
    mismatch = copy.deepcopy(base)  # a CT dataset sent as MR
    uid = str(base.SOPInstanceUID)

    cases = [
        (CTImageStorage, uid, _encoded(missing), status.MISSING_UID),
        (CTImageStorage, uid, _encoded(invalid), status.INVALID_UID),
        (MRImageStorage, uid, _encoded(mismatch), status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (CTImageStorage, uid, b"\x08\x00\x16\x00UI\xff\x7fgarbage", status.CANNOT_UNDERSTAND),
        (CTImageStorage, generate_uid(), _encoded(base), status.INSTANCE_UID_MISMATCH),
    ]
    answered = [
        _send_raw(node.port, tmp_path / f"bad{i}.dcm", *case[:3]).Status
        for i, case in enumerate(cases)
    ]

    assert answered == [case[3] for case in cases]
    assert spooled(node) == []
    assert len(audited(node, len(cases), event="rejected")) == len(cases)
    assert instance_count(node) == 0
    out = cli(node, "quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    assert sorted(e["status"] for e in entries) == sorted(f"0x{c[3]:04X}" for c in cases)
    reasons = " ".join(e["reason"] for e in entries)
    assert "StudyInstanceUID missing" in reasons
    assert "SeriesInstanceUID is not a valid UID" in reasons
    for entry in entries:
        kept = Path(entry["file"])
        assert kept.is_file()
        sidecar = json.loads(kept.with_suffix(".json").read_text())
        assert sidecar["reason"] == entry["reason"]
        assert entry["calling_ae_title"] == "BADSENDER"
    # The node is still serving after all of that.
    assert echoscu("127.0.0.1", node.port, aec="PACSCLIP").returncode == 0


def test_duplicate_is_idempotent_and_a_changed_copy_replaces_it(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    [original] = ct_small_copies(1, tmp_path / "src")
    changed = tmp_path / "changed.dcm"
    ds = dcmread(original)
    ds.PixelData = bytes([ds.PixelData[0] ^ 0xFF]) + ds.PixelData[1:]
    ds.save_as(changed)

    first = storescu([original], "127.0.0.1", node.port, aec="PACSCLIP")
    again = storescu([original], "127.0.0.1", node.port, aec="PACSCLIP")
    replaced = storescu([changed], "127.0.0.1", node.port, aec="PACSCLIP")

    assert first.statuses == again.statuses == replaced.statuses == [status.SUCCESS]
    audited(node, 3)
    assert instance_count(node) == 1
    [path] = spooled(node)
    assert dcmread(path).PixelData == ds.PixelData  # newest copy kept
    with node.sessions() as session:
        events = [e.event for e in repository.audit_events(session)]
        replacement = repository.audit_events(session, event="replaced")[0]
    assert events == ["stored", "duplicate", "replaced"]
    assert replacement.detail is not None and "replaced by" in replacement.detail


def test_low_disk_space_answers_out_of_resources_and_stores_nothing(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(min_free_disk_mb=10**9)
    files = ct_small_copies(1, tmp_path / "src")

    result = storescu(files, "127.0.0.1", node.port, aec="PACSCLIP")

    assert result.statuses == [status.OUT_OF_RESOURCES]
    assert spooled(node) == []
    assert audited(node, 1, event="failed") == ["failed"]
    assert instance_count(node) == 0


def test_late_instance_reopens_a_complete_study_for_reanalysis(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    first, late = ct_small_copies(2, tmp_path / "src")

    storescu([first], "127.0.0.1", node.port, aec="PACSCLIP")
    node.publisher.wait_for(1)
    storescu([late], "127.0.0.1", node.port, aec="PACSCLIP")
    events = node.publisher.wait_for(2)

    assert [e.reanalysis for e in events] == [False, True]
    assert events[0].study_instance_uid == events[1].study_instance_uid
    with node.sessions() as session:
        study = session.scalar(select(Study))
    assert study is not None
    assert study.state == "complete"
    assert study.needs_reanalysis is True


def test_studies_cli_lists_the_documented_json_shape(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    storescu(ct_small_copies(2, tmp_path / "src"), "127.0.0.1", node.port, aec="PACSCLIP")
    node.publisher.wait_for(1)

    listed = cli(node, "studies", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert {"study_instance_uid", "state", "site", "instances", "received_at", "priority"} <= set(
        row
    )
    assert row["instances"] == 2
    assert row["state"] == "complete"
    shown = cli(node, "studies", "show", row["study_instance_uid"], "--json")
    assert json.loads(shown.stdout)["series"][0]["modality"] == "CT"
    missing = cli(node, "studies", "show", "1.2.3")
    assert missing.returncode == 1
    assert "no study 1.2.3" in missing.stderr


def test_completion_waits_for_the_quiet_period(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(quiet_period_s=1.5, complete_on_release=False)
    sent_at = time.monotonic()
    storescu(ct_small_copies(1, tmp_path / "src"), "127.0.0.1", node.port, aec="PACSCLIP")

    node.publisher.wait_for(1)

    assert time.monotonic() - sent_at >= 1.5


@pytest.mark.parametrize("processes", [0, 3])
def test_associations_beyond_the_maximum_are_rejected(
    start_node: Callable[..., RunningNode], tmp_path: Path, processes: int
) -> None:
    # With receiver processes the cap holds for the node as a whole, whichever processes
    # the kernel hands the connections to.
    node = start_node(max_associations=2, receiver_processes=processes)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(CTImageStorage)
    held = [holder.associate("127.0.0.1", node.port, ae_title="PACSCLIP") for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    try:
        second = storescu(
            ct_small_copies(1, tmp_path / "src"), "127.0.0.1", node.port, aec="PACSCLIP"
        )
    finally:
        for assoc in held:
            assoc.release()

    assert second.association_rejected
    assert "local limit exceeded" in (second.stderr + second.stdout).lower()
    # Once the first association is gone the node accepts again.
    assert echoscu("127.0.0.1", node.port, aec="PACSCLIP").returncode == 0


def test_no_patient_data_reaches_the_log(
    start_node: Callable[..., RunningNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = start_node()
    [path] = ct_small_copies(1, tmp_path / "src")
    ds = dcmread(path)
    ds.PatientName = "Doe^Jane^Quincy"
    ds.PatientID = "MRN-99887766"
    ds.PatientBirthDate = "19310407"
    ds.save_as(path)
    refused = copy.deepcopy(ds)
    del refused.SeriesInstanceUID
    refused.save_as(tmp_path / "refused.dcm", enforce_file_format=True)

    storescu(
        [path, tmp_path / "refused.dcm"], "127.0.0.1", node.port, aec="PACSCLIP", extra_args=["-nh"]
    )
    node.publisher.wait_for(1)

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert ds.StudyInstanceUID in logged  # the log does say what happened
    for phi in ("Doe", "Jane", "MRN-99887766", "19310407"):
        assert phi not in logged


def test_unreachable_count_query_peer_is_logged_and_the_quiet_period_still_applies(
    start_node: Callable[..., RunningNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = {"ae_title": "NOPACS", "host": "127.0.0.1", "port": free_port()}
    node = start_node(count_query_peer=silent, complete_on_release=False)

    storescu(ct_small_copies(1, tmp_path / "src"), "127.0.0.1", node.port, aec="PACSCLIP")
    [event] = node.publisher.wait_for(1)

    assert event.reason == "quiet_period"
    assert "instance count query to NOPACS failed" in caplog.text
