"""Report labels as a labels CSV for ``pacsclip model calibrate`` and ``model fit-head``.

One row per image a model scored, keyed by the image's path in the spool, with 1 (present),
0 (absent) or nothing (uncertain, not mentioned) per finding the model scores: calibration on
the site's own reports, with no labeling by hand.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.report_labels import (
    scored_image_paths,
    scored_labeled_studies,
    study_labels,
)
from plugin.errors import ConfigError
from plugin.validation.report_labeler import ReportLabel


def _value(label: str | None) -> str:
    """1 for present, 0 for absent, nothing for uncertain or not mentioned."""
    return (
        {ReportLabel.PRESENT: "1", ReportLabel.ABSENT: "0"}.get(ReportLabel(label), "")
        if label
        else ""
    )


@dataclass
class LabelsExport:
    path: Path
    images: int = 0
    studies: int = 0
    positives: dict[str, int] = field(default_factory=dict)
    negatives: dict[str, int] = field(default_factory=dict)


def export_labels_csv(
    sessions: sessionmaker[Session],
    labeler_version: str,
    model_ref: str,
    spool_dir: Path,
    out: Path,
    *,
    site: str | None = None,
    since: datetime | None = None,
) -> LabelsExport:
    with sessions() as session:
        rows = [
            r
            for r in scored_labeled_studies(session, labeler_version, site=site, since=since)
            if r.model == model_ref and r.scored
        ]
        ids = [r.study_id for r in rows]
        labels = study_labels(session, ids, labeler_version)
        images = scored_image_paths(session, ids, model_ref)
    findings = sorted({name for r in rows for name in r.probabilities})
    if not findings:
        raise ConfigError(
            f"no labeled study scored by {model_ref}"
            + (f" at site {site}" if site else "")
            + ": import the site's reports first (pacsclip report import)"
        )
    export = LabelsExport(out, positives=dict.fromkeys(findings, 0))
    export.negatives = dict.fromkeys(findings, 0)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *findings])
        for row in rows:
            said = labels.get(row.study_id, {})
            values = [_value(said.get(name)) for name in findings]
            if not any(values) or row.study_id not in images:
                continue
            export.studies += 1
            for name, value in zip(findings, values, strict=True):
                if value == "1":
                    export.positives[name] += 1
                elif value == "0":
                    export.negatives[name] += 1
            for path in images[row.study_id]:
                writer.writerow([str((spool_dir / path).resolve()), *values])
                export.images += 1
    return export
