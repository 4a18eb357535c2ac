"""Image-tower inference, side by side: PyTorch eager, onnxruntime fp32, onnxruntime int8.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/inference.py [--seconds 3] [--threads 2] [--model demo|vit-b16|all]
                                         [--json]

``--model vit-b16`` (in ``all``, the default) adds a tower of real size: a ViT-B/16 CLIP as
large as BiomedCLIP's image tower, fp32 and int8, with and without patch-token maps
(``tests/benchmarks/inference_vit.py`` says exactly what it runs).

The tower is the demo bundle's architecture (``plugin.demo.train.ImageTower``, 128x128x1 in,
128-d out). The bundle keeps only the ONNX export, not the trained torch weights, so the tower
is built with ``torch.manual_seed(0)``, exported with ``plugin.demo.train.export_image_tower``
and quantised with ``plugin.models.quantize.quantize_bundle`` (dynamic int8), as a bundle is:
all three engines run the same weights on the same 32 rendered phantoms. Each engine runs in
its own fresh Python process, so one engine's imports and freed memory do not count against
another, with the same number of threads (torch.set_num_threads, onnxruntime
intra_op_num_threads through the runtime's own ``open_session``).

PyTorch eager runs twice, once with OpenMP's default wait policy and once with
OMP_WAIT_POLICY=PASSIVE (what pacsclip's training sets); ratios are taken against the faster
of the two at each batch size, so they are conservative.

Printed per engine: images/s at batch 1 and 16 (batch size / median call time after a
warm-up, so a busy neighbour's bursts move it less than a mean), the process's peak RSS and
how much loading and running the model added to it (peak RSS minus RSS after the imports,
from /proc/self/status), the speed ratios, and parity with PyTorch eager (largest absolute
difference and smallest cosine between the embeddings of the same images). Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

# Run as a script, this file's folder is on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.benchmarks import inference_vit  # noqa: E402  (needs the root on sys.path)

TORCH, TORCH_PASSIVE = "pytorch-eager", "pytorch-eager-passive"
ORT_FP32, ORT_INT8 = "onnxruntime-fp32", "onnxruntime-int8"
ENGINES = (TORCH, TORCH_PASSIVE, ORT_FP32, ORT_INT8)
TORCH_ENGINES = (TORCH, TORCH_PASSIVE)
BATCHES = (1, 16)
N_IMAGES = 32
TARGET_RATIO = 1.5  # onnxruntime fp32 against PyTorch eager
FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class EngineResult:
    engine: str
    images_per_s: dict[str, float]  # by batch size, as a string (JSON keys)
    peak_rss_mib: float
    model_rss_mib: float  # peak RSS minus RSS after the imports
    model_file_mib: float | None


@dataclass(frozen=True)
class ParityResult:
    engine: str
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float


# --------------------------------------------------------------------------- parent


def prepare(workdir: Path) -> dict[str, Path]:
    """Inputs, torch weights, the fp32 ONNX bundle and its int8 copy, all under ``workdir``."""
    import torch

    from plugin.demo import train
    from plugin.models.bundle import read_manifest
    from plugin.models.bundle_writer import pin_file, write_manifest
    from plugin.models.quantize import quantize_bundle
    from plugin.models.registry import DEMO_BUNDLE_DIR

    config = train.DemoConfig()
    cases = train.render_cases(N_IMAGES, seed=0, stream=train.STREAM_EVAL, size=config.image_size)
    np.save(workdir / "inputs.npy", train.model_inputs(cases.images))

    torch.manual_seed(0)
    tower = train.ImageTower(config.embedding_dim, config.width, config.image_size).eval()
    torch.save(tower.state_dict(), workdir / "tower.pt")

    # The built-in bundle with its tower swapped for this one, so quantize_bundle can run on it.
    fp32 = workdir / "fp32"
    shutil.copytree(DEMO_BUNDLE_DIR, fp32)
    train.export_image_tower(tower, fp32 / train.IMAGE_TOWER_FILE, config.image_size)
    manifest = read_manifest(fp32)
    files = manifest.files.model_copy(
        update={"image_tower": pin_file(fp32, manifest.files.image_tower.path)}
    )
    write_manifest(fp32, manifest.model_copy(update={"files": files}))
    int8, parity = quantize_bundle(fp32, workdir / "int8")
    print(
        f"quantize_bundle: cosine to fp32 mean {parity.mean_cosine:.5f}, min "
        f"{parity.min_cosine:.5f} over {parity.samples} random inputs",
        file=sys.stderr,
    )
    return {ORT_FP32: fp32 / train.IMAGE_TOWER_FILE, ORT_INT8: int8.image_tower_path}


def run_engine(engine: str, workdir: Path, threads: int, seconds: float) -> EngineResult:
    command = [
        sys.executable,
        __file__,
        *("--child", engine, "--workdir", str(workdir)),
        *("--threads", str(threads), "--seconds", str(seconds)),
    ]
    # OpenMP's wait policy is read when torch loads. Left unset (libgomp spins a while, then
    # sleeps), torch's per-operator wake-ups are cheap; PASSIVE, which pacsclip's training sets
    # so idle threads do not steal a shared machine's cores, made batch 1 about 2x slower here.
    # Both are measured; onnxruntime uses its own thread pool and ignores it.
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if engine == TORCH_PASSIVE:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return EngineResult(**data)


def parity(workdir: Path, engine: str) -> ParityResult:
    reference = np.load(workdir / f"{TORCH}.npy").astype(np.float64)
    other = np.load(workdir / f"{engine}.npy").astype(np.float64)
    cosine = np.sum(reference * other, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    )
    return ParityResult(
        engine,
        float(np.abs(reference - other).max()),
        float(cosine.min()),
        float(cosine.mean()),
    )


def format_table(
    results: Sequence[EngineResult], parities: Sequence[ParityResult], threads: int
) -> str:
    # The reference is the faster PyTorch eager run at each batch size: a conservative ratio.
    reference = {
        str(b): max(r.images_per_s[str(b)] for r in results if r.engine in TORCH_ENGINES)
        for b in BATCHES
    }
    by_engine = {p.engine: p for p in parities}
    lines = [
        f"image tower 128x128x1 -> 128 (demo architecture, seeded weights), {threads} threads, "
        f"{N_IMAGES} rendered phantoms",
        "x eager: images/s over the faster PyTorch eager run (OMP default or passive)",
        f"{'engine':<22}{'b1 img/s':>10}{'b16 img/s':>11}{'x eager b1':>12}{'x eager b16':>13}"
        f"{'peak RSS MiB':>14}{'model MiB':>11}{'file MiB':>10}{'max|d|':>10}{'min cos':>10}",
    ]
    for r in results:
        p = by_engine.get(r.engine)
        ratios = [r.images_per_s[str(b)] / reference[str(b)] for b in BATCHES]
        file_mib = f"{r.model_file_mib:.2f}" if r.model_file_mib is not None else "-"
        lines.append(
            f"{r.engine:<22}{r.images_per_s['1']:>10.1f}{r.images_per_s['16']:>11.1f}"
            f"{ratios[0]:>12.2f}{ratios[1]:>13.2f}{r.peak_rss_mib:>14.1f}{r.model_rss_mib:>11.1f}"
            f"{file_mib:>10}"
            + (f"{p.max_abs_diff:>10.2e}{p.min_cosine:>10.6f}" if p else f"{'-':>10}{'-':>10}")
        )
    fp32 = next(r for r in results if r.engine == ORT_FP32)
    for b in BATCHES:
        ratio = fp32.images_per_s[str(b)] / reference[str(b)]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        lines.append(
            f"onnxruntime fp32 / best PyTorch eager at batch {b}: {ratio:.2f}x "
            f"(target >= {TARGET_RATIO}x: {verdict})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--model", choices=("demo", "vit-b16", "all"), default="all")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--vit-child", choices=("fp32", "int8"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.workdir, args.threads, args.seconds)
    if args.vit_child is not None:
        return inference_vit.child(args.vit_child, args.workdir, args.threads, args.seconds)
    if args.model in ("demo", "all"):
        demo(args)
    if args.model in ("vit-b16", "all"):
        with tempfile.TemporaryDirectory(prefix="pacsclip-bench-vit-") as tmp:
            vit = inference_vit.run(Path(tmp), args.threads, args.seconds)
        if args.json:
            print(json.dumps({"threads": args.threads, "vit_b16": [asdict(r) for r in vit]}))
        else:
            print(inference_vit.format_table(vit, args.threads))
    return 0


def demo(args: argparse.Namespace) -> None:
    """The demo tower in PyTorch eager, onnxruntime fp32 and int8."""
    with tempfile.TemporaryDirectory(prefix="pacsclip-bench-") as tmp:
        workdir = Path(tmp)
        prepare(workdir)
        results = [run_engine(e, workdir, args.threads, args.seconds) for e in ENGINES]
        parities = [parity(workdir, e) for e in ENGINES if e != TORCH]
    if args.json:
        print(
            json.dumps(
                {
                    "threads": args.threads,
                    "engines": [asdict(r) for r in results],
                    "parity_vs_pytorch_eager": [asdict(p) for p in parities],
                },
                indent=2,
            )
        )
    else:
        print(format_table(results, parities, args.threads))


# --------------------------------------------------------------------------- child


def child(engine: str, workdir: Path, threads: int, seconds: float) -> int:
    """Load one engine, save its embeddings of the inputs, time it; print one JSON line."""
    pixels: FloatArray = np.load(workdir / "inputs.npy")
    model_file: Path | None = None
    run: Callable[[FloatArray], FloatArray]
    if engine in TORCH_ENGINES:
        import torch

        from plugin.demo.train import DemoConfig, ImageTower

        torch.set_num_threads(threads)
        baseline = _status_kib("VmRSS")
        config = DemoConfig()
        tower = ImageTower(config.embedding_dim, config.width, config.image_size)
        tower.load_state_dict(torch.load(workdir / "tower.pt"))
        tower.eval()

        def run(batch: FloatArray) -> FloatArray:
            with torch.inference_mode():
                result: FloatArray = tower(torch.from_numpy(batch)).numpy()
            return result

    else:
        from plugin.models.runtime import open_session

        baseline = _status_kib("VmRSS")
        model_file = workdir / ("fp32" if engine == ORT_FP32 else "int8") / "image_tower.onnx"
        session = open_session(model_file, threads)

        def run(batch: FloatArray) -> FloatArray:
            result: FloatArray = session.run(["image_embeds"], {"pixel_values": batch})[0]
            return result

    embeds = np.concatenate([run(pixels[i : i + 16]) for i in range(0, len(pixels), 16)])
    np.save(workdir / f"{engine}.npy", embeds)
    speeds = {str(b): images_per_second(run, pixels[:b], seconds) for b in BATCHES}
    peak = _status_kib("VmHWM")
    result = EngineResult(
        engine=engine,
        images_per_s=speeds,
        peak_rss_mib=peak / 1024,
        model_rss_mib=(peak - baseline) / 1024,
        model_file_mib=None if model_file is None else model_file.stat().st_size / 2**20,
    )
    print(json.dumps(asdict(result)))
    return 0


def images_per_second(
    run: Callable[[FloatArray], FloatArray], batch: FloatArray, seconds: float
) -> float:
    for _ in range(5):  # warm-up: first calls allocate buffers and pick kernels
        run(batch)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 10:
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB.

    VmHWM is the peak RSS of this process image. getrusage's ru_maxrss would not do: Linux
    keeps it across exec, so a child would report its parent's peak if that was higher.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


if __name__ == "__main__":
    raise SystemExit(main())
