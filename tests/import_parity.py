"""What the import tests compare: embeddings and zero-shot scores of a bundle against eager ones.

Parity means, after L2 normalisation, cosine >= 0.9999 and absolute difference <= 1e-4 per
embedding, and zero-shot probabilities within 1e-4, the bundle's through its ONNX towers and
stored prompt embeddings, the reference's from the source framework in eager mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from plugin.models.bundle import Bundle
from plugin.models.runtime import ImageEncoder, PromptEmbeddings
from plugin.triage.zeroshot import FindingPrompts, zero_shot_probabilities

COSINE_MIN = 0.9999
ABS_MAX = 1e-4

Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]


def unit(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(x, dtype=np.float64)
    result: npt.NDArray[np.float64] = array / np.linalg.norm(array, axis=-1, keepdims=True)
    return result


def assert_embeddings_match(actual: npt.ArrayLike, expected: npt.ArrayLike) -> None:
    a, e = unit(actual), unit(expected)
    assert a.shape == e.shape
    cosine = np.sum(a * e, axis=-1)
    assert cosine.min() >= COSINE_MIN, f"cosine {cosine.min()}"
    assert np.abs(a - e).max() <= ABS_MAX, f"max abs diff {np.abs(a - e).max()}"


def prompt_texts(bundle: Bundle) -> list[str]:
    """Every template x prompt text of every finding of the bundle."""
    return [
        text
        for finding in bundle.findings
        for positive in (True, False)
        for text in finding.prompt_texts(positive)
    ]


def assert_zero_shot_matches(
    bundle: Bundle,
    pixels: npt.NDArray[np.float32],
    reference_images: npt.ArrayLike,
    reference_text: Embed,
    reference_logit_scale: float,
) -> npt.NDArray[np.float64]:
    """pacsclip's probabilities (runtime path) equal those of the eager reference; returns them."""
    stored = PromptEmbeddings.load(bundle)
    ours = [
        FindingPrompts.from_prompt_sets(f.name, *stored.for_finding(f.name))
        for f in bundle.findings
    ]
    theirs = [
        FindingPrompts.from_prompt_sets(
            f.name, reference_text(f.prompt_texts(True)), reference_text(f.prompt_texts(False))
        )
        for f in bundle.findings
    ]
    embeds = ImageEncoder(bundle, threads=1).encode(pixels)
    actual = zero_shot_probabilities(embeds, ours, bundle.manifest.logit_scale)
    expected = zero_shot_probabilities(reference_images, theirs, reference_logit_scale)
    assert actual.shape == (len(pixels), len(bundle.findings))
    assert np.abs(actual - expected).max() <= ABS_MAX
    return actual
