"""A tiny bundle with an ONNX text tower and synthetic image-report pairs for fine-tuning tests.

Each pair is a PNG whose stripes (period 2 to 5 pixels) follow which of four reports it has, so
an image adapter and a text adapter can learn to match them; nothing here is clinical.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.models_fixtures import (
    SIZE,
    TinyImageTower,
    TinyTextTower,
    build_bundle,
    export_image_tower,
    export_text_tower,
    make_tokenizer,
)

# Words of the tiny tokenizer's vocabulary (tests.models_fixtures.FINDINGS' prompts).
REPORTS = (
    "pleural effusion. no pneumothorax.",
    "no pleural effusion. pneumothorax.",
    "pleural effusion. pneumothorax.",
    "sharp costophrenic angles. no pneumothorax.",
)
LABELS = ((1, 0), (0, 1), (1, 1), (0, 0))  # pleural_effusion, pneumothorax


def build_tiny_parent(root: Path) -> Path:
    """``tiny-clip@1.0.0``: image tower with patch embeddings, ONNX text tower, tokenizer."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(root / "tokenizer")
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    return build_bundle(
        root / "tiny",
        export_image_tower(TinyImageTower(with_patches=True), root / "image.onnx"),
        text_tower=export_text_tower(TinyTextTower(vocab), root / "text.onnx"),
        tokenizer_dir=tokenizer,
    )


def write_pairs(folder: Path, n: int, seed: int = 0) -> Path:
    """``pairs.csv`` and n PNGs in ``folder``; pair i is of kind i % 4."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = folder / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report", "pleural_effusion", "pneumothorax"])
        for i in range(n):
            kind = i % 4
            stripes = 0.5 + 0.4 * np.sin(2 * np.pi * np.arange(SIZE) / (kind + 2))[None, :]
            picture = np.clip(stripes + 0.05 * rng.normal(size=(SIZE, SIZE)), 0, 1)
            Image.fromarray(np.round(picture * 255).astype(np.uint8)).save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", REPORTS[kind], *LABELS[kind]])
    return path
