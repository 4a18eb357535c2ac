"""Calibration on the site's own reports: studies scored by the live model, their reports
imported and labeled, exported as a labels CSV, and `pacsclip model calibrate` fitted on it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.demo.studies import write_demo_studies
from plugin.models.registry import Registry
from plugin.settings import Settings
from tests.catalog_fixtures import arrive

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))


def pacsclip(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACSCLIP, "--data-dir", str(data), "--log-level", "WARNING", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_report_labels_export_to_a_labels_csv_that_calibrate_fits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    demo = tmp_path / "demo"
    write_demo_studies(demo, count=40, seed=11)
    arrive(settings, demo / "studies")
    imported = pacsclip(data, "report", "import", str(demo / "reports.csv"))
    assert imported.returncode == 0, imported.stderr

    out = tmp_path / "report-labels.csv"
    exported = pacsclip(data, "report", "export-labels", "--out", str(out))

    assert exported.returncode == 0, exported.stderr
    assert "scored by pacsclip-demo@2026.11.1" in exported.stdout
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    with (demo / "truth.csv").open() as handle:
        truth = {r["study_uid"]: r for r in csv.DictReader(handle)}
    assert rows and set(rows[0]) == {
        "path",
        *(k for k in truth[next(iter(truth))] if k not in ("study_uid", "accession", "site")),
    }
    for row in rows:
        assert Path(row["path"]).is_file()
        study_uid = Path(row["path"]).parts[-3]  # spool: STUDY/SERIES/SOP.dcm
        for finding, value in row.items():
            if finding != "path" and value:
                assert value == truth[study_uid][finding]  # the generator's reports are read right

    calibrated = pacsclip(
        data, "model", "calibrate", "--labels", str(out), "--holdout", "0.2", "--seed", "0"
    )
    assert calibrated.returncode == 0, calibrated.stdout + calibrated.stderr
    installed = json.loads(pacsclip(data, "model", "list", "--json").stdout)
    new = [e for e in installed if e["version"].startswith("2026.11.1+cal")]
    assert len(new) == 1 and not new[0]["active"]
    lineage = Registry.for_data_dir(data).info("pacsclip-demo", new[0]["version"]).manifest.lineage
    assert lineage is not None and "report-labels.csv" in lineage.data
