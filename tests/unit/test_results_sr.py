"""TID 1500 SR from real images: round trip, dciodvfy, dcsrdump/dsrdump, determinism, UIDs."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from plugin.disclaimers import NOT_FOR_CLINICAL_USE
from plugin.results import (
    NOT_FOR_DIAGNOSIS,
    SYNTHETIC_MODEL,
    AlgorithmIdentity,
    DistributionCheck,
    FindingCode,
    FindingResult,
    ResultBuildError,
    ResultUids,
    StudyResult,
    build_measurement_report,
    result_uid,
    tracking_uid,
)
from plugin.results.sr import FREEHAND_ROI_PREFIX, PROBABILITY, local_code_value
from plugin.results.study_result import box_outline
from tests.peers.data import rg1

WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
DEMO = AlgorithmIdentity("pacsclip-demo", "0.1.0", synthetic=True)
SITE_MODEL = AlgorithmIdentity("chest-triage", "2.3.1", synthetic=False)
PNEUMOTHORAX = FindingCode("36118008", "SCT", "Pneumothorax")
# CID 240 "Present-Absent": (code value, scheme) of each decision, spelled out so that a wrong
# table in the builder fails here.
DECISION_CODES = {
    "present": ("52101004", "SCT"),
    "absent": ("272519000", "SCT"),
    "indeterminate": ("373068000", "SCT"),
}


def _ct_small() -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's test file CT_small.dcm is not installed")
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture(scope="module", params=["rg1", "ct_small"])
def source(request: pytest.FixtureRequest) -> Dataset:
    """The headers of a real chest radiograph (RG1) and a real CT slice (CT_small)."""
    if request.param == "rg1":
        return pydicom.dcmread(rg1("uncompressed"), stop_before_pixels=True)
    return _ct_small()


def _finding(
    name: str, display: str, probability: float, decision: str, uid: str, **changes: Any
) -> FindingResult:
    values: dict[str, Any] = {
        "name": name,
        "display": display,
        "code": None,
        "probability": probability,
        "decision": decision,
        "threshold": 0.5,
        "source_sop_instance_uid": uid,
    }
    values.update(changes)
    return FindingResult(**values)


def _findings(source: Dataset) -> list[FindingResult]:
    uid = str(source.SOPInstanceUID)
    return [
        _finding(
            "pneumothorax",
            "Pneumothorax",
            0.87,
            "present",
            uid,
            code=PNEUMOTHORAX,
            outlines=[box_outline(10, 20, 60, 90)],
        ),
        _finding("cardiomegaly", "Cardiomegaly", 0.12, "absent", uid, threshold=0.4),
        _finding("pleural_effusion_left", "Left pleural effusion", 0.45, "indeterminate", uid),
    ]


def _result(source: Dataset, algorithm: AlgorithmIdentity = DEMO, **changes: Any) -> StudyResult:
    values: dict[str, Any] = {
        "findings": _findings(source),
        "priority": "stat",
        "triggered_by": ["pneumothorax"],
        "algorithm": algorithm,
        "similar_summary": "3 similar cases, 2 with pneumothorax",
    }
    values.update(changes)
    return StudyResult(**values)


def _build(source: Dataset, result: StudyResult, **changes: Any) -> hd.sr.Comprehensive3DSR:
    uids = ResultUids(str(source.StudyInstanceUID), result.algorithm)
    values: dict[str, Any] = {
        "series_uid": uids.sr_series,
        "sop_uid": uids.sr_instance,
        "series_number": 9001,
        "instance_number": 1,
        "content_datetime": WHEN,
    }
    values.update(changes)
    return build_measurement_report([source], result, **values)


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _round_trip(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(io.BytesIO(_to_bytes(ds)))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def _run_tool(name: str, path: Path) -> str:
    """stdout and stderr of a DICOM command-line tool; skip when it is not installed."""
    binary = shutil.which(name)
    if binary is None:
        pytest.skip(f"{name} is not installed (apt-get install dicom3tools dcmtk)")
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def _groups(sr: hd.sr.Comprehensive3DSR) -> dict[str, Any]:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    # Only present findings with a region are measurement groups, all of them planar ROIs.
    assert not report.get_image_measurement_groups()
    groups = report.get_planar_roi_measurement_groups()
    return {
        str(group.tracking_identifier).removeprefix(FREEHAND_ROI_PREFIX): group for group in groups
    }


def test_round_trip_keeps_study_and_makes_a_new_series(source: Dataset) -> None:
    sr = _round_trip(_build(source, _result(source)))

    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert "pacsclip-demo 0.1.0" in sr.SeriesDescription
    assert "not for diagnosis" in sr.SeriesDescription
    assert (sr.ManufacturerModelName, sr.SoftwareVersions) == ("pacsclip-demo", "0.1.0")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_a_group_per_present_finding_with_region_probability_and_tracking(
    source: Dataset,
) -> None:
    result = _result(source)
    sr = _round_trip(_build(source, result))
    groups = _groups(sr)

    present = [f for f in result.findings if f.decision == "present"]
    assert sorted(groups) == [f.name for f in present] == ["pneumothorax"]
    for finding in present:
        group = groups[finding.name]
        assert str(group.tracking_identifier) == f"{FREEHAND_ROI_PREFIX}{finding.name}"
        assert group.tracking_uid == tracking_uid(source.StudyInstanceUID, DEMO, finding.name)
        (probability,) = group.get_measurements(name=PROBABILITY)
        assert probability.value == pytest.approx(finding.probability)
        assert probability.unit.value == "1"
        (decision,) = group.get_qualitative_evaluations()
        assert (decision.value.value, decision.value.scheme_designator) == DECISION_CODES[
            finding.decision
        ]
        assert group.finding_type.meaning == (
            finding.code.meaning if finding.code else finding.display
        )
        # The region again under the NUM, for OHIF's measurement panel, and the group's title.
        [number] = [i for i in group[0].ContentSequence if i.ValueType == "NUM"]
        [inferred] = [i for i in number.ContentSequence if i.ValueType == "SCOORD"]
        assert inferred.RelationshipType == "INFERRED FROM"
        assert list(inferred.GraphicData) == list(group.roi.GraphicData)
        comments = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"]
        assert "Pneumothorax: probability 0.87 (present, decision threshold 0.50)" in comments


def test_findings_without_a_region_are_report_level_evaluations(source: Dataset) -> None:
    sr = _round_trip(_build(source, _result(source)))

    items = _report_evaluations(sr).ContentSequence
    decisions = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0].CodeMeaning
        for item in items
        if item.ValueType == "CODE"
    }
    assert decisions == {
        "Priority": "STAT",
        "Cardiomegaly": "Absent",
        "Left pleural effusion": "Undetermined",
    }
    texts = [str(item.TextValue) for item in items if item.ValueType == "TEXT"]
    assert "Cardiomegaly: probability 0.12 (absent, decision threshold 0.40)" in texts
    assert (
        "Left pleural effusion: probability 0.45 (undetermined, decision threshold 0.50)" in texts
    )


def test_algorithm_identification_in_every_group(source: Dataset) -> None:
    sr = _round_trip(_build(source, _result(source, SITE_MODEL)))

    for group in _groups(sr).values():
        texts = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT"
        }
        assert texts["Algorithm Name"] == "chest-triage"
        assert texts["Algorithm Version"] == "2.3.1"
        assert texts["Algorithm Parameters"].startswith("decision threshold")


def test_device_observer_is_the_algorithm(source: Dataset) -> None:
    sr = _round_trip(_build(source, _result(source)))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)

    (observer,) = report.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # DCM Device
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == "pacsclip-demo"
    assert attributes.manufacturer_name == "pacsclip"


def test_region_is_a_closed_polyline_selected_from_the_source(source: Dataset) -> None:
    groups = _groups(_round_trip(_build(source, _result(source))))

    roi = groups["pneumothorax"].roi
    assert roi is not None
    assert roi.GraphicType == "POLYLINE"
    # Box rows 10..60, columns 20..90 inclusive: (column, row) corners of the pixels' edges.
    assert list(roi.GraphicData) == [20, 10, 91, 10, 91, 61, 20, 61, 20, 10]
    reference = roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_full_evidence_and_source_image_references(source: Dataset) -> None:
    sr = _round_trip(_build(source, _result(source)))

    assert sr.get_evidence() == [
        (
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
            source.SOPInstanceUID,
            source.SOPClassUID,
        )
    ]
    roi = _groups(sr)["pneumothorax"].roi
    assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )


def _report_evaluations(sr: Dataset) -> Dataset:
    container: Dataset
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    return container


@pytest.mark.parametrize(("priority", "code_value"), [("stat", "STAT"), ("routine", "ROUTINE")])
def test_priority_is_a_report_level_evaluation(priority: str, code_value: str) -> None:
    source = _ct_small()
    triggers = ["pneumothorax"] if priority == "stat" else []
    sr = _round_trip(_build(source, _result(source, priority=priority, triggered_by=triggers)))

    codes = [
        item
        for item in _report_evaluations(sr).ContentSequence
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Priority"
    ]
    (priority_item,) = codes
    assert priority_item.ConceptNameCodeSequence[0].CodeMeaning == "Priority"
    assert priority_item.ConceptCodeSequence[0].CodeValue == code_value
    assert priority_item.ConceptCodeSequence[0].CodingSchemeDesignator == "99PACSCLIP"


@pytest.mark.parametrize(
    ("synthetic", "not_for_clinical_use"), [(True, True), (False, True), (False, False)]
)
def test_disclaimers_in_the_report(synthetic: bool, not_for_clinical_use: bool) -> None:
    source = _ct_small()
    algorithm = AlgorithmIdentity(
        "pacsclip-demo", "0.1.0", synthetic=synthetic, not_for_clinical_use=not_for_clinical_use
    )
    sr = _round_trip(_build(source, _result(source, algorithm)))

    texts = [
        item.TextValue for item in _report_evaluations(sr).ContentSequence if "TextValue" in item
    ]
    assert NOT_FOR_DIAGNOSIS in texts
    assert (SYNTHETIC_MODEL in texts) is synthetic
    # The demo keeps its own wording; a real bundle flagged by its model card gets the line.
    assert (NOT_FOR_CLINICAL_USE in texts) is (not_for_clinical_use and not synthetic)
    assert ("synthetic" in sr.SeriesDescription) is synthetic
    assert "Similar cases: 3 similar cases, 2 with pneumothorax" in texts


def test_predecessor_is_referenced_on_reanalysis() -> None:
    source = _ct_small()
    first = _build(source, _result(source))
    again = ResultUids(str(source.StudyInstanceUID), DEMO, generation=1)

    second = _round_trip(
        _build(
            source,
            _result(source),
            series_uid=again.sr_series,
            sop_uid=again.sr_instance,
            predecessor=first,
        )
    )

    (study,) = second.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID


def test_same_inputs_give_identical_bytes(source: Dataset) -> None:
    first = _to_bytes(_build(source, _result(source)))
    second = _to_bytes(_build(source, _result(source)))

    assert first == second
    other_time = _build(source, _result(source), content_datetime=WHEN + datetime.timedelta(1))
    assert _to_bytes(other_time) != first


def test_dciodvfy_reports_no_error(source: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(_to_bytes(_build(source, _result(source))))

    output = _run_tool("dciodvfy", path)

    assert "Comprehensive3DSR" in output  # it recognised the IOD it checked against
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == []


@pytest.mark.parametrize("tool", ["dcsrdump", "dsrdump"])
def test_sr_dump_shows_the_tree_with_the_findings(tool: str, tmp_path: Path) -> None:
    source = pydicom.dcmread(rg1("uncompressed"), stop_before_pixels=True)
    path = tmp_path / "sr.dcm"
    path.write_bytes(_to_bytes(_build(source, _result(source))))

    tree = _run_tool(tool, path)

    for name in (
        "Imaging Measurement Report",
        "Pneumothorax",
        "Cardiomegaly",
        "Left pleural effusion",
        "Probability",
        "Qualitative Evaluations",
    ):
        assert name in tree, f"{tool} output lacks {name!r}"
    assert "Error" not in tree


def test_rejects_a_finding_on_an_image_not_given() -> None:
    source = _ct_small()
    stray = _finding("x", "X", 0.3, "absent", "1.2.3.4")

    with pytest.raises(ResultBuildError, match="not in the sources"):
        _build(source, _result(source, findings=[stray]))


def test_rejects_a_region_outside_the_image() -> None:
    source = _ct_small()  # 128 x 128
    outside = _finding(
        "x", "X", 0.9, "present", source.SOPInstanceUID, outlines=[box_outline(0, 0, 128, 10)]
    )

    with pytest.raises(ResultBuildError, match="outside"):
        _build(source, _result(source, findings=[outside]))


def test_rejects_sources_from_two_studies() -> None:
    source = _ct_small()
    other = Dataset()
    other.update(source)
    other.StudyInstanceUID = "1.2.3"

    with pytest.raises(ResultBuildError, match="2 studies"):
        build_measurement_report(
            [source, other],
            _result(source),
            series_uid="1.2.3.1",
            sop_uid="1.2.3.2",
            series_number=1,
            instance_number=1,
            content_datetime=WHEN,
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("probability", 1.2),
        ("threshold", -0.1),
        ("decision", "maybe"),
        ("outlines", [((0.0, 0.0), (4.0, 0.0), (4.0, 4.0))]),
    ],
)
def test_invalid_findings_are_refused(field: str, value: Any) -> None:
    valid = _finding("x", "X", 0.5, "absent", "1.2.3")

    with pytest.raises(ResultBuildError):
        dataclasses.replace(valid, **{field: value})


def test_long_finding_names_get_short_distinct_code_values() -> None:
    first, second = (
        local_code_value("pleural_effusion_left"),
        local_code_value("pleural_effusion_right"),
    )

    assert len(first) <= 16 and len(second) <= 16
    assert first != second
    assert local_code_value("cardiomegaly") == "cardiomegaly"


# --- deterministic UIDs --------------------------------------------------------------------


def test_result_uids_are_stable_across_calls() -> None:
    first = ResultUids("1.2.3.4", DEMO)
    second = ResultUids("1.2.3.4", AlgorithmIdentity("pacsclip-demo", "0.1.0", synthetic=True))

    assert first.sr_instance == second.sr_instance
    assert first.sc_instance(0) == second.sc_instance(0)
    assert result_uid("1.2.3.4", "m", "1", "sr-instance") == result_uid(
        "1.2.3.4", "m", "1", "sr-instance"
    )


def test_result_uids_differ_by_generation_role_study_and_version() -> None:
    base = result_uid("1.2.3.4", "m", "1", "sr-instance")
    others = [
        result_uid("1.2.3.4", "m", "1", "sr-instance", generation=1),
        result_uid("1.2.3.4", "m", "1", "sr-series"),
        result_uid("1.2.3.4", "m", "1", "sr-instance", 1),
        result_uid("1.2.3.4", "m", "1", "sc-instance"),
        result_uid("1.2.3.5", "m", "1", "sr-instance"),
        result_uid("1.2.3.4", "m", "2", "sr-instance"),
        # Concatenation would make these two equal; the serialised inputs keep them apart.
        result_uid("1.2.3.4", "m1", "", "sr-instance"),
    ]
    assert len({base, *others}) == len(others) + 1


def test_result_uids_are_valid_uuid_derived_uids() -> None:
    uid = ResultUids("1.2.3.4", DEMO, generation=3).sr_instance

    assert uid.is_valid and len(uid) <= 64
    two, twenty_five, number = uid.split(".")
    assert (two, twenty_five) == ("2", "25")
    assert uuid.UUID(int=int(number)).version == 5  # a real UUID: below 2**128, name-based


def test_tracking_uid_is_per_finding_and_not_per_generation() -> None:
    assert tracking_uid("1.2.3", DEMO, "a") == tracking_uid("1.2.3", DEMO, "a")
    assert tracking_uid("1.2.3", DEMO, "a") != tracking_uid("1.2.3", DEMO, "b")


def test_patient_names_stay_out_of_warnings_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    source = _ct_small()
    source.PatientName = "Unmistakable"  # one component: highdicom warns, quoting it

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(source, _result(source))

    assert not [w for w in caught if "Unmistakable" in str(w.message)]
    assert "Unmistakable" not in caplog.text


# --------------------------------------------------------------------------- out of distribution


def _not_scored(source: Dataset) -> StudyResult:
    check = DistributionCheck(
        method="mahalanobis",
        distance=31.5,
        threshold=14.25,
        images=1,
        images_outside=1,
        scored=False,
    )
    return StudyResult(
        findings=[], priority="not_scored", triggered_by=[], algorithm=DEMO, distribution=check
    )


def _texts(sr: hd.sr.Comprehensive3DSR) -> list[str]:
    """Every TEXT value of the report-level Qualitative Evaluations."""
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    return [str(item.TextValue) for item in container.ContentSequence if "TextValue" in item]


def test_a_study_out_of_distribution_is_reported_as_not_scored(source: Dataset) -> None:
    sr = _round_trip(_build(source, _not_scored(source)))

    texts = _texts(sr)
    [statement] = [t for t in texts if t.startswith("Out of distribution")]
    assert statement.startswith("Out of distribution for model pacsclip-demo version 0.1.0:")
    assert "findings not scored" in statement
    assert SYNTHETIC_MODEL in texts and NOT_FOR_DIAGNOSIS in texts
    assert "study distance 31.5" in statement
    # No measurement group at all (a viewer draws nothing), no probability anywhere.
    assert _groups(sr) == {}
    assert "126010" not in [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence]
    evaluations = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0].CodeMeaning
        for item in sr.ContentSequence[-1].ContentSequence
        if "ConceptCodeSequence" in item
    }
    assert evaluations == {"Priority": "Not scored", "Model applicability": "Out of distribution"}


def test_the_not_scored_sr_passes_dciodvfy(tmp_path: Path) -> None:
    source = _ct_small()
    path = tmp_path / "sr.dcm"
    path.write_bytes(_to_bytes(_build(source, _not_scored(source))))

    output = _run_tool("dciodvfy", path)

    assert "Comprehensive3DSR" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


def test_a_not_scored_result_cannot_carry_findings_or_a_flag() -> None:
    source = _ct_small()
    check = _not_scored(source).distribution
    with pytest.raises(ResultBuildError, match="no findings, no triggers and priority"):
        _result(source, distribution=check)
    with pytest.raises(ResultBuildError, match="only for a study out of distribution"):
        _result(source, priority="not_scored", triggered_by=[])


def test_images_partly_out_of_distribution_are_noted(source: Dataset) -> None:
    check = DistributionCheck("mahalanobis", 9.0, 14.25, images=3, images_outside=1, scored=True)

    sr = _round_trip(_build(source, _result(source, distribution=check)))

    assert any(
        t.startswith("Partly out of distribution for model pacsclip-demo version 0.1.0: 1 of 3")
        for t in _texts(sr)
    )
    assert "pneumothorax" in _groups(sr)  # the findings of the images inside are reported


PATIENT_AND_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


def test_a_source_without_its_type2_patient_and_study_attributes_still_gets_an_sr(
    source: Dataset,
) -> None:
    # Some devices leave these out; highdicom reads them from the source unconditionally.
    bare = copy.deepcopy(source)
    for keyword in PATIENT_AND_STUDY_TYPE2:
        if keyword in bare:
            delattr(bare, keyword)

    sr = _round_trip(_build(bare, _result(bare)))

    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert all(sr[keyword].value in ("", None) for keyword in PATIENT_AND_STUDY_TYPE2)
    assert "PatientID" not in bare  # the source itself is left as it was


def test_a_contour_region_keeps_its_points_and_only_the_hottest_goes_in(source: Dataset) -> None:
    uid = str(source.SOPInstanceUID)
    contour = ((12.0, 8.0), (40.5, 8.0), (52.0, 30.25), (12.0, 44.0), (12.0, 8.0))
    second = box_outline(60, 60, 70, 70)
    finding = _finding("nodule", "Nodule", 0.9, "present", uid, outlines=[contour, second])

    groups = _groups(_round_trip(_build(source, _result(source, findings=[finding]))))

    roi = groups["nodule"].roi
    assert roi.GraphicType == "POLYLINE"
    assert list(roi.GraphicData) == [v for point in contour for v in point]


def test_an_absent_finding_gets_no_region_even_with_an_outline(source: Dataset) -> None:
    uid = str(source.SOPInstanceUID)
    absent = _finding("nodule", "Nodule", 0.1, "absent", uid, outlines=[box_outline(1, 1, 9, 9)])
    undetermined = _finding(
        "mass", "Mass", 0.5, "indeterminate", uid, outlines=[box_outline(1, 1, 9, 9)]
    )

    sr = _round_trip(_build(source, _result(source, findings=[absent, undetermined])))

    assert _groups(sr) == {}
    assert not [t for t in _texts(sr) if t.startswith("No region")]


def test_a_region_group_states_what_scored_it(source: Dataset) -> None:
    uid = str(source.SOPInstanceUID)
    finding = _finding(
        "nodule",
        "Nodule",
        0.9,
        "present",
        uid,
        outlines=[box_outline(5, 5, 20, 20)],
        scored_by="site head v3 of site AE1|General; calibrated on labels.csv",
    )

    sr = _round_trip(_build(source, _result(source, findings=[finding])))

    group = _groups(sr)["nodule"]
    parameters = [
        item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    assert "scored by site head v3 of site AE1|General; calibrated on labels.csv" in parameters


def test_what_produced_each_score_and_a_missing_region_are_stated(source: Dataset) -> None:
    uid = str(source.SOPInstanceUID)
    finding = _finding(
        "nodule",
        "Nodule",
        0.9,
        "present",
        uid,
        scored_by="site head v3 of site AE1|General; calibrated on labels.csv",
        region_note="regions are placed on single-frame images only",
    )

    sr = _round_trip(_build(source, _result(source, findings=[finding])))

    assert _groups(sr) == {}
    texts = _texts(sr)
    assert (
        "Nodule: probability 0.90 (present, decision threshold 0.50); scored by site head v3 "
        "of site AE1|General; calibrated on labels.csv"
    ) in texts
    assert "No region computed for Nodule: regions are placed on single-frame images only" in (
        texts
    )


def test_standard_finding_codes_by_default() -> None:
    from plugin.results.finding_codes import default_finding_code, finding_code

    assert default_finding_code("pneumothorax") == FindingCode("36118008", "SCT", "Pneumothorax")
    assert default_finding_code("pleural_effusion") == FindingCode(
        "60046008", "SCT", "Pleural effusion"
    )
    # SNOMED has no concept for it in the lexicon: RadLex's.
    assert default_finding_code("nodule") == FindingCode("RID3875", "RADLEX", "Pulmonary nodule")
    assert default_finding_code("made_up_finding") is None
    declared = FindingCode("123", "99LOCAL", "Local")
    assert finding_code("pneumothorax", declared) == declared
