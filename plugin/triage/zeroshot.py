"""Zero-shot finding probabilities from prompt ensembles (formula in docs/model-bundle.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from plugin.errors import ConfigError

FloatArray = npt.NDArray[np.float64]


def l2_normalise(vectors: npt.ArrayLike) -> FloatArray:
    """Scale each row (the last axis) to unit length; a zero vector is an error, not a NaN."""
    array = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("cannot normalise a zero or non-finite embedding")
    result: FloatArray = array / norms
    return result


def ensemble_embedding(prompt_embeddings: npt.ArrayLike) -> FloatArray:
    """Mean of the L2-normalised prompt embeddings [K, D], re-normalised to one unit vector [D]."""
    array = np.asarray(prompt_embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"prompt embeddings must be [K, D] with K >= 1, got shape {array.shape}")
    # Normalise before averaging so no single prompt outweighs the others by its norm.
    return l2_normalise(l2_normalise(array).mean(axis=0))


@dataclass(frozen=True, eq=False)
class FindingPrompts:
    """One finding's ensembled positive and negative text embeddings, each a unit vector [D]."""

    name: str
    positive: FloatArray
    negative: FloatArray

    def __post_init__(self) -> None:
        if self.positive.ndim != 1 or self.positive.shape != self.negative.shape:
            raise ValueError(
                f"finding {self.name!r}: positive and negative must be vectors of one length, "
                f"got {self.positive.shape} and {self.negative.shape}"
            )

    @classmethod
    def from_prompt_sets(
        cls, name: str, positive: npt.ArrayLike, negative: npt.ArrayLike
    ) -> FindingPrompts:
        """Build from per-prompt embeddings [K, D] (templates x prompts) by ensembling each set."""
        return cls(name, ensemble_embedding(positive), ensemble_embedding(negative))


def prompts_from_arrays(
    arrays: Mapping[str, npt.ArrayLike], names: Sequence[str]
) -> list[FindingPrompts]:
    """Read `<finding>/positive` and `<finding>/negative` [K, D] arrays (prompt_embeddings.npz)."""
    findings = []
    for name in names:
        keys = (f"{name}/positive", f"{name}/negative")
        missing = [key for key in keys if key not in arrays]
        if missing:
            raise ConfigError(f"prompt embeddings lack {', '.join(missing)} for finding {name!r}")
        findings.append(FindingPrompts.from_prompt_sets(name, arrays[keys[0]], arrays[keys[1]]))
    return findings


def zero_shot_logits(
    image_embeds: npt.ArrayLike, findings: Sequence[FindingPrompts], logit_scale: float
) -> FloatArray:
    """Log-odds [N, F] of present vs absent: logit_scale * (cos(img, pos) - cos(img, neg))."""
    images = np.asarray(image_embeds, dtype=np.float64)
    if images.ndim != 2:
        raise ValueError(f"image embeddings must be [N, D], got shape {images.shape}")
    if not findings:
        return np.zeros((images.shape[0], 0), dtype=np.float64)
    positive = np.stack([finding.positive for finding in findings], axis=1)
    negative = np.stack([finding.negative for finding in findings], axis=1)
    if positive.shape[0] != images.shape[1]:
        raise ValueError(
            f"image embeddings have dimension {images.shape[1]}, prompts {positive.shape[0]}"
        )
    # Re-normalise: a tower exported without its final L2 norm would otherwise silently
    # change what logit_scale means.
    unit = l2_normalise(images)
    result: FloatArray = logit_scale * (unit @ positive - unit @ negative)
    return result


def sigmoid(logits: npt.ArrayLike) -> FloatArray:
    """Logistic function, written with tanh so large logits do not overflow exp()."""
    values = np.asarray(logits, dtype=np.float64)
    result: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * values))
    return result


def zero_shot_probabilities(
    image_embeds: npt.ArrayLike, findings: Sequence[FindingPrompts], logit_scale: float
) -> FloatArray:
    """P(present) [N, F] = softmax(logit_scale * [cos(img, pos), cos(img, neg)])[0]."""
    # A two-way softmax is the sigmoid of the difference of its two logits.
    return sigmoid(zero_shot_logits(image_embeds, findings, logit_scale))
