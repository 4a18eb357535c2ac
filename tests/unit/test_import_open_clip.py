"""``import-open-clip``: tiny checkpoints written by open_clip's own model code -> bundle.

The checkpoints and open_clip's eager embeddings come from ``tests/open_clip_reference.py``,
run once in a process of its own; pacsclip's importer, run here, never imports open_clip, timm
or torchvision (the last test proves it with those names blocked).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.models.bundle import Bundle, BundleError, Finding
from plugin.models.importers.default_prompts import chest_radiograph_prompts
from plugin.models.importers.open_clip import (
    OpenClipImport,
    build_open_clip_bundle,
    load_state_dict,
    open_clip_towers,
    read_config,
)
from plugin.models.runtime import ImageEncoder, TextEncoder
from tests.import_parity import assert_embeddings_match, assert_zero_shot_matches

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["pleural effusion", "No pleural effusion, lungs clear.", "chest radiograph"]
LAYOUTS = ("openai_b16", "openai_b8", "biomedclip")


@dataclass(frozen=True)
class Reference:
    folder: Path
    arrays: dict[str, npt.NDArray[np.float32]]
    texts: list[str]

    def text(self, layout: str, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        table = self.arrays[f"{layout}/text"]
        return np.stack([table[self.texts.index(t)] for t in texts])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("open-clip")
    prompts = [t for f in chest_radiograph_prompts().findings for t in _texts_of(f)]
    texts = list(dict.fromkeys([*TEXTS, *prompts]))
    (root / "texts.json").write_text(json.dumps(texts))
    script = REPO / "tests" / "open_clip_reference.py"
    done = subprocess.run(
        [sys.executable, str(script), str(root / "out"), str(root / "texts.json")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(root / "out" / "reference.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    return Reference(folder=root / "out", arrays=arrays, texts=texts)


def _texts_of(finding: Finding) -> list[str]:
    return [*finding.prompt_texts(True), *finding.prompt_texts(False)]


@pytest.fixture(scope="module")
def bundles(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("open-clip-bundles")
    return {
        layout: build_open_clip_bundle(
            OpenClipImport(
                path=reference.folder / layout, name=layout.replace("_", "-"), version="1"
            ),
            root / layout,
        )
        for layout in LAYOUTS
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_embeddings_match_open_clip(
    layout: str, reference: Reference, bundles: dict[str, Bundle]
) -> None:
    bundle = bundles[layout]
    pixels = reference.arrays["images"]

    assert_embeddings_match(
        ImageEncoder(bundle, threads=1).encode(pixels), reference.arrays[f"{layout}/image"]
    )
    # Tokenised by the bundle's tokenizer.json and padded to the batch's longest text, where
    # open_clip pads with 0 to the full context length.
    assert_embeddings_match(
        TextEncoder(bundle, threads=1).encode(TEXTS), reference.text(layout, TEXTS)
    )


PATCH_GRIDS = {"openai_b16": (2, 2), "openai_b8": (4, 4), "biomedclip": (4, 4)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_patch_tokens_match_open_clip_and_timm(
    layout: str, reference: Reference, bundles: dict[str, Bundle]
) -> None:
    bundle = bundles[layout]
    encoder = ImageEncoder(bundle, threads=1)
    embeds, patches = encoder.encode_with_patches(reference.arrays["images"])
    expected = reference.arrays[f"{layout}/patches"]

    assert bundle.manifest.patch_grid == PATCH_GRIDS[layout]
    assert patches.shape == expected.shape == (3, np.prod(PATCH_GRIDS[layout]), 24)
    np.testing.assert_allclose(patches, expected, atol=1e-4, rtol=1e-4)
    assert_embeddings_match(embeds, reference.arrays[f"{layout}/image"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_shot_scores_match_open_clip(
    layout: str, reference: Reference, bundles: dict[str, Bundle]
) -> None:
    bundle = bundles[layout]
    scale = float(reference.arrays[f"{layout}/logit_scale"])
    assert bundle.manifest.logit_scale == pytest.approx(scale, rel=1e-6)

    probabilities = assert_zero_shot_matches(
        bundle,
        reference.arrays["images"],
        reference.arrays[f"{layout}/image"],
        lambda texts: reference.text(layout, texts),
        scale,
    )
    assert probabilities.std() > 1e-3


def test_manifest_of_the_biomedclip_layout(bundles: dict[str, Bundle]) -> None:
    manifest = bundles["biomedclip"].manifest
    assert manifest.text_encoder.max_length == 24  # the config's context_length
    assert (manifest.image.size, manifest.image.resize) == (32, "center-crop")
    assert manifest.model_card.not_for_clinical_use
    assert "open_clip checkpoint (open_clip_pytorch_model.bin)" in manifest.model_card.intended_use


def _copy(src: Path, dest: Path, skip: Sequence[str] = ()) -> Path:
    dest.mkdir()
    for item in src.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copyfile(item, dest / item.name)
    return dest


def test_missing_config_says_what_to_copy(reference: Reference, tmp_path: Path) -> None:
    folder = _copy(
        reference.folder / "openai_b16", tmp_path / "c", skip=["tiny-vit-b-16-quickgelu.json"]
    )
    with pytest.raises(BundleError, match=r"has no open_clip model config: copy open_clip_config"):
        build_open_clip_bundle(OpenClipImport(path=folder, name="x", version="1"), tmp_path / "b")


def test_missing_tokenizer_says_which_file_to_copy(reference: Reference, tmp_path: Path) -> None:
    openai = _copy(
        reference.folder / "openai_b16",
        tmp_path / "openai",
        skip=["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"],
    )
    with pytest.raises(BundleError, match=r"OpenAI CLIP's BPE tokenizer: copy tokenizer.json"):
        build_open_clip_bundle(OpenClipImport(path=openai, name="x", version="1"), tmp_path / "b")
    biomed = _copy(
        reference.folder / "biomedclip",
        tmp_path / "biomed",
        skip=["vocab.txt", "tokenizer_config.json"],
    )
    with pytest.raises(BundleError, match=r"tokenizer files of example/tiny-bert \(tokenizer.json"):
        build_open_clip_bundle(OpenClipImport(path=biomed, name="x", version="1"), tmp_path / "b2")


def test_unexpected_keys_are_listed(reference: Reference) -> None:
    folder = reference.folder / "openai_b16"
    state = load_state_dict(folder / "checkpoint.pt")
    state["visual.extra_head.weight"] = torch.zeros(2, 2)
    config = read_config(folder / "tiny-vit-b-16-quickgelu.json")
    with pytest.raises(BundleError, match=r"unexpected keys: visual.extra_head.weight"):
        open_clip_towers(state, config)


def test_a_config_that_does_not_fit_the_weights_names_the_shapes(reference: Reference) -> None:
    folder = reference.folder / "openai_b16"
    state = load_state_dict(folder / "checkpoint.pt")
    # The ViT-B/8 config on ViT-B/16 weights: other patch size, other positional embedding.
    config = read_config(reference.folder / "openai_b8" / "tiny-vit-b-8-quickgelu.json")
    with pytest.raises(
        BundleError,
        match=r"visual.conv1.weight is \[32, 3, 16, 16\], the config makes \[32, 3, 8, 8\]",
    ):
        open_clip_towers(state, config)


def test_an_unknown_layout_is_refused_with_its_keys(reference: Reference) -> None:
    config = read_config(reference.folder / "openai_b16" / "tiny-vit-b-16-quickgelu.json")
    resnet = {
        "visual.layer1.0.conv1.weight": torch.zeros(1),
        "token_embedding.weight": torch.zeros(1),
    }
    with pytest.raises(
        BundleError, match=r"unknown checkpoint layout.*visual.layer1.0.conv1.weight"
    ):
        open_clip_towers(resnet, config)


def test_checkpoint_wrappers_are_unwrapped(tmp_path: Path) -> None:
    weights = {"visual.proj": torch.ones(2, 3), "logit_scale": torch.tensor(1.0)}
    # An open_clip training checkpoint saved from DataParallel.
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}},
        tmp_path / "epoch_3.pt",
    )
    assert sorted(load_state_dict(tmp_path / "epoch_3.pt")) == sorted(weights)
    # A TorchScript archive, as OpenAI's own ViT-B-32.pt is.
    scripted: Any = torch.jit.script(torch.nn.Linear(2, 3))
    scripted.save(str(tmp_path / "scripted.pt"))
    assert sorted(load_state_dict(tmp_path / "scripted.pt")) == ["bias", "weight"]
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match=r"cannot read the checkpoint .*notes.pt"):
        load_state_dict(tmp_path / "notes.pt")


def test_cli_import_open_clip_from_the_weights_file(reference: Reference, tmp_path: Path) -> None:
    data = tmp_path / "data"
    checkpoint = reference.folder / "openai_b8" / "checkpoint.pt"
    runner = CliRunner()
    args = ["--data-dir", str(data), "model", "import-open-clip", str(checkpoint)]
    result = runner.invoke(app, [*args, "--name", "chexzero-like", "--version", "2026.12.0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "installed chexzero-like@2026.12.0\n"

    wrong = runner.invoke(
        app, ["--data-dir", str(data), "model", "import-open-clip", str(tmp_path)]
    )
    assert wrong.exit_code == 2
    assert "holds no weights file" in wrong.output


def test_importer_runs_with_open_clip_timm_and_torchvision_blocked(
    reference: Reference, tmp_path: Path
) -> None:
    """Import a checkpoint in a fresh process where those three packages cannot be imported."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        blocked = ("open_clip", "timm", "torchvision")
        for name in blocked:
            sys.modules[name] = None  # any import of it raises ImportError
        from plugin.models.importers.open_clip import OpenClipImport, build_open_clip_bundle
        source, dest = Path({str(reference.folder)!r}), Path({str(tmp_path)!r})
        # The BiomedCLIP layout: the one whose reference needs timm and open_clip's HF tower.
        spec = OpenClipImport(path=source / "biomedclip", name="x", version="1")
        build_open_clip_bundle(spec, dest / "biomedclip")
        loaded = [n for n in sys.modules if n.split(".")[0] in blocked and sys.modules[n]]
        print("loaded:", loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: []" in done.stdout
    assert (tmp_path / "biomedclip" / "bundle.json").is_file()
