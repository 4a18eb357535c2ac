"""DICOM SEG from real images: one segment per present finding, dciodvfy, highdicom read-back."""

from __future__ import annotations

import dataclasses
import datetime
import io
import itertools
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from plugin.disclaimers import NOT_FOR_CLINICAL_USE, NOT_FOR_DIAGNOSIS
from plugin.results import (
    AlgorithmIdentity,
    FindingResult,
    ResultBuildError,
    StudyResult,
    tracking_uid,
)
from plugin.results.finding_codes import default_finding_code
from plugin.results.seg import build_segmentation, fill_outlines, segmented_findings
from plugin.results.study_result import box_outline
from tests.peers.data import rg1
from tests.unit.test_results_sr import _ct_small

WHEN = datetime.datetime(2026, 12, 6, 9, 30, 0)
DEMO = AlgorithmIdentity("pacsclip-demo", "0.1.0", synthetic=True)
TRIANGLE = ((10.0, 10.0), (60.0, 10.0), (10.0, 50.0), (10.0, 10.0))


@pytest.fixture(scope="module", params=["rg1", "ct_small"])
def source(request: pytest.FixtureRequest) -> Dataset:
    if request.param == "rg1":
        return pydicom.dcmread(rg1("uncompressed"), stop_before_pixels=True)
    return _ct_small()


def _finding(name: str, decision: str, source: Dataset, **changes: object) -> FindingResult:
    values: dict[str, object] = {
        "name": name,
        "display": name.replace("_", " ").capitalize(),
        "code": default_finding_code(name),
        "probability": 0.9 if decision == "present" else 0.1,
        "decision": decision,
        "threshold": 0.5,
        "source_sop_instance_uid": str(source.SOPInstanceUID),
    }
    values.update(changes)
    return FindingResult(**values)  # type: ignore[arg-type]


def _result(source: Dataset) -> StudyResult:
    return StudyResult(
        findings=[
            _finding("pneumothorax", "present", source, outlines=[TRIANGLE]),
            _finding(
                "support_devices",
                "present",
                source,
                outlines=[box_outline(70, 70, 89, 99), box_outline(100, 5, 110, 20)],
            ),
            # Absent, and present without a region: no segment for either.
            _finding("nodule", "absent", source, outlines=[box_outline(0, 0, 5, 5)]),
            _finding("cardiomegaly", "present", source, region_note="heat map points nowhere"),
        ],
        priority="stat",
        triggered_by=["pneumothorax"],
        algorithm=DEMO,
    )


def _build(source: Dataset, result: StudyResult) -> hd.seg.Segmentation:
    return build_segmentation(
        source,
        result,
        series_uid="1.2.826.0.1.3680043.10.1.1",
        sop_uid="1.2.826.0.1.3680043.10.1.2",
        series_number=9903,
        instance_number=1,
        content_datetime=WHEN,
    )


def _round_trip(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return hd.seg.segread(io.BytesIO(buffer.getvalue()))


def test_one_binary_segment_per_present_finding_with_a_region(source: Dataset) -> None:
    result = _result(source)

    seg = _round_trip(_build(source, result))

    assert seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID not in (source.SeriesInstanceUID,)
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Pneumothorax", "Support devices"]
    for segment, name in zip(seg.SegmentSequence, ["pneumothorax", "support_devices"], strict=True):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "pacsclip-demo"
        assert segment.TrackingID == name
        # The same tracking UID as the SR's measurement group: viewers link the two.
        assert segment.TrackingUID == tracking_uid(source.StudyInstanceUID, DEMO, name)
    pneumothorax, devices = seg.SegmentSequence
    assert pneumothorax.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
    assert pneumothorax.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert devices.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "260787004"
    # OHIF finds the source series through it.
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    assert "synthetic" in seg.SeriesDescription
    # Viewers colour segments as recommended; OHIF's loader needs the plane geometry, which
    # a radiograph without a frame of reference does not give highdicom.
    assert all("RecommendedDisplayCIELabValue" in s for s in seg.SegmentSequence)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert all("PlanePositionSequence" in f for f in seg.PerFrameFunctionalGroupsSequence)


def test_content_description_carries_the_model_cards_warning(source: Dataset) -> None:
    flagged = AlgorithmIdentity("chest-triage", "2.3.1", synthetic=False, not_for_clinical_use=True)
    plain = dataclasses.replace(flagged, not_for_clinical_use=False)

    seg = _round_trip(_build(source, dataclasses.replace(_result(source), algorithm=flagged)))
    clinical = _round_trip(_build(source, dataclasses.replace(_result(source), algorithm=plain)))

    assert seg.ContentDescription == f"{NOT_FOR_DIAGNOSIS}; {NOT_FOR_CLINICAL_USE}"
    assert clinical.ContentDescription == NOT_FOR_DIAGNOSIS


def test_segment_pixels_are_the_filled_outlines(source: Dataset) -> None:
    seg = _round_trip(_build(source, _result(source)))

    shape = (int(source.Rows), int(source.Columns))
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)[0]
    assert pixels.shape == (*shape, 2)
    triangle = pixels[..., 0].astype(bool)
    assert np.array_equal(triangle, fill_outlines([TRIANGLE], shape))
    assert triangle[15, 15] and not triangle[45, 45]  # inside / beyond the hypotenuse
    devices = pixels[..., 1].astype(bool)
    assert devices[80, 80] and devices[105, 10] and not devices[0, 0]
    # The box of rows 70..89, columns 70..99 fills exactly those pixels.
    assert devices[70:90, 70:100].all() and not devices[69, 80] and not devices[90, 80]


def test_fill_outlines_is_the_even_odd_rule_at_pixel_centres() -> None:
    rng = np.random.default_rng(3)
    shape = (48, 40)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres_x, centres_y = cols + 0.5, rows + 0.5
    for _ in range(60):
        outlines = []
        expected = np.zeros(shape, dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            # Random vertices, some on pixel edges and centres, some beyond the image.
            corners = rng.integers(-4, 2 * 52, size=(int(rng.integers(3, 9)), 2)) / 2
            closed = (*map(tuple, corners.tolist()), tuple(corners[0].tolist()))
            outlines.append(closed)
            # A centre is inside when an odd number of edges cross its row at or left of it.
            inside = np.zeros(shape, dtype=bool)
            for (x0, y0), (x1, y1) in itertools.pairwise(closed):
                crosses = (y0 <= centres_y) != (y1 <= centres_y)
                if y1 != y0:
                    x = x0 + (centres_y - y0) / (y1 - y0) * (x1 - x0)
                    inside ^= crosses & (x <= centres_x)
            expected |= inside

        assert np.array_equal(fill_outlines(outlines, shape), expected)


def test_dciodvfy_reports_no_error(source: Dataset, tmp_path: Path) -> None:
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    path = tmp_path / "seg.dcm"
    _build(source, _result(source)).save_as(path, enforce_file_format=True)

    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr

    assert "Segmentation" in output  # it recognised the IOD it checked against
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


def test_no_segmentation_without_a_present_finding_with_a_region(source: Dataset) -> None:
    result = StudyResult(
        findings=[
            _finding("nodule", "absent", source, outlines=[box_outline(0, 0, 5, 5)]),
            _finding("pneumothorax", "present", source),
        ],
        priority="routine",
        triggered_by=[],
        algorithm=DEMO,
    )

    assert segmented_findings(result, source) == []
    with pytest.raises(ResultBuildError, match="no present finding has a region"):
        _build(source, result)


def test_multi_frame_sources_are_refused() -> None:
    source = Dataset()
    source.update(_ct_small())
    source.NumberOfFrames = 3

    with pytest.raises(ResultBuildError, match="single-frame"):
        _build(source, _result(source))


def test_same_inputs_give_identical_bytes(source: Dataset) -> None:
    def encoded() -> bytes:
        buffer = io.BytesIO()
        _build(source, _result(source)).save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert encoded() == encoded()
