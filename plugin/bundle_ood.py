"""Fitting a bundle's out-of-distribution reference and pinning it into the bundle.

``pacsclip model fit-ood`` (on a new version's copy of the bundle, :mod:`plugin.bundle_versions`)
and the demo packaging (on the bundle it is writing) call :func:`fit_ood`: the images are
prepared exactly as the worker prepares them (DICOM -> display -> model input), embedded by
the bundle's image tower, split into a part that fits the mean and covariance and a held-out
part that sets the threshold (:mod:`plugin.triage.ood`), and the reference is written as
``ood_reference.npz`` with its SHA-256 in ``bundle.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from plugin.bundle_versions import Change
from plugin.errors import ConfigError
from plugin.imaging import ImageSpec, dataset_input
from plugin.models.bundle import Manifest, OodFittedOn, OodSpec, load_bundle
from plugin.models.bundle_writer import pin_file, write_bundle
from plugin.models.runtime import ImageEncoder
from plugin.triage.ood import (
    DEFAULT_QUANTILE,
    DEFAULT_THUMBNAIL,
    EMBEDDING_AND_THUMBNAIL,
    OodFit,
    fit_reference,
    image_features,
)

logger = logging.getLogger(__name__)

OOD_REFERENCE_FILE: Final = "ood_reference.npz"
DEFAULT_HELDOUT_FRACTION: Final = 0.5
_BATCH: Final = 64  # images prepared and embedded at a time, so large sets stay small in memory


@dataclass(frozen=True)
class FittedReference:
    manifest: Manifest
    fit: OodFit


def fit_ood(
    bundle_dir: Path,
    fit_images: Iterable[Dataset],
    heldout_images: Iterable[Dataset],
    *,
    description: str,
    quantile: float = DEFAULT_QUANTILE,
    features: str = EMBEDDING_AND_THUMBNAIL,
    thumbnail: int = DEFAULT_THUMBNAIL,
    threads: int | None = None,
) -> FittedReference:
    """Fit the reference on ``fit_images``, set its threshold on ``heldout_images`` (other
    in-distribution images), write it into the bundle and re-pin the manifest."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    encoder = ImageEncoder(bundle, threads=threads)
    spec = ImageSpec.from_manifest(bundle.manifest.image.model_dump())
    fitted = fit_reference(
        feature_rows(encoder, spec, fit_images, features, thumbnail),
        feature_rows(encoder, spec, heldout_images, features, thumbnail),
        quantile,
        features=features,
        thumbnail=thumbnail,
    )
    reference = fitted.reference
    reference.save(bundle_dir / OOD_REFERENCE_FILE)
    ood = OodSpec(
        features=reference.features,
        thumbnail=reference.thumbnail,
        file=pin_file(bundle_dir, OOD_REFERENCE_FILE),
        threshold=reference.threshold,
        quantile=reference.quantile,
        fitted_on=OodFittedOn(
            n=reference.n_fit,
            heldout_n=reference.n_heldout,
            heldout_pass_rate=fitted.heldout_pass_rate,
            description=description,
            fitted_at=datetime.now(UTC).date().isoformat(),
        ),
    )
    written = write_bundle(bundle_dir, bundle.manifest.model_copy(update={"ood": ood}))
    logger.info(
        "out-of-distribution reference of %s fitted on %d images, threshold %.3f at the %g "
        "quantile of %d held-out images",
        written.ref,
        reference.n_fit,
        reference.threshold,
        reference.quantile,
        reference.n_heldout,
    )
    return FittedReference(written.manifest, fitted)


def ood_change(
    fitted: FittedReference,
    parent: Manifest,
    hyperparameters: Mapping[str, float | int | str | bool],
) -> Change:
    """What a new version's lineage says of its reference (``pacsclip model fit-ood``)."""
    reference = fitted.fit.reference
    spec = fitted.manifest.ood
    description = spec.fitted_on.description if spec is not None else "images"
    dropped = []
    if parent.ood is not None:
        dropped.append(
            f"the parent's out-of-distribution reference (threshold {parent.ood.threshold:.3f}, "
            f"{parent.ood.fitted_on.description}): replaced by the one fitted here"
        )
    summary = (
        f"threshold {reference.threshold:.3f} ({reference.method} distance, "
        f"{reference.quantile:g} quantile of {reference.n_heldout} held-out images, "
        f"{100 * fitted.fit.heldout_pass_rate:.2f}% of them pass)"
    )
    return Change(
        method=f"out-of-distribution reference ({reference.method} distance on "
        f"{reference.features})",
        data=f"{description}: {reference.n_fit} images to fit, {reference.n_heldout} held out",
        examples=reference.n_fit + reference.n_heldout,
        hyperparameters=hyperparameters,
        evaluation={
            "threshold": reference.threshold,
            "heldout_pass_rate": fitted.fit.heldout_pass_rate,
            "summary": summary,
        },
        dropped=dropped,
    )


def feature_rows(
    encoder: ImageEncoder,
    spec: ImageSpec,
    images: Iterable[Dataset],
    features: str = EMBEDDING_AND_THUMBNAIL,
    thumbnail: int = DEFAULT_THUMBNAIL,
) -> NDArray[np.float64]:
    """The guard's feature rows [N, F] of datasets, prepared as the worker prepares them."""
    chunks: list[NDArray[np.float64]] = []
    batch: list[NDArray[np.float32]] = []

    def flush() -> None:
        inputs = np.stack(batch)
        chunks.append(image_features(encoder.encode(inputs), inputs, features, thumbnail))
        batch.clear()

    for ds in images:
        batch.append(dataset_input(ds, spec))
        if len(batch) == _BATCH:
            flush()
    if batch:
        flush()
    if not chunks:
        raise ConfigError("no image to fit the out-of-distribution reference on")
    return np.concatenate(chunks)


def dicom_images(directory: Path) -> list[Path]:
    """Every file under ``directory`` (recursively), sorted; ConfigError when there is none."""
    if not directory.is_dir():
        raise ConfigError(f"--images {directory} is not a folder of DICOM images")
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise ConfigError(f"--images {directory} holds no files")
    return paths


def split_paths(
    paths: Sequence[Path], heldout_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """A seeded shuffle cut into (fit, held-out); the threshold must come from images the mean
    and covariance never saw, or it would sit too close and flag in-distribution images."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"--heldout-fraction must be between 0 and 1, got {heldout_fraction}")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_heldout = max(1, round(len(paths) * heldout_fraction))
    heldout = sorted(paths[i] for i in order[:n_heldout])
    fit = sorted(paths[i] for i in order[n_heldout:])
    return fit, heldout


def read_images(
    paths: Iterable[Path], skipped: Callable[[Path, str], None] | None = None
) -> Iterator[Dataset]:
    """The datasets of ``paths`` that hold an image; others are passed to ``skipped``.

    A file that is not DICOM at all is an error: the folder was meant to hold images only.
    """
    for path in paths:
        try:
            ds = dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            raise ConfigError(
                f"cannot read {path} as DICOM ({exc}): --images takes a folder of DICOM images"
            ) from exc
        if "PixelData" not in ds:
            if skipped is not None:
                skipped(path, "no pixel data")
            continue
        yield ds
