"""Frozen embeddings of pairs under one bundle: computed once, then only adapters train.

A report is embedded the way the retrieval embeds it (``plugin.retrieval.service``): cut into
sentences, each embedded by the bundle's text encoder, the unit vectors averaged. Keeping the
sentences apart lets the text adapter act on each one before they are pooled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from plugin.finetune.adapters import PairFeatures
from plugin.finetune.errors import FinetuneError
from plugin.finetune.pairs import Pair, load_inputs
from plugin.imaging import ImageSpec
from plugin.models.bundle import Bundle
from plugin.models.projection import text_encoder
from plugin.models.runtime import ImageEncoder
from plugin.retrieval.service import sentences

Progress = Callable[[str, int, int], None]  # (stage, done, total)
_CHUNK = 64  # images decoded and encoded at a time, so memory stays small


def report_key(text: str) -> str:
    """Reports that read the same (case and spacing aside) are positives of each other."""
    return " ".join(text.lower().split())


def pair_features(
    bundle: Bundle, pairs: Sequence[Pair], threads: int | None, progress: Progress
) -> PairFeatures:
    """Image embeddings [N, D] and per-sentence text embeddings of every pair's report."""
    encoder = text_encoder(bundle, threads=threads)
    if encoder is None:
        raise FinetuneError(
            f"{bundle.ref} has no text encoder (text_encoder.kind 'none'): reports cannot be "
            "embedded, so it cannot be fine-tuned; use a bundle with a text tower"
        )
    spec = ImageSpec.from_manifest(bundle.manifest.image.model_dump())
    images = ImageEncoder(bundle, threads=threads)
    parts = []
    for start in range(0, len(pairs), _CHUNK):
        chunk = pairs[start : start + _CHUNK]
        parts.append(images.encode(np.stack([load_inputs(p, spec) for p in chunk])))
        progress("images", start + len(chunk), len(pairs))
    per_report = [sentences(p.report) for p in pairs]
    texts = sorted({s for group in per_report for s in group})
    progress("reports", 0, len(texts))
    vectors = dict(zip(texts, np.asarray(encoder.encode(texts), dtype=np.float32), strict=True))
    progress("reports", len(texts), len(texts))
    owners = [i for i, group in enumerate(per_report) for _ in group]
    groups = np.unique([report_key(p.report) for p in pairs], return_inverse=True)[1]
    return PairFeatures(
        images=np.concatenate(parts),
        sentences=np.stack([vectors[s] for group in per_report for s in group]),
        owners=np.asarray(owners, dtype=np.int64),
        groups=np.asarray(groups, dtype=np.int64).reshape(-1),
    )
