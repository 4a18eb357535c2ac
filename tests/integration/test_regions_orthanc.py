"""Regions in the results, through real processes into Orthanc: each present finding as a
TID 1500 planar ROI (tracking identifier and UID, SCOORD, NUM) and a segment of a DICOM SEG.

RG1 (a real chest radiograph, with the out-of-distribution guard off: the demo model was not
trained on it) and a synthetic demo study are pushed by Orthanc to pacsclip; the SR, the
overlays and the SEG come back into the same studies; dciodvfy and highdicom read them.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread

from plugin.demo.radiographs import demo_radiographs
from plugin.inference import TriageModel
from plugin.models.bundle import load_bundle
from plugin.models.registry import DEMO_BUNDLE_DIR
from plugin.results.sr import FREEHAND_ROI_PREFIX, PROBABILITY
from tests.integration.conftest import Pipeline
from tests.integration.test_e2e_orthanc import start_with_orthanc
from tests.peers.data import rg1
from tests.peers.orthanc import OrthancServer
from tests.peers.ports import free_port


def demo_study_with_present_findings(out: Path) -> tuple[Path, list[str]]:
    """A synthetic demo radiograph the demo model finds something on, and those findings."""
    model = TriageModel(load_bundle(DEMO_BUNDLE_DIR), threads=1, ood_guard=False)
    for ds in demo_radiographs(20, seed=7, stream=42, size=256):
        present = [
            f.name for f in model.triage([ds], saliency=False).findings if f.decision == "present"
        ]
        if present:
            path = out / "demo.dcm"
            ds.save_as(path, enforce_file_format=True)
            return path, present
    raise AssertionError("no demo radiograph of the first 20 has a present finding")


def study_objects(orthanc: OrthancServer, study_uid: str) -> dict[str, list[Dataset]]:
    study = orthanc.find_study(study_uid)
    assert study is not None
    objects: dict[str, list[Dataset]] = {}
    for instance in orthanc.study_instances(study):
        ds = dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
        objects.setdefault(str(ds.Modality), []).append(ds)
    return objects


def wait_for_results(
    orthanc: OrthancServer, study_uid: str, kinds: set[str], timeout_s: float = 120
) -> dict[str, list[Dataset]]:
    deadline = time.monotonic() + timeout_s
    found: dict[str, list[Dataset]] = {}
    while time.monotonic() < deadline:
        if orthanc.find_study(study_uid) is not None:
            found = study_objects(orthanc, study_uid)
            if kinds <= set(found):
                return found
        time.sleep(0.5)
    raise TimeoutError(f"Orthanc has {sorted(found)} for the study, expected {sorted(kinds)}")


def dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_present_findings_come_back_as_regions_and_segments(
    pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    demo_path, demo_present = demo_study_with_present_findings(tmp_path)
    node_port = free_port()
    modalities = {"pacsclip": ("PACSCLIP", "127.0.0.1", node_port)}
    with OrthancServer(modalities=modalities, workdir=tmp_path / "orthanc") as orthanc:
        run = start_with_orthanc(
            pipeline, orthanc, node_port, bundle=DEMO_BUNDLE_DIR, ood_guard=False
        )
        study_uids = []
        for path in (rg1(), demo_path):
            orthanc.upload(path)
            study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            study_id = orthanc.find_study(study_uid)
            assert study_id is not None
            orthanc.store_to_modality("pacsclip", [study_id])
            study_uids.append(study_uid)

        for study_uid in study_uids:
            run.wait_for_state(study_uid, "delivered", timeout_s=180)
            objects = wait_for_results(orthanc, study_uid, {"SR", "SEG", "OT"})
            check_results(objects, study_uid, tmp_path)
        # The demo study's present findings are those the demo model finds on its own.
        demo_objects = study_objects(orthanc, study_uids[1])
        [sr] = demo_objects["SR"]
        roi_names = [
            roi_name(g)
            for g in hd.sr.Comprehensive3DSR.from_dataset(
                sr
            ).content.get_planar_roi_measurement_groups()
        ]
        assert sorted(roi_names) == sorted(demo_present)


def check_results(objects: dict[str, list[Dataset]], study_uid: str, tmp_path: Path) -> None:
    [sr_ds] = objects["SR"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    rois = report.get_planar_roi_measurement_groups()
    assert rois, "no present finding has a region"
    # Only present findings with a region are measurement groups (OHIF draws none otherwise).
    assert not report.get_image_measurement_groups()
    present = set()
    for group in rois:
        name = roi_name(group)
        present.add(name)
        assert group.tracking_uid
        roi = group.roi
        assert roi is not None and roi.GraphicType == "POLYLINE"
        points = list(roi.GraphicData)
        assert len(points) >= 8 and points[:2] == points[-2:]  # closed, at least three corners
        [probability] = group.get_measurements(name=PROBABILITY)
        assert 0.5 <= probability.value <= 1.0
        assert probability.unit.value == "1"
    # Every present finding with a region is a segment of the SEG, with the same tracking UID.
    [seg_ds] = objects["SEG"]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    segments = {s.TrackingID: s.TrackingUID for s in seg.SegmentSequence}
    assert set(segments) == present
    for group in rois:
        assert segments[roi_name(group)] == group.tracking_uid
    assert seg.StudyInstanceUID == study_uid
    assert seg.SeriesInstanceUID != sr_ds.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    # One overlay per finding that is not absent: the groups and the report-level evaluations
    # that say Present or Undetermined.
    [evaluations] = [
        item
        for item in sr_ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    shown_elsewhere = [
        item
        for item in evaluations.ContentSequence
        if item.ValueType == "CODE"
        and item.ConceptCodeSequence[0].CodeMeaning in ("Present", "Undetermined")
    ]
    assert len(objects["OT"]) == len(rois) + len(shown_elsewhere)
    for name, ds in (("sr", sr_ds), ("seg", seg_ds)):
        assert dciodvfy_errors(ds, tmp_path / f"{study_uid[-12:]}-{name}.dcm") == []


def roi_name(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> str:
    return str(group.tracking_identifier).removeprefix(FREEHAND_ROI_PREFIX)
