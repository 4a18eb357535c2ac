"""The task performer's steps one tick at a time, in this process, against the strict Task
Manager peer over HTTP and a real SQLite catalog: a Task Manager that is down (retried and
shown on the operations page), a claim of its own found again after a crash, another
performer's claim, and workitems it cannot do (no inputs, no output destination), which are
cancelled with the reason."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydicom.uid import generate_uid

from dicom_node.celery_publisher import CeleryPublisher
from dicom_node.performer import Performer
from dicom_node.routing import default_rules
from dicom_node.workitem_intake import WorkitemIntake
from plugin.aiwi.ups import UpsClient
from plugin.catalog.db import open_catalog
from plugin.catalog.ups_workitems import (
    journal_claim,
    open_workitems,
    performer_statuses,
    recent_workitems,
)
from plugin.dicomweb import WebAuth, http_session
from plugin.settings import Settings
from plugin.task_queue import make_celery
from tests.peers.ports import free_port
from tests.peers.ups_task_manager import TaskManager, triage_workitem
from tests.unit.test_dashboard import TOKEN, build_world, login

CT = "1.2.840.10008.5.1.4.1.1.2"
AE = "PERFORMER_T"


@pytest.fixture
def manager() -> Iterator[TaskManager]:
    with TaskManager() as running:
        yield running


@pytest.fixture
def performer(
    make_settings: Callable[..., Settings], manager: TaskManager
) -> Callable[..., Performer]:
    def make(**overrides: object) -> Performer:
        settings = make_settings(
            ups_url=manager.base_url,
            ups_ae_title=AE,
            api_token=TOKEN,
            ups_poll_interval_s=0.001,
            **overrides,
        )
        catalog = open_catalog(settings.effective_database_url)
        web = http_session(WebAuth())
        return Performer(
            settings,
            catalog,
            UpsClient(manager.base_url, web, timeout_s=5),
            web,
            WorkitemIntake(settings, catalog, default_rules()),
            CeleryPublisher(make_celery(settings), catalog.sessions),
        )

    return make


def schedule(manager: TaskManager, *, output: bool = True, retrieve_port: int = 0) -> str:
    study = generate_uid()
    port = retrieve_port or free_port()  # nothing listens: inputs are worth a retry
    return manager.schedule(
        triage_workitem(
            study,
            generate_uid(),
            [(CT, generate_uid())],
            retrieve_url=f"http://127.0.0.1:{port}/dicom-web/studies/{study}",
            output_url=f"{manager.base_url}/studies" if output else None,
        )
    )


def steps(performer: Performer) -> dict[str, str]:
    with performer.sessions() as session:
        return {r["workitem_uid"]: r["step"] for r in recent_workitems(session)}


def reason_of(manager: TaskManager, uid: str) -> str:
    [item] = manager.workitem(uid).ProcedureStepProgressInformationSequence
    return str(item.ReasonForCancellation)


def test_a_task_manager_that_is_down_is_retried_and_shown_on_the_operations_page(
    performer: Callable[..., Performer], manager: TaskManager
) -> None:
    doer = performer()
    manager.set_available(False)
    doer.tick()
    with doer.sessions() as session:
        [status] = performer_statuses(session)
    assert not status.reachable and status.down_since is not None
    assert "HTTP 503" in (status.last_error or "")
    world = build_world(doer.settings)
    client = world.client()
    login(client)
    page = client.get("/operations").text
    assert f'data-performer="{AE}"' in page and "Task Manager not reachable" in page

    manager.set_available(True)
    uid = schedule(manager)
    doer.tick()
    with doer.sessions() as session:
        [status] = performer_statuses(session)
    assert status.reachable and status.down_since is None
    assert "Task Manager answers" in client.get("/operations").text
    # Claimed; its inputs do not answer yet, so it waits for a retry, claimed.
    assert steps(doer) == {uid: "claimed"}
    assert str(manager.workitem(uid).ProcedureStepState) == "IN PROGRESS"


def test_its_own_claim_sent_before_a_crash_is_found_again(
    performer: Callable[..., Performer], manager: TaskManager
) -> None:
    doer = performer()
    uid = schedule(manager)
    with doer.sessions() as session:
        journaled = journal_claim(session, uid, AE, generate_uid(), "PACSCLIP-TRIAGE")
    assert journaled is not None
    # The claim reached the Task Manager; the performer died before it wrote that down.
    doer.ups.claim(uid, journaled.transaction_uid)
    doer.tick()
    assert steps(doer) == {uid: "claimed"}
    claims = [h for h in manager.history(uid) if h["state_after"] == "IN PROGRESS"]
    assert [h["status"] for h in claims if h["op"] == "change_state"] == [200, 409]


def test_another_performers_claim_is_left_to_it(
    performer: Callable[..., Performer], manager: TaskManager
) -> None:
    doer = performer()
    uid = schedule(manager)
    with doer.sessions() as session:
        journal_claim(session, uid, AE, generate_uid(), "PACSCLIP-TRIAGE")
    doer.ups.claim(uid, generate_uid())  # someone else's Transaction UID
    doer.tick()
    assert steps(doer) == {uid: "taken"}
    with doer.sessions() as session:
        assert open_workitems(session, AE) == []


def test_a_workitem_without_output_destination_is_cancelled_with_the_reason(
    performer: Callable[..., Performer], manager: TaskManager
) -> None:
    doer = performer()
    uid = schedule(manager, output=False)
    doer.tick()
    assert steps(doer) == {uid: "canceled"}
    assert str(manager.workitem(uid).ProcedureStepState) == "CANCELED"
    assert "names no Output Destination" in reason_of(manager, uid)


def test_a_workitem_without_inputs_is_cancelled_with_the_reason(
    performer: Callable[..., Performer], manager: TaskManager
) -> None:
    doer = performer()
    workitem = triage_workitem(
        generate_uid(),
        generate_uid(),
        [(CT, generate_uid())],
        retrieve_url="http://127.0.0.1:9/dicom-web/studies/1.2.3",
        output_url=f"{manager.base_url}/studies",
    )
    workitem.InputInformationSequence = []
    uid = manager.schedule(workitem)
    doer.tick()
    assert steps(doer) == {uid: "canceled"}
    assert "no Input Information Sequence" in reason_of(manager, uid)


def test_unretrievable_inputs_are_given_up_after_the_configured_time(
    performer: Callable[..., Performer], manager: TaskManager
) -> None:
    doer = performer(ups_give_up_after_s=60)
    uid = schedule(manager)
    doer.tick()  # claimed; the retrieve finds nobody: retry later
    with doer.sessions() as session:
        [row] = open_workitems(session, AE)
    assert row.step == "claimed" and "could not connect" in (row.reason or "")
    later = datetime.now(UTC) + timedelta(seconds=61)
    doer.now = lambda: later
    doer.tick()
    assert steps(doer) == {uid: "canceled"}
    assert reason_of(manager, uid).startswith("gave up after 60 s: WADO-RS retrieve")


class _NotDicomJson(BaseHTTPRequestHandler):
    """A Task Manager behind a proxy that answers its own HTML page with 200."""

    def do_GET(self) -> None:
        body = b"<html><body>Maintenance</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_answer_that_is_not_dicom_json_is_an_outage_not_a_crash(
    make_settings: Callable[..., Settings],
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotDicomJson)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        settings = make_settings(ups_url=url, ups_ae_title=AE)
        catalog = open_catalog(settings.effective_database_url)
        web = http_session(WebAuth())
        doer = Performer(
            settings,
            catalog,
            UpsClient(url, web, timeout_s=5),
            web,
            WorkitemIntake(settings, catalog, default_rules()),
            CeleryPublisher(make_celery(settings), catalog.sessions),
        )
        doer.tick()  # raises nothing
        with doer.sessions() as session:
            [status] = performer_statuses(session)
        assert not status.reachable and "not DICOM JSON" in (status.last_error or "")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
