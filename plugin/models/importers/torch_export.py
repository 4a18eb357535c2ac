"""PyTorch towers to a bundle: ONNX export with the bundle's tensor names, then ``import-onnx``.

``import-hf`` and ``import-open-clip`` load weights into PyTorch modules, describe them as
:class:`TorchTowers`, and hand them here. The ONNX files are written to a scratch folder and
imported by :func:`plugin.models.importers.onnx.build_onnx_bundle`, so the run-once checks,
the prompt embedding and the pinned copy are the same code for every source format.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from plugin.models.bundle import (
    Bundle,
    BundleError,
    ImageSpec,
    ModelCard,
    PromptsFile,
    TextCleaning,
)
from plugin.models.importers.onnx import OnnxImport, build_onnx_bundle
from plugin.models.runtime import (
    ATTENTION_MASK,
    IMAGE_EMBEDS,
    INPUT_IDS,
    PATCH_EMBEDS,
    PIXEL_VALUES,
    TEXT_EMBEDS,
)

logger = logging.getLogger(__name__)

# Opset 17 has LayerNormalization as one node; onnxruntime 1.16 and later run it.
ONNX_OPSET = 17


@dataclass(frozen=True)
class TorchTowers:
    """A CLIP-style model in PyTorch, as the exporter needs it.

    ``image(pixel_values)`` and ``text(input_ids[, attention_mask])`` return embeddings [N, D]
    before L2 normalisation; ``text_length`` fixes the token sequence length for towers trained
    on padded sequences only (SigLIP), else it is dynamic up to ``max_length``. With
    ``patch_grid`` (rows, columns), ``image`` returns a pair: the embeddings and the patch tokens
    [N, rows * columns, D] in the same joint space (row-major, no class token), exported as
    ``patch_embeds``.
    """

    image: nn.Module
    text: nn.Module
    embedding_dim: int
    image_size: int
    logit_scale: float
    max_length: int
    text_uses_mask: bool = True
    text_length: int | None = None
    source: str = "a PyTorch model"  # what the model card says it was imported from
    patch_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class TorchImport:
    """The rest of what a bundle needs besides the towers."""

    name: str
    version: str
    image: ImageSpec
    tokenizer_dir: Path  # holds the tokenizer.json the text tower was trained with
    prompts: PromptsFile  # findings, priority; logit_scale when the operator set it
    text_cleaning: TextCleaning = "none"  # what the model's tokenizer did before tokenizer.json


class _Normalized(nn.Module):
    """Ends a tower with L2 normalisation, as the bundle's tensor contract says."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.tower(*inputs), dim=-1)


class _NormalizedWithPatches(nn.Module):
    """The image embeddings normalised; the patch tokens as they are (the runtime contract:
    ``patch_embeds`` are not normalised, so folding a linear adapter into them stays exact)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, patches = self.tower(pixel_values)
        return nn.functional.normalize(embeds, dim=-1), patches


def export_image_tower(towers: TorchTowers, path: Path) -> None:
    """``pixel_values`` float32 [N, 3, S, S] -> ``image_embeds`` [N, D] (and ``patch_embeds``
    [N, P, D] when the towers have a patch grid), batch axis dynamic."""
    dummy = torch.zeros(2, 3, towers.image_size, towers.image_size)
    dynamic = {PIXEL_VALUES: {0: "batch"}, IMAGE_EMBEDS: {0: "batch"}}
    if towers.patch_grid is None:
        _export(_Normalized(towers.image), (dummy,), path, [PIXEL_VALUES], [IMAGE_EMBEDS], dynamic)
        return
    dynamic[PATCH_EMBEDS] = {0: "batch"}
    _export(
        _NormalizedWithPatches(towers.image),
        (dummy,),
        path,
        [PIXEL_VALUES],
        [IMAGE_EMBEDS, PATCH_EMBEDS],
        dynamic,
    )


def export_text_tower(towers: TorchTowers, path: Path) -> None:
    """``input_ids`` (and ``attention_mask``) int64 [N, L] -> ``text_embeds`` [N, D]."""
    length = towers.text_length or min(8, towers.max_length)
    ids = torch.ones(2, length, dtype=torch.int64)
    inputs: tuple[torch.Tensor, ...] = (ids,)
    names = [INPUT_IDS]
    # A fixed-length tower keeps its sequence axis static, so the runtime pads to it.
    axes = {0: "batch"} if towers.text_length else {0: "batch", 1: "sequence"}
    dynamic = {INPUT_IDS: axes, TEXT_EMBEDS: {0: "batch"}}
    if towers.text_uses_mask:
        inputs += (torch.ones(2, length, dtype=torch.int64),)
        names.append(ATTENTION_MASK)
        dynamic[ATTENTION_MASK] = axes
    _export(_Normalized(towers.text), inputs, path, names, [TEXT_EMBEDS], dynamic)


def _export(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    module.eval()
    try:
        # The tracer warns about every Python-level shape check of the model code; the run-once
        # checks after export are what tells whether the graph works.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: the dynamo one needs onnxscript, which is not a
            # dependency, and these towers trace cleanly.
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many unrelated exception types
        raise BundleError(f"exporting {', '.join(output_names)} to ONNX failed: {exc}") from exc


def imported_model_card(source: str) -> ModelCard:
    return ModelCard(
        intended_use=f"Imported from {source}; the operator must describe the intended use "
        "here before clinical deployment.",
        training_data="Not described; the operator must fill this in from the model's own "
        "documentation.",
        limitations="Not calibrated on this site's images; the operator must fill this in.",
        not_for_clinical_use=True,
    )


def build_torch_bundle(
    towers: TorchTowers, spec: TorchImport, dest: Path, threads: int | None = 1
) -> Bundle:
    """Export both towers to ONNX and build the bundle in ``dest`` through ``import-onnx``."""
    prompts = spec.prompts
    if "logit_scale" not in prompts.model_fields_set:
        # The model's own temperature, unless the operator's prompts file sets one.
        prompts = prompts.model_copy(update={"logit_scale": towers.logit_scale})
    with tempfile.TemporaryDirectory(prefix="pacsclip-export-") as scratch:
        image_path, text_path = Path(scratch) / "image.onnx", Path(scratch) / "text.onnx"
        export_image_tower(towers, image_path)
        export_text_tower(towers, text_path)
        onnx_spec = OnnxImport(
            image_tower=image_path,
            name=spec.name,
            version=spec.version,
            embedding_dim=towers.embedding_dim,
            image=spec.image,
            text_tower=text_path,
            tokenizer_dir=spec.tokenizer_dir,
            prompts=prompts,
            model_card=imported_model_card(towers.source),
            text_max_length=towers.text_length or towers.max_length,
            text_cleaning=spec.text_cleaning,
            patch_grid=towers.patch_grid,
        )
        bundle = build_onnx_bundle(onnx_spec, dest, threads=threads)
    logger.info("imported %s from %s", bundle.ref, towers.source)
    return bundle
