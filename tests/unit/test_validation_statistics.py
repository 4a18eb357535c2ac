"""Validation figures: counts first, AUROC with its interval, rates at the threshold, pairs."""

from __future__ import annotations

import numpy as np

from plugin.validation.statistics import Floors, finding_figures, paired_auroc_difference

FLOORS = Floors(min_positives=10, min_negatives=10, bootstrap=300)


def test_too_few_labels_give_counts_and_what_is_missing_not_a_figure() -> None:
    figures = finding_figures([0.9, 0.2, 0.8], [True, False, True], 0.5, FLOORS)

    data = figures.as_dict()
    assert data["enough"] is False
    assert "auroc" not in data
    assert data["missing"] == (
        "2 positive and 1 negative labeled studies; needs at least 10 and 10 "
        "(8 more positive and 9 more negative)"
    )


def test_rates_at_the_threshold_and_the_auroc_interval() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([True] * 40 + [False] * 60)
    scores = np.where(labels, rng.uniform(0.4, 1.0, 100), rng.uniform(0.0, 0.6, 100))

    f = finding_figures(scores, labels, 0.5, FLOORS)

    alerts = scores >= 0.5
    assert f.enough and f.auroc is not None
    assert f.sensitivity == (alerts & labels).sum() / 40
    assert f.specificity == (~alerts & ~labels).sum() / 60
    assert f.ppv == (alerts & labels).sum() / alerts.sum()
    assert f.alert_rate == alerts.mean()
    assert f.auroc.low <= f.auroc.estimate <= f.auroc.high
    assert 0.8 < f.auroc.estimate < 1.0
    assert sum(b["count"] for b in f.reliability_bins or []) == 100


def test_no_alert_means_no_ppv() -> None:
    labels = np.array([True] * 10 + [False] * 10)
    f = finding_figures(np.linspace(0, 0.4, 20), labels, 0.5, FLOORS)

    assert f.ppv is None and f.alert_rate == 0.0


def test_paired_difference_sees_a_better_candidate_and_none_between_equals() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.3
    live = labels * 0.5 + rng.normal(0, 0.5, 300)
    better = labels * 1.5 + rng.normal(0, 0.5, 300)

    gain = paired_auroc_difference(better, live, labels, n_resamples=300)
    same = paired_auroc_difference(live, live, labels, n_resamples=300)

    assert gain.low > 0 and gain.estimate > 0.1
    assert same.estimate == 0 and same.low == 0 and same.high == 0
