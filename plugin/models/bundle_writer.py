"""Writing model bundles: copy files in, pin them by SHA-256, write ``bundle.json``.

Everything that produces a bundle writes it through here: the importers
(:mod:`plugin.models.importers`), the demo model's packaging, quantisation, and the new versions
that fine-tuning, calibration, few-shot heads, out-of-distribution references and re-embedded
prompts make of an existing bundle (:func:`copy_bundle`, then :func:`write_bundle`).
:mod:`plugin.models.bundle` reads and verifies what this module writes (docs/model-bundle.md).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from plugin.models.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleError,
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
    """Write the bundle's prompt_embeddings.npz (``prompts``: embeddings of every finding's
    ``prompt_texts``), pin it, record each finding's ``prompts_digest``, load it again."""
    write_prompt_embeddings(bundle.directory / PROMPT_EMBEDDINGS_FILE, prompts)
    manifest = bundle.manifest
    files = manifest.files.model_copy(
        update={"prompt_embeddings": pin_file(bundle.directory, PROMPT_EMBEDDINGS_FILE)}
    )
    findings = [
        f.model_copy(update={"embedded_prompts_sha256": f.prompts_digest()})
        for f in manifest.findings
    ]
    update = {"files": files, "findings": findings}
    return write_bundle(bundle.directory, manifest.model_copy(update=update))


def copy_bundle(bundle: Bundle, dest: Path, skip: Collection[str] = ()) -> None:
    """Copy the folder of ``bundle`` to the new folder ``dest``, leaving out the paths in
    ``skip`` (relative, '/'-separated); the source is only read."""
    if dest.exists():
        raise BundleError(f"{dest} exists: a new bundle version needs a new folder")
    source = bundle.directory
    shutil.copytree(
        source,
        dest,
        ignore=lambda folder, names: [
            n for n in names if (Path(folder) / n).relative_to(source).as_posix() in skip
        ],
    )


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
