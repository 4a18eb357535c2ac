"""Tiny open_clip checkpoints made by open_clip's own model code, with reference embeddings.

Run as a script (``python tests/open_clip_reference.py OUT TEXTS.json``) in its own process:
open_clip's package imports torchvision, which cannot be installed beside the pinned CPU torch,
so this script loads open_clip's model modules (and timm, for the BiomedCLIP-style image
tower) with a stand-in for torchvision. That stand-in exists only here, in a process of its
own, and only to build reference models: pacsclip's importer never imports any of the three.

It writes, for each layout, a checkpoint folder as an operator would copy it (weights, open_clip
config, tokenizer files) and ``reference.npz`` with open_clip's eager image and text embeddings.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SIZE = 32
EMBED_DIM = 24
CONTEXT_LENGTH = 16
BERT_CONTEXT_LENGTH = 24
TIMM_NAME = "vit_base_patch8_32_pacsclip_test"
N_IMAGES = 3
WORDS = ["no", "pleural", "effusion", "chest", "radiograph", "showing", "lung", "fluid"]


class _AnyClass(type):
    """Every attribute is another class, so ``from torchvision.x import Y`` and subclassing work."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyClass(name, (), {})


def _module_attribute(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _AnyClass(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision`` import with an empty package (open_clip and timm import
    it for transforms and datasets, which these reference models never use)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_attribute  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _open_clip_model_module() -> Any:
    """``open_clip.model`` without running ``open_clip/__init__`` (its tokenizer needs ftfy)."""
    import transformers  # noqa: F401  (before the stand-in: it probes for torchvision)

    sys.meta_path.insert(0, _StandInFinder())
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("open_clip_torch is not installed (scripts/bootstrap installs it)")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    from open_clip import model  # type: ignore[import-untyped]

    _register_tiny_timm_vit()
    return model


def _register_tiny_timm_vit() -> None:
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    @register_model
    def vit_base_patch8_32_pacsclip_test(pretrained: bool = False, **kwargs: Any) -> Any:
        # timm's factory passes its own bookkeeping (pretrained_cfg, cache_dir) through kwargs.
        options = {k: v for k, v in kwargs.items() if k in ("num_classes", "global_pool")}
        model: Any = VisionTransformer(
            img_size=IMAGE_SIZE, patch_size=8, embed_dim=48, depth=2, num_heads=12, **options
        )
        model.default_cfg = {}  # what timm's factory sets on the models it builds
        return model


def _jitter(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, LayerNorms included, so no key can be mixed up."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.05 * noise)


def clip_tokenizer(folder: Path) -> Any:
    """OpenAI CLIP's byte-level BPE with no merges: real CLIP pre-tokenisation, tiny vocab."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols: list[str] = list(bytes_to_unicode().values())  # type: ignore[no-untyped-call]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(str(folder))
    # The files a CLIP tokenizer is built from, as hub repositories carry them too.
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return tokenizer


def _bert_tokenizer(folder: Path) -> Any:
    """A WordPiece vocabulary as BiomedBERT ships it: vocab.txt + tokenizer_config.json."""
    from transformers import AutoTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters]
    tokens += [f"##{c}" for c in letters]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8"
    )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(N_IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def _ids(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    """Token ids padded with 0 to the context length, as open_clip's tokenizers give them."""
    ids = torch.zeros(len(texts), length, dtype=torch.int64)
    for row, text in enumerate(texts):
        tokens = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def openai_layout(model_module: Any, out: Path, texts: list[str], patch: int) -> dict[str, Any]:
    """An OpenAI-style ViT (QuickGELU), saved as a bare state dict with a model config JSON."""
    out.mkdir(parents=True)
    config = {
        "embed_dim": EMBED_DIM,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": patch,
        },
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": 514,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }
    torch.manual_seed(patch)
    model = model_module.CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        quick_gelu=True,
    ).eval()
    _jitter(model, seed=patch)
    (out / f"tiny-vit-b-{patch}-quickgelu.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save(model.state_dict(), out / "checkpoint.pt")
    tokenizer = clip_tokenizer(out)
    with torch.no_grad():
        image = model.encode_image(_images(), normalize=True)
        text = model.encode_text(_ids(tokenizer, texts, CONTEXT_LENGTH), normalize=True)
        # open_clip's own token output (after ln_post), then the projection the pooled
        # token gets: the patch tokens in the joint space.
        model.visual.output_tokens = True
        _, tokens = model.visual(_images())
        patches = tokens @ model.visual.proj
    return {
        "image": image.numpy(),
        "text": text.numpy(),
        "patches": patches.numpy(),
        "logit_scale": model.logit_scale,
    }


def biomedclip_layout(model_module: Any, out: Path, texts: list[str]) -> dict[str, Any]:
    """timm ViT + BERT with an MLP projection, saved as BiomedCLIP is on the hub."""
    from transformers import BertConfig

    out.mkdir(parents=True)
    bert = BertConfig(
        vocab_size=len(_bert_tokenizer(out).get_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    bert.save_pretrained(str(out))  # config.json, as copied from the BERT's repository
    vision = {
        "timm_model_name": TIMM_NAME,
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": IMAGE_SIZE,
    }
    text = {
        "hf_model_name": str(out),
        "hf_tokenizer_name": str(out),
        "hf_model_pretrained": False,
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": BERT_CONTEXT_LENGTH,
    }
    torch.manual_seed(3)
    model = model_module.CustomTextCLIP(embed_dim=EMBED_DIM, vision_cfg=vision, text_cfg=text)
    model = model.eval()
    _jitter(model, seed=3)
    # Written as BiomedCLIP's open_clip_config.json writes it, with the older key names.
    published_text = {
        "hf_model_name": "example/tiny-bert",
        "hf_tokenizer_name": "example/tiny-bert",
        "proj": "mlp",
        "pooler_type": "cls_last_hidden_state_pooler",
        "context_length": BERT_CONTEXT_LENGTH,
    }
    config = {
        "model_cfg": {"embed_dim": EMBED_DIM, "vision_cfg": vision, "text_cfg": published_text},
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    tokenizer = _bert_tokenizer(out)
    with torch.no_grad():
        image = model.encode_image(_images(), normalize=True)
        encoded = _ids(tokenizer, texts, BERT_CONTEXT_LENGTH)
        text_embeds = model.encode_text(encoded, normalize=True)
        # timm's own token output (after its final norm), prefix tokens dropped, through
        # open_clip's head: the patch tokens in the joint space.
        trunk = model.visual.trunk
        tokens = trunk.forward_features(_images())[:, trunk.num_prefix_tokens :]
        patches = model.visual.head(tokens)
    return {
        "image": image.numpy(),
        "text": text_embeds.numpy(),
        "patches": patches.numpy(),
        "logit_scale": model.logit_scale,
    }


def main() -> None:
    out, texts_file = Path(sys.argv[1]), Path(sys.argv[2])
    texts = json.loads(texts_file.read_text(encoding="utf-8"))
    model_module = _open_clip_model_module()
    arrays: dict[str, Any] = {"images": _images().numpy()}
    layouts: dict[str, Callable[[], dict[str, Any]]] = {
        "openai_b16": lambda: openai_layout(model_module, out / "openai_b16", texts, 16),
        "openai_b8": lambda: openai_layout(model_module, out / "openai_b8", texts, 8),
        "biomedclip": lambda: biomedclip_layout(model_module, out / "biomedclip", texts),
    }
    for name, build in layouts.items():
        result = build()
        arrays[f"{name}/image"] = result["image"]
        arrays[f"{name}/text"] = result["text"]
        arrays[f"{name}/patches"] = result["patches"]
        arrays[f"{name}/logit_scale"] = np.exp(result["logit_scale"].detach().numpy())
    np.savez(out / "reference.npz", **arrays)


if __name__ == "__main__":
    main()
