"""Image-report pairs: read from a CSV or handed over from the catalog, checked, loaded.

The CSV has an ``image`` column (a DICOM file, or a PNG/JPEG/TIFF greyscale picture; relative to
the CSV's folder or absolute) and a ``report`` column (the report text). Any other column must
be a finding of the bundle, holding 1 (present), 0 (absent) or nothing (not known): the held-out
evaluation reports AUROC for findings labelled that way.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.finetune.errors import FinetuneError
from plugin.imaging import ImageSpec, UnsupportedImage, dataset_input, model_input

FloatArray = npt.NDArray[np.float32]

IMAGE_COLUMN = "image"
REPORT_COLUMN = "report"
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


@dataclass(frozen=True)
class Pair:
    """One image and the text of its report; ``where`` names it in errors (never PHI)."""

    image: Path
    report: str
    where: str
    labels: dict[str, float] = field(default_factory=dict)  # finding -> 1.0 / 0.0


@dataclass(frozen=True)
class PairSet:
    pairs: list[Pair]
    description: str  # what the pairs are, in words, for the lineage (no patient data)
    findings: list[str] = field(default_factory=list)  # labelled finding columns

    def __len__(self) -> int:
        return len(self.pairs)

    def labels(self, findings: Sequence[str]) -> FloatArray:
        """[N, F] of 1, 0 or NaN (not labelled)."""
        return np.array(
            [[p.labels.get(f, np.nan) for f in findings] for p in self.pairs], dtype=np.float64
        ).astype(np.float32)


def read_pairs_csv(csv_path: Path, known_findings: Sequence[str]) -> PairSet:
    """Read and check a pairs CSV; every error names the row and column to fix."""
    try:
        with csv_path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or ())
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FinetuneError(f"cannot read pairs {csv_path}: {exc}") from exc
    missing = [c for c in (IMAGE_COLUMN, REPORT_COLUMN) if c not in columns]
    if missing:
        raise FinetuneError(
            f"{csv_path}: needs the columns {IMAGE_COLUMN!r} and {REPORT_COLUMN!r} "
            f"(missing {missing}; found {columns})"
        )
    findings = [c for c in columns if c not in (IMAGE_COLUMN, REPORT_COLUMN)]
    unknown = [c for c in findings if c not in known_findings]
    if unknown:
        raise FinetuneError(
            f"{csv_path}: columns {unknown} are not findings of the bundle; label columns "
            f"must be some of {list(known_findings)}"
        )
    pairs = []
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path.name} row {line}"
        image = (row.get(IMAGE_COLUMN) or "").strip()
        report = (row.get(REPORT_COLUMN) or "").strip()
        if not image:
            raise FinetuneError(f"{where}: the {IMAGE_COLUMN!r} column is empty: give a file")
        if not report:
            raise FinetuneError(
                f"{where}: the report is empty: give the report text, or leave the row out"
            )
        path = Path(image)
        pairs.append(
            Pair(
                path if path.is_absolute() else csv_path.parent / path,
                report,
                where,
                _labels(row, findings, where),
            )
        )
    return PairSet(pairs, f"{len(pairs)} image-report pairs from {csv_path.name}", findings)


def _labels(row: dict[str, str], findings: Sequence[str], where: str) -> dict[str, float]:
    labels = {}
    for finding in findings:
        value = (row.get(finding) or "").strip()
        if value in ("1", "0"):
            labels[finding] = float(value)
        elif value:
            raise FinetuneError(
                f"{where}, column {finding!r}: {value!r} is not a label: use 1, 0 or nothing"
            )
    return labels


def load_inputs(pair: Pair, spec: ImageSpec) -> FloatArray:
    """The pair's image as the bundle's model input [C, H, W]."""
    try:
        if pair.image.suffix.lower() in PICTURE_SUFFIXES:
            with Image.open(pair.image) as picture:
                grey = np.asarray(picture.convert("F"), dtype=np.float32)
            top = 65535.0 if picture.mode.startswith("I") else 255.0
            return model_input(np.clip(grey / top, 0.0, 1.0), spec)
        return dataset_input(dcmread(pair.image), spec)
    except FileNotFoundError as exc:
        raise FinetuneError(f"{pair.where}: image {pair.image} does not exist") from exc
    except (
        OSError,
        InvalidDicomError,
        UnidentifiedImageError,
        UnsupportedImage,
        ValueError,
    ) as exc:
        raise FinetuneError(
            f"{pair.where}: cannot read image {pair.image} ({exc}); give a DICOM file or a "
            f"PNG/JPEG/TIFF picture"
        ) from exc
