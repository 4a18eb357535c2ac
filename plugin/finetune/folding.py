"""Folding trained adapters into a bundle's own files, so a tuned bundle needs no new runtime.

- Image tower (ONNX): nodes are appended after ``image_embeds`` (normalise, ``x M^T + b``,
  normalise) and after ``patch_embeds`` (``x M^T``: the same linear map, so patch-text
  similarities stay in the tuned space); the outputs keep their names.
- Text tower (ONNX): the same after ``text_embeds``, without a bias.
- Text projection (``text_projection.npz`` of an installed-package encoder): its output layers
  are multiplied by ``M``. The projection's output is normalised afterwards, and scaling a
  vector does not change its direction, so this equals the adapter on the normalised output.
- Prompt embeddings: each unit row ``p`` becomes ``normalise(p M^T)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from plugin.finetune.errors import FinetuneError

FloatArray = npt.NDArray[np.float32]

IMAGE_EMBEDS = "image_embeds"
PATCH_EMBEDS = "patch_embeds"
TEXT_EMBEDS = "text_embeds"


@dataclass(frozen=True)
class Affine:
    """``x -> x matrix^T + bias`` on embeddings of size D (``matrix`` is [D, D])."""

    matrix: FloatArray
    bias: FloatArray | None = None

    def apply(self, x: npt.ArrayLike) -> FloatArray:
        """The adapter on unit rows: ``normalise(normalise(x) M^T + b)`` (float64 inside)."""
        unit = _normalise(np.asarray(x, dtype=np.float64))
        out = unit @ self.matrix.astype(np.float64).T
        if self.bias is not None:
            out = out + self.bias
        return _normalise(out).astype(np.float32)


def _normalise(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = x / np.maximum(
        np.linalg.norm(x, axis=-1, keepdims=True), 1e-12
    )
    return result


def fold_into_image_tower(src: Path, dst: Path, adapter: Affine) -> None:
    """Write ``dst``: the tower in ``src`` with the adapter appended to its outputs."""
    model = _load(src)
    outputs = {o.name for o in model.graph.output}
    if IMAGE_EMBEDS not in outputs:
        raise FinetuneError(f"{src} has no {IMAGE_EMBEDS!r} output: it is not a bundle image tower")
    _append(model, IMAGE_EMBEDS, adapter, normalise=True)
    if PATCH_EMBEDS in outputs:
        _append(model, PATCH_EMBEDS, Affine(adapter.matrix), normalise=False)
    _save(model, dst)


def fold_into_text_tower(src: Path, dst: Path, adapter: Affine) -> None:
    """Write ``dst``: the ONNX text tower in ``src`` with the adapter after ``text_embeds``."""
    model = _load(src)
    if TEXT_EMBEDS not in {o.name for o in model.graph.output}:
        raise FinetuneError(f"{src} has no {TEXT_EMBEDS!r} output: it is not a bundle text tower")
    _append(model, TEXT_EMBEDS, adapter, normalise=True)
    _save(model, dst)


def fold_into_projection(arrays: Mapping[str, npt.ArrayLike], adapter: Affine) -> dict[str, Any]:
    """The demo projection's arrays with its output layers multiplied by the adapter matrix."""
    if adapter.bias is not None:
        raise FinetuneError("a text adapter has no bias: the projection output is rescaled")
    matrix = adapter.matrix.astype(np.float64)
    # Other entries (a format tag, the hidden layer) stay as they are.
    folded: dict[str, Any] = {key: np.asarray(value) for key, value in arrays.items()}
    for key in ("linear_weight", "out_weight"):
        folded[key] = (matrix @ np.asarray(arrays[key], dtype=np.float64)).astype(np.float32)
    folded["out_bias"] = (np.asarray(arrays["out_bias"], dtype=np.float64) @ matrix.T).astype(
        np.float32
    )
    return folded


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as exc:
        raise FinetuneError(f"cannot read ONNX model {path}: {exc}") from exc


def _save(model: onnx.ModelProto, dst: Path) -> None:
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _unused(model: onnx.ModelProto, base: str) -> str:
    """A tensor name not yet in the graph (a tuned tower may be tuned again)."""
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {init.name for init in model.graph.initializer}
    k = 1
    while any(name == f"{base}_{k}" or name.startswith(f"{base}_{k}/") for name in taken):
        k += 1
    return f"{base}_{k}"


def _append(model: onnx.ModelProto, output: str, adapter: Affine, normalise: bool) -> None:
    """Route ``output`` through ``[normalise] -> x M^T (+ b) -> [normalise]``, keeping its name."""
    graph = model.graph
    parent = _unused(model, f"{output}/parent")
    for node in graph.node:
        node.output[:] = [parent if name == output else name for name in node.output]
        node.input[:] = [parent if name == output else name for name in node.input]
    prefix = _unused(model, f"{output}/finetune")
    weight = numpy_helper.from_array(adapter.matrix.T.astype(np.float32), f"{prefix}/weight")
    graph.initializer.append(weight)
    nodes = []
    current = parent
    if normalise:
        nodes.append(
            helper.make_node("LpNormalization", [current], [f"{prefix}/unit_in"], axis=-1, p=2)
        )
        current = f"{prefix}/unit_in"
    last = output if not normalise and adapter.bias is None else f"{prefix}/linear"
    nodes.append(helper.make_node("MatMul", [current, weight.name], [last]))
    current = last
    if adapter.bias is not None:
        bias = numpy_helper.from_array(adapter.bias.astype(np.float32), f"{prefix}/bias")
        graph.initializer.append(bias)
        last = output if not normalise else f"{prefix}/shifted"
        nodes.append(helper.make_node("Add", [current, bias.name], [last]))
        current = last
    if normalise:
        nodes.append(helper.make_node("LpNormalization", [current], [output], axis=-1, p=2))
    graph.node.extend(nodes)
