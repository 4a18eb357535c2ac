"""An evaluation's :class:`Results` as JSON, or as an HTML page with ROC and reliability PNGs.

``write_report(results, folder)`` writes ``report.html``, ``roc.png`` (one panel per target
site, one curve per method, seeds pooled) and ``reliability.png`` (one panel per method,
target sites and seeds pooled, quantile bins) into ``folder``. Figures are drawn with
matplotlib's object API (Agg canvas), so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from plugin.adaptation.evaluate import Results, SiteResult, roc_curve
from plugin.adaptation.networks import FloatArray

REPORT_FILE: Final = "report.html"
ROC_FILE: Final = "roc.png"
RELIABILITY_FILE: Final = "reliability.png"
_RELIABILITY_BINS: Final = 10


def to_json(results: Results, *, include_scores: bool = False) -> str:
    """Settings, per-site results, per-method summary and per-run metrics as JSON.

    ``include_scores`` adds every run's held-out scores and the held-out labels (enough to
    redraw the plots; also enough to re-identify rows, so off by default).
    """
    runs = []
    for run in results.runs:
        entry: dict[str, Any] = {
            "method": run.method,
            "target_site": run.target_site,
            "seed": run.seed,
            "auroc": run.auroc,
            "auprc": run.auprc,
            "calibration_slope": run.calibration_slope,
            "calibration_intercept": run.calibration_intercept,
            "epochs_run": run.log.epochs_run,
            "train_seconds": run.log.total_seconds,
        }
        if include_scores:
            entry["scores"] = run.scores.tolist()
        runs.append(entry)
    document: dict[str, Any] = {
        "methods": list(results.methods),
        "target_sites": list(results.target_sites),
        "seeds": list(results.seeds),
        "settings": dict(results.settings),
        "summary": [_finite(dataclasses.asdict(s)) for s in results.summary()],
        "sites": [_finite(dataclasses.asdict(s)) for s in results.sites],
        "runs": [_finite(r) for r in runs],
    }
    if include_scores:
        document["held_out_labels"] = {k: v.tolist() for k, v in results.held_out_labels.items()}
    return json.dumps(document, indent=2)


def _finite(entry: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN: the linear arms' "seconds per epoch" becomes null.
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()
    }


def write_report(
    results: Results,
    folder: Path,
    *,
    title: str = "Multi-site adaptation",
    notes: Sequence[str] = (),
) -> Path:
    """Write report.html with roc.png and reliability.png beside it; returns the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    _save(_roc_figure(results), folder / ROC_FILE)
    _save(_reliability_figure(results), folder / RELIABILITY_FILE)
    path = folder / REPORT_FILE
    path.write_text(_html(results, title, notes), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- HTML


def _html(results: Results, title: str, notes: Sequence[str]) -> str:
    settings = ", ".join(f"{k} = {v}" for k, v in results.settings.items())
    seeds = ", ".join(str(s) for s in results.seeds)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(note)}</p>" for note in notes),
        f"<p>Seeds: {html.escape(seeds)}. {html.escape(settings)}.</p>",
        "<h2>Summary per method</h2>",
        _summary_table(results),
        "<h2>AUROC per target site</h2>",
        "<p>Mean over seeds [stratified bootstrap 95% interval of that mean] on the target's "
        "held-out rows; n = held-out rows (positives).</p>",
        _site_table(results),
        "<h2>ROC curves</h2>",
        f'<img src="{ROC_FILE}" alt="ROC curves per target site">',
        "<h2>Reliability</h2>",
        f'<img src="{RELIABILITY_FILE}" alt="Reliability diagrams per method">',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _summary_table(results: Results) -> str:
    header = (
        "<tr><th>method</th><th>median AUROC</th><th>worst AUROC (site)</th>"
        "<th>median AUPRC</th><th>median calibration slope</th>"
        "<th>median calibration intercept</th><th>s / epoch</th><th>s / fit</th></tr>"
    )
    rows = [
        f"<tr><td>{html.escape(s.method)}</td><td>{s.median_auroc:.3f}</td>"
        f"<td>{s.worst_auroc:.3f} ({html.escape(s.worst_site)})</td>"
        f"<td>{s.median_auprc:.3f}</td><td>{s.median_calibration_slope:.2f}</td>"
        f"<td>{s.median_calibration_intercept:.2f}</td>"
        f"<td>{_seconds(s.seconds_per_epoch)}</td><td>{_seconds(s.seconds_per_fit)}</td></tr>"
        for s in results.summary()
    ]
    return "<table>" + header + "".join(rows) + "</table>"


def _site_table(results: Results) -> str:
    header = "<tr><th>target site</th><th>n (pos)</th>" + "".join(
        f"<th>{html.escape(m)}</th>" for m in results.methods
    )
    rows = []
    for target in results.target_sites:
        first = results.site_result(results.methods[0], target)
        cells = "".join(_auroc_cell(results.site_result(m, target)) for m in results.methods)
        rows.append(
            f"<tr><td>{html.escape(target)}</td>"
            f"<td>{first.n_held_out} ({first.n_positive})</td>{cells}</tr>"
        )
    return "<table>" + header + "</tr>" + "".join(rows) + "</table>"


def _auroc_cell(result: SiteResult) -> str:
    return f"<td>{result.auroc:.3f} [{result.auroc_low:.3f}, {result.auroc_high:.3f}]</td>"


def _seconds(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


# --------------------------------------------------------------------------- figures


def _grid(n_panels: int) -> tuple[Figure, list[Axes]]:
    columns = min(4, n_panels)
    rows = math.ceil(n_panels / columns)
    figure = Figure(figsize=(3.2 * columns, 3.0 * rows), layout="constrained")
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(n_panels)]
    return figure, axes


def _pooled(results: Results, method: str, target: str) -> tuple[FloatArray, FloatArray]:
    """Held-out labels and scores of all seeds of ``method`` on ``target``, concatenated."""
    runs = results.runs_of(method, target)
    labels = np.tile(results.held_out_labels[target], len(runs))
    return labels, np.concatenate([r.scores for r in runs])


def _roc_figure(results: Results) -> Figure:
    figure, axes = _grid(len(results.target_sites))
    for ax, target in zip(axes, results.target_sites, strict=True):
        for method in results.methods:
            fpr, tpr = roc_curve(*_pooled(results, method, target))
            auc = results.site_result(method, target).auroc
            ax.plot(fpr, tpr, label=f"{method} {auc:.2f}", linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"target {target}", fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    return figure


def _reliability_figure(results: Results) -> Figure:
    figure, axes = _grid(len(results.methods))
    for ax, method in zip(axes, results.methods, strict=True):
        pairs = [_pooled(results, method, t) for t in results.target_sites]
        labels = np.concatenate([p[0] for p in pairs])
        scores = np.concatenate([p[1] for p in pairs])
        predicted, observed = _reliability_bins(labels, scores)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.plot(predicted, observed, marker="o", markersize=3, linewidth=1.2)
        top = max(float(predicted.max()), float(observed.max()), 0.05) * 1.1
        ax.set_xlim(0, min(top, 1.0))
        ax.set_ylim(0, min(top, 1.0))
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("mean predicted risk", fontsize=8)
        ax.set_ylabel("observed rate", fontsize=8)
    return figure


def _reliability_bins(labels: FloatArray, scores: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean prediction and observed rate per quantile bin (equal counts: at a few percent
    prevalence, equal-width bins above 0.2 would be empty)."""
    order = np.argsort(scores, kind="stable")
    bins = np.array_split(order, min(_RELIABILITY_BINS, len(order)))
    predicted = np.array([scores[b].mean() for b in bins])
    observed = np.array([labels[b].mean() for b in bins])
    return predicted, observed


def _save(figure: Figure, path: Path) -> None:
    # A bare Figure picks the Agg canvas for PNG by itself; no pyplot, no global backend.
    figure.savefig(path, format="png", dpi=100)
