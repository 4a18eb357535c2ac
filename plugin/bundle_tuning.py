"""Adapting a bundle to local data: calibration and few-shot heads from a labelled CSV.

The CSV has a ``path`` column (DICOM files, relative to the CSV's folder or absolute) and
one column per finding holding 1 (present), 0 (absent) or nothing (not labelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.errors import ConfigError
from plugin.imaging import dataset_input
from plugin.inference import TriageModel
from plugin.labels import read_labels_csv
from plugin.models.bundle import HeadRef, Manifest, load_bundle
from plugin.models.bundle_writer import pin_file, write_manifest
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


def calibrate(bundle_dir: Path, labels_csv: Path, *, threads: int | None = None) -> Manifest:
    """Fit each labelled finding's temperature, bias and threshold; rewrite the manifest."""
    model = TriageModel(load_bundle(bundle_dir), threads=threads)
    labelled = read_labels(labels_csv, model.finding_names)
    probs = model.probabilities(_inputs(model, labelled.paths))
    fitted_on = f"{labels_csv.name} ({len(labelled.paths)} images, {_today()})"
    updated = []
    for j, finding in enumerate(model.bundle.manifest.findings):
        if finding.name not in labelled.findings:
            updated.append(finding)
            continue
        labels = labelled.column(finding.name)
        known = ~np.isnan(labels)
        current = finding.calibration
        try:
            fit = fit_calibration(
                probs[known, j],
                labels[known].astype(np.int64),
                indeterminate_band=current.indeterminate_band,
                fitted_on=fitted_on,
            )
        except InsufficientLabels as exc:
            raise ConfigError(f"{labels_csv}, finding {finding.name}: {exc}") from exc
        updated.append(
            finding.model_copy(update={"calibration": current.model_validate(fit.to_manifest())})
        )
    manifest = model.bundle.manifest.model_copy(update={"findings": updated})
    write_manifest(bundle_dir, manifest)
    return manifest


def fit_head(
    bundle_dir: Path,
    labels_csv: Path,
    *,
    kind: str,
    activate: bool = True,
    threads: int | None = None,
) -> HeadRef:
    """Fit a few-shot head on the labelled images' embeddings and add it to the bundle."""
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
    head = HeadRef(
        name=kind,
        version=version,
        kind=kind,
        file=pin_file(bundle_dir, relative),
        findings=labelled.findings,
        fitted_on=f"{labels_csv.name} ({len(labelled.paths)} images, {_today()})",
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
    return head


def _today() -> str:
    return datetime.now(UTC).date().isoformat()
