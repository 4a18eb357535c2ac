"""Held-out evaluation of a tuned bundle against its parent, on embeddings already computed.

Recall@k both ways (image->text, text->image) over the held-out gallery, where a report is
relevant to an image when it is the image's own report or reads the same; with labels, also
"same findings" relevance. AUROC per labelled finding of the zero-shot scores, each bundle with
its own prompt embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from plugin.finetune.adapters import PairFeatures, TrainedAdapters
from plugin.triage import FindingPrompts, zero_shot_probabilities

RECALL_KS: Final = (1, 5, 10)
FloatArray = npt.NDArray[np.float32]


def recall_at_k(
    similarity: npt.NDArray[np.float64], relevant: npt.NDArray[np.bool_], ks: Sequence[int]
) -> dict[str, float]:
    """Share of queries (rows) with a relevant gallery item (column) among their top k."""
    top = np.argsort(-similarity, axis=1, kind="stable")[:, : max(ks)]
    hits = np.take_along_axis(relevant, top, axis=1)
    return {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def report_embeddings(features: PairFeatures) -> FloatArray:
    """Each pair's report: the re-normalised mean of its unit sentence embeddings."""
    unit = features.sentences / np.linalg.norm(features.sentences, axis=1, keepdims=True)
    sums = np.zeros((len(features), unit.shape[1]), dtype=np.float64)
    np.add.at(sums, features.owners, unit)
    result: FloatArray = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
    return result


def tuned(features: PairFeatures, adapters: TrainedAdapters) -> PairFeatures:
    """The features as the tuned bundle gives them."""
    return PairFeatures(
        adapters.image.apply(features.images),
        adapters.text.apply(features.sentences),
        features.owners,
        features.groups,
    )


def retrieval(
    features: PairFeatures, relevant: npt.NDArray[np.bool_], ks: Sequence[int] = RECALL_KS
) -> dict[str, dict[str, float]]:
    images = features.images / np.linalg.norm(features.images, axis=1, keepdims=True)
    similarity = images.astype(np.float64) @ report_embeddings(features).T
    return {
        "image_to_text": recall_at_k(similarity, relevant, ks),
        "text_to_image": recall_at_k(similarity.T, relevant.T, ks),
    }


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float | None:
    """Mann-Whitney AUROC (ties count half); None when one class is missing."""
    from scipy.stats import rankdata  # type: ignore[import-untyped]

    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def finding_aurocs(
    images: FloatArray,
    prompts: Sequence[FindingPrompts],
    logit_scale: float,
    labels: FloatArray,
    findings: Sequence[str],
) -> dict[str, float | None]:
    """Zero-shot AUROC of each labelled finding (rows with a NaN label are left out)."""
    by_name = {p.name: p for p in prompts}
    result: dict[str, float | None] = {}
    for j, name in enumerate(findings):
        if name not in by_name:
            continue
        known = ~np.isnan(labels[:, j])
        probs = zero_shot_probabilities(images[known], [by_name[name]], logit_scale)[:, 0]
        result[name] = auroc(probs, labels[known, j])
    return result


def relevance(groups: npt.NDArray[np.int64], labels: FloatArray | None) -> dict[str, Any]:
    """Relevance: the same report text; and the same labels (every labelled finding agrees)
    where every held-out pair has every label."""
    matrices = {"same_report": groups[:, None] == groups[None, :]}
    if labels is not None and labels.size and not np.isnan(labels).any():
        _, ids = np.unique(labels, axis=0, return_inverse=True)
        ids = np.asarray(ids).reshape(-1)
        matrices["same_labels"] = ids[:, None] == ids[None, :]
    return matrices


def compare(
    parent: PairFeatures,
    child: PairFeatures,
    *,
    parent_prompts: Sequence[FindingPrompts],
    child_prompts: Sequence[FindingPrompts],
    logit_scale: float,
    labels: FloatArray | None,
    findings: Sequence[str],
) -> dict[str, Any]:
    """Parent and child side by side on the same held-out pairs."""
    matrices = relevance(parent.groups, labels)
    summary: dict[str, Any] = {"heldout_pairs": len(parent), "relevance": sorted(matrices)}
    for who, features, prompts in (
        ("parent", parent, parent_prompts),
        ("child", child, child_prompts),
    ):
        entry: dict[str, Any] = {
            kind: retrieval(features, matrix) for kind, matrix in matrices.items()
        }
        if labels is not None and findings:
            entry["auroc"] = finding_aurocs(features.images, prompts, logit_scale, labels, findings)
        summary[who] = entry
    return summary


def format_comparison(summary: Mapping[str, Any]) -> str:
    """A short text table: each recall and AUROC, parent -> child."""
    lines = [f"held-out pairs: {summary['heldout_pairs']}"]
    for kind in summary["relevance"]:
        for direction in ("image_to_text", "text_to_image"):
            before = summary["parent"][kind][direction]
            after = summary["child"][kind][direction]
            cells = "  ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before)
            lines.append(f"{direction:<14} ({kind}): {cells}")
    for name, before_auroc in summary["parent"].get("auroc", {}).items():
        after_auroc = summary["child"]["auroc"][name]
        if before_auroc is None or after_auroc is None:
            lines.append(f"AUROC {name}: not defined (one class only in the held-out pairs)")
        else:
            lines.append(f"AUROC {name}: {before_auroc:.3f} -> {after_auroc:.3f}")
    return "\n".join(lines)
