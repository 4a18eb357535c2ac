"""The operations page's audit log: refused callers, duplicates, purges and go-live overrides,
newest first, filtered by event and paged, without a patient's name or ID."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from plugin.api import create_app
from plugin.catalog import repository
from plugin.catalog.db import open_catalog
from plugin.catalog.models import Site, Study
from plugin.catalog.records import Peer
from plugin.dashboard import mount_dashboard
from plugin.dashboard.operations import AUDIT_PAGE_SIZE
from plugin.metrics import PacsclipMetrics
from plugin.settings import Settings
from tests.unit.test_dashboard import TOKEN, login

PATIENT_ID = "PID-AUDIT-5512"
PATIENT_NAME = "Audit^Patient"


@dataclass
class Audited:
    client: TestClient  # logged in
    study_uid: str
    sessions: sessionmaker[Session]


@pytest.fixture
def audited(make_settings: Callable[..., Settings]) -> Audited:
    """A dashboard over a catalog whose audit log holds one of each kind of entry (the
    refused caller newest), and a study of a named patient."""
    settings = make_settings(api_token=TOKEN)
    catalog = open_catalog(settings.effective_database_url)
    study_uid = generate_uid()
    modality = Peer(calling_ae_title="CT01", host="10.0.0.7")
    with catalog.sessions.begin() as session:
        session.add(
            Study(
                study_instance_uid=study_uid,
                site=Site(key="CT01|General"),
                state="delivered",
                patient_id=PATIENT_ID,
                patient_name=PATIENT_NAME,
                calling_ae_title="CT01",
            )
        )
        repository.audit(session, "stored", modality, status=0, study_instance_uid=study_uid)
        repository.audit(session, "duplicate", modality, status=0, study_instance_uid=study_uid)
        repository.audit(
            session, "golive_forced", None, detail="m@2 replaces m@1 by override: pilot"
        )
        repository.audit(session, "purge", None, detail="by patient_id: study=1")
        repository.audit(
            session,
            "association_rejected",
            Peer(calling_ae_title="ROGUE", host="10.0.0.66"),
            detail="calling AE title ROGUE is not allowed",
        )
    app = create_app(settings, catalog.sessions, PacsclipMetrics())
    mount_dashboard(app, settings, catalog.sessions, PacsclipMetrics())
    client = TestClient(app)
    login(client)
    return Audited(client, study_uid, catalog.sessions)


def _events(page: str) -> list[str]:
    return re.findall(r'class="audit-entry" data-event="([^"]+)"', page)


def test_the_operations_page_lists_the_latest_audit_entries_without_patient_data(
    audited: Audited,
) -> None:
    page = audited.client.get("/operations").text

    assert _events(page) == [
        "association_rejected",
        "purge",
        "golive_forced",
        "duplicate",
        "stored",
    ]
    assert "ROGUE@10.0.0.66" in page and "calling AE title ROGUE is not allowed" in page
    assert "m@2 replaces m@1 by override: pilot" in page
    uid = audited.study_uid
    assert f'<a href="/studies/{uid}">{uid}</a>' in page
    assert PATIENT_ID not in page and PATIENT_NAME not in page


def test_the_audit_log_is_filtered_by_event(audited: Audited) -> None:
    test_client = audited.client

    page = test_client.get("/operations", params={"audit_event": "duplicate"}).text
    every = test_client.get("/operations", params={"audit_event": ""}).text
    none = test_client.get("/operations", params={"audit_event": "replaced"}).text

    assert _events(page) == ["duplicate"]
    assert '<option value="duplicate" selected>' in page
    assert len(_events(every)) == 5
    assert _events(none) == [] and "No audit entries of event replaced." in none
    hostile = test_client.get("/operations", params={"audit_event": "<script>"})
    assert hostile.status_code == 422


def test_the_audit_log_pages_are_bounded(audited: Audited) -> None:
    test_client = audited.client
    with audited.sessions.begin() as session:
        for _ in range(AUDIT_PAGE_SIZE):
            repository.audit(session, "duplicate", Peer(calling_ae_title="CT01", host="h"))

    first = test_client.get("/operations").text
    second = test_client.get("/operations", params={"audit_page": 2}).text

    assert len(_events(first)) == AUDIT_PAGE_SIZE
    assert 'id="audit-next" href="/operations?audit_event=&amp;audit_page=2#audit"' in first
    assert 'id="audit-previous"' not in first
    assert _events(second) == [
        "association_rejected",
        "purge",
        "golive_forced",
        "duplicate",
        "stored",
    ]
    assert 'id="audit-next"' not in second and 'id="audit-previous"' in second
    assert test_client.get("/operations", params={"audit_page": 0}).status_code == 422
    assert test_client.get("/operations", params={"audit_page": 10_000}).status_code == 422
