"""Adapting a bundle to local data: calibration and few-shot heads from a labelled CSV, and
prompt embeddings made again after the prompts were edited.

Each changes the bundle folder it is given; ``pacsclip model calibrate``, ``fit-head`` and
``embed-prompts`` give it a new version's copy (:mod:`plugin.bundle_versions`), never an
installed bundle.

The CSV has a ``path`` column (DICOM files, relative to the CSV's folder or absolute) and
one column per finding holding 1 (present), 0 (absent) or nothing (not labelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.bundle_versions import Change
from plugin.errors import ConfigError
from plugin.imaging import dataset_input
from plugin.inference import TriageModel
from plugin.labels import read_labels_csv
from plugin.models.bundle import HeadRef, Manifest, load_bundle
from plugin.models.bundle_writer import add_prompt_embeddings, pin_file, write_manifest
from plugin.models.projection import text_encoder
from plugin.models.runtime import PromptEmbeddings
from plugin.triage import Calibration as TriageCalibration
from plugin.triage import InsufficientLabels, LinearProbe, TipAdapter, fit_calibration

HEAD_KINDS = {"linear_probe": LinearProbe, "tip_adapter": TipAdapter}


@dataclass(frozen=True)
class LabelledSet:
    paths: list[Path]
    findings: list[str]  # the CSV's finding columns, in file order
    labels: NDArray[np.float64]  # [N, F]; NaN where not labelled

    def column(self, finding: str) -> NDArray[np.float64]:
        return self.labels[:, self.findings.index(finding)]


def read_labels(csv_path: Path, known_findings: Sequence[str]) -> LabelledSet:
    """Read and check the labels CSV; errors name the row and column to fix."""
    table = read_labels_csv(csv_path, ("path",), known_findings)
    paths = [Path(key) for key in table.keys]
    return LabelledSet(
        [path if path.is_absolute() else csv_path.parent / path for path in paths],
        list(table.findings),
        table.values,
    )


def _inputs(model: TriageModel, paths: Sequence[Path]) -> NDArray[np.float32]:
    try:
        return np.stack([dataset_input(dcmread(p), model.spec) for p in paths])
    except (OSError, InvalidDicomError) as exc:
        raise ConfigError(f"cannot read a labelled image: {exc}") from exc


DEFAULT_HOLDOUT: Final = 0.2
MAX_HOLDOUT: Final = 0.5


@dataclass(frozen=True)
class Calibrated:
    manifest: Manifest
    change: Change  # for the new version's lineage: what was fitted, on what, held-out figures

    @property
    def summary(self) -> str:
        return str(self.change.evaluation["summary"])


def split_rows(n: int, holdout: float, seed: int) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Seeded (fit, held-out) row masks; ``holdout`` 0 fits on every row."""
    if not 0.0 <= holdout <= MAX_HOLDOUT:
        raise ConfigError(f"--holdout must be between 0 and {MAX_HOLDOUT}, got {holdout}")
    n_heldout = 0 if holdout == 0.0 else max(1, round(n * holdout))
    if n - n_heldout < 2:
        raise ConfigError(
            f"{n} labelled images leave {n - n_heldout} to fit on after holding out {holdout}: "
            "add images or lower --holdout"
        )
    heldout = np.zeros(n, dtype=bool)
    heldout[np.random.default_rng(seed).permutation(n)[:n_heldout]] = True
    return ~heldout, heldout


def calibrate(
    bundle_dir: Path,
    labels_csv: Path,
    *,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    target_sensitivity: float | None = None,
    threads: int | None = None,
) -> Calibrated:
    """Fit each labelled finding's temperature, bias and threshold on the labelled images
    outside a seeded held-out share, measure before and after on that share, and rewrite the
    manifest in ``bundle_dir`` (a new version's copy: see plugin.bundle_versions).

    The threshold maximises Youden's J on the fitting images, or with ``target_sensitivity``
    is the highest one that reaches that sensitivity on them.
    """
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    model = TriageModel(load_bundle(bundle_dir), threads=threads)
    labelled = read_labels(labels_csv, model.finding_names)
    n = len(labelled.paths)
    in_fit, in_heldout = split_rows(n, holdout, seed)
    probs = model.probabilities(_inputs(model, labelled.paths))
    n_fit, n_heldout = int(in_fit.sum()), int(in_heldout.sum())
    fitted_on = f"{labels_csv.name} ({n_fit} images, {n_heldout} held out, {_today()})"
    updated, reports, lines = [], {}, []
    for j, finding in enumerate(model.bundle.manifest.findings):
        if finding.name not in labelled.findings:
            updated.append(finding)
            continue
        labels = labelled.column(finding.name)
        known = ~np.isnan(labels)
        fit_rows, heldout_rows = known & in_fit, known & in_heldout
        current = finding.calibration
        try:
            fit = fit_calibration(
                probs[fit_rows, j],
                labels[fit_rows].astype(np.int64),
                target_sensitivity=target_sensitivity,
                indeterminate_band=current.indeterminate_band,
                fitted_on=fitted_on,
            )
        except InsufficientLabels as exc:
            raise ConfigError(
                f"{labels_csv}, finding {finding.name}: {exc} among the {n_fit} images it is "
                "fitted on (the others are held out)"
            ) from exc
        before = TriageCalibration.from_manifest(current.model_dump())
        report = _finding_report(
            probs[:, j], labels, fit_rows, heldout_rows, before, fit, target_sensitivity
        )
        reports[finding.name] = report
        lines += _report_lines(finding.name, fit, report, target_sensitivity)
        updated.append(
            finding.model_copy(update={"calibration": current.model_validate(fit.to_manifest())})
        )
    manifest = model.bundle.manifest.model_copy(update={"findings": updated})
    write_manifest(bundle_dir, manifest)
    names = ", ".join(reports)
    rule = (
        f"thresholds for sensitivity >= {target_sensitivity:g}"
        if target_sensitivity is not None
        else "thresholds by Youden's J"
    )
    hyperparameters: dict[str, float | int | str | bool] = {"holdout": holdout, "seed": seed}
    if target_sensitivity is not None:
        hyperparameters["target_sensitivity"] = target_sensitivity
    change = Change(
        method=f"calibration (Platt temperature and bias, {rule}) of {names}",
        data=f"{labels_csv.name}: {n} labelled images, {n_fit} to fit and {n_heldout} held out",
        examples=n,
        hyperparameters=hyperparameters,
        evaluation={
            "fit_images": n_fit,
            "heldout_images": n_heldout,
            "findings": reports,
            "summary": "\n".join(lines),
        },
    )
    return Calibrated(manifest, change)


def _finding_report(
    p: NDArray[np.float64],
    labels: NDArray[np.float64],
    fit_rows: NDArray[np.bool_],
    heldout_rows: NDArray[np.bool_],
    before: TriageCalibration,
    after: TriageCalibration,
    target_sensitivity: float | None,
) -> dict[str, Any]:
    """Figures of one finding: the threshold's sensitivity on the fitting images, and
    calibration error, Brier score, sensitivity and specificity on the held-out ones."""
    y_fit = labels[fit_rows]
    called_fit = after.apply(p[fit_rows]) >= after.threshold
    report: dict[str, Any] = {
        "threshold": after.threshold,
        "target_sensitivity": target_sensitivity,
        "fit": {
            "images": int(fit_rows.sum()),
            "positives": int(y_fit.sum()),
            "sensitivity": _share(called_fit, y_fit == 1),
            "specificity": _share(~called_fit, y_fit == 0),
        },
        "heldout": None,
    }
    if heldout_rows.any():
        y = labels[heldout_rows]
        old, new = before.apply(p[heldout_rows]), after.apply(p[heldout_rows])
        called = new >= after.threshold
        report["heldout"] = {
            "images": int(heldout_rows.sum()),
            "positives": int(y.sum()),
            "before": {"ece": expected_calibration_error(old, y), "brier": _brier(old, y)},
            "after": {"ece": expected_calibration_error(new, y), "brier": _brier(new, y)},
            "sensitivity": _share(called, y == 1),
            "specificity": _share(~called, y == 0),
        }
    return report


def _report_lines(
    name: str, fit: TriageCalibration, report: dict[str, Any], target: float | None
) -> list[str]:
    fitted = report["fit"]
    rule = f" for sensitivity >= {target:g}" if target is not None else ""
    lines = [
        f"{name}: temperature {fit.temperature:.3f} bias {fit.bias:.3f} threshold "
        f"{fit.threshold:.3f}{rule} (fitted on {fitted['images']} images, "
        f"{fitted['positives']} positive; sensitivity {_fmt(fitted['sensitivity'])}, "
        f"specificity {_fmt(fitted['specificity'])} on them)"
    ]
    held = report["heldout"]
    if held is None:
        lines.append("  held out: none (no held-out image has this finding labelled)")
        return lines
    before, after = held["before"], held["after"]
    lines.append(
        f"  held out ({held['images']} images, {held['positives']} positive): "
        f"ECE {before['ece']:.3f} -> {after['ece']:.3f}, "
        f"Brier {before['brier']:.3f} -> {after['brier']:.3f}; "
        f"sensitivity {_fmt(held['sensitivity'])}, specificity {_fmt(held['specificity'])}"
    )
    return lines


def expected_calibration_error(
    probabilities: NDArray[np.float64], labels: NDArray[np.float64], n_bins: int = 10
) -> float:
    """Count-weighted mean of |share of positives - mean probability| over equal-width bins."""
    bins = np.minimum((probabilities * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    used = counts > 0
    predicted = np.bincount(bins, weights=probabilities, minlength=n_bins)[used]
    observed = np.bincount(bins, weights=labels, minlength=n_bins)[used]
    return float(np.sum(np.abs(observed - predicted)) / len(probabilities))


def _brier(probabilities: NDArray[np.float64], labels: NDArray[np.float64]) -> float:
    return float(np.mean((probabilities - labels) ** 2))


def _share(hits: NDArray[np.bool_], among: NDArray[np.bool_]) -> float | None:
    """Share of ``among`` that ``hits``; None when ``among`` is empty."""
    return float(hits[among].mean()) if among.any() else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class FittedHead:
    head: HeadRef
    change: Change  # for the new version's lineage


def fit_head(
    bundle_dir: Path,
    labels_csv: Path,
    *,
    kind: str,
    activate: bool = True,
    threads: int | None = None,
) -> FittedHead:
    """Fit a few-shot head on the labelled images' embeddings and add it to the bundle in
    ``bundle_dir`` (a new version's copy: see plugin.bundle_versions)."""
    if kind not in HEAD_KINDS:
        raise ConfigError(f"head kind must be one of {sorted(HEAD_KINDS)}, not {kind!r}")
    model = TriageModel(load_bundle(bundle_dir), threads=threads)
    labelled = read_labels(labels_csv, model.finding_names)
    if np.isnan(labelled.labels).any():
        raise ConfigError(f"{labels_csv}: a head needs every finding column labelled in every row")
    inputs = _inputs(model, labelled.paths)
    embeds = model.encoder.encode(inputs)
    manifest = model.bundle.manifest
    version = 1 + max((h.version for h in manifest.heads if h.name == kind), default=0)
    relative = f"heads/{kind}-v{version}.npz"
    (bundle_dir / "heads").mkdir(exist_ok=True)
    head_kind = TipAdapter if kind == "tip_adapter" else LinearProbe
    try:
        fitted = head_kind.fit(embeds, labelled.labels, labelled.findings)
    except InsufficientLabels as exc:
        raise ConfigError(f"{labels_csv}: {exc}") from exc
    fitted.save(bundle_dir / relative)
    n = len(labelled.paths)
    head = HeadRef(
        name=kind,
        version=version,
        kind=kind,
        file=pin_file(bundle_dir, relative),
        findings=labelled.findings,
        fitted_on=f"{labels_csv.name} ({n} images, {_today()})",
    )
    # Head outputs are probabilities of their own: the zero-shot calibration no longer
    # applies to those findings until `calibrate` is run again on held-out labels.
    findings = [
        f.model_copy(
            update={
                "calibration": f.calibration.model_copy(
                    update={"temperature": 1.0, "bias": 0.0, "fitted_on": None}
                )
            }
        )
        if f.name in labelled.findings and activate
        else f
        for f in manifest.findings
    ]
    update: dict[str, object] = {"heads": [*manifest.heads, head], "findings": findings}
    if activate:
        update["active_head"] = f"{kind}-v{version}"
    write_manifest(bundle_dir, manifest.model_copy(update=update))
    names = ", ".join(labelled.findings)
    dropped = (
        [
            f"calibration (temperature, bias) of {names}: the head's outputs replace the "
            "zero-shot scores it was fitted on; run `pacsclip model calibrate` on this version"
        ]
        if activate
        else []
    )
    change = Change(
        method=f"few-shot head {kind}-v{version} for {names}"
        + (" (active)" if activate else " (stored, not active)"),
        data=f"{labels_csv.name}: {n} labelled images",
        examples=n,
        hyperparameters={"kind": kind, "activate": activate},
        dropped=dropped,
    )
    return FittedHead(head, change)


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def embed_prompts_into(bundle_dir: Path, *, threads: int | None = None) -> Change:
    """Embed every finding's prompts (as bundle.json now has them) with the bundle's own text
    encoder into prompt_embeddings.npz, recording their digests (a new version's copy)."""
    bundle = load_bundle(bundle_dir)
    if not bundle.findings:
        raise ConfigError(f"{bundle.ref} has no findings: there are no prompts to embed")
    encoder = text_encoder(bundle, threads=threads)
    if encoder is None:
        raise ConfigError(
            f"{bundle.ref} has no text encoder (text_encoder.kind 'none'), so its prompts "
            "cannot be embedded again: put the prompts in bundle.json back as they were, or "
            "import the model again with its text tower and the new prompts"
        )
    edited = bundle.manifest.stale_prompt_findings
    prompts = PromptEmbeddings(
        positive={f.name: encoder.encode(f.prompt_texts(positive=True)) for f in bundle.findings},
        negative={f.name: encoder.encode(f.prompt_texts(positive=False)) for f in bundle.findings},
    )
    add_prompt_embeddings(bundle, prompts)
    texts = sum(len(f.prompt_texts(True)) + len(f.prompt_texts(False)) for f in bundle.findings)
    kind = bundle.manifest.text_encoder.kind
    return Change(
        method="prompt embeddings of every finding, from the prompts in bundle.json"
        + (f" (edited: {', '.join(edited)})" if edited else ""),
        data=f"{texts} prompt texts of {len(bundle.findings)} findings, embedded with the "
        f"bundle's own text encoder ({kind})",
        examples=texts,
        hyperparameters={"text_encoder": kind},
    )
