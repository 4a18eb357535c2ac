"""Triage math of the CLIP runtime: zero-shot, calibration, few-shot heads, priority, saliency,
and the out-of-distribution guard (``plugin.triage.ood``).

Pure numpy (and scipy): embeddings, probabilities and callables in; arrays and dataclasses out.
Only the heads' save/load touch the file system, and only the .npz path they are given.
"""

from plugin.triage.calibration import (
    Calibration,
    Decision,
    InsufficientLabels,
    decide,
    fit_calibration,
)
from plugin.triage.heads import HEAD_FORMAT_VERSION, HeadLoadError, LinearProbe, TipAdapter
from plugin.triage.priority import NOT_SCORED, ROUTINE, STAT, Priority, PriorityPolicy, WorklistFlag
from plugin.triage.saliency import (
    Region,
    occlusion_map,
    occlusion_maps,
    patch_similarity_map,
    peak,
    region,
    resize_bilinear,
)
from plugin.triage.zeroshot import (
    FindingPrompts,
    ensemble_embedding,
    l2_normalise,
    prompts_from_arrays,
    zero_shot_logits,
    zero_shot_probabilities,
)

__all__ = [
    "HEAD_FORMAT_VERSION",
    "NOT_SCORED",
    "ROUTINE",
    "STAT",
    "Calibration",
    "Decision",
    "FindingPrompts",
    "HeadLoadError",
    "InsufficientLabels",
    "LinearProbe",
    "Priority",
    "PriorityPolicy",
    "Region",
    "TipAdapter",
    "WorklistFlag",
    "decide",
    "ensemble_embedding",
    "fit_calibration",
    "l2_normalise",
    "occlusion_map",
    "occlusion_maps",
    "patch_similarity_map",
    "peak",
    "prompts_from_arrays",
    "region",
    "resize_bilinear",
    "zero_shot_logits",
    "zero_shot_probabilities",
]
