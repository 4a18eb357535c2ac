"""Temperature/bias calibration of finding probabilities, operating thresholds and decisions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize  # type: ignore[import-untyped]

from plugin.errors import PacsclipError
from plugin.triage.zeroshot import FloatArray, sigmoid

Decision = Literal["present", "absent", "indeterminate"]

# Probabilities are clipped this far from 0 and 1 before logit(), so a saturated float32
# score from the model maps to a large finite log-odds instead of infinity.
_PROB_EPS = 1e-7
# Bounds on 1/temperature: wide enough for any real model, finite so a separable
# fitting set cannot push the optimiser towards an infinite slope.
_SLOPE_BOUNDS = (1e-3, 1e3)


class InsufficientLabels(PacsclipError, ValueError):
    """A fitting set lacks a class: at least one positive and one negative are needed."""


def logit(p: npt.ArrayLike) -> FloatArray:
    """Log-odds of probabilities, clipped away from 0 and 1."""
    clipped = np.clip(np.asarray(p, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
    result: FloatArray = np.log(clipped) - np.log1p(-clipped)
    return result


@dataclass(frozen=True)
class Calibration:
    """Maps p to sigmoid((logit(p) - bias) / temperature); thresholds apply to the result.

    `indeterminate_band` is a half-width: calibrated scores closer than it to `threshold`
    are neither called present nor absent.
    """

    temperature: float = 1.0
    bias: float = 0.0
    threshold: float = 0.5
    indeterminate_band: float = 0.1
    fitted_on: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not math.isfinite(self.bias):
            raise ValueError(f"bias must be finite, got {self.bias}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if not 0.0 <= self.indeterminate_band < 0.5:
            raise ValueError(
                f"indeterminate_band must be in [0, 0.5), got {self.indeterminate_band}"
            )

    def apply(self, p: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities, same shape as `p`."""
        return sigmoid((logit(p) - self.bias) / self.temperature)

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any]) -> Calibration:
        """Build from a finding's `calibration` block in bundle.json; missing keys take defaults."""
        defaults = cls()
        fitted_on = block.get("fitted_on")
        return cls(
            temperature=float(block.get("temperature", defaults.temperature)),
            bias=float(block.get("bias", defaults.bias)),
            threshold=float(block.get("threshold", defaults.threshold)),
            indeterminate_band=float(block.get("indeterminate_band", defaults.indeterminate_band)),
            fitted_on=None if fitted_on is None else str(fitted_on),
        )

    def to_manifest(self) -> dict[str, Any]:
        """The `calibration` block to write back into bundle.json."""
        return asdict(self)


def decide(p: float, calibration: Calibration) -> Decision:
    """Decision for one *calibrated* probability (the output of `Calibration.apply`)."""
    if not math.isfinite(p):
        raise ValueError(f"cannot decide on a non-finite probability {p}")
    if abs(p - calibration.threshold) < calibration.indeterminate_band:
        return "indeterminate"
    return "present" if p >= calibration.threshold else "absent"


def fit_calibration(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    target_sensitivity: float | None = None,
    indeterminate_band: float = 0.1,
    fitted_on: str | None = None,
) -> Calibration:
    """Fit temperature and bias by log loss, then a threshold on the calibrated scores.

    The threshold maximises Youden's J (sensitivity + specificity - 1), or, when
    `target_sensitivity` is given, is the highest one that reaches that sensitivity.
    """
    scores = logit(_as_vector(probs, "probs"))
    positive = _binary_labels(labels, len(scores))
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    slope, intercept = _fit_platt(scores, positive)
    # The calibration is increasing, so the ranking (and hence the best cut) is the same on
    # the logit scale, where saturated calibrated scores cannot tie.
    if target_sensitivity is None:
        cut = _youden_cut(scores, positive)
    else:
        cut = _sensitivity_cut(scores, positive, target_sensitivity)
    threshold = float(sigmoid(slope * cut + intercept))
    return Calibration(
        temperature=1.0 / slope,
        bias=-intercept / slope,
        threshold=min(max(threshold, 1e-6), 1.0 - 1e-6),
        indeterminate_band=indeterminate_band,
        fitted_on=fitted_on,
    )


def _as_vector(values: npt.ArrayLike, name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a finite vector [N], got shape {array.shape}")
    return array


def _binary_labels(labels: npt.ArrayLike, count: int) -> npt.NDArray[np.bool_]:
    array = np.asarray(labels)
    if array.shape != (count,):
        raise ValueError(f"labels must have shape ({count},), got {array.shape}")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError("labels must be 0 (absent) or 1 (present)")
    positive: npt.NDArray[np.bool_] = array == 1
    if positive.all() or not positive.any():
        raise InsufficientLabels(
            f"calibration needs at least one positive and one negative label; got "
            f"{int(positive.sum())} positive and {int((~positive).sum())} negative"
        )
    return positive


def _fit_platt(scores: FloatArray, positive: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Slope and intercept of sigmoid(slope * score + intercept) minimising log loss."""
    n_pos = float(positive.sum())
    n_neg = float(len(positive) - n_pos)
    # Platt's smoothed targets keep the optimum finite on a perfectly separable set.
    targets = np.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss_and_grad(params: FloatArray) -> tuple[float, FloatArray]:
        linear = params[0] * scores + params[1]
        loss = float(np.mean(np.logaddexp(0.0, linear) - targets * linear))
        residual = sigmoid(linear) - targets
        grad = np.array([np.mean(residual * scores), np.mean(residual)])
        return loss, grad

    result = minimize(
        loss_and_grad,
        x0=np.array([1.0, 0.0]),
        jac=True,
        method="L-BFGS-B",
        bounds=[_SLOPE_BOUNDS, (None, None)],
    )
    return float(result.x[0]), float(result.x[1])


def _youden_cut(scores: FloatArray, positive: npt.NDArray[np.bool_]) -> float:
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order]
    # Evaluate only at the last of each run of equal scores: a threshold cannot split ties.
    run_ends = np.append(ranked[1:] != ranked[:-1], True)
    sensitivity = np.cumsum(hits)[run_ends] / hits.sum()
    false_positive_rate = np.cumsum(~hits)[run_ends] / (~hits).sum()
    best = int(np.argmax(sensitivity - false_positive_rate))
    return _cut_below(scores, float(ranked[run_ends][best]))


def _sensitivity_cut(scores: FloatArray, positive: npt.NDArray[np.bool_], target: float) -> float:
    ranked_positives = np.sort(scores[positive])[::-1]
    # The small slack keeps 0.9 * 10 from rounding up to 10 positives.
    needed = max(1, math.ceil(target * len(ranked_positives) - 1e-9))
    return _cut_below(scores, float(ranked_positives[needed - 1]))


def _cut_below(scores: FloatArray, lowest_called: float) -> float:
    """A cut halfway between `lowest_called` and the next lower score, for a margin both ways."""
    lower = scores[scores < lowest_called]
    next_lower = float(lower.max()) if lower.size else lowest_called - 1.0
    return 0.5 * (lowest_called + next_lower)
