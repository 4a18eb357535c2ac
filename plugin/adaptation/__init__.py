"""Multi-source domain adaptation for tabular features, with its evaluation protocol.

Any per-row feature table with a site column works: concept vectors of ER notes, CLIP
embeddings of studies per PACS site. See docs/adaptation.md.
"""

from plugin.adaptation.evaluate import (
    MethodSummary,
    Results,
    Run,
    SiteResult,
    SyntheticSites,
    TargetSplit,
    auprc,
    auroc,
    bootstrap_auroc,
    calibration,
    evaluate,
    evaluate_target,
    make_shifted_sites,
    roc_curve,
    split_target,
)
from plugin.adaptation.grl import dann_lambda, grad_reverse
from plugin.adaptation.networks import AdaptedModel, LinearModel, NeuralModel, TrainingLog
from plugin.adaptation.report import to_json, write_report
from plugin.adaptation.train import (
    METHODS,
    TARGET_LABEL_METHODS,
    UNSUPERVISED_METHODS,
    AdaptationError,
    LabelledData,
    Method,
    TargetData,
    TrainConfig,
    fit,
)

__all__ = [
    "METHODS",
    "TARGET_LABEL_METHODS",
    "UNSUPERVISED_METHODS",
    "AdaptationError",
    "AdaptedModel",
    "LabelledData",
    "LinearModel",
    "Method",
    "MethodSummary",
    "NeuralModel",
    "Results",
    "Run",
    "SiteResult",
    "SyntheticSites",
    "TargetData",
    "TargetSplit",
    "TrainConfig",
    "TrainingLog",
    "auprc",
    "auroc",
    "bootstrap_auroc",
    "calibration",
    "dann_lambda",
    "evaluate",
    "evaluate_target",
    "fit",
    "grad_reverse",
    "make_shifted_sites",
    "roc_curve",
    "split_target",
    "to_json",
    "write_report",
]
