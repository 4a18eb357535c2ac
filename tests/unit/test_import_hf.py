"""``import-hf``: tiny random CLIP and SigLIP folders -> bundle; parity with transformers eager."""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.models.bundle import Bundle, BundleError
from plugin.models.importers.default_prompts import chest_radiograph_prompts
from plugin.models.importers.hf import HfImport, build_hf_bundle
from plugin.models.runtime import ImageEncoder, TextEncoder
from tests.import_parity import assert_embeddings_match, assert_zero_shot_matches
from tests.open_clip_reference import clip_tokenizer

IMAGE_SIZE = 32
TEXTS = ["pleural effusion", "No pneumothorax, lungs clear.", "chest radiograph"]
SIGLIP_LENGTH = 16
CLIP_LENGTH = 24
SIGLIP_WORDS = ["no", "pleural", "effusion", "pneumothorax", "chest", "radiograph", "showing"]

transformers = pytest.importorskip("transformers")


def _tiny_tower() -> dict[str, Any]:
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)


def _pixels(n: int = 3) -> npt.NDArray[np.float32]:
    return np.random.default_rng(5).standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIPModel folder as save_pretrained writes it, with a CLIP BPE tokenizer."""
    folder = tmp_path_factory.mktemp("hf-clip")
    tokenizer = clip_tokenizer(folder)
    vocab = len(tokenizer.get_vocab())
    config = transformers.CLIPConfig(
        text_config={
            **_tiny_tower(),
            "vocab_size": vocab,
            "max_position_embeddings": CLIP_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**_tiny_tower(), "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=24,
        logit_scale_init_value=3.0,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_bundle(clip_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    dest = tmp_path_factory.mktemp("clip-bundle") / "bundle"
    return build_hf_bundle(HfImport(folder=clip_folder, name="tiny-hf-clip", version="1"), dest)


def _eager(folder: Path, kind: str) -> Any:
    model_class = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    return model_class.from_pretrained(str(folder), local_files_only=True).eval()


def _features(output: Any) -> npt.NDArray[np.float32]:
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(tensor, dim=-1).detach().numpy()


def test_clip_image_and_text_embeddings_match_transformers(
    clip_folder: Path, clip_bundle: Bundle
) -> None:
    model = _eager(clip_folder, "clip")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(clip_folder))
    pixels = _pixels()

    with torch.no_grad():
        image_ref = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
        batch = tokenizer(
            TEXTS, padding=True, truncation=True, max_length=CLIP_LENGTH, return_tensors="pt"
        )
        text_ref = _features(model.get_text_features(**batch))

    assert_embeddings_match(ImageEncoder(clip_bundle, threads=1).encode(pixels), image_ref)
    # The bundle tokenises with its own tokenizer.json, padded to the batch's longest text.
    assert_embeddings_match(TextEncoder(clip_bundle, threads=1).encode(TEXTS), text_ref)


def _assert_patches_match(actual: npt.ArrayLike, expected: torch.Tensor) -> None:
    """Patch tokens are not normalised by the tower: compare values and directions."""
    reference = expected.detach().numpy()
    ours = np.asarray(actual)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=1e-4)
    assert_embeddings_match(ours.reshape(-1, ours.shape[-1]), reference.reshape(-1, ours.shape[-1]))


def test_clip_patch_tokens_are_the_projected_last_layer_tokens(
    clip_folder: Path, clip_bundle: Bundle
) -> None:
    model = _eager(clip_folder, "clip")
    pixels = _pixels()
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        # Every token but the class token, as the class token becomes the image embedding.
        expected = model.visual_projection(model.vision_model.post_layernorm(hidden[:, 1:]))
        image_ref = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))

    encoder = ImageEncoder(clip_bundle, threads=1)
    embeds, patches = encoder.encode_with_patches(pixels)

    assert clip_bundle.manifest.patch_grid == (4, 4)  # 32 px / 8 px patches
    assert encoder.patch_grid(patches.shape[1]) == (4, 4)
    _assert_patches_match(patches, expected)
    assert_embeddings_match(embeds, image_ref)  # the same pass still gives the embeddings


def test_clip_zero_shot_scores_match_transformers(clip_folder: Path, clip_bundle: Bundle) -> None:
    model = _eager(clip_folder, "clip")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(clip_folder))
    pixels = _pixels()

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            batch = tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=CLIP_LENGTH,
                return_tensors="pt",
            )
            return _features(model.get_text_features(**batch))

    with torch.no_grad():
        images = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
    scale = math.exp(model.logit_scale.item())
    probabilities = assert_zero_shot_matches(clip_bundle, pixels, images, embed, scale)
    assert probabilities.std() > 1e-3  # the scores differ between images and findings


def test_clip_bundle_takes_preprocessing_prompts_and_temperature_from_the_model(
    clip_bundle: Bundle,
) -> None:
    manifest = clip_bundle.manifest
    image = manifest.image
    assert (image.size, image.channels, image.resize) == (IMAGE_SIZE, 3, "center-crop")
    assert image.mean == pytest.approx([0.5, 0.4, 0.3]) and image.std == pytest.approx(
        [0.2, 0.25, 0.3]
    )
    assert manifest.logit_scale == pytest.approx(math.exp(3.0), rel=1e-6)
    assert manifest.embedding_dim == 24
    assert manifest.text_encoder.kind == "onnx" and manifest.text_encoder.max_length == CLIP_LENGTH
    assert [f.name for f in manifest.findings] == [
        f.name for f in chest_radiograph_prompts().findings
    ]
    assert manifest.priority.stat_if_any == []  # an uncalibrated import never escalates
    assert not manifest.synthetic and manifest.model_card.not_for_clinical_use
    assert "Hugging Face clip model" in manifest.model_card.intended_use
    assert set(manifest.files.model_dump(exclude_none=True)) == {
        "image_tower",
        "text_tower",
        "tokenizer",
        "prompt_embeddings",
    }


def test_tokenizer_json_is_built_from_vocab_and_merges_alone(
    clip_folder: Path, clip_bundle: Bundle, tmp_path: Path
) -> None:
    folder = tmp_path / "no-tokenizer-json"
    folder.mkdir()
    for item in clip_folder.iterdir():
        if item.name != "tokenizer.json":
            (folder / item.name).write_bytes(item.read_bytes())

    bundle = build_hf_bundle(HfImport(folder=folder, name="x", version="1"), tmp_path / "b")

    ours = TextEncoder(bundle, threads=1).encode(TEXTS)
    assert_embeddings_match(ours, TextEncoder(clip_bundle, threads=1).encode(TEXTS))


def _siglip_tokenizer(folder: Path) -> Tokenizer:
    """A word-level stand-in for SigLIP's SentencePiece vocabulary: same special tokens."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(SIGLIP_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "</s>"}))
    return tokenizer


def _siglip_canonical(text: str) -> str:
    """transformers' SiglipTokenizer.canonicalize_text (do_lower_case true), which runs before
    its SentencePiece model sees a text: lower case, no ASCII punctuation, single spaces."""
    no_punctuation = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", no_punctuation).strip()


def test_siglip_embeddings_and_zero_shot_match_transformers(tmp_path: Path) -> None:
    folder = tmp_path / "siglip"
    folder.mkdir()
    tokenizer = _siglip_tokenizer(folder)
    config = transformers.SiglipConfig(
        text_config={
            **_tiny_tower(),
            "vocab_size": tokenizer.get_vocab_size(),
            "max_position_embeddings": SIGLIP_LENGTH,
        },
        vision_config={**_tiny_tower(), "image_size": IMAGE_SIZE, "patch_size": 8},
    )
    torch.manual_seed(1)
    transformers.SiglipModel(config).save_pretrained(str(folder))
    bundle = build_hf_bundle(
        HfImport(folder=folder, name="tiny-siglip", version="1"), tmp_path / "b"
    )
    model = _eager(folder, "siglip")
    pixels = _pixels()

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        # SigLIP pads every text to its full length with the pad token, and uses no mask.
        ids = torch.full((len(texts), SIGLIP_LENGTH), 1, dtype=torch.int64)
        canonical = [_siglip_canonical(text) for text in texts]
        for row, encoding in enumerate(tokenizer.encode_batch(canonical)):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
        with torch.no_grad():
            return _features(model.get_text_features(input_ids=ids))

    with torch.no_grad():
        images = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
    assert bundle.manifest.image.resize == "stretch"
    assert bundle.manifest.text_encoder.cleaning == "siglip"
    assert bundle.manifest.image.mean == pytest.approx([0.5, 0.5, 0.5])
    assert_embeddings_match(ImageEncoder(bundle, threads=1).encode(pixels), images)
    assert_embeddings_match(TextEncoder(bundle, threads=1).encode(TEXTS), embed(TEXTS))
    scale = math.exp(model.logit_scale.item())
    assert_zero_shot_matches(bundle, pixels, images, embed, scale)

    # Patch tokens: SigLIP's pooling head run on one token at a time, the head's own code.
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        expected = torch.stack(
            [model.vision_model.head(hidden[:, i : i + 1]) for i in range(hidden.shape[1])],
            dim=1,
        )
    embeds, patches = ImageEncoder(bundle, threads=1).encode_with_patches(pixels)
    assert bundle.manifest.patch_grid == (4, 4)
    _assert_patches_match(patches, expected)
    assert_embeddings_match(embeds, images)


def test_a_folder_that_is_not_clip_or_siglip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BundleError, match=r"model_type 'bert' is not supported.*import-open-clip"):
        build_hf_bundle(HfImport(folder=tmp_path, name="x", version="1"), tmp_path / "b")


def test_a_folder_without_config_says_what_to_copy(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"config.json is missing: give the folder of a"):
        build_hf_bundle(HfImport(folder=tmp_path, name="x", version="1"), tmp_path / "b")


def test_missing_tokenizer_names_the_files_to_copy(clip_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (folder / name).write_bytes((clip_folder / name).read_bytes())
    with pytest.raises(BundleError, match=r"no tokenizer found.*Copy tokenizer.json"):
        build_hf_bundle(HfImport(folder=folder, name="x", version="1"), tmp_path / "b")


def test_cli_import_hf_installs_and_activates(clip_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    runner = CliRunner()
    result = runner.invoke(
        app, ["--data-dir", str(data), "model", "import-hf", str(clip_folder), "--activate"]
    )
    assert result.exit_code == 0, result.output
    # Default name from the folder, default version from the digest of the weights.
    name = clip_folder.name.lower()
    assert result.stdout.startswith(f"installed {name}@sha256-")
    assert result.stdout.rstrip().endswith("(active)")

    listing = runner.invoke(app, ["--data-dir", str(data), "model", "list", "--json"])
    active = [e for e in json.loads(listing.output) if e["active"]]
    assert [e["name"] for e in active] == [name]

    missing = runner.invoke(
        app, ["--data-dir", str(data), "model", "import-hf", str(tmp_path / "absent")]
    )
    assert missing.exit_code == 2
    assert "absent is not a folder: give the Hugging Face model folder" in missing.output
