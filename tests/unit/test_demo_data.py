"""The demo model's synthetic data (phantoms, sites, reports) and a tiny end-to-end training run."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plugin.demo import phantom as ph
from plugin.demo import reports as rp
from plugin.demo import sites as st

ANATOMY = ph.sample_anatomy(np.random.default_rng(3))

# One representative instance per finding, big enough to measure.
SPECS = {
    ph.CONSOLIDATION: ph.FindingSpec(ph.CONSOLIDATION, ph.RIGHT, 0.6, "lower", seed=1),
    ph.PLEURAL_EFFUSION: ph.FindingSpec(ph.PLEURAL_EFFUSION, ph.LEFT, 0.5, seed=2),
    ph.CARDIOMEGALY: ph.FindingSpec(ph.CARDIOMEGALY, None, 0.5, seed=3),
    ph.PNEUMOTHORAX: ph.FindingSpec(ph.PNEUMOTHORAX, ph.RIGHT, 0.5, "apical", seed=4),
    ph.NODULE: ph.FindingSpec(ph.NODULE, ph.LEFT, 0.3, seed=5),
    ph.SUPPORT_DEVICES: ph.FindingSpec(
        ph.SUPPORT_DEVICES, ph.RIGHT, 0.5, "endotracheal_tube+central_line", seed=6
    ),
}


@pytest.fixture(scope="module")
def bank() -> rp.SentenceBank:
    return rp.build_sentence_bank(seed=0)


# --------------------------------------------------------------------------- phantoms


def test_phantom_is_deterministic_per_seed() -> None:
    prevalence = {name: 0.5 for name in ph.FINDINGS}
    a = ph.generate_phantom(11, prevalence)
    b = ph.generate_phantom(11, prevalence)
    c = ph.generate_phantom(12, prevalence)
    assert np.array_equal(a.image, b.image)
    assert a.truth == b.truth
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.image.shape == (128, 128)
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0


@pytest.mark.parametrize("name", ph.FINDINGS)
def test_each_finding_changes_the_image_where_its_mask_says(name: str) -> None:
    without = ph.render_phantom(ANATOMY, ())
    with_ = ph.render_phantom(ANATOMY, (SPECS[name],))
    mask = with_.masks[name]
    assert mask.any() and with_.truth[name]["present"] and not without.truth[name]["present"]
    delta = float(with_.image[mask].mean() - without.image[mask].mean())
    # Opacities and devices add density (brighter); pleural air removes it (darker).
    if name == ph.PNEUMOTHORAX:
        assert delta < -0.03
    else:
        assert delta > 0.03
    # The change is concentrated in the mask: soft edges and tails reach a little beyond it.
    change = np.abs(with_.image - without.image)
    far = ~_dilate(mask, 4)
    assert change[far].mean() < 0.05 * change[mask].mean()


def test_findings_are_reported_with_side_and_size() -> None:
    phantom = ph.render_phantom(ANATOMY, (SPECS[ph.PLEURAL_EFFUSION], SPECS[ph.NODULE]))
    assert phantom.present() == [ph.PLEURAL_EFFUSION, ph.NODULE]
    effusion = phantom.truth[ph.PLEURAL_EFFUSION]
    assert effusion["side"] == ph.LEFT and effusion["size_label"] == "moderate"
    # Patient's left is image right on a PA film.
    columns = np.flatnonzero(phantom.masks[ph.PLEURAL_EFFUSION].any(axis=0))
    assert columns.min() > 64


def test_cardiomegaly_raises_the_cardiothoracic_ratio() -> None:
    normal = ph.render_phantom(ANATOMY, ())
    enlarged = ph.render_phantom(ANATOMY, (SPECS[ph.CARDIOMEGALY],))
    assert normal.cardiothoracic_ratio < 0.52
    assert enlarged.cardiothoracic_ratio > 0.55
    assert enlarged.cardiothoracic_ratio == pytest.approx(
        ph.cardiothoracic_ratio(enlarged.heart, enlarged.lungs)
    )


# --------------------------------------------------------------------------- sites


def test_six_sites_with_both_photometric_interpretations() -> None:
    assert len(st.SITES) == 6
    assert {s.photometric_interpretation for s in st.SITES} == {st.MONOCHROME1, st.MONOCHROME2}
    assert all(set(s.prevalence) == set(ph.FINDINGS) for s in st.SITES)


def test_site_acquisition_changes_intensity_statistics() -> None:
    phantom = ph.render_phantom(ANATOMY, (SPECS[ph.NODULE],))
    stats = []
    for site in st.SITES:
        acquired = st.acquire(phantom.image, phantom.masks, site, np.random.default_rng(0))
        assert acquired.pixels.min() >= 0.0 and acquired.pixels.max() <= 1.0
        assert acquired.masks[ph.NODULE].any()
        stats.append(
            [*np.percentile(acquired.pixels, [10, 50, 90]).tolist(), acquired.pixels.std()]
        )
    stats_array = np.array(stats)
    # Every pair of sites differs somewhere in its intensity distribution.
    gaps = np.abs(stats_array[:, None] - stats_array[None]).max(axis=2)
    assert (gaps + np.eye(len(stats)) > 0.01).all()
    noisy = st.site_by_name("demo-f")
    clean = st.site_by_name("demo-c")
    lungs = _erode(phantom.lungs, 3)
    high_pass = {
        site.name: np.std(
            _laplacian(st.acquire(phantom.image, {}, site, np.random.default_rng(0)).pixels)[lungs]
        )
        for site in (noisy, clean)
    }
    assert high_pass["demo-f"] > 1.5 * high_pass["demo-c"]


def test_monochrome1_is_stored_inverted() -> None:
    pixels = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    assert st.to_stored(pixels, st.MONOCHROME2, 12).tolist() == [[0, 1024, 4095]]
    assert st.to_stored(pixels, st.MONOCHROME1, 12).tolist() == [[4095, 3071, 0]]


def test_simulated_case_is_deterministic() -> None:
    a = st.simulate_case(np.random.SeedSequence(5, spawn_key=(1, 9)))
    b = st.simulate_case(np.random.SeedSequence(5, spawn_key=(1, 9)))
    assert a.site == b.site and np.array_equal(a.pixels, b.pixels)
    assert a.phantom.truth == b.phantom.truth


# --------------------------------------------------------------------------- reports


def test_heldout_phrasings_are_disjoint_from_training(bank: rp.SentenceBank) -> None:
    train, heldout = set(bank.texts(rp.TRAIN)), set(bank.texts(rp.HELDOUT))
    assert train and heldout and not train & heldout
    train_phrasings = {s.phrasing for s in bank.select(rp.TRAIN)}
    assert not train_phrasings & {s.phrasing for s in bank.select(rp.HELDOUT)}
    assert len(train) + len(heldout) >= 1000


@pytest.mark.parametrize("name", ph.FINDINGS)
def test_every_finding_has_many_positive_and_negative_phrasings(
    bank: rp.SentenceBank, name: str
) -> None:
    assert len(bank.phrasings(name, rp.POSITIVE)) >= 20
    assert len(bank.phrasings(name, rp.NEGATIVE)) >= 20
    for split in (rp.TRAIN, rp.HELDOUT):
        assert len(bank.prompts(name, rp.POSITIVE, split)) >= 5
        assert len(bank.prompts(name, rp.NEGATIVE, split)) >= 5


def test_expected_normal_statements_exist(bank: rp.SentenceBank) -> None:
    texts = set(bank.texts())
    for text in (
        "the heart is not enlarged",
        "no pleural effusion",
        "the pleural spaces are free of fluid",
        "the costophrenic angles are sharp",
        "no pneumothorax",
        "the lungs are clear",
    ):
        assert text in texts


def test_judge_reads_negation_laterality_and_devices(bank: rp.SentenceBank) -> None:
    truth = ph.render_phantom(
        ANATOMY, (SPECS[ph.PLEURAL_EFFUSION], SPECS[ph.SUPPORT_DEVICES])
    ).truth
    by_text = {s.text: s for s in bank.sentences}
    assert rp.judge(by_text["no pleural effusion"], truth) is False
    assert rp.judge(by_text["no pneumothorax"], truth) is True
    assert rp.judge(by_text["the lungs are clear"], truth) is True
    assert rp.judge(by_text["normal chest radiograph"], truth) is False
    assert rp.judge(_one(bank, "left pleural effusion"), truth) is True
    assert rp.judge(_one(bank, "right pleural effusion"), truth) is False
    assert rp.judge(_one(bank, "endotracheal tube"), truth) is True
    assert rp.judge(_one(bank, "right pigtail catheter"), truth) is False


def test_composed_reports_are_true_and_use_one_split(bank: rp.SentenceBank) -> None:
    index = rp.SentenceIndex(bank.select(rp.HELDOUT))
    rng = np.random.default_rng(0)
    for seed in range(30):
        phantom = ph.generate_phantom(seed, {name: 0.4 for name in ph.FINDINGS})
        report = rp.compose_report(phantom.truth, index, rng)
        assert report
        assert all(rp.judge(s, phantom.truth) is True for s in report)
        assert all(s.split == rp.HELDOUT for s in report)
        positives = {s.findings[0] for s in report if s.polarity == rp.POSITIVE}
        assert positives == set(phantom.present())


def test_split_sentences() -> None:
    assert rp.split_sentences("Small left  effusion. No pneumothorax;\nHeart normal.") == [
        "small left effusion",
        "no pneumothorax",
        "heart normal",
    ]


# --------------------------------------------------------------------------- training


class HashEncoder:
    """Stand-in for MiniLM: a fixed random unit vector per sentence (fast, offline)."""

    identity = "hash-encoder-test"
    dim = 32

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.dim))
        vectors = np.array(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def manifest_fields(self) -> dict[str, Any]:
        return {"kind": "none"}


def test_tiny_training_run_exports_a_matching_onnx_tower(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch = pytest.importorskip("torch", reason="demo training needs torch (scripts/bootstrap)")
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (pyproject)")

    from plugin.demo import train

    result = train.train_demo(
        tmp_path / "bundle",
        seed=0,
        n_train=32,
        epochs=1,
        threads=1,
        n_eval=16,
        encoder=HashEncoder(),
        cache_dir=tmp_path / "cache",
        batch_size=16,
    )
    out = tmp_path / "bundle"
    assert sorted(p.name for p in out.iterdir()) == [
        "image_tower.onnx",
        "prompt_embeddings.npz",
        "text_projection.npz",
    ]
    assert result["synthetic"] and result["model_card"]["not_for_clinical_use"]
    assert "NOT FOR CLINICAL USE" in result["model_card"]["intended_use"]
    dim = result["embedding_dim"]

    # onnxruntime and torch agree; the batch axis is dynamic; outputs are unit vectors.
    session = ort.InferenceSession(
        str(out / "image_tower.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["image_embeds"]
    pixels = np.random.default_rng(0).uniform(-2, 2, size=(5, 1, 128, 128)).astype(np.float32)
    onnx_out = session.run(None, {"pixel_values": pixels})[0]
    assert onnx_out.shape == (5, dim)
    np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)
    assert result["metrics"]["onnx_min_cosine_vs_torch"] >= 0.9999

    # The projection's numpy twin reproduces the prompt embeddings written by torch.
    projection = dict(np.load(out / "text_projection.npz"))
    prompts = np.load(out / "prompt_embeddings.npz")
    for finding in result["findings"]:
        positive = prompts[f"{finding['name']}/positive"]
        assert positive.shape == (len(finding["positive_prompts"]), dim)
        twin = train.project_sentences(
            projection, HashEncoder().encode(finding["positive_prompts"])
        )
        np.testing.assert_allclose(twin, positive, atol=1e-5)
        assert prompts[f"{finding['name']}/negative"].shape[0] == len(finding["negative_prompts"])

    metrics = result["metrics"]
    assert set(metrics["auroc_heldout_prompts"]) == set(ph.FINDINGS)
    assert set(metrics["image_to_text_same_findings"]) == {"R@1", "R@5", "R@10"}
    assert torch.get_num_threads() >= 1


def test_training_is_deterministic_for_a_seed() -> None:
    torch = pytest.importorskip("torch", reason="demo training needs torch (scripts/bootstrap)")
    from plugin.demo import train

    bank = rp.build_sentence_bank(seed=0)
    sentences = bank.select(rp.TRAIN)
    vectors = HashEncoder().encode([s.text for s in sentences])
    cases = train.render_cases(16, seed=1, stream=1, size=128)
    config = train.DemoConfig(n_train=16, epochs=1, batch_size=8, threads=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train.fit(config, cases, rp.SentenceIndex(sentences), vectors) for _ in range(2)]
    finally:
        torch.set_num_threads(previous)
    first, second = (run.image_tower.state_dict() for run in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert runs[0].history[0]["pairwise"] == runs[1].history[0]["pairwise"]


def test_auroc_and_recall_helpers() -> None:
    from plugin.demo import train

    assert train.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert train.auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    similarity = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.0, 0.5, 0.4]])
    recall = train.recall_at_k(similarity, np.eye(3, dtype=bool), ks=(1, 2))
    assert recall == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}


# --------------------------------------------------------------------------- helpers


def _one(bank: rp.SentenceBank, text: str) -> rp.Sentence:
    matches = [s for s in bank.sentences if s.text == text]
    assert matches, f"no sentence {text!r} in the bank"
    return matches[0]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    return ~_erode(~mask, steps)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        shrunk = out.copy()
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        out = shrunk
    return out


def _laplacian(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image.astype(np.float64), 1, mode="edge")
    return (
        4 * padded[1:-1, 1:-1]
        - padded[:-2, 1:-1]
        - padded[2:, 1:-1]
        - padded[1:-1, :-2]
        - padded[1:-1, 2:]
    )
