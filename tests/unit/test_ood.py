"""The out-of-distribution guard: its math, its reference file, its manifest entry, and what
the committed demo bundle makes of real images and of its own synthetic ones."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from plugin.imaging import ImageSpec, dataset_input
from plugin.inference import TriageModel
from plugin.metrics import PacsclipMetrics
from plugin.models.bundle import BundleError, load_bundle, parse_manifest, pinned_files
from plugin.models.registry import DEMO_BUNDLE_DIR
from plugin.triage.ood import (
    EMBEDDING,
    EMBEDDING_AND_THUMBNAIL,
    OodReference,
    OodReferenceError,
    StudyDistribution,
    fit_reference,
    image_features,
    thumbnails,
)
from tests.peers.data import pydicom_data_dir

DIM = 8


def _gaussian(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    # Correlated dimensions with unequal scales: what Mahalanobis (unlike Euclid) accounts for.
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim))
    return rng.normal(size=(n, dim)) @ mixing + 3.0


def _fitted(quantile: float = 0.99) -> OodReference:
    fit = fit_reference(
        _gaussian(2000, 1), _gaussian(2000, 2), quantile, features=EMBEDDING, thumbnail=2
    )
    return fit.reference


# --------------------------------------------------------------------------- math


def test_a_far_point_is_flagged_and_a_central_one_passes() -> None:
    reference = _fitted()
    center = reference.mean[np.newaxis]
    far = center + 40.0 * np.abs(_gaussian(1, 7) - 3.0)

    assert reference.distances(center)[0] == pytest.approx(0.0, abs=1e-9)
    assert reference.outside(np.vstack([center, far])).tolist() == [False, True]


def test_the_threshold_lets_the_chosen_share_of_new_in_distribution_points_pass() -> None:
    for quantile in (0.9, 0.99):
        reference = _fitted(quantile)
        new = _gaussian(20000, 3)  # neither the fit nor the held-out split
        passed = float(np.mean(~reference.outside(new)))
        assert passed == pytest.approx(quantile, abs=0.01)


def test_mahalanobis_matches_the_definition_with_the_shrunk_covariance() -> None:
    from sklearn.covariance import LedoitWolf

    fit, heldout = _gaussian(500, 4), _gaussian(200, 5)
    reference = fit_reference(fit, heldout, features=EMBEDDING, thumbnail=2).reference
    estimator = LedoitWolf().fit(fit)
    point = _gaussian(1, 6)[0]
    inverse = np.linalg.inv(estimator.covariance_)
    expected = np.sqrt((point - fit.mean(0)) @ inverse @ (point - fit.mean(0)))

    assert reference.distances(point[np.newaxis])[0] == pytest.approx(expected, rel=1e-6)
    assert reference.shrinkage == pytest.approx(estimator.shrinkage_)


def test_thumbnails_area_average_the_channel_mean() -> None:
    inputs = np.zeros((1, 3, 4, 6))
    inputs[0, :, :2, :3] = 1.0  # the top-left quarter is bright in every channel
    inputs[0, 0, 2:, 3:] = 3.0  # the bottom-right quarter only in channel 0

    assert thumbnails(inputs, 2).tolist() == [[1.0, 0.0, 0.0, 1.0]]
    embeds = np.ones((1, 5))
    assert image_features(embeds, inputs, EMBEDDING_AND_THUMBNAIL, 2).shape == (1, 9)
    assert image_features(embeds, None, EMBEDDING, 2).shape == (1, 5)
    with pytest.raises(ValueError, match="need the model inputs"):
        image_features(embeds, None, EMBEDDING_AND_THUMBNAIL, 2)


def test_a_study_is_not_scored_when_most_of_its_images_are_outside() -> None:
    def study(*distances: float) -> StudyDistribution:
        return StudyDistribution(distances, threshold=10.0)

    assert study(3.0).scored and not study(12.0).scored
    assert study(3.0, 12.0).scored  # half outside: scored on the image inside
    assert not study(3.0, 12.0, 15.0).scored
    assert study(3.0, 4.0, 15.0).images_outside == 1
    assert study(3.0, 12.0, 15.0).distance == 12.0  # the median


def test_fitting_refuses_too_few_or_mismatched_embeddings() -> None:
    with pytest.raises(OodReferenceError, match="at least 20 images to fit"):
        fit_reference(_gaussian(5, 1), _gaussian(50, 2), features=EMBEDDING)
    with pytest.raises(OodReferenceError, match=r"held-out features must be \[N, 8\]"):
        fit_reference(_gaussian(50, 1), _gaussian(50, 2, dim=4), features=EMBEDDING)
    with pytest.raises(OodReferenceError, match="NaN"):
        fit_reference(np.full((50, DIM), np.nan), _gaussian(50, 2), features=EMBEDDING)


# --------------------------------------------------------------------------- reference file


def test_a_reference_round_trips_through_its_file(tmp_path: Path) -> None:
    reference = _fitted()
    reference.save(tmp_path / "ood.npz")

    loaded = OodReference.load(tmp_path / "ood.npz", embedding_dim=DIM)

    points = _gaussian(10, 8)
    assert np.array_equal(loaded.distances(points), reference.distances(points))
    assert (loaded.threshold, loaded.quantile, loaded.n_fit) == (
        reference.threshold,
        reference.quantile,
        2000,
    )


def _rewrite(path: Path, **changes: Any) -> None:
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays.update(changes)
    for name in [n for n, v in changes.items() if v is None]:
        del arrays[name]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mean": None}, "lacks mean: fit it again"),
        ({"format_version": np.array(9)}, "format version 9; this pacsclip reads version 1"),
        ({"precision": np.eye(3)}, r"mean \(8,\) and precision \(3, 3\) do not match"),
        ({"threshold": np.array(-1.0)}, "threshold must be a positive number"),
        ({"method": np.array("knn")}, "method 'knn' is not supported"),
        ({"features": np.array("pixels")}, "features 'pixels' are not supported"),
    ],
)
def test_bad_reference_files_say_what_is_wrong(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = tmp_path / "ood.npz"
    _fitted().save(path)
    _rewrite(path, **changes)

    with pytest.raises(OodReferenceError, match=message):
        OodReference.load(path)


def test_unreadable_or_foreign_reference_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ood.npz"
    path.write_bytes(b"not an archive")
    with pytest.raises(OodReferenceError, match="cannot read out-of-distribution reference"):
        OodReference.load(path)
    _fitted().save(path)
    with pytest.raises(OodReferenceError, match="takes 8-dimensional embeddings but the bundle's"):
        OodReference.load(path, embedding_dim=128)


# --------------------------------------------------------------------------- manifest


def _demo_manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEMO_BUNDLE_DIR / "bundle.json").read_text())
    return data


def test_the_manifest_entry_is_optional_and_pinned() -> None:
    data = _demo_manifest()
    assert pinned_files(parse_manifest(data))["ood.file"].path == "ood_reference.npz"
    del data["ood"]
    assert parse_manifest(data).ood is None  # bundles from before the guard still load


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 0}, "ood.threshold: Input should be greater than 0"),
        ({"quantile": 1.5}, "ood.quantile: Input should be less than 1"),
        ({"method": "knn"}, "ood.method: Input should be 'mahalanobis'"),
        ({"treshold": 3.0}, "ood.treshold: unknown key"),
    ],
)
def test_invalid_manifest_entries_are_named(change: dict[str, Any], message: str) -> None:
    data = _demo_manifest()
    data["ood"].update(change)
    with pytest.raises(BundleError, match=message):
        parse_manifest(data)


def test_a_changed_reference_file_fails_the_checksum(tmp_path: Path) -> None:
    copy = shutil.copytree(DEMO_BUNDLE_DIR, tmp_path / "demo")
    with (copy / "ood_reference.npz").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"ood\.file \(.*ood_reference.npz\) is corrupted"):
        load_bundle(copy)


def test_a_reference_that_disagrees_with_its_manifest_is_refused(tmp_path: Path) -> None:
    from plugin.models.bundle_writer import pin_file, write_manifest

    copy = shutil.copytree(DEMO_BUNDLE_DIR, tmp_path / "demo")
    _rewrite(copy / "ood_reference.npz", threshold=np.array(1.0))
    manifest = load_bundle(DEMO_BUNDLE_DIR).manifest
    assert manifest.ood is not None
    ood = manifest.ood.model_copy(update={"file": pin_file(copy, "ood_reference.npz")})
    write_manifest(copy, manifest.model_copy(update={"ood": ood}))

    with pytest.raises(OodReferenceError, match="fit the reference again"):
        TriageModel(load_bundle(copy), threads=1)


# --------------------------------------------------------------------------- the demo bundle


@pytest.fixture(scope="module")
def demo() -> TriageModel:
    return TriageModel(load_bundle(DEMO_BUNDLE_DIR), threads=1)


def _distance(model: TriageModel, path: Path) -> float:
    assert model.ood is not None
    inputs = dataset_input(dcmread(path), model.spec)[np.newaxis]
    features = model.ood.features_of(model.encoder.encode(inputs), inputs)
    return float(model.ood.distances(features)[0])


def test_the_demo_bundle_flags_real_radiographs_and_ct(demo: TriageModel) -> None:
    ct_small = get_testdata_file("CT_small.dcm")
    assert ct_small is not None and demo.ood is not None
    for path in (pydicom_data_dir() / "RG1_UNCI.dcm", Path(ct_small)):
        assert _distance(demo, path) > demo.ood.threshold, path.name

        report = demo.triage([dcmread(path)], saliency=True)

        assert not report.scored
        assert (report.findings, report.priority, report.saliency) == ([], "not_scored", [])
        assert len(report.embeddings) == 1  # still embedded, for retrieval
        ood = report.as_dict()["ood"]
        assert ood["status"] == "out_of_distribution"
        assert ood["model"] == {"name": "pacsclip-demo", "version": demo.bundle.version}
        assert ood["distance"] > ood["threshold"] == demo.ood.threshold


def test_the_demo_bundle_passes_its_synthetic_held_out_images(demo: TriageModel) -> None:
    from plugin.demo.radiographs import demo_radiographs
    from plugin.demo.train import STREAM_EVAL

    spec = ImageSpec.from_manifest(demo.bundle.manifest.image.model_dump())
    inputs = np.stack(
        [dataset_input(ds, spec) for ds in demo_radiographs(200, 0, STREAM_EVAL, 128)]
    )
    assert demo.ood is not None
    outside = demo.ood.outside(demo.ood.features_of(demo.encoder.encode(inputs), inputs))

    assert outside.mean() <= 0.01  # the threshold sits at the 99.5th held-out percentile


def test_the_guard_can_be_turned_off(demo: TriageModel) -> None:
    unguarded = TriageModel(demo.bundle, threads=1, ood_guard=False)

    report = unguarded.triage([dcmread(pydicom_data_dir() / "RG1_UNCI.dcm")], saliency=False)

    assert unguarded.ood is None and report.distribution is None
    assert report.as_dict()["ood"] is None
    assert len(report.findings) == len(demo.bundle.findings)


def test_the_metric_counts_out_of_distribution_inputs_per_site_and_model() -> None:
    metrics = PacsclipMetrics()
    metrics.observe_ood_inputs("PACS|Hospital", "pacsclip-demo@2026.11.1", 3)
    metrics.observe_ood_inputs("PACS|Hospital", "pacsclip-demo@2026.11.1")

    text = metrics.render().decode()

    assert (
        'pacsclip_ood_inputs_total{model="pacsclip-demo@2026.11.1",site="PACS|Hospital"} 4.0'
        in text
    )
    with pytest.raises(ValueError, match="count must be >= 0"):
        metrics.observe_ood_inputs("a", "b", -1)


def test_images_out_of_distribution_are_left_out_and_a_mostly_foreign_study_unscored(
    demo: TriageModel,
) -> None:
    from plugin.demo.radiographs import demo_radiographs
    from plugin.demo.train import STREAM_EVAL

    [phantom] = demo_radiographs(1, 0, STREAM_EVAL, 128)
    ct_small = get_testdata_file("CT_small.dcm")
    assert ct_small is not None
    real = dcmread(pydicom_data_dir() / "RG1_UNCI.dcm")

    half = demo.triage([phantom, real], saliency=False)

    assert half.scored and half.distribution is not None
    assert half.distribution.outside == (False, True)
    assert len(half.images) == len(half.embeddings) == 2  # both embedded and kept
    assert {f.source_sop_instance_uid for f in half.findings} == {str(phantom.SOPInstanceUID)}

    most = demo.triage([phantom, real, dcmread(ct_small)], saliency=False)

    assert not most.scored and most.findings == [] and most.priority == "not_scored"
    assert len(most.embeddings) == 3


# --------------------------------------------------------------------------- pacsclip model fit-ood


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from tests.models_fixtures import TinyImageTower, build_bundle, export_image_tower

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    return build_bundle(root / "bundle", export_image_tower(TinyImageTower(), root / "tower.onnx"))


def _images(directory: Path, n: int) -> Path:
    """``n`` noisy versions of one synthetic chest-like gradient, as DICOM files."""
    from tests.unit.test_inference import radiograph

    directory.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40] / 48.0
    for i in range(n):
        base = 0.3 + 0.4 * yy + 0.2 * np.sin(6 * xx)
        radiograph(np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1), directory / f"{i}.dcm")
    return directory


def _fit_ood_cli(data_dir: Path, *args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from plugin.cli.main import app

    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "model", "fit-ood", *args])
    return result.exit_code, result.output


def test_fit_ood_installs_a_new_version_with_a_reference_fitted_on_the_sites_images(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from plugin.models.registry import Registry
    from tests.unit.test_bundle_versions import file_digests

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = file_digests(bundle)
    images = _images(tmp_path / "images", 60)

    code, output = _fit_ood_cli(tmp_path / "data", str(bundle), "--images", str(images))

    assert code == 0, output
    assert file_digests(bundle) == before  # the source is only read
    assert load_bundle(bundle).manifest.ood is None
    text = " ".join(output.split())
    assert (
        "tiny-clip@1.0.0+ood1: out-of-distribution reference fitted on images: DICOM images, "
        "held-out fraction 0.5: 30 images to fit, 30 held out; threshold"
    ) in text
    assert (
        "installed tiny-clip@1.0.0+ood1 (not active; pacsclip model promote tiny-clip "
        "1.0.0+ood1 makes it live)"
    ) in text
    registry = Registry.for_data_dir(tmp_path / "data")
    entry = registry.info("tiny-clip", "1.0.0+ood1").entry
    assert not entry.active
    child = load_bundle(entry.path)  # pinned: the checksums verify
    manifest = child.manifest
    assert manifest.ood is not None
    assert (manifest.ood.fitted_on.n, manifest.ood.fitted_on.heldout_n) == (30, 30)
    assert manifest.lineage is not None and manifest.lineage.parent == "tiny-clip@1.0.0"
    assert manifest.lineage.pairs == 60
    assert manifest.lineage.hyperparameters == {
        "quantile": 0.995,
        "seed": 0,
        "heldout_fraction": 0.5,
    }
    assert manifest.lineage.evaluation["threshold"] == manifest.ood.threshold
    model = TriageModel(child, threads=1)
    assert model.ood is not None and model.ood.threshold == manifest.ood.threshold
    # A site image like those it was fitted on is scored; a real CT is not.
    assert model.triage([dcmread(next(images.iterdir()))], saliency=False).scored
    ct_small = get_testdata_file("CT_small.dcm")
    assert ct_small is not None
    assert not model.triage([dcmread(ct_small)], saliency=False).scored


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --images DIR and --demo"),
        (["--demo", "--images", "x"], "give exactly one of --images DIR and --demo"),
        (["--images", "{few}"], "at least 20 images to fit and 10 held out, got 3 and 2"),
        (["--images", "{notes}"], "cannot read .*notes.txt as DICOM"),
        (["--images", "{missing}"], "is not a folder of DICOM images"),
        (["--demo"], "tiny-clip@1.0.0 is not a synthetic bundle"),
    ],
)
def test_fit_ood_errors_say_what_to_fix(
    tiny_bundle: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    from tests.unit.test_bundle_versions import file_digests

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["synthetic"] = False
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    before = file_digests(bundle)
    few = _images(tmp_path / "few", 5)
    (few / "notes.txt").write_text("not DICOM")
    folders = {"few": str(_images(tmp_path / "five", 5)), "notes": str(few)}
    folders["missing"] = str(tmp_path / "nowhere")
    args = [arg.format(**folders) for arg in args]

    code, output = _fit_ood_cli(tmp_path / "data", str(bundle), *args)

    assert code == 2
    assert re.search(message, " ".join(output.split())), output
    assert file_digests(bundle) == before
    models = tmp_path / "data" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.is_dir()]  # no version


def test_fit_ood_on_the_built_in_bundle_leaves_it_as_it_is(tmp_path: Path) -> None:
    from tests.unit.test_bundle_versions import file_digests

    before = file_digests(DEMO_BUNDLE_DIR)
    out = tmp_path / "refitted"

    code, output = _fit_ood_cli(
        tmp_path / "data",
        str(DEMO_BUNDLE_DIR),
        "--demo",
        "--n-fit",
        "40",
        "--n-heldout",
        "20",
        "--out",
        str(out),
        "--threads",
        "1",
    )

    assert code == 0, output
    assert file_digests(DEMO_BUNDLE_DIR) == before
    demo = load_bundle(DEMO_BUNDLE_DIR).manifest
    child = load_bundle(out).manifest
    assert child.version == f"{demo.version}+ood1"
    assert child.ood is not None and child.ood.fitted_on.n == 40
    assert child.lineage is not None and child.lineage.parent == demo.ref
    assert child.lineage.dropped and "replaced" in child.lineage.dropped[0]
