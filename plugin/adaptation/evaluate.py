"""Leave-one-site-out evaluation of the adaptation arms, for any tabular features.

Protocol, per target site and seed:

- the target's rows are split once (``split_seed``), stratified by outcome, into a training
  part (``train_fraction``) and a held-out part; every arm is scored on the same held-out
  rows, so arms are compared on identical patients (paired);
- the unsupervised arms train on all other sites with labels plus the *features* of the
  target's training part; the target's labels are blanked before :func:`fit` is called
  (and :func:`fit` blanks them again);
- target-only trains on the target's training part with labels; mixed on that plus sources;
- hyper-parameters and epochs are fixed in advance (optional early stopping looks only at
  the arm's labelled training rows), so no arm selects anything on target labels.

Metrics per target site: AUROC (mean over seeds) with a stratified bootstrap 95% interval
over the held-out rows, AUPRC, calibration slope and intercept; per method the median and
the worst site.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize  # type: ignore[import-untyped]
from scipy.stats import rankdata  # type: ignore[import-untyped]

from plugin.adaptation.networks import FloatArray, TrainingLog, as_features
from plugin.adaptation.train import (
    TARGET_LABEL_METHODS,
    AdaptationError,
    IntArray,
    Method,
    StrArray,
    TrainConfig,
    fit,
)

logger = logging.getLogger(__name__)

# Predictions are clipped this far from 0 and 1 before logit(), so a saturated score maps to
# a large finite log-odds in the calibration fit.
_PROB_EPS: Final = 1e-7


# --------------------------------------------------------------------------- metrics


def auroc(y: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half)."""
    labels, values = _binary(y), np.asarray(scores, dtype=np.float64)
    return float(_auroc_rows(values[None, :], labels)[0])


def _auroc_rows(scores: FloatArray, labels: FloatArray) -> FloatArray:
    """AUROC of each row of ``scores`` [B, N] against the same ``labels`` [N]."""
    positive = labels == 1.0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores, axis=1)
    u = ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    result: FloatArray = u / (n_pos * n_neg)
    return result


def roc_curve(y: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    tp, fp = _cumulative_counts(_binary(y), np.asarray(scores, dtype=np.float64))
    fpr = np.concatenate([[0.0], fp / fp[-1]])
    tpr = np.concatenate([[0.0], tp / tp[-1]])
    return fpr, tpr


def auprc(y: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision: sum over thresholds of (recall step) x precision."""
    tp, fp = _cumulative_counts(_binary(y), np.asarray(scores, dtype=np.float64))
    precision = tp / (tp + fp)
    recall_steps = np.diff(np.concatenate([[0.0], tp / tp[-1]]))
    return float(np.sum(recall_steps * precision))


def _cumulative_counts(labels: FloatArray, scores: FloatArray) -> tuple[FloatArray, FloatArray]:
    """True and false positives when thresholding at each distinct score, highest first."""
    order = np.argsort(-scores, kind="stable")
    ordered_scores, ordered_labels = scores[order], labels[order]
    last_of_tie = np.flatnonzero(np.diff(ordered_scores, append=-np.inf) != 0)
    tp = np.cumsum(ordered_labels)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64)


def calibration(y: npt.ArrayLike, probabilities: npt.ArrayLike) -> tuple[float, float]:
    """(slope, intercept) of logistic recalibration on logit(p).

    Slope: b of y ~ sigmoid(a + b logit p) (1 is ideal; < 1 means over-confident scores).
    Intercept: a of y ~ sigmoid(a + logit p), the slope fixed at 1 ("calibration in the
    large", 0 is ideal; > 0 means risk under-estimated), as Van Calster et al. recommend,
    so the intercept is read apart from the slope.
    """
    labels = _binary(y)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
    z = np.log(p) - np.log1p(-p)
    slope = _logistic_fit(labels, z, fit_slope=True)[1]
    intercept = _logistic_fit(labels, z, fit_slope=False)[0]
    return slope, intercept


def _logistic_fit(y: FloatArray, z: FloatArray, *, fit_slope: bool) -> tuple[float, float]:
    """Maximum-likelihood (a, b) of y ~ sigmoid(a + b z); b stays 1 unless ``fit_slope``."""

    def objective(params: FloatArray) -> tuple[float, FloatArray]:
        a, b = params[0], params[1] if fit_slope else 1.0
        eta = a + b * z
        residual = 1.0 / (1.0 + np.exp(-eta)) - y
        loss = float(np.sum(np.logaddexp(0.0, eta) - y * eta))
        grad = [residual.sum(), residual @ z] if fit_slope else [residual.sum()]
        return loss, np.asarray(grad)

    start = np.array([0.0, 1.0]) if fit_slope else np.array([0.0])
    # Bounded: a perfectly separated set would otherwise drive the slope to infinity.
    bounds = [(-50.0, 50.0)] * len(start)
    result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds)
    a = float(result.x[0])
    return a, float(result.x[1]) if fit_slope else 1.0


def bootstrap_auroc(
    y: npt.ArrayLike,
    scores_by_seed: npt.ArrayLike,
    *,
    n_resamples: int = 500,
    seed: int | Sequence[int] = 0,
) -> tuple[float, float]:
    """Percentile 95% interval of the seed-mean AUROC, resampling rows with replacement.

    Stratified (positives and negatives resampled separately, as pROC does), so every
    resample keeps both classes; all seeds' scores share each resample, so the interval is
    that of the seed-averaged AUROC. Same ``seed``, same resamples: arms scored on the same
    rows are resampled identically.
    """
    labels = _binary(y)
    scores = np.atleast_2d(np.asarray(scores_by_seed, dtype=np.float64))
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1.0), np.flatnonzero(labels == 0.0)
    rows = np.concatenate(
        [
            rng.choice(positives, size=(n_resamples, len(positives))),
            rng.choice(negatives, size=(n_resamples, len(negatives))),
        ],
        axis=1,
    )
    resampled_labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    per_seed = np.stack([_auroc_rows(s[rows], resampled_labels) for s in scores])
    low, high = np.percentile(per_seed.mean(axis=0), [2.5, 97.5])
    return float(low), float(high)


def _binary(y: npt.ArrayLike) -> FloatArray:
    labels = np.asarray(y, dtype=np.float64)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if labels.min() == labels.max():
        raise ValueError("metrics need at least one positive and one negative")
    return labels


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True, eq=False)
class TargetSplit:
    """Row indices (into the full X) of the target's training part and held-out part."""

    target_site: str
    train_rows: IntArray
    held_out_rows: IntArray


@dataclass(frozen=True, eq=False)
class Run:
    """One trained model: a method for a target site with a seed, scored on held-out rows."""

    method: str
    target_site: str
    seed: int
    scores: FloatArray
    log: TrainingLog
    auroc: float
    auprc: float
    calibration_slope: float
    calibration_intercept: float


@dataclass(frozen=True)
class SiteResult:
    """A method on one target site, over seeds (means), with the bootstrap AUROC interval."""

    method: str
    target_site: str
    n_held_out: int
    n_positive: int
    auroc: float
    auroc_low: float
    auroc_high: float
    auroc_by_seed: tuple[float, ...]
    auprc: float
    calibration_slope: float
    calibration_intercept: float


@dataclass(frozen=True)
class MethodSummary:
    """A method over target sites: median and worst site AUROC, medians of the rest."""

    method: str
    median_auroc: float
    worst_auroc: float
    worst_site: str
    median_auprc: float
    median_calibration_slope: float
    median_calibration_intercept: float
    seconds_per_epoch: float
    seconds_per_fit: float


@dataclass(frozen=True, eq=False)
class Results:
    """Everything :func:`evaluate` measured; ``held_out_labels`` are the metrics' truth."""

    methods: tuple[str, ...]
    target_sites: tuple[str, ...]
    seeds: tuple[int, ...]
    held_out_labels: Mapping[str, FloatArray]
    runs: tuple[Run, ...]
    sites: tuple[SiteResult, ...]
    settings: Mapping[str, float | int | str]

    def site_result(self, method: str, target_site: str) -> SiteResult:
        for result in self.sites:
            if result.method == method and result.target_site == target_site:
                return result
        raise KeyError((method, target_site))

    def runs_of(self, method: str, target_site: str | None = None) -> list[Run]:
        return [r for r in self.runs if r.method == method and target_site in (None, r.target_site)]

    def summary(self) -> tuple[MethodSummary, ...]:
        return tuple(self._summarise(method) for method in self.methods)

    def _summarise(self, method: str) -> MethodSummary:
        rows = [r for r in self.sites if r.method == method]
        worst = min(rows, key=lambda r: r.auroc)
        runs = self.runs_of(method)
        return MethodSummary(
            method=method,
            median_auroc=statistics.median(r.auroc for r in rows),
            worst_auroc=worst.auroc,
            worst_site=worst.target_site,
            median_auprc=statistics.median(r.auprc for r in rows),
            median_calibration_slope=statistics.median(r.calibration_slope for r in rows),
            median_calibration_intercept=statistics.median(r.calibration_intercept for r in rows),
            seconds_per_epoch=statistics.fmean(r.log.seconds_per_epoch for r in runs),
            seconds_per_fit=statistics.fmean(r.log.total_seconds for r in runs),
        )


def split_target(
    y: npt.ArrayLike,
    site: npt.ArrayLike,
    target_site: str,
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> TargetSplit:
    """Stratified split of the target's rows; each part keeps at least one of each class.

    The split uses the target's labels only to stratify, a property of the evaluation, not
    of any arm: the training part's labels reach only target-only and mixed.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    labels = np.asarray(y, dtype=np.float64)
    rows = np.flatnonzero(np.asarray(site).astype(str) == str(target_site))
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in (0.0, 1.0):
        members = rng.permutation(rows[labels[rows] == label])
        if len(members) < 2:
            raise AdaptationError(
                f"target site {target_site!r} has {len(members)} rows with outcome "
                f"{int(label)}; the split needs at least 2"
            )
        n_train = min(max(round(train_fraction * len(members)), 1), len(members) - 1)
        train.append(members[:n_train])
        held_out.append(members[n_train:])
    return TargetSplit(
        str(target_site), np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))
    )


def evaluate_target(
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    site: npt.ArrayLike,
    split: TargetSplit,
    methods: Sequence[Method],
    seeds: Sequence[int],
    *,
    config: TrainConfig | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Train every method and seed for ``split.target_site`` and score its held-out rows.

    The held-out rows never reach training; the training part's labels reach only the
    target-only and mixed arms (blanked here for the others, and again inside fit()).
    """
    features = as_features(X)
    labels = np.asarray(y, dtype=np.float64)
    sites: StrArray = np.asarray(site).astype(str)
    is_target = sites == split.target_site
    train_rows = np.concatenate([np.flatnonzero(~is_target), split.train_rows])
    held_out_y = labels[split.held_out_rows]
    held_out_x = features[split.held_out_rows]
    runs = []
    for method in methods:
        train_y = labels[train_rows]
        if method not in TARGET_LABEL_METHODS:
            train_y = np.where(is_target[train_rows], np.nan, train_y)
        for seed in seeds:
            model = fit(
                method,
                features[train_rows],
                train_y,
                sites[train_rows],
                split.target_site,
                seed=seed,
                config=config,
            )
            run = _score(
                model.predict_proba(held_out_x), held_out_y, method, split, seed, model.log
            )
            logger.info(
                "adaptation run method=%s target=%s seed=%d auroc=%.3f seconds=%.2f",
                method,
                split.target_site,
                seed,
                run.auroc,
                model.log.total_seconds,
            )
            if on_run is not None:
                on_run(run)
            runs.append(run)
    return runs


def _score(
    scores: FloatArray, y: FloatArray, method: str, split: TargetSplit, seed: int, log: TrainingLog
) -> Run:
    slope, intercept = calibration(y, scores)
    return Run(
        method=method,
        target_site=split.target_site,
        seed=seed,
        scores=scores,
        log=log,
        auroc=auroc(y, scores),
        auprc=auprc(y, scores),
        calibration_slope=slope,
        calibration_intercept=intercept,
    )


def evaluate(
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    site: npt.ArrayLike,
    methods: Sequence[Method],
    seeds: Sequence[int],
    *,
    target_sites: Sequence[str] | None = None,
    config: TrainConfig | None = None,
    train_fraction: float = 0.5,
    split_seed: int = 0,
    n_bootstrap: int = 500,
    bootstrap_seed: int = 0,
    on_run: Callable[[Run], None] | None = None,
) -> Results:
    """Each site in turn (or each of ``target_sites``) as the target; see the module doc."""
    if not methods or not seeds:
        raise ValueError("evaluate needs at least one method and one seed")
    sites = np.asarray(site).astype(str)
    targets = tuple(str(t) for t in (target_sites or np.unique(sites)))
    labels = np.asarray(y, dtype=np.float64)
    runs: list[Run] = []
    site_results: list[SiteResult] = []
    held_out_labels: dict[str, FloatArray] = {}
    for index, target in enumerate(targets):
        split = split_target(labels, sites, target, train_fraction=train_fraction, seed=split_seed)
        target_runs = evaluate_target(
            X, labels, sites, split, methods, seeds, config=config, on_run=on_run
        )
        held_out = labels[split.held_out_rows]
        held_out_labels[target] = held_out
        for method in methods:
            method_runs = [r for r in target_runs if r.method == method]
            # One bootstrap seed per target, shared by all methods: paired intervals.
            site_results.append(
                _site_result(method_runs, held_out, n_bootstrap, (bootstrap_seed, index))
            )
        runs += target_runs
    cfg = config or TrainConfig()
    settings: dict[str, float | int | str] = {
        "epochs": cfg.epochs,
        "train_fraction": train_fraction,
        "split_seed": split_seed,
        "n_bootstrap": n_bootstrap,
        "bootstrap_seed": bootstrap_seed,
        "mdan_combine": cfg.mdan_combine,
        "validation_fraction": cfg.validation_fraction,
    }
    return Results(
        tuple(methods),
        targets,
        tuple(seeds),
        held_out_labels,
        tuple(runs),
        tuple(site_results),
        settings,
    )


def _site_result(
    runs: list[Run], y: FloatArray, n_bootstrap: int, seed: tuple[int, int]
) -> SiteResult:
    scores = np.stack([r.scores for r in runs])
    low, high = bootstrap_auroc(y, scores, n_resamples=n_bootstrap, seed=seed)
    return SiteResult(
        method=runs[0].method,
        target_site=runs[0].target_site,
        n_held_out=len(y),
        n_positive=int(y.sum()),
        auroc=statistics.fmean(r.auroc for r in runs),
        auroc_low=low,
        auroc_high=high,
        auroc_by_seed=tuple(r.auroc for r in runs),
        auprc=statistics.fmean(r.auprc for r in runs),
        calibration_slope=statistics.fmean(r.calibration_slope for r in runs),
        calibration_intercept=statistics.fmean(r.calibration_intercept for r in runs),
    )


# --------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True, eq=False)
class SyntheticSites:
    """A synthetic multi-site table: features [N, D], outcome [N], site [N], and per site the
    fraction of informative concepts it writes in its own words (``dialect``)."""

    X: FloatArray
    y: FloatArray
    site: StrArray
    dialect: Mapping[str, float]


def make_shifted_sites(
    *,
    n_sites: int = 13,
    n_rows: int = 3210,
    n_features: int = 1000,
    n_informative: int = 24,
    n_latent: int = 4,
    prevalence: tuple[float, float] = (0.03, 0.15),
    dialect: Sequence[float] | tuple[float, float] = (0.2, 0.8),
    signal: float = 2.0,
    binary: bool = True,
    seed: int = 0,
) -> SyntheticSites:
    """Synthetic sites where a model trained on other sites transfers badly. Not clinical.

    A latent clinical state z (``n_latent``-d, same meaning everywhere) drives the outcome
    and ``n_informative`` shared concept columns (noisy projections of z). Each site writes a
    fraction of those concepts in its own words: the signal moves to that site's private
    columns (one per informative concept) and the shared column keeps only noise, so a model
    trained on other sites has never seen the words the target uses: a site-specific
    permutation (rotation) of the informative features. ``dialect`` is either one fraction
    per site or a (low, high) range to draw them from. The remaining shared columns are
    uninformative concepts whose frequency differs by site (documentation habits).
    Layout: shared columns first, then ``n_informative`` private columns per site, all
    within ``n_features``. ``binary`` turns features into sparse 0/1 concept indicators.
    """
    n_shared = n_features - n_sites * n_informative
    if n_shared < n_informative:
        raise ValueError(f"n_features={n_features} too small for {n_sites} sites' private columns")
    rng = np.random.default_rng(seed)
    names = [f"site{i + 1:02d}" for i in range(n_sites)]
    fractions = _dialect_fractions(dialect, n_sites, rng)
    loadings = rng.normal(0.0, 1.0, (n_latent, n_informative)) / np.sqrt(n_latent)
    outcome_weights = rng.normal(0.0, 1.0, n_latent) / np.sqrt(n_latent)
    blocks_x, blocks_y = [], []
    for index, size in enumerate(_site_sizes(n_rows, n_sites, rng)):
        z = rng.normal(0.0, 1.0, (size, n_latent))
        blocks_y.append(_draw_outcome(signal * z @ outcome_weights, rng.uniform(*prevalence), rng))
        latent = rng.normal(0.0, 1.0, (size, n_features))
        # Site habits: each site charts some uninformative concepts more or less often.
        latent[:, :n_shared] += rng.normal(0.0, 1.0, n_shared) * (rng.random(n_shared) < 0.1)
        concepts = z @ loadings
        moved = rng.permutation(n_informative)[: round(fractions[index] * n_informative)]
        kept = np.setdiff1d(np.arange(n_informative), moved)
        latent[:, kept] += 1.5 * concepts[:, kept]
        private = n_shared + index * n_informative
        latent[:, private + moved] += 1.5 * concepts[:, moved]
        # Other sites' private words never appear here.
        others = np.ones(n_features, dtype=bool)
        others[:n_shared] = False
        others[private + moved] = False
        latent[:, others] = -np.inf if binary else 0.0
        blocks_x.append(_observe(latent, binary, rng))
    return SyntheticSites(
        np.concatenate(blocks_x),
        np.concatenate(blocks_y),
        np.concatenate(
            [np.full(size, name) for size, name in zip(map(len, blocks_y), names, strict=True)]
        ),
        dict(zip(names, fractions, strict=True)),
    )


def _dialect_fractions(
    dialect: Sequence[float] | tuple[float, float], n_sites: int, rng: np.random.Generator
) -> list[float]:
    if len(dialect) == n_sites:
        return [float(f) for f in dialect]
    if len(dialect) != 2:
        raise ValueError("dialect must be one fraction per site or a (low, high) range")
    return [float(f) for f in rng.uniform(dialect[0], dialect[1], n_sites)]


def _site_sizes(n_rows: int, n_sites: int, rng: np.random.Generator) -> list[int]:
    """Uneven site sizes summing to ``n_rows``, none below half the mean."""
    shares = 0.5 / n_sites + 0.5 * rng.dirichlet(np.full(n_sites, 4.0))
    sizes = np.floor(shares * n_rows).astype(int)
    sizes[: n_rows - sizes.sum()] += 1
    return [int(s) for s in sizes]


def _draw_outcome(risk: FloatArray, prevalence: float, rng: np.random.Generator) -> FloatArray:
    """Bernoulli outcomes whose mean is about ``prevalence`` (intercept found by bisection)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2.0
        if np.mean(1.0 / (1.0 + np.exp(-(risk + middle)))) < prevalence:
            low = middle
        else:
            high = middle
    p = 1.0 / (1.0 + np.exp(-(risk + low)))
    result: FloatArray = (rng.random(len(risk)) < p).astype(np.float64)
    return result


def _observe(latent: FloatArray, binary: bool, rng: np.random.Generator) -> FloatArray:
    if not binary:
        return latent
    # Shifted so a concept is charted in about one note in ten, like frequent note concepts.
    p = 1.0 / (1.0 + np.exp(-(latent - 2.5)))
    result: FloatArray = (rng.random(latent.shape) < p).astype(np.float64)
    return result
