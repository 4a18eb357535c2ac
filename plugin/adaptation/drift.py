"""How far each site's features are from the others': a domain classifier's AUROC.

For each site, a logistic regression learns to tell that site's rows from every other
site's; its cross-validated AUROC is the site's drift figure. 0.5: the classifier cannot tell
the site apart (no shift it can see); 1.0: every row's site is obvious. A high figure says
a model trained elsewhere sees inputs unlike its training data at that site, not that the
model is wrong there; a labelled validation at the site answers that.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from plugin.adaptation.evaluate import auroc
from plugin.adaptation.networks import FloatArray, Standardiser, as_features
from plugin.adaptation.train import fit_logistic


@dataclass(frozen=True)
class SiteDrift:
    site: str
    n_site: int  # rows of the site used (after subsampling)
    n_rest: int  # rows of the other sites used
    auroc: float  # mean over folds of the held-out AUROC, site vs rest


def site_drift(
    X: npt.ArrayLike,
    site: npt.ArrayLike,
    *,
    folds: int = 5,
    l2: float = 1.0,
    max_rows: int = 2000,
    seed: int = 0,
) -> list[SiteDrift]:
    """Drift of every site with at least ``folds`` rows, against all other sites' rows.

    Each side is subsampled to at most ``max_rows`` rows (a fixed ``seed``), which bounds the
    cost on a large catalog; folds are stratified, each model is fitted on standardised
    features of its training folds only.
    """
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    features = as_features(X)
    sites = np.asarray(site).astype(str)
    names = np.unique(sites)
    if len(names) < 2:
        raise ValueError("drift needs rows of at least two sites")
    rng = np.random.default_rng(seed)
    results = []
    for name in names:
        inside = _sample(np.flatnonzero(sites == name), max_rows, rng)
        outside = _sample(np.flatnonzero(sites != name), max_rows, rng)
        if min(len(inside), len(outside)) < folds:
            continue
        rows = np.concatenate([inside, outside])
        labels = np.concatenate([np.ones(len(inside)), np.zeros(len(outside))])
        score = _cross_validated_auroc(features[rows], labels, folds, l2, rng)
        results.append(SiteDrift(str(name), len(inside), len(outside), score))
    return results


def _sample(
    rows: npt.NDArray[np.int64], limit: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, size=limit, replace=False))


def _cross_validated_auroc(
    X: FloatArray, y: FloatArray, folds: int, l2: float, rng: np.random.Generator
) -> float:
    fold_of = np.empty(len(y), dtype=np.int64)
    for label in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(y == label))
        fold_of[members] = np.arange(len(members)) % folds
    scores = []
    for fold in range(folds):
        test = fold_of == fold
        scaler = Standardiser.fit(X[~test])
        weights, bias = fit_logistic(scaler.transform(X[~test]), y[~test], l2)
        scores.append(auroc(y[test], scaler.transform(X[test]) @ weights + bias))
    return statistics.fmean(scores)
