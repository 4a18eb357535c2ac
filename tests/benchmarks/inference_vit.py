"""A real-size image tower for ``tests/benchmarks/inference.py``: ViT-B/16 CLIP, fp32 and int8.

The model has BiomedCLIP's image tower size: ViT-B/16 at 224 x 224 (12 layers, width 768, 12
heads, MLP 3072, 196 patches), joint space 512. It is a transformers ``CLIPModel`` with random
weights (``torch.manual_seed(0)``), built offline from a ``CLIPConfig`` and a byte-level CLIP
tokenizer, saved with ``save_pretrained`` and imported with ``pacsclip model import-hf``'s code
(so the tower exports ``patch_embeds``), then quantised with ``pacsclip model quantize``'s code
(dynamic int8). Its text tower is CLIP ViT-B/16's (width 512, 12 layers); only the image tower
is timed.

Each engine (fp32, int8) runs in a fresh process with the runtime's own ``ImageEncoder`` and
the given threads. Timed per image, at batch 1 and 8, after a warm-up: the median and the fastest
of repeated calls (the fastest is the better estimate when other work shares the cores):

- ``embeds``: ``encode`` (the image embedding only);
- ``embeds + map``: ``encode_with_patches`` and one finding's patch-similarity map
  (``plugin.triage.patch_maps.finding_map``) per image on a 224 x 224 original;
- one map alone onto RG1's pixel grid (1955 x 1841), the size a chest radiograph has.

The two are called in turn, so that a busy neighbour slows both alike.

Random weights say nothing about accuracy: these are speed figures only.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

BATCHES = (1, 8)
RG1_SHAPE = (1955, 1841)
FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class VitResult:
    engine: str
    ms_per_image: dict[str, float]  # "embeds b1", "embeds+map b8", ...: median
    best_ms_per_image: dict[str, float]  # the fastest call of each
    map_rg1_ms: float
    file_mib: float
    cosine_to_fp32: float | None = None


def build_bundles(workdir: Path) -> dict[str, Path]:
    """The ViT-B/16 CLIP folder, its imported bundle and the int8 copy, under ``workdir``."""
    import torch
    import transformers

    from plugin.models.importers.hf import HfImport, build_hf_bundle
    from plugin.models.quantize import quantize_bundle
    from tests.open_clip_reference import clip_tokenizer

    folder = workdir / "vit-b16-clip"
    folder.mkdir()
    tokenizer = clip_tokenizer(folder)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer.get_vocab()),
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=512,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    started = time.perf_counter()
    build_hf_bundle(HfImport(folder=folder, name="vit-b16", version="1"), workdir / "fp32")
    imported = time.perf_counter()
    _, parity = quantize_bundle(workdir / "fp32", workdir / "int8", threads=2)
    print(
        f"ViT-B/16: import-hf {imported - started:.0f} s, quantize "
        f"{time.perf_counter() - imported:.0f} s, int8 cosine to fp32 mean "
        f"{parity.mean_cosine:.5f} min {parity.min_cosine:.5f} over {parity.samples} inputs",
        file=sys.stderr,
    )
    return {"fp32": workdir / "fp32", "int8": workdir / "int8"}


def run(workdir: Path, threads: int, seconds: float) -> list[VitResult]:
    bundles = build_bundles(workdir)
    results = []
    for engine, bundle in bundles.items():
        command = [
            sys.executable,
            str(Path(__file__).resolve().parent / "inference.py"),
            *("--vit-child", engine, "--workdir", str(bundle)),
            *("--threads", str(threads), "--seconds", str(seconds)),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ViT-B/16 {engine} failed:\n{done.stderr}")
        results.append(VitResult(**json.loads(done.stdout.strip().splitlines()[-1])))
    fp32, int8 = (np.load(workdir / e / "probe_embeds.npy") for e in bundles)
    cosine = float(np.min(np.sum(fp32 * int8, axis=1)))
    return [results[0], VitResult(**{**asdict(results[1]), "cosine_to_fp32": cosine})]


def child(engine: str, bundle_dir: Path, threads: int, seconds: float) -> int:
    """Time one bundle's image tower; print one JSON line."""
    from plugin.imaging import ImageSpec
    from plugin.models.bundle import load_bundle
    from plugin.models.quantize import probe_inputs
    from plugin.models.runtime import ImageEncoder, PromptEmbeddings
    from plugin.triage import FindingPrompts
    from plugin.triage.patch_maps import finding_map

    bundle = load_bundle(bundle_dir)
    encoder = ImageEncoder(bundle, threads=threads)
    spec = ImageSpec.from_manifest(bundle.manifest.image.model_dump())
    finding = bundle.findings[0]
    prompts = FindingPrompts.from_prompt_sets(
        finding.name, *PromptEmbeddings.load(bundle).for_finding(finding.name)
    )
    pixels = probe_inputs(bundle, count=8, seed=1)
    np.save(bundle_dir / "probe_embeds.npy", encoder.encode(pixels))

    def with_map(batch: FloatArray) -> None:
        _, patches = encoder.encode_with_patches(batch)
        grid = encoder.patch_grid(patches.shape[1])
        for tokens in patches:
            finding_map(tokens, grid, prompts, (spec.size, spec.size), spec)

    timings: dict[str, float] = {}
    best: dict[str, float] = {}
    for b in BATCHES:
        # Interleaved, so that a busy neighbour slows both alike and the difference stays.
        plain, mapped = _interleaved(
            [lambda x: encoder.encode(x), with_map], pixels[:b], 2 * seconds
        )
        timings[f"embeds b{b}"], best[f"embeds b{b}"] = plain
        timings[f"embeds+map b{b}"], best[f"embeds+map b{b}"] = mapped
    _, patches = encoder.encode_with_patches(pixels[:1])
    grid = encoder.patch_grid(patches.shape[1])
    [(rg1_map, _)] = _interleaved(
        [lambda _: finding_map(patches[0], grid, prompts, RG1_SHAPE, spec)], pixels[:1], 1.0
    )
    result = VitResult(
        engine=engine,
        ms_per_image=timings,
        best_ms_per_image=best,
        map_rg1_ms=rg1_map,
        file_mib=bundle.image_tower_path.stat().st_size / 2**20,
    )
    print(json.dumps(asdict(result)))
    return 0


def _interleaved(
    runs: list[Callable[[FloatArray], object]], batch: FloatArray, seconds: float
) -> list[tuple[float, float]]:
    """(median, fastest) ms per image of each callable, called in turn for ``seconds``."""
    for run in runs:  # warm-up: first calls allocate buffers and pick kernels
        run(batch)
        run(batch)
    times: list[list[float]] = [[] for _ in runs]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[0]) < 7:
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run(batch)
            spent.append(time.perf_counter() - start)
    scale = 1000.0 / len(batch)
    return [(scale * statistics.median(spent), scale * min(spent)) for spent in times]


def format_table(results: list[VitResult], threads: int) -> str:
    keys = [f"{kind} b{b}" for b in BATCHES for kind in ("embeds", "embeds+map")]
    lines = [
        f"ViT-B/16 CLIP image tower (224 x 224, 196 patches, D 512; random weights, imported "
        f"with import-hf), {threads} threads, ms per image: median / fastest call",
        f"{'engine':<8}" + "".join(f"{k:>18}" for k in keys) + f"{'map on RG1':>12}"
        f"{'file MiB':>10}{'min cos':>10}",
    ]
    for r in results:
        cos = "-" if r.cosine_to_fp32 is None else f"{r.cosine_to_fp32:.5f}"
        lines.append(
            f"{r.engine:<8}"
            + "".join(
                f"{f'{r.ms_per_image[k]:.0f} / {r.best_ms_per_image[k]:.0f}':>18}" for k in keys
            )
            + f"{r.map_rg1_ms:>12.1f}{r.file_mib:>10.1f}{cos:>10}"
        )
    return "\n".join(lines)
