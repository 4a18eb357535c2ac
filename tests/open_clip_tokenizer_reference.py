"""open_clip's own tokenizers and text towers on given texts: the reference of the tokenizer tests.

Run as a module (``python -m tests.open_clip_tokenizer_reference OUT TEXTS.json``, from the
repository root) in its own process, for the reason ``tests/open_clip_reference.py`` gives. It
builds that script's OpenAI-layout and BiomedCLIP-layout checkpoint folders in OUT, then
tokenises the texts with the tokenizer open_clip uses for each and embeds them with open_clip's
eager model.

- OpenAI layout: open_clip's ``SimpleTokenizer`` (clean "lower") over the checkpoint's
  byte-level vocabulary, written as the BPE file it reads (no merges: 256 byte symbols, the same
  with ``</w>``, then its two special tokens, the ids of the checkpoint's tokenizer.json).
- BiomedCLIP layout: the ``HFTokenizer`` that ``open_clip.get_tokenizer("local-dir:FOLDER")``
  builds from ``open_clip_config.json`` (clean "whitespace", BERT's WordPiece).

``tokens.npz`` holds ``<layout>/ids`` (padded with 0 to the model's context length, as open_clip
gives them), ``<layout>/ids_long`` (the same at LONG_CONTEXT, so long texts are compared whole)
and ``<layout>/text`` (open_clip's normalised text embeddings of ``ids``). ``cleaned.json``
holds each of open_clip's clean functions applied to every text.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.open_clip_reference import (
    BERT_CONTEXT_LENGTH,
    CONTEXT_LENGTH,
    EMBED_DIM,
    _open_clip_model_module,
    biomedclip_layout,
    openai_layout,
)

LONG_CONTEXT = 77
CLEAN_FUNCTIONS = ("lower", "whitespace", "canonicalize")


def _simple_tokenizer(tokenizer_module: Any, folder: Path, context_length: int) -> Any:
    bpe = folder / "bpe_no_merges.txt.gz"
    # SimpleTokenizer reads the merges from the second line on: a header alone means none.
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2")
    return tokenizer_module.SimpleTokenizer(bpe_path=str(bpe), context_length=context_length)


def _openai(model_module: Any, folder: Path) -> Any:
    config = json.loads((folder / "tiny-vit-b-16-quickgelu.json").read_text(encoding="utf-8"))
    model = model_module.CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        quick_gelu=config["quick_gelu"],
    )
    model.load_state_dict(torch.load(folder / "checkpoint.pt", weights_only=True))
    return model.eval()


def _biomedclip(model_module: Any, folder: Path) -> Any:
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    text = {
        # The published config names a hub repository; the BERT config lies in the folder.
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_model_pretrained": False,
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": BERT_CONTEXT_LENGTH,
    }
    model = model_module.CustomTextCLIP(
        embed_dim=EMBED_DIM, vision_cfg=config["model_cfg"]["vision_cfg"], text_cfg=text
    )
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    out, texts_file = Path(sys.argv[1]), Path(sys.argv[2])
    texts: list[str] = json.loads(texts_file.read_text(encoding="utf-8"))
    model_module = _open_clip_model_module()
    from open_clip import factory, tokenizer  # type: ignore[import-untyped]

    openai_layout(model_module, out / "openai_b16", texts, 16)
    biomedclip_layout(model_module, out / "biomedclip", texts)
    folder = out / "openai_b16"
    biomed = out / "biomedclip"
    layouts = {
        "openai_b16": (
            _openai(model_module, folder),
            _simple_tokenizer(tokenizer, folder, CONTEXT_LENGTH),
        ),
        "biomedclip": (
            _biomedclip(model_module, biomed),
            factory.get_tokenizer(f"local-dir:{biomed}"),
        ),
    }
    arrays: dict[str, Any] = {}
    for name, (model, tokenize) in layouts.items():
        ids = tokenize(texts)
        arrays[f"{name}/ids"] = ids.numpy()
        arrays[f"{name}/ids_long"] = tokenize(texts, context_length=LONG_CONTEXT).numpy()
        with torch.no_grad():
            arrays[f"{name}/text"] = model.encode_text(ids, normalize=True).numpy()
    np.savez(out / "tokens.npz", **arrays)
    cleaned = {
        clean: [tokenizer.get_clean_fn(clean)(text) for text in texts] for clean in CLEAN_FUNCTIONS
    }
    (out / "cleaned.json").write_text(json.dumps(cleaned), encoding="utf-8")


if __name__ == "__main__":
    main()
