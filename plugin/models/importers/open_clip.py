"""Building a bundle from an open_clip checkpoint (``pacsclip model import-open-clip``).

The checkpoint is a state dict (``.safetensors``, ``.bin``, ``.pt``) with its open_clip model
config: ``open_clip_config.json`` as published beside hub checkpoints, or a bare model config
such as open_clip's ``ViT-B-16-quickgelu.json``. pacsclip reads both with its own code and loads
the weights into :mod:`plugin.models.importers.open_clip_towers`; open_clip, timm and torchvision
are never imported. Supported layouts: OpenAI-style ViTs (OpenAI CLIP, CheXzero, most open_clip
ViT-B/16 and ViT-B/32 checkpoints) and timm ViT + Hugging Face BERT (BiomedCLIP).
"""

from __future__ import annotations

import math
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import torch
from torch import nn

from plugin.models.bundle import Bundle, BundleError, PromptsFile, TextCleaning
from plugin.models.importers import image_preprocessing
from plugin.models.importers.default_prompts import chest_radiograph_prompts
from plugin.models.importers.open_clip_towers import (
    HFPooler,
    HFTextTower,
    OpenAITextTower,
    OpenAIVisionTower,
    TimmImageTower,
    TimmViT,
    VisionPool,
    hf_projection,
    timm_head,
)
from plugin.models.importers.tokenizer_files import write_tokenizer_json
from plugin.models.importers.torch_export import TorchImport, TorchTowers, build_torch_bundle

CONFIG_FILE = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Keys that carry no weights of either tower: the temperature and what OpenAI's TorchScript
# archives and older transformers versions store beside the weights.
_IGNORED_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")
_TIMM_VIT_RE = re.compile(r"^vit_(tiny|small|base|large|huge|giant)_patch\d+")
_TIMM_VIT_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}
# open_clip options that change the architecture away from what pacsclip's towers implement.
_VISION_DEFAULTS: dict[str, Any] = {
    "attentional_pool": False,
    "ls_init_value": None,
    "pos_embed_type": "learnable",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
    "norm_kwargs": None,
}
_TEXT_DEFAULTS: dict[str, Any] = {
    **{
        k: v for k, v in _VISION_DEFAULTS.items() if k not in ("attentional_pool", "pos_embed_type")
    },
    "embed_cls": False,
    "proj_type": "linear",
    "proj_bias": False,
    "final_ln_after_pool": False,
}

# open_clip's clean functions by the name its tokenizers take (open_clip/tokenizer.py).
_CLEANING: dict[str, TextCleaning] = {
    "lower": "open_clip_lower",
    "whitespace": "open_clip_whitespace",
    "canonicalize": "open_clip_canonicalize",
}

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OpenClipImport:
    """What ``import-open-clip`` needs: the checkpoint (folder or file), the bundle's identity."""

    path: Path
    name: str
    version: str
    config: Path | None = None  # default: open_clip_config.json or the model config beside it
    tokenizer_dir: Path | None = None  # default: the checkpoint's folder
    prompts: PromptsFile | None = None  # default: chest_radiograph_prompts()
    quick_gelu: bool | None = None  # default: the config's "quick_gelu"


@dataclass(frozen=True)
class OpenClipConfig:
    """An open_clip model config and its preprocessing, as read from JSON."""

    path: Path
    model: Mapping[str, Any]
    preprocess: Mapping[str, Any]

    @property
    def vision(self) -> Mapping[str, Any]:
        return self.model.get("vision_cfg") or {}

    @property
    def text(self) -> Mapping[str, Any]:
        return self.model.get("text_cfg") or {}

    @property
    def embed_dim(self) -> int:
        return int(self.model["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.vision.get("image_size", 224)
        if isinstance(size, list | tuple):
            if len(set(size)) != 1:
                raise BundleError(f"{self.path}: image_size {size} is not square")
            size = size[0]
        return int(size)


def find_checkpoint(path: Path) -> Path:
    """The weights file: ``path`` itself, or the one weights file in the folder ``path``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise BundleError(f"{path} does not exist: give the checkpoint folder or file")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not found:
        raise BundleError(
            f"{path} holds no weights file ({', '.join(WEIGHT_SUFFIXES)}): copy the checkpoint, "
            "e.g. open_clip_pytorch_model.bin, into it"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise BundleError(f"{path} holds several weights files ({names}): give the file itself")
    return found[0]


def find_config(folder: Path, explicit: Path | None) -> Path:
    """``--config``, else ``open_clip_config.json``, else the one model config in ``folder``."""
    if explicit is not None:
        return explicit
    if (folder / CONFIG_FILE).is_file():
        return folder / CONFIG_FILE
    candidates = [p for p in sorted(folder.glob("*.json")) if _is_model_config(p)]
    if len(candidates) == 1:
        return candidates[0]
    raise BundleError(
        f"{folder} has no open_clip model config: copy {CONFIG_FILE} from the model's "
        "repository, or the model config JSON it was trained with (e.g. ViT-B-32-quickgelu.json "
        "from open_clip's model_configs), into the folder, or give --config FILE"
        + (f" (several candidates: {', '.join(p.name for p in candidates)})" if candidates else "")
    )


def _is_model_config(path: Path) -> bool:
    try:
        data = image_preprocessing.read_json(path, "")
    except BundleError:
        return False
    return "model_cfg" in data or ("vision_cfg" in data and "text_cfg" in data)


def read_config(path: Path) -> OpenClipConfig:
    data = image_preprocessing.read_json(path, "the open_clip model config of the checkpoint")
    model = data.get("model_cfg", data)
    preprocess = data.get("preprocess_cfg", {})
    if not isinstance(model, dict) or "embed_dim" not in model or "vision_cfg" not in model:
        raise BundleError(
            f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and "
            "text_cfg (at the top level, or under model_cfg as in open_clip_config.json)"
        )
    return OpenClipConfig(path=path, model=model, preprocess=preprocess)


def load_state_dict(path: Path) -> StateDict:
    """The checkpoint's tensors, unwrapped from training checkpoints and DataParallel prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = _load_pickled(path)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise BundleError(f"cannot read the checkpoint {path}: {exc}") from exc
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # an open_clip training checkpoint (epoch_N.pt)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise BundleError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    prefix = "module." if all(k.startswith("module.") for k in raw) else ""
    return {k.removeprefix(prefix): v for k, v in raw.items()}


def _load_pickled(path: Path) -> Any:
    try:
        # weights_only: a checkpoint is data; it must not run code when it is read.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except RuntimeError as exc:
        if "TorchScript" not in str(exc) and "constants.pkl" not in str(exc):
            raise
    # OpenAI's own ViT-B-32.pt / ViT-B-16.pt are TorchScript archives.
    archive: Any = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return dict(archive.state_dict())


def open_clip_towers(
    state: StateDict,
    config: OpenClipConfig,
    quick_gelu: bool | None = None,
    text_config_dirs: Iterable[Path] = (),
    source: str = "an open_clip checkpoint",
) -> TorchTowers:
    """Load ``state`` into pacsclip's towers as ``config`` describes them."""
    gelu = bool(config.model.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    used: set[str] = set()
    problems: list[str] = []
    if "visual.trunk.cls_token" in state:
        image: nn.Module = _timm_image_tower(state, config)
        _load(image, state, "visual.", used, problems)
        patch = int(state["visual.trunk.patch_embed.proj.weight"].shape[-1])
    elif "visual.conv1.weight" in state:
        image = _openai_image_tower(state, config, gelu)
        _load(image, state, "visual.", used, problems)
        patch = int(state["visual.conv1.weight"].shape[-1])
    else:
        raise _unknown_layout(state, config, "image")
    text_uses_mask = "text.transformer.embeddings.word_embeddings.weight" in state
    if text_uses_mask:
        text: nn.Module = _hf_text_tower(state, config, text_config_dirs)
        _load(text, state, "text.", used, problems)
    elif "token_embedding.weight" in state:
        text = _openai_text_tower(config, gelu)
        _load(text, state, "", used, problems, keep=_is_openai_text_key)
    else:
        raise _unknown_layout(state, config, "text")
    unexpected = sorted(
        k for k in state if k not in used and k not in _IGNORED_KEYS and not _ignorable(k)
    )
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise BundleError(
            f"the checkpoint does not match the layout of {config.path}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nCheck that the config is the one the checkpoint was trained with."
        )
    logit_scale = state.get("logit_scale")
    return TorchTowers(
        image=image,
        text=text,
        embedding_dim=config.embed_dim,
        image_size=config.image_size,
        logit_scale=math.exp(float(logit_scale)) if logit_scale is not None else 100.0,
        max_length=int(config.text.get("context_length", 77)),
        text_uses_mask=text_uses_mask,
        source=source,
        patch_grid=(config.image_size // patch, config.image_size // patch),
    )


def _ignorable(key: str) -> bool:
    # Buffers that older transformers versions saved with BERT; recomputed, never learnt.
    return key.endswith("embeddings.position_ids") or key == "attn_mask"


def _is_openai_text_key(key: str) -> bool:
    return not key.startswith(("visual.", "text.")) and key not in _IGNORED_KEYS


def _load(
    module: nn.Module,
    state: StateDict,
    prefix: str,
    used: set[str],
    problems: list[str],
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Load the ``prefix`` keys of ``state`` into ``module``; note what is missing or wrong."""
    selected = {
        k: v
        for k, v in state.items()
        if k.startswith(prefix) and (keep is None or keep(k)) and not _ignorable(k)
    }
    own = {k.removeprefix(prefix): v for k, v in selected.items()}
    expected = module.state_dict()
    mismatched = [
        f"{prefix}{k} is {list(v.shape)}, the config makes {list(expected[k].shape)}"
        for k, v in own.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        problems.append(f"shapes differ: {_listing(mismatched)}")
        used.update(selected)  # reported as mismatched, not again as unexpected
        return
    result = module.load_state_dict({k: v for k, v in own.items() if k in expected}, strict=False)
    if result.missing_keys:
        problems.append(f"missing keys: {_listing([prefix + k for k in result.missing_keys])}")
    used.update(prefix + k for k in own if k in expected)


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _unknown_layout(state: StateDict, config: OpenClipConfig, tower: str) -> BundleError:
    known = {
        "image": "visual.conv1.weight (OpenAI-style ViT) or visual.trunk.* (timm ViT)",
        "text": "token_embedding.weight (OpenAI-style text transformer) or "
        "text.transformer.embeddings.* (Hugging Face BERT)",
    }[tower]
    keys = sorted(k for k in state if k not in _IGNORED_KEYS)
    return BundleError(
        f"unknown checkpoint layout ({config.path}): the {tower} tower matches none that "
        f"pacsclip reads, which need {known}. Keys found: {_listing(keys)}. For another "
        "architecture, export the towers to ONNX and use `pacsclip model import-onnx`"
    )


def _check_defaults(section: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    for key, default in defaults.items():
        value = section.get(key, default)
        # null stands for the default in some published configs
        if value != default and value is not None:
            raise BundleError(
                f"{where}.{key} = {section[key]!r} is not supported by pacsclip's towers; "
                "export the towers to ONNX and use `pacsclip model import-onnx`"
            )


def _openai_image_tower(
    state: StateDict, config: OpenClipConfig, quick_gelu: bool
) -> OpenAIVisionTower:
    cfg = config.vision
    where = f"{config.path}: vision_cfg"
    if isinstance(cfg.get("layers", 12), list | tuple):
        raise BundleError(
            f"{where}.layers is a list: ResNet image towers are not supported; export the "
            "towers to ONNX and use `pacsclip model import-onnx`"
        )
    _check_defaults(cfg, _VISION_DEFAULTS, where)
    pool = cfg.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise BundleError(f"{where}.pool_type {pool!r} is not supported (tok or avg)")
    width = int(cfg.get("width", 768))
    patch = int(cfg.get("patch_size", 16))
    return OpenAIVisionTower(
        image_size=config.image_size,
        patch_size=patch,
        width=width,
        layers=int(cfg.get("layers", 12)),
        heads=width // int(cfg.get("head_width", 64)),
        mlp_width=int(width * float(cfg.get("mlp_ratio", 4.0))),
        output_dim=config.embed_dim,
        quick_gelu=quick_gelu,
        pool=pool,
        ln_pre=not cfg.get("no_ln_pre", False),
        final_ln_after_pool=bool(cfg.get("final_ln_after_pool", False)),
    )


def _openai_text_tower(config: OpenClipConfig, quick_gelu: bool) -> OpenAITextTower:
    cfg = config.text
    where = f"{config.path}: text_cfg"
    _check_defaults(cfg, _TEXT_DEFAULTS, where)
    pool = cfg.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "first", "last"):
        raise BundleError(f"{where}.pool_type {pool!r} is not supported")
    width = int(cfg.get("width", 512))
    return OpenAITextTower(
        context_length=int(cfg.get("context_length", 77)),
        vocab_size=int(cfg.get("vocab_size", 49408)),
        width=width,
        layers=int(cfg.get("layers", 12)),
        heads=int(cfg.get("heads", 8)),
        mlp_width=int(width * float(cfg.get("mlp_ratio", 4.0))),
        output_dim=config.embed_dim,
        quick_gelu=quick_gelu,
        pool=pool,
        eos_id=int(cfg.get("eos_id", 2)),
        causal=not cfg.get("no_causal_mask", False),
    )


def _timm_image_tower(state: StateDict, config: OpenClipConfig) -> TimmImageTower:
    cfg = config.vision
    where = f"{config.path}: vision_cfg"
    name = str(cfg.get("timm_model_name") or "")
    match = _TIMM_VIT_RE.match(name)
    if match is None:
        raise BundleError(
            f"{where}.timm_model_name {name!r} is not a timm ViT pacsclip reads "
            "(vit_tiny|small|base|large|huge|giant_patchN_...)"
        )
    # timm's own default pooling of a ViT is its class token; open_clip's default is 'avg'.
    pool_name = cfg.get("timm_pool", "avg")
    pools: dict[str, VisionPool] = {"": "tok", "token": "tok", "avg": "avg"}
    proj = cfg.get("timm_proj", "linear")
    if pool_name not in pools or proj not in ("linear", "mlp"):
        raise BundleError(
            f"{where}: timm_pool {pool_name!r} / timm_proj {proj!r} are not supported "
            "(timm_pool '', 'token' or 'avg'; timm_proj 'linear' or 'mlp')"
        )
    width = state["visual.trunk.cls_token"].shape[-1]
    patch = state["visual.trunk.patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[3] for k in state if k.startswith("visual.trunk.blocks.")})
    fc1 = state.get("visual.trunk.blocks.0.mlp.fc1.weight")
    trunk = TimmViT(
        image_size=config.image_size,
        patch_size=int(patch),
        width=int(width),
        depth=depth,
        heads=_TIMM_VIT_HEADS[match.group(1)],
        mlp_width=int(fc1.shape[0]) if fc1 is not None else 4 * int(width),
        pool=pools[pool_name],
    )
    head = timm_head(proj, int(width), config.embed_dim, bool(cfg.get("timm_proj_bias", False)))
    return TimmImageTower(trunk, head)


def _hf_text_tower(
    state: StateDict, config: OpenClipConfig, config_dirs: Iterable[Path]
) -> HFTextTower:
    from transformers import BertModel

    cfg = config.text
    # BiomedCLIP's config says "proj" and "pooler_type"; newer open_clip "hf_proj_type" and
    # "hf_pooler_type". The defaults are open_clip's.
    pooler = cfg.get("hf_pooler_type") or cfg.get("pooler_type") or "mean_pooler"
    proj = cfg.get("hf_proj_type") or cfg.get("proj") or "mlp"
    if pooler not in get_args(HFPooler):
        raise BundleError(
            f"{config.path}: text_cfg pooler {pooler!r} is not supported "
            f"({', '.join(get_args(HFPooler))})"
        )
    bert_config = _bert_config(state, config_dirs)
    bert_config._attn_implementation = "eager"  # plain ONNX operators on every opset
    transformer: Any = BertModel(bert_config, add_pooling_layer=pooler == "cls_pooler")
    return HFTextTower(
        transformer.eval(),
        cast(HFPooler, pooler),
        hf_projection(proj, int(bert_config.hidden_size), config.embed_dim),
    )


def _bert_config(state: StateDict, config_dirs: Iterable[Path]) -> Any:
    """The BERT's config.json when it was copied, else its sizes read from the weights."""
    from transformers import BertConfig

    for folder in config_dirs:
        path = folder / "config.json"
        if path.is_file():
            data = image_preprocessing.read_json(path, "the text model's config")
            if data.get("model_type") == "bert":
                return BertConfig(**{k: v for k, v in data.items() if k != "model_type"})
    prefix = "text.transformer."
    words = state[f"{prefix}embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    layers = {k.split(".")[4] for k in state if k.startswith(f"{prefix}encoder.layer.")}
    return BertConfig(
        vocab_size=int(words.shape[0]),
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        # BERT models keep 64 dimensions per head; give config.json when one does not.
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=int(state[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(
            state[f"{prefix}embeddings.position_embeddings.weight"].shape[0]
        ),
        type_vocab_size=int(state[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0]),
    )


def text_cleaning(config: OpenClipConfig) -> TextCleaning:
    """The cleaning of the tokenizer open_clip's ``get_tokenizer`` builds for ``config``.

    That is ``HFTokenizer`` (clean "whitespace") when text_cfg names ``hf_tokenizer_name``, else
    ``SimpleTokenizer`` (clean "lower"); ``text_cfg.tokenizer_kwargs.clean`` overrides both.
    """
    options = dict(config.text.get("tokenizer_kwargs") or {})
    clean = options.pop("clean", "whitespace" if config.text.get("hf_tokenizer_name") else "lower")
    if clean not in _CLEANING:
        raise BundleError(
            f"{config.path}: text_cfg.tokenizer_kwargs.clean {clean!r} is not one of open_clip's "
            f"({', '.join(_CLEANING)})"
        )
    # Options that change the token ids beyond cleaning (sep tokens stripped, tokens dropped
    # to fit the context) have no equivalent in tokenizer.json.
    unsupported = sorted(key for key, value in options.items() if value)
    if config.text.get("tokenizer_mode"):
        unsupported.append("tokenizer_mode")
    if unsupported:
        raise BundleError(
            f"{config.path}: text_cfg sets {', '.join(unsupported)}, which pacsclip's tokenizer "
            "cannot reproduce; export the towers to ONNX and use `pacsclip model import-onnx`"
        )
    return _CLEANING[clean]


def _tokenizer_hint(config: OpenClipConfig, folder: Path) -> str:
    name = config.text.get("hf_tokenizer_name") or config.text.get("hf_model_name")
    if name:
        return (
            f"Copy the tokenizer files of {name} (tokenizer.json, or vocab.txt with "
            f"tokenizer_config.json) into {folder}, or give --tokenizer DIR"
        )
    return (
        "This model uses OpenAI CLIP's BPE tokenizer: copy tokenizer.json (or vocab.json and "
        f"merges.txt) of a Hugging Face CLIP tokenizer (e.g. openai/clip-vit-base-patch32) into "
        f"{folder}, or give --tokenizer DIR"
    )


def build_open_clip_bundle(spec: OpenClipImport, dest: Path, threads: int | None = 1) -> Bundle:
    """Read the checkpoint and its config, load the towers, write and check the bundle."""
    checkpoint = find_checkpoint(spec.path)
    folder = checkpoint.parent
    config = read_config(find_config(folder, spec.config))
    image = image_preprocessing.from_open_clip(
        config.preprocess, config.image_size, str(config.path)
    )
    cleaning = text_cleaning(config)
    tokenizer_dirs = [spec.tokenizer_dir] if spec.tokenizer_dir is not None else [folder]
    with tempfile.TemporaryDirectory(prefix="pacsclip-tokenizer-") as scratch:
        # Before the weights are read: a missing tokenizer fails in a second, not a minute.
        write_tokenizer_json(tokenizer_dirs, Path(scratch), _tokenizer_hint(config, folder))
        towers = open_clip_towers(
            load_state_dict(checkpoint),
            config,
            spec.quick_gelu,
            text_config_dirs=[*tokenizer_dirs, folder],
            source=f"an open_clip checkpoint ({checkpoint.name})",
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
