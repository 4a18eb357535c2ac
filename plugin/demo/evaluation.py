"""Evaluate a model bundle on held-out synthetic phantoms (``pacsclip model eval``).

The cases come from the evaluation stream of :func:`plugin.demo.train.render_cases`, which
training never draws from, and the text side uses only the *held-out* phrasings of the
sentence bank, which training never saw. Measured:

- zero-shot AUROC per finding with the held-out phrasings as prompt sets, with a 95%
  percentile bootstrap interval over cases; the mean AUROC's interval comes from the same
  resamples, so it accounts for findings scored on the same cases;
- the bundle's own triage probabilities (its prompt embeddings or active head, then its
  calibration): AUROC and reliability, since those are the numbers triage thresholds;
- image->text and text->image Recall@1/5/10 between each case and a report composed from
  held-out phrasings, over the whole held-out gallery.

The figures (ROC curves, reliability diagrams) are written by :func:`write_figures`.
Everything here is measured on synthetic phantoms and says nothing about real radiographs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata  # type: ignore[import-untyped]

from plugin.demo.phantom import FINDINGS
from plugin.demo.reports import HELDOUT, NEGATIVE, POSITIVE, build_sentence_bank
from plugin.errors import PacsclipError
from plugin.imaging import batch_inputs
from plugin.inference import TriageModel
from plugin.models.bundle import SYNTHETIC_NOTICE, Bundle, Finding
from plugin.models.projection import text_encoder
from plugin.triage import FindingPrompts, ensemble_embedding, zero_shot_probabilities

if TYPE_CHECKING:
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
SYNTHETIC_DATA_NOTICE: Final = (
    "evaluated on synthetic phantoms (plugin.demo), not real radiographs - not for clinical use"
)
RECALL_KS: Final = (1, 5, 10)
_ENCODE_CHUNK: Final = 256  # images per batch_inputs call, so a large tower input stays small


class EvaluationError(PacsclipError):
    """A bundle cannot be evaluated on the demo data; the message says why."""


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, Any]:
        return {"auroc": _finite(self.estimate), "ci95": [_finite(self.low), _finite(self.high)]}


def auroc_columns(scores: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """AUROC of each column, over axis -2: scores/labels [..., N, F] -> [..., F].

    Mann-Whitney U with average ranks (ties count one half); nan where a column has only
    one class.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    ranks = rankdata(s, axis=-2)
    n_pos = y.sum(axis=-2).astype(np.float64)
    n_neg = y.shape[-2] - n_pos
    u = np.where(y, ranks, 0.0).sum(axis=-2) - n_pos * (n_pos + 1.0) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        result: FloatArray = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return result


def bootstrap_auroc_intervals(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[list[Interval], Interval]:
    """Per-column AUROC and the mean over columns, each with a percentile bootstrap interval.

    Cases (rows) are resampled with replacement, the same rows for every column, so the mean's
    interval is that of the mean. A resample with one class for a column gives nan there and
    is left out of that column's percentiles.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be [N, F] alike, got {s.shape} and {y.shape}")
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    point = auroc_columns(s, y)
    rng = np.random.default_rng([seed, 23])
    resampled = np.empty((n_resamples, s.shape[1]))
    step = 100  # resamples per block: [step, N, F] arrays stay a few tens of MB
    for start in range(0, n_resamples, step):
        rows = rng.integers(0, len(s), size=(min(step, n_resamples - start), len(s)))
        resampled[start : start + len(rows)] = auroc_columns(s[rows], y[rows])
    tail = 100.0 * (1.0 - level) / 2.0
    per_column = [
        Interval(float(point[j]), *_percentiles(resampled[:, j], tail)) for j in range(s.shape[1])
    ]
    with np.errstate(invalid="ignore"):
        means = _nanmean_rows(resampled)
    mean = Interval(_nanmean(point), *_percentiles(means, tail))
    return per_column, mean


def _percentiles(values: FloatArray, tail: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _nanmean(values: npt.ArrayLike) -> float:
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else math.nan


def _nanmean_rows(values: FloatArray) -> FloatArray:
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    sums = np.where(finite, values, 0.0).sum(axis=1)
    result: FloatArray = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return result


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs at least one positive and one negative")
    order = np.argsort(-s, kind="stable")
    # The last index of each run of tied scores: a threshold admits a whole tie at once.
    last = np.flatnonzero(np.diff(s[order], append=-np.inf) != 0)
    tp = np.cumsum(y[order])[last].astype(np.float64)
    fp = (last + 1) - tp
    fpr: FloatArray = np.concatenate([[0.0], fp / fp[-1]])
    tpr: FloatArray = np.concatenate([[0.0], tp / tp[-1]])
    return fpr, tpr


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's points (non-empty bins only) and summary scores."""

    predicted: FloatArray  # mean predicted probability per bin
    observed: FloatArray  # share of positives per bin
    counts: npt.NDArray[np.int64]
    ece: float  # expected calibration error: count-weighted |observed - predicted|
    brier: float


def reliability(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 10
) -> Reliability:
    """Equal-width bins over [0, 1]; the last bin includes 1."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    used = counts > 0
    predicted = np.bincount(bins, weights=p, minlength=n_bins)[used] / counts[used]
    observed = np.bincount(bins, weights=y, minlength=n_bins)[used] / counts[used]
    ece = float(np.sum(counts[used] * np.abs(observed - predicted)) / len(p))
    brier = float(np.mean((p - y) ** 2))
    return Reliability(predicted, observed, counts[used], ece, brier)


def retrieval_recalls(
    image_embeds: npt.ArrayLike,
    report_embeds: npt.ArrayLike,
    keys: Sequence[Any],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, dict[str, float]]:
    """Recall@k both ways; relevant = same key ("same findings") or the case's own report."""
    from plugin.demo import train  # torch: not for the statistics above, which workers import

    similarity = np.asarray(image_embeds, dtype=np.float64) @ np.asarray(report_embeds).T
    ids = np.unique(np.array([repr(k) for k in keys]), return_inverse=True)[1]
    same = ids[:, None] == ids[None, :]
    exact = np.eye(len(ids), dtype=bool)
    return {
        "image_to_text": train.recall_at_k(similarity, same, ks),
        "text_to_image": train.recall_at_k(similarity.T, same.T, ks),
        "image_to_text_exact": train.recall_at_k(similarity, exact, ks),
        "text_to_image_exact": train.recall_at_k(similarity.T, exact, ks),
    }


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """Everything ``pacsclip model eval`` prints, plus the scores the figures are drawn from."""

    bundle: str
    synthetic: bool
    n_eval: int
    seed: int
    prompt_split_seed: int
    n_bootstrap: int
    findings: list[str]
    displays: list[str]
    labels: BoolArray  # [N, F]
    zero_shot: FloatArray  # [N, F] held-out prompt probabilities
    triage: FloatArray  # [N, F] the bundle's calibrated triage probabilities
    auroc: list[Interval]
    mean_auroc: Interval
    triage_auroc: list[float]
    reliability_zero_shot: list[Reliability]
    reliability_triage: list[Reliability]
    mean_auroc_per_site: dict[str, float]
    retrieval: dict[str, dict[str, float]]

    @property
    def notices(self) -> list[str]:
        return [*([SYNTHETIC_NOTICE] if self.synthetic else []), SYNTHETIC_DATA_NOTICE]

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "synthetic": self.synthetic,
            "notices": self.notices,
            "n_eval": self.n_eval,
            "seed": self.seed,
            "prompt_split_seed": self.prompt_split_seed,
            "bootstrap": {"resamples": self.n_bootstrap, "level": 0.95, "method": "percentile"},
            "findings": {
                name: {
                    "display": self.displays[j],
                    "prevalence": float(self.labels[:, j].mean()),
                    **self.auroc[j].as_dict(),
                    "triage_auroc": _finite(self.triage_auroc[j]),
                    "triage_ece": self.reliability_triage[j].ece,
                    "triage_brier": self.reliability_triage[j].brier,
                    "zero_shot_ece": self.reliability_zero_shot[j].ece,
                }
                for j, name in enumerate(self.findings)
            },
            "mean_auroc": self.mean_auroc.as_dict(),
            "mean_auroc_per_site": {k: _finite(v) for k, v in self.mean_auroc_per_site.items()},
            "retrieval": {
                "gallery": self.n_eval,
                "relevant": "same findings on the same sides (*_exact: the case's own report)",
                **self.retrieval,
            },
        }


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (one class only) is null."""
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class Scores:
    """What a bundle produced on the held-out cases, one row per case."""

    findings: list[str]
    displays: list[str]
    labels: BoolArray  # [N, F]
    zero_shot: FloatArray  # [N, F] held-out prompt probabilities
    triage: FloatArray  # [N, F] the bundle's calibrated triage probabilities
    image_embeds: FloatArray  # [N, D]
    report_embeds: FloatArray  # [N, D] each case's held-out report
    keys: list[Any]  # equal keys: same findings and sides, interchangeable reports
    sites: list[str]


def summarise(
    bundle_ref: str,
    synthetic: bool,
    scores: Scores,
    *,
    seed: int,
    prompt_split_seed: int,
    n_bootstrap: int,
) -> Evaluation:
    """The metrics of :class:`Evaluation` from per-case scores (no model, no I/O)."""
    s = scores
    per_finding, mean = bootstrap_auroc_intervals(s.zero_shot, s.labels, n_bootstrap, seed)
    columns = range(len(s.findings))
    return Evaluation(
        bundle=bundle_ref,
        synthetic=synthetic,
        n_eval=len(s.labels),
        seed=seed,
        prompt_split_seed=prompt_split_seed,
        n_bootstrap=n_bootstrap,
        findings=list(s.findings),
        displays=list(s.displays),
        labels=s.labels,
        zero_shot=s.zero_shot,
        triage=s.triage,
        auroc=per_finding,
        mean_auroc=mean,
        triage_auroc=[float(v) for v in auroc_columns(s.triage, s.labels)],
        reliability_zero_shot=[reliability(s.zero_shot[:, j], s.labels[:, j]) for j in columns],
        reliability_triage=[reliability(s.triage[:, j], s.labels[:, j]) for j in columns],
        mean_auroc_per_site=_per_site(s.zero_shot, s.labels, s.sites),
        retrieval=retrieval_recalls(s.image_embeds, s.report_embeds, s.keys),
    )


def evaluate_bundle(
    bundle: Bundle,
    *,
    n_eval: int = 1200,
    seed: int = 0,
    n_bootstrap: int = 1000,
    threads: int | None = None,
    prompt_split_seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Score ``bundle`` on ``n_eval`` held-out phantoms; see the module docstring.

    ``prompt_split_seed`` picks which phrasings are held out; it must be the seed the bundle
    was trained with, which is read from its ``train-result.json`` when not given (0 for a
    bundle that was not trained on the demo sentences: every phrasing is new to it).
    """
    from plugin.demo import train

    say = progress or logger.info
    findings = [f for f in bundle.manifest.findings if f.name in FINDINGS]
    if not findings:
        raise EvaluationError(
            f"{bundle.ref} has none of the demo findings {list(FINDINGS)}: it cannot be "
            "evaluated on the synthetic phantoms"
        )
    encoder = text_encoder(bundle, threads=threads)
    if encoder is None:
        raise EvaluationError(
            f"{bundle.ref} has no text encoder (text_encoder.kind 'none'), so held-out "
            "phrasings cannot be embedded; evaluate a bundle with a text tower"
        )
    if prompt_split_seed is None:
        prompt_split_seed = _training_seed(bundle)

    # Rendered at the demo's size whatever the bundle's input: every bundle sees the same
    # cases, and batch_inputs resizes them as triage would.
    cases = train.render_cases(
        n_eval, seed, train.STREAM_EVAL, train.DemoConfig.image_size, workers=threads or 1
    )
    say(f"rendered {len(cases)} held-out cases (seed {seed})")
    model = TriageModel(bundle, threads=threads)
    embeds = _image_embeddings(model, cases.images)
    raw = model.scores(embeds)[:, [model.finding_names.index(f.name) for f in findings]]
    triage = np.stack(
        [model.calibrations[f.name].apply(raw[:, j]) for j, f in enumerate(findings)], axis=1
    )

    bank = build_sentence_bank(prompt_split_seed)
    reports = train.heldout_reports(cases, bank, seed)
    prompts = _heldout_prompts(findings, train.finding_prompts(bank, HELDOUT))
    texts = sorted({t for group in [*prompts.values(), *reports] for t in group})
    say(f"embedding {len(texts)} held-out sentences")
    vectors = dict(zip(texts, np.asarray(encoder.encode(texts), dtype=np.float64), strict=True))

    def embed(group: Sequence[str]) -> FloatArray:
        return np.stack([vectors[t] for t in group])

    finding_prompts = [
        FindingPrompts.from_prompt_sets(
            f.name, embed(prompts[f.name, POSITIVE]), embed(prompts[f.name, NEGATIVE])
        )
        for f in findings
    ]
    say(f"bootstrapping AUROC intervals ({n_bootstrap} resamples)")
    scores = Scores(
        findings=[f.name for f in findings],
        displays=[f.display for f in findings],
        labels=cases.labels()[:, [FINDINGS.index(f.name) for f in findings]],
        zero_shot=zero_shot_probabilities(embeds, finding_prompts, bundle.manifest.logit_scale),
        triage=triage,
        image_embeds=embeds.astype(np.float64),
        report_embeds=np.stack([ensemble_embedding(embed(report)) for report in reports]),
        keys=list(cases.label_keys()),
        sites=list(cases.sites),
    )
    return summarise(
        bundle.ref,
        bundle.is_synthetic,
        scores,
        seed=seed,
        prompt_split_seed=prompt_split_seed,
        n_bootstrap=n_bootstrap,
    )


def _heldout_prompts(
    findings: Sequence[Finding], heldout: Mapping[str, Mapping[str, list[str]]]
) -> dict[tuple[str, str], list[str]]:
    """Held-out phrasings in each finding's own templates, as its manifest prompts are."""
    return {
        (f.name, polarity): [
            t.replace("{}", p) for t in f.templates for p in heldout[f.name][polarity]
        ]
        for f in findings
        for polarity in (POSITIVE, NEGATIVE)
    }


def _training_seed(bundle: Bundle) -> int:
    from plugin.demo.packaging import read_train_result

    result = read_train_result(bundle.directory)
    if result is None:
        return 0
    return int(result.get("training", {}).get("config", {}).get("seed", 0))


def _image_embeddings(model: TriageModel, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 display images -> the bundle's inputs (its size, channels, mean, std) -> embeds."""
    parts = []
    for start in range(0, len(images), _ENCODE_CHUNK):
        displays = images[start : start + _ENCODE_CHUNK].astype(np.float32) / 255.0
        parts.append(model.encoder.encode(batch_inputs(displays, model.spec)))
    return np.concatenate(parts)


def _per_site(scores: FloatArray, labels: BoolArray, sites: Sequence[str]) -> dict[str, float]:
    site_array = np.asarray(sites)
    return {
        site: _nanmean(auroc_columns(scores[site_array == site], labels[site_array == site]))
        for site in sorted(set(sites))
    }


# --------------------------------------------------------------------------- report


def format_evaluation(evaluation: Evaluation) -> str:
    """The human-readable table ``pacsclip model eval`` prints."""
    e = evaluation
    lines = [
        f"{e.bundle} on {e.n_eval} held-out synthetic cases (seed {e.seed}; held-out "
        f"phrasings as prompts; 95% percentile bootstrap, {e.n_bootstrap} resamples)",
        *e.notices,
        "",
        f"{'finding':<20}{'prevalence':>11}{'AUROC':>8}  {'95% CI':<17}"
        f"{'triage AUROC':>13}{'triage ECE':>12}",
    ]
    for j, name in enumerate(e.findings):
        lines.append(
            f"{name:<20}{e.labels[:, j].mean():>11.3f}{e.auroc[j].estimate:>8.3f}  "
            f"{_ci(e.auroc[j]):<17}{e.triage_auroc[j]:>13.3f}{e.reliability_triage[j].ece:>12.3f}"
        )
    lines.append(f"{'mean':<20}{'':>11}{e.mean_auroc.estimate:>8.3f}  {_ci(e.mean_auroc)}")
    lines.append(
        "mean AUROC per site: "
        + " ".join(f"{site}={value:.3f}" for site, value in e.mean_auroc_per_site.items())
    )
    lines.append("")
    lines.append(
        f"retrieval over {e.n_eval} cases, held-out reports "
        "(relevant = same findings on the same sides):"
    )
    labels = {
        "image_to_text": "image->text",
        "text_to_image": "text->image",
        "image_to_text_exact": "image->text (own report)",
        "text_to_image_exact": "text->image (own report)",
    }
    for key, label in labels.items():
        recalls = "  ".join(f"{k} {v:.3f}" for k, v in e.retrieval[key].items())
        lines.append(f"  {label:<26}{recalls}")
    return "\n".join(lines)


def _ci(interval: Interval) -> str:
    return f"[{interval.low:.3f}, {interval.high:.3f}]"


# --------------------------------------------------------------------------- figures


def write_figures(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """``roc.png`` and ``reliability.png``, one panel per finding; returns their paths."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend state and no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    e = evaluation
    n_cols = min(3, len(e.findings))
    n_rows = math.ceil(len(e.findings) / n_cols)
    subtitle = f"{e.bundle}, {e.n_eval} held-out synthetic cases - not for clinical use"
    paths = []
    for kind in ("roc", "reliability"):
        figure = Figure(figsize=(4.2 * n_cols, 4.0 * n_rows + 0.6), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
        for j, ax in enumerate(axes):
            if j >= len(e.findings):
                ax.set_visible(False)
            elif kind == "roc":
                _roc_panel(ax, e, j)
            else:
                _reliability_panel(ax, e, j)
        title = "ROC, zero-shot" if kind == "roc" else "Reliability (marker area ~ cases per bin)"
        figure.suptitle(f"{title}: {subtitle}", fontsize=10)
        path = out_dir / f"{kind}.png"
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths


def _roc_panel(ax: Axes, e: Evaluation, j: int) -> None:
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":")
    for scores, label in ((e.zero_shot, "held-out prompts"), (e.triage, "triage (bundle)")):
        if e.labels[:, j].all() or not e.labels[:, j].any():
            continue
        fpr, tpr = roc_curve(scores[:, j], e.labels[:, j])
        ax.plot(fpr, tpr, label=label, linewidth=1.2)
    a = e.auroc[j]
    ax.set_title(f"{e.displays[j]}: AUROC {a.estimate:.3f} {_ci(a)}", fontsize=9)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)


def _reliability_panel(ax: Axes, e: Evaluation, j: int) -> None:
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":")
    for r, label in (
        (e.reliability_zero_shot[j], "held-out prompts"),
        (e.reliability_triage[j], "triage (calibrated)"),
    ):
        # Most cases sit near 0 or 1; the marker area shows how few the middle bins hold.
        (line,) = ax.plot(r.predicted, r.observed, linewidth=0.8, alpha=0.7)
        sizes = 8.0 + 120.0 * np.sqrt(r.counts / r.counts.max())
        ax.scatter(
            r.predicted,
            r.observed,
            s=sizes,
            color=line.get_color(),
            alpha=0.8,
            label=f"{label}, ECE {r.ece:.3f}",
        )
    ax.set_title(f"{e.displays[j]} (prevalence {e.labels[:, j].mean():.2f})", fontsize=9)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
