"""DICOM image -> display array -> model input, as the bundle manifest's "image" block says.

``display_array`` renders one frame the way a radiologist sees it (modality LUT, VOI LUT or
window, MONOCHROME1 inverted, colour to grey) as float32 in [0, 1]; ``model_input`` fits it to the
model's square input and normalises it. Pure code: datasets and arrays in, arrays out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
)
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from plugin.errors import ConfigError

try:  # Pillow's antialiased bicubic is what CLIP preprocessing uses; numpy area is the fallback.
    from PIL import Image
except ImportError:  # pragma: no cover - exercised only where Pillow is absent
    Image = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ResizeMode = Literal["letterbox", "stretch", "center-crop"]
CropOffset = Literal["floor", "round"]
WindowMode = Literal["voi_lut_or_minmax", "minmax"]

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MINMAX_PERCENTILES = (0.5, 99.5)  # robust window when the object carries none
_COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as for YBR_FULL
# Attributes an Enhanced (multi-frame) object keeps per frame in functional groups.
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_FRAME_VIEW_KEYWORDS = (
    "SOPInstanceUID",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)


class UnsupportedImage(ValueError):
    """The dataset has no pixel data we can render; the message says what is missing."""


class ImageSpec(BaseModel):
    """How a model wants its images: the "image" block of a bundle manifest (bundle.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(gt=0)
    channels: Literal[1, 3]
    mean: tuple[float, ...] = Field(min_length=1)
    std: tuple[float, ...] = Field(min_length=1)
    resize: ResizeMode = "letterbox"
    crop_offset: CropOffset = "floor"
    window: WindowMode = "voi_lut_or_minmax"
    invert_monochrome1: bool = True

    @model_validator(mode="after")
    def _check_normalisation(self) -> Self:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(value <= 0 for value in self.std):
            raise ValueError("std values must be positive")
        return self

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ImageSpec:
        """Build from a parsed bundle.json (or just its "image" block); ConfigError if invalid."""
        block = manifest.get("image", manifest)
        if not isinstance(block, Mapping):
            raise ConfigError("bundle.json: 'image' must be an object")
        try:
            return cls.model_validate(dict(block))
        except ValidationError as exc:
            raise ConfigError(f"bundle.json: invalid 'image' block: {exc}") from exc


# --- display ---------------------------------------------------------------------------------


def display_array(
    ds: Dataset,
    frame: int | None = None,
    *,
    window: WindowMode = "voi_lut_or_minmax",
    invert_monochrome1: bool = True,
) -> NDArray[np.float32]:
    """One frame as a radiologist sees it: float32 [rows, columns] in [0, 1], dense = bright.

    ``frame`` is 0-based; None picks the only frame, or the middle one of a multi-frame object.
    Raises UnsupportedImage when the pixel data are missing, cannot be decoded or rendered.
    """
    index = _frame_index(ds, frame)
    pixels = _decode(ds, index)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        unit = _grey_to_unit(pixels, _frame_view(ds, index), window)
        if photometric == "MONOCHROME1" and invert_monochrome1:
            unit = 1.0 - unit
    elif photometric == "PALETTE COLOR":
        unit = _palette_to_unit(pixels, ds)
    elif photometric in _COLOUR_INTERPRETATIONS and pixels.ndim == 3:
        # pydicom has converted YBR to RGB already; JPEG 2000 decoders undo ICT/RCT themselves.
        unit = _luminance(pixels) / float(2 ** int(ds.BitsStored) - 1)
    else:
        raise UnsupportedImage(f"photometric interpretation {photometric!r} is not supported")
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def _frame_index(ds: Dataset, frame: int | None) -> int | None:
    """The 0-based frame to decode, or None for a single-frame object."""
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except ValueError as exc:
        raise UnsupportedImage(f"invalid NumberOfFrames {ds.NumberOfFrames!r}") from exc
    if frame is None:
        return None if n_frames == 1 else (n_frames - 1) // 2
    if not 0 <= frame < n_frames:
        raise IndexError(f"frame {frame} out of range: the object has {n_frames} frame(s)")
    return None if n_frames == 1 else frame


def _decode(ds: Dataset, index: int | None) -> NDArray[Any]:
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise UnsupportedImage("dataset has no pixel data (no PixelData element)")
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is None:
        raise UnsupportedImage(
            "dataset has no Transfer Syntax UID (file_meta): cannot tell how pixels are encoded"
        )
    _require_decoder(UID(transfer_syntax))
    try:
        return pixel_array(ds, index=index)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError, KeyError) as exc:
        raise UnsupportedImage(
            f"cannot decode pixel data ({UID(transfer_syntax).name}): {exc}"
        ) from exc


def _require_decoder(transfer_syntax: UID) -> None:
    label = f"{transfer_syntax.name} ({transfer_syntax})"
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedImage(f"no decoder exists for transfer syntax {label}") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise UnsupportedImage(f"no decoder for transfer syntax {label}: install {missing}")


def _frame_view(ds: Dataset, index: int | None) -> Dataset:
    """The LUT attributes of one frame; Enhanced objects hold them in functional groups."""
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    view = Dataset()
    for keyword in _FRAME_VIEW_KEYWORDS:
        if keyword in ds:
            view.add(ds[keyword])
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # LUT data in OW needs the byte order
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [*ds.get("SharedFunctionalGroupsSequence", [])[:1]]  # per-frame overrides shared
    if index is not None and index < len(per_frame):
        groups.append(per_frame[index])
    elif index is None and per_frame:
        groups.append(per_frame[0])
    for group in groups:
        for macro in _FRAME_MACROS:
            for item in group.get(macro, [])[:1]:
                for element in item:
                    view.add(element)
    return view


def _grey_to_unit(pixels: NDArray[Any], ds: Dataset, window: WindowMode) -> NDArray[np.float64]:
    """Modality LUT, then the VOI LUT / first window (or a robust min-max), scaled to [0, 1]."""
    values = apply_modality_lut(pixels, ds)
    if window == "voi_lut_or_minmax":
        unit = _voi_to_unit(values, ds)
        if unit is not None:
            return unit
    return _minmax_to_unit(values, _not_padding(pixels, ds))


def _voi_to_unit(values: NDArray[Any], ds: Dataset) -> NDArray[np.float64] | None:
    """The first VOI LUT (preferred, as pydicom does) or window; None when there is none."""
    if _has_voi_lut(ds):
        item = ds.VOILUTSequence[0]
        n_entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        # A LUT indexes integers; its own min/max are the output range (descriptors lie about bits).
        inputs = np.arange(first_mapped, first_mapped + n_entries)
        entries = apply_voi(inputs, ds)
        # Clip first: pydicom casts indexes to uint16, so values beyond the LUT would wrap around.
        mapped = apply_voi(np.clip(np.rint(values), inputs[0], inputs[-1]).astype(np.int64), ds)
        return _scale(mapped, float(entries.min()), float(entries.max()))
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        windowed = apply_windowing(values, ds)
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the output range
    except ValueError as exc:  # e.g. WindowWidth 0: fall back rather than refuse the image
        logger.warning(
            "ignoring invalid window of SOPInstanceUID=%s: %s", ds.get("SOPInstanceUID"), exc
        )
        return None
    return _scale(windowed, float(low), float(high))


def _has_voi_lut(ds: Dataset) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _not_padding(pixels: NDArray[Any], ds: Dataset) -> NDArray[np.bool_] | None:
    """Mask of real pixels: CT padding outside the field of view would pull the window down."""
    padding = ds.get("PixelPaddingValue")
    return None if padding is None else np.asarray(pixels != padding)


def _minmax_to_unit(values: NDArray[Any], mask: NDArray[np.bool_] | None) -> NDArray[np.float64]:
    sample = values[mask] if mask is not None and mask.any() else values
    low, high = np.percentile(sample, MINMAX_PERCENTILES)
    return _scale(values, float(low), float(high))


def _scale(values: NDArray[Any], low: float, high: float) -> NDArray[np.float64]:
    if high <= low:  # a blank image stays black rather than dividing by zero
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((np.asarray(values, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def _luminance(rgb: NDArray[Any]) -> NDArray[np.float64]:
    grey: NDArray[np.float64] = np.asarray(rgb, dtype=np.float64) @ np.array(_LUMA_WEIGHTS)
    return grey


def _palette_to_unit(pixels: NDArray[Any], ds: Dataset) -> NDArray[np.float64]:
    """Grey of the palette colours, scaled by the palette's brightest entry.

    Not by the descriptor's bit depth: 16-bit descriptors holding 8-bit entries are common.
    """
    n_entries, first_mapped, _ = (int(value) for value in ds.RedPaletteColorLookupTableDescriptor)
    entries = apply_color_lut(np.arange(first_mapped, first_mapped + (n_entries or 2**16)), ds)
    return _scale(_luminance(apply_color_lut(pixels, ds)), 0.0, float(entries.max()))


# --- model input -----------------------------------------------------------------------------


def model_input(image: NDArray[Any], spec: ImageSpec) -> NDArray[np.float32]:
    """A display array [H, W] in [0, 1] -> float32 [C, size, size], resized and normalised."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D display array, got shape {image.shape}")
    fitted = _fit(np.asarray(image, dtype=np.float32), spec.size, spec.resize, spec.crop_offset)
    channels = np.repeat(fitted[np.newaxis], spec.channels, axis=0)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, np.newaxis, np.newaxis]
    std = np.asarray(spec.std, dtype=np.float32)[:, np.newaxis, np.newaxis]
    return np.ascontiguousarray((channels - mean) / std, dtype=np.float32)


def batch_inputs(images: Iterable[NDArray[Any]], spec: ImageSpec) -> NDArray[np.float32]:
    """Display arrays -> float32 [N, C, size, size] (N may be 0)."""
    inputs = [model_input(image, spec) for image in images]
    if not inputs:
        return np.zeros((0, spec.channels, spec.size, spec.size), dtype=np.float32)
    return np.stack(inputs)


def dataset_input(ds: Dataset, spec: ImageSpec, frame: int | None = None) -> NDArray[np.float32]:
    """display_array with the spec's window and inversion, then model_input."""
    image = display_array(ds, frame, window=spec.window, invert_monochrome1=spec.invert_monochrome1)
    return model_input(image, spec)


class Fit(NamedTuple):
    """Where an image goes in the square input: resized to ``resized`` (height, width), then
    cropped (center-crop) or placed on a black canvas (letterbox) at ``offset`` (top, left)."""

    resized: tuple[int, int]
    offset: tuple[int, int]


def fit_geometry(
    height: int, width: int, size: int, mode: ResizeMode, crop_offset: CropOffset = "floor"
) -> Fit:
    """The integer arithmetic of each mode's reference, so that every pixel lands where the
    model's own preprocessing put it in training.

    center-crop: the short side becomes ``size`` and the long side ``int(size * long / short)``
    (torchvision's Resize and transformers' ``get_resize_output_image_size`` both truncate);
    the crop starts at ``(new - size) // 2`` (transformers) or ``round((new - size) / 2)``
    (torchvision's CenterCrop, used by open_clip). letterbox: open_clip's ``ResizeKeepRatio``
    (``round(side / ratio)``, ratio = longest side / size) and ``CenterCropOrPad``, which pads
    ``(size - new) // 2`` before the image.
    """
    if mode == "stretch":
        return Fit((size, size), (0, 0))
    if mode == "center-crop":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if width <= height else (size, new_long)
        if crop_offset == "round":
            return Fit((new_h, new_w), (round((new_h - size) / 2.0), round((new_w - size) / 2.0)))
        return Fit((new_h, new_w), ((new_h - size) // 2, (new_w - size) // 2))
    ratio = max(height / size, width / size)
    # open_clip would fail on a side that rounds to 0; one pixel keeps such a sliver visible.
    new_h, new_w = max(1, round(height / ratio)), max(1, round(width / ratio))
    return Fit((new_h, new_w), ((size - new_h) // 2, (size - new_w) // 2))


def _fit(
    image: NDArray[np.float32], size: int, mode: ResizeMode, crop_offset: CropOffset
) -> NDArray[np.float32]:
    """Square [size, size] image; letterbox pads with 0 (black) before normalisation."""
    height, width = image.shape
    (new_h, new_w), (top, left) = fit_geometry(height, width, size, mode, crop_offset)
    resized = _resize(image, new_h, new_w)
    if mode == "letterbox":
        canvas = np.zeros((size, size), dtype=np.float32)
        canvas[top : top + new_h, left : left + new_w] = resized
        return canvas
    return resized[top : top + size, left : left + size]


def _resize(image: NDArray[np.float32], height: int, width: int) -> NDArray[np.float32]:
    if image.shape == (height, width):
        return image
    if Image is None:
        resized = _resize_area(image, height, width)
    else:
        picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        resized = np.asarray(
            picture.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32
        )
    # Bicubic overshoots at edges; keep the [0, 1] display range.
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


def _resize_area(image: NDArray[np.float32], height: int, width: int) -> NDArray[np.float32]:
    """Area interpolation with numpy only: each output pixel averages the input it covers."""
    rows = _area_weights(image.shape[0], height)
    columns = _area_weights(image.shape[1], width)
    resized: NDArray[np.float64] = rows @ image.astype(np.float64) @ columns.T
    return resized.astype(np.float32)


def _area_weights(n_in: int, n_out: int) -> NDArray[np.float64]:
    """[n_out, n_in] matrix: row i holds the overlap of input cells with output cell i."""
    step = n_in / n_out
    edges = np.arange(n_out + 1) * step
    cells = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], cells + 1) - np.maximum(edges[:-1, None], cells)
    weights: NDArray[np.float64] = np.clip(overlap, 0.0, None) / step
    return weights
