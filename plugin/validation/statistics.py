"""Figures of one model on one finding at one site, against report labels (pure, numpy only).

AUROC with a percentile bootstrap interval, sensitivity, specificity and PPV at the model's
threshold, alert rate, calibration (reliability bins), and the paired difference between two
models scored on the same studies: the studies are resampled together, so what the two have in
common (hard cases, the mix) cancels in the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from plugin.demo.evaluation import Interval, auroc_columns, bootstrap_auroc_intervals, reliability

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Floors:
    """What validation needs before it gives a figure, and what a candidate must reach to go
    live."""

    min_positives: int = 20
    min_negatives: int = 20
    auroc_floor: float = 0.70
    bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class FindingFigures:
    """One model, one finding, one site. ``enough`` is False when there are too few labels:
    then only the counts are given, and ``missing`` says how many more are needed."""

    positives: int
    negatives: int
    enough: bool
    missing: str | None = None
    auroc: Interval | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    alert_rate: float | None = None
    threshold: float | None = None
    ece: float | None = None
    reliability_bins: list[dict[str, float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "positives": self.positives,
            "negatives": self.negatives,
            "enough": self.enough,
        }
        if self.auroc is None:
            data["missing"] = self.missing
            return data
        data.update(
            auroc=_finite(self.auroc.estimate),
            auroc_ci95=[_finite(self.auroc.low), _finite(self.auroc.high)],
            threshold=self.threshold,
            sensitivity=self.sensitivity,
            specificity=self.specificity,
            ppv=self.ppv,
            alert_rate=self.alert_rate,
            ece=self.ece,
            reliability=self.reliability_bins,
        )
        return data


def shortfall(positives: int, negatives: int, floors: Floors) -> str | None:
    """What is missing before a figure means anything, or None when enough is labeled."""
    needs = []
    if positives < floors.min_positives:
        needs.append(f"{floors.min_positives - positives} more positive")
    if negatives < floors.min_negatives:
        needs.append(f"{floors.min_negatives - negatives} more negative")
    if not needs:
        return None
    return (
        f"{positives} positive and {negatives} negative labeled studies; needs at least "
        f"{floors.min_positives} and {floors.min_negatives} ({' and '.join(needs)})"
    )


def finding_figures(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float, floors: Floors
) -> FindingFigures:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    missing = shortfall(positives, negatives, floors)
    if missing is not None:
        return FindingFigures(positives, negatives, enough=False, missing=missing)
    (auroc,), _ = bootstrap_auroc_intervals(
        s[:, None], y[:, None], n_resamples=floors.bootstrap, seed=floors.seed
    )
    alert = s >= threshold
    true_pos = int((alert & y).sum())
    bins = reliability(s, y)
    return FindingFigures(
        positives,
        negatives,
        enough=True,
        auroc=auroc,
        sensitivity=true_pos / positives,
        specificity=int((~alert & ~y).sum()) / negatives,
        ppv=true_pos / int(alert.sum()) if alert.any() else None,
        alert_rate=float(alert.mean()),
        threshold=threshold,
        ece=bins.ece,
        reliability_bins=[
            {"predicted": float(p), "observed": float(o), "count": int(c)}
            for p, o, c in zip(bins.predicted, bins.observed, bins.counts, strict=True)
        ],
    )


def paired_auroc_difference(
    candidate: npt.ArrayLike,
    reference: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """AUROC(candidate) - AUROC(reference) on the same studies, with a paired bootstrap interval."""
    both = np.stack([np.asarray(candidate, float), np.asarray(reference, float)], axis=1)
    y = np.asarray(labels, dtype=bool)
    y2 = np.stack([y, y], axis=1)
    point = auroc_columns(both, y2)
    rng = np.random.default_rng([seed, 29])
    differences = np.empty(n_resamples)
    step = 200
    for start in range(0, n_resamples, step):
        rows = rng.integers(0, len(y), size=(min(step, n_resamples - start), len(y)))
        aurocs = auroc_columns(both[rows], y2[rows])
        differences[start : start + len(rows)] = aurocs[:, 0] - aurocs[:, 1]
    finite = differences[np.isfinite(differences)]
    tail = 100.0 * (1.0 - level) / 2.0
    if finite.size == 0:
        return Interval(float(point[0] - point[1]), math.nan, math.nan)
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(point[0] - point[1]), float(low), float(high))


def _finite(value: float) -> float | None:
    return None if not math.isfinite(value) else round(value, 4)
