"""Secondary-capture overlay from real images: pixels, burned-in text, dciodvfy, determinism."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from plugin.disclaimers import NOT_FOR_CLINICAL_USE
from plugin.imaging import display_array
from plugin.results import (
    NOT_FOR_DIAGNOSIS,
    SYNTHETIC_MODEL,
    AlgorithmIdentity,
    FindingCode,
    FindingResult,
    ResultBuildError,
    ResultUids,
    StudyResult,
    build_overlay,
    overlay_text_lines,
    render_overlay,
)
from plugin.results.overlay import (
    HEAT_ALPHA,
    HEAT_FLOOR,
    OUTLINE_RGB,
    WARNING_RGB,
    colormap,
    output_shape,
    overlay_base,
    patient_orientation,
)
from tests.peers.data import rg1
from tests.unit.test_results_sr import PATIENT_AND_STUDY_TYPE2

WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
DEMO = AlgorithmIdentity("pacsclip-demo", "0.1.0", synthetic=True)
SITE_MODEL = AlgorithmIdentity("pacsclip-demo", "0.1.0", synthetic=False)
# Where the test heat map peaks, as fractions of (rows, columns): away from the text panel.
PEAK = (0.6, 0.7)


class Case:
    """A source image, its display rendering and a heat map with one hot plateau at PEAK."""

    def __init__(self, source: Dataset) -> None:
        self.source = source
        self.display = display_array(source)
        rows, cols = self.display.shape
        grid_rows, grid_cols = np.mgrid[0:rows, 0:cols]
        distance = ((grid_rows / rows - PEAK[0]) ** 2 + (grid_cols / cols - PEAK[1]) ** 2) ** 0.5
        # 1 within a radius of 0.05 of the image around PEAK, falling to 0 at 0.12.
        self.heat = np.clip((0.12 - distance) / 0.07, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module", params=["rg1", "ct_small"])
def case(request: pytest.FixtureRequest) -> Case:
    """The real chest radiograph RG1 (1955 x 1841, MONOCHROME1) and CT_small (128 x 128)."""
    if request.param == "rg1":
        return Case(pydicom.dcmread(rg1("uncompressed")))
    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's test file CT_small.dcm is not installed")
    return Case(pydicom.dcmread(path))


def _result(source: Dataset, algorithm: AlgorithmIdentity = DEMO) -> StudyResult:
    uid = str(source.SOPInstanceUID)
    findings = [
        FindingResult(
            name="pneumothorax",
            display="Pneumothorax",
            code=FindingCode("36118008", "SCT", "Pneumothorax"),
            probability=0.87,
            decision="present",
            threshold=0.5,
            source_sop_instance_uid=uid,
        ),
        FindingResult(
            name="cardiomegaly",
            display="Cardiomegaly",
            code=None,
            probability=0.12,
            decision="absent",
            threshold=0.4,
            source_sop_instance_uid=uid,
        ),
    ]
    return StudyResult(findings, "stat", ["pneumothorax"], algorithm)


def _build(case: Case, algorithm: AlgorithmIdentity = DEMO, **changes: Any) -> hd.sc.SCImage:
    uids = ResultUids(str(case.source.StudyInstanceUID), algorithm)
    values: dict[str, Any] = {
        "series_uid": uids.sc_series,
        "sop_uid": uids.sc_instance(0),
        "series_number": 9002,
        "instance_number": 1,
        "content_datetime": WHEN,
    }
    result = _result(case.source, algorithm)
    values.setdefault("finding", result.findings[0])
    values.update(changes)
    display = values.pop("display", case.display)
    return build_overlay(case.source, case.heat, result, display, **values)


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _round_trip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(_to_bytes(ds)))


def _is_grey(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    grey: npt.NDArray[np.bool_] = (pixels[..., 0] == pixels[..., 1]) & (
        pixels[..., 1] == pixels[..., 2]
    )
    return grey


def _warning_pixels(pixels: npt.NDArray[np.uint8]) -> int:
    return int(np.all(pixels == np.array(WARNING_RGB, dtype=np.uint8), axis=-1).sum())


def _panel_area(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The top-left corner where the text panel is drawn: the top 40 %, left 60 %."""
    rows, cols = pixels.shape[:2]
    return pixels[: rows * 2 // 5, : cols * 3 // 5]


def test_round_trip_is_an_rgb_secondary_capture_in_the_same_study(case: Case) -> None:
    sc = _round_trip(_build(case))

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == case.source.StudyInstanceUID
    assert sc.SeriesInstanceUID != case.source.SeriesInstanceUID
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
    assert sc.BurnedInAnnotation == "YES"
    assert "pacsclip-demo 0.1.0" in sc.SeriesDescription
    assert (sc.ManufacturerModelName, sc.SoftwareVersions) == ("pacsclip-demo", "0.1.0")
    assert NOT_FOR_DIAGNOSIS in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID
    assert "Laterality" in sc
    assert tuple(sc.PatientOrientation) == patient_orientation(case.source)
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_heat_map_colour_where_hot_and_grey_elsewhere(case: Case) -> None:
    pixels = _round_trip(_build(case)).pixel_array
    rows, cols = pixels.shape[:2]
    peak = pixels[int(PEAK[0] * rows), int(PEAK[1] * cols)].astype(float)

    # At the peak: HEAT_ALPHA of viridis' yellow end over the grey, so red and green clearly
    # exceed blue whatever the grey underneath.
    yellow = colormap(np.array(1.0))
    assert peak[0] - peak[2] >= HEAT_ALPHA * (yellow[0] - yellow[2]) - 1
    assert peak[1] - peak[2] >= HEAT_ALPHA * (yellow[1] - yellow[2]) - 1
    # Far from the hot spot (bottom-left quarter) the image is untouched grey.
    assert _is_grey(pixels[rows * 3 // 4 :, : cols // 4]).all()
    assert not _is_grey(pixels[int(PEAK[0] * rows) - 2 : int(PEAK[0] * rows) + 3]).all()


def test_grey_is_the_display_image(case: Case) -> None:
    pixels = _round_trip(_build(case)).pixel_array
    rows, cols = case.display.shape

    if pixels.shape[:2] == (rows, cols):
        expected = np.rint(case.display[-1, 0] * 255)
        assert pixels[-1, 0].tolist() == [expected] * 3
    else:  # enlarged small image: compare the mean of a grey corner
        corner = case.display[rows * 3 // 4 :, : cols // 4].mean() * 255
        out_rows, out_cols = pixels.shape[:2]
        assert pixels[out_rows * 3 // 4 :, : out_cols // 4, 0].mean() == pytest.approx(corner, 2)


def test_disclaimer_is_burned_in(case: Case) -> None:
    pixels = _round_trip(_build(case)).pixel_array

    # The disclaimer lines are drawn in the warning colour, which no grey pixel can have.
    assert _warning_pixels(_panel_area(pixels)) > 100
    assert _warning_pixels(pixels) == _warning_pixels(_panel_area(pixels))


def test_synthetic_flag_changes_the_burned_in_text(case: Case) -> None:
    demo = _round_trip(_build(case, DEMO)).pixel_array
    site = _round_trip(_build(case, SITE_MODEL)).pixel_array

    # One warning line more for the demo model: clearly more warning-coloured pixels.
    assert _warning_pixels(demo) > 1.5 * _warning_pixels(site) > 0
    assert not np.array_equal(_panel_area(demo), _panel_area(site))
    # Outside the panel the two overlays are the same picture.
    rows = demo.shape[0]
    assert np.array_equal(demo[rows // 2 :], site[rows // 2 :])


def test_text_lines_name_algorithm_findings_and_disclaimers() -> None:
    source = Dataset()
    source.SOPInstanceUID = "1.2.3"
    demo_lines = [text for text, _ in overlay_text_lines(_result(source, DEMO))]
    site_lines = [text for text, _ in overlay_text_lines(_result(source, SITE_MODEL))]

    assert demo_lines[0] == "pacsclip-demo 0.1.0"
    assert "Pneumothorax: p=0.87 (present)" in demo_lines
    assert "Cardiomegaly: p=0.12 (absent)" in demo_lines
    assert NOT_FOR_DIAGNOSIS in demo_lines and NOT_FOR_DIAGNOSIS in site_lines
    assert SYNTHETIC_MODEL in demo_lines
    assert SYNTHETIC_MODEL not in site_lines
    assert NOT_FOR_CLINICAL_USE not in demo_lines + site_lines


def test_a_bundle_not_for_clinical_use_says_so_on_the_overlay() -> None:
    source = Dataset()
    source.SOPInstanceUID = "1.2.3"
    flagged = dataclasses.replace(SITE_MODEL, not_for_clinical_use=True)

    lines = [text for text, _ in overlay_text_lines(_result(source, flagged))]

    assert NOT_FOR_DIAGNOSIS in lines
    assert NOT_FOR_CLINICAL_USE in lines
    assert SYNTHETIC_MODEL not in lines


def test_same_inputs_give_identical_bytes(case: Case) -> None:
    assert _to_bytes(_build(case)) == _to_bytes(_build(case))


def test_dciodvfy_reports_no_error(case: Case, tmp_path: Path) -> None:
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    path = tmp_path / "sc.dcm"
    path.write_bytes(_to_bytes(_build(case)))

    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr

    assert "SCImage" in output  # it recognised the IOD it checked against
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == []


def test_output_size_limits() -> None:
    assert output_shape(1955, 1841) == (1955, 1841)
    assert output_shape(4096, 3072) == (2048, 1536)
    assert output_shape(128, 128) == (512, 512)
    assert output_shape(100, 300) == (200, 600)


def test_large_image_is_downscaled() -> None:
    source = Dataset()
    source.update(pydicom.dcmread(rg1("uncompressed"), stop_before_pixels=True))
    source.Rows, source.Columns = 3000, 1000
    display = np.full((3000, 1000), 0.5, dtype=np.float32)

    sc = build_overlay(
        source,
        np.zeros_like(display),
        _result(source),
        display,
        finding=_result(source).findings[0],
        series_uid="1.2.3.1",
        sop_uid="1.2.3.2",
        series_number=1,
        instance_number=1,
        content_datetime=WHEN,
    )

    assert (sc.Rows, sc.Columns) == (2048, 683)


def test_orientation_from_the_source() -> None:
    radiograph = pydicom.dcmread(rg1("uncompressed"), stop_before_pixels=True)
    axial = Dataset()
    axial.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]

    assert patient_orientation(radiograph) == ("L", "F")
    assert patient_orientation(axial) == ("L", "P")
    assert patient_orientation(Dataset()) is None


def test_rejects_arrays_not_at_source_size(case: Case) -> None:
    with pytest.raises(ResultBuildError, match="shape"):
        build_overlay(
            case.source,
            case.heat[:-1],
            _result(case.source),
            case.display,
            finding=_result(case.source).findings[0],
            series_uid="1.2.3.1",
            sop_uid="1.2.3.2",
            series_number=1,
            instance_number=1,
            content_datetime=WHEN,
        )


def test_a_base_not_at_source_size_is_rejected(case: Case) -> None:
    with pytest.raises(ResultBuildError, match="shape"):
        _build(case, display=overlay_base(case.display[:-1]))


def test_overlays_from_a_shared_base_are_those_from_the_display_image(case: Case) -> None:
    base = overlay_base(case.display)
    grey_before = base.rgb.copy()
    other_heat = np.flipud(case.heat).copy()

    for heat in (case.heat, other_heat, case.heat):
        result = _result(case.source)
        shared = build_overlay(
            case.source, heat, result, base, **_overlay_values(case, result.findings[0])
        )
        own = build_overlay(
            case.source, heat, result, case.display, **_overlay_values(case, result.findings[0])
        )
        assert _to_bytes(shared) == _to_bytes(own)
    # Building overlays leaves the shared grey as it was, and it cannot be written to.
    assert np.array_equal(base.rgb, grey_before)
    assert not base.rgb.flags.writeable and not base.grey_255.flags.writeable


def test_the_colouring_is_the_blend_formula_at_every_pixel() -> None:
    rng = np.random.default_rng(7)
    grey = rng.random((600, 520)).astype(np.float32)
    heat = rng.random((600, 520)).astype(np.float32)
    heat[::7] = HEAT_FLOOR  # exactly at the floor: left grey
    heat[:, ::5] = 1.0
    source = Dataset()
    source.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"

    pixels = render_overlay(grey, heat, _result(source))

    # Per pixel, in float32: grey where heat <= floor, else the colour map over the grey
    # with alpha = HEAT_ALPHA * (heat - floor) / (1 - floor).
    grey_255 = grey * np.float32(255.0)
    alpha = (HEAT_ALPHA * np.minimum((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 1.0))[..., None]
    mixed = grey_255[..., None] * (np.float32(1.0) - alpha) + colormap(heat) * alpha
    expected = np.where(
        (heat > HEAT_FLOOR)[..., None],
        np.rint(mixed).clip(0, 255).astype(np.uint8),
        np.rint(grey_255).clip(0, 255).astype(np.uint8)[..., None],
    )
    below_panel = slice(300, None)  # the text panel covers part of the top left
    assert np.array_equal(pixels[below_panel], expected[below_panel])


def _overlay_values(case: Case, finding: FindingResult) -> dict[str, Any]:
    uids = ResultUids(str(case.source.StudyInstanceUID), DEMO)
    return {
        "finding": finding,
        "series_uid": uids.sc_series,
        "sop_uid": uids.sc_instance(0),
        "series_number": 9002,
        "instance_number": 1,
        "content_datetime": WHEN,
    }


def test_patient_names_stay_out_of_warnings_and_logs(
    case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    source = Dataset()
    source.update(case.source)
    source.PatientName = "Unmistakable"  # one component: highdicom warns, quoting it
    named = Case.__new__(Case)
    named.source, named.display, named.heat = source, case.display, case.heat

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(named)

    assert not [w for w in caught if "Unmistakable" in str(w.message)]
    assert "Unmistakable" not in caplog.text


@pytest.mark.parametrize(("orientation", "expected"), [(None, ""), (["LP", "FH"], ["LP", "FH"])])
def test_orientation_written_as_the_source_says(
    case: Case, tmp_path: Path, orientation: list[str] | None, expected: Any
) -> None:
    source = Dataset()
    source.update(case.source)
    source.pop("ImageOrientationPatient", None)
    source.PatientOrientation = orientation or ""
    odd = Case.__new__(Case)
    odd.source, odd.display, odd.heat = source, case.display, case.heat

    sc = _round_trip(_build(odd))

    assert sc.PatientOrientation == expected


def test_a_source_without_its_type2_patient_and_study_attributes_still_gets_an_overlay(
    case: Case,
) -> None:
    # Some devices leave these out; highdicom reads them from the source unconditionally.
    bare = copy.deepcopy(case.source)
    for keyword in PATIENT_AND_STUDY_TYPE2:
        if keyword in bare:
            delattr(bare, keyword)
    bare_case = Case(bare)

    sc = _round_trip(_build(bare_case))

    assert sc.StudyInstanceUID == case.source.StudyInstanceUID
    assert sc.PatientID == "" and sc.StudyDate == ""
    assert "PatientID" not in bare


def test_the_panel_names_the_mapped_finding_and_its_regions_are_outlined() -> None:
    path = get_testdata_file("CT_small.dcm")
    if not isinstance(path, str):
        pytest.skip("pydicom's test file CT_small.dcm is not installed")
    source = pydicom.dcmread(path)
    display = display_array(source)
    base = _result(source)
    outlined = dataclasses.replace(
        base.findings[0], outlines=[((40.0, 40.0), (80.0, 40.0), (80.0, 80.0), (40.0, 40.0))]
    )
    result = dataclasses.replace(base, findings=[outlined, base.findings[1]])
    heat = np.zeros_like(display)

    plain = render_overlay(display, heat, result)
    drawn = render_overlay(display, heat, result, outlined)

    lines = [text for text, _ in overlay_text_lines(result, outlined)]
    assert "heat map of: Pneumothorax (present, outlined)" in lines
    # CT_small is shown 4x (512 px): the outline's top edge runs along row 160, columns
    # 160-320, in the outline colour; the image without the finding has none of it.
    cyan = np.array(OUTLINE_RGB, dtype=np.uint8)
    assert (drawn[159:162, 200] == cyan).all(axis=-1).any()
    assert not (plain[159:162, 200] == cyan).all(axis=-1).any()
    assert not (drawn[300, 200] == cyan).all()  # inside the outline: the image, not a fill


def test_an_absent_finding_gets_no_overlay(case: Case) -> None:
    result = _result(case.source)

    with pytest.raises(ResultBuildError, match="absent"):
        _build(case, finding=result.findings[1])
