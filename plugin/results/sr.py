"""TID 1500 Measurement Report of one analysed study, as a highdicom Comprehensive 3D SR.

Tree (template ids in brackets):

    Imaging Measurement Report [1500]
      observer context: the algorithm as a device; procedure reported
      Imaging Measurements (only when a present finding has a region)
        Measurement Group [1410], one per present finding with a region:
          tracking identifier (OHIF's freehand-ROI prefix + the finding's name) + UID, finding
          type, algorithm identification (threshold, what scored it), the region as a closed
          SCOORD POLYLINE selected from the source image, Probability (NUM, with the region
          again as what it was inferred from), Finding = Present (CODE), a Comment naming it
      Qualitative Evaluations: Priority = STAT | ROUTINE | Not scored; every other finding
        as CODE finding = Present | Absent | Undetermined and a TEXT with its probability and
        how it was scored; disclaimers and notes (TEXT)

Every measurement group has image coordinates: OHIF, the open viewer most sites try first,
draws none of a report's groups when one lacks them. A study out of the model's distribution
(plugin.triage.ood) has no findings and no groups; its evaluations say Priority = Not scored,
Model applicability = Out of distribution and, as text, "Out of distribution for model X
version Y ..." with the distance and threshold.

Pure code: datasets and dataclasses in, a highdicom object out.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from plugin.results.source_header import with_type2_present
from plugin.results.study_result import (
    AlgorithmIdentity,
    Decision,
    FindingResult,
    Outline,
    Priority,
    ResultBuildError,
    StudyResult,
)
from plugin.results.uids import (
    device_uid,
    person_name_warnings_suppressed,
    stamp_instance_creation,
    tracking_uid,
)

# pacsclip's private coding scheme: findings a bundle gives no standard code, and priorities.
LOCAL_SCHEME: Final = "99PACSCLIP"
LOCAL_SCHEME_NAME: Final = "pacsclip local codes"

# DCM 122157 "Probability" (PS3.16 Annex D; in no context group, so any template may use it).
# A probability is dimensionless: UCUM "1".
PROBABILITY: Final = Code("122157", "DCM", "Probability")
NO_UNITS: Final = Code("1", "UCUM", "no units")

# CID 240 "Present-Absent" for the thresholded decision of each finding.
DECISION_CODES: Final[Mapping[Decision, Code]] = MappingProxyType(
    {
        "present": codes.SCT.Present,  # 52101004
        "absent": codes.SCT.Absent,  # 272519000
        "indeterminate": codes.SCT.Undetermined,  # 373068000
    }
)

# Priority (SCT 260870009) with pacsclip's own values: no standard code set says STAT/routine
# for a reading priority; the values mirror Requested Procedure Priority (0040,1003).
PRIORITY: Final = Code("260870009", "SCT", "Priority")
PRIORITY_CODES: Final[Mapping[Priority, Code]] = MappingProxyType(
    {
        "stat": Code("STAT", LOCAL_SCHEME, "STAT"),
        "routine": Code("ROUTINE", LOCAL_SCHEME, "Routine"),
        "not_scored": Code("NOT SCORED", LOCAL_SCHEME, "Not scored"),
    }
)

# The out-of-distribution check, in pacsclip's scheme: no standard code says "this input is
# unlike the model's training data". The check is a group of its own, never a finding.
MODEL_APPLICABILITY: Final = Code("APPLICABILITY", LOCAL_SCHEME, "Model applicability")
APPLICABILITY_CODES: Final[Mapping[bool, Code]] = MappingProxyType(
    {
        True: Code("IN DIST", LOCAL_SCHEME, "In distribution"),
        False: Code("OUT OF DIST", LOCAL_SCHEME, "Out of distribution"),
    }
)
# OHIF (through cornerstone3D's SR adapter) recognises a polyline of more than five points as a
# measurement only when the Tracking Identifier names its freehand ROI tool; other viewers show
# the identifier as text, and the finding's name follows the prefix.
FREEHAND_ROI_PREFIX: Final = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:"

# TID 1500 row 12: report-level Qualitative Evaluations container.
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT: Final = codes.DCM.Comment  # 121106

# Procedure Reported from the source's modality (CID 100 "Quantitative Diagnostic Imaging
# Procedures"), and SCT 399208008 "Plain chest X-ray" for a chest radiograph.
PLAIN_CHEST_XRAY: Final = Code("399208008", "SCT", "Plain chest X-ray")
IMAGING_PROCEDURE: Final = codes.SCT.ImagingProcedure  # 363679005, for other modalities
MODALITY_PROCEDURES: Final[Mapping[str, Code]] = MappingProxyType(
    {
        "CR": codes.LN.XRUnspecifiedBodyRegion,  # 43468-8
        "DX": codes.LN.XRUnspecifiedBodyRegion,
        "CT": codes.LN.CTUnspecifiedBodyRegion,  # 25045-6
        "MR": codes.LN.MRIUnspecifiedBodyRegion,  # 25056-3
        "NM": codes.LN.NMUnspecifiedBodyRegion,  # 49118-3
        "PT": codes.LN.PETUnspecifiedBodyRegion,  # 44136-0
    }
)
_RADIOGRAPHY: Final = frozenset({"CR", "DX"})
# Longest value of the SH value representation (Code Value).
_SH_MAX: Final = 16


def build_measurement_report(
    source_datasets: Sequence[Dataset],
    result: StudyResult,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 SR of `result`, in the study of `source_datasets`, in a new series.

    `source_datasets` are the analysed instances (headers suffice); each finding's
    `source_sop_instance_uid` must be one of them. All of them are recorded as evidence.
    `predecessor` is the SR this one supersedes (re-analysis after late images).
    """
    sources = _check_sources(source_datasets)
    study_uid = str(source_datasets[0].StudyInstanceUID)
    if predecessor is not None and predecessor.StudyInstanceUID != study_uid:
        raise ResultBuildError("the predecessor SR belongs to another study")
    for finding in result.findings:
        if finding.source_sop_instance_uid not in sources:
            raise ResultBuildError(
                f"finding {finding.name!r} refers to an instance not in the sources"
            )
    # Only a present finding with a region is a measurement group: viewers that draw TID 1500
    # (OHIF) expect image coordinates in every group and show nothing when one lacks them.
    # Every other finding, and the distribution check, is a report-level evaluation.
    groups = [
        _finding_group(
            finding, sources[finding.source_sop_instance_uid], result.algorithm, study_uid
        )
        for finding in result.findings
        if finding.shown_regions
    ]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result.algorithm),
        procedure_reported=_procedures_reported(source_datasets[0]),
        imaging_measurements=groups or [_placeholder_group(source_datasets[0])],
    )
    if not groups:
        # TID 1500 needs Imaging Measurements (row 6) or Qualitative Evaluations (row 12);
        # highdicom always writes row 6 with a group, so its placeholder is taken out again.
        root = report[0].ContentSequence
        report[0].ContentSequence = hd.sr.ContentSequence(
            [item for item in root if item.ConceptNameCodeSequence[0].CodeValue != "126010"]
        )
    # highdicom's MeasurementReport has no parameter for TID 1500's report-level evaluations.
    report[0].ContentSequence.append(_report_evaluations(result))
    with person_name_warnings_suppressed():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[with_type2_present(ds) for ds in source_datasets],
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=result.algorithm.manufacturer,
            is_complete=True,
            previous_versions=[predecessor] if predecessor is not None else None,
            series_description=result.algorithm.series_description("SR"),
            manufacturer_model_name=result.algorithm.name,
            software_versions=result.algorithm.version,
            content_date=content_datetime.date(),
            content_time=content_datetime.time(),
            series_date=content_datetime.date(),
            series_time=content_datetime.time(),
            coding_schemes=[local_coding_scheme()],
        )
    stamp_instance_creation(sr, content_datetime)
    return sr


def local_coding_scheme() -> CodingSchemeIdentificationItem:
    """Identification of the private scheme, as PS3.3 asks of every non-standard designator."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME,
        name=LOCAL_SCHEME_NAME,
        responsible_organization="pacsclip",
    )


def finding_concept(finding: FindingResult) -> hd.sr.CodedConcept:
    """The finding's own code, or a code in pacsclip's scheme named after the finding."""
    if finding.code is not None:
        return hd.sr.CodedConcept(finding.code.value, finding.code.scheme, finding.code.meaning)
    return hd.sr.CodedConcept(local_code_value(finding.name), LOCAL_SCHEME, finding.display)


def local_code_value(name: str) -> str:
    """A Code Value (SH, at most 16 characters) for a finding name in pacsclip's scheme.

    A longer name would need Long Code Value, which older viewers (and dicom3tools) show as
    an empty code; so it is cut to 11 characters plus a hash of the whole name.
    """
    if len(name) <= _SH_MAX:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:4]
    return f"{name[: _SH_MAX - 5]}-{digest}"


def _check_sources(source_datasets: Sequence[Dataset]) -> Mapping[str, Dataset]:
    if not source_datasets:
        raise ResultBuildError("an SR needs at least one source instance as evidence")
    study_uids = {str(ds.StudyInstanceUID) for ds in source_datasets}
    if len(study_uids) != 1:
        raise ResultBuildError(f"source instances span {len(study_uids)} studies, expected 1")
    return {str(ds.SOPInstanceUID): ds for ds in source_datasets}


def _observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.cid270.Device),
        observer_identifying_attributes=device,
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def _procedures_reported(source: Dataset) -> list[Code]:
    modality = str(source.get("Modality", ""))
    if modality in _RADIOGRAPHY and str(source.get("BodyPartExamined", "")).upper() == "CHEST":
        return [PLAIN_CHEST_XRAY]
    return [MODALITY_PROCEDURES.get(modality, IMAGING_PROCEDURE)]


def _finding_group(
    finding: FindingResult,
    source: Dataset,
    algorithm: AlgorithmIdentity,
    study_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A present finding with a region: a TID 1410 group a viewer draws and labels."""
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(study_uid, algorithm, finding.name),
        identifier=f"{FREEHAND_ROI_PREFIX}{finding.name}",
    )
    concept = finding_concept(finding)
    # The hottest region goes in (TID 1410 holds one); the SEG and the overlay show all.
    region = _image_region(finding.name, finding.shown_regions[0], source)
    probability = hd.sr.Measurement(name=PROBABILITY, value=finding.probability, unit=NO_UNITS)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=concept,
        algorithm_id=_algorithm_id(algorithm, finding),
        measurements=[probability],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=DECISION_CODES[finding.decision])
        ],
    )
    # The title viewers give the measurement (OHIF takes a group's Comment).
    group[0].ContentSequence.append(_comment(_finding_line(finding)))
    # The region again under the NUM, as what it was inferred from: OHIF's measurement panel
    # looks for a measurement's coordinates there, not at the group level. TID 1419 is
    # extensible; highdicom's builder has no parameter for it in a TID 1410 group.
    [number] = [item for item in group[0].ContentSequence if item.ValueType == "NUM"]
    inferred_from = hd.sr.CoordinatesForMeasurement(
        graphic_type=region.GraphicType,
        graphic_data=np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2),
        source_image=_region_source(source),
    )
    number.ContentSequence = hd.sr.ContentSequence(
        [*number.get("ContentSequence", []), inferred_from]
    )
    return group


def _placeholder_group(source: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="placeholder"),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
        ],
    )


def _algorithm_id(
    algorithm: AlgorithmIdentity, finding: FindingResult
) -> hd.sr.AlgorithmIdentification:
    # The threshold and what produced the score travel as algorithm parameters: they are
    # how the decision was made.
    parameters = [f"decision threshold {finding.threshold:.4g}"]
    if finding.scored_by:
        parameters.append(f"scored by {finding.scored_by}")
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=parameters,
        manufacturer=algorithm.manufacturer,
    )


def _finding_line(finding: FindingResult) -> str:
    decision = "undetermined" if finding.decision == "indeterminate" else finding.decision
    return (
        f"{finding.display}: probability {finding.probability:.2f} ({decision}, decision "
        f"threshold {finding.threshold:.2f})"
    )


def _image_region(name: str, outline: Outline, source: Dataset) -> hd.sr.ImageRegion:
    """A finding's region as a closed POLYLINE in DICOM image coordinates: (column, row),
    (0, 0) at the top-left corner of the top-left pixel, so the far edge is Columns/Rows."""
    points = np.asarray(outline, dtype=np.float64)
    if points[:, 0].max() > int(source.Columns) or points[:, 1].max() > int(source.Rows):
        raise ResultBuildError(f"region of {name!r} lies outside its source image")
    # Hundredths of a pixel: the SR stays small and a rebuild gives identical bytes.
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.round(points, 2),
        source_image=_region_source(source),
    )


def _region_source(source: Dataset) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
    )


def _report_evaluations(result: StudyResult) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [_code(PRIORITY, PRIORITY_CODES[result.priority])]
    check = result.distribution
    if check is not None and not check.scored:
        items.append(_code(MODEL_APPLICABILITY, APPLICABILITY_CODES[False]))
    # Findings without a region: each decision coded, its probability and how it was made
    # in words (the template's evaluations are codes and text).
    for finding in result.findings:
        if not finding.shown_regions:
            items.append(_code(finding_concept(finding), DECISION_CODES[finding.decision]))
            items.append(_comment(_finding_line(finding) + _scored_by(finding)))
    items.extend(_comment(line) for line in _report_notes(result))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _report_notes(result: StudyResult) -> list[str]:
    notes = list(result.algorithm.disclaimers())
    if result.distribution is not None and result.distribution.images_outside:
        notes.append(result.distribution.statement(result.algorithm))
    notes.append(f"Algorithm: {result.algorithm.name} {result.algorithm.version}")
    notes.extend(
        f"No region computed for {f.display}: {f.region_note}"
        for f in result.findings
        if f.decision == "present" and not f.shown_regions and f.region_note
    )
    if result.triggered_by:
        notes.append(f"Priority {result.priority.upper()} set by: {', '.join(result.triggered_by)}")
    if result.similar_summary:
        notes.append(f"Similar cases: {result.similar_summary}")
    return notes


def _code(name: hd.sr.CodedConcept | Code, value: Code) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _scored_by(finding: FindingResult) -> str:
    return f"; scored by {finding.scored_by}" if finding.scored_by else ""


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
