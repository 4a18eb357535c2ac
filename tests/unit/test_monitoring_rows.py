"""The monitoring run reads only the newest labeled studies of each site, model and finding
from the catalog; its figures are those of every labeled study."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert

from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Analysis, ReportLabels, Site, Study, StudyReport
from plugin.catalog.report_labels import monitored_studies, scored_labeled_studies, study_labels
from plugin.validation.monitoring import Window, WindowFigure, window_figures
from plugin.validation.statistics import Floors

VERSION = "rules-2+vocab"
FLOORS = Floors(min_positives=3, min_negatives=3, auroc_floor=0.75, bootstrap=50)
WINDOW = Window(studies=10, days=30, alert_rate_tolerance=0.10)
START = datetime(2025, 1, 1, tzinfo=UTC)
STUDIES = 1800
NOW = START + timedelta(hours=7 * STUDIES)
# (model, findings it scores, sites it runs at)
MODELS = [
    ("demo", "1", ("pneumothorax", "pleural_effusion", "edema", "nodule"), ("north", "south")),
    ("candidate", "2", ("pneumothorax", "pleural_effusion"), ("north", "south", "east")),
]
# How often a report mentions each finding: nodule never, edema rarely.
MENTIONED = {"pneumothorax": 0.9, "pleural_effusion": 0.5, "edema": 0.08, "nodule": 0.0}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    """Three sites over a year and a half, east only lately: studies with reports that supersede
    earlier ones, labels of an older labeler, re-analyses, out-of-distribution studies, and
    scores that stop following the labels at one site for the last months."""
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    rng = np.random.default_rng(7)
    studies: list[dict[str, Any]] = []
    analyses: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    with catalog.sessions.begin() as session:
        sites = {key: Site(key=key) for key in ("north", "south", "east")}
        session.add_all(sites.values())
        session.flush()
        for i in range(STUDIES):
            key = ("north", "south", "east")[i % 3]
            received = START + timedelta(hours=7 * i)
            if key == "east" and i < 1500:
                continue
            study_id = len(studies) + 1
            studies.append(
                {
                    "id": study_id,
                    "study_instance_uid": f"1.2.826.0.1.{i}",
                    "site_id": sites[key].id,
                    "state": "analysed",
                    "calling_ae_title": "PACS",
                    "received_at": received,
                }
            )
            truth = {f: bool(rng.random() < 0.35) for f in MENTIONED}
            shifted = key == "south" and i > 1650
            for name, version, findings, at in MODELS:
                if key not in at:
                    continue
                out_of_distribution = rng.random() < 0.05
                for generation in (1, 2) if rng.random() < 0.1 else (1,):
                    analyses.append(
                        {
                            "study_id": study_id,
                            "generation": generation,
                            "algorithm_name": name,
                            "algorithm_version": version,
                            "synthetic": True,
                            "priority": "not_scored" if out_of_distribution else "routine",
                            "triggered_by": [],
                            "findings": []
                            if out_of_distribution
                            else [
                                {
                                    "name": f,
                                    "probability": float(
                                        rng.random()
                                        if shifted
                                        else np.clip(
                                            0.3 + 0.4 * truth[f] + rng.normal(0, 0.15), 0, 1
                                        )
                                    ),
                                    "threshold": 0.5,
                                }
                                for f in findings
                            ],
                            "role": "live" if name == "demo" else "shadow",
                        }
                    )
            if rng.random() < 0.1:
                continue  # no report yet
            for _ in range(2 if rng.random() < 0.15 else 1):  # a final report after a preliminary
                report_id = len(reports) + 1
                reports.append(
                    {
                        "id": report_id,
                        "study_id": study_id,
                        "source": "hl7",
                        "digest": f"{report_id:064d}",
                        "text": "...",
                    }
                )
                read = {
                    f: (
                        ("present" if truth[f] else "absent") if rng.random() < 0.9 else "uncertain"
                    )
                    if rng.random() < MENTIONED[f]
                    else None
                    for f in MENTIONED
                }
                for labeler, seen in ((VERSION, read), ("rules-1+vocab", dict.fromkeys(read))):
                    labels.append(
                        {
                            "report_id": report_id,
                            "study_id": study_id,
                            "labeler_version": labeler,
                            "labels": seen,
                        }
                    )
        session.execute(insert(Study), studies)
        session.execute(insert(Analysis), analyses)
        session.execute(insert(StudyReport), reports)
        session.execute(insert(ReportLabels), labels)
    return catalog


def figures_of(catalog: Catalog, newest: int | None) -> tuple[list[WindowFigure], int]:
    """The figures from every labeled study (None) or from the newest ones; how many rows."""
    with catalog.sessions() as session:
        rows = (
            scored_labeled_studies(session, VERSION, site=None, since=None)
            if newest is None
            else monitored_studies(session, VERSION, newest=newest)
        )
        labels = study_labels(session, sorted({r.study_id for r in rows}), VERSION)
    return window_figures(rows, labels, window=WINDOW, floors=FLOORS, now=NOW), len(rows)


def test_the_newest_labeled_studies_give_the_figures_of_all_of_them(catalog: Catalog) -> None:
    everything, all_rows = figures_of(catalog, None)
    limited, read_rows = figures_of(catalog, WINDOW.history)

    assert limited == everything
    assert read_rows < all_rows / 2
    # What the comparison covers: every site and model, full windows with a baseline, alerts,
    # and findings with too few labels or none.
    assert {(f.site, f.model) for f in everything} == {
        ("east", "candidate@2"),
        ("north", "candidate@2"),
        ("north", "demo@1"),
        ("south", "candidate@2"),
        ("south", "demo@1"),
    }
    assert any(f.labeled == WINDOW.studies and f.baseline_alert_rate is not None for f in limited)
    assert any(f.problems for f in limited if f.site == "south")
    assert {(f.labeled, f.baseline_alert_rate) for f in limited if f.finding == "nodule"} == {
        (0, None)
    }
    assert any(0 < f.labeled < WINDOW.studies for f in limited if f.finding == "edema")


def test_fewer_studies_than_the_window_and_its_baseline_change_the_figures(
    catalog: Catalog,
) -> None:
    everything, _ = figures_of(catalog, None)
    too_few, _ = figures_of(catalog, WINDOW.studies)

    assert too_few != everything
