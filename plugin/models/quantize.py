"""int8 dynamic quantisation of a bundle's towers, with the parity it costs measured.

Dynamic quantisation stores weights as int8 and quantises activations on the fly; it needs
no calibration images. What it loses is reported as the cosine between the fp32 and int8
embeddings of the same inputs, so an operator can decide whether to use it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from onnxruntime.quantization import (  # type: ignore[import-untyped]
    QuantType,
    quantize_dynamic,
)

from plugin.models.bundle import Bundle, load_bundle
from plugin.models.bundle_writer import pin_file, write_bundle
from plugin.models.runtime import ImageEncoder

INT8_SUFFIX = "-int8"


@dataclass(frozen=True)
class Parity:
    mean_cosine: float
    min_cosine: float
    samples: int


def embedding_parity(a: NDArray[np.float32], b: NDArray[np.float32]) -> Parity:
    """Cosine between matching rows of two L2-normalised embedding matrices."""
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return Parity(float(cosines.mean()), float(cosines.min()), len(cosines))


def probe_inputs(bundle: Bundle, count: int = 16, seed: int = 0) -> NDArray[np.float32]:
    """Random images in the tower's normalised input range."""
    spec = bundle.manifest.image
    rng = np.random.default_rng(seed)
    pixels = rng.random((count, spec.channels, spec.size, spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


def quantize_bundle(src: Path, dest: Path, *, threads: int | None = 1) -> tuple[Bundle, Parity]:
    """Write an int8 copy of the bundle in ``src`` to ``dest`` (version + "-int8")."""
    original = load_bundle(src)
    if dest.exists():
        raise FileExistsError(f"{dest} exists: choose an empty destination")
    shutil.copytree(src, dest)
    tower = dest / original.manifest.files.image_tower.path
    quantize_dynamic(
        src / original.manifest.files.image_tower.path, tower, weight_type=QuantType.QInt8
    )
    files = original.manifest.files.model_copy(
        update={"image_tower": pin_file(dest, original.manifest.files.image_tower.path)}
    )
    manifest = original.manifest.model_copy(
        update={"version": original.version + INT8_SUFFIX, "files": files}
    )
    quantized = write_bundle(dest, manifest)
    probe = probe_inputs(original)
    parity = embedding_parity(
        ImageEncoder(original, threads=threads).encode(probe),
        ImageEncoder(quantized, threads=threads).encode(probe),
    )
    return quantized, parity
