"""Training of every arm behind one entry point, :func:`fit`.

Rows whose site is ``target_site`` are the target; all others are labelled sources. The
unsupervised arms (source-only, Single-/Multi-DANN, per-site standardisation, CORAL) get the
target as a :class:`TargetData`, which has no label field: :func:`fit` blanks the target's
labels before it builds anything, so no code path of those arms can read them. Only the
target-only and mixed arms, which exist to use target labels, get a labelled target.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy.optimize import minimize  # type: ignore[import-untyped]

from plugin.adaptation.grl import dann_lambda
from plugin.adaptation.networks import (
    AdaptedModel,
    DannNetwork,
    FloatArray,
    LinearModel,
    NeuralModel,
    Standardiser,
    TrainingLog,
    as_features,
)
from plugin.errors import PacsclipError

Method = Literal[
    "source-only",
    "target-only",
    "mixed",
    "single-dann",
    "multi-dann",
    "standardised-lr",
    "coral-lr",
]
METHODS: Final[tuple[Method, ...]] = get_args(Method)
# The arms that exist to use the target's labels; every other arm must never see them.
TARGET_LABEL_METHODS: Final[frozenset[Method]] = frozenset({"target-only", "mixed"})
UNSUPERVISED_METHODS: Final[tuple[Method, ...]] = tuple(
    m for m in METHODS if m not in TARGET_LABEL_METHODS
)

IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]


class AdaptationError(PacsclipError, ValueError):
    """Inputs an arm cannot train on: no target rows, labels not 0/1, a class missing."""


@dataclass(frozen=True, eq=False)
class LabelledData:
    """Rows with outcomes: features [N, D], labels [N] in {0, 1}, site of each row [N]."""

    X: FloatArray
    y: FloatArray
    site: StrArray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class TargetData:
    """The target site's features only. Deliberately without a label field."""

    X: FloatArray


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters, fixed in advance: no arm may tune them on target labels.

    ``validation_fraction`` > 0 turns on early stopping on that fraction of the *labelled*
    training rows (sources for the unsupervised arms), stratified by site and label; the
    default 0 trains for exactly ``epochs`` epochs.
    """

    epochs: int = 30
    batch_size: int = 64
    # Multi-DANN draws this many rows from every source per step (MDAN-style).
    source_batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (64,)
    dropout: float = 0.2
    domain_weight: float = 1.0
    lambda_gamma: float = 10.0
    mdan_combine: Literal["soft", "hard"] = "soft"
    mdan_gamma: float = 10.0
    validation_fraction: float = 0.0
    patience: int = 5
    l2: float = 1.0
    coral_regulariser: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.source_batch_size < 1:
            raise ValueError("epochs and batch sizes must be at least 1")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(
                f"validation_fraction must be in [0, 0.5), got {self.validation_fraction}"
            )
        if self.mdan_gamma <= 0 or self.l2 <= 0 or self.coral_regulariser <= 0:
            raise ValueError("mdan_gamma, l2 and coral_regulariser must be positive")


# A step's loss as a function of training progress in [0, 1], and steps per epoch.
_StepLoss = tuple[Callable[[float], torch.Tensor], int]
# Builds the step loss from the training rows, the network, the batch RNG and the scaled
# target features (empty for the arms without a target).
_LossBuilder = Callable[[LabelledData, DannNetwork, np.random.Generator, torch.Tensor], _StepLoss]


# --------------------------------------------------------------------------- entry point


def fit(
    method: Method,
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    site: npt.ArrayLike,
    target_site: str,
    *,
    seed: int,
    epochs: int | None = None,
    config: TrainConfig | None = None,
) -> AdaptedModel:
    """Train ``method`` for ``target_site``; the result scores that site's rows.

    ``y`` of target rows is read only by the target-only and mixed arms; the others accept
    NaN there. Sources need labels in {0, 1}. ``epochs`` overrides ``config.epochs``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    cfg = config or TrainConfig()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    features = as_features(X)
    sites = np.asarray(site).astype(str)
    labels = np.asarray(y, dtype=np.float64)
    if sites.shape != (len(features),) or labels.shape != (len(features),):
        raise ValueError("X, y and site must have the same number of rows")
    is_target = sites == str(target_site)
    if not is_target.any():
        raise AdaptationError(f"no rows of target site {target_site!r}")
    if method in TARGET_LABEL_METHODS:
        source = _labelled(features[~is_target], labels[~is_target], sites[~is_target])
        target = _labelled(features[is_target], labels[is_target], sites[is_target])
        return _SUPERVISED_TRAINERS[method](source, target, cfg, seed)
    # Blank the target's labels before anything is built from them: from here on they
    # do not exist for the unsupervised arms.
    visible = np.where(is_target, np.nan, labels)
    source = _labelled(features[~is_target], visible[~is_target], sites[~is_target])
    return _UNSUPERVISED_TRAINERS[method](source, TargetData(features[is_target]), cfg, seed)


def _labelled(X: FloatArray, y: FloatArray, site: StrArray) -> LabelledData:
    if len(y) == 0:
        raise AdaptationError("no labelled rows to train on")
    if not np.isin(y, (0.0, 1.0)).all():
        raise AdaptationError("labels of training rows must be 0 or 1 (NaN found or other)")
    if y.min() == y.max():
        raise AdaptationError("labelled rows need at least one positive and one negative")
    return LabelledData(X, y, site)


# --------------------------------------------------------------------------- neural arms


def _train_source_only(
    source: LabelledData, target: TargetData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    # The target's features are offered and, by definition of the arm, ignored.
    return _train_plain("source-only", source, cfg, seed)


def _train_target_only(
    source: LabelledData, target: LabelledData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    return _train_plain("target-only", target, cfg, seed)


def _train_mixed(
    source: LabelledData, target: LabelledData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    pooled = LabelledData(
        np.concatenate([source.X, target.X]),
        np.concatenate([source.y, target.y]),
        np.concatenate([source.site, target.site]),
    )
    return _train_plain("mixed", pooled, cfg, seed)


def _train_plain(method: str, data: LabelledData, cfg: TrainConfig, seed: int) -> NeuralModel:
    def build(
        train: LabelledData, network: DannNetwork, rng: np.random.Generator, xt: torch.Tensor
    ) -> _StepLoss:
        x, y = _tensor(train.X), _tensor(train.y)
        batches = _cycle(len(train), cfg.batch_size, rng)

        def loss(progress: float) -> torch.Tensor:
            idx = next(batches)
            return F.binary_cross_entropy_with_logits(network(x[idx]), y[idx])

        return loss, math.ceil(len(train) / cfg.batch_size)

    return _train_network(method, data, None, 0, build, cfg, seed)


def _train_single_dann(
    source: LabelledData, target: TargetData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    """DANN with the sources merged: one discriminator, every source row vs the target."""

    def build(
        train: LabelledData, network: DannNetwork, rng: np.random.Generator, xt: torch.Tensor
    ) -> _StepLoss:
        xs, ys = _tensor(train.X), _tensor(train.y)
        source_batches = _cycle(len(train), cfg.batch_size, rng)
        target_batches = _cycle(len(xt), cfg.batch_size, rng)

        def loss(progress: float) -> torch.Tensor:
            idx_s, idx_t = next(source_batches), next(target_batches)
            h = network.features(torch.cat([xs[idx_s], xt[idx_t]]))
            n = len(idx_s)
            task = F.binary_cross_entropy_with_logits(network.classify(h[:n]), ys[idx_s])
            lam = dann_lambda(progress, cfg.lambda_gamma)
            domain = _domain_loss(network.discriminate(h[None], lam), n, len(idx_t))[0]
            return task + cfg.domain_weight * domain

        return loss, math.ceil(len(train) / cfg.batch_size)

    return _train_network("single-dann", source, target, 1, build, cfg, seed)


def _train_multi_dann(
    source: LabelledData, target: TargetData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    """MDAN (Zhao et al. 2018): one discriminator per source site, losses combined.

    Each step draws ``source_batch_size`` rows from every source and as many target rows;
    discriminator k separates source k from the target (all heads in one batched call).
    ``soft`` minimises (1/gamma) log sum_k exp(gamma (task_k + w dom_k)), ``hard``
    max_k task_k + w min_k dom_k (MDAN's "dynamic" and "maxmin"; docs/adaptation.md says
    why soft is the default).
    """
    source_sites = np.unique(source.site)

    def build(
        train: LabelledData, network: DannNetwork, rng: np.random.Generator, xt: torch.Tensor
    ) -> _StepLoss:
        xs, ys = _tensor(train.X), _tensor(train.y)
        members = [np.flatnonzero(train.site == name) for name in source_sites]
        b = cfg.source_batch_size
        per_source = [_cycle(len(rows), b, rng, rows) for rows in members]
        target_batches = _cycle(len(xt), b, rng)

        def loss(progress: float) -> torch.Tensor:
            idx = np.stack([next(batches) for batches in per_source])  # [K, b]
            idx_t = next(target_batches)  # [b]
            k = len(idx)
            h = network.features(torch.cat([xs[idx.reshape(-1)], xt[idx_t]]))
            h_s = h[: k * b].reshape(k, b, -1)
            h_t = h[k * b :].expand(k, b, -1)
            task_logits = network.classify(h_s)  # [K, b]
            tasks = F.binary_cross_entropy_with_logits(task_logits, ys[idx], reduction="none").mean(
                dim=1
            )
            lam = dann_lambda(progress, cfg.lambda_gamma)
            # Head k sees source k's rows then the shared target rows.
            domain_logits = network.discriminate(torch.cat([h_s, h_t], dim=1), lam)
            return _combine_mdan(tasks, _domain_loss(domain_logits, b, b), cfg)

        largest = max(len(rows) for rows in members)
        return loss, math.ceil(largest / b)

    return _train_network("multi-dann", source, target, len(source_sites), build, cfg, seed)


def _combine_mdan(tasks: torch.Tensor, domains: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.mdan_combine == "hard":
        # Worst source's task loss, and the best-separated source's discriminator loss:
        # the reversed gradient then pushes on the source furthest from the target.
        return tasks.max() + cfg.domain_weight * domains.min()
    combined = tasks + cfg.domain_weight * domains
    return torch.logsumexp(cfg.mdan_gamma * combined, dim=0) / cfg.mdan_gamma


def _domain_loss(logits: torch.Tensor, n_source: int, n_target: int) -> torch.Tensor:
    """Discriminator loss per head [K] for logits [K, n_source + n_target] (target = 1)."""
    labels = torch.cat([torch.zeros(n_source), torch.ones(n_target)]).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)


def _train_network(
    method: str,
    labelled: LabelledData,
    target: TargetData | None,
    n_domain_heads: int,
    build: _LossBuilder,
    cfg: TrainConfig,
    seed: int,
) -> NeuralModel:
    """Scale, split off validation rows, build the network and step loss, optimise.

    Global torch RNG state is forked, so a seeded fit leaves the caller's RNG untouched.
    """
    rng = np.random.default_rng(seed)
    # Statistics of the labelled rows only: a label-free choice, identical for every arm.
    scaler = Standardiser.fit(labelled.X)
    scaled = LabelledData(scaler.transform(labelled.X), labelled.y, labelled.site)
    train, validation = _validation_split(scaled, cfg.validation_fraction, rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = DannNetwork(labelled.X.shape[1], cfg.hidden, n_domain_heads, dropout=cfg.dropout)
        xt = torch.empty(0) if target is None else _tensor(scaler.transform(target.X))
        step_loss, steps_per_epoch = build(train, network, rng, xt)
        log = _optimise(network, step_loss, steps_per_epoch, validation, cfg)
    network.eval()
    return NeuralModel(method, network, scaler, log)


def _optimise(
    network: DannNetwork,
    step_loss: Callable[[float], torch.Tensor],
    steps_per_epoch: int,
    validation: LabelledData | None,
    cfg: TrainConfig,
) -> TrainingLog:
    optimiser = torch.optim.Adam(
        network.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    total_steps = steps_per_epoch * cfg.epochs
    epoch_seconds: list[float] = []
    best = (math.inf, copy.deepcopy(network.state_dict()))
    stale = 0
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        network.train()
        for step in range(steps_per_epoch):
            loss = step_loss((epoch * steps_per_epoch + step) / total_steps)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
        if validation is not None:
            score = _validation_loss(network, validation)
            if score < best[0]:
                best, stale = (score, copy.deepcopy(network.state_dict())), 0
            else:
                stale += 1
        epoch_seconds.append(time.perf_counter() - started)
        if validation is not None and stale >= cfg.patience:
            break
    if validation is not None:
        network.load_state_dict(best[1])
    return TrainingLog(len(epoch_seconds), tuple(epoch_seconds), sum(epoch_seconds))


def _validation_loss(network: DannNetwork, validation: LabelledData) -> float:
    network.eval()
    with torch.no_grad():
        logits = network(_tensor(validation.X))
        return float(F.binary_cross_entropy_with_logits(logits, _tensor(validation.y)))


def _validation_split(
    data: LabelledData, fraction: float, rng: np.random.Generator
) -> tuple[LabelledData, LabelledData | None]:
    """Hold out ``fraction`` of each (site, label) group; (data, None) when fraction is 0."""
    if fraction == 0.0:
        return data, None
    held = np.zeros(len(data), dtype=bool)
    for name in np.unique(data.site):
        for label in (0.0, 1.0):
            rows = np.flatnonzero((data.site == name) & (data.y == label))
            held[rng.permutation(rows)[: round(fraction * len(rows))]] = True
    if held.all() or not held.any():
        raise AdaptationError("too few labelled rows for a validation split")
    keep = ~held
    return (
        LabelledData(data.X[keep], data.y[keep], data.site[keep]),
        LabelledData(data.X[held], data.y[held], data.site[held]),
    )


def _cycle(
    n: int, batch_size: int, rng: np.random.Generator, rows: IntArray | None = None
) -> Iterator[IntArray]:
    """Endless mini-batches of ``rows`` (default 0..n-1), reshuffled on every pass.

    Every batch has exactly ``batch_size`` rows (Multi-DANN stacks the sources' batches);
    a group smaller than that is sampled with replacement.
    """
    pool = np.arange(n) if rows is None else rows
    if n < batch_size:
        while True:
            yield rng.choice(pool, size=batch_size)
    size = batch_size
    while True:
        order = rng.permutation(pool)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def _tensor(array: FloatArray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float32)


# --------------------------------------------------------------------------- linear arms


def _train_standardised_lr(
    source: LabelledData, target: TargetData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    """Each site z-scored with its own statistics, then one logistic regression.

    Removes per-site location and scale shifts (a site charting a concept more often);
    the target's statistics come from its unlabelled features.
    """
    started = time.perf_counter()
    scaled = np.empty_like(source.X)
    for name in np.unique(source.site):
        rows = source.site == name
        scaled[rows] = Standardiser.fit(source.X[rows]).transform(source.X[rows])
    weights, bias = fit_logistic(scaled, source.y, cfg.l2)
    log = _single_pass_log(started)
    return LinearModel("standardised-lr", weights, bias, Standardiser.fit(target.X), log)


def _train_coral_lr(
    source: LabelledData, target: TargetData, cfg: TrainConfig, seed: int
) -> AdaptedModel:
    """Multi-source CORAL (Sun et al. 2016): each source re-coloured to the target's covariance.

    On pooled-standardised features, source k becomes
    (X_k - mean_k) C_k^(-1/2) C_t^(1/2) + mean_t with C = cov + r I (r = coral_regulariser,
    as in the paper, which keeps the 1000-dimensional covariances of ~250 rows invertible);
    the target is left as it is and scored by a logistic regression fitted on the result.
    """
    started = time.perf_counter()
    scaler = Standardiser.fit(source.X)
    target_x = scaler.transform(target.X)
    recolour = _matrix_power(_covariance(target_x, cfg.coral_regulariser), 0.5)
    target_mean = target_x.mean(axis=0)
    aligned = scaler.transform(source.X)
    for name in np.unique(source.site):
        rows = source.site == name
        block = aligned[rows]
        whiten = _matrix_power(_covariance(block, cfg.coral_regulariser), -0.5)
        aligned[rows] = (block - block.mean(axis=0)) @ whiten @ recolour + target_mean
    weights, bias = fit_logistic(aligned, source.y, cfg.l2)
    return LinearModel("coral-lr", weights, bias, scaler, _single_pass_log(started))


def _covariance(X: FloatArray, regulariser: float) -> FloatArray:
    centred = X - X.mean(axis=0)
    result: FloatArray = centred.T @ centred / max(len(X) - 1, 1)
    return result + regulariser * np.eye(X.shape[1])


def _matrix_power(symmetric: FloatArray, power: float) -> FloatArray:
    values, vectors = np.linalg.eigh(symmetric)
    result: FloatArray = (vectors * values**power) @ vectors.T
    return result


def fit_logistic(X: FloatArray, y: FloatArray, l2: float) -> tuple[FloatArray, float]:
    """L-BFGS on sum of log losses + l2/2 |w|^2 (bias free): scikit-learn's C = 1 / l2."""

    def objective(params: FloatArray) -> tuple[float, FloatArray]:
        w, b = params[:-1], params[-1]
        z = X @ w + b
        # log(1 + e^z) - y z, written with logaddexp so large |z| cannot overflow.
        loss = float(np.sum(np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * float(w @ w)
        residual = 1.0 / (1.0 + np.exp(-z)) - y
        grad = np.append(X.T @ residual + l2 * w, residual.sum())
        return loss, grad

    start = np.zeros(X.shape[1] + 1)
    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    params = np.asarray(result.x, dtype=np.float64)
    return params[:-1], float(params[-1])


def _single_pass_log(started: float) -> TrainingLog:
    return TrainingLog(0, (), time.perf_counter() - started)


_UNSUPERVISED_TRAINERS: Final[
    Mapping[Method, Callable[[LabelledData, TargetData, TrainConfig, int], AdaptedModel]]
] = {
    "source-only": _train_source_only,
    "single-dann": _train_single_dann,
    "multi-dann": _train_multi_dann,
    "standardised-lr": _train_standardised_lr,
    "coral-lr": _train_coral_lr,
}
_SUPERVISED_TRAINERS: Final[
    Mapping[Method, Callable[[LabelledData, LabelledData, TrainConfig, int], AdaptedModel]]
] = {
    "target-only": _train_target_only,
    "mixed": _train_mixed,
}
