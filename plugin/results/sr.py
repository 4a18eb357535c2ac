"""TID 1500 Measurement Report of one analysed study, as a highdicom Comprehensive 3D SR.

Tree (template ids in brackets):

    Imaging Measurement Report [1500]
      observer context: the algorithm as a device; procedure reported
      Imaging Measurements
        Measurement Group [1501, or 1410 where the finding has a region], one per finding:
          tracking identifier + UID, finding type, algorithm identification (+ threshold),
          Probability (NUM), the finding's concept = Present | Absent | Undetermined (CODE),
          source image, or the region as a closed SCOORD POLYLINE selected from it
      Qualitative Evaluations: Priority = STAT | ROUTINE, disclaimers and notes (TEXT)

A study out of the model's distribution (plugin.triage.ood) has no finding groups: its one
measurement group is the distribution check (distance NUM, Model applicability = Out of
distribution), and its report-level evaluations say Priority = Not scored and, as text,
"Out of distribution for model X version Y ...".

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
    DistributionCheck,
    FindingResult,
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
DISTRIBUTION_CHECK: Final = Code("OODCHECK", LOCAL_SCHEME, "Input distribution check")
DISTRIBUTION_DISTANCE: Final = Code("OODDIST", LOCAL_SCHEME, "Out-of-distribution distance")
MODEL_APPLICABILITY: Final = Code("APPLICABILITY", LOCAL_SCHEME, "Model applicability")
APPLICABILITY_CODES: Final[Mapping[bool, Code]] = MappingProxyType(
    {
        True: Code("IN DIST", LOCAL_SCHEME, "In distribution"),
        False: Code("OUT OF DIST", LOCAL_SCHEME, "Out of distribution"),
    }
)
DISTRIBUTION_TRACKING_ID: Final = "out-of-distribution check"

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
    groups = [
        _finding_group(finding, sources, result.algorithm, study_uid) for finding in result.findings
    ]
    if result.distribution is not None and not result.distribution.scored:
        groups = [
            _distribution_group(result.distribution, source_datasets, result.algorithm, study_uid)
        ]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result.algorithm),
        procedure_reported=_procedures_reported(source_datasets[0]),
        imaging_measurements=groups,
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
    sources: Mapping[str, Dataset],
    algorithm: AlgorithmIdentity,
    study_uid: str,
) -> (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
):
    source = sources.get(finding.source_sop_instance_uid)
    if source is None:
        raise ResultBuildError(f"finding {finding.name!r} refers to an instance not in the sources")
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(study_uid, algorithm, finding.name), identifier=finding.name
    )
    # The threshold travels as an algorithm parameter: it is how the decision was made.
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"decision threshold {finding.threshold:.4g}"],
        manufacturer=algorithm.manufacturer,
    )
    concept = finding_concept(finding)
    probability = hd.sr.Measurement(name=PROBABILITY, value=finding.probability, unit=NO_UNITS)
    decision = hd.sr.QualitativeEvaluation(name=concept, value=DECISION_CODES[finding.decision])
    if finding.region is not None:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=_image_region(finding.name, finding.region, source),
            finding_type=concept,
            algorithm_id=algorithm_id,
            measurements=[probability],
            qualitative_evaluations=[decision],
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm_id,
        measurements=[probability],
        qualitative_evaluations=[decision],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
        ],
    )


def _distribution_group(
    check: DistributionCheck,
    sources: Sequence[Dataset],
    algorithm: AlgorithmIdentity,
    study_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The group of a study out of distribution: how far it lies, and that the model does not
    apply to it; no finding type of the model appears."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(study_uid, algorithm, DISTRIBUTION_TRACKING_ID),
            identifier=DISTRIBUTION_TRACKING_ID,
        ),
        finding_type=DISTRIBUTION_CHECK,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=[f"{check.method} distance threshold {check.threshold:.4g}"],
            manufacturer=algorithm.manufacturer,
        ),
        measurements=[
            hd.sr.Measurement(name=DISTRIBUTION_DISTANCE, value=check.distance, unit=NO_UNITS)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=MODEL_APPLICABILITY, value=APPLICABILITY_CODES[check.scored]
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
            )
            for ds in sources
        ],
    )


def _image_region(
    name: str, region: tuple[int, int, int, int], source: Dataset
) -> hd.sr.ImageRegion:
    """A finding's box as a closed POLYLINE around the pixels' outer edges.

    DICOM image coordinates are (column, row) with (0, 0) at the top-left corner of the
    top-left pixel, so an inclusive box of pixel indices ends one past its last pixel.
    """
    row_min, col_min, row_max, col_max = region
    if row_max >= int(source.Rows) or col_max >= int(source.Columns):
        raise ResultBuildError(f"region of {name!r} lies outside its source image")
    left, top, right, bottom = col_min, row_min, col_max + 1, row_max + 1
    outline = np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        dtype=np.float64,
    )
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )


def _report_evaluations(result: StudyResult) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=PRIORITY,
            value=PRIORITY_CODES[result.priority],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    items.extend(_comment(line) for line in _report_notes(result))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _report_notes(result: StudyResult) -> list[str]:
    notes = list(result.algorithm.disclaimers())
    if result.distribution is not None and result.distribution.images_outside:
        notes.append(result.distribution.statement(result.algorithm))
    notes.append(f"Algorithm: {result.algorithm.name} {result.algorithm.version}")
    if result.triggered_by:
        notes.append(f"Priority {result.priority.upper()} set by: {', '.join(result.triggered_by)}")
    if result.similar_summary:
        notes.append(f"Similar cases: {result.similar_summary}")
    return notes


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
