"""Multi-source adaptation: gradient reversal, the arms, label isolation, protocol, report."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from plugin.adaptation import (
    TARGET_LABEL_METHODS,
    UNSUPERVISED_METHODS,
    AdaptationError,
    Method,
    SiteResult,
    TargetData,
    TrainConfig,
    auprc,
    auroc,
    bootstrap_auroc,
    calibration,
    dann_lambda,
    evaluate,
    evaluate_target,
    fit,
    grad_reverse,
    make_shifted_sites,
    split_target,
    to_json,
    write_report,
)
from plugin.adaptation.networks import DannNetwork

Floats = npt.NDArray[np.float64]
FAST = TrainConfig(epochs=3, hidden=(16,))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cohort(seed: int = 0) -> tuple[Floats, Floats, npt.NDArray[np.str_]]:
    """Three sites of 60 rows, 10 features, outcome from the first two features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(180, 10))
    y = (X[:, 0] + X[:, 1] + rng.normal(size=180) > 0).astype(np.float64)
    site = np.repeat(np.array(["A", "B", "C"]), 60)
    X[site == "C"] += 1.0  # a shifted target
    return X, y, site


# --------------------------------------------------------------------------- gradient reversal


def test_gradient_reversal_is_identity_forward_and_scaled_negation_backward() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    out = grad_reverse(x, 0.7)
    assert torch.equal(out, x)
    (out * weights).sum().backward()  # type: ignore[no-untyped-call]
    assert x.grad is not None
    torch.testing.assert_close(x.grad, -0.7 * weights)


def test_gradient_reversal_flips_the_extractor_gradient_but_not_the_discriminator() -> None:
    torch.manual_seed(0)
    network = DannNetwork(6, (8,), 1, dropout=0.0)
    x = torch.randn(20, 6)
    labels = torch.cat([torch.zeros(10), torch.ones(10)])[None]
    first_layer = network.extractor[0]
    assert isinstance(first_layer, torch.nn.Linear)

    def gradients(lambda_: float) -> tuple[torch.Tensor, torch.Tensor]:
        network.zero_grad()
        logits = network.discriminate(network.features(x)[None], lambda_)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()  # type: ignore[no-untyped-call]
        extractor = first_layer.weight.grad
        head = network.domain_heads.w1.grad
        assert extractor is not None and head is not None
        return extractor.clone(), head.clone()

    extractor_1, head_1 = gradients(1.0)
    extractor_half, head_half = gradients(0.5)
    # Reference: the same loss without reversal, by hand.
    network.zero_grad()
    plain = network.domain_heads(network.features(x)[None])
    torch.nn.functional.binary_cross_entropy_with_logits(plain, labels).backward()  # type: ignore[no-untyped-call]
    extractor_plain = first_layer.weight.grad
    assert extractor_plain is not None and extractor_plain.abs().sum() > 0
    torch.testing.assert_close(extractor_1, -extractor_plain)
    torch.testing.assert_close(extractor_half, -0.5 * extractor_plain)
    torch.testing.assert_close(head_1, head_half)  # the discriminator learns normally


def test_dann_lambda_ramps_from_zero_towards_one() -> None:
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_lambda(1.0) == pytest.approx(1.0, abs=1e-4)
    values = [dann_lambda(p / 10) for p in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        grad_reverse(torch.zeros(1), -1.0)


# --------------------------------------------------------------------------- metrics


def test_auroc_counts_pairs_with_ties_as_half() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.2])
    pairs = [(a, b) for a in s[y == 1] for b in s[y == 0]]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auroc(y, s) == pytest.approx(expected)
    assert auroc(y, -s) == pytest.approx(1 - expected)


def test_auprc_is_average_precision() -> None:
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    # Thresholds at 0.9 (P=1, R=.5) and 0.7 (P=2/3, R=1): 0.5*1 + 0.5*2/3.
    assert auprc(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_calibration_slope_and_intercept() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 20000)
    y = (rng.random(20000) < p).astype(float)
    slope, intercept = calibration(y, p)
    assert slope == pytest.approx(1.0, abs=0.08)
    assert intercept == pytest.approx(0.0, abs=0.05)
    logit = np.log(p / (1 - p))
    overconfident = 1 / (1 + np.exp(-2.0 * logit))
    assert calibration(y, overconfident)[0] == pytest.approx(0.5, abs=0.05)
    too_high = 1 / (1 + np.exp(-(logit + 1.0)))
    assert calibration(y, too_high)[1] == pytest.approx(-1.0, abs=0.08)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0.0, 1.0], 50)
    scores = np.stack([y + rng.normal(0, 1.0, 100) for _ in range(3)])
    low, high = bootstrap_auroc(y, scores, n_resamples=300, seed=4)
    mean = statistics.fmean(auroc(y, s) for s in scores)
    assert low < mean < high
    assert (low, high) == bootstrap_auroc(y, scores, n_resamples=300, seed=4)
    assert (low, high) != bootstrap_auroc(y, scores, n_resamples=300, seed=5)


def test_split_target_is_stratified_and_disjoint() -> None:
    _, y, site = small_cohort()
    split = split_target(y, site, "C", seed=3)
    rows = np.flatnonzero(site == "C")
    assert set(split.train_rows) | set(split.held_out_rows) == set(rows)
    assert not set(split.train_rows) & set(split.held_out_rows)
    for part in (split.train_rows, split.held_out_rows):
        assert 0 < y[part].sum() < len(part)
    assert abs(y[split.train_rows].mean() - y[split.held_out_rows].mean()) < 0.1
    with pytest.raises(AdaptationError):
        split_target(np.where(site == "C", 0.0, y), site, "C")


# --------------------------------------------------------------------------- label isolation


def test_target_data_has_no_label_field() -> None:
    assert [f.name for f in dataclasses.fields(TargetData)] == ["X"]


@pytest.mark.parametrize("method", UNSUPERVISED_METHODS)
def test_unsupervised_arms_never_read_target_labels(method: Method) -> None:
    X, y, site = small_cohort()
    is_target = site == "C"
    nan_target = np.where(is_target, np.nan, y)
    flipped_target = np.where(is_target, 1.0 - y, y)
    scores = [
        fit(method, X, labels, site, "C", seed=0, config=FAST).predict_proba(X[is_target])
        for labels in (y, nan_target, flipped_target)
    ]
    np.testing.assert_array_equal(scores[0], scores[1])
    np.testing.assert_array_equal(scores[0], scores[2])


@pytest.mark.parametrize("method", sorted(TARGET_LABEL_METHODS))
def test_target_label_arms_do_read_them(method: Method) -> None:
    """The check above can fail: arms that use target labels react to poisoned ones."""
    X, y, site = small_cohort()
    is_target = site == "C"
    with pytest.raises(AdaptationError):
        fit(method, X, np.where(is_target, np.nan, y), site, "C", seed=0, config=FAST)
    honest = fit(method, X, y, site, "C", seed=0, config=FAST)
    flipped = fit(method, X, np.where(is_target, 1 - y, y), site, "C", seed=0, config=FAST)
    assert not np.array_equal(honest.predict_proba(X), flipped.predict_proba(X))


def test_evaluation_ignores_the_targets_training_labels_in_unsupervised_arms() -> None:
    X, y, site = small_cohort()
    split = split_target(y, site, "C", seed=0)
    poisoned = y.copy()
    poisoned[split.train_rows] = 1.0 - poisoned[split.train_rows]
    methods: list[Method] = [*UNSUPERVISED_METHODS, "target-only"]
    honest = evaluate_target(X, y, site, split, methods, [0], config=FAST)
    lied_to = evaluate_target(X, poisoned, site, split, methods, [0], config=FAST)
    for a, b in zip(honest, lied_to, strict=True):
        if a.method in TARGET_LABEL_METHODS:
            assert not np.array_equal(a.scores, b.scores)
        else:
            np.testing.assert_array_equal(a.scores, b.scores, err_msg=a.method)


# --------------------------------------------------------------------------- training


def test_fit_is_seeded_and_leaves_the_global_rng_alone() -> None:
    X, y, site = small_cohort()
    state = torch.random.get_rng_state()
    a = fit("multi-dann", X, y, site, "C", seed=1, config=FAST).predict_proba(X)
    assert torch.equal(state, torch.random.get_rng_state())
    b = fit("multi-dann", X, y, site, "C", seed=1, config=FAST).predict_proba(X)
    c = fit("multi-dann", X, y, site, "C", seed=2, config=FAST).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    hard = TrainConfig(epochs=3, hidden=(16,), mdan_combine="hard")
    d = fit("multi-dann", X, y, site, "C", seed=1, config=hard).predict_proba(X)
    assert not np.array_equal(a, d)


def test_early_stopping_watches_a_source_validation_split() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))
    y = (rng.random(300) < 0.5).astype(float)  # noise: validation loss soon rises
    site = np.repeat(np.array(["A", "B", "C"]), 100)
    cfg = TrainConfig(epochs=200, hidden=(64,), validation_fraction=0.3, patience=2)
    model = fit("single-dann", X, y, site, "C", seed=0, config=cfg)
    assert 3 <= model.log.epochs_run < 200
    assert len(model.log.epoch_seconds) == model.log.epochs_run


def test_fit_rejects_bad_inputs() -> None:
    X, y, site = small_cohort()
    with pytest.raises(AdaptationError):
        fit("source-only", X, y, site, "Z", seed=0)
    with pytest.raises(AdaptationError):
        fit("source-only", X, np.where(site == "A", np.nan, y), site, "C", seed=0)
    with pytest.raises(ValueError):
        fit("nonsense", X, y, site, "C", seed=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the adaptation task


def test_multi_dann_recovers_part_of_the_gap_source_only_leaves() -> None:
    """Target site05 writes 75% of the informative concepts in words no source uses.

    Source-only cannot score those words; a target-trained model can; Multi-DANN aligns the
    target's features with each source's and so maps part of them back, without labels.
    """
    data = make_shifted_sites(
        n_sites=5,
        n_rows=1500,
        n_features=100,
        n_informative=16,
        prevalence=(0.25, 0.35),
        dialect=[0.1, 0.1, 0.1, 0.1, 0.75],
        signal=4.0,
        binary=False,
        seed=1,
    )
    results = evaluate(
        data.X,
        data.y,
        data.site,
        ["source-only", "target-only", "multi-dann"],
        [0, 1, 2],
        target_sites=["site05"],
        n_bootstrap=300,
    )
    source, target, multi = (
        results.site_result(m, "site05") for m in ("source-only", "target-only", "multi-dann")
    )

    def describe(r: SiteResult) -> str:
        seeds = ", ".join(f"{a:.3f}" for a in r.auroc_by_seed)
        return f"{r.method}: {r.auroc:.3f} [{r.auroc_low:.3f}, {r.auroc_high:.3f}] seeds {seeds}"

    message = "; ".join(describe(r) for r in (source, target, multi))
    gap = statistics.median(target.auroc_by_seed) - statistics.median(source.auroc_by_seed)
    recovered = statistics.median(multi.auroc_by_seed) - statistics.median(source.auroc_by_seed)
    assert gap >= 0.1, f"the task must defeat source-only: {message}"
    assert recovered > 0, f"Multi-DANN must beat source-only: {message}"
    assert recovered >= 0.2 * gap, f"recovered {recovered / gap:.0%} of the gap: {message}"


# --------------------------------------------------------------------------- report


def test_report_writes_html_pngs_and_json(tmp_path: Path) -> None:
    X, y, site = small_cohort()
    results = evaluate(
        X, y, site, ["source-only", "standardised-lr"], [0, 1], config=FAST, n_bootstrap=50
    )
    assert results.target_sites == ("A", "B", "C")
    path = write_report(results, tmp_path / "report", notes=["synthetic, not clinical"])
    text = path.read_text()
    assert "<table>" in text and "standardised-lr" in text and "synthetic, not clinical" in text
    for target in ("A", "B", "C"):
        r = results.site_result("source-only", target)
        assert f"{r.auroc:.3f} [{r.auroc_low:.3f}, {r.auroc_high:.3f}]" in text
    for name in ("roc.png", "reliability.png"):
        assert (path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}"' in text
    document = json.loads(to_json(results))
    assert {s["method"] for s in document["summary"]} == {"source-only", "standardised-lr"}
    assert len(document["runs"]) == 3 * 2 * 2
    linear = next(s for s in document["summary"] if s["method"] == "standardised-lr")
    assert linear["seconds_per_epoch"] is None  # no epochs: NaN written as null
    assert "scores" not in document["runs"][0]
    assert len(json.loads(to_json(results, include_scores=True))["runs"][0]["scores"]) > 0
