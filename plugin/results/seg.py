"""DICOM Segmentation of one analysed image: one BINARY segment per present finding.

Viewers with SEG support (OHIF, 3D Slicer, most PACS viewers of the last years) draw each
segment as a coloured label map they can toggle, name and measure; the secondary-capture
overlay stays for those without. The segments are the regions the SR's measurement groups
outline, filled, with the same tracking identifier and UID, so a viewer can link them.
Pure code: a dataset and a result in, a highdicom object out.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from plugin.results.overlay import patient_orientation
from plugin.results.source_header import with_type2_present
from plugin.results.sr import finding_concept
from plugin.results.study_result import FindingResult, Outline, ResultBuildError, StudyResult
from plugin.results.uids import (
    person_name_warnings_suppressed,
    stamp_instance_creation,
    tracking_uid,
)

# CID 7150 Segmentation Property Categories: devices are physical objects, the rest of
# what the models find is abnormal morphology.
ABNORMAL_STRUCTURE: Final = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
PHYSICAL_OBJECT: Final = codes.cid7150.PhysicalObject  # SCT 260787004
_DEVICE_WORDS: Final = ("device", "catheter", "tube", "line", "wire", "pacemaker")
# Recommended display colours, one per segment in turn: distinct, none near grey.
SEGMENT_COLOURS: Final = ("orange", "turquoise", "magenta", "yellow", "lime", "dodgerblue")
# Segment Label is LO (64 characters).
_LO_MAX: Final = 64


def segmented_findings(result: StudyResult, source: Dataset) -> list[FindingResult]:
    """The present findings with a region on `source`: the segments its SEG would have."""
    uid = str(source.SOPInstanceUID)
    return [f for f in result.findings if f.source_sop_instance_uid == uid and f.shown_regions]


def build_segmentation(
    source: Dataset,
    result: StudyResult,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
) -> hd.seg.Segmentation:
    """The BINARY SEG of `source` with one segment per present finding outlined on it.

    Raises ResultBuildError when no finding has a region on `source` (an empty SEG is
    never made) or when `source` is not a single-frame image.
    """
    findings = segmented_findings(result, source)
    if not findings:
        raise ResultBuildError("no present finding has a region on this image: no SEG to build")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ResultBuildError("a SEG is built for single-frame images only")
    shape = (int(source.Rows), int(source.Columns))
    # Segments last, as highdicom takes them, but each segment's mask contiguous: highdicom
    # reads the masks one segment at a time and sums over segments (for overlaps).
    masks = np.moveaxis(np.stack([fill_outlines(f.shown_regions, shape) for f in findings]), 0, -1)
    study_uid = str(source.StudyInstanceUID)
    algorithm = result.algorithm
    family = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source=algorithm.manufacturer,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=finding.display[:_LO_MAX],
            segmented_property_category=_category(finding),
            segmented_property_type=finding_concept(finding),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=family,
            tracking_uid=tracking_uid(study_uid, algorithm, finding.name),
            tracking_id=finding.name,
            display_color=hd.color.CIELabColor.from_string(
                SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]
            ),
        )
        for number, finding in enumerate(findings, start=1)
    ]
    with person_name_warnings_suppressed():
        seg = hd.seg.Segmentation(
            source_images=[with_type2_present(source)],
            pixel_array=masks[np.newaxis],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number=algorithm.version,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=algorithm.series_description("SEG"),
            content_label="FINDINGS",
            content_description="; ".join(algorithm.disclaimers())[:_LO_MAX],
            pixel_measures=_pixel_measures(source),
            # A finding's region is never empty; keep every frame so segment n is frame n.
            omit_empty_frames=False,
        )
    # General Image's Patient Orientation (type 2C for images without a frame of reference):
    # the source's directions, which a derived mask of the same grid shares.
    seg.PatientOrientation = list(patient_orientation(source) or [])
    if "FrameOfReferenceUID" not in source:
        _add_plane_geometry(seg)
    # highdicom draws a random Dimension Organization UID; one derived from the SEG's own UID
    # keeps a rebuilt SEG byte-identical (a redelivered task must not make a different one).
    dimensions = generate_uid(entropy_srcs=[sop_uid, "dimension-organization"])
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimensions
    seg.ContentDate = DA(content_datetime.date())
    seg.ContentTime = TM(content_datetime.time())
    stamp_instance_creation(seg, content_datetime)
    return seg


def fill_outlines(outlines: Sequence[Outline], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """The pixels of an image [rows, cols] whose centres lie inside the closed outlines.

    Outlines are in DICOM image coordinates ((0, 0) the top-left pixel's top-left corner),
    so pixel (row, col) has its centre at (col + 0.5, row + 0.5); an outline along pixel
    edges fills exactly the pixels it encloses. A scanline fill: for each row of centres, the
    outline's crossings in order, with the pixels between each entering and leaving one.
    All rows at once: each run adds 1 at its first pixel and -1 after its last, and a running
    sum along the row is positive inside a run.
    """
    mask = np.zeros(shape, dtype=bool)
    runs = [_runs(outline, shape) for outline in outlines]
    runs = [r for r in runs if r[0].size]
    if not runs:
        return mask
    rows = np.concatenate([r[0] for r in runs])
    starts = np.concatenate([r[1] for r in runs])
    stops = np.concatenate([r[2] for r in runs])
    first, last = int(rows.min()), int(rows.max()) + 1
    edges = np.zeros((last - first, shape[1] + 1), dtype=np.int32)
    np.add.at(edges, (rows - first, starts), 1)
    np.add.at(edges, (rows - first, stops), -1)
    mask[first:last] = np.cumsum(edges[:, : shape[1]], axis=1, dtype=np.int32) > 0
    return mask


def _runs(
    outline: Outline, shape: tuple[int, int]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The runs of pixels inside one outline: row, first column and column after the last."""
    points = np.asarray(outline, dtype=np.float64)
    x0, y0 = points[:-1, 0], points[:-1, 1]
    x1, y1 = points[1:, 0], points[1:, 1]
    first = max(0, int(np.floor(points[:, 1].min())))
    last = min(shape[0], int(np.ceil(points[:, 1].max())))
    centres = np.arange(first, last) + 0.5
    # Half-open in y, so a vertex shared by two edges is crossed once.
    crossing = (y0[None, :] <= centres[:, None]) != (y1[None, :] <= centres[:, None])
    dy = np.where(y1 != y0, y1 - y0, 1.0)
    xs = x0 + (centres[:, None] - y0) / dy * (x1 - x0)
    # Each row's crossings in order, then the edges it does not cross (infinite).
    cuts = np.sort(np.where(crossing, xs, np.inf), axis=1)
    pairs = cuts.shape[1] // 2
    # Pixel c is inside from entering at x to leaving at x' when x <= c + 0.5 < x'.
    starts = np.clip(np.ceil(cuts[:, 0 : 2 * pairs : 2] - 0.5), 0, shape[1]).astype(np.intp)
    stops = np.clip(np.ceil(cuts[:, 1 : 2 * pairs : 2] - 0.5), 0, shape[1]).astype(np.intp)
    # Only whole pairs of crossings make a run (an unpaired last one is dropped).
    paired = 2 * np.arange(pairs)[None, :] + 1 < crossing.sum(axis=1)[:, None]
    rows = np.broadcast_to(np.arange(first, last)[:, None], paired.shape)
    return rows[paired], starts[paired], stops[paired]


def _add_plane_geometry(seg: hd.seg.Segmentation) -> None:
    """Plane orientation and positions for a SEG of an image without patient geometry.

    A projection radiograph or secondary capture has no frame of reference, and highdicom
    writes no plane geometry for it; cornerstone3D's SEG loader (OHIF) reads both for every
    SEG and fails without them. The identity orientation and an origin position describe
    the source's own pixel grid, which is all a projection image has.
    """
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = Dataset()
        position.ImagePositionPatient = [0, 0, 0]
        frame.PlanePositionSequence = [position]


def _pixel_measures(source: Dataset) -> hd.PixelMeasuresSequence:
    """The source's pixel spacing (Pixel Spacing, else a radiograph's Imager Pixel Spacing).

    Without either (or with zeros), 1 mm is written: the SEG needs a non-zero value, and a
    viewer that measured on the source would have no calibration there either.
    """
    spacing = (1.0, 1.0)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        given = [float(v) for v in source.get(keyword) or []]
        # Some modalities write 0\0 for "unknown".
        if len(given) == 2 and min(given) > 0:
            spacing = (given[0], given[1])
            break
    thickness = float(source.get("SliceThickness") or 0) or 1.0
    return hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness)


def _category(finding: FindingResult) -> hd.sr.CodedConcept:
    name = finding.name.lower()
    code = PHYSICAL_OBJECT if any(word in name for word in _DEVICE_WORDS) else ABNORMAL_STRUCTURE
    return hd.sr.CodedConcept.from_code(code)
