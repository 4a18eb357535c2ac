"""Out-of-distribution guard: is an image like those a bundle was fitted on?

An image is described by its features: the model's image embedding and, by default, a coarse
thumbnail of the model input (its channel mean, area-averaged to 16 x 16). The reference is
the mean and a shrunk covariance of in-distribution features; an image's Mahalanobis distance
to it is compared with a threshold set on *held-out* in-distribution images (not those the
mean and covariance came from), at a quantile such as 0.995, so that about that share of new
in-distribution images pass.

Why the thumbnail: a contrastive tower trained on a narrow domain maps many foreign images
onto embeddings near its training data (feature collapse), so the embedding alone misses
them; Mahalanobis scores on several layers, the input included, are the remedy of Lee et al.
(NeurIPS 2018). The covariance is Ledoit-Wolf shrunk: a few hundred dimensions from a few
thousand images give a nearly singular covariance whose inverse would flag every new image.

Pure numpy: arrays in, arrays and dataclasses out. Only ``save`` and ``load`` touch the file
system, and only the .npz path they are given.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from plugin.errors import ConfigError

OOD_FORMAT_VERSION: Final = 1
MAHALANOBIS: Final = "mahalanobis"
EMBEDDING: Final = "embedding"
EMBEDDING_AND_THUMBNAIL: Final = "embedding+thumbnail"
FEATURE_SETS: Final = (EMBEDDING, EMBEDDING_AND_THUMBNAIL)
DEFAULT_THUMBNAIL: Final = 16
DEFAULT_QUANTILE: Final = 0.995
# Fewer embeddings than this say too little about a distribution to guard anything.
MIN_FIT: Final = 20
MIN_HELDOUT: Final = 10
_ARRAYS: Final = (
    "method",
    "format_version",
    "features",
    "thumbnail",
    "mean",
    "precision",
    "threshold",
    "quantile",
)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class OodReferenceError(ConfigError):
    """A reference file is unreadable or inconsistent, or too few images to fit one."""


def thumbnails(inputs: npt.ArrayLike, grid: int) -> FloatArray:
    """Model inputs [N, C, H, W] -> their channel mean, area-averaged to [N, grid * grid]."""
    pixels = np.asarray(inputs, dtype=np.float64)
    if pixels.ndim != 4 or min(pixels.shape[2:]) < grid:
        raise ValueError(
            f"expected model inputs [N, C, H, W] of at least {grid} pixels, got "
            f"shape {pixels.shape}"
        )
    grey = pixels.mean(axis=1)
    rows = np.linspace(0, grey.shape[1], grid + 1).astype(np.intp)
    cols = np.linspace(0, grey.shape[2], grid + 1).astype(np.intp)
    sums = np.add.reduceat(np.add.reduceat(grey, rows[:-1], axis=1), cols[:-1], axis=2)
    areas = np.outer(np.diff(rows), np.diff(cols))
    result: FloatArray = (sums / areas).reshape(len(grey), grid * grid)
    return result


def image_features(
    embeds: npt.ArrayLike, inputs: npt.ArrayLike | None, features: str, thumbnail: int
) -> FloatArray:
    """The features a reference describes: embeddings [N, D], with thumbnails if it uses them."""
    rows = np.asarray(embeds, dtype=np.float64)
    if features == EMBEDDING:
        return rows
    if features != EMBEDDING_AND_THUMBNAIL:
        raise OodReferenceError(
            f"features {features!r} are not supported: use one of {FEATURE_SETS}"
        )
    if inputs is None:
        raise ValueError(f"features {features!r} need the model inputs")
    return np.hstack([rows, thumbnails(inputs, thumbnail)])


@dataclass(frozen=True, eq=False)
class OodReference:
    """Mean [F] and precision [F, F] (inverse shrunk covariance) of reference features."""

    mean: FloatArray
    precision: FloatArray
    threshold: float  # distances above this are out of distribution
    quantile: float  # of the held-out distances, where the threshold was set
    n_fit: int  # images the mean and covariance came from
    n_heldout: int  # images the threshold came from
    shrinkage: float  # Ledoit-Wolf coefficient used for the covariance
    features: str = EMBEDDING_AND_THUMBNAIL
    thumbnail: int = DEFAULT_THUMBNAIL  # side of the input thumbnail, when features use it
    method: str = MAHALANOBIS

    def __post_init__(self) -> None:
        dim = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if dim < 1 or self.precision.shape != (dim, dim):
            raise OodReferenceError(
                f"reference mean {self.mean.shape} and precision {self.precision.shape} do not "
                "match: expected [F] and [F, F]"
            )
        if self.features not in FEATURE_SETS:
            raise OodReferenceError(
                f"features {self.features!r} are not supported: use one of {FEATURE_SETS}"
            )
        if self.features == EMBEDDING_AND_THUMBNAIL and not 2 <= self.thumbnail < dim:
            raise OodReferenceError(f"thumbnail side {self.thumbnail} does not fit {dim} features")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.precision).all()):
            raise OodReferenceError("reference mean or precision holds NaN or infinity")
        if self.method != MAHALANOBIS:
            raise OodReferenceError(f"method {self.method!r} is not supported: use {MAHALANOBIS}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise OodReferenceError(f"threshold must be a positive number, got {self.threshold}")
        if not 0.0 < self.quantile < 1.0:
            raise OodReferenceError(f"quantile must be between 0 and 1, got {self.quantile}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def embedding_dim(self) -> int:
        """D of the image embeddings this reference takes."""
        if self.features == EMBEDDING_AND_THUMBNAIL:
            return self.dim - self.thumbnail**2
        return self.dim

    def features_of(self, embeds: npt.ArrayLike, inputs: npt.ArrayLike | None) -> FloatArray:
        """Feature rows [N, F] of image embeddings [N, D] and their model inputs."""
        return image_features(embeds, inputs, self.features, self.thumbnail)

    def distances(self, features: npt.ArrayLike) -> FloatArray:
        """Mahalanobis distance of each feature row [N, F] to the reference: [N]."""
        rows = np.asarray(features, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got shape {rows.shape}")
        centred = rows - self.mean
        squared = np.einsum("ij,jk,ik->i", centred, self.precision, centred)
        result: FloatArray = np.sqrt(np.maximum(squared, 0.0))
        return result

    def outside(self, features: npt.ArrayLike) -> BoolArray:
        """True for each row whose distance exceeds the threshold."""
        result: BoolArray = self.distances(features) > self.threshold
        return result

    def assess(self, embeds: npt.ArrayLike, inputs: npt.ArrayLike | None) -> StudyDistribution:
        """Distances of a study's images (N >= 1) and whether the study may be scored."""
        distances = self.distances(self.features_of(embeds, inputs))
        if len(distances) == 0:
            raise ValueError("a study needs at least one image")
        return StudyDistribution(tuple(float(d) for d in distances), self.threshold, self.method)

    def save(self, path: Path) -> None:
        """Write beside the target and rename, so a reader never sees a half-written file."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        arrays: dict[str, Any] = {
            "method": np.array(self.method),
            "format_version": np.array(OOD_FORMAT_VERSION),
            "features": np.array(self.features),
            "thumbnail": np.array(self.thumbnail),
            "mean": self.mean,
            "precision": self.precision,
            "threshold": np.array(self.threshold),
            "quantile": np.array(self.quantile),
            "n_fit": np.array(self.n_fit),
            "n_heldout": np.array(self.n_heldout),
            "shrinkage": np.array(self.shrinkage),
        }
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path, embedding_dim: int | None = None) -> OodReference:
        """Read a reference; ``embedding_dim`` is checked when given (the bundle's D)."""
        arrays = _read_npz(Path(path))
        try:
            reference = cls(
                mean=np.asarray(arrays["mean"], dtype=np.float64),
                precision=np.asarray(arrays["precision"], dtype=np.float64),
                threshold=float(arrays["threshold"]),
                quantile=float(arrays["quantile"]),
                n_fit=int(arrays.get("n_fit", 0)),
                n_heldout=int(arrays.get("n_heldout", 0)),
                shrinkage=float(arrays.get("shrinkage", math.nan)),
                features=str(arrays["features"]),
                thumbnail=int(arrays["thumbnail"]),
                method=str(arrays["method"]),
            )
        except OodReferenceError as exc:
            raise OodReferenceError(f"out-of-distribution reference {path}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise OodReferenceError(
                f"out-of-distribution reference {path} holds a malformed value: {exc}"
            ) from exc
        if embedding_dim is not None and reference.embedding_dim != embedding_dim:
            raise OodReferenceError(
                f"out-of-distribution reference {path} takes {reference.embedding_dim}-"
                f"dimensional embeddings but the bundle's are {embedding_dim}-dimensional: fit "
                "it again for this bundle (pacsclip model fit-ood)"
            )
        return reference


@dataclass(frozen=True)
class OodFit:
    """A fitted reference and how the held-out in-distribution embeddings fared."""

    reference: OodReference
    heldout_pass_rate: float  # share of held-out embeddings at or below the threshold


def fit_reference(
    fit_features: npt.ArrayLike,
    heldout_features: npt.ArrayLike,
    quantile: float = DEFAULT_QUANTILE,
    *,
    features: str = EMBEDDING_AND_THUMBNAIL,
    thumbnail: int = DEFAULT_THUMBNAIL,
) -> OodFit:
    """Mean and Ledoit-Wolf covariance from ``fit_features`` (rows of :func:`image_features`
    with the same ``features`` and ``thumbnail``); the threshold from the distances of
    ``heldout_features`` (a disjoint in-distribution split) at ``quantile``."""
    # Imported here: scikit-learn takes a second to load, and the worker never fits.
    from sklearn.covariance import LedoitWolf  # type: ignore[import-untyped]

    fit = _feature_rows(fit_features, "fit")
    heldout = _feature_rows(heldout_features, "held-out", dim=fit.shape[1])
    if len(fit) < MIN_FIT or len(heldout) < MIN_HELDOUT:
        raise OodReferenceError(
            f"fitting needs at least {MIN_FIT} images to fit and {MIN_HELDOUT} held out, "
            f"got {len(fit)} and {len(heldout)}: give more in-distribution images"
        )
    if not 0.5 <= quantile < 1.0:
        raise OodReferenceError(f"quantile must be in [0.5, 1), got {quantile}")
    estimator = LedoitWolf(assume_centered=False).fit(fit)
    provisional = OodReference(
        mean=np.asarray(estimator.location_, dtype=np.float64),
        precision=np.asarray(estimator.precision_, dtype=np.float64),
        threshold=1.0,
        quantile=quantile,
        n_fit=len(fit),
        n_heldout=len(heldout),
        shrinkage=float(estimator.shrinkage_),
        features=features,
        thumbnail=thumbnail,
    )
    distances = provisional.distances(heldout)
    threshold = float(np.quantile(distances, quantile, method="higher"))
    if not threshold > 0:
        raise OodReferenceError("the held-out images all sit on the mean: they are copies")
    reference = replace(provisional, threshold=threshold)
    return OodFit(reference, float(np.mean(distances <= threshold)))


@dataclass(frozen=True)
class StudyDistribution:
    """Where a study's images lie against the reference, and whether it may be scored.

    Rule for studies of several images (a CT series' sampled slices, PA and lateral views):
    images outside the reference are never scored; the study is not scored at all when more
    than half of its images are outside, since what remains would not represent it.
    """

    distances: tuple[float, ...]  # one per image, in the order given
    threshold: float
    method: str = MAHALANOBIS

    @property
    def outside(self) -> tuple[bool, ...]:
        return tuple(d > self.threshold for d in self.distances)

    @property
    def images_outside(self) -> int:
        return sum(self.outside)

    @property
    def scored(self) -> bool:
        return 2 * self.images_outside <= len(self.distances)

    @property
    def distance(self) -> float:
        """The study's distance: the median of its images'."""
        return float(np.median(self.distances))


def _feature_rows(values: npt.ArrayLike, label: str, dim: int | None = None) -> FloatArray:
    rows = np.asarray(values, dtype=np.float64)
    if rows.ndim != 2 or (dim is not None and rows.shape[1] != dim):
        expected = "[N, D]" if dim is None else f"[N, {dim}]"
        raise OodReferenceError(f"{label} features must be {expected}, got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise OodReferenceError(f"{label} features hold NaN or infinity")
    return rows


def _read_npz(path: Path) -> dict[str, npt.NDArray[Any]]:
    try:
        # allow_pickle=False: a reference file must never be able to run code when opened.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise OodReferenceError(f"out-of-distribution reference {path} is not an .npz archive")
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise OodReferenceError(f"cannot read out-of-distribution reference {path}: {exc}") from exc
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise OodReferenceError(
            f"out-of-distribution reference {path} lacks {', '.join(missing)}: "
            "fit it again with pacsclip model fit-ood"
        )
    if int(arrays["format_version"]) != OOD_FORMAT_VERSION:
        raise OodReferenceError(
            f"out-of-distribution reference {path} has format version "
            f"{int(arrays['format_version'])}; this pacsclip reads version {OOD_FORMAT_VERSION}"
        )
    return arrays
