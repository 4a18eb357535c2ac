"""Low-rank adapters on frozen embeddings, trained with a symmetric InfoNCE loss (torch, CPU).

Image side: ``normalize(e) (I + B A)^T + b``; text side: the same without the bias, applied to
each sentence embedding before the report's sentences are pooled (mean of unit vectors,
re-normalised: how the retrieval embeds a report). ``B`` starts at zero, so training starts
from the parent exactly, and weight decay pulls the adapters back towards it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional

from plugin.finetune.folding import Affine

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters; the defaults are the ones the benchmark was tuned with."""

    rank: int = 32  # of the text adapter
    image_rank: int = 0  # of the image adapter; 0 leaves the image side as the parent's
    epochs: int = 60
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    image_bias: bool = False
    anchor_weight: float = 1000.0

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return {
            "rank": self.rank,
            "image_rank": self.image_rank,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "image_bias": self.image_bias,
            "anchor_weight": self.anchor_weight,
        }


class LowRankAdapter(nn.Module):
    """``x -> x + (x A^T) B^T (+ b)``: the identity until ``B`` (zero at start) is trained."""

    def __init__(self, dim: int, rank: int, bias: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + (x @ self.down.T) @ self.up.T
        return out if self.bias is None else out + self.bias

    def affine(self) -> Affine:
        with torch.no_grad():
            matrix = torch.eye(self.up.shape[0]) + self.up @ self.down
            bias = None if self.bias is None else self.bias.numpy().astype(np.float32)
        return Affine(matrix.numpy().astype(np.float32), bias)


@dataclass(frozen=True)
class TrainedAdapters:
    image: Affine
    text: Affine
    losses: list[float] = field(default_factory=list)  # mean training loss of each epoch


@dataclass(frozen=True)
class PairFeatures:
    """Frozen parent embeddings of N pairs: images [N, D], and sentences [S, D] with the pair
    each belongs to; pairs in one ``group`` have the same report text (positives of each other)."""

    images: FloatArray
    sentences: FloatArray
    owners: npt.NDArray[np.int64]
    groups: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows: Sequence[int]) -> PairFeatures:
        rows = list(rows)
        position = {row: i for i, row in enumerate(rows)}
        keep = np.array([owner in position for owner in self.owners.tolist()])
        return PairFeatures(
            self.images[rows],
            self.sentences[keep],
            np.array([position[o] for o in self.owners[keep].tolist()], dtype=np.int64),
            self.groups[rows],
        )


def pooled_reports(sentences: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """Unit report embeddings [n, D]: the re-normalised mean of each report's unit sentences."""
    unit = functional.normalize(sentences, dim=-1)
    sums = torch.zeros(n, unit.shape[1], dtype=unit.dtype).index_add_(0, owners, unit)
    return functional.normalize(sums, dim=-1)


def contrastive_loss(
    images: torch.Tensor, reports: torch.Tensor, groups: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Symmetric InfoNCE; pairs with the same report text are all counted as positives."""
    logits = logit_scale * images @ reports.T
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = functional.cross_entropy(logits, targets)
    text_to_image = functional.cross_entropy(logits.T, targets.T)
    return 0.5 * (image_to_text + text_to_image)


def anchor_loss(adapter: LowRankAdapter, anchors: torch.Tensor) -> torch.Tensor:
    """How far the adapter moves the anchors (unit vectors): 1 - mean cosine to themselves."""
    moved = functional.normalize(adapter(anchors), dim=-1)
    return 1.0 - (moved * anchors).sum(dim=-1).mean()


def train_adapters(
    features: PairFeatures,
    logit_scale: float,
    config: AdapterConfig,
    anchors: FloatArray | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainedAdapters:
    """Fit both adapters on the pairs' frozen features; ``on_epoch(epoch, loss)`` after each.

    ``anchors`` (unit vectors, e.g. the parent's prompt embeddings) are what the parent already
    does well: moving them is penalised, so the site's pairs teach the adapters what is new
    without unlearning the rest.
    """
    generator = torch.Generator().manual_seed(config.seed)
    dim = features.images.shape[1]
    image_adapter = LowRankAdapter(
        dim, config.image_rank, config.image_bias and config.image_rank > 0, generator
    )
    text_adapter = LowRankAdapter(dim, config.rank, False, generator)
    params = [*image_adapter.parameters(), *text_adapter.parameters()]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    images = functional.normalize(torch.from_numpy(features.images).float(), dim=-1)
    sentences = functional.normalize(torch.from_numpy(features.sentences).float(), dim=-1)
    owners = torch.from_numpy(features.owners)
    groups = torch.from_numpy(features.groups)
    fixed = (
        None if anchors is None else functional.normalize(torch.from_numpy(anchors).float(), dim=-1)
    )
    n = len(features)
    losses = []
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            # Every report is pooled each step (a few thousand sentences: cheap), then the
            # batch's rows are taken: simpler than gathering each batch's sentences.
            reports = pooled_reports(text_adapter(sentences), owners, n)[rows]
            embeds = functional.normalize(image_adapter(images[rows]), dim=-1)
            loss = contrastive_loss(embeds, reports, groups[rows], logit_scale)
            if fixed is not None and config.anchor_weight > 0:
                drift = anchor_loss(image_adapter, fixed) + anchor_loss(text_adapter, fixed)
                loss = loss + config.anchor_weight * drift
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / n)
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])
    return TrainedAdapters(image_adapter.affine(), text_adapter.affine(), losses)
