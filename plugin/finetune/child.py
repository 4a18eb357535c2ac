"""Writing the tuned bundle: the parent's files with the adapters folded in, a new version.

Everything the runtime reads keeps its format: the image tower and an ONNX text tower gain a few
nodes, ``text_projection.npz`` and ``prompt_embeddings.npz`` are rewritten, and ``bundle.json``
gets a new version, re-pinned files and a ``lineage`` entry. What was fitted on the parent's
outputs (heads, fitted calibration, the out-of-distribution reference) no longer describes the
tuned model, so it is left out, and the lineage says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plugin.finetune.adapters import TrainedAdapters
from plugin.finetune.errors import FinetuneError
from plugin.finetune.folding import (
    Affine,
    fold_into_image_tower,
    fold_into_projection,
    fold_into_text_tower,
)
from plugin.models.bundle import Bundle, Calibration, Finding, Lineage, Manifest
from plugin.models.bundle_writer import (
    copy_bundle,
    pin_file,
    write_bundle,
    write_prompt_embeddings,
)
from plugin.models.runtime import PromptEmbeddings

# Reports of an earlier fine-tuning sit beside the bundle they describe; a child gets its own.
EVAL_JSON = "finetune-eval.json"
EVAL_TEXT = "finetune-eval.txt"


def is_identity(adapter: Affine) -> bool:
    eye = np.eye(adapter.matrix.shape[0], dtype=np.float32)
    return adapter.bias is None and bool(np.array_equal(adapter.matrix, eye))


def write_tuned_bundle(
    parent: Bundle,
    dest: Path,
    *,
    name: str,
    version: str,
    adapters: TrainedAdapters,
    lineage: Lineage,
) -> Bundle:
    """Write the tuned copy of ``parent`` into the new folder ``dest`` and load it back."""
    if dest.exists():
        raise FinetuneError(f"{dest} exists: the tuned bundle needs a new folder")
    m = parent.manifest
    skipped = {"bundle.json", "heads", EVAL_JSON, EVAL_TEXT}
    if m.ood is not None:
        skipped.add(m.ood.file.path)
    copy_bundle(parent, dest, skipped)
    files = m.files
    if not is_identity(adapters.image):
        fold_into_image_tower(
            parent.image_tower_path, dest / files.image_tower.path, adapters.image
        )
    updates: dict[str, object] = {"image_tower": pin_file(dest, files.image_tower.path)}
    text_encoder = m.text_encoder
    if m.text_encoder.kind == "onnx" and files.text_tower is not None:
        fold_into_text_tower(
            parent.path_of(files.text_tower), dest / files.text_tower.path, adapters.text
        )
        updates["text_tower"] = pin_file(dest, files.text_tower.path)
    elif m.text_encoder.projection is not None:
        _fold_projection(parent, dest, m.text_encoder.projection.path, adapters.text)
        text_encoder = text_encoder.model_copy(
            update={"projection": pin_file(dest, m.text_encoder.projection.path)}
        )
    if files.prompt_embeddings is not None:
        prompts = PromptEmbeddings.load(parent)
        tuned = PromptEmbeddings(
            positive={k: adapters.text.apply(v) for k, v in prompts.positive.items()},
            negative={k: adapters.text.apply(v) for k, v in prompts.negative.items()},
        )
        write_prompt_embeddings(dest / files.prompt_embeddings.path, tuned)
        updates["prompt_embeddings"] = pin_file(dest, files.prompt_embeddings.path)
    findings, dropped = _carried_over(m)
    card = m.model_card
    manifest = m.model_copy(
        update={
            "name": name,
            "version": version,
            "files": files.model_copy(update=updates),
            "text_encoder": text_encoder,
            "findings": findings,
            "heads": [],
            "active_head": None,
            "ood": None,
            "lineage": lineage.model_copy(update={"dropped": dropped}),
            "model_card": card.model_copy(
                update={
                    "training_data": f"{card.training_data} Fine-tuned from {m.ref} "
                    f"({lineage.method}) on {lineage.data}."
                }
            ),
        }
    )
    # Validated as a whole: model_copy does not re-run the manifest's checks.
    return write_bundle(dest, Manifest.model_validate(manifest.model_dump()))


def _fold_projection(parent: Bundle, dest: Path, relative: str, adapter: Affine) -> None:
    with np.load(parent.directory / relative, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    np.savez(dest / relative, **fold_into_projection(arrays, adapter))


def _carried_over(m: Manifest) -> tuple[list[Finding], list[str]]:
    """The findings with fitted calibrations reset, and a note per part left behind."""
    dropped = []
    if m.heads:
        labels = ", ".join(f"{h.name}-v{h.version}" for h in m.heads)
        dropped.append(
            f"heads {labels}: fitted on the parent's embeddings; fit them again on this bundle "
            "with `pacsclip model fit-head`"
        )
    fitted = [f.name for f in m.findings if f.calibration.fitted_on is not None]
    if fitted:
        dropped.append(
            f"calibration of {', '.join(fitted)}: fitted on the parent's scores, reset to the "
            "defaults; run `pacsclip model calibrate` on this bundle"
        )
    if m.ood is not None:
        dropped.append(
            "ood reference: it describes the parent's image embeddings; fit it again for this "
            "bundle"
        )
    findings = [
        f.model_copy(
            update={"calibration": Calibration(indeterminate_band=f.calibration.indeterminate_band)}
        )
        if f.calibration.fitted_on is not None
        else f
        for f in m.findings
    ]
    return findings, dropped
