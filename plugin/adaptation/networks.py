"""Networks and fitted models of the adaptation arms.

A fitted model maps rows of the target site's features to P(outcome) through
``predict_proba(X) -> [N]``: :class:`NeuralModel` for the MLP arms (source-only, target-only,
mixed, Single- and Multi-DANN), :class:`LinearModel` for the logistic-regression arms
(per-site standardisation, CORAL).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from plugin.adaptation.grl import grad_reverse

FloatArray = npt.NDArray[np.float64]

# Features whose spread is below this are constant at a site (a concept never charted
# there); they are centred but not divided, so a near-zero std cannot blow them up.
_MIN_STD = 1e-6


@dataclass(frozen=True)
class TrainingLog:
    """What training cost: wall-clock seconds of each epoch actually run, and in total."""

    epochs_run: int
    epoch_seconds: tuple[float, ...]
    total_seconds: float

    @property
    def seconds_per_epoch(self) -> float:
        """NaN for the closed-form / L-BFGS arms, which have no epochs."""
        return self.total_seconds / self.epochs_run if self.epochs_run else float("nan")


class AdaptedModel(Protocol):
    """What :func:`plugin.adaptation.fit` returns, whatever the method."""

    @property
    def method(self) -> str: ...

    @property
    def log(self) -> TrainingLog: ...

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        """P(outcome) for each row of ``X`` (features of the target site), shape [N]."""
        ...


@dataclass(frozen=True, eq=False)
class Standardiser:
    """Per-feature z-score with statistics of the rows it was fitted on."""

    mean: FloatArray
    scale: FloatArray

    @classmethod
    def fit(cls, X: FloatArray) -> Standardiser:
        std = X.std(axis=0)
        return cls(X.mean(axis=0), np.where(std < _MIN_STD, 1.0, std))

    @classmethod
    def identity(cls, n_features: int) -> Standardiser:
        return cls(np.zeros(n_features), np.ones(n_features))

    def transform(self, X: FloatArray) -> FloatArray:
        result: FloatArray = (X - self.mean) / self.scale
        return result


def as_features(X: npt.ArrayLike, n_features: int | None = None) -> FloatArray:
    """``X`` as a finite float64 matrix [N, D]; D checked when ``n_features`` is given."""
    array = np.asarray(X, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {array.shape}")
    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(f"expected {n_features} features, got {array.shape[1]}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinite values")
    return array


def _mlp(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class DomainHeads(nn.Module):
    """``n_heads`` independent one-hidden-layer discriminators evaluated in one batched call.

    Multi-DANN has one discriminator per source site; stacking their weights and running
    them with one einsum costs about as much as a single head, where a Python loop over
    12 heads dominated each step. Initialised like ``nn.Linear``.
    """

    def __init__(self, n_heads: int, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(_uniform((n_heads, in_dim, hidden), in_dim))
        self.b1 = nn.Parameter(_uniform((n_heads, 1, hidden), in_dim))
        self.w2 = nn.Parameter(_uniform((n_heads, hidden), hidden))
        self.b2 = nn.Parameter(_uniform((n_heads, 1), hidden))

    @property
    def n_heads(self) -> int:
        return int(self.w1.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [K, N] of head k on its own rows x[k]; x is [K, N, in_dim]."""
        hidden = torch.relu(torch.einsum("kni,kih->knh", x, self.w1) + self.b1)
        return torch.einsum("knh,kh->kn", hidden, self.w2) + self.b2


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1.0 / fan_in**0.5
    return torch.empty(shape).uniform_(-bound, bound)


class DannNetwork(nn.Module):
    """Feature extractor (MLP), a binary label head and ``n_domain_heads`` discriminators.

    The discriminators sit behind gradient reversal (:meth:`discriminate`). With no domain
    head the network is the plain classifier of the non-adversarial MLP arms, so every
    neural arm shares one architecture and differs only in its loss.
    """

    def __init__(
        self,
        n_features: int,
        hidden: Sequence[int],
        n_domain_heads: int,
        *,
        dropout: float = 0.2,
        domain_hidden: int = 32,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden needs at least one layer width")
        self.extractor = _mlp([n_features, *hidden], dropout)
        self.label_head = nn.Linear(hidden[-1], 1)
        self.domain_heads = DomainHeads(n_domain_heads, hidden[-1], domain_hidden)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)  # type: ignore[no-any-return]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Outcome logits, the input's shape without its last axis."""
        return self.label_head(features).squeeze(-1)  # type: ignore[no-any-return]

    def discriminate(self, features: torch.Tensor, lambda_: float) -> torch.Tensor:
        """Domain logits [K, N] (1 = target) of each head k on features[k] [K, N, H].

        The gradient reaching ``features`` is reversed and scaled by ``lambda_``.
        """
        return self.domain_heads(grad_reverse(features, lambda_))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


@dataclass(frozen=True, eq=False)
class NeuralModel:
    """A trained :class:`DannNetwork` with the standardiser its inputs were scaled with."""

    method: str
    network: DannNetwork
    scaler: Standardiser
    log: TrainingLog

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        features = self.scaler.transform(as_features(X, self.scaler.mean.shape[0]))
        self.network.eval()
        with torch.no_grad():
            logits = self.network(torch.as_tensor(features, dtype=torch.float32))
        result: FloatArray = torch.sigmoid(logits).double().numpy()
        return result


@dataclass(frozen=True, eq=False)
class LinearModel:
    """Logistic regression on transformed features: sigmoid(transform(X) @ weights + bias).

    ``scaler`` is the target-side transform (the target site's own standardisation for the
    per-site arm, the pooled standardisation for CORAL, whose alignment moves the sources).
    """

    method: str
    weights: FloatArray
    bias: float
    scaler: Standardiser
    log: TrainingLog

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        features = self.scaler.transform(as_features(X, self.weights.shape[0]))
        result: FloatArray = 1.0 / (1.0 + np.exp(-(features @ self.weights + self.bias)))
        return result
