"""Adapters folded into a bundle's files give exactly the adapter on the parent's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]
import pytest
import torch

from plugin.finetune.adapters import AdapterConfig, PairFeatures, train_adapters
from plugin.finetune.folding import (
    Affine,
    fold_into_image_tower,
    fold_into_projection,
    fold_into_text_tower,
)
from plugin.models.projection import project_sentences
from plugin.models.registry import DEMO_BUNDLE_DIR
from tests.models_fixtures import (
    CHANNELS,
    DIM,
    SIZE,
    TinyImageTower,
    TinyTextTower,
    export_image_tower,
    export_text_tower,
)


def _random_affine(dim: int, seed: int, bias: bool) -> Affine:
    rng = np.random.default_rng(seed)
    matrix = (np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))).astype(np.float32)
    return Affine(matrix, rng.normal(size=dim).astype(np.float32) * 0.2 if bias else None)


def _run(path: Path, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(x) for x in session.run(outputs, feeds)]


@pytest.fixture
def image_tower(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_image_tower(TinyImageTower(with_patches=True), tmp_path / "tower.onnx")


def test_image_tower_gives_the_adapter_on_the_parent_outputs(
    image_tower: Path, tmp_path: Path
) -> None:
    adapter = _random_affine(DIM, 1, bias=True)
    folded = tmp_path / "tuned.onnx"
    fold_into_image_tower(image_tower, folded, adapter)
    pixels = {"pixel_values": np.random.default_rng(2).normal(size=(5, CHANNELS, SIZE, SIZE))}
    feeds = {k: v.astype(np.float32) for k, v in pixels.items()}
    names = ["image_embeds", "patch_embeds"]
    parent_embeds, parent_patches = _run(image_tower, feeds, names)
    child_embeds, child_patches = _run(folded, feeds, names)
    np.testing.assert_allclose(child_embeds, adapter.apply(parent_embeds), atol=1e-5)
    # Patches get the same linear map (no bias, no normalisation).
    np.testing.assert_allclose(child_patches, parent_patches @ adapter.matrix.T, atol=1e-5)
    assert not np.allclose(child_embeds, parent_embeds, atol=1e-3)


def test_a_tuned_tower_can_be_tuned_again(image_tower: Path, tmp_path: Path) -> None:
    first, second = _random_affine(DIM, 3, bias=True), _random_affine(DIM, 4, bias=False)
    fold_into_image_tower(image_tower, tmp_path / "once.onnx", first)
    fold_into_image_tower(tmp_path / "once.onnx", tmp_path / "twice.onnx", second)
    feeds = {"pixel_values": np.ones((2, CHANNELS, SIZE, SIZE), dtype=np.float32)}
    (parent,) = _run(image_tower, feeds, ["image_embeds"])
    (twice,) = _run(tmp_path / "twice.onnx", feeds, ["image_embeds"])
    np.testing.assert_allclose(twice, second.apply(first.apply(parent)), atol=1e-5)


def test_text_tower_gives_the_adapter_on_the_parent_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = export_text_tower(TinyTextTower(vocab_size=20), tmp_path / "text.onnx")
    adapter = _random_affine(DIM, 5, bias=False)
    fold_into_text_tower(tower, tmp_path / "tuned.onnx", adapter)
    ids = np.random.default_rng(6).integers(0, 20, size=(4, 7))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    (parent,) = _run(tower, feeds, ["text_embeds"])
    (child,) = _run(tmp_path / "tuned.onnx", feeds, ["text_embeds"])
    np.testing.assert_allclose(child, adapter.apply(parent), atol=1e-5)


def test_projection_of_the_demo_gives_the_adapter_on_its_outputs() -> None:
    manifest = json.loads((DEMO_BUNDLE_DIR / "bundle.json").read_text())
    with np.load(DEMO_BUNDLE_DIR / manifest["text_encoder"]["projection"]["path"]) as npz:
        arrays = {key: npz[key] for key in npz.files}
    dim = manifest["embedding_dim"]
    adapter = _random_affine(dim, 7, bias=False)
    sentences = np.random.default_rng(8).normal(size=(6, arrays["linear_weight"].shape[1]))
    parent = project_sentences(arrays, sentences)
    child = project_sentences(fold_into_projection(arrays, adapter), sentences)
    np.testing.assert_allclose(child, adapter.apply(parent), atol=1e-5)


def test_training_starts_at_the_identity_and_lowers_the_loss() -> None:
    rng = np.random.default_rng(0)
    n, dim = 48, 16
    images = rng.normal(size=(n, dim)).astype(np.float32)
    # Each report is a fixed random rotation of its image plus noise: learnable, not given.
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    sentences = (images @ rotation.T + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)
    features = PairFeatures(images, sentences, np.arange(n), np.arange(n))
    untrained = train_adapters(features, 10.0, AdapterConfig(rank=8, image_rank=4, epochs=0))
    assert np.array_equal(untrained.text.matrix, np.eye(dim, dtype=np.float32))
    trained = train_adapters(features, 10.0, AdapterConfig(rank=8, image_rank=4, epochs=40))
    assert trained.losses[-1] < 0.7 * trained.losses[0]
