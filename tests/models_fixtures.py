"""Tiny CLIP-style towers and bundles for the model tests (built in a few hundred ms).

The towers are real torch modules exported to ONNX with the tensor names of
docs/model-bundle.md, so the tests compare ONNX Runtime against PyTorch on the same weights.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from plugin.models.bundle import Manifest
from plugin.models.bundle import validate_model as _validate
from plugin.models.bundle_writer import pin_file, write_manifest

DIM = 16
SIZE = 32
CHANNELS = 3

FINDINGS: list[dict[str, Any]] = [
    {
        "name": "pleural_effusion",
        "display": "Pleural effusion",
        "positive_prompts": ["pleural effusion", "fluid in the pleural space"],
        "negative_prompts": ["no pleural effusion", "sharp costophrenic angles"],
        "templates": ["{}", "chest radiograph showing {}"],
        "calibration": {"temperature": 1.0, "bias": 0.0, "threshold": 0.5},
    },
    {
        "name": "pneumothorax",
        "display": "Pneumothorax",
        "positive_prompts": ["pneumothorax"],
        "negative_prompts": ["no pneumothorax"],
        "stat_threshold": 0.8,
    },
]
PRIORITY = {"stat_if_any": ["pneumothorax"], "default": "routine"}


class TinyImageTower(nn.Module):
    """Conv + mean pooling + linear, L2-normalised; optionally also per-patch embeddings."""

    def __init__(self, with_patches: bool = False) -> None:
        super().__init__()
        self.with_patches = with_patches
        self.conv = nn.Conv2d(CHANNELS, 8, kernel_size=4, stride=4)
        self.proj = nn.Linear(8, DIM)

    def forward(self, pixel_values: torch.Tensor) -> Any:
        features = torch.relu(self.conv(pixel_values))  # [N, 8, 8, 8]
        embeds = functional.normalize(self.proj(features.mean(dim=(2, 3))), dim=-1)
        if not self.with_patches:
            return embeds
        patches = self.proj(features.flatten(2).transpose(1, 2))  # [N, 64, DIM]
        return embeds, patches


class TinyTextTower(nn.Module):
    """Token embedding + masked mean + linear, L2-normalised."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 12)
        self.proj = nn.Linear(12, DIM)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return functional.normalize(self.proj(pooled), dim=-1)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, **kwargs: Any) -> Path:
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy; dynamo=True would need onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
    return path


def export_image_tower(
    module: TinyImageTower,
    path: Path,
    dynamic_batch: bool = True,
    output_name: str = "image_embeds",
) -> Path:
    outputs = [output_name, "patch_embeds"] if module.with_patches else [output_name]
    axes = {name: {0: "batch"} for name in ["pixel_values", *outputs]} if dynamic_batch else None
    return _export(
        module,
        (torch.zeros(1, CHANNELS, SIZE, SIZE),),
        path,
        input_names=["pixel_values"],
        output_names=outputs,
        dynamic_axes=axes,
    )


def export_text_tower(module: TinyTextTower, path: Path) -> Path:
    sequence = {0: "batch", 1: "sequence"}
    ids = torch.zeros(2, 5, dtype=torch.int64)
    return _export(
        module,
        (ids, torch.ones_like(ids)),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["text_embeds"],
        dynamic_axes={
            "input_ids": sequence,
            "attention_mask": sequence,
            "text_embeds": {0: "batch"},
        },
    )


def make_tokenizer(directory: Path) -> Path:
    """A word-level Hugging Face tokenizer over the fixture prompts; returns its folder."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words: set[str] = {"chest", "radiograph", "showing"}
    for finding in FINDINGS:
        for prompt in finding["positive_prompts"] + finding["negative_prompts"]:
            words.update(prompt.split())
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(sorted(words))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def write_prompt_npz(path: Path, seed: int = 0) -> Path:
    """Random unit-norm prompt embeddings [K, DIM] for every fixture finding."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for finding in FINDINGS:
        for side in ("positive", "negative"):
            rows = rng.normal(size=(2, DIM)).astype(np.float32)
            arrays[f"{finding['name']}/{side}"] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def manifest_data(**overrides: Any) -> dict[str, Any]:
    """A valid manifest as plain JSON data, with placeholder digests."""
    data: dict[str, Any] = {
        "format_version": 1,
        "name": "tiny-clip",
        "version": "1.0.0",
        "embedding_dim": DIM,
        "synthetic": True,
        "image": {"size": SIZE, "channels": CHANNELS, "mean": [0.5] * 3, "std": [0.25] * 3},
        "files": {
            "image_tower": {"path": "image_tower.onnx", "sha256": "0" * 64},
            "prompt_embeddings": {"path": "prompt_embeddings.npz", "sha256": "0" * 64},
        },
        "logit_scale": 100.0,
        "findings": FINDINGS,
        "priority": PRIORITY,
        "model_card": {
            "intended_use": "Unit tests of pacsclip.",
            "training_data": "None: random weights.",
            "limitations": "Meaningless outputs.",
            "not_for_clinical_use": True,
        },
    }
    data.update(overrides)
    return copy.deepcopy(data)  # callers edit it; FINDINGS must stay as it is


def build_bundle(
    directory: Path,
    image_tower: Path,
    *,
    name: str = "tiny-clip",
    version: str = "1.0.0",
    text_tower: Path | None = None,
    tokenizer_dir: Path | None = None,
    prompt_seed: int = 0,
) -> Path:
    """A complete bundle folder: an exported image tower, prompt embeddings, a pinned manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "image_tower.onnx").write_bytes(image_tower.read_bytes())
    write_prompt_npz(directory / "prompt_embeddings.npz", seed=prompt_seed)
    files: dict[str, Any] = {
        "image_tower": pin_file(directory, "image_tower.onnx").model_dump(),
        "prompt_embeddings": pin_file(directory, "prompt_embeddings.npz").model_dump(),
    }
    extra: dict[str, Any] = {}
    if text_tower is not None and tokenizer_dir is not None:
        (directory / "text_tower.onnx").write_bytes(text_tower.read_bytes())
        (directory / "tokenizer").mkdir(exist_ok=True)
        (directory / "tokenizer" / "tokenizer.json").write_bytes(
            (tokenizer_dir / "tokenizer.json").read_bytes()
        )
        files["text_tower"] = pin_file(directory, "text_tower.onnx").model_dump()
        files["tokenizer"] = pin_file(directory, "tokenizer/tokenizer.json").model_dump()
        extra["text_encoder"] = {"kind": "onnx"}
    data = manifest_data(name=name, version=version, files=files, **extra)
    write_manifest(directory, _validate(Manifest, data, "fixture manifest"))
    return directory


def edit_manifest(directory: Path, **changes: Any) -> None:
    """Rewrite bundle.json with top-level keys replaced (no validation: tests break it)."""
    path = directory / "bundle.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
