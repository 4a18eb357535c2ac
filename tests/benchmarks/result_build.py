"""Time the analysis "build" and "write" steps of one RG1 study, in process, without a PACS.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/result_build.py [--repeats 7] [--json]

The worker's own path: the demo model (``demo_model="live"``, out-of-distribution guard off as
in tests/benchmarks/e2e.py) triages RG1 (the real chest radiograph, 1955 x 1841), then the
build step of ``StudyAnalyser.analyse`` makes the SR, one overlay per heat map (three) and the
SEG. Figures: ``build_s`` (that step), ``encode_s`` (the objects to bytes, as the write step
does, without its fsync) and ``render_one_overlay_s`` (the pixels of one overlay). Two
heat-map cases:

- ``demo``: the demo model's own occlusion maps (a small hot area);
- ``broad``: the same findings with maps hot over about 60 % of the image, as the random
  ViT-B/16 of tests/benchmarks/e2e.py gives (the overlay's colouring grows with the hot area).

Each figure is the median of ``--repeats`` runs after one warm-up. The machine's load moves
absolute numbers; compare figures from the same run or the same quiet machine. Not a pytest
test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from plugin.analysis import StudyAnalyser  # noqa: E402
from plugin.inference import TriageReport  # noqa: E402
from plugin.results import overlay  # noqa: E402
from plugin.settings import Settings  # noqa: E402
from tests.peers.data import rg1  # noqa: E402
from worker.tasks import WorkerContext  # noqa: E402


def broad_heatmap(shape: tuple[int, int], seed: int) -> npt.NDArray[np.float32]:
    """A smooth map in [0, 1] above the overlay's floor over about 60 % of the image."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((14, 14)).astype(np.float32)
    rows = np.linspace(0, 13, shape[0])
    cols = np.linspace(0, 13, shape[1])
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, 13), np.minimum(c0 + 1, 13)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c1] * fc
    bottom = coarse[r1][:, c0] * (1 - fc) + coarse[r1][:, c1] * fc
    smooth = top * (1 - fr) + bottom * fr
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    # Shifted so that 40 % of the image lies under the overlay's floor.
    floor = float(np.quantile(smooth, 0.4))
    heat: npt.NDArray[np.float32] = np.clip(smooth - floor + overlay.HEAT_FLOOR, 0.0, 1.0)
    return heat.astype(np.float32)


def with_broad_maps(report: TriageReport, shape: tuple[int, int]) -> TriageReport:
    maps = [replace(s, heatmap=broad_heatmap(shape, n)) for n, s in enumerate(report.saliency)]
    return replace(report, saliency=maps)


def median_s(action: Callable[[], object], repeats: int) -> float:
    action()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def encode_all(built: list[Any]) -> None:
    for obj in built:
        obj.dataset.save_as(BytesIO(), enforce_file_format=True)


def build(analyser: StudyAnalyser, source: pydicom.Dataset, report: TriageReport) -> list[Any]:
    """What the worker's build step does (`StudyAnalyser.analyse`)."""
    result = analyser._study_result(report, [source])
    return analyser._build([source], report, result, 1, None)


def measure(
    analyser: StudyAnalyser, source: pydicom.Dataset, report: TriageReport, repeats: int
) -> dict[str, float]:
    built = build(analyser, source, report)
    kinds = [obj.kind for obj in built]
    figures = {
        "build_s": median_s(lambda: build(analyser, source, report), repeats),
        "encode_s": median_s(lambda: encode_all(built), repeats),
        "objects": float(len(built)),
        "overlays": float(kinds.count("SC")),
        "hot_fraction": float(
            np.mean([(s.heatmap > overlay.HEAT_FLOOR).mean() for s in report.saliency])
        ),
    }
    display = report.displays[str(source.SOPInstanceUID)]
    result = analyser._study_result(report, [source])
    findings = {f.name: f for f in result.findings}
    first = report.saliency[0]
    figures["render_one_overlay_s"] = median_s(
        lambda: overlay.render_overlay(display, first.heatmap, result, findings[first.finding]),
        repeats,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    source = pydicom.dcmread(rg1("uncompressed"))
    with tempfile.TemporaryDirectory() as tmp:
        context = WorkerContext(Settings(data_dir=Path(tmp), demo_model="live", ood_guard=False))
        analyser = context.analyser
        report = analyser.model.triage([source])
        shape = (int(source.Rows), int(source.Columns))
        results = {
            "demo": measure(analyser, source, report, args.repeats),
            "broad": measure(analyser, source, with_broad_maps(report, shape), args.repeats),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for case, figures in results.items():
        line = ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
        print(f"{case}: {line}")


if __name__ == "__main__":
    main()
