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
from dataclasses import dataclass
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
# Each grey level under the panel's black at PANEL_ALPHA: level * (1 - alpha), rounded, in
# float32 as a per-pixel blend would compute it.
_DIMMED: Final = np.rint(
    np.arange(256, dtype=np.float32) * (np.float32(1.0) - np.float32(PANEL_ALPHA))
).astype(np.uint8)
# One RGB pixel as a single 3-byte item, to write many pixels at once.
_PIXEL: Final = np.dtype("V3")


def build_overlay(
    source: Dataset,
    heatmap: npt.NDArray[np.floating],
    result: StudyResult,
    display_image: npt.NDArray[np.floating] | OverlayBase,
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
    in [0, 1], MONOCHROME1 already inverted), or its `overlay_base` when several overlays of
    one image are built; `heatmap` is in [0, 1]; both at the source's size.
    """
    shape = (int(source.Rows), int(source.Columns))
    given = (
        display_image.source_shape
        if isinstance(display_image, OverlayBase)
        else np.shape(display_image)
    )
    if given != shape:
        raise ResultBuildError(f"display image has shape {given}, not {shape}")
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


@dataclass(frozen=True, eq=False)
class OverlayBase:
    """The grey of one display image at the overlay's size: what every overlay of that image
    starts from, so that several heat maps of one image convert and resize it once."""

    source_shape: tuple[int, int]  # (rows, cols) of the display image
    grey_255: FloatImage  # grey in [0, 255] at the output size, not yet rounded
    rgb: RgbImage  # grey_255 rounded, as RGB [rows, cols, 3]

    @property
    def scale(self) -> tuple[float, float]:
        """Output pixels per source pixel (columns, rows)."""
        return (
            self.grey_255.shape[1] / self.source_shape[1],
            self.grey_255.shape[0] / self.source_shape[0],
        )


def overlay_base(display_image: npt.NDArray[np.floating]) -> OverlayBase:
    """The shared start of the overlays of `display_image` (grey in [0, 1], source size)."""
    grey = _checked(display_image)
    rows, cols = grey.shape
    grey_255 = _resize(grey, output_shape(rows, cols))
    grey_255 *= np.float32(255.0)
    levels = np.rint(grey_255).clip(0, 255).astype(np.uint8)
    rgb: RgbImage = np.repeat(levels[..., None], 3, axis=2)
    grey_255.flags.writeable = False
    rgb.flags.writeable = False
    return OverlayBase((rows, cols), grey_255, rgb)


def render_overlay(
    display_image: npt.NDArray[np.floating] | OverlayBase,
    heatmap: npt.NDArray[np.floating],
    result: StudyResult,
    finding: FindingResult | None = None,
) -> RgbImage:
    """The overlay's pixels [rows, cols, 3] uint8, at the output size (see MAX_SIDE)."""
    base = display_image if isinstance(display_image, OverlayBase) else overlay_base(display_image)
    heat = _checked(heatmap)
    if base.source_shape != heat.shape:
        raise ResultBuildError(
            f"heat map has shape {heat.shape}, display image {base.source_shape}"
        )
    out_shape = base.grey_255.shape
    image = _blend(base, heat if heat.shape == out_shape else _resize(heat, out_shape))
    if finding is not None:
        _draw_outlines(image, finding.shown_regions, base.scale)
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
    # take, not table[indices]: the same values, several times faster for many pixels.
    colours: npt.NDArray[np.float32] = table.take(indices, axis=0)
    return colours


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
    """`image` at `shape`: a new array, which the caller may change in place."""
    if image.shape == shape:
        return image.astype(np.float32)
    # Pillow's bilinear filter widens its support when shrinking, so a downscale is smooth.
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.array(resized, dtype=np.float32)


def _blend(base: OverlayBase, heat: FloatImage) -> RgbImage:
    """The base's grey with `heat` (at the output size) coloured in; a new array."""
    rgb: RgbImage = base.rgb.copy()
    # Only pixels above the floor are coloured (usually a small part of the image); the
    # rest stay the grey they already are. They are found once, as flat indices into the
    # band of rows that holds them, and the arithmetic is float32 and in place.
    hot = heat > HEAT_FLOOR
    hot_rows = np.flatnonzero(hot.any(axis=1))
    if hot_rows.size == 0:
        return rgb
    band = slice(int(hot_rows[0]), int(hot_rows[-1]) + 1)
    where = np.flatnonzero(hot[band])
    level = heat[band].reshape(-1).take(where)
    # alpha = HEAT_ALPHA * min((level - floor) / (1 - floor), 1)
    alpha = level - HEAT_FLOOR
    alpha /= 1.0 - HEAT_FLOOR
    np.minimum(alpha, 1.0, out=alpha)
    alpha *= HEAT_ALPHA
    # mixed = grey * (1 - alpha) + colour * alpha, per channel
    mixed = colormap(level)
    mixed *= alpha[:, None]
    kept = np.float32(1.0) - alpha
    kept *= base.grey_255[band].reshape(-1).take(where)
    mixed += kept[:, None]
    np.rint(mixed, out=mixed)
    np.clip(mixed, 0, 255, out=mixed)
    # Each pixel written as one 3-byte item: several times faster than [N, 3] indexing.
    pixels = rgb[band].reshape(-1, 3).view(_PIXEL).reshape(-1)
    np.put(pixels, where, mixed.astype(np.uint8).view(_PIXEL).reshape(-1))
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
    factor (nearest neighbour), which keeps glyph edges sharp and colours exact. Text and
    legend are opaque; elsewhere the panel is black at PANEL_ALPHA, which darkens each grey
    level by a fixed factor (a lookup table of the 256 levels).
    """
    panel, opaque = _panel(lines)
    margin = max(image.shape[:2]) // 100
    scale = _text_scale(image.shape[0], image.shape[1], panel.shape[1], margin)
    panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
    opaque = opaque.repeat(scale, axis=0).repeat(scale, axis=1)
    # A panel wider or taller than the image is cut at the image's edge.
    rows = min(panel.shape[0], image.shape[0] - margin)
    cols = min(panel.shape[1], image.shape[1] - margin)
    region = image[margin : margin + rows, margin : margin + cols]
    region[...] = np.where(opaque[:rows, :cols, None], panel[:rows, :cols], _DIMMED[region])


def _text_scale(rows: int, cols: int, panel_cols: int, margin: int) -> int:
    by_size = max(1, max(rows, cols) // TEXT_SCALE_STEP)
    fits = max(1, (cols - 2 * margin) // max(1, panel_cols))
    return min(by_size, fits)


def _panel(lines: list[tuple[str, RGB]]) -> tuple[RgbImage, npt.NDArray[np.bool_]]:
    """The panel at font size: RGB pixels, and where they are opaque (text and legend; the
    rest is black)."""
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
    opaque: npt.NDArray[np.bool_] = np.any(pixels, axis=-1)
    return pixels, opaque


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
