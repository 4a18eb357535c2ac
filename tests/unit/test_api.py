"""The worklist API over a throwaway SQLite catalog, and the process metrics it exposes."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session

from plugin.api import create_app
from plugin.catalog.db import Catalog, make_engine, make_session_factory, open_catalog
from plugin.catalog.models import Instance, Series, Site, Study
from plugin.metrics import PacsclipMetrics, Stage
from plugin.settings import Settings

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STAT_UID = "1.2.826.0.1.3680043.8.498.1"
ROUTINE_UID = "1.2.826.0.1.3680043.8.498.2"
RECEIVING_UID = "1.2.826.0.1.3680043.8.498.3"
PATIENT_ID = "PATIENT-XYZ-123"
SR_UID = "1.2.826.0.1.3680043.8.498.99"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """One catalog for the module: migrations are the slow part, and the tests only read."""
    tmp = tmp_path_factory.mktemp("api")
    catalog = open_catalog(f"sqlite:///{tmp}/c.sqlite3")
    with catalog.sessions.begin() as session:
        site = Site(key="site-a")
        stat = _study(site, STAT_UID, "complete", "stat")
        stat.series = [
            Series(
                series_instance_uid=f"{STAT_UID}.1",
                modality="CR",
                instances=[_instance(f"{STAT_UID}.1.1"), _instance(f"{STAT_UID}.1.2")],
            )
        ]
        session.add_all(
            [
                stat,
                _study(site, ROUTINE_UID, "analysed", "routine"),
                _study(site, RECEIVING_UID, "receiving", None),
            ]
        )
    return catalog


def _study(site: Site, uid: str, state: str, priority: str | None) -> Study:
    return Study(
        study_instance_uid=uid,
        site=site,
        state=state,
        priority=priority,
        patient_id=PATIENT_ID,
        accession_number="ACC1",
        calling_ae_title="MODALITY",
    )


def _instance(uid: str) -> Instance:
    return Instance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"spool/{uid}.dcm",
        size_bytes=10,
        sha256="0" * 64,
        calling_ae_title="MODALITY",
    )


def _settings(tmp_path: Path, token: str | None = TOKEN) -> Settings:
    return Settings(data_dir=tmp_path, api_token=SecretStr(token) if token else None)


def _result(session: Session, study_uid: str) -> list[dict[str, Any]]:
    if study_uid != STAT_UID:
        return []
    return [
        {
            "algorithm": {"name": "demo-cxr", "version": "1.0", "synthetic": True},
            "findings": [{"name": "pneumothorax", "probability": 0.93, "decision": "present"}],
            "priority": "stat",
            "objects": [
                {"kind": "SR", "sop_instance_uid": SR_UID, "series_instance_uid": "1.2.3.4"}
            ],
        }
    ]


@pytest.fixture
def make_client(tmp_path: Path, catalog: Catalog) -> Callable[..., TestClient]:
    def make(token: str | None = TOKEN, **readers: Any) -> TestClient:
        app = create_app(_settings(tmp_path, token), catalog.sessions, PacsclipMetrics(), **readers)
        return TestClient(app)

    return make


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(results_for=_result)


def test_health_needs_no_token_and_checks_the_database(client: TestClient) -> None:
    response = client.get("/api/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_health_reports_an_unreachable_database(tmp_path: Path) -> None:
    # A SQLite file in a folder that does not exist cannot be opened.
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path}/missing/c.sqlite3"))
    client = TestClient(create_app(_settings(tmp_path), sessions, PacsclipMetrics()))

    response = client.get("/api/health")

    assert response.status_code == 503
    assert response.json() == {"status": "error", "database": "error"}
    # Other routes map the database error once, to 503 with a message, not a 500 trace.
    studies = client.get("/api/studies", headers=AUTH)
    assert studies.status_code == 503
    assert "catalog" in studies.json()["detail"]


def test_without_a_configured_token_every_api_request_is_refused(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(token=None)

    response = client.get("/api/studies", headers=AUTH)

    assert response.status_code == 503
    assert "PACSCLIP_API_TOKEN" in response.json()["detail"]
    assert client.get("/api/health").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_a_missing_or_wrong_token_is_refused(client: TestClient, headers: dict[str, str]) -> None:
    for path in ("/api/studies", f"/api/studies/{STAT_UID}"):
        response = client.get(path, headers=headers)

        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_non_ascii_token_is_refused_not_crashed_on(client: TestClient) -> None:
    response = client.get("/api/studies", headers={b"Authorization": "Bearer caf\u00e9".encode()})

    assert response.status_code == 401


def test_lists_studies_with_state_and_priority(client: TestClient) -> None:
    response = client.get("/api/studies", headers=AUTH)

    assert response.status_code == 200
    by_uid = {s["study_instance_uid"]: s for s in response.json()}
    assert set(by_uid) == {STAT_UID, ROUTINE_UID, RECEIVING_UID}
    assert by_uid[STAT_UID]["priority"] == "stat"
    assert by_uid[STAT_UID]["instances"] == 2


def test_filters_studies_by_priority_and_state(client: TestClient) -> None:
    stat = client.get("/api/studies", params={"priority": "stat"}, headers=AUTH).json()
    receiving = client.get("/api/studies", params={"state": "receiving"}, headers=AUTH).json()
    limited = client.get("/api/studies", params={"limit": 1}, headers=AUTH).json()

    assert [s["study_instance_uid"] for s in stat] == [STAT_UID]
    assert [s["study_instance_uid"] for s in receiving] == [RECEIVING_UID]
    assert len(limited) == 1
    # The flag of studies out of the model's distribution is a filter value of its own.
    not_scored = client.get("/api/studies", params={"priority": "not_scored"}, headers=AUTH)
    assert (not_scored.status_code, not_scored.json()) == (200, [])


def test_an_unknown_filter_value_is_a_validation_error(client: TestClient) -> None:
    assert client.get("/api/studies?priority=urgent", headers=AUTH).status_code == 422
    assert client.get("/api/studies?state=lost", headers=AUTH).status_code == 422
    assert client.get("/api/studies?limit=0", headers=AUTH).status_code == 422


def test_study_detail_carries_results_with_object_links(client: TestClient) -> None:
    response = client.get(f"/api/studies/{STAT_UID}", headers=AUTH)

    assert response.status_code == 200
    detail = response.json()
    assert detail["series"][0]["modality"] == "CR"
    (result,) = detail["results"]
    assert result["algorithm"] == {"name": "demo-cxr", "version": "1.0", "synthetic": True}
    assert result["findings"][0]["probability"] == 0.93
    (sr,) = result["objects"]
    assert sr["kind"] == "SR"
    assert sr["link"] == f"/api/studies/{STAT_UID}/objects/{SR_UID}"
    assert PATIENT_ID not in response.text


def test_study_detail_without_results_has_an_empty_list(
    make_client: Callable[..., TestClient],
) -> None:
    detail = make_client().get(f"/api/studies/{ROUTINE_UID}", headers=AUTH).json()

    assert detail["results"] == []


def test_an_unknown_study_is_404_with_a_message(client: TestClient) -> None:
    response = client.get("/api/studies/1.2.3.404", headers=AUTH)

    assert response.status_code == 404
    assert response.json()["detail"] == "no study with Study Instance UID 1.2.3.404"


def test_a_result_object_downloads_when_the_locator_finds_it(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    stored = tmp_path / "sr.dcm"
    stored.write_bytes(b"DICM-bytes")

    def locate(session: Session, study_uid: str, sop_uid: str) -> Path | None:
        return stored if (study_uid, sop_uid) == (STAT_UID, SR_UID) else None

    client = make_client(object_file=locate)
    found = client.get(f"/api/studies/{STAT_UID}/objects/{SR_UID}", headers=AUTH)
    missing = client.get(f"/api/studies/{STAT_UID}/objects/1.2.3", headers=AUTH)
    anonymous = client.get(f"/api/studies/{STAT_UID}/objects/{SR_UID}")

    assert found.status_code == 200
    assert found.content == b"DICM-bytes"
    assert found.headers["content-type"] == "application/dicom"
    assert missing.status_code == 404
    assert anonymous.status_code == 401


def test_metrics_expose_stage_counters_and_catalog_gauges(tmp_path: Path, catalog: Catalog) -> None:
    metrics = PacsclipMetrics()
    app = create_app(
        _settings(tmp_path), catalog.sessions, metrics, failed_dispatch_jobs=lambda s: 2
    )
    metrics.observe_stage(Stage.RECEIVED)
    metrics.observe_stage("analysed", seconds=1.5)

    response = TestClient(app).get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "pacsclip_received_instances_total 1.0" in text
    assert "pacsclip_complete_studies_total 0.0" in text
    assert "pacsclip_complete_to_analysed_seconds_count 1.0" in text
    assert 'pacsclip_complete_to_analysed_seconds_bucket{le="2.0"} 1.0' in text
    assert 'pacsclip_studies{state="complete"} 1.0' in text
    assert 'pacsclip_studies{state="receiving"} 1.0' in text
    assert 'pacsclip_studies{state="delivered"} 0.0' in text
    assert "pacsclip_failed_dispatch_jobs 2.0" in text
    assert "pacsclip_catalog_up 1.0" in text


def test_api_logs_carry_no_patient_data(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    for path in ("/api/studies", f"/api/studies/{STAT_UID}", "/api/studies/1.2.404"):
        client.get(path, headers=AUTH)
    client.get("/api/studies", headers={"Authorization": "Bearer guess-4711"})

    assert caplog.records, "the refused token should have been logged"
    assert PATIENT_ID not in caplog.text
    assert "ACC1" not in caplog.text
    assert "guess-4711" not in caplog.text


def test_catalog_gauges_report_down_instead_of_failing_the_scrape(tmp_path: Path) -> None:
    metrics = PacsclipMetrics()
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path}/missing/c.sqlite3"))
    create_app(_settings(tmp_path), sessions, metrics)

    text = metrics.render().decode()

    assert "pacsclip_catalog_up 0.0" in text
    assert "pacsclip_studies{" not in text


def test_stage_latency_is_refused_for_a_stage_without_one() -> None:
    metrics = PacsclipMetrics()

    with pytest.raises(ValueError, match="no latency"):
        metrics.observe_stage(Stage.RECEIVED, seconds=1.0)
    with pytest.raises(ValueError):
        metrics.observe_stage("uploaded")
    assert b"pacsclip_received_instances_total 0.0" in metrics.render()


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = PacsclipMetrics(), PacsclipMetrics()
    first.observe_stage(Stage.DELIVERED, seconds=0.2)
    first.observe_analysis_duration(0.7)

    assert b"pacsclip_delivered_objects_total 1.0" in first.render()
    assert b"pacsclip_analysis_duration_seconds_count 1.0" in first.render()
    assert b"pacsclip_delivered_objects_total 0.0" in second.render()


def test_a_process_without_the_api_serves_its_metrics_on_its_own_port() -> None:
    metrics = PacsclipMetrics()
    metrics.observe_stage(Stage.COMPLETE, seconds=2.5)
    server, thread = metrics.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    assert "pacsclip_complete_studies_total 1.0" in text
    assert "pacsclip_received_to_complete_seconds_sum 2.5" in text
    assert not thread.is_alive()
