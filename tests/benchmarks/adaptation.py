"""Multi-source adaptation on a synthetic 13-site ER cohort: training time and AUROC per method.

Run from the repository root with the project's virtualenv:

    python tests/benchmarks/adaptation.py [--seeds 2] [--epochs 15] [--bootstrap 200]
                                          [--features auto|concepts|synthetic]
                                          [--report DIR] [--json]

Features: with ``auto`` (default), the synthetic cohort of ``plugin.revisit.cohort`` (3,210
encounters, 13 ERs, revisit rate 3-15%) with concept vectors from ``plugin.concepts``
(medspacy extraction, the K = 1001 most frequent concepts: fewer when the lexicon yields
fewer distinct codes); where those are not importable, ``make_shifted_sites`` (13 sites,
3,210 rows, 1,000 binary features, site vocabularies). The concept vocabulary is fitted on
all notes without labels, as a deployment would on its unlabelled notes.

Every site is the target in turn (plugin.adaptation.evaluate's protocol: the target split
50/50, all arms scored on the same held-out half). Times are wall-clock on this machine's
CPU, one torch thread, measured inside training (scoring excluded). Figures on synthetic
data say nothing clinical. The defaults (2 seeds, 15 epochs, 200 bootstrap resamples; TrainConfig's
default is 30 epochs) take 3.5 CPU-minutes, about 70 s of it concept extraction: 6.8 minutes
of wall time on a 2-core machine shared with another training job. Not a pytest test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

# Run as a script, this file's folder is on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from plugin.adaptation import (  # noqa: E402
    METHODS,
    Results,
    Run,
    TrainConfig,
    evaluate,
    make_shifted_sites,
    to_json,
    write_report,
)


@dataclass(frozen=True)
class Cohort:
    X: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    site: npt.NDArray[np.str_]
    source: str


def concept_cohort(seed: int) -> Cohort:
    """plugin.revisit's synthetic encounters -> concept vectors via plugin.concepts."""
    from plugin.concepts import ConceptExtractor, ConceptVocabulary, document_concepts
    from plugin.revisit.cohort import synth_cohort

    started = time.perf_counter()
    rows = synth_cohort(seed)
    extractor = ConceptExtractor(sentence_splitter="punctuation")
    documents = [document_concepts(extractor.extract(row["note_text"])) for row in rows]
    vocabulary = ConceptVocabulary.fit(documents, k=1001)
    X = vocabulary.transform(documents).astype(np.float64)
    print(
        f"concept extraction: {len(rows)} notes, {len(vocabulary)} concept features, "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return Cohort(
        X,
        np.array([float(row["revisit_7d"]) for row in rows]),
        np.array([row["site"] for row in rows]),
        "plugin.revisit.cohort + plugin.concepts (medspacy)",
    )


def synthetic_cohort(seed: int) -> Cohort:
    data = make_shifted_sites(seed=seed)
    return Cohort(data.X, data.y, data.site, "plugin.adaptation.make_shifted_sites (binary)")


def load_cohort(features: str, seed: int) -> Cohort:
    if features == "synthetic":
        return synthetic_cohort(seed)
    try:
        return concept_cohort(seed)
    except ImportError as error:  # medspacy or the revisit package absent
        if features == "concepts":
            raise
        print(f"concept features unavailable ({error}); using make_shifted_sites", flush=True)
        return synthetic_cohort(seed)


def describe(cohort: Cohort) -> None:
    names, counts = np.unique(cohort.site, return_counts=True)
    rates = [cohort.y[cohort.site == n].mean() for n in names]
    print(f"data: {cohort.source}")
    print(
        f"  {len(cohort.y)} rows, {cohort.X.shape[1]} features, {len(names)} sites "
        f"({counts.min()}-{counts.max()} rows), outcome rate {cohort.y.mean():.3f} "
        f"(per site {min(rates):.3f}-{max(rates):.3f})"
    )


def print_timing(results: Results) -> None:
    print("\ntraining time, CPU (mean over fits; total = all fits of the method)")
    print(f"{'method':<16} {'epochs':>6} {'s/epoch':>9} {'s/fit':>8} {'total s':>9}")
    for method in results.methods:
        runs = results.runs_of(method)
        per_epoch = [r.log.seconds_per_epoch for r in runs if r.log.epochs_run]
        epochs = statistics.fmean(r.log.epochs_run for r in runs)
        print(
            f"{method:<16} {epochs:>6.0f} "
            f"{(f'{statistics.fmean(per_epoch):.4f}' if per_epoch else 'n/a'):>9} "
            f"{statistics.fmean(r.log.total_seconds for r in runs):>8.3f} "
            f"{sum(r.log.total_seconds for r in runs):>9.1f}"
        )


def print_aurocs(results: Results) -> None:
    print("\nAUROC over target sites (per site: mean over seeds)")
    print(
        f"{'method':<16} {'median':>7} {'worst':>7} {'(site)':<7} {'AUPRC':>6} "
        f"{'cal.slope':>9} {'cal.int':>8}"
    )
    for s in results.summary():
        print(
            f"{s.method:<16} {s.median_auroc:>7.3f} {s.worst_auroc:>7.3f} {s.worst_site:<7} "
            f"{s.median_auprc:>6.3f} {s.median_calibration_slope:>9.2f} "
            f"{s.median_calibration_intercept:>8.2f}"
        )
    print("\nAUROC per target site, mean over seeds [bootstrap 95% interval]")
    short = [m.replace("standardised", "std").replace("-only", "") for m in results.methods]
    print(f"{'site':<6} {'n(pos)':>8} " + " ".join(f"{m:>19}" for m in short))
    for target in results.target_sites:
        first = results.site_result(results.methods[0], target)
        cells = []
        for method in results.methods:
            r = results.site_result(method, target)
            cells.append(f"{r.auroc:.2f} [{r.auroc_low:.2f},{r.auroc_high:.2f}]".rjust(19))
        print(f"{target:<6} {f'{first.n_held_out}({first.n_positive})':>8} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--features", choices=("auto", "concepts", "synthetic"), default="auto")
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="write report.html and PNGs here")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: comparable per-epoch figures on a shared machine

    started = time.perf_counter()
    cohort = load_cohort(args.features, args.cohort_seed)
    describe(cohort)
    config = TrainConfig(epochs=args.epochs)
    seeds = list(range(args.seeds))
    print(
        f"methods: {', '.join(METHODS)}; seeds {seeds}; {args.epochs} epochs (fixed, no "
        f"early stopping); MLP {config.hidden}; bootstrap {args.bootstrap}",
        flush=True,
    )

    def progress(run: Run) -> None:
        if run.method == METHODS[-1] and run.seed == seeds[-1]:
            print(
                f"  target {run.target_site} done, {time.perf_counter() - started:.0f} s",
                flush=True,
            )

    results = evaluate(
        cohort.X,
        cohort.y,
        cohort.site,
        METHODS,
        seeds,
        config=config,
        n_bootstrap=args.bootstrap,
        on_run=progress,
    )
    print_timing(results)
    print_aurocs(results)
    if args.report is not None:
        path = write_report(
            results,
            args.report,
            title="Multi-site adaptation benchmark",
            notes=[f"Data: {cohort.source}. Synthetic: figures say nothing clinical."],
        )
        print(f"\nreport: {path}")
    if args.json:
        print(to_json(results))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
