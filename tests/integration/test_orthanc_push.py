"""A real Orthanc pushes a study to the node (C-STORE) and answers its count query (C-FIND)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from plugin.catalog import repository
from tests.integration.conftest import RunningNode
from tests.peers.data import ct_small_copies, rg1
from tests.peers.orthanc import OrthancServer

ORTHANC_AET = "ORTHANC"
NODE_AET = "PACSCLIP"
# Longer than the node's quiet period (0.5 s) plus a few completion checks (0.05 s).
SETTLE_S = 1.5
PADDING = 0xFFFCFFFC  # DataSetTrailingPadding
_PADDING_HEADER = b"\xfc\xff\xfc\xffOB\x00\x00"


def dataset_part(part10: bytes) -> bytes:
    """The bytes after the file meta group of a Part 10 file (preamble, DICM, group 0002)."""
    if part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file with a File Meta Information Group Length")
    # (0002,0000) UL, explicit VR: tag 4 + VR 2 + length 2 + value 4 bytes.
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length :]


def as_sent_by_dcmtk(part10: bytes) -> bytes:
    """The dataset part of an explicit VR LE Part 10 file as Orthanc puts it on the wire.

    Orthanc 1.10 (DCMTK underneath; DCMTK storescp receives the same) leaves out a trailing
    (FFFC,FFFC) Data Set Trailing Padding, of which CT_small has 138 bytes; every other byte
    goes out as stored.
    """
    dataset = dataset_part(part10)
    ds = pydicom.dcmread(BytesIO(part10))
    if PADDING not in ds:
        return dataset
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise ValueError("only explicit VR little endian padding is handled here")
    value = ds[PADDING].value
    element = _PADDING_HEADER + struct.pack("<I", len(value)) + value
    if not dataset.endswith(element):
        raise ValueError("the trailing padding is not the last element of the dataset")
    return dataset[: -len(element)]


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _upload_all(orthanc: OrthancServer, paths: list[Path]) -> None:
    for path in paths:
        answer = orthanc.upload(path)
        assert answer["Status"] == "Success", answer


def _detail(node: RunningNode, study_uid: str) -> dict[str, Any] | None:
    with node.sessions() as session:
        return repository.study_detail(session, study_uid)


def test_orthanc_pushes_a_study_byte_exact(
    tmp_path: Path, start_node: Callable[..., RunningNode]
) -> None:
    ct_files = ct_small_copies(3, tmp_path / "ct")
    study_uid = _study_uid(ct_files[0])
    other_study_uid = _study_uid(rg1("uncompressed"))
    node = start_node(allowed_callers=[ORTHANC_AET])

    with OrthancServer(
        aet=ORTHANC_AET,
        modalities={"pacsclip": (NODE_AET, "127.0.0.1", node.port)},
        workdir=tmp_path / "orthanc",
    ) as orthanc:
        _upload_all(orthanc, [*ct_files, rg1("uncompressed")])
        orthanc_id = orthanc.find_study(study_uid)
        assert orthanc_id is not None
        assert len(orthanc.studies()) == 2
        # Orthanc sends its stored file's dataset as is (not transcoded), less trailing padding.
        sent = {}
        for instance in orthanc.study_instances(orthanc_id):
            data = orthanc.instance_file(instance["ID"])
            sent[str(pydicom.dcmread(BytesIO(data)).SOPInstanceUID)] = data
        answer = orthanc.store_to_modality("pacsclip", [orthanc_id])
        assert answer["FailedInstancesCount"] == 0, answer
        assert answer["InstancesCount"] == 3, answer

    node.publisher.wait_for(1, timeout_s=10)
    time.sleep(SETTLE_S)  # a second completion for the same study would arrive in this time
    completions = [e for e in node.publisher.events if e.study_instance_uid == study_uid]
    # Orthanc pushes a study over one association: complete once it is released.
    assert [e.reason for e in completions] == ["association_released"]
    assert not completions[0].reanalysis

    detail = _detail(node, study_uid)
    assert detail is not None
    assert detail["instances"] == 3
    assert detail["state"] == "complete"
    assert detail["completion_reason"] == "association_released"
    assert detail["calling_ae_title"] == ORTHANC_AET
    assert _detail(node, other_study_uid) is None  # only the requested study was pushed

    [series] = detail["series"]
    spooled = {
        i["sop_instance_uid"]: (node.settings.spool_dir / i["path"]).read_bytes()
        for i in series["instances"]
    }
    assert spooled.keys() == sent.keys()
    for sop_uid, data in spooled.items():
        assert dataset_part(data) == as_sent_by_dcmtk(sent[sop_uid]), sop_uid
        received, original = pydicom.dcmread(BytesIO(data)), pydicom.dcmread(BytesIO(sent[sop_uid]))
        assert received.SOPInstanceUID == original.SOPInstanceUID == sop_uid
        assert received.file_meta.MediaStorageSOPInstanceUID == sop_uid
        assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert received.PixelData == original.PixelData

    with node.sessions() as session:
        assert len(repository.audit_events(session, event="stored")) == 3
        assert repository.audit_events(session, event="association_rejected") == []


def test_expected_count_from_orthanc_c_find(
    tmp_path: Path, start_node: Callable[..., RunningNode]
) -> None:
    ct_files = ct_small_copies(3, tmp_path / "ct")
    study_uid = _study_uid(ct_files[0])

    with OrthancServer(aet=ORTHANC_AET, workdir=tmp_path / "orthanc") as orthanc:
        _upload_all(orthanc, ct_files)
        # The quiet period cannot end within this test: only the count can complete the study.
        node = start_node(
            quiet_period_s=30,
            count_query_peer={
                "ae_title": ORTHANC_AET,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            },
        )
        # A declared modality may C-FIND Orthanc ("AllowFind" defaults to true per modality;
        # "DicomAlwaysAllowFind", for unknown AEs, defaults to false in Orthanc 1.10).
        orthanc.add_modality("pacsclip", NODE_AET, "127.0.0.1", node.port)
        orthanc_id = orthanc.find_study(study_uid)
        assert orthanc_id is not None
        started = time.monotonic()
        answer = orthanc.store_to_modality("pacsclip", [orthanc_id])
        assert answer["FailedInstancesCount"] == 0, answer
        [event] = node.publisher.wait_for(1, timeout_s=10)
        elapsed = time.monotonic() - started

    assert event.study_instance_uid == study_uid
    assert event.reason == "expected_count"
    assert elapsed < 10
    detail = _detail(node, study_uid)
    assert detail is not None
    assert detail["expected_instances"] == 3
    assert detail["instances"] == 3
    assert detail["state"] == "complete"
    assert detail["completion_reason"] == "expected_count"
