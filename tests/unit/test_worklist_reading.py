"""What the worklist and the study page read from the catalog: a finding is one only when its
decision is "present" (the undetermined zone is shown apart, as in the SR), STAT studies come
first and pages follow each other across that boundary, a patient's priors by date, and the
regions of present findings as shapes in the source image's pixel coordinates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Analysis, Series, Site, Study
from plugin.catalog.worklist import (
    Cursor,
    WorklistQuery,
    finding_summaries,
    priors,
    worklist_page,
)
from plugin.dashboard import dicom_date, person_name
from plugin.dashboard.regions import image_views, present_findings

START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
SQUARE = [[10, 10], [40, 10], [40, 40], [10, 40], [10, 10]]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")


def add_study(
    catalog: Catalog,
    uid: str,
    *,
    priority: str | None = "routine",
    minute: int = 0,
    patient_id: str | None = None,
    study_date: str | None = None,
    modality: str = "CR",
    findings: list[dict[str, Any]] | None = None,
) -> None:
    with catalog.sessions.begin() as session:
        site = session.query(Site).filter_by(key="AE1|General").one_or_none() or Site(
            key="AE1|General"
        )
        study = Study(
            study_instance_uid=uid,
            site=site,
            state="delivered",
            priority=priority,
            patient_name="DOE^JANE",
            patient_id=patient_id,
            accession_number=f"A{uid.rsplit('.', 1)[1]}",
            study_date=study_date,
            study_description=f"study {uid}",
            calling_ae_title="AE1",
            received_at=START + timedelta(minutes=minute),
            series=[Series(series_instance_uid=f"{uid}.1", modality=modality)],
        )
        session.add(study)
        if findings is not None:
            session.add(
                Analysis(
                    study=study,
                    generation=1,
                    algorithm_name="tiny-demo",
                    algorithm_version="1.0",
                    synthetic=True,
                    priority=priority or "routine",
                    triggered_by=[],
                    findings=findings,
                )
            )


def finding(name: str, probability: float, decision: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "display": name.title(),
        "probability": probability,
        "threshold": 0.5,
        "decision": decision,
        "source_sop_instance_uid": "1.2.3.4",
        **more,
    }


# --- the undetermined zone -----------------------------------------------------------------


def test_a_finding_is_one_only_when_its_decision_is_present(catalog: Catalog) -> None:
    add_study(
        catalog,
        "1.2.826.0.1.1",
        findings=[
            finding("nodule", 0.91, "present"),
            finding("effusion", 0.55, "indeterminate"),  # above 0.5, inside the zone
            finding("pneumothorax", 0.45, "indeterminate"),
            finding("cardiomegaly", 0.10, "absent"),
            {"name": "old", "probability": 0.99, "threshold": 0.5},  # no decision: none
        ],
    )
    with catalog.sessions() as session:
        [row] = worklist_page(session, WorklistQuery()).rows
    assert [f.name for f in row.findings] == ["nodule"]
    assert [f.name for f in row.undetermined] == ["effusion", "pneumothorax"]
    assert row.undetermined[0].probability == 0.55 and row.undetermined[0].display == "Effusion"
    assert finding_summaries(None, "present") == []


# --- STAT first ----------------------------------------------------------------------------


def seed_mixed(catalog: Catalog) -> dict[str, str | None]:
    """Studies received a minute apart: STAT ones among routine, not-scored and unflagged."""
    priorities: list[str | None] = [
        "routine", "stat", None, "routine", "not_scored", "stat", "routine", "stat", "routine",
    ]  # fmt: skip
    uids = {}
    for minute, priority in enumerate(priorities):
        uid = f"1.2.826.0.2.{minute}"
        add_study(catalog, uid, priority=priority, minute=minute)
        uids[uid] = priority
    return uids


@pytest.mark.parametrize("order", ["newest", "oldest"])
@pytest.mark.parametrize("limit", [1, 2, 3, 50])
def test_stat_studies_come_first_and_pages_follow_each_other(
    catalog: Catalog, order: Any, limit: int
) -> None:
    uids = seed_mixed(catalog)
    by_time = sorted(uids, key=lambda u: int(u.rsplit(".", 1)[1]), reverse=order == "newest")
    expected = [u for u in by_time if uids[u] == "stat"] + [u for u in by_time if uids[u] != "stat"]
    seen: list[str] = []
    cursor: Cursor | None = None
    with catalog.sessions() as session:
        for _ in range(len(uids) + 1):
            page = worklist_page(session, WorklistQuery(order=order, after=cursor, limit=limit))
            seen += [r.study_instance_uid for r in page.rows]
            if page.next_cursor is None:
                break
            cursor = Cursor.parse(page.next_cursor.token())  # as it travels through a URL
    assert seen == expected


def test_a_priority_filter_keeps_to_its_group(catalog: Catalog) -> None:
    uids = seed_mixed(catalog)
    with catalog.sessions() as session:
        stat = worklist_page(session, WorklistQuery(priority="stat", limit=2))
        assert stat.next_cursor is not None and stat.next_cursor.stat
        rest = worklist_page(session, WorklistQuery(priority="stat", after=stat.next_cursor))
        routine = worklist_page(session, WorklistQuery(priority="routine"))
    assert [r.priority for r in stat.rows + rest.rows] == ["stat"] * 3
    assert len(routine.rows) == sum(1 for p in uids.values() if p == "routine")
    assert {r.priority for r in routine.rows} == {"routine"}


def test_a_cursor_says_which_group_it_ends_in() -> None:
    moment = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert Cursor.parse(Cursor(moment, 7, stat=True).token()) == Cursor(moment, 7, True)
    assert Cursor.parse(Cursor(moment, 7).token()) == Cursor(moment, 7, False)
    with pytest.raises(ValueError, match="is not"):
        Cursor.parse("stat~7")


# --- priors --------------------------------------------------------------------------------


def test_priors_are_the_patients_other_studies_by_date(catalog: Catalog) -> None:
    add_study(catalog, "1.2.826.0.3.1", patient_id="P1", study_date="20261201", minute=5)
    add_study(catalog, "1.2.826.0.3.2", patient_id="P1", study_date="20240105", modality="CT")
    add_study(catalog, "1.2.826.0.3.3", patient_id="P1", study_date="20251120")
    add_study(catalog, "1.2.826.0.3.4", patient_id="P1", study_date=None)  # undated: last
    add_study(catalog, "1.2.826.0.3.5", patient_id="P2", study_date="20251121")
    add_study(catalog, "1.2.826.0.3.6", patient_id=None)
    add_study(catalog, "1.2.826.0.3.7", patient_id=None)
    with catalog.sessions() as session:
        found = priors(session, "1.2.826.0.3.1")
        no_patient = priors(session, "1.2.826.0.3.6")
        unknown = priors(session, "9.9.9")
    assert [p.study_instance_uid for p in found] == [
        "1.2.826.0.3.3",
        "1.2.826.0.3.2",
        "1.2.826.0.3.4",
    ]
    assert found[1].modalities == "CT" and found[1].accession_number == "A2"
    assert no_patient == [] and unknown == []  # an unknown Patient ID is nobody's prior


# --- regions -------------------------------------------------------------------------------


def test_present_findings_keep_their_regions_and_others_draw_nothing() -> None:
    rows = [
        finding(
            "nodule",
            0.91,
            "present",
            localisation="occlusion",
            scored_by="site head v3",
            regions=[{"sop_instance_uid": "1.2.3.4", "contour": SQUARE}],
        ),
        finding("mass", 0.7, "present"),  # a row stored before regions: none
        finding(
            "effusion",
            0.55,
            "indeterminate",
            regions=[{"sop_instance_uid": "1.2.3.4", "contour": SQUARE}],
        ),
        finding(
            "atelectasis",
            0.6,
            "present",
            regions=[
                {"sop_instance_uid": "1.2.3.5", "contour": [[1, 2], [3.5, 2], [3.5, 9], [1, 2]]},
                {"sop_instance_uid": "1.2.3.4", "contour": [[1, 2], [3, 4]]},  # too short
                {"sop_instance_uid": "1.2.3.4", "contour": [[1, 2], [3, "x"], [5, 6]]},
                {"contour": SQUARE},  # no image
            ],
        ),
    ]
    present = present_findings(rows)
    assert [f.name for f in present] == ["nodule", "mass", "atelectasis"]
    nodule, mass, atelectasis = present
    assert nodule.localisation == "occlusion" and nodule.scored_by == "site head v3"
    assert nodule.regions[0].svg_points == "10,10 40,10 40,40 10,40 10,10"
    assert nodule.regions[0].bounds == (10, 10, 40, 40) and nodule.label == "Nodule 0.91"
    assert mass.regions == [] and mass.localisation is None
    assert [r.svg_points for r in atelectasis.regions] == ["1,2 3.5,2 3.5,9 1,2"]

    source, other = image_views(present, "1.2.3.4", {"1.2.3.4": (128, 256), "1.2.3.5": (64, 64)})
    assert source.sop_instance_uid == "1.2.3.4" and source.size == (128, 256)
    assert [s.finding.name for s in source.shapes] == ["nodule"]
    assert source.shapes[0].label_x == 10 and source.shapes[0].label_y < 10  # above it
    assert other.sop_instance_uid == "1.2.3.5"
    assert [s.finding.name for s in other.shapes] == ["atelectasis"]
    [unsized] = image_views(present[:1], "1.2.3.4", {})
    assert unsized.size is None and unsized.shapes == []  # no size: nothing drawn


# --- how fields read -----------------------------------------------------------------------


def test_dates_and_person_names_read_as_a_radiologist_reads_them() -> None:
    assert dicom_date("20261130") == "2026-11-30"
    assert dicom_date(None) == "-" and dicom_date("2026") == "2026"
    assert person_name("DOE^JANE^M") == "DOE, JANE M"
    assert person_name("DOE") == "DOE" and person_name("") == "-"
    assert person_name("YAMADA^TARO=山田^太郎") == "YAMADA, TARO"
