"""Few-shot heads fitted on cached image embeddings: a linear probe and Tip-Adapter.

Both are multi-label: one binary present/absent decision per finding, columns in the order
of the `findings` they were fitted with. Both save to an .npz holding a format version and
the finding names, and refuse to load against a different list of findings.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize  # type: ignore[import-untyped]

from plugin.errors import ConfigError
from plugin.triage.calibration import InsufficientLabels, logit
from plugin.triage.zeroshot import FloatArray, l2_normalise, sigmoid

HEAD_FORMAT_VERSION: Final = 1


class HeadLoadError(ConfigError):
    """A head file is unreadable, of another kind or version, or fitted for other findings."""


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """Logistic regression per finding: P(present) = sigmoid(embeds @ weights + bias)."""

    KIND: ClassVar[str] = "linear_probe"

    findings: tuple[str, ...]
    weights: FloatArray  # [D, F]
    bias: FloatArray  # [F]

    @classmethod
    def fit(
        cls,
        embeds: npt.ArrayLike,
        labels_matrix: npt.ArrayLike,
        findings: Sequence[str],
        *,
        l2: float = 1.0,
    ) -> LinearProbe:
        """Fit by L-BFGS on the summed log loss + l2/2 * |weights|^2 (bias not penalised).

        This is scikit-learn's LogisticRegression with C = 1 / l2, one model per column.
        """
        features = _embeddings(embeds)
        targets = _label_matrix(labels_matrix, len(features), findings).astype(np.float64)
        for column, name in enumerate(findings):
            if targets[:, column].min() == targets[:, column].max():
                raise InsufficientLabels(
                    f"finding {name!r} needs at least one positive and one negative example"
                )
        if l2 <= 0:
            raise ValueError(f"l2 must be positive, got {l2}")
        weights, bias = _fit_logistic(features, targets, l2)
        return cls(tuple(findings), weights, bias)

    def predict_logits(self, embeds: npt.ArrayLike) -> FloatArray:
        """Log-odds [N, F]."""
        features = _embeddings(embeds, self.weights.shape[0])
        result: FloatArray = features @ self.weights + self.bias
        return result

    def predict_proba(self, embeds: npt.ArrayLike) -> FloatArray:
        """P(present) [N, F]."""
        return sigmoid(self.predict_logits(embeds))

    def save(self, path: Path) -> None:
        _write_npz(path, self.KIND, self.findings, {"weights": self.weights, "bias": self.bias})

    @classmethod
    def load(cls, path: Path, findings: Sequence[str]) -> LinearProbe:
        arrays = _read_npz(path, cls.KIND, ("weights", "bias"))
        columns = _columns_for(path, arrays["findings"], findings)
        weights, bias = _floats(arrays["weights"]), _floats(arrays["bias"])
        return cls(tuple(findings), weights[:, columns], bias[columns])


@dataclass(frozen=True, eq=False)
class TipAdapter:
    """Training-free cache model (Zhang et al., ECCV 2022) on top of zero-shot log-odds.

    Keys are the training image embeddings [M, D], values their labels [M, F]. A query's
    affinity to each key is exp(-beta * (1 - cos)); each cached example votes +1 (present)
    or -1 (absent) for each finding with that weight, and alpha times the summed vote is
    added to the zero-shot log-odds. This is the paper's one-hot cache with the two classes
    present/absent per finding, written as a log-odds difference.
    """

    KIND: ClassVar[str] = "tip_adapter"

    findings: tuple[str, ...]
    keys: FloatArray  # [M, D], unit rows
    values: FloatArray  # [M, F], 0 or 1
    alpha: float = 1.0
    beta: float = 5.5

    @classmethod
    def fit(
        cls,
        embeds: npt.ArrayLike,
        labels_matrix: npt.ArrayLike,
        findings: Sequence[str],
        *,
        alpha: float = 1.0,
        beta: float = 5.5,
    ) -> TipAdapter:
        """Build the cache; nothing is optimised (alpha and beta are chosen by the caller)."""
        keys = l2_normalise(_embeddings(embeds))
        values = _label_matrix(labels_matrix, len(keys), findings).astype(np.float64)
        if alpha < 0 or beta <= 0:
            raise ValueError(f"alpha must be >= 0 and beta > 0, got {alpha} and {beta}")
        return cls(tuple(findings), keys, values, float(alpha), float(beta))

    def predict_logits(
        self, image_embeds: npt.ArrayLike, zero_shot_probs: npt.ArrayLike
    ) -> FloatArray:
        """Zero-shot log-odds plus alpha times the affinity-weighted cache vote, [N, F]."""
        queries = l2_normalise(_embeddings(image_embeds, self.keys.shape[1]))
        prior = np.asarray(zero_shot_probs, dtype=np.float64)
        if prior.shape != (len(queries), len(self.findings)):
            raise ValueError(
                f"zero_shot_probs must have shape {(len(queries), len(self.findings))}, "
                f"got {prior.shape}"
            )
        affinity = np.exp(-self.beta * (1.0 - queries @ self.keys.T))
        result: FloatArray = logit(prior) + self.alpha * (affinity @ (2.0 * self.values - 1.0))
        return result

    def predict_proba(
        self, image_embeds: npt.ArrayLike, zero_shot_probs: npt.ArrayLike
    ) -> FloatArray:
        """P(present) [N, F]."""
        return sigmoid(self.predict_logits(image_embeds, zero_shot_probs))

    def save(self, path: Path) -> None:
        arrays: dict[str, npt.NDArray[Any]] = {
            "keys": self.keys,
            "values": self.values,
            "alpha": np.array(self.alpha),
            "beta": np.array(self.beta),
        }
        _write_npz(path, self.KIND, self.findings, arrays)

    @classmethod
    def load(cls, path: Path, findings: Sequence[str]) -> TipAdapter:
        arrays = _read_npz(path, cls.KIND, ("keys", "values", "alpha", "beta"))
        columns = _columns_for(path, arrays["findings"], findings)
        return cls(
            tuple(findings),
            _floats(arrays["keys"]),
            _floats(arrays["values"])[:, columns],
            float(arrays["alpha"]),
            float(arrays["beta"]),
        )


def _floats(array: npt.NDArray[np.generic]) -> FloatArray:
    return np.asarray(array, dtype=np.float64)


def _embeddings(embeds: npt.ArrayLike, dim: int | None = None) -> FloatArray:
    array = np.asarray(embeds, dtype=np.float64)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        expected = "[N, D]" if dim is None else f"[N, {dim}]"
        raise ValueError(f"embeddings must be {expected}, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("embeddings contain NaN or infinity")
    return array


def _label_matrix(
    labels: npt.ArrayLike, count: int, findings: Sequence[str]
) -> npt.NDArray[np.bool_]:
    array = np.asarray(labels)
    if array.shape != (count, len(findings)):
        raise ValueError(
            f"labels must have shape ({count}, {len(findings)}) for {len(findings)} findings, "
            f"got {array.shape}"
        )
    if not np.all((array == 0) | (array == 1)):
        raise ValueError("labels must be 0 (absent) or 1 (present)")
    if len(set(findings)) != len(findings):
        raise ValueError(f"finding names must be unique, got {list(findings)}")
    result: npt.NDArray[np.bool_] = array == 1
    return result


def _fit_logistic(
    features: FloatArray, targets: FloatArray, l2: float
) -> tuple[FloatArray, FloatArray]:
    """All columns at once: their losses are independent, so one L-BFGS run fits each."""
    count, dim = features.shape
    n_findings = targets.shape[1]

    def unpack(params: FloatArray) -> tuple[FloatArray, FloatArray]:
        return params[: dim * n_findings].reshape(dim, n_findings), params[dim * n_findings :]

    def loss_and_grad(params: FloatArray) -> tuple[float, FloatArray]:
        weights, bias = unpack(params)
        linear = features @ weights + bias
        # Divided by N throughout: same optimum, tolerances that do not depend on N.
        loss = np.sum(np.logaddexp(0.0, linear) - targets * linear) + 0.5 * l2 * np.sum(weights**2)
        residual = sigmoid(linear) - targets
        grad_w = features.T @ residual + l2 * weights
        grad = np.concatenate([grad_w.ravel(), residual.sum(axis=0)])
        return float(loss) / count, grad / count

    start = np.zeros(dim * n_findings + n_findings)
    result = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B")
    weights, bias = unpack(np.asarray(result.x, dtype=np.float64))
    return weights, bias


def _write_npz(
    path: Path, kind: str, findings: Sequence[str], arrays: Mapping[str, npt.NDArray[Any]]
) -> None:
    """Write beside the target and rename, so a reader never sees a half-written head."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    contents: dict[str, Any] = {
        "kind": np.array(kind),
        "format_version": np.array(HEAD_FORMAT_VERSION),
        "findings": np.array(list(findings), dtype=np.str_),
        **arrays,
    }
    with partial.open("wb") as handle:
        np.savez(handle, **contents)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _read_npz(path: Path, kind: str, names: Sequence[str]) -> dict[str, npt.NDArray[np.generic]]:
    try:
        # allow_pickle=False: a head file must never be able to run code when it is opened.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise HeadLoadError(f"head {path} is not an .npz archive")
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise HeadLoadError(f"cannot read head {path}: {exc}") from exc
    if "kind" not in arrays or str(arrays["kind"]) != kind:
        found = str(arrays["kind"]) if "kind" in arrays else "file of unknown kind"
        raise HeadLoadError(f"head {path} is a {found}, not a {kind}")
    missing = [name for name in ("format_version", "findings", *names) if name not in arrays]
    if missing:
        raise HeadLoadError(f"head {path} lacks {', '.join(missing)}")
    if int(arrays["format_version"]) != HEAD_FORMAT_VERSION:
        raise HeadLoadError(
            f"head {path} has format version {int(arrays['format_version'])}; "
            f"this pacsclip reads version {HEAD_FORMAT_VERSION}"
        )
    return arrays


def _columns_for(path: Path, stored: npt.NDArray[np.generic], wanted: Sequence[str]) -> list[int]:
    """Column of each wanted finding; the same findings in another order are re-ordered."""
    stored_names = [str(name) for name in stored]
    if sorted(stored_names) != sorted(wanted) or len(set(wanted)) != len(wanted):
        raise HeadLoadError(
            f"head {path} was fitted for findings {stored_names}, "
            f"but the bundle lists {list(wanted)}; refit the head"
        )
    return [stored_names.index(name) for name in wanted]
