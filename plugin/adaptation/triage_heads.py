"""Site-adapted triage heads: one adaptation arm per finding on CLIP image embeddings.

The labelled sites are the sources; the target site contributes only its unlabelled
embeddings (Multi-DANN by default: one discriminator per source site). The fitted networks
are copied out of torch into numpy (:class:`plugin.triage.site_heads.SiteHead`), so the
triage runtime applies them without torch. Validation before promotion compares AUROC per
finding on labelled images of the target site (:func:`compare_heads`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from torch import nn

from plugin.adaptation.evaluate import auroc
from plugin.adaptation.networks import FloatArray, LinearModel, NeuralModel
from plugin.adaptation.train import (
    TARGET_LABEL_METHODS,
    AdaptationError,
    Method,
    TrainConfig,
    fit,
)
from plugin.labels import read_labels_csv
from plugin.triage.site_heads import FindingNetwork, SiteHead

KEY_COLUMNS: Final = ("sop_instance_uid", "study_instance_uid")


@dataclass(frozen=True, eq=False)
class ImageLabels:
    """Labels of a CSV keyed by SOP Instance UID or Study Instance UID (``key_column``).

    ``values`` is [rows, findings]: 1, 0 or NaN (not labelled). A study-level label applies
    to every image of the study.
    """

    key_column: str
    keys: tuple[str, ...]
    findings: tuple[str, ...]
    values: FloatArray

    def align(
        self, sop_instance_uids: Sequence[str], study_instance_uids: Sequence[str]
    ) -> FloatArray:
        """Labels [N, findings] for stored embeddings; NaN where the CSV has no row."""
        image_keys = sop_instance_uids if self.key_column == KEY_COLUMNS[0] else study_instance_uids
        row_of = {key: i for i, key in enumerate(self.keys)}
        result = np.full((len(image_keys), len(self.findings)), np.nan)
        for i, key in enumerate(image_keys):
            row = row_of.get(key)
            if row is not None:
                result[i] = self.values[row]
        return result


def read_image_labels(csv_path: Path, known_findings: Sequence[str]) -> ImageLabels:
    """Read a labels CSV: one key column (see :data:`KEY_COLUMNS`), then finding columns."""
    table = read_labels_csv(csv_path, KEY_COLUMNS, known_findings)
    return ImageLabels(table.key_column, table.keys, table.findings, table.values)


def fit_site_head(
    embeds: npt.ArrayLike,
    sites: npt.ArrayLike,
    labels: npt.ArrayLike,
    findings: Sequence[str],
    target_site: str,
    *,
    method: Method = "multi-dann",
    seed: int = 0,
    config: TrainConfig | None = None,
) -> SiteHead:
    """One ``method`` model per finding: labelled rows of other sites, target rows unlabelled.

    ``labels`` is [N, findings] with NaN where an image is not labelled; the target site's
    labels are never read (its rows count as unlabelled target data whatever they hold).
    """
    if method in TARGET_LABEL_METHODS:
        raise AdaptationError(f"{method} needs target labels; a site head is trained without")
    X = np.asarray(embeds, dtype=np.float64)
    site = np.asarray(sites).astype(str)
    y = np.asarray(labels, dtype=np.float64)
    is_target = site == target_site
    if not is_target.any():
        raise AdaptationError(f"no embeddings of target site {target_site!r}")
    networks = []
    for column, finding in enumerate(findings):
        rows = is_target | (~np.isnan(y[:, column]) & ~is_target)
        if rows.sum() == is_target.sum():
            raise AdaptationError(f"no labelled image of another site for finding {finding!r}")
        y_rows = np.where(is_target, np.nan, y[:, column])[rows]
        try:
            model = fit(method, X[rows], y_rows, site[rows], target_site, seed=seed, config=config)
        except AdaptationError as exc:
            raise AdaptationError(f"finding {finding!r}: {exc}") from exc
        networks.append(finding_network(model))
    return SiteHead(tuple(findings), tuple(networks))


def finding_network(model: object) -> FindingNetwork:
    """The label path of a fitted arm (standardiser, MLP, label head) as numpy arrays."""
    if isinstance(model, LinearModel):
        return FindingNetwork(
            model.scaler.mean, model.scaler.scale, (), model.weights.copy(), model.bias
        )
    if not isinstance(model, NeuralModel):
        raise TypeError(f"cannot export a {type(model).__name__}")
    linear = [m for m in model.network.extractor if isinstance(m, nn.Linear)]
    layers = tuple(
        (
            m.weight.detach().double().numpy().T.copy(),
            m.bias.detach().double().numpy().copy(),
        )
        for m in linear
    )
    head = model.network.label_head
    return FindingNetwork(
        model.scaler.mean.copy(),
        model.scaler.scale.copy(),
        layers,
        head.weight.detach().double().numpy()[0].copy(),
        float(head.bias.detach()[0]),
    )


@dataclass(frozen=True)
class FindingComparison:
    finding: str
    n: int
    positives: int
    candidate_auroc: float | None  # None: the validation set lacks a class
    current_auroc: float | None


@dataclass(frozen=True)
class HeadComparison:
    findings: tuple[FindingComparison, ...]
    tolerance: float

    @property
    def not_worse(self) -> bool:
        """Every finding validated, none more than ``tolerance`` below the current AUROC."""
        return all(
            f.candidate_auroc is not None
            and f.current_auroc is not None
            and f.candidate_auroc >= f.current_auroc - self.tolerance
            for f in self.findings
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "tolerance": self.tolerance,
            "not_worse": self.not_worse,
            "findings": [f.__dict__ for f in self.findings],
        }


def compare_heads(
    labels: npt.ArrayLike,
    candidate: Mapping[str, npt.ArrayLike],
    current: Mapping[str, npt.ArrayLike],
    *,
    tolerance: float = 0.01,
) -> HeadComparison:
    """AUROC of candidate and current scores per finding on labelled rows.

    ``labels`` is [N, F] in the order of ``candidate``'s findings (NaN: not labelled);
    ``candidate`` and ``current`` map each finding to its scores [N].
    """
    y = np.asarray(labels, dtype=np.float64)
    results = []
    for column, finding in enumerate(candidate):
        known = ~np.isnan(y[:, column])
        truth = y[known, column]
        both = 0 < truth.sum() < len(truth)
        new = np.asarray(candidate[finding], dtype=np.float64)[known]
        old = np.asarray(current[finding], dtype=np.float64)[known]
        results.append(
            FindingComparison(
                finding,
                int(known.sum()),
                int(truth.sum()),
                auroc(truth, new) if both else None,
                auroc(truth, old) if both else None,
            )
        )
    return HeadComparison(tuple(results), tolerance)
