"""Building a bundle from ONNX towers (``pacsclip model import-onnx``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plugin.models.bundle import (
    FORMAT_VERSION,
    Bundle,
    BundleError,
    BundleFiles,
    ImageSpec,
    ModelCard,
    PromptsFile,
    TextCleaning,
    TextEncoderSpec,
    parse_manifest,
)
from plugin.models.bundle_writer import (
    add_prompt_embeddings,
    copy_pinned,
    copy_tokenizer,
    write_bundle,
)
from plugin.models.runtime import ImageEncoder, TextEncoder, embed_prompts

IMPORTED_MODEL_CARD = ModelCard(
    intended_use="Imported with `pacsclip model import-onnx`; the operator must describe the "
    "intended use here before clinical deployment.",
    training_data="Not described; the operator must fill this in.",
    limitations="Not described; the operator must fill this in.",
    not_for_clinical_use=True,
)


@dataclass(frozen=True)
class OnnxImport:
    """What ``import-onnx`` needs to build a bundle from operator-supplied ONNX towers."""

    image_tower: Path
    name: str
    version: str
    embedding_dim: int
    image: ImageSpec
    text_tower: Path | None = None
    tokenizer_dir: Path | None = None
    prompts: PromptsFile | None = None  # findings, priority and logit_scale
    model_card: ModelCard = IMPORTED_MODEL_CARD
    text_max_length: int = 77  # tokens the text tower was trained on (CLIP 77)
    text_cleaning: TextCleaning = "none"  # text_encoder.cleaning: tokenizer.json's input
    # (rows, columns) of the tower's patch_embeds, when it has them (manifest patch_grid).
    patch_grid: tuple[int, int] | None = None


def build_onnx_bundle(spec: OnnxImport, dest: Path, threads: int | None = 1) -> Bundle:
    """Copy the towers into ``dest``, check them by running them, pin them, embed the prompts.

    The towers are run once on dummy input, so a wrong tensor name, shape or embedding size
    fails here, at import, rather than on the first study.
    """
    _check_import_inputs(spec)
    dest.mkdir(parents=True, exist_ok=True)
    files = BundleFiles(image_tower=copy_pinned(spec.image_tower, dest, "image_tower.onnx"))
    text = TextEncoderSpec()
    if spec.text_tower is not None and spec.tokenizer_dir is not None:
        files, text = _copy_text_tower(spec.text_tower, spec.tokenizer_dir, dest, files)
        text = text.model_copy(
            update={"max_length": spec.text_max_length, "cleaning": spec.text_cleaning}
        )
    manifest_data: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "version": spec.version,
        "embedding_dim": spec.embedding_dim,
        "synthetic": False,
        "image": spec.image,
        "files": files,
        "text_encoder": text,
        "model_card": spec.model_card,
        **({"patch_grid": list(spec.patch_grid)} if spec.patch_grid is not None else {}),
        # findings, priority and logit_scale; without a prompts file the defaults apply
        **(spec.prompts.model_dump() if spec.prompts is not None else {}),
    }
    bundle = write_bundle(dest, parse_manifest(manifest_data, source="the import-onnx options"))
    _smoke_test_image(bundle, threads)
    if text.kind == "onnx":
        encoder = TextEncoder(bundle, threads=threads)
        encoder.encode(["chest radiograph"])
        if bundle.findings:
            bundle = add_prompt_embeddings(bundle, embed_prompts(encoder, bundle.findings))
    return bundle


def _check_import_inputs(spec: OnnxImport) -> None:
    if (spec.text_tower is None) != (spec.tokenizer_dir is None):
        raise BundleError("--text and --tokenizer go together: give both or neither")
    if spec.prompts is not None and spec.text_tower is None:
        raise BundleError(
            "findings need prompt embeddings, which import-onnx computes with the text tower: "
            "give --text and --tokenizer, or leave out --prompts"
        )
    for path in (spec.image_tower, spec.text_tower):
        if path is not None and not path.is_file():
            raise BundleError(f"{path} does not exist or is not a file")
    if spec.tokenizer_dir is not None and not (spec.tokenizer_dir / "tokenizer.json").is_file():
        raise BundleError(
            f"{spec.tokenizer_dir} has no tokenizer.json; give the folder of a Hugging Face "
            "tokenizer saved with tokenizer.save() or save_pretrained()"
        )


def _copy_text_tower(
    text_tower: Path, tokenizer_dir: Path, dest: Path, files: BundleFiles
) -> tuple[BundleFiles, TextEncoderSpec]:
    files = files.model_copy(
        update={
            "text_tower": copy_pinned(text_tower, dest, "text_tower.onnx"),
            "tokenizer": copy_tokenizer(tokenizer_dir, dest),
        }
    )
    return files, TextEncoderSpec(kind="onnx")


def _smoke_test_image(bundle: Bundle, threads: int | None) -> None:
    encoder = ImageEncoder(bundle, threads=threads)
    # Two images exercise the batch axis: a dynamic one, or the padding the encoder does
    # for a tower exported with a fixed batch size.
    pixels = np.zeros((2, *encoder.input_shape), dtype=np.float32)
    if encoder.has_patch_embeddings:
        # Checks the token count against the declared (or square) grid, here at import.
        encoder.patch_grid(encoder.encode_with_patches(pixels)[1].shape[1])
    else:
        encoder.encode(pixels)
