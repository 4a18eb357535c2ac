"""Heat maps showing where a finding's score comes from, and the region they point at.

Two methods: patch-text similarity for ViT towers that expose their patch tokens, and
model-agnostic occlusion (any tower, any score). Maps are float32 in [0, 1], image-shaped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import contourpy  # matplotlib's contour tracer: no dependency of its own
import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]

from plugin.triage.zeroshot import l2_normalise

Map = npt.NDArray[np.float32]
ScoreFn = Callable[[npt.NDArray[np.float32]], npt.ArrayLike]


@dataclass(frozen=True)
class Region:
    """Bounding box in pixel indices, inclusive at both ends."""

    row_min: int
    col_min: int
    row_max: int
    col_max: int

    def polyline(self) -> npt.NDArray[np.float64]:
        """Closed outline [5, 2] of the box's pixel edges as DICOM SCOORD (column, row) pairs.

        DICOM image coordinates put (0, 0) at the top-left corner of the top-left pixel,
        so the outline runs from the first pixel's corner to one past the last pixel.
        """
        left, top = float(self.col_min), float(self.row_min)
        right, bottom = float(self.col_max + 1), float(self.row_max + 1)
        corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
        return np.array(corners, dtype=np.float64)


def patch_similarity_map(
    patch_embeds: npt.ArrayLike,
    text_embed: npt.ArrayLike,
    grid: tuple[int, int],
    out_shape: tuple[int, int],
) -> Map:
    """Cosine of each patch token [P, D] with a text embedding [D], on the patch grid,
    min-max normalised and bilinearly upsampled to `out_shape`.

    `grid` is (rows, columns) of patches with P = rows * columns, row-major as ViTs emit
    them; drop a class token before calling. The map covers the tower's input, so for a
    letterboxed input crop the padding before mapping it onto the original image.
    """
    patches = np.asarray(patch_embeds, dtype=np.float64)
    rows, cols = grid
    if patches.ndim != 2 or patches.shape[0] != rows * cols:
        raise ValueError(
            f"patch embeddings must be [{rows * cols}, D] for a {rows}x{cols} grid, "
            f"got shape {patches.shape}"
        )
    cosines = l2_normalise(patches) @ l2_normalise(text_embed)
    return resize_bilinear(_min_max(cosines.reshape(rows, cols)), out_shape)


def occlusion_map(
    image: npt.ArrayLike,
    score: ScoreFn,
    patch: int = 32,
    stride: int = 16,
    baseline: float = 0.0,
    batch: int = 32,
    *,
    max_side: int | None = None,
) -> Map:
    """Drop in `score` when a patch x patch square is set to `baseline`, per pixel.

    `score` takes images [N, H, W] and returns [N] scores. Each pixel gets the mean drop of
    the occluded squares that cover it; the map is clipped at 0 (occluding there raised the
    score) and divided by its maximum. With `max_side`, a larger image is first shrunk so
    its longer side is `max_side` (patch and stride are in those pixels) and the map is
    upsampled back: far fewer forward passes, and the tower resizes its input anyway.
    """

    def one_column(images: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return _scores(score, images)[:, np.newaxis]

    [heat] = occlusion_maps(image, one_column, 1, patch, stride, baseline, batch, max_side=max_side)
    return heat


def occlusion_maps(
    image: npt.ArrayLike,
    scores: Callable[[npt.NDArray[np.float32]], npt.ArrayLike],
    count: int,
    patch: int = 32,
    stride: int = 16,
    baseline: float = 0.0,
    batch: int = 32,
    *,
    max_side: int | None = None,
) -> list[Map]:
    """`occlusion_map` for `count` scores at once: `scores` returns [N, count] and one pass
    of occluded images gives every map (a study's findings share the forward passes)."""
    original = np.asarray(image, dtype=np.float32)
    if original.ndim != 2 or min(original.shape) == 0:
        raise ValueError(f"image must be [H, W], got shape {original.shape}")
    if patch < 1 or stride < 1 or batch < 1:
        raise ValueError(f"patch, stride and batch must be >= 1, got {patch}, {stride}, {batch}")
    working = _shrink(original, max_side)
    reference = _score_rows(scores, working[np.newaxis], count)[0]
    total = np.zeros((count, *working.shape), dtype=np.float64)
    coverage = np.zeros(working.shape, dtype=np.float64)
    boxes = list(_patch_boxes(working.shape, patch, stride))
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        occluded = np.repeat(working[np.newaxis], len(chunk), axis=0)
        for index, (top, left, size_r, size_c) in enumerate(chunk):
            occluded[index, top : top + size_r, left : left + size_c] = baseline
        drops = reference - _score_rows(scores, occluded, count)
        for (top, left, size_r, size_c), drop in zip(chunk, drops, strict=True):
            total[:, top : top + size_r, left : left + size_c] += drop[:, None, None]
            coverage[top : top + size_r, left : left + size_c] += 1.0
    maps = []
    for heat in np.clip(total / np.maximum(coverage, 1.0), 0.0, None):
        # Divide by the maximum rather than min-max: pixels whose occlusion changed nothing
        # stay at 0 instead of being stretched to look relevant.
        peak_value = heat.max()
        normalised = heat / peak_value if peak_value > 0 else heat
        maps.append(resize_bilinear(normalised, (original.shape[0], original.shape[1])))
    return maps


def peak(heat_map: npt.ArrayLike) -> tuple[int, int, float]:
    """(row, column, value) of the map's maximum; the first one when tied."""
    array = _as_map(heat_map)
    row, col = np.unravel_index(int(np.argmax(array)), array.shape)
    return int(row), int(col), float(array[row, col])


def region(heat_map: npt.ArrayLike, level: float = 0.5) -> Region | None:
    """Bounding box of the connected area around the peak where the map >= level * peak.

    Only the peak's own blob counts, so a second, separate hot spot does not stretch the box
    across the image. None when the map has no positive value (nothing to point at).
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    array = _as_map(heat_map)
    row, col, value = peak(array)
    if value <= 0:
        return None
    labels, _ = ndimage.label(array >= level * value, structure=np.ones((3, 3)))
    rows, cols = np.nonzero(labels == labels[row, col])
    return Region(int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))


@dataclass(frozen=True)
class Outline:
    """One region of a heat map: a closed polyline in DICOM image coordinates.

    `points` [K, 2] are (column, row) pairs along the region's pixel edges, (0, 0) being the
    top-left corner of the top-left pixel; the first point is repeated at the end. `peak` is
    the highest map value inside; `area` the region's pixels, in source pixels.
    """

    points: npt.NDArray[np.float64]
    peak: float
    area: float

    def box(self) -> tuple[int, int, int, int]:
        """(row_min, col_min, row_max, col_max) of the pixels the outline encloses."""
        cols, rows = self.points[:, 0], self.points[:, 1]
        return (
            int(np.floor(rows.min())),
            int(np.floor(cols.min())),
            max(int(np.ceil(rows.max())) - 1, int(np.floor(rows.min()))),
            max(int(np.ceil(cols.max())) - 1, int(np.floor(cols.min()))),
        )

    def as_list(self) -> list[list[float]]:
        return [[round(float(c), 2), round(float(r), 2)] for c, r in self.points]


# Outlines are traced on a grid of at most this many cells per side: the maps come from a
# 224-pixel occlusion pass or a 14-16-patch grid, so finer tracing only adds points.
OUTLINE_GRID = 256
# Regions smaller than this share of the image are specks, and at most MAX_OUTLINES are kept.
MIN_REGION_FRACTION = 0.002
MAX_OUTLINES = 3


def outlines(
    heat_map: npt.ArrayLike,
    level: float = 0.5,
    *,
    max_regions: int = MAX_OUTLINES,
    min_fraction: float = MIN_REGION_FRACTION,
) -> list[Outline]:
    """The regions where the map is at least `level` of its peak, as closed outlines.

    Holes inside a region are filled, regions under `min_fraction` of the image are dropped,
    and at most `max_regions` are kept, hottest first (the peak's own region always leads).
    Empty when the map has no positive value: nothing is outlined rather than an empty shape.
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    array = _as_map(heat_map)
    top = float(array.max())
    if top <= 0:
        return []
    working, scale = _grid_for_outlines(array)
    mask = ndimage.binary_fill_holes(working >= level * top)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(mask, labels, index)
    peaks = ndimage.maximum(working, labels, index)
    order = np.argsort(-np.asarray(peaks), kind="stable")
    min_cells = min_fraction * working.size
    kept: list[Outline] = []
    for position in order:
        if len(kept) == max_regions:
            break
        if sizes[position] < min_cells and kept:
            continue
        points = _trace(labels == index[position]) * np.array([scale[1], scale[0]])
        area = float(sizes[position]) * scale[0] * scale[1]
        kept.append(Outline(points=points, peak=float(peaks[position]), area=area))
    return kept


def _grid_for_outlines(
    array: npt.NDArray[np.float64] | npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], tuple[float, float]]:
    """The map on a grid of at most OUTLINE_GRID per side, and source pixels per cell."""
    rows, cols = array.shape
    factor = max(rows, cols) / OUTLINE_GRID
    if factor <= 1:
        return np.asarray(array, dtype=np.float32), (1.0, 1.0)
    shape = (max(1, round(rows / factor)), max(1, round(cols / factor)))
    return resize_bilinear(array, shape), (rows / shape[0], cols / shape[1])


def _trace(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The outer boundary of one connected region along its cells' edges, closed, as
    (column, row) in cell units; collinear points dropped."""
    padded = np.pad(mask.astype(np.float64), 1)
    generator = contourpy.contour_generator(
        z=padded, line_type=contourpy.LineType.Separate, corner_mask=False
    )
    lines = generator.lines(0.5)
    # The longest line is the outer boundary; holes were filled, so it is usually the only one.
    line = np.asarray(max(lines, key=lambda points: len(points)), dtype=np.float64)
    # Cell centres sit at index + 0.5 in image coordinates; the pad shifted indices by one.
    points = line - 1.0 + 0.5
    # The 0.5 level between a cell and its neighbour lies on their shared edge, except at
    # corners, where it cuts diagonally: close enough at the grid's resolution.
    points = _without_collinear(points)
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def _without_collinear(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if len(points) < 4:
        return points
    before, after = points[1:-1] - points[:-2], points[2:] - points[1:-1]
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.concatenate([[True], np.abs(cross) > 1e-9, [True]])
    kept: npt.NDArray[np.float64] = points[keep]
    return kept


def resize_bilinear(array: npt.ArrayLike, out_shape: tuple[int, int]) -> Map:
    """Bilinear resize with pixel-centre alignment (as torch's align_corners=False)."""
    # float32 throughout: maps are in [0, 1] and large (a radiograph's full size).
    source = np.asarray(array, dtype=np.float32)
    if source.ndim != 2 or min(out_shape) < 1:
        raise ValueError(f"cannot resize shape {source.shape} to {out_shape}")
    row_lo, row_hi, row_frac = _axis_samples(source.shape[0], out_shape[0])
    col_lo, col_hi, col_frac = _axis_samples(source.shape[1], out_shape[1])
    row_frac, col_frac = row_frac.astype(np.float32), col_frac.astype(np.float32)
    rows = source[row_lo] * (1.0 - row_frac)[:, None] + source[row_hi] * row_frac[:, None]
    result = rows[:, col_lo] * (1.0 - col_frac) + rows[:, col_hi] * col_frac
    return result.astype(np.float32, copy=False)


def _axis_samples(
    size_in: int, size_out: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    centres = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
    lower = np.floor(centres).astype(np.intp)
    upper = np.minimum(lower + 1, size_in - 1)
    return lower, upper, centres - lower


def _shrink(image: npt.NDArray[np.float32], max_side: int | None) -> npt.NDArray[np.float32]:
    if max_side is None or max(image.shape) <= max_side:
        return image
    factor = max(image.shape) / max_side
    shape = (max(1, round(image.shape[0] / factor)), max(1, round(image.shape[1] / factor)))
    # Box-filter first: bilinear sampling alone would alias when shrinking by a large factor.
    smoothed = ndimage.uniform_filter(image, size=max(1, round(factor)), mode="nearest")
    return resize_bilinear(smoothed, shape)


def _patch_boxes(
    shape: tuple[int, ...], patch: int, stride: int
) -> Iterator[tuple[int, int, int, int]]:
    """(top, left, height, width) of each occluding square; the last row/column of squares
    is moved flush with the edge so every pixel is covered."""
    size_r, size_c = min(patch, shape[0]), min(patch, shape[1])
    for top in _starts(shape[0], size_r, stride):
        for left in _starts(shape[1], size_c, stride):
            yield top, left, size_r, size_c


def _starts(length: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _scores(score: ScoreFn, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    values = np.asarray(score(images), dtype=np.float64)
    if values.shape != (len(images),) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"score must return {len(images)} finite values for {len(images)} images, "
            f"got shape {values.shape}"
        )
    return values


def _score_rows(
    scores: Callable[[npt.NDArray[np.float32]], npt.ArrayLike],
    images: npt.NDArray[np.float32],
    count: int,
) -> npt.NDArray[np.float64]:
    values = np.asarray(scores(images), dtype=np.float64)
    if values.shape != (len(images), count) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"scores must return [{len(images)}, {count}] finite values, got shape {values.shape}"
        )
    return values


def _min_max(array: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    low, high = float(array.min()), float(array.max())
    # A flat map carries no location; return zeros rather than dividing by zero.
    if high - low <= 0:
        return np.zeros_like(array)
    result: npt.NDArray[np.float64] = (array - low) / (high - low)
    return result


def _as_map(heat_map: npt.ArrayLike) -> npt.NDArray[np.float64] | npt.NDArray[np.float32]:
    array = np.asarray(heat_map)
    if array.dtype != np.float32:  # the maps made here are float32: no full-size copy
        array = array.astype(np.float64)
    if array.ndim != 2 or array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"a heat map must be a finite [H, W] array, got shape {array.shape}")
    return array
