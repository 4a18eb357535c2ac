from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.models.bundle import load_bundle
from plugin.models.quantize import quantize_bundle
from tests.models_fixtures import TinyImageTower, build_bundle, export_image_tower


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
