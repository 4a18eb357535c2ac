"""`pacsclip report label|import|unlinked`, `pacsclip validate` and `pacsclip model shadow`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Analysis, ReportLabels, Site, Study
from plugin.cli.main import app
from plugin.models.registry import builtin_bundle_dirs
from plugin.settings import Settings

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

runner = CliRunner()


def cli(data: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--data-dir", str(data), *args])
    return result.exit_code, result.output


def test_label_a_csv_and_a_single_text(tmp_path: Path) -> None:
    reports = tmp_path / "reports.csv"
    reports.write_text(
        'id,text\nr1,"No focal consolidation, effusion, or pneumothorax."\n'
        "r2,Cannot exclude a small left pneumothorax.\n"
    )

    code, out = cli(tmp_path / "data", "report", "label", str(reports), "--json")
    lines = out.splitlines()
    answer = json.loads("\n".join(line for line in lines if not line.startswith("labeler ")))

    assert code == 0, out
    assert [a["id"] for a in answer] == ["r1", "r2"]
    assert answer[0]["labels"]["consolidation"] == "absent"
    assert answer[1]["labels"]["pneumothorax"] == "uncertain"
    assert answer[1]["labels"]["consolidation"] is None
    code, out = cli(tmp_path / "data", "report", "label", "--text", "Enlarged cardiac silhouette.")
    assert code == 0 and out.startswith("text: cardiomegaly=present")


def test_label_refuses_a_csv_without_its_columns(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("study,report\n1,x\n")

    code, out = cli(tmp_path / "data", "report", "label", str(bad))

    assert code == 2
    assert "needs the columns id,text" in out


def test_import_then_validate_says_how_many_labels_it_has_and_needs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    catalog = open_catalog(settings.effective_database_url)
    uid = generate_uid()
    with catalog.sessions.begin() as session:
        study = Study(
            study_instance_uid=uid, site=Site(key="s1"), state="analysed", calling_ae_title="A"
        )
        session.add(study)
        session.flush()
        session.add(
            Analysis(
                study_id=study.id,
                generation=1,
                algorithm_name="pacsclip-demo",
                algorithm_version="2026.11.1",
                synthetic=True,
                priority="routine",
                triggered_by=[],
                findings=[{"name": "pneumothorax", "probability": 0.9, "threshold": 0.5}],
            )
        )
    reports = tmp_path / "reports.csv"
    reports.write_text(f"study_uid,text\n{uid},Large left pneumothorax.\n1.2.3.4,No effusion.\n")

    code, out = cli(data, "report", "import", str(reports), "--json")
    summary = json.loads(out[out.index("{") :])
    assert code == 0, out
    assert (summary["linked"], summary["waiting_for_study"], summary["labeled"]) == (1, 1, 1)

    code, out = cli(data, "report", "unlinked", "--json")
    assert code == 0
    assert [r["reason"] for r in json.loads(out[out.index("[") :])] == [
        "no study 1.2.3.4 in the catalog"
    ]

    code, out = cli(data, "validate")
    assert code == 0, out
    assert "site s1" in out and "pacsclip-demo@2026.11.1 (live)" in out
    assert "too few labels: 1 positive and 0 negative labeled studies; needs at least 20" in out

    code, out = cli(data, "validate", "--since", "yesterday")
    assert code == 2 and "YYYY-MM-DD" in out


def test_shadow_models_are_listed_per_site_and_refused_for_the_live_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    candidate = tmp_path / "candidate"
    shutil.copytree(builtin_bundle_dirs()[0], candidate)
    manifest = json.loads((candidate / "bundle.json").read_text())
    manifest["version"] = "2026.12.0-candidate"
    (candidate / "bundle.json").write_text(json.dumps(manifest))
    assert cli(data, "model", "install", str(candidate))[0] == 0

    code, out = cli(data, "model", "shadow", "pacsclip-demo", "2026.12.0-candidate", "--site", "s1")
    assert code == 0, out
    code, out = cli(data, "model", "list", "--json")
    listed = {e["version"]: e["shadow_sites"] for e in json.loads(out)}
    assert listed["2026.12.0-candidate"] == ["s1"]
    assert listed["2026.11.1"] == []
    code, out = cli(data, "model", "list")
    assert "shadow@s1" in out

    assert cli(data, "model", "activate", "pacsclip-demo", "2026.11.1")[0] == 0
    code, out = cli(data, "model", "shadow", "pacsclip-demo", "2026.11.1")
    assert code == 2 and "is the live model" in out

    code, out = cli(data, "model", "shadow", "pacsclip-demo", "2026.12.0-candidate", "--off")
    assert code == 2 and "not in shadow at every site" in out
    opts = ["--site", "s1", "--off"]
    assert cli(data, "model", "shadow", "pacsclip-demo", "2026.12.0-candidate", *opts)[0] == 0
    code, out = cli(data, "model", "list", "--json")
    assert all(e["shadow_sites"] == [] for e in json.loads(out))


def test_report_add_labels_the_report_and_keeps_one_for_an_unknown_study(tmp_path: Path) -> None:
    data = tmp_path / "data"
    catalog = open_catalog(Settings(data_dir=data).effective_database_url)
    uid = generate_uid()
    with catalog.sessions.begin() as session:
        session.add(
            Study(
                study_instance_uid=uid, site=Site(key="s"), state="analysed", calling_ae_title="A"
            )
        )
    text = tmp_path / "report.txt"
    text.write_text("IMPRESSION: Small right pneumothorax.")

    code, out = cli(data, "report", "add", uid, str(text))
    assert code == 0, out
    assert "stored, labeled and indexed" in out
    with catalog.sessions() as session:
        (labels,) = session.query(ReportLabels).all()
    assert labels.labels["pneumothorax"] == "present"

    code, out = cli(data, "report", "add", "1.2.3.999", str(text))
    assert code == 1
    assert "no study 1.2.3.999 in the catalog; the report is kept" in out
