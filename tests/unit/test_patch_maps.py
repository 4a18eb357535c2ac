"""Patch-similarity maps: scoring the tokens, undoing the preprocessing, and triage using them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydicom import dcmread

from plugin.imaging import ImageSpec, dataset_input
from plugin.inference import TriageModel
from plugin.models.bundle import BundleError, load_bundle
from plugin.models.bundle_writer import pin_file
from plugin.models.runtime import ImageEncoder
from plugin.triage import FindingPrompts, peak
from plugin.triage.patch_maps import finding_map, input_map_to_image, patch_scores
from tests.models_fixtures import TinyImageTower, build_bundle, edit_manifest, export_image_tower
from tests.unit.test_inference import radiograph

D = 8


def _unit(index: int) -> npt.NDArray[np.float64]:
    vector = np.zeros(D)
    vector[index] = 1.0
    return vector


# The finding is axis 0 present against axis 1 absent; axis 2 is shared by both prompt sets.
PROMPTS = FindingPrompts("effusion", _unit(0), _unit(1))


def _spec(resize: str, size: int = 32) -> ImageSpec:
    return ImageSpec(size=size, channels=1, mean=(0.5,), std=(0.25,), resize=resize)  # type: ignore[arg-type]


def _tokens(grid: tuple[int, int], hot: dict[tuple[int, int], int]) -> npt.NDArray[np.float64]:
    """Background tokens along the shared axis; ``hot`` cells along the given axis."""
    rows, cols = grid
    tokens = np.tile(_unit(2), (rows * cols, 1)) + 0.01 * np.arange(rows * cols)[:, None]
    for (row, col), axis in hot.items():
        tokens[row * cols + col] = _unit(axis) + 0.1 * _unit(2)
    return tokens


def test_a_patch_scores_present_minus_absent_so_the_shared_direction_is_neutral() -> None:
    tokens = np.stack([_unit(0), _unit(1), _unit(2), 3.0 * _unit(0)])
    np.testing.assert_allclose(patch_scores(tokens, PROMPTS), [1.0, -1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[P, 8\]"):
        patch_scores(np.ones((4, 5)), PROMPTS)


def test_letterbox_padding_is_cut_off_and_the_peak_lands_on_the_original_pixels() -> None:
    # 60 x 120 letterboxed into 32 x 32: 16 x 32 of image at row 8; grid rows 0 and 3 are
    # padding, row 1 is the image's top half. The hottest token is in the padding: it must
    # not show, nor set the range.
    tokens = _tokens((4, 4), {(1, 3): 0, (0, 0): 0})
    tokens[0] *= 5.0  # as far along "present" as a token can be (cosine 1 either way)
    heat = finding_map(tokens, (4, 4), PROMPTS, (60, 120), _spec("letterbox"))

    assert heat.shape == (60, 120) and heat.dtype == np.float32
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    row, col, _ = peak(heat)
    assert row < 30 and col >= 90  # grid cell (1, 3): the top right of the image
    assert heat[:, :30].max() < 0.5  # the padding token above the left edge left no trace


def test_center_crop_leaves_what_the_model_never_saw_at_zero() -> None:
    # 40 x 80 center-cropped: resized to 32 x 64, columns 16-47 seen, i.e. 20-59 originally.
    tokens = _tokens((4, 4), {(2, 0): 0})
    heat = finding_map(tokens, (4, 4), PROMPTS, (40, 80), _spec("center-crop"))

    assert heat.shape == (40, 80)
    assert heat[:, :19].max() == 0.0 and heat[:, 61:].max() == 0.0
    row, col, value = peak(heat)
    assert value > 0.9 and 20 <= row < 30 and 20 <= col < 30


def test_stretch_maps_the_grid_onto_the_whole_image() -> None:
    tokens = _tokens((2, 2), {(1, 1): 0})
    heat = finding_map(tokens, (2, 2), PROMPTS, (50, 30), _spec("stretch"))
    row, col, _ = peak(heat)
    assert row >= 25 and col >= 15
    assert heat[0, 0] == pytest.approx(0.0)


def test_a_flat_map_points_nowhere_and_shapes_are_checked() -> None:
    flat = np.tile(_unit(2), (16, 1))
    assert finding_map(flat, (4, 4), PROMPTS, (10, 10), _spec("letterbox")).max() == 0.0
    with pytest.raises(ValueError, match=r"16 patch tokens do not fill a 4x5 grid"):
        finding_map(flat, (4, 5), PROMPTS, (10, 10), _spec("letterbox"))
    with pytest.raises(ValueError, match=r"\[32, 32\]"):
        input_map_to_image(np.zeros((8, 8)), (10, 10), _spec("letterbox"))


@pytest.fixture(scope="module")
def patch_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle whose tower gives patch tokens; effusion prompts from two known images."""
    root = tmp_path_factory.mktemp("patch-study")
    torch.manual_seed(0)
    tower = export_image_tower(TinyImageTower(with_patches=True), root / "tower.onnx")
    bundle_dir = build_bundle(root / "bundle", tower)
    yy, xx = np.mgrid[0:96, 0:80] / 96.0
    positive = radiograph(np.clip(0.2 + 0.8 * (xx < 0.35), 0, 1), root / "positive.dcm")
    negative = radiograph(np.clip(0.1 + 0.9 * yy, 0, 1), root / "negative.dcm")
    bundle = load_bundle(bundle_dir)
    spec = ImageSpec.from_manifest(bundle.manifest.image.model_dump())
    encoder = ImageEncoder(bundle, threads=1)
    pos, neg = encoder.encode(np.stack([dataset_input(d, spec) for d in (positive, negative)]))
    arrays = dict(np.load(bundle_dir / "prompt_embeddings.npz"))
    arrays["pleural_effusion/positive"] = pos[None]
    arrays["pleural_effusion/negative"] = neg[None]
    with (bundle_dir / "prompt_embeddings.npz").open("wb") as f:
        np.savez(f, **arrays)
    files = json.loads((bundle_dir / "bundle.json").read_text())["files"]
    files["prompt_embeddings"] = pin_file(bundle_dir, "prompt_embeddings.npz").model_dump()
    edit_manifest(bundle_dir, files=files)
    return bundle_dir, root / "positive.dcm"


def test_triage_maps_the_patch_tokens_of_its_own_pass(patch_study: tuple[Path, Path]) -> None:
    bundle_dir, positive = patch_study
    model = TriageModel(load_bundle(bundle_dir), threads=1, ood_guard=False)
    ds = dcmread(positive)

    report = model.triage([ds])

    shown = {s.finding: s for s in report.saliency}
    effusion = shown["pleural_effusion"]
    assert effusion.method == "patch-similarity"
    assert report.as_dict()["saliency"][0]["method"] == "patch-similarity"
    # The same map as the patch tokens of one encoder pass give, on the image's own grid.
    _, patches = model.encoder.encode_with_patches(dataset_input(ds, model.spec)[None])
    prompts = next(p for p in model.prompts if p.name == "pleural_effusion")
    expected = finding_map(patches[0], (8, 8), prompts, (96, 80), model.spec)
    np.testing.assert_allclose(effusion.heatmap, expected, atol=1e-6)
    assert effusion.heatmap.shape == (96, 80)


def test_a_declared_patch_grid_that_does_not_fit_the_tokens_is_an_error(
    patch_study: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle_dir, _ = patch_study
    encoder = ImageEncoder(load_bundle(bundle_dir), threads=1)
    assert encoder.patch_grid(64) == (8, 8)  # derived: a square grid
    with pytest.raises(BundleError, match="do not form a square grid"):
        encoder.patch_grid(60)
    copy = tmp_path / "declared"
    copy.mkdir()
    for item in bundle_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    edit_manifest(copy, patch_grid=[4, 16])
    declared = ImageEncoder(load_bundle(copy), threads=1)
    assert declared.patch_grid(64) == (4, 16)
    with pytest.raises(BundleError, match="declares a 4x16 patch grid but"):
        declared.patch_grid(60)


def test_an_occlusion_map_keeps_its_zero_where_a_score_map_is_stretched() -> None:
    on_input = np.full((32, 32), 0.5, dtype=np.float32)
    on_input[8:16, 8:16] = 1.0

    stretched = input_map_to_image(on_input, (32, 32), _spec("stretch"))
    kept = input_map_to_image(on_input, (32, 32), _spec("stretch"), stretch=False)

    # Min-max puts the floor at 0; for occlusion 0.5 means "half the drop", not nothing.
    assert stretched.min() == pytest.approx(0.0) and kept.min() == pytest.approx(0.5)
    assert kept.max() == pytest.approx(1.0)
