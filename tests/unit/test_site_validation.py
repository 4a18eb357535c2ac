"""Reports in (linked, kept waiting, labeled) and validation of live and shadow models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Analysis, ReportLabels, Site, Study
from plugin.catalog.report_labels import waiting_reports
from plugin.validation.golive import golive_decision
from plugin.validation.intake import ReportIntake
from plugin.validation.report_labeler import ReportLabeler, ReportRefused
from plugin.validation.site_validation import validate
from plugin.validation.statistics import Floors
from plugin.validation.vocabulary import default_vocabulary

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

FLOORS = Floors(min_positives=8, min_negatives=8, bootstrap=200)


@pytest.fixture(scope="module")
def labeler() -> ReportLabeler:
    return ReportLabeler(default_vocabulary())


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")


def add_study(catalog: Catalog, site: str, accession: str | None = None) -> tuple[int, str]:
    uid = generate_uid()
    with catalog.sessions.begin() as session:
        site_row = session.query(Site).filter_by(key=site).one_or_none() or Site(key=site)
        study = Study(
            study_instance_uid=uid,
            site=site_row,
            state="analysed",
            calling_ae_title="PACS",
            accession_number=accession,
        )
        session.add(study)
        session.flush()
        return study.id, uid


def add_analysis(
    catalog: Catalog, study_id: int, model: str, scores: dict[str, float], role: str = "live"
) -> None:
    name, version = model.split("@")
    with catalog.sessions.begin() as session:
        session.add(
            Analysis(
                study_id=study_id,
                generation=1,
                algorithm_name=name,
                algorithm_version=version,
                synthetic=True,
                priority="routine",
                triggered_by=[],
                findings=[
                    {"name": k, "probability": v, "threshold": 0.5} for k, v in scores.items()
                ],
                role=role,
            )
        )


def test_reports_link_by_uid_or_accession_and_wait_for_unknown_studies(
    catalog: Catalog, labeler: ReportLabeler, tmp_path: Path
) -> None:
    intake = ReportIntake(catalog.sessions, lambda: labeler)
    _, uid = add_study(catalog, "a", accession="ACC1")
    later_uid = generate_uid()
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text(
        "study_uid,text\n"
        f"{uid},Small left pleural effusion.\n"
        f"{later_uid},No pneumothorax.\n"
        f"{uid},\n"
    )

    summary = intake.import_csv(csv_path)
    again = intake.import_csv(csv_path)

    assert summary.as_dict()["linked"] == 1
    assert summary.waiting == 1
    assert summary.refused == [{"line": 4, "reason": "the report is empty (no words)"}]
    assert summary.labeled == 1
    assert again.already_stored == 1 and again.labeled == 0
    with catalog.sessions() as session:
        (waiting,) = waiting_reports(session)
        labels = session.query(ReportLabels).one()
    assert waiting.reason == f"no study {later_uid} in the catalog"
    assert labels.labels["pleural_effusion"] == "present"
    assert labels.labeler_version == labeler.version

    by_accession = intake.add("Heart size is normal.", source="hl7", accession="ACC1")
    assert by_accession.linked and by_accession.study_instance_uid == uid
    unknown = intake.add("No effusion.", source="hl7", accession="NOPE")
    assert not unknown.linked
    assert unknown.reason == "no study with accession number NOPE in the catalog"

    # The study the waiting report names arrives: the report is linked and labeled.
    with catalog.sessions.begin() as session:
        session.add(
            Study(
                study_instance_uid=later_uid,
                site=session.query(Site).filter_by(key="a").one(),
                state="analysed",
                calling_ae_title="PACS",
            )
        )
    assert intake.link_waiting(later_uid) == 1
    with catalog.sessions() as session:
        assert [w.accession_number for w in waiting_reports(session)] == ["NOPE"]
        assert session.query(ReportLabels).count() == 3


def test_a_report_naming_no_study_is_refused(catalog: Catalog, labeler: ReportLabeler) -> None:
    with pytest.raises(ReportRefused, match="names no study"):
        ReportIntake(catalog.sessions, lambda: labeler).add("No effusion.", source="api")


def test_validation_measures_live_and_shadow_side_by_side(
    catalog: Catalog, labeler: ReportLabeler
) -> None:
    intake = ReportIntake(catalog.sessions, lambda: labeler)
    rng = np.random.default_rng(0)
    for i in range(40):
        present = i % 2 == 0
        study_id, uid = add_study(catalog, "site-a")
        text = "Left pleural effusion." if present else "No pleural effusion."
        if i % 10 == 9:
            text = "Possible small pleural effusion."
        intake.add(text, source="api", study_uid=uid)
        truth = float(present)
        add_analysis(
            catalog, study_id, "demo@1", {"pleural_effusion": 0.15 * truth + rng.random() * 0.6}
        )
        add_analysis(
            catalog,
            study_id,
            "cand@2",
            {"pleural_effusion": 0.8 * truth + rng.random() * 0.2},
            role="shadow",
        )
    few_id, few_uid = add_study(catalog, "site-b")
    intake.add("No pleural effusion.", source="api", study_uid=few_uid)
    add_analysis(catalog, few_id, "demo@1", {"pleural_effusion": 0.1})

    answer = validate(catalog.sessions, labeler.version, live_model="demo@1", floors=FLOORS)

    site_a, site_b = answer["sites"]
    assert site_a["site"] == "site-a"
    live, shadow = site_a["models"]
    assert (live["model"], live["role"]) == ("demo@1", "live")
    assert (shadow["model"], shadow["role"]) == ("cand@2", "shadow")
    effusion = live["findings"]["pleural_effusion"]
    assert (effusion["positives"], effusion["negatives"], effusion["uncertain"]) == (20, 16, 4)
    assert shadow["findings"]["pleural_effusion"]["auroc"] == 1.0
    assert effusion["auroc"] < 1.0
    versus = shadow["versus_live"]["pleural_effusion"]
    assert versus["enough"] and versus["auroc_difference"] > 0
    assert versus["ci95"][0] <= versus["auroc_difference"] <= versus["ci95"][1]
    too_few = site_b["models"][0]["findings"]["pleural_effusion"]
    assert too_few["enough"] is False
    assert too_few["missing"].startswith("0 positive and 1 negative labeled studies")

    # The gate: the better shadow may go live at site-a; site-b has too few labels for it.
    at_a = validate(
        catalog.sessions, labeler.version, live_model="demo@1", site="site-a", floors=FLOORS
    )
    better = golive_decision(at_a, "cand@2", floors=FLOORS, has_ood_reference=True)
    assert better.allowed, better.reasons
    assert "pleural_effusion at site site-a: AUROC 1.000 >= 0.7" in better.passed
    unguarded = golive_decision(at_a, "cand@2", floors=FLOORS, has_ood_reference=False)
    assert not unguarded.allowed and "no out-of-distribution reference" in unguarded.reasons[0]
    # Were cand@2 live, the old model would be a worse candidate: refused with the interval.
    reverse = validate(
        catalog.sessions, labeler.version, live_model="cand@2", site="site-a", floors=FLOORS
    )
    worse = golive_decision(reverse, "demo@1", floors=FLOORS, has_ood_reference=True)
    assert not worse.allowed
    assert any("worse than the live model" in r for r in worse.reasons), worse.reasons
    strict_floors = Floors(min_positives=30, min_negatives=8, bootstrap=200)
    strict_answer = validate(
        catalog.sessions, labeler.version, live_model="demo@1", site="site-a", floors=strict_floors
    )
    strict = golive_decision(strict_answer, "cand@2", floors=strict_floors, has_ood_reference=True)
    assert any("too few labels" in r for r in strict.reasons)
    unknown = golive_decision(at_a, "other@9", floors=FLOORS, has_ood_reference=True)
    assert "has no validation: run it in shadow" in unknown.reasons[0]

    only_b = validate(
        catalog.sessions, labeler.version, live_model="demo@1", site="site-b", floors=FLOORS
    )
    assert [s["site"] for s in only_b["sites"]] == ["site-b"]
