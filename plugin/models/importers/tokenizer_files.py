"""The text tower's tokenizer as one ``tokenizer.json``, the only tokenizer file a bundle uses.

A Hugging Face folder may hold a ready ``tokenizer.json`` or only the files its tokenizer is
built from (``vocab.json`` + ``merges.txt`` for CLIP's BPE, ``vocab.txt`` for BERT's WordPiece,
``spiece.model`` for SigLIP); the latter are turned into ``tokenizer.json`` with transformers'
fast tokenizer. The pad token the model was trained with is written into the file, because the
runtime pads with the pad token that ``tokenizer.json`` declares.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from plugin.models.bundle import BundleError
from plugin.models.bundle_writer import TOKENIZER_FILE

# Files from which transformers can build a fast tokenizer without a tokenizer.json.
SOURCE_FILES = ("vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_JSON = Path(TOKENIZER_FILE).name


def has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_JSON).is_file() or any(
        (folder / name).is_file() for name in SOURCE_FILES
    )


def write_tokenizer_json(folders: Sequence[Path], out_dir: Path, what_to_copy: str) -> Path:
    """Write ``out_dir/tokenizer.json`` from the first of ``folders`` that holds a tokenizer.

    ``what_to_copy`` ends the error message when none does: which files the operator copies.
    """
    folder = next((f for f in folders if has_tokenizer(f)), None)
    if folder is None:
        searched = ", ".join(str(f) for f in folders)
        raise BundleError(
            f"no tokenizer found in {searched}: the text tower needs the tokenizer it was "
            f"trained with, and nothing is downloaded. {what_to_copy}"
        )
    if (folder / TOKENIZER_JSON).is_file():
        tokenizer = _read(folder / TOKENIZER_JSON)
        pad_token = _configured_pad_token(folder)
    else:
        tokenizer, pad_token = _built_with_transformers(folder)
    if pad_token is not None and tokenizer.token_to_id(pad_token) is not None:
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    # The runtime sets truncation from the manifest's max_length.
    tokenizer.no_truncation()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENIZER_JSON
    tokenizer.save(str(path))
    return path


def _read(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for an unreadable file
        raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc


def _configured_pad_token(folder: Path) -> str | None:
    """The pad token of ``tokenizer_config.json``, when the folder has one."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    pad = config.get("pad_token")
    if isinstance(pad, dict):  # the AddedToken form: {"content": "<pad>", ...}
        pad = pad.get("content")
    return pad if isinstance(pad, str) else None


def _built_with_transformers(folder: Path) -> tuple[Tokenizer, str | None]:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"cannot build a tokenizer from {folder}: {exc}. Copy the model's tokenizer.json, "
            "or its tokenizer_config.json with the vocabulary files it names"
        ) from exc
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise BundleError(
            f"{folder}: transformers has no fast tokenizer for this vocabulary; copy the "
            "model's tokenizer.json instead"
        )
    pad = hf.pad_token
    return backend, pad if isinstance(pad, str) else None
