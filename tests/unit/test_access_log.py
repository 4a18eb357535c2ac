"""The access log over a real SQLite catalog and the real app: who opened which patient's study,
read it through the API, changed something or was refused; answered by ``pacsclip audit list
--patient-id`` and the auditor's page; kept through a purge, removed only by age; never
updated. Machine tokens: made, used, revoked without a restart."""

from __future__ import annotations

import datetime
import getpass
import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from plugin.access.tokens import TokenStore
from plugin.catalog.access_log import access_events
from plugin.catalog.db import open_catalog
from plugin.cli.main import app as cli
from plugin.purge import find_target, purge
from plugin.retention import RetentionKind, run_retention
from plugin.roles import Role
from plugin.settings import Settings
from tests.unit.test_dashboard import PATIENT_ID, World, build_world, world  # noqa: F401


@pytest.fixture
def tokens(world: World) -> dict[str, str]:  # noqa: F811
    store = TokenStore(world.settings.data_dir)
    return {
        "rad": store.create("reading-room", [Role.RADIOLOGIST]),
        "pacs": store.create("pacs-team", [Role.PACS_ADMIN]),
        "audit": store.create("compliance", [Role.AUDITOR]),
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def entries(of: World, **where: str) -> list[dict[str, object]]:
    with of.catalog.sessions() as session:
        return access_events(session, **where)  # type: ignore[arg-type]


def test_each_view_of_a_patients_study_is_recorded_with_person_patient_and_status(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    client = TestClient(world.app)
    assert client.get(f"/studies/{world.study_uid}", headers=bearer(tokens["rad"])).is_success
    image = f"/studies/{world.study_uid}/images/{world.source_uid}.png"
    assert client.get(image, headers=bearer(tokens["rad"])).is_success
    assert client.get(f"/api/studies/{world.study_uid}", headers=bearer(tokens["rad"])).is_success
    assert client.get("/api/studies/1.2.3.404", headers=bearer(tokens["rad"])).status_code == 404

    seen = entries(world, patient_id=PATIENT_ID)
    assert [e["action"] for e in reversed(seen)] == ["view_study", "view_image", "api_read_study"]
    for entry in seen:
        assert entry["subject"] == "token:reading-room" and entry["roles"] == "radiologist"
        assert entry["study_instance_uid"] == world.study_uid and entry["status"] == 200
        assert "{study_uid}" in str(entry["route"])  # the route as declared: no UID in it
    missing = entries(world, study_uid="1.2.3.404")
    assert [(e["action"], e["status"], e["patient_id"]) for e in missing] == [
        ("api_read_study", 404, None)
    ]


def test_refusals_and_state_changes_are_recorded(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    client = TestClient(world.app)
    assert client.get("/operations", headers=bearer(tokens["rad"])).status_code == 403
    assert client.get("/api/studies", headers=bearer("pcl_forged")).status_code == 401
    retry = client.post(
        f"/operations/jobs/{world.job_id}/retry",
        headers=bearer(tokens["pacs"]),
        follow_redirects=False,
    )
    assert retry.status_code == 303

    recorded = {(e["action"], e["subject"], e["status"]) for e in entries(world)}
    assert ("denied", "token:reading-room", 403) in recorded
    assert ("refused_token", "unknown", 401) in recorded
    assert ("retry_delivery", "token:pacs-team", 303) in recorded


def test_who_saw_this_patient_from_the_cli_and_the_auditors_page(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    client = TestClient(world.app)
    client.get(f"/studies/{world.study_uid}", headers=bearer(tokens["rad"]))

    env = {"PACSCLIP_DATA_DIR": str(world.settings.data_dir)}
    listed = CliRunner().invoke(cli, ["audit", "list", "--patient-id", PATIENT_ID], env=env)
    assert listed.exit_code == 0, listed.output
    assert "view_study" in listed.output and "reading-room" in listed.output
    other = CliRunner().invoke(cli, ["audit", "list", "--patient-id", "SOMEONE-ELSE"], env=env)
    assert "no access-log entries" in other.output

    # The auditor searches by a POSTed form: the Patient ID is never in a URL.
    assert client.get("/access-log", headers=bearer(tokens["rad"])).status_code == 403
    page = client.post(
        "/access-log", data={"patient_id": PATIENT_ID}, headers=bearer(tokens["audit"])
    )
    assert page.status_code == 200
    rows = re.findall(r'<tr class="access-entry" data-action="([a-z_]+)"', page.text)
    assert rows == ["view_study"]  # the auditor's own search has no patient on it yet
    assert "reading-room" in page.text
    searched = entries(world, subject="token:compliance")
    assert [e["action"] for e in searched] == ["search_access_log"]
    assert PATIENT_ID not in str(searched[0]["route"])


def test_the_log_outlives_a_purge_goes_by_age_and_is_never_updated(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    TestClient(world.app).get(f"/studies/{world.study_uid}", headers=bearer(tokens["rad"]))
    catalog = open_catalog(world.settings.effective_database_url)

    purge(
        world.settings, catalog, find_target(catalog, patient_id=PATIENT_ID), patient_id=PATIENT_ID
    )
    kept = entries(world, patient_id=PATIENT_ID)
    assert [e["action"] for e in kept] == ["view_study"]

    with pytest.raises(DBAPIError, match="never changed"), catalog.engine.begin() as connection:
        connection.execute(text("UPDATE access_event SET subject = 'someone else'"))

    settings = world.settings.model_copy(update={"retention_access_log_days": 30})
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=29)
    assert run_retention(settings, catalog, now=soon).deleted.get(RetentionKind.ACCESS_LOG) == 0
    later = soon + datetime.timedelta(days=2)
    dry = run_retention(settings, catalog, now=later, dry_run=True)
    assert dry.deleted[RetentionKind.ACCESS_LOG] == 1 and entries(world)
    report = run_retention(settings, catalog, now=later)
    assert report.deleted[RetentionKind.ACCESS_LOG] == 1
    assert entries(world) == []


def test_a_revoked_token_is_refused_at_its_next_request(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    env = {"PACSCLIP_DATA_DIR": str(world.settings.data_dir)}
    made = CliRunner().invoke(
        cli, ["tokens", "create", "ris-feed", "--role", "pacs-admin"], env=env
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    client = TestClient(world.app)
    drift = "/api/sites/drift"
    assert client.get(drift, headers=bearer(token)).status_code == 403  # pacs-admin: not its role
    assert client.get("/operations", headers=bearer(token)).status_code == 200

    revoked = CliRunner().invoke(cli, ["tokens", "revoke", "ris-feed"], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert client.get("/operations", headers=bearer(token)).status_code == 401
    listed = CliRunner().invoke(cli, ["tokens", "list", "--json"], env=env)
    assert '"revoked_at": "20' in listed.output and token not in listed.output
    assert token not in (world.settings.data_dir / "api-tokens.json").read_text()
    changes = [e["action"] for e in entries(world, subject=f"cli:{getpass.getuser()}")]
    assert changes == ["token_revoked", "token_created"]


def test_with_only_machine_tokens_a_revoked_one_is_refused_as_unauthorized(
    make_settings: Callable[..., Settings],
) -> None:
    only_tokens = build_world(make_settings())  # no api_token, no provider
    client = TestClient(only_tokens.app)
    assert client.get("/operations", headers=bearer("pcl_x")).status_code == 503  # nobody yet
    store = TokenStore(only_tokens.settings.data_dir)
    token = store.create("ris-feed", [Role.PACS_ADMIN])
    assert client.get("/operations", headers=bearer(token)).status_code == 200
    store.revoke("ris-feed")
    assert client.get("/operations", headers=bearer(token)).status_code == 401
