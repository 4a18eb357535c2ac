"""Which images of a series the model sees, and how per-slice scores become one series score.

Projection radiographs (CR, DX, ...) are scored image by image. A CT or MR series is sorted along
the slice normal and sampled evenly (always including the middle slice); the slice scores are
then pooled. docs/preprocessing.md gives the reasons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

PoolMethod = Literal["max", "mean", "top3-mean"]

VOLUME_MODALITIES = frozenset({"CT", "MR"})
DEFAULT_MAX_SLICES = 16
DEFAULT_POOLING: PoolMethod = "max"


def select_images(series: Sequence[Dataset], max_slices: int = DEFAULT_MAX_SLICES) -> list[Dataset]:
    """The images of one series to score: sampled slices for CT/MR, every image otherwise.

    Localizers (ImageType contains LOCALIZER) are projections, not slices: they are left out of
    a CT/MR series that has other images.
    """
    if not series or str(series[0].get("Modality", "")).upper() not in VOLUME_MODALITIES:
        return list(series)
    slices = [ds for ds in series if "LOCALIZER" not in _image_type(ds)] or list(series)
    return sample_slices(slices, max_slices)


def sample_slices(
    datasets: Sequence[Dataset], max_slices: int = DEFAULT_MAX_SLICES
) -> list[Dataset]:
    """At most max_slices of a series in spatial order, evenly spaced, the middle one included."""
    ordered = sort_slices(datasets)
    return [ordered[index] for index in sample_indices(len(ordered), max_slices)]


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Order along the slice normal (ascending), or by InstanceNumber when geometry is missing."""
    normal = _slice_normal(datasets[0]) if datasets else None
    positions = [_position_along(ds, normal) for ds in datasets] if normal is not None else []
    if normal is not None and all(position is not None for position in positions):
        order = np.argsort(np.asarray(positions, dtype=np.float64), kind="stable")
        return [datasets[int(index)] for index in order]
    return sorted(datasets, key=_instance_number)


def sample_indices(count: int, max_slices: int = DEFAULT_MAX_SLICES) -> list[int]:
    """Evenly spaced indices into count ordered slices (or frames), the middle one included.

    All indices when count <= max_slices; otherwise a regular grid through the middle index
    ((count - 1) // 2) with spacing count / max_slices, so each index stands for one slab of
    equal thickness, rounded to the nearest slice.
    """
    if max_slices < 1:
        raise ValueError(f"max_slices must be at least 1, got {max_slices}")
    if count <= max_slices:
        return list(range(count))
    step = count / max_slices  # > 1, so rounded grid points stay distinct
    middle = (count - 1) // 2
    # Grid offsets whose points round into [0, count - 1]: an interval max_slices steps long,
    # so at least max_slices of them (the tolerance absorbs float error at exact ends).
    lowest = math.ceil((-0.5 - middle) / step - 1e-9)
    highest = math.floor((count - 0.5 - middle) / step + 1e-9)
    nearest = sorted(range(lowest, highest + 1), key=lambda m: (abs(m), m))[:max_slices]
    positions = middle + np.asarray(sorted(nearest), dtype=np.float64) * step
    return [int(index) for index in np.clip(np.floor(positions + 0.5), 0, count - 1)]


def pool_scores(scores: NDArray[Any], how: PoolMethod = DEFAULT_POOLING) -> NDArray[np.float64]:
    """Pool per-slice scores [S] or [S, F] over slices -> [] or [F].

    "max": a finding is present if any slice shows it (the default; calibrate with the same
    pooling and max_slices); "mean": for diffuse findings; "top3-mean": the mean of the 3 highest
    slices, less sensitive to one noisy slice.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("no slice scores to pool")
    if how == "max":
        return np.asarray(values.max(axis=0))
    if how == "mean":
        return np.asarray(values.mean(axis=0))
    if how == "top3-mean":
        top = np.sort(values, axis=0)[-3:]
        return np.asarray(top.mean(axis=0))
    raise ValueError(f"unknown pooling {how!r}: expected 'max', 'mean' or 'top3-mean'")


def _slice_normal(ds: Dataset) -> NDArray[np.float64] | None:
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:], dtype=np.float64)
    return np.cross(row, column)


def _position_along(ds: Dataset, normal: NDArray[np.float64]) -> float | None:
    position = ds.get("ImagePositionPatient")
    if position is None or len(position) != 3:
        return None
    return float(np.dot(normal, np.asarray(position, dtype=np.float64)))


def _instance_number(ds: Dataset) -> tuple[int, int]:
    """Sort key: numbered instances first, in number order; unnumbered keep their order."""
    number = ds.get("InstanceNumber")
    return (0, int(number)) if number is not None and str(number) != "" else (1, 0)


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    return [str(part).upper() for part in ([value] if isinstance(value, str) else value)]
