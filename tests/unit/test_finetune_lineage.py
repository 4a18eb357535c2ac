"""The optional ``lineage`` entry of a bundle manifest, and what a tuned copy leaves behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from plugin.finetune.adapters import TrainedAdapters
from plugin.finetune.child import write_tuned_bundle
from plugin.finetune.folding import Affine
from plugin.models.bundle import (
    BundleError,
    Lineage,
    load_bundle,
    parse_manifest,
    read_manifest,
)
from plugin.models.bundle_writer import pin_file, write_manifest
from plugin.models.registry import DEMO_BUNDLE_DIR
from plugin.models.runtime import PromptEmbeddings
from tests.models_fixtures import (
    DIM,
    TinyImageTower,
    build_bundle,
    export_image_tower,
    manifest_data,
)

LINEAGE: dict[str, Any] = {
    "parent": "tiny-clip@1.0.0",
    "parent_manifest_sha256": "a" * 64,
    "method": "low-rank adapters on frozen towers, symmetric InfoNCE",
    "hyperparameters": {"rank": 8, "epochs": 60, "image_bias": False},
    "pairs": 500,
    "data": "500 image-report pairs from pairs.csv",
    "created": "2026-12-02",
    "evaluation": {"heldout_pairs": 100},
}


def test_a_manifest_with_lineage_is_valid() -> None:
    manifest = parse_manifest(manifest_data(lineage=LINEAGE))
    assert manifest.lineage is not None
    assert manifest.lineage.parent == "tiny-clip@1.0.0"
    assert manifest.lineage.hyperparameters["rank"] == 8
    assert manifest.lineage.dropped == []


def test_bundles_without_lineage_still_load() -> None:
    assert read_manifest(DEMO_BUNDLE_DIR).lineage is None
    assert parse_manifest(manifest_data()).lineage is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"parent_manifest_sha256": "xyz"}, "lineage.parent_manifest_sha256: must be the 64 hex"),
        ({"pairs": 0}, "lineage.pairs:"),
        ({"notes": "x"}, "lineage.notes: unknown key"),
        ({"method": ""}, "lineage.method:"),
    ],
)
def test_a_bad_lineage_names_the_key_to_fix(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(BundleError) as caught:
        parse_manifest(manifest_data(lineage={**LINEAGE, **change}))
    assert problem in str(caught.value)


def test_a_tuned_copy_drops_heads_and_fitted_calibration_and_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    parent_dir = build_bundle(
        tmp_path / "parent", export_image_tower(TinyImageTower(), tmp_path / "tower.onnx")
    )
    (parent_dir / "heads").mkdir()
    np.savez(parent_dir / "heads" / "linear_probe-v1.npz", w=np.zeros(3))
    manifest = read_manifest(parent_dir)
    head = {
        "name": "linear_probe",
        "version": 1,
        "kind": "linear_probe",
        "file": pin_file(parent_dir, "heads/linear_probe-v1.npz").model_dump(),
        "findings": ["pneumothorax"],
    }
    findings = [f.model_dump() for f in manifest.findings]
    findings[0]["calibration"] = {"temperature": 2.0, "bias": 0.5, "fitted_on": "labels.csv"}
    data = {**manifest.model_dump(), "heads": [head], "active_head": "linear_probe-v1"}
    write_manifest(parent_dir, parse_manifest({**data, "findings": findings}))
    parent = load_bundle(parent_dir)
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]
    text = Affine(rotation.astype(np.float32))
    adapters = TrainedAdapters(Affine(np.eye(DIM, dtype=np.float32)), text)
    child = write_tuned_bundle(
        parent,
        tmp_path / "child",
        name="tiny-clip",
        version="2.0.0",
        adapters=adapters,
        lineage=Lineage(**LINEAGE),
    )
    m = child.manifest
    assert m.version == "2.0.0" and m.heads == [] and m.active_head is None
    assert not (child.directory / "heads").exists()
    assert m.findings[0].calibration.temperature == 1.0
    assert m.findings[0].calibration.fitted_on is None
    assert m.lineage is not None
    dropped = " ".join(m.lineage.dropped)
    assert "heads linear_probe-v1" in dropped and "calibration of pleural_effusion" in dropped
    assert "Fine-tuned from tiny-clip@1.0.0" in m.model_card.training_data
    # Prompt embeddings are the parent's, moved by the text adapter.
    before, after = PromptEmbeddings.load(parent), PromptEmbeddings.load(child)
    np.testing.assert_allclose(
        after.positive["pneumothorax"], text.apply(before.positive["pneumothorax"]), atol=1e-6
    )
    # An identity image adapter leaves the image tower as it was.
    assert m.files.image_tower.sha256 == parent.manifest.files.image_tower.sha256
