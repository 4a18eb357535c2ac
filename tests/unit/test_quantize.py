from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.models.bundle import load_bundle
from plugin.models.quantize import probe_inputs, quantize_bundle
from plugin.models.runtime import ImageEncoder
from tests.models_fixtures import TinyImageTower, build_bundle, edit_manifest, export_image_tower


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    tower = export_image_tower(TinyImageTower(), tmp_path / "tower.onnx")
    return build_bundle(tmp_path / "bundle", tower)


def test_int8_copy_is_a_valid_bundle_close_to_fp32(bundle_dir: Path, tmp_path: Path) -> None:
    quantized, parity = quantize_bundle(bundle_dir, tmp_path / "int8")

    assert quantized.version == "1.0.0-int8"
    assert load_bundle(tmp_path / "int8").manifest.files.image_tower.sha256 != (
        load_bundle(bundle_dir).manifest.files.image_tower.sha256
    )
    assert parity.samples == 16
    assert 0.9 < parity.min_cosine <= parity.mean_cosine <= 1.0 + 1e-6


def test_quantize_cli_reports_parity_and_refuses_to_overwrite(
    bundle_dir: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["--data-dir", str(tmp_path / "data"), "model", "quantize", str(bundle_dir)]

    first = runner.invoke(app, [*args, str(tmp_path / "int8"), "--install"])
    again = runner.invoke(app, [*args, str(tmp_path / "int8")])

    assert first.exit_code == 0, first.output
    assert "tiny-clip@1.0.0-int8: embedding cosine to fp32 mean" in first.output
    assert again.exit_code == 2
    assert "exists" in again.output
    listed = runner.invoke(app, ["--data-dir", str(tmp_path / "data"), "model", "list"])
    assert "1.0.0-int8" in listed.output


def test_int8_copy_keeps_the_patch_tokens_and_the_patch_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = export_image_tower(TinyImageTower(with_patches=True), tmp_path / "tower.onnx")
    source = build_bundle(tmp_path / "bundle", tower)
    edit_manifest(source, patch_grid=[8, 8])

    quantized, _ = quantize_bundle(source, tmp_path / "int8")

    fp32 = ImageEncoder(load_bundle(source), threads=1)
    int8 = ImageEncoder(quantized, threads=1)
    pixels = probe_inputs(quantized, count=2)
    _, expected = fp32.encode_with_patches(pixels)
    _, patches = int8.encode_with_patches(pixels)
    assert quantized.manifest.patch_grid == (8, 8)
    assert int8.patch_grid(patches.shape[1]) == (8, 8)
    cosine = np.sum(patches * expected, axis=-1) / (
        np.linalg.norm(patches, axis=-1) * np.linalg.norm(expected, axis=-1)
    )
    assert cosine.min() > 0.9
