"""The out-of-distribution guard of a bundle (default: the built-in demo), measured: every real
DICOM image at hand against synthetic held-out images of the demo generator.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/ood.py [--bundle DIR] [--n-synthetic 2000] [--seed 0]
        [--n-reference 2000] [--json]

Real images: every file of pydicom's own test files and of the pydicom-data package that holds
pixel data this pacsclip can decode (others are listed as skipped). Each goes through the
worker's path (DICOM -> display -> model input -> embedding -> guard) as a study of its own.
Synthetic: cases of the demo generator's evaluation stream (plugin.demo.train.STREAM_EVAL),
which neither training nor the reference's fit or threshold used, stored as their simulated
site stores them. Printed: the share of real images flagged, the share of synthetic images not
flagged, and the distances beside the threshold.

Side by side, in the same run: a reference on the image embedding alone, fitted here on the
phantoms a synthetic bundle's reference is fitted on (plugin.demo.radiographs, streams 3 and
4, ``--n-reference`` each): what the guard would catch without the input thumbnail. Not a
pytest test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.data
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.demo.radiographs import STREAM_OOD_FIT, STREAM_OOD_HELDOUT, demo_radiographs
from plugin.imaging import UnsupportedImage, dataset_input
from plugin.inference import TriageModel
from plugin.models.bundle import load_bundle
from plugin.models.registry import DEMO_BUNDLE_DIR
from plugin.triage.ood import EMBEDDING, fit_reference

STREAM_EVAL = 2  # plugin.demo.train.STREAM_EVAL, without importing torch


def real_image_files() -> list[Path]:
    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    spec = importlib.util.find_spec("data_store")  # pydicom-data
    if spec is not None and spec.origin is not None:
        folders.append(Path(spec.origin).parent / "data")
    return sorted(p for folder in folders for p in folder.glob("*.dcm"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE_DIR)
    parser.add_argument("--n-synthetic", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-reference", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model = TriageModel(load_bundle(args.bundle), threads=args.threads)
    if model.ood is None:
        print(f"{model.bundle.ref} has no out-of-distribution reference", file=sys.stderr)
        return 2
    reference = model.ood
    size = model.bundle.manifest.image.size

    def embed(datasets: Any) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and the guard's features, 64 images at a time."""
        embeds, features, batch = [], [], []
        for ds in [*datasets, None]:
            if ds is not None:
                batch.append(dataset_input(ds, model.spec))
            if batch and (ds is None or len(batch) == 64):
                inputs = np.stack(batch)
                embeds.append(model.encoder.encode(inputs))
                features.append(reference.features_of(embeds[-1], inputs))
                batch = []
        return np.concatenate(embeds), np.concatenate(features)

    started = time.perf_counter()
    fit_embeds, _ = embed(demo_radiographs(args.n_reference, args.seed, STREAM_OOD_FIT, size))
    heldout_embeds, _ = embed(
        demo_radiographs(args.n_reference, args.seed, STREAM_OOD_HELDOUT, size)
    )
    embedding_only = fit_reference(
        fit_embeds, heldout_embeds, reference.quantile, features=EMBEDDING
    ).reference
    reference_s = time.perf_counter() - started

    def both(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeds = model.encoder.encode(inputs)
        return (
            reference.distances(reference.features_of(embeds, inputs)),
            embedding_only.distances(embeds),
        )

    started = time.perf_counter()
    real: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for path in real_image_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # several test files are deliberately odd
                ds = dcmread(path)
                if "PixelData" not in ds:
                    continue
                inputs = dataset_input(ds, model.spec)[np.newaxis]
        except (OSError, InvalidDicomError, UnsupportedImage, ValueError, RuntimeError) as exc:
            skipped.append({"file": path.name, "reason": f"{type(exc).__name__}: {exc}"[:100]})
            continue
        guard, alone = (float(d[0]) for d in both(inputs))
        real.append(
            {
                "file": path.name,
                "modality": str(ds.get("Modality", "?")),
                "distance": guard,
                "flagged": guard > reference.threshold,
                "embedding_only_flagged": alone > embedding_only.threshold,
            }
        )
    real_s = time.perf_counter() - started

    started = time.perf_counter()
    synthetic_embeds, synthetic_features = embed(
        demo_radiographs(args.n_synthetic, args.seed, STREAM_EVAL, size)
    )
    synthetic = reference.distances(synthetic_features)
    synthetic_alone = embedding_only.distances(synthetic_embeds)
    synthetic_s = time.perf_counter() - started

    flagged = sum(r["flagged"] for r in real)
    passed = int(np.sum(synthetic <= reference.threshold))
    alone_flagged = sum(r["embedding_only_flagged"] for r in real)
    alone_passed = int(np.sum(synthetic_alone <= embedding_only.threshold))
    summary: dict[str, Any] = {
        "bundle": model.bundle.ref,
        "threshold": reference.threshold,
        "quantile": reference.quantile,
        "real": {
            "images": len(real),
            "flagged": flagged,
            "flagged_pct": 100.0 * flagged / max(len(real), 1),
            "min_distance": min((r["distance"] for r in real), default=None),
            "not_flagged": [r["file"] for r in real if not r["flagged"]],
            "skipped": skipped,
            "seconds": real_s,
        },
        "synthetic": {
            "images": len(synthetic),
            "passed": passed,
            "passed_pct": 100.0 * passed / len(synthetic),
            "distance_p50": float(np.percentile(synthetic, 50)),
            "distance_p99": float(np.percentile(synthetic, 99)),
            "distance_max": float(synthetic.max()),
            "seconds": synthetic_s,
        },
        "embedding_only": {
            "threshold": embedding_only.threshold,
            "real_flagged": alone_flagged,
            "real_not_flagged": [r["file"] for r in real if not r["embedding_only_flagged"]],
            "synthetic_passed": alone_passed,
            "seconds_to_fit": reference_s,
        },
        "per_file": real,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['bundle']}: threshold {reference.threshold:.3f} (Mahalanobis distance)")
    for r in real:
        mark = "flagged" if r["flagged"] else "NOT FLAGGED"
        print(f"  {r['file']:<42} {r['modality']:<3} {r['distance']:8.2f}  {mark}")
    nearest = summary["real"]["min_distance"]
    print(
        f"real DICOM images flagged out of distribution: {flagged}/{len(real)} "
        f"({summary['real']['flagged_pct']:.1f}%), smallest distance {nearest:.2f} = "
        f"{nearest / reference.threshold:.2f} x threshold; {len(skipped)} files skipped "
        "(pixels not decodable here)"
    )
    s = summary["synthetic"]
    print(
        f"synthetic held-out images not flagged: {passed}/{len(synthetic)} "
        f"({s['passed_pct']:.2f}%); distance p50 {s['distance_p50']:.2f}, p99 "
        f"{s['distance_p99']:.2f}, max {s['distance_max']:.2f}"
    )
    print(
        f"reference (embedding alone, fitted in this run on {args.n_reference} + "
        f"{args.n_reference} phantoms): real flagged {alone_flagged}/{len(real)} "
        f"({100.0 * alone_flagged / max(len(real), 1):.1f}%), synthetic not flagged "
        f"{alone_passed}/{len(synthetic)} ({100.0 * alone_passed / len(synthetic):.2f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
