"""ONNX Runtime inference for bundle towers: image and text embeddings, prompt embeddings.

Each encoder owns one ``InferenceSession``. Build it once per process (in the worker's start-up)
and pass it down; nothing here is cached in module globals.

Tensor names (docs/model-bundle.md): the image tower takes ``pixel_values`` float32 [N, C, H, W]
and gives ``image_embeds`` [N, D] and optionally ``patch_embeds`` [N, P, D]; the text tower takes
``input_ids`` int64 [N, L] (and ``attention_mask`` int64 [N, L] when it declares that input) and
gives ``text_embeds`` [N, D].
"""

from __future__ import annotations

import html
import logging
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

from plugin.errors import PacsclipError
from plugin.models.bundle import Bundle, BundleError, Finding, TextCleaning

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
PATCH_EMBEDS = "patch_embeds"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TEXT_EMBEDS = "text_embeds"

CPU_PROVIDER = "CPUExecutionProvider"
# Tried in this order when present; the CPU provider always comes last as the fallback.
ACCELERATED_PROVIDERS = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
)

_EPS = 1e-12
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPIECE_UNDERLINE = "\u2581"


class ModelRuntimeError(PacsclipError):
    """Inference could not run (provider missing, runtime failure, non-finite output)."""


def select_providers(
    requested: Sequence[str] | None = None, available: Sequence[str] | None = None
) -> list[str]:
    """Execution providers for a session: accelerators first when present, then the CPU.

    ``requested`` pins the list (each must be available); ``available`` defaults to what this
    onnxruntime build offers.
    """
    offered = list(ort.get_available_providers() if available is None else available)
    if requested is not None:
        missing = [p for p in requested if p not in offered]
        if missing or not requested:
            raise ModelRuntimeError(
                f"execution providers {missing or requested} are not available in this "
                f"onnxruntime build (available: {', '.join(offered)})"
            )
        return list(requested)
    return [p for p in ACCELERATED_PROVIDERS if p in offered] + [CPU_PROVIDER]


def open_session(
    path: Path, threads: int | None = None, providers: Sequence[str] | None = None
) -> Any:
    """One ``onnxruntime.InferenceSession``; ``threads`` None lets onnxruntime use every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    # Towers are single sequential graphs: parallelism comes from intra-op threads, and an
    # inter-op pool would only compete with it for the same cores.
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings from graph optimisation are noise in the logs
    chosen = select_providers(providers)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise BundleError(f"cannot load ONNX model {path}: {exc}") from exc
    logger.info("onnx session: %s on %s", path.name, session.get_providers()[0])
    return session


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...]
    type: str


def tensor_infos(nodes: Sequence[Any]) -> dict[str, TensorInfo]:
    """Inputs or outputs of a session by name, with their (possibly symbolic) shapes."""
    return {n.name: TensorInfo(n.name, tuple(n.shape), n.type) for n in nodes}


def l2_normalize(x: npt.ArrayLike, axis: int = -1) -> FloatArray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    array = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(array, axis=axis, keepdims=True)
    return np.asarray(array / np.maximum(norms, _EPS), dtype=np.float32)


def _require(
    infos: Mapping[str, TensorInfo], name: str, kind: str, path: Path, rank: int
) -> TensorInfo:
    info = infos.get(name)
    if info is None:
        raise BundleError(
            f"{path}: the {kind} {name!r} is missing (it has {', '.join(infos) or 'none'}); "
            f"export the model with {kind}_names containing {name!r}"
        )
    if len(info.shape) != rank:
        raise BundleError(
            f"{path}: {kind} {name!r} has shape {list(info.shape)}, expected rank {rank}"
        )
    return info


def _fixed(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_dim(path: Path, what: str, dim: int | str | None, expected: int) -> None:
    if _fixed(dim) is not None and dim != expected:
        raise BundleError(
            f"{path}: {what} is {dim} in the ONNX model but {expected} in the manifest"
        )


def _check_output_dim(path: Path, array: FloatArray, expected: int) -> None:
    if array.shape[-1] != expected:
        raise BundleError(
            f"{path} gives embeddings of size {array.shape[-1]} but embedding_dim is {expected}"
        )
    if not np.all(np.isfinite(array)):
        raise ModelRuntimeError(f"{path} produced NaN or infinite values")


def _run(session: Any, path: Path, outputs: list[str], feeds: dict[str, Any]) -> list[FloatArray]:
    try:
        results = session.run(outputs, feeds)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise ModelRuntimeError(f"inference with {path} failed: {exc}") from exc
    return [np.asarray(r, dtype=np.float32) for r in results]


def _chunks(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _pad_rows(array: npt.NDArray[Any], rows: int) -> npt.NDArray[Any]:
    """Pad along axis 0 with zeros, for towers exported with a fixed batch size."""
    if len(array) == rows:
        return array
    padding = np.zeros((rows - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding])


class ImageEncoder:
    """The bundle's image tower: pixels [N, C, H, W] in, unit-norm embeddings [N, D] out."""

    def __init__(
        self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None
    ) -> None:
        self.bundle = bundle
        self.path = bundle.image_tower_path
        self._session = open_session(self.path, threads, providers)
        image = bundle.manifest.image
        self.input_shape = (image.channels, image.size, image.size)
        inputs = tensor_infos(self._session.get_inputs())
        outputs = tensor_infos(self._session.get_outputs())
        pixels = _require(inputs, PIXEL_VALUES, "input", self.path, rank=4)
        if pixels.type != "tensor(float)":
            raise BundleError(f"{self.path}: {PIXEL_VALUES!r} is {pixels.type}; it must be float32")
        for what, dim, expected in zip(
            ("channels", "height", "width"), pixels.shape[1:], self.input_shape, strict=True
        ):
            _check_dim(self.path, f"{PIXEL_VALUES} {what}", dim, expected)
        embeds = _require(outputs, IMAGE_EMBEDS, "output", self.path, rank=2)
        _check_dim(self.path, f"{IMAGE_EMBEDS} size", embeds.shape[1], bundle.embedding_dim)
        self.has_patch_embeddings = PATCH_EMBEDS in outputs
        self._fixed_batch = _fixed(pixels.shape[0])

    def patch_grid(self, count: int) -> tuple[int, int]:
        """(rows, columns) of ``count`` patch tokens: the manifest's ``patch_grid``, checked
        against the count, else the square grid the count implies (ViTs on square inputs)."""
        declared = self.bundle.manifest.patch_grid
        if declared is not None:
            rows, cols = declared
            if rows * cols != count:
                raise BundleError(
                    f"{self.bundle.ref}: bundle.json declares a {rows}x{cols} patch grid but "
                    f"{self.path.name} gives {count} patch tokens"
                )
            return rows, cols
        side = math.isqrt(count)
        if side < 1 or side * side != count:
            raise BundleError(
                f"{self.bundle.ref}: {count} patch tokens do not form a square grid; set "
                "patch_grid [rows, columns] in bundle.json"
            )
        return side, side

    def encode(self, batch: npt.ArrayLike, batch_size: int = 16) -> FloatArray:
        """Image embeddings [N, D], L2-normalised."""
        return self._embed(batch, batch_size, [IMAGE_EMBEDS])[0]

    def patch_embeddings(self, batch: npt.ArrayLike, batch_size: int = 16) -> FloatArray:
        """Patch embeddings [N, P, D] as the tower gives them (not normalised)."""
        return self.encode_with_patches(batch, batch_size)[1]

    def encode_with_patches(
        self, batch: npt.ArrayLike, batch_size: int = 16
    ) -> tuple[FloatArray, FloatArray]:
        """Image embeddings [N, D] (normalised) and patch embeddings [N, P, D] in one pass."""
        if not self.has_patch_embeddings:
            raise ModelRuntimeError(
                f"{self.path} has no {PATCH_EMBEDS!r} output; this bundle cannot give patch "
                "embeddings (saliency needs a tower exported with one)"
            )
        embeds, patches = self._embed(batch, batch_size, [IMAGE_EMBEDS, PATCH_EMBEDS])
        return embeds, patches

    def _embed(self, batch: npt.ArrayLike, batch_size: int, names: list[str]) -> list[FloatArray]:
        pixels = self._checked_pixels(batch)
        step = self._fixed_batch or batch_size
        parts: list[list[FloatArray]] = []
        for chunk in _chunks(len(pixels), step):
            rows = chunk.stop - chunk.start
            feed = _pad_rows(pixels[chunk], self._fixed_batch or rows)
            outputs = _run(self._session, self.path, names, {PIXEL_VALUES: feed})
            parts.append([out[:rows] for out in outputs])
        results = [np.concatenate([p[i] for p in parts]) for i in range(len(names))]
        _check_output_dim(self.path, results[0], self.bundle.embedding_dim)
        # The tower is meant to normalise already; doing it again costs nothing and protects
        # cosine scores from a tower exported without its final normalisation.
        results[0] = l2_normalize(results[0])
        return results

    def _checked_pixels(self, batch: npt.ArrayLike) -> FloatArray:
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != self.input_shape:
            raise ValueError(
                f"pixels must have shape [N, {', '.join(map(str, self.input_shape))}] for "
                f"{self.bundle.ref}, got {list(pixels.shape)}"
            )
        if len(pixels) == 0:
            raise ValueError("no images to encode: the batch is empty")
        return pixels


def clean_text(text: str, cleaning: TextCleaning) -> str:
    """``text`` as the model's own tokenizer cleaned it before tokenising (manifest key
    ``text_encoder.cleaning``); tokenizer.json's normalizer runs after this.

    The ``open_clip_*`` modes are open_clip's ``_clean_lower``, ``_clean_whitespace`` and
    ``_clean_canonicalize`` (open_clip/tokenizer.py); ``siglip`` is transformers'
    ``SiglipTokenizer.canonicalize_text`` with lower-casing.
    """
    if cleaning == "none":
        return text
    if cleaning == "siglip":
        # SiglipTokenizer.tokenize turns the SentencePiece word marker into a space first.
        lowered = text.replace(_SPIECE_UNDERLINE, " ").lower()
        return re.sub(r"\s+", " ", lowered.translate(_NO_PUNCTUATION)).strip()
    cleaned = _open_clip_basic_clean(text)
    if cleaning == "open_clip_canonicalize":
        cleaned = cleaned.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    cleaned = " ".join(cleaned.split())
    return cleaned.lower() if cleaning == "open_clip_lower" else cleaned


def _open_clip_basic_clean(text: str) -> str:
    # Imported here: only open_clip-layout bundles need ftfy, and it takes 0.1 s to load.
    try:
        import ftfy
    except ImportError as exc:
        raise ModelRuntimeError(
            "the 'ftfy' package is needed to clean text as open_clip does: pip install ftfy"
        ) from exc

    # ftfy repairs mojibake and curly quotes; reports and web captions also carry HTML
    # entities, sometimes escaped twice ("&amp;amp;").
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def load_tokenizer(path: Path, max_length: int, fixed_length: int | None = None) -> Tokenizer:
    """A Hugging Face ``tokenizer.json`` with truncation and padding set for a text tower."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ModelRuntimeError(
            "the 'tokenizers' package is needed for a bundle's text tower: pip install tokenizers"
        ) from exc
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for an unreadable file
        raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc
    length = fixed_length or max_length
    tokenizer.enable_truncation(max_length=length)
    # Keep the tokenizer's own pad token when tokenizer.json sets one; the attention mask
    # hides padding from the tower either way.
    padding = tokenizer.padding or {}
    tokenizer.enable_padding(
        pad_id=int(padding.get("pad_id", 0)),
        pad_token=str(padding.get("pad_token", "[PAD]")),
        length=fixed_length,
    )
    return tokenizer


class TextEncoder:
    """The bundle's ONNX text tower with its tokenizer: texts in, unit-norm [N, D] out."""

    def __init__(
        self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None
    ) -> None:
        spec = bundle.manifest.text_encoder
        if spec.kind != "onnx" or bundle.text_tower_path is None or bundle.tokenizer_path is None:
            raise BundleError(
                f"{bundle.ref} has no ONNX text tower (text_encoder.kind is {spec.kind!r}); "
                "use its prompt_embeddings.npz, or import it with --text and --tokenizer"
            )
        self.bundle = bundle
        self.path = bundle.text_tower_path
        self._session = open_session(self.path, threads, providers)
        inputs = tensor_infos(self._session.get_inputs())
        outputs = tensor_infos(self._session.get_outputs())
        ids = _require(inputs, INPUT_IDS, "input", self.path, rank=2)
        embeds = _require(outputs, TEXT_EMBEDS, "output", self.path, rank=2)
        _check_dim(self.path, f"{TEXT_EMBEDS} size", embeds.shape[1], bundle.embedding_dim)
        self._has_mask = ATTENTION_MASK in inputs
        self._fixed_batch = _fixed(ids.shape[0])
        self._cleaning = spec.cleaning
        self._tokenizer = load_tokenizer(
            bundle.tokenizer_path, spec.max_length, _fixed(ids.shape[1])
        )

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> FloatArray:
        """Text embeddings [N, D], L2-normalised."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("texts must be a non-empty list of strings")
        step = self._fixed_batch or batch_size
        parts = [self._encode_chunk(list(texts[chunk])) for chunk in _chunks(len(texts), step)]
        embeds = np.concatenate(parts)
        _check_output_dim(self.path, embeds, self.bundle.embedding_dim)
        return l2_normalize(embeds)

    def _encode_chunk(self, texts: list[str]) -> FloatArray:
        encodings = self._tokenizer.encode_batch([clean_text(t, self._cleaning) for t in texts])
        rows = self._fixed_batch or len(texts)
        ids = _pad_rows(np.array([e.ids for e in encodings], dtype=np.int64), rows)
        feeds = {INPUT_IDS: ids}
        if self._has_mask:
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds[ATTENTION_MASK] = _pad_rows(mask, rows)
        return _run(self._session, self.path, [TEXT_EMBEDS], feeds)[0][: len(texts)]


@dataclass(frozen=True)
class PromptEmbeddings:
    """Per finding, the L2-normalised embeddings [K, D] of its positive and negative prompts."""

    positive: Mapping[str, FloatArray] = field(default_factory=dict)
    negative: Mapping[str, FloatArray] = field(default_factory=dict)

    @classmethod
    def load(cls, bundle: Bundle) -> PromptEmbeddings:
        """Read the bundle's prompt_embeddings.npz; every finding must have both sets, and
        the prompts in bundle.json must be those the embeddings were computed from."""
        path = bundle.prompt_embeddings_path
        if path is None:
            raise BundleError(
                f"{bundle.ref} has no prompt_embeddings.npz; embed its prompts with its text "
                "encoder instead"
            )
        check_prompts_embedded(bundle)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in npz.files}
        positive, negative = {}, {}
        for finding in bundle.findings:
            positive[finding.name] = _prompt_array(arrays, f"{finding.name}/positive", bundle)
            negative[finding.name] = _prompt_array(arrays, f"{finding.name}/negative", bundle)
        return cls(positive=positive, negative=negative)

    def for_finding(self, name: str) -> tuple[FloatArray, FloatArray]:
        """(positive [K, D], negative [K, D]) of one finding."""
        if name not in self.positive:
            raise KeyError(f"no prompt embeddings for finding {name!r}")
        return self.positive[name], self.negative[name]


def check_prompts_embedded(bundle: Bundle) -> None:
    """Refuse a bundle whose prompts were edited after their embeddings were written: scoring
    reads only the embeddings, so the edit would be silently ignored."""
    stale = bundle.manifest.stale_prompt_findings
    if stale:
        raise BundleError(
            f"{bundle.ref} in {bundle.directory}: the prompts of {', '.join(stale)} in "
            "bundle.json are not those prompt_embeddings.npz was computed from, and scoring "
            "reads only the embeddings. Put the prompts back as they were, or embed the edited "
            "prompts into a new version (this folder is only read): `pacsclip model "
            f"embed-prompts --bundle {bundle.directory}`"
        )


def _prompt_array(arrays: Mapping[str, npt.NDArray[Any]], key: str, bundle: Bundle) -> FloatArray:
    source = bundle.prompt_embeddings_path
    if key not in arrays:
        raise BundleError(f"{source} has no array {key!r}; re-create it for every finding")
    array = arrays[key]
    dim = bundle.embedding_dim
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] != dim:
        raise BundleError(f"{source}: {key!r} has shape {list(array.shape)}, expected [K, {dim}]")
    if not np.all(np.isfinite(array)):
        raise BundleError(f"{source}: {key!r} holds NaN or infinite values")
    return l2_normalize(array)


def embed_prompts(encoder: TextEncoder, findings: Sequence[Finding]) -> PromptEmbeddings:
    """Embed every template x prompt of every finding with a text tower."""
    positive = {f.name: encoder.encode(f.prompt_texts(positive=True)) for f in findings}
    negative = {f.name: encoder.encode(f.prompt_texts(positive=False)) for f in findings}
    return PromptEmbeddings(positive=positive, negative=negative)
