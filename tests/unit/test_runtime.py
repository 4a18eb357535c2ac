"""ONNX Runtime encoders against the PyTorch modules they were exported from; import-onnx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.models.bundle import Bundle, BundleError, load_bundle
from plugin.models.registry import Registry
from plugin.models.runtime import (
    ImageEncoder,
    ModelRuntimeError,
    PromptEmbeddings,
    TextEncoder,
    embed_prompts,
    load_tokenizer,
    select_providers,
)
from tests.models_fixtures import (
    CHANNELS,
    DIM,
    FINDINGS,
    PRIORITY,
    SIZE,
    TinyImageTower,
    TinyTextTower,
    build_bundle,
    export_image_tower,
    export_text_tower,
    make_tokenizer,
)


class Towers:
    """The torch modules and their ONNX exports, built once for this module."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.image = TinyImageTower()
        self.image_onnx = export_image_tower(self.image, root / "image.onnx")
        self.patches = TinyImageTower(with_patches=True)
        self.patches_onnx = export_image_tower(self.patches, root / "patches.onnx")
        self.fixed_onnx = export_image_tower(self.image, root / "fixed.onnx", dynamic_batch=False)
        self.tokenizer_dir = make_tokenizer(root / "tokenizer")
        vocab_size = len(
            json.loads((self.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
        )
        self.text = TinyTextTower(vocab_size)
        self.text_onnx = export_text_tower(self.text, root / "text.onnx")


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return Towers(tmp_path_factory.mktemp("towers"))


def bundle_with(tmp_path: Path, tower: Path, **kwargs: Any) -> Bundle:
    return load_bundle(build_bundle(tmp_path / "bundle", tower, **kwargs))


def cosine_rows(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.asarray(np.sum(a64 * b64, axis=-1) / norms, dtype=np.float64)


def random_pixels(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(n, CHANNELS, SIZE, SIZE)).astype(np.float32)


# -- image tower -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
def test_image_embeddings_match_pytorch(tmp_path: Path, towers: Towers, n: int) -> None:
    encoder = ImageEncoder(bundle_with(tmp_path, towers.image_onnx), threads=1)
    pixels = random_pixels(n, seed=n)

    got = encoder.encode(pixels)
    with torch.no_grad():
        want = towers.image(torch.from_numpy(pixels)).numpy()

    assert got.shape == (n, DIM) and got.dtype == np.float32
    assert cosine_rows(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_small_batch_size_and_fixed_batch_towers_give_the_same_embeddings(
    tmp_path: Path, towers: Towers
) -> None:
    pixels = random_pixels(5)
    whole = ImageEncoder(bundle_with(tmp_path / "a", towers.image_onnx), threads=1).encode(pixels)
    fixed = ImageEncoder(bundle_with(tmp_path / "b", towers.fixed_onnx), threads=1)

    chunked = ImageEncoder(bundle_with(tmp_path / "c", towers.image_onnx), threads=1).encode(
        pixels, batch_size=2
    )

    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(fixed.encode(pixels), whole, atol=1e-6)  # padded to batch 1


def test_patch_embeddings_come_with_the_image_embeddings(tmp_path: Path, towers: Towers) -> None:
    encoder = ImageEncoder(bundle_with(tmp_path, towers.patches_onnx), threads=1)
    pixels = random_pixels(3)

    embeds, patches = encoder.encode_with_patches(pixels, batch_size=2)
    with torch.no_grad():
        want_embeds, want_patches = towers.patches(torch.from_numpy(pixels))

    assert encoder.has_patch_embeddings
    assert patches.shape == (3, 64, DIM)
    np.testing.assert_allclose(patches, want_patches.numpy(), rtol=1e-4, atol=1e-5)
    assert cosine_rows(embeds, want_embeds.numpy()).min() >= 0.9999


def test_a_tower_without_patches_says_so(tmp_path: Path, towers: Towers) -> None:
    encoder = ImageEncoder(bundle_with(tmp_path, towers.image_onnx), threads=1)

    assert not encoder.has_patch_embeddings
    with pytest.raises(ModelRuntimeError, match="no 'patch_embeds' output"):
        encoder.patch_embeddings(random_pixels(1))


def test_pixels_of_the_wrong_shape_are_refused(tmp_path: Path, towers: Towers) -> None:
    encoder = ImageEncoder(bundle_with(tmp_path, towers.image_onnx), threads=1)

    with pytest.raises(ValueError, match=r"must have shape \[N, 3, 32, 32\].*\[2, 1, 32, 32\]"):
        encoder.encode(np.zeros((2, 1, SIZE, SIZE), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        encoder.encode(np.zeros((0, CHANNELS, SIZE, SIZE), dtype=np.float32))


def test_a_tower_with_other_tensor_names_is_refused(tmp_path: Path, towers: Towers) -> None:
    tower = export_image_tower(TinyImageTower(), tmp_path / "t.onnx", output_name="embeddings")

    with pytest.raises(BundleError, match=r"the output 'image_embeds' is missing.*embeddings"):
        ImageEncoder(bundle_with(tmp_path, tower), threads=1)


def test_providers_prefer_accelerators_and_refuse_missing_ones() -> None:
    available = ["AzureExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    assert select_providers(available=available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert select_providers(available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ModelRuntimeError, match="not available"):
        select_providers(["ROCMExecutionProvider"], available=available)


# -- text tower and prompt embeddings -----------------------------------------------------------


def text_bundle(tmp_path: Path, towers: Towers) -> Bundle:
    return bundle_with(
        tmp_path,
        towers.image_onnx,
        text_tower=towers.text_onnx,
        tokenizer_dir=towers.tokenizer_dir,
    )


def test_text_embeddings_match_pytorch(tmp_path: Path, towers: Towers) -> None:
    bundle = text_bundle(tmp_path, towers)
    texts = [
        "pleural effusion",
        "no pneumothorax",
        "chest radiograph showing fluid in the pleural space",
    ]

    got = TextEncoder(bundle, threads=1).encode(texts, batch_size=2)
    tokenizer = load_tokenizer(bundle.tokenizer_path or Path(), max_length=77)
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        want = towers.text(ids, mask).numpy()

    assert mask.sum(1).tolist() == [2, 2, 8]  # padded to the longest, masked
    assert got.shape == (3, DIM)
    assert cosine_rows(got, want).min() >= 0.9999


def test_prompt_embeddings_load_per_finding(tmp_path: Path, towers: Towers) -> None:
    prompts = PromptEmbeddings.load(bundle_with(tmp_path, towers.image_onnx))

    positive, negative = prompts.for_finding("pleural_effusion")
    assert positive.shape == negative.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(positive, axis=1), 1.0, atol=1e-6)
    assert set(prompts.positive) == {"pleural_effusion", "pneumothorax"}


def test_a_bundle_without_a_text_tower_cannot_make_a_text_encoder(
    tmp_path: Path, towers: Towers
) -> None:
    with pytest.raises(BundleError, match="no ONNX text tower"):
        TextEncoder(bundle_with(tmp_path, towers.image_onnx))


# -- import-onnx ---------------------------------------------------------------------------------


def cli(data_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "model", *args])
    return result.exit_code, result.output


def test_import_onnx_builds_checks_and_installs_a_bundle(tmp_path: Path, towers: Towers) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"findings": FINDINGS, "priority": PRIORITY}))
    data = tmp_path / "data"

    code, out = cli(
        data, "import-onnx",
        "--image", str(towers.image_onnx),
        "--text", str(towers.text_onnx),
        "--tokenizer", str(towers.tokenizer_dir),
        "--prompts", str(prompts),
        "--name", "site-clip", "--version", "2026.1.0", "--embedding-dim", str(DIM),
        "--size", str(SIZE), "--mean", "0.5", "--std", "0.2,0.2,0.2", "--activate",
    )  # fmt: skip

    assert (code, out) == (0, "installed site-clip@2026.1.0 (active)\n")
    bundle = Registry(data / "models").active()
    assert bundle is not None and bundle.ref == "site-clip@2026.1.0"
    assert not bundle.is_synthetic and bundle.manifest.model_card.not_for_clinical_use
    assert bundle.manifest.image.mean == [0.5] and bundle.manifest.image.std == [0.2] * 3
    # The prompt embeddings are the text tower's embeddings of every template x prompt.
    stored = PromptEmbeddings.load(bundle)
    expected = embed_prompts(TextEncoder(bundle, threads=1), bundle.findings)
    np.testing.assert_allclose(
        stored.positive["pleural_effusion"], expected.positive["pleural_effusion"], atol=1e-6
    )
    assert stored.positive["pleural_effusion"].shape == (4, DIM)  # 2 templates x 2 prompts
    code, out = cli(data, "info", "site-clip")
    assert code == 0 and "checksums: OK" in out and "OK      text_tower" in out
    assert not [p for p in (data / "models").iterdir() if p.name.startswith(".import")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--embedding-dim", "32"], "image_embeds size is 16 in the ONNX model but 32"),
        (["--channels", "1"], "pixel_values channels is 3 in the ONNX model but 1"),
        (["--name", "Site CLIP"], "name: 'Site CLIP' is not allowed"),
        (["--mean", "a,b"], "--mean must be comma-separated numbers"),
        (["--prompts", "{prompts}"], "give --text and --tokenizer, or leave out --prompts"),
        (["--text", "{text}"], "--text and --tokenizer go together"),
    ],
)
def test_import_onnx_errors_exit_2_and_say_what_to_fix(
    tmp_path: Path, towers: Towers, args: list[str], expected: str
) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"findings": FINDINGS, "priority": PRIORITY}))
    base = {"--name": "site-clip", "--version": "1", "--embedding-dim": str(DIM)}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    options = [
        part.format(prompts=prompts, text=towers.text_onnx)
        for key, value in base.items()
        for part in (key, value)
    ]

    code, out = cli(tmp_path / "data", "import-onnx", "--image", str(towers.image_onnx),
                    "--size", str(SIZE), *options)  # fmt: skip

    assert code == 2, out
    assert expected in " ".join(out.split())
