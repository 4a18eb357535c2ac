"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, -lambda * gradient backward.

Placed between the feature extractor and a domain discriminator, it lets one optimiser step
train the discriminator to tell domains apart while pushing the features the other way.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch


class GradientReversal(torch.autograd.Function):
    """autograd Function; call through :func:`grad_reverse`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        # view_as, not x itself: autograd needs a new tensor node to attach backward to.
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        # No gradient for lambda_: it is a schedule value, not a parameter.
        return -ctx.lambda_ * grad_output, None


def grad_reverse(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``-lambda_``."""
    if not math.isfinite(lambda_) or lambda_ < 0:
        raise ValueError(f"lambda_ must be a finite non-negative number, got {lambda_}")
    return cast(torch.Tensor, GradientReversal.apply(x, lambda_))  # type: ignore[no-untyped-call]


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """The DANN ramp 2 / (1 + exp(-gamma * p)) - 1 for training progress p in [0, 1].

    Starts at 0 so the discriminators learn something before they push on the features,
    and approaches 1 (0.9999 at p = 1 with gamma = 10) without a jump.
    """
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0
