"""Building a bundle from a local Hugging Face CLIP or SigLIP folder (``pacsclip model import-hf``).

The folder is what ``save_pretrained`` writes (or a copy of a hub repository): ``config.json``,
the weights (``*.safetensors``), the tokenizer files and ``preprocessor_config.json``. The
model is loaded with transformers from that folder only, its towers are exported to ONNX
around ``get_image_features`` / ``get_text_features``, and the bundle is written through
``import-onnx``'s code (:mod:`plugin.models.importers.torch_export`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugin.models.bundle import Bundle, BundleError, PromptsFile, TextCleaning
from plugin.models.importers import image_preprocessing
from plugin.models.importers.default_prompts import chest_radiograph_prompts
from plugin.models.importers.tokenizer_files import write_tokenizer_json
from plugin.models.importers.torch_export import TorchImport, TorchTowers, build_torch_bundle

SUPPORTED_MODEL_TYPES = ("clip", "siglip")
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class HfImport:
    """What ``import-hf`` needs: the model folder and the bundle's identity."""

    folder: Path
    name: str
    version: str
    prompts: PromptsFile | None = None  # default: chest_radiograph_prompts()
    tokenizer_dir: Path | None = None  # default: the model folder


class _ImageFeatures(nn.Module):
    """The image embeddings and, from the same forward pass, the patch tokens in the joint
    space (:func:`clip_patch_tokens`, :func:`siglip_patch_tokens`)."""

    def __init__(self, model: Any, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # What get_image_features does, written out so that the last hidden state stays at
        # hand (transformers 4 returns only the pooled features from get_image_features).
        output = self.model.vision_model(pixel_values=pixel_values)
        hidden = output.last_hidden_state
        if self.kind == "clip":
            pooled = self.model.visual_projection(output.pooler_output)
            return pooled, clip_patch_tokens(self.model, hidden)
        return output.pooler_output, siglip_patch_tokens(self.model, hidden)


def clip_patch_tokens(model: Any, last_hidden_state: torch.Tensor) -> torch.Tensor:
    """CLIP's patch tokens in the joint space: the last layer's tokens without the class
    token, through ``post_layernorm`` and ``visual_projection``, the two steps that make the
    class token the image embedding."""
    tokens = model.vision_model.post_layernorm(last_hidden_state[:, 1:])
    return model.visual_projection(tokens)  # type: ignore[no-any-return]


def siglip_patch_tokens(model: Any, last_hidden_state: torch.Tensor) -> torch.Tensor:
    """SigLIP's patch tokens in the joint space: its attention-pooling head applied to each
    token on its own.

    SigLIP has no class token: the embedding is the head's probe attending over every token
    (already through ``post_layernorm``), then the head's layer norm and MLP. Given a single
    token the attention weight is 1, so the head maps that token exactly as it would map an
    image made of that token alone: ``out_proj(v_proj(x))`` plus the MLP's residual branch.
    Run as one batch of N * P one-token sequences through the head's own modules.
    """
    n, count, width = last_hidden_state.shape
    single = last_hidden_state.reshape(n * count, 1, width)
    return model.vision_model.head(single).reshape(n, count, -1)  # type: ignore[no-any-return]


class _TextFeatures(nn.Module):
    def __init__(self, model: Any, uses_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.uses_mask = uses_mask

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.uses_mask:
            return _pooled(
                self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            )
        return _pooled(self.model.get_text_features(input_ids=input_ids))


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected
    # features; earlier versions return the tensor itself.
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output  # type: ignore[no-any-return]


def weight_files(folder: Path) -> list[Path]:
    """The model's weight files (``*.safetensors``, else ``pytorch_model*.bin``)."""
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder: give the Hugging Face model folder")
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not found:
        raise BundleError(
            f"{folder} holds no weights (*.safetensors): copy the model's config.json and "
            "model.safetensors into it"
        )
    return found


def model_type(folder: Path) -> str:
    """``clip`` or ``siglip`` from ``config.json``; a clear error for anything else."""
    config = image_preprocessing.read_json(
        folder / "config.json",
        "give the folder of a Hugging Face CLIPModel or SiglipModel (save_pretrained writes "
        "config.json beside the weights)",
    )
    kind = config.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise BundleError(
            f"{folder / 'config.json'}: model_type {kind!r} is not supported; import-hf takes "
            f"{' or '.join(SUPPORTED_MODEL_TYPES)} (CLIPModel, SiglipModel). For an open_clip "
            "checkpoint use `pacsclip model import-open-clip`"
        )
    return str(kind)


def load_hf_model(folder: Path) -> tuple[Any, str]:
    """The model in eval mode, loaded from ``folder`` only, and its model type."""
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder: give the Hugging Face model folder")
    kind = model_type(folder)
    from transformers import CLIPModel, SiglipModel

    model_class = CLIPModel if kind == "clip" else SiglipModel
    try:
        # Eager attention traces to plain ONNX operators on every opset.
        model: Any = model_class.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager"
        )
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"cannot load the {kind} weights from {folder}: {exc}. Copy config.json and the "
            "*.safetensors file(s) of the model into the folder"
        ) from exc
    return model.eval(), kind


def hf_towers(model: Any, kind: str, source: str) -> TorchTowers:
    """Describe a loaded CLIPModel or SiglipModel for the ONNX exporter."""
    text_config, vision_config = model.config.text_config, model.config.vision_config
    siglip = kind == "siglip"
    image_size = int(vision_config.image_size)
    side = image_size // int(vision_config.patch_size)
    return TorchTowers(
        image=_ImageFeatures(model, kind),
        # SigLIP was trained on sequences padded to max_position_embeddings with no mask.
        text=_TextFeatures(model, uses_mask=not siglip),
        embedding_dim=_embedding_dim(model, kind),
        image_size=image_size,
        logit_scale=float(math.exp(float(model.logit_scale.detach()))),
        max_length=int(text_config.max_position_embeddings),
        text_uses_mask=not siglip,
        text_length=int(text_config.max_position_embeddings) if siglip else None,
        source=source,
        patch_grid=(side, side),
    )


def _embedding_dim(model: Any, kind: str) -> int:
    if kind == "clip":
        return int(model.config.projection_dim)
    # SigLIP has no projection: the pooled hidden states are the embeddings.
    return int(model.config.vision_config.hidden_size)


def build_hf_bundle(spec: HfImport, dest: Path, threads: int | None = 1) -> Bundle:
    """Load the folder's model, export its towers, write and check the bundle in ``dest``."""
    model, kind = load_hf_model(spec.folder)
    source = f"a Hugging Face {kind} model ({spec.folder.name})"
    towers = hf_towers(model, kind, source)
    processor = spec.folder / PREPROCESSOR_CONFIG
    processor_config = (
        image_preprocessing.read_json(processor, "the image preprocessing of the model")
        if processor.is_file()
        else _default_processor(kind, towers.image_size)
    )
    image = image_preprocessing.from_hf_processor(
        processor_config,
        towers.image_size,
        "stretch" if kind == "siglip" else "center-crop",
        str(processor),
    )
    tokenizer_dir = spec.tokenizer_dir if spec.tokenizer_dir is not None else spec.folder
    cleaning = text_cleaning(kind, tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="pacsclip-tokenizer-") as scratch:
        write_tokenizer_json(
            [tokenizer_dir],
            Path(scratch),
            "Copy tokenizer.json (or vocab.json and merges.txt for CLIP, spiece.model for "
            "SigLIP) with tokenizer_config.json from the model's repository into the folder",
        )
        return build_torch_bundle(
            towers,
            TorchImport(
                name=spec.name,
                version=spec.version,
                image=image,
                tokenizer_dir=Path(scratch),
                prompts=spec.prompts or chest_radiograph_prompts(),
                text_cleaning=cleaning,
            ),
            dest,
            threads=threads,
        )


def text_cleaning(kind: str, tokenizer_dir: Path) -> TextCleaning:
    """What transformers' tokenizer for ``kind`` does to a text before its vocabulary sees it."""
    if kind != "siglip":
        # CLIPTokenizer does all its cleaning in tokenizer.json's normalizer (NFC, whitespace,
        # lower case), which the bundle's tokenizer.json carries.
        return "none"
    path = tokenizer_dir / "tokenizer_config.json"
    if not path.is_file():
        return "siglip"
    config = image_preprocessing.read_json(path, "the tokenizer's options")
    if config.get("do_lower_case", True) is not True:
        raise BundleError(
            f"{path}: do_lower_case is {config['do_lower_case']!r}; pacsclip cleans SigLIP text "
            "as SiglipTokenizer does with do_lower_case true (its default) only"
        )
    return "siglip"


def _default_processor(kind: str, size: int) -> dict[str, Any]:
    """What transformers' image processors do when the folder has no preprocessor config."""
    if kind == "siglip":
        return {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": size}
    return {}
