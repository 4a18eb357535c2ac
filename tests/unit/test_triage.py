"""Triage math: zero-shot prompt ensembles, calibration, few-shot heads, priority policy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from plugin.errors import ConfigError
from plugin.triage import (
    Calibration,
    FindingPrompts,
    HeadLoadError,
    InsufficientLabels,
    LinearProbe,
    PriorityPolicy,
    TipAdapter,
    decide,
    ensemble_embedding,
    fit_calibration,
    prompts_from_arrays,
    zero_shot_probabilities,
)

Floats = npt.NDArray[np.float64]


def unit(vector: npt.ArrayLike) -> Floats:
    array = np.asarray(vector, dtype=np.float64)
    result: Floats = array / np.linalg.norm(array, axis=-1, keepdims=True)
    return result


def sigmoid(x: npt.ArrayLike) -> Floats:
    result: Floats = 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
    return result


# --- zero-shot -------------------------------------------------------------------------------


def test_ensemble_of_two_unit_vectors_is_their_normalised_sum() -> None:
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=32)), unit(rng.normal(size=32))
    np.testing.assert_allclose(ensemble_embedding(np.stack([a, b])), unit(a + b), atol=1e-12)


def test_ensemble_weighs_prompts_equally_whatever_their_norm() -> None:
    rng = np.random.default_rng(1)
    a, b = unit(rng.normal(size=16)), unit(rng.normal(size=16))
    np.testing.assert_allclose(ensemble_embedding(np.stack([10 * a, b])), unit(a + b), atol=1e-12)


def test_zero_shot_ranks_the_image_near_the_positive_prompt_first() -> None:
    rng = np.random.default_rng(2)
    dim = 64
    finding = FindingPrompts.from_prompt_sets(
        "pneumothorax",
        positive=unit(rng.normal(size=(3, dim))),
        negative=unit(rng.normal(size=(3, dim))),
    )
    near_positive = unit(finding.positive + 0.3 * unit(rng.normal(size=dim)))
    near_negative = unit(finding.negative + 0.3 * unit(rng.normal(size=dim)))
    unrelated = unit(rng.normal(size=dim))
    images = np.stack([near_negative, near_positive, unrelated]).astype(np.float32)

    probs = zero_shot_probabilities(images, [finding], logit_scale=100.0)

    assert probs.shape == (3, 1)
    assert list(np.argsort(-probs[:, 0])) == [1, 2, 0]
    assert probs[1, 0] > 0.99 and probs[0, 0] < 0.01
    # Same number as the two-way softmax of the manifest's formula.
    logits = 100.0 * np.array([images[2] @ finding.positive, images[2] @ finding.negative])
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert probs[2, 0] == pytest.approx(softmax[0], rel=1e-5)


def test_prompts_from_arrays_names_a_missing_prompt_set() -> None:
    arrays = {"effusion/positive": np.eye(4)[:2]}
    with pytest.raises(ConfigError, match="effusion/negative"):
        prompts_from_arrays(arrays, ["effusion"])


# --- calibration -----------------------------------------------------------------------------


def test_fit_calibration_recovers_temperature_and_bias() -> None:
    rng = np.random.default_rng(3)
    temperature, bias = 2.0, 0.7
    raw_logits = rng.normal(0.0, 3.0, size=20_000)
    labels = rng.random(raw_logits.size) < sigmoid((raw_logits - bias) / temperature)

    calibration = fit_calibration(sigmoid(raw_logits), labels.astype(int))

    assert calibration.temperature == pytest.approx(temperature, rel=0.1)
    assert calibration.bias == pytest.approx(bias, abs=0.2)


def test_fitted_threshold_separates_a_separable_set() -> None:
    rng = np.random.default_rng(4)
    probs = np.concatenate([rng.uniform(0.55, 0.9, 40), rng.uniform(0.1, 0.5, 60)])
    labels = np.array([1] * 40 + [0] * 60)

    calibration = fit_calibration(probs, labels)
    calibrated = calibration.apply(probs)

    assert np.all(calibrated[labels == 1] >= calibration.threshold)
    assert np.all(calibrated[labels == 0] < calibration.threshold)


def test_target_sensitivity_takes_the_highest_threshold_that_reaches_it() -> None:
    rng = np.random.default_rng(5)
    probs = np.concatenate([rng.uniform(0.3, 0.9, 50), rng.uniform(0.1, 0.7, 50)])
    labels = np.array([1] * 50 + [0] * 50)

    calibration = fit_calibration(probs, labels, target_sensitivity=0.9)
    called = calibration.apply(probs) >= calibration.threshold

    assert called[labels == 1].sum() == math.ceil(0.9 * 50)


def test_calibration_of_one_class_only_says_both_are_needed() -> None:
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        fit_calibration([0.2, 0.7, 0.9], [1, 1, 1])
    with pytest.raises(InsufficientLabels):
        fit_calibration([0.2, 0.7, 0.9], [0, 0, 0])


def test_calibration_applies_temperature_and_bias() -> None:
    calibration = Calibration(temperature=2.0, bias=1.0)
    assert float(calibration.apply(sigmoid(3.0))) == pytest.approx(float(sigmoid(1.0)))
    assert float(Calibration().apply(0.3)) == pytest.approx(0.3)


def test_decide_is_indeterminate_inside_the_band() -> None:
    calibration = Calibration(threshold=0.5, indeterminate_band=0.1)
    assert decide(0.55, calibration) == "indeterminate"
    assert decide(0.45, calibration) == "indeterminate"
    assert decide(0.65, calibration) == "present"
    assert decide(0.35, calibration) == "absent"
    assert decide(0.5, Calibration(indeterminate_band=0.0)) == "present"


def test_calibration_round_trips_through_the_manifest_block() -> None:
    calibration = Calibration(1.5, -0.2, 0.4, 0.05, fitted_on="site-a 2026-11, 412 studies")
    assert Calibration.from_manifest(calibration.to_manifest()) == calibration
    with pytest.raises(ValueError, match="temperature"):
        Calibration.from_manifest({"temperature": 0})


# --- few-shot heads --------------------------------------------------------------------------

FINDINGS = ["pneumothorax", "pleural_effusion"]


def separable_set(count: int, seed: int) -> tuple[Floats, npt.NDArray[np.int_]]:
    """Unit embeddings where each finding present adds a fixed direction."""
    rng = np.random.default_rng(seed)
    directions = unit(np.random.default_rng(99).normal(size=(len(FINDINGS), 32)))
    labels = rng.integers(0, 2, size=(count, len(FINDINGS)))
    embeds = rng.normal(size=(count, 32)) / np.sqrt(32) + 1.5 * (2 * labels - 1) @ directions
    return unit(embeds), labels


def accuracy(probs: Floats, labels: npt.NDArray[np.int_]) -> Floats:
    result: Floats = ((probs >= 0.5) == labels).mean(axis=0)
    return result


def test_linear_probe_beats_chance_and_round_trips(tmp_path: Path) -> None:
    train, train_labels = separable_set(80, seed=6)
    test, test_labels = separable_set(200, seed=7)
    probe = LinearProbe.fit(train, train_labels, FINDINGS, l2=0.1)

    assert np.all(accuracy(probe.predict_proba(test), test_labels) > 0.9)

    probe.save(tmp_path / "probe-v1.npz")
    loaded = LinearProbe.load(tmp_path / "probe-v1.npz", FINDINGS)
    np.testing.assert_array_equal(loaded.predict_proba(test), probe.predict_proba(test))


def test_tip_adapter_beats_chance_and_round_trips(tmp_path: Path) -> None:
    train, train_labels = separable_set(80, seed=8)
    test, test_labels = separable_set(200, seed=9)
    uninformative = np.full((200, len(FINDINGS)), 0.5)
    adapter = TipAdapter.fit(train, train_labels, FINDINGS, alpha=1.0, beta=5.5)

    assert np.all(accuracy(adapter.predict_proba(test, uninformative), test_labels) > 0.9)

    adapter.save(tmp_path / "cache-v1.npz")
    loaded = TipAdapter.load(tmp_path / "cache-v1.npz", FINDINGS)
    np.testing.assert_array_equal(
        loaded.predict_proba(test, uninformative), adapter.predict_proba(test, uninformative)
    )
    assert (loaded.alpha, loaded.beta) == (1.0, 5.5)


def test_tip_adapter_moves_the_zero_shot_prior_towards_the_cache() -> None:
    train, train_labels = separable_set(40, seed=10)
    prior = np.full((1, 2), 0.3)
    adapter = TipAdapter.fit(train, train_labels, FINDINGS, alpha=0.0)
    np.testing.assert_allclose(adapter.predict_proba(train[:1], prior), prior)


def test_loading_a_head_for_other_findings_is_refused(tmp_path: Path) -> None:
    train, labels = separable_set(40, seed=11)
    LinearProbe.fit(train, labels, FINDINGS).save(tmp_path / "probe.npz")
    with pytest.raises(HeadLoadError, match="refit the head"):
        LinearProbe.load(tmp_path / "probe.npz", ["pneumothorax", "cardiomegaly"])
    with pytest.raises(HeadLoadError, match="not a tip_adapter"):
        TipAdapter.load(tmp_path / "probe.npz", FINDINGS)


def test_a_head_loaded_with_findings_reordered_reorders_its_columns(tmp_path: Path) -> None:
    train, labels = separable_set(40, seed=12)
    probe = LinearProbe.fit(train, labels, FINDINGS)
    probe.save(tmp_path / "probe.npz")
    swapped = LinearProbe.load(tmp_path / "probe.npz", FINDINGS[::-1])
    np.testing.assert_array_equal(swapped.predict_proba(train), probe.predict_proba(train)[:, ::-1])


def test_a_file_that_is_not_a_head_is_reported(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(HeadLoadError, match="cannot read head"):
        LinearProbe.load(tmp_path / "junk.npz", FINDINGS)
    with (tmp_path / "plain.npy").open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(HeadLoadError, match=r"not an \.npz archive"):
        LinearProbe.load(tmp_path / "plain.npy", FINDINGS)


def test_linear_probe_needs_both_classes_of_each_finding() -> None:
    train, labels = separable_set(20, seed=13)
    labels[:, 1] = 0
    with pytest.raises(InsufficientLabels, match="pleural_effusion"):
        LinearProbe.fit(train, labels, FINDINGS)


# --- priority --------------------------------------------------------------------------------

MANIFEST_FINDINGS: list[dict[str, Any]] = [
    {"name": "pneumothorax", "stat_threshold": 0.8},
    {"name": "pleural_effusion", "stat_threshold": 0.9},
    {"name": "cardiomegaly"},
]


def test_priority_policy_picks_stat_and_names_the_trigger() -> None:
    policy = PriorityPolicy.from_manifest(
        {"stat_if_any": ["pneumothorax", "pleural_effusion"], "default": "routine"},
        MANIFEST_FINDINGS,
    )
    probs = {"pneumothorax": 0.85, "pleural_effusion": 0.5, "cardiomegaly": 0.99}
    assert policy.priority_for(probs) == ("stat", ["pneumothorax"])
    probs = {"pneumothorax": 0.79, "pleural_effusion": 0.89, "cardiomegaly": 0.99}
    assert policy.priority_for(probs) == ("routine", [])


def test_priority_manifest_mistakes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no stat_threshold"):
        PriorityPolicy.from_manifest({"stat_if_any": ["cardiomegaly"]}, MANIFEST_FINDINGS)
    with pytest.raises(ConfigError, match="not a finding"):
        PriorityPolicy.from_manifest({"stat_if_any": ["fracture"]}, MANIFEST_FINDINGS)
    with pytest.raises(ConfigError, match="stat or routine"):
        PriorityPolicy.from_manifest({"default": "urgent"}, MANIFEST_FINDINGS)


def test_a_stat_finding_without_a_probability_is_an_error_not_routine() -> None:
    policy = PriorityPolicy({"pneumothorax": 0.8})
    with pytest.raises(ValueError, match="pneumothorax"):
        policy.priority_for({"pleural_effusion": 0.99})
