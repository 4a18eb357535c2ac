"""Secondary-capture overlay of one analysed image, as a highdicom SCImage.

The image in grey with one finding's saliency heat map blended in a perceptual colour map,
that finding's regions outlined (when it is present), and a burned-in panel (top left):
algorithm name and version, priority, which finding the map shows, each finding with its
probability and decision, the disclaimers, and a colour legend. Pure code: a dataset and
arrays in, a highdicom object out.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from plugin.results.study_result import FindingResult, Outline, ResultBuildError, StudyResult
from plugin.results.uids import person_name_warnings_suppressed, stamp_instance_creation

RGB = tuple[int, int, int]
FloatImage = npt.NDArray[np.float32]
RgbImage = npt.NDArray[np.uint8]

# Output size: large images shrink so the long side is at most MAX_SIDE; small ones grow by
# a whole factor to at least MIN_SIDE, so that the burned-in text stays legible.
MAX_SIDE: Final = 2048
MIN_SIDE: Final = 512
# Heat below HEAT_FLOOR leaves the grey untouched, so colour only marks where the model
# looked; at 1.0 the colour map covers HEAT_ALPHA of the pixel, so anatomy stays visible.
HEAT_FLOOR: Final = 0.2
HEAT_ALPHA: Final = 0.6
# The text panel: a darkened box; text opaque. Disclaimers in amber, the rest in white.
PANEL_ALPHA: Final = 0.65
TEXT_RGB: Final[RGB] = (255, 255, 255)
WARNING_RGB: Final[RGB] = (255, 176, 0)
# Region outlines and the line naming the mapped finding: cyan, apart from viridis' yellow end.
OUTLINE_RGB: Final[RGB] = (0, 230, 255)
# Bitmap-font pixels per panel pixel: one step per this many output pixels on the long side.
TEXT_SCALE_STEP: Final = 640
_PAD: Final = 4  # panel pixels around the text, before scaling
_LEGEND_BAR: Final = (64, 8)  # width, height of the legend's colour bar, in panel pixels

# viridis (perceptually uniform, readable in greyscale and by colour-blind readers),
# sampled at 9 evenly spaced points; linear interpolation between them is close enough.
_VIRIDIS: Final = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)
# highdicom requires a Patient Orientation with coordinate system PATIENT and checks it
# against single-letter values; it gets this stand-in, and `_describe` sets the source's own
# values (which may have several letters) or empties the attribute (type 2: unknown).
_PLACEHOLDER_ORIENTATION: Final = ("L", "F")
# Entries of the colour lookup table: finer steps than 8-bit output can show.
_COLORMAP_SIZE: Final = 1024


def build_overlay(
    source: Dataset,
    heatmap: npt.NDArray[np.floating],
    result: StudyResult,
    display_image: npt.NDArray[np.floating],
    *,
    finding: FindingResult,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
) -> hd.sc.SCImage:
    """The RGB secondary capture of `source` with `heatmap` and the result burned in.

    `heatmap` is the map of `finding` (one of the result's, present or undetermined: an
    absent finding gets no overlay); the panel names it, and a present finding's regions
    are outlined. `display_image` is the source as the model's preprocessing showed it (grey
    in [0, 1], MONOCHROME1 already inverted); `heatmap` is in [0, 1]; both at the source's size.
    """
    shape = (int(source.Rows), int(source.Columns))
    if np.shape(display_image) != shape:
        raise ResultBuildError(f"display image has shape {np.shape(display_image)}, not {shape}")
    if finding.decision == "absent":
        raise ResultBuildError(f"{finding.name!r} is absent: no heat map is shown for it")
    pixels = render_overlay(display_image, heatmap, result, finding)
    algorithm = result.algorithm
    with person_name_warnings_suppressed():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            # highdicom takes single-letter values only; `_describe` puts the real ones in.
            patient_orientation=_PLACEHOLDER_ORIENTATION,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=algorithm.series_description("overlay"),
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            content_date=content_datetime.date(),
            content_time=content_datetime.time(),
            series_date=content_datetime.date(),
            series_time=content_datetime.time(),
        )
    _describe(sc, source, result)
    _stamp_capture_time(sc, content_datetime)
    return sc


def render_overlay(
    display_image: npt.NDArray[np.floating],
    heatmap: npt.NDArray[np.floating],
    result: StudyResult,
    finding: FindingResult | None = None,
) -> RgbImage:
    """The overlay's pixels [rows, cols, 3] uint8, at the output size (see MAX_SIDE)."""
    grey, heat = _checked(display_image), _checked(heatmap)
    if grey.shape != heat.shape:
        raise ResultBuildError(f"heat map has shape {heat.shape}, display image {grey.shape}")
    out_shape = output_shape(grey.shape[0], grey.shape[1])
    scale = out_shape[1] / grey.shape[1], out_shape[0] / grey.shape[0]
    grey, heat = _resize(grey, out_shape), _resize(heat, out_shape)
    image = _blend(grey, heat)
    if finding is not None:
        _draw_outlines(image, finding.shown_regions, scale)
    _burn_in_panel(image, overlay_text_lines(result, finding))
    return image


def output_shape(rows: int, cols: int) -> tuple[int, int]:
    """The overlay's (rows, cols) for a source of (rows, cols); aspect ratio kept."""
    long_side = max(rows, cols)
    if long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
        return max(1, round(rows * scale)), max(1, round(cols * scale))
    if long_side < MIN_SIDE:
        factor = math.ceil(MIN_SIDE / long_side)
        return rows * factor, cols * factor
    return rows, cols


def overlay_text_lines(
    result: StudyResult, finding: FindingResult | None = None
) -> list[tuple[str, RGB]]:
    """The burned-in lines with their colours: identity, priority, which finding the heat
    map shows, the findings, disclaimers."""
    algorithm = result.algorithm
    lines: list[tuple[str, RGB]] = [
        (f"{algorithm.name} {algorithm.version}", TEXT_RGB),
        (f"priority: {result.priority.upper()}", TEXT_RGB),
    ]
    if finding is not None:
        outlined = ", outlined" if finding.shown_regions else ""
        what = "undetermined" if finding.decision == "indeterminate" else finding.decision
        lines.append((f"heat map of: {finding.display} ({what}{outlined})", OUTLINE_RGB))
    lines.extend(
        (f"{f.display}: p={f.probability:.2f} ({f.decision})", TEXT_RGB) for f in result.findings
    )
    lines.extend((text, WARNING_RGB) for text in algorithm.disclaimers())
    return lines


def colormap(values: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """viridis RGB in [0, 255] (float32, shape [..., 3]) of values in [0, 1]."""
    table = _colormap_table()
    clipped = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    # A lookup table, not interpolation per pixel: 10x faster on a 2k x 2k radiograph.
    indices = np.rint(clipped * (len(table) - 1)).astype(np.intp)
    return table[indices]


def _colormap_table(size: int = _COLORMAP_SIZE) -> npt.NDArray[np.float32]:
    anchors = np.asarray(_VIRIDIS, dtype=np.float32)
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, size)
    channels = [np.interp(samples, positions, anchors[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """(row, column) directions of the source, which the overlay shares (resizing flips
    nothing): its Patient Orientation, else from Image Orientation (Patient); None when
    neither says."""
    given = [str(v) for v in source.get("PatientOrientation") or []]
    if len(given) == 2 and all(given):
        return given[0], given[1]
    cosines = source.get("ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return None
    values = [float(v) for v in cosines]
    return _direction_letter(values[:3]), _direction_letter(values[3:])


def _direction_letter(cosines: list[float]) -> str:
    """The patient direction (LPS) a unit vector mostly points to, as one letter."""
    axis = int(np.argmax(np.abs(cosines)))
    towards, away = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return towards if cosines[axis] >= 0 else away


def _checked(array: npt.NDArray[np.floating]) -> FloatImage:
    """A finite 2-D float32 image clipped to [0, 1]."""
    values = np.asarray(array, dtype=np.float32)
    if values.ndim != 2 or min(values.shape) < 1:
        raise ResultBuildError(f"overlay input must be one 2-D image, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ResultBuildError("overlay input contains NaN or infinite values")
    return np.clip(values, 0.0, 1.0)


def _resize(image: FloatImage, shape: tuple[int, int]) -> FloatImage:
    if image.shape == shape:
        return image.astype(np.float32)
    # Pillow's bilinear filter widens its support when shrinking, so a downscale is smooth.
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _blend(grey: FloatImage, heat: FloatImage) -> RgbImage:
    grey_255 = grey * np.float32(255.0)
    rgb: RgbImage = np.repeat(np.rint(grey_255).clip(0, 255).astype(np.uint8)[..., None], 3, 2)
    # Only pixels above the floor are coloured (usually a small part of the image); the
    # rest stay the grey they already are.
    hot = heat > HEAT_FLOOR
    if hot.any():
        level = heat[hot]
        alpha = (HEAT_ALPHA * np.minimum((level - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 1.0))[:, None]
        mixed = grey_255[hot][:, None] * (np.float32(1.0) - alpha) + colormap(level) * alpha
        rgb[hot] = np.rint(mixed).clip(0, 255).astype(np.uint8)
    return rgb


def _draw_outlines(
    image: RgbImage, outlines: Sequence[Outline], scale: tuple[float, float]
) -> None:
    """Draw each region's outline onto `image` in place, in the outline colour.

    `scale` is output pixels per source pixel (columns, rows); outlines are in the source's
    DICOM image coordinates, which Pillow's drawing shares (0, 0 at a pixel's corner).
    """
    if not outlines:
        return
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, max(image.shape[:2]) // 400)
    for outline in outlines:
        points = [(c * scale[0], r * scale[1]) for c, r in outline]
        draw.line(points, fill=OUTLINE_RGB, width=width, joint="curve")
    image[...] = np.asarray(canvas)


def _burn_in_panel(image: RgbImage, lines: list[tuple[str, RGB]]) -> None:
    """Draw the text panel at the top left of `image`, in place.

    The bitmap font is drawn at its native size on a small canvas and enlarged by a whole
    factor (nearest neighbour), which keeps glyph edges sharp and colours exact.
    """
    panel, opacity = _panel(lines)
    margin = max(image.shape[:2]) // 100
    scale = _text_scale(image.shape[0], image.shape[1], panel.shape[1], margin)
    panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
    opacity = opacity.repeat(scale, axis=0).repeat(scale, axis=1)
    # A panel wider or taller than the image is cut at the image's edge.
    rows = min(panel.shape[0], image.shape[0] - margin)
    cols = min(panel.shape[1], image.shape[1] - margin)
    region = image[margin : margin + rows, margin : margin + cols].astype(np.float32)
    weight = opacity[:rows, :cols, None]
    mixed = region * (1.0 - weight) + panel[:rows, :cols].astype(np.float32) * weight
    image[margin : margin + rows, margin : margin + cols] = np.rint(mixed).astype(np.uint8)


def _text_scale(rows: int, cols: int, panel_cols: int, margin: int) -> int:
    by_size = max(1, max(rows, cols) // TEXT_SCALE_STEP)
    fits = max(1, (cols - 2 * margin) // max(1, panel_cols))
    return min(by_size, fits)


def _panel(lines: list[tuple[str, RGB]]) -> tuple[RgbImage, npt.NDArray[np.float32]]:
    """The panel at font size: RGB pixels and opacity (text and legend opaque)."""
    font = ImageFont.load_default_imagefont()
    texts = [(_latin1(text), colour) for text, colour in lines]
    line_height = font.getbbox("Ag")[3] + 2
    legend_texts = ("saliency low ", " high")
    legend_width = sum(int(font.getbbox(t)[2]) for t in legend_texts) + _LEGEND_BAR[0]
    width = max([int(font.getbbox(t)[2]) for t, _ in texts] + [legend_width]) + 2 * _PAD
    height = line_height * (len(texts) + 1) + 2 * _PAD
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for index, (text, colour) in enumerate(texts):
        draw.text((_PAD, _PAD + index * line_height), text, fill=colour, font=font)
    legend_top = _PAD + len(texts) * line_height
    draw.text((_PAD, legend_top), legend_texts[0], fill=TEXT_RGB, font=font)
    bar_left = _PAD + int(font.getbbox(legend_texts[0])[2])
    draw.text((bar_left + _LEGEND_BAR[0], legend_top), legend_texts[1], fill=TEXT_RGB, font=font)
    pixels = np.array(canvas, dtype=np.uint8)
    _paint_legend_bar(pixels, bar_left, legend_top + (line_height - _LEGEND_BAR[1]) // 2)
    opacity = np.where(pixels.any(axis=-1), 1.0, PANEL_ALPHA).astype(np.float32)
    return pixels, opacity


def _paint_legend_bar(pixels: RgbImage, left: int, top: int) -> None:
    """The colours the heat map takes from HEAT_FLOOR (left) to 1 (right), at full strength."""
    bar_width, bar_height = _LEGEND_BAR
    colours = colormap(np.linspace(HEAT_FLOOR, 1.0, bar_width, dtype=np.float32))
    pixels[top : top + bar_height, left : left + bar_width] = np.rint(colours).astype(np.uint8)


def _latin1(text: str) -> str:
    """Pillow's bitmap font covers Latin-1 only; anything else is drawn as '?'."""
    return text.encode("latin-1", errors="replace").decode("latin-1")


def _describe(sc: hd.sc.SCImage, source: Dataset, result: StudyResult) -> None:
    """Attributes highdicom does not set: burned-in text, provenance, orientation, laterality."""
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = "; ".join(result.algorithm.disclaimers())
    sc.DerivationDescription = (
        f"AI saliency overlay by {result.algorithm.name} {result.algorithm.version}"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.PatientOrientation = list(patient_orientation(source) or [])
    # Laterality (General Series, type 2C) is only set by highdicom when given as R or L;
    # dciodvfy expects it present, so it is copied from the source or left empty (unknown).
    sc.Laterality = source.get("Laterality", "") or ""
    # Once lossy, always lossy: an overlay of a lossy-compressed image says so too.
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"


def _stamp_capture_time(sc: hd.sc.SCImage, when: datetime.datetime) -> None:
    stamp_instance_creation(sc, when)
    sc.DateOfSecondaryCapture = sc.InstanceCreationDate
    sc.TimeOfSecondaryCapture = sc.InstanceCreationTime
