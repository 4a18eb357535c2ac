"""Every adaptation arm on an encounter file, side by side (plugin.adaptation's protocol).

Each site (or each of ``target_sites``) is the target in turn: its encounters are split once
into a training and a held-out half, and every method and seed is scored on the same held-out
half; AUROC with a bootstrap interval, AUPRC and calibration per site, medians and the worst
site per method (docs/adaptation.md). The concept vocabulary is fitted on all notes without
their outcomes, as a deployment would fit it on its own unlabelled notes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from plugin.adaptation import AdaptationError, Method, Results, Run, TrainConfig, evaluate
from plugin.revisit.encounters import Encounters
from plugin.revisit.features import FeatureSpec, RevisitError


def evaluate_encounters(
    encounters: Encounters,
    documents: Sequence[frozenset[str]],
    methods: Sequence[Method],
    seeds: Sequence[int],
    *,
    features: FeatureSpec,
    target_sites: Sequence[str] | None = None,
    config: TrainConfig | None = None,
    n_bootstrap: int = 200,
    on_run: Callable[[Run], None] | None = None,
) -> Results:
    """Run the evaluation protocol; errors name the site that cannot be evaluated and why."""
    if encounters.labels is None:
        raise RevisitError(f"{encounters.source}: evaluation needs the revisit_7d column")
    known = encounters.site_names()
    if len(known) < 2:
        raise RevisitError(f"{encounters.source}: evaluation needs at least two sites")
    unknown = [s for s in target_sites or () if s not in known]
    if unknown:
        raise RevisitError(
            f"site(s) {', '.join(unknown)} not in {encounters.source}; its sites are "
            f"{', '.join(known)}"
        )
    X = features.matrix(documents, encounters)
    try:
        return evaluate(
            X,
            encounters.labels,
            np.array(encounters.sites),
            methods,
            seeds,
            target_sites=target_sites,
            config=config,
            n_bootstrap=n_bootstrap,
            on_run=on_run,
        )
    except AdaptationError as exc:
        raise RevisitError(f"cannot evaluate {encounters.source}: {exc}") from exc
