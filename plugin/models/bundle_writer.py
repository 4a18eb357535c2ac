"""Writing model bundles: copy files in, pin them by SHA-256, write ``bundle.json``.

Everything that produces or changes a bundle writes it through here: the importers
(:mod:`plugin.models.importers`), the demo model's packaging, quantisation, calibration and
few-shot heads. :mod:`plugin.models.bundle` reads and verifies what this module writes
(docs/model-bundle.md).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from plugin.models.bundle import (
    MANIFEST_NAME,
    Bundle,
    FileRef,
    Manifest,
    load_bundle,
    sha256_file,
)

if TYPE_CHECKING:
    from plugin.models.runtime import FloatArray, PromptEmbeddings

PROMPT_EMBEDDINGS_FILE: Final = "prompt_embeddings.npz"
TOKENIZER_DIR: Final = "tokenizer"
TOKENIZER_FILE: Final = f"{TOKENIZER_DIR}/tokenizer.json"


def pin_file(directory: Path, relative_path: str) -> FileRef:
    """A :class:`FileRef` for a file already inside ``directory``."""
    return FileRef(path=relative_path, sha256=sha256_file(directory / relative_path))


def copy_pinned(src: Path, directory: Path, relative_path: str) -> FileRef:
    """Copy ``src`` to ``relative_path`` inside the bundle in ``directory``; pin the copy."""
    (directory / relative_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, directory / relative_path)
    return pin_file(directory, relative_path)


def copy_tokenizer(tokenizer_dir: Path, directory: Path) -> FileRef:
    """Copy a Hugging Face tokenizer folder's files into ``tokenizer/``; pin its tokenizer.json."""
    (directory / TOKENIZER_DIR).mkdir(exist_ok=True)
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copyfile(item, directory / TOKENIZER_DIR / item.name)
    return pin_file(directory, TOKENIZER_FILE)


def write_prompt_embeddings(path: Path, prompts: PromptEmbeddings) -> None:
    """Write prompt_embeddings.npz with keys ``<finding>/positive`` and ``<finding>/negative``."""
    arrays: dict[str, FloatArray] = {}
    for name in prompts.positive:
        arrays[f"{name}/positive"] = np.asarray(prompts.positive[name], dtype=np.float32)
        arrays[f"{name}/negative"] = np.asarray(prompts.negative[name], dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue())


def add_prompt_embeddings(bundle: Bundle, prompts: PromptEmbeddings) -> Bundle:
    """Write the bundle's prompt_embeddings.npz, pin it in the manifest, load it again."""
    write_prompt_embeddings(bundle.directory / PROMPT_EMBEDDINGS_FILE, prompts)
    manifest = bundle.manifest
    files = manifest.files.model_copy(
        update={"prompt_embeddings": pin_file(bundle.directory, PROMPT_EMBEDDINGS_FILE)}
    )
    return write_bundle(bundle.directory, manifest.model_copy(update={"files": files}))


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``bundle.json`` (temp file + rename, so a reader never sees half a manifest)."""
    path = directory / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def write_bundle(directory: Path, manifest: Manifest) -> Bundle:
    """Write ``bundle.json`` and load the bundle back, verifying every pinned file."""
    write_manifest(directory, manifest)
    return load_bundle(directory)
