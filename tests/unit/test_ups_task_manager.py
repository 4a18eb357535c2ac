"""Conformance of the UPS-RS Task Manager test peer, over real HTTP on 127.0.0.1.

Each test checks one rule of DICOM PS3.18 section 11 / PS3.4 Annex CC that the peer enforces, so
that a performer tested against it is held to the standard.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.peers.ports import free_port
from tests.peers.ups_task_manager import (
    CANCELED,
    COMPLETED,
    IN_PROGRESS,
    SCHEDULED,
    TaskManager,
    WorkitemRefused,
    code_item,
    triage_workitem,
)

DICOM_JSON = "application/dicom+json"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_UID = "1.2.826.0.1.3680043.8.498.100"
SERIES_UID = "1.2.826.0.1.3680043.8.498.100.1"
SOP_UID = "1.2.826.0.1.3680043.8.498.100.1.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def manager() -> Iterator[TaskManager]:
    with TaskManager() as running:
        yield running


@pytest.fixture
def client(manager: TaskManager) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=manager.base_url, timeout=10) as http:
        yield http


def workitem(**changes: Any) -> Dataset:
    ds = triage_workitem(
        STUDY_UID,
        SERIES_UID,
        [(CT_IMAGE, SOP_UID)],
        retrieve_url=f"http://127.0.0.1:1/dicom-web/studies/{STUDY_UID}",
        output_url="http://127.0.0.1:1/dicom-web/studies",
    )
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def body(ds: Dataset) -> bytes:
    return json.dumps(ds.to_json_dict()).encode()


def send(client: httpx.Client, method: str, url: str, ds: Dataset | None = None) -> httpx.Response:
    content = body(ds) if ds is not None else None
    headers = {"Content-Type": DICOM_JSON, "Accept": DICOM_JSON}
    return client.request(method, url, content=content, headers=headers)


def state_request(state: str, transaction_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.ProcedureStepState = state
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    return ds


def claim(client: httpx.Client, uid: str, transaction_uid: str | None) -> httpx.Response:
    return send(
        client, "PUT", f"/workitems/{uid}/state", state_request(IN_PROGRESS, transaction_uid)
    )


def progress(percent: str) -> Dataset:
    item = Dataset()
    item.ProcedureStepProgress = percent
    item.ProcedureStepProgressDescription = "triage running"
    ds = Dataset()
    ds.ProcedureStepProgressInformationSequence = [item]
    return ds


def performed(transaction_uid: str, *, with_output: bool = True) -> Dataset:
    """The N-SET a performer sends before COMPLETED (Final State codes P of Table CC.2.5-3)."""
    step = Dataset()
    step.PerformedStationNameCodeSequence = [code_item("PACSCLIP", "99PACSCLIP", "pacsclip")]
    step.PerformedProcedureStepStartDateTime = "20250304050607"
    step.PerformedProcedureStepEndDateTime = "20250304050707"
    step.PerformedWorkitemCodeSequence = [
        code_item("PACSCLIP-TRIAGE", "99PACSCLIP", "pacsclip triage of a study")
    ]
    output = Dataset()
    output.TypeOfInstances = "DICOM"
    output.StudyInstanceUID = STUDY_UID
    output.SeriesInstanceUID = generate_uid()
    reference = Dataset()
    reference.ReferencedSOPClassUID = SR_CLASS
    reference.ReferencedSOPInstanceUID = generate_uid()
    output.ReferencedSOPSequence = [reference]
    step.OutputInformationSequence = [output] if with_output else []
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.UnifiedProcedureStepPerformedProcedureSequence = [step]
    return ds


def cancellation(transaction_uid: str) -> Dataset:
    """The N-SET before CANCELED (Final State codes X of Table CC.2.5-3)."""
    item = Dataset()
    item.ProcedureStepCancellationDateTime = "20250304050707"
    item.ReasonForCancellation = "input series not a chest CT"
    item.ProcedureStepDiscontinuationReasonCodeSequence = [
        code_item("110513", "DCM", "Discontinued for unspecified reason")
    ]
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ProcedureStepProgressInformationSequence = [item]
    return ds


def claimed(manager: TaskManager, client: httpx.Client) -> tuple[str, str]:
    uid, transaction_uid = manager.schedule(workitem()), generate_uid()
    assert claim(client, uid, transaction_uid).status_code == 200
    return uid, transaction_uid


def warning(response: httpx.Response) -> str:
    return str(response.headers.get("Warning", ""))


def test_create_search_and_retrieve_without_transaction_uid(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid = generate_uid()
    created = send(client, "POST", f"/workitems?{uid}", workitem())
    assert created.status_code == 201
    assert created.headers["Location"] == f"{manager.base_url}/workitems/{uid}"
    assert send(client, "POST", f"/workitems?{uid}", workitem()).status_code == 409

    found = client.get(
        "/workitems",
        params={"ProcedureStepState": SCHEDULED, "00404018.00080100": "PACSCLIP-TRIAGE"},
        headers={"Accept": DICOM_JSON},
    )
    assert found.status_code == 200
    assert found.headers["Content-Type"] == DICOM_JSON
    [match] = found.json()
    assert match["00080018"]["Value"] == [uid]
    assert "00081195" not in match
    other_code = client.get("/workitems", params={"00404018.00080100": "OTHER"})
    assert other_code.status_code == 204
    assert client.get("/workitems", params={"ProcedureStepState": IN_PROGRESS}).status_code == 204

    assert claim(client, uid, generate_uid()).status_code == 200
    retrieved = client.get(f"/workitems/{uid}", headers={"Accept": DICOM_JSON})
    assert retrieved.status_code == 200
    [dataset] = retrieved.json()
    assert dataset["00741000"]["Value"] == [IN_PROGRESS]
    assert "00081195" not in dataset  # PS3.18 11.5.2: the lock is never returned
    assert "TransactionUID" in manager.workitem(uid)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ProcedureStepState": IN_PROGRESS}, "SCHEDULED"),
        ({"TransactionUID": "1.2.3.4"}, "TransactionUID shall be empty"),
        ({"ProcedureStepLabel": ""}, "ProcedureStepLabel"),
        ({"ScheduledProcedureStepPriority": "URGENT"}, "ScheduledProcedureStepPriority"),
    ],
)
def test_create_refuses_a_workitem_that_is_not_a_valid_scheduled_one(
    client: httpx.Client, change: dict[str, str], reason: str
) -> None:
    response = send(client, "POST", f"/workitems?{generate_uid()}", workitem(**change))
    assert response.status_code == 400
    assert reason in warning(response)
    assert warning(response).startswith("299 http://127.0.0.1:")


def test_create_needs_type_2_attributes_and_a_retrieval_location(
    manager: TaskManager,
) -> None:
    without_type_2 = workitem()
    del without_type_2.AdmissionID
    with pytest.raises(WorkitemRefused, match="AdmissionID"):
        manager.schedule(without_type_2)
    without_location = workitem()
    del without_location.InputInformationSequence[0].WADORSRetrievalSequence
    with pytest.raises(WorkitemRefused, match="retrieval location"):
        manager.schedule(without_location)


def test_triage_workitem_places_urls_where_the_standard_does() -> None:
    ds = workitem()
    source = ds.InputInformationSequence[0]
    assert source.WADORSRetrievalSequence[0].RetrieveURL.endswith(f"/studies/{STUDY_UID}")
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == SOP_UID
    storage = ds.OutputDestinationSequence[0].STOWRSStorageSequence[0]
    assert storage.StorageURL == "http://127.0.0.1:1/dicom-web/studies"
    assert ds.ScheduledWorkitemCodeSequence[0].CodingSchemeDesignator == "99PACSCLIP"


def test_create_refuses_other_media_types(client: httpx.Client) -> None:
    response = client.post(
        f"/workitems?{generate_uid()}",
        content=body(workitem()),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 415


def test_search_refuses_unknown_and_unsupported_keys_and_pages(
    manager: TaskManager, client: httpx.Client
) -> None:
    uids = [manager.schedule(workitem()) for _ in range(3)]
    assert client.get("/workitems", params={"NoSuchKeyword": "1"}).status_code == 400
    assert client.get("/workitems", params={"PatientWeight": "70"}).status_code == 400
    assert client.get("/workitems", params={"includefield": "00081195"}).status_code == 400
    assert client.get("/workitems", params={"limit": "-1"}).status_code == 400

    page = client.get("/workitems", params={"limit": "2", "offset": "1"})
    assert page.status_code == 200
    assert [ds["00080018"]["Value"][0] for ds in page.json()] == uids[1:]
    first = client.get("/workitems", params={"limit": "1"})
    assert "There are 2 additional results" in warning(first)
    assert "00101010" not in first.json()[0]
    included = client.get("/workitems", params={"limit": "1", "includefield": "00404070"})
    assert "00404070" in included.json()[0]


def test_claim_needs_a_transaction_uid_and_a_second_claim_conflicts(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid, first = manager.schedule(workitem()), generate_uid()
    missing = claim(client, uid, None)
    assert missing.status_code == 400
    assert "The Transaction UID is missing." in warning(missing)

    assert claim(client, uid, first).status_code == 200
    assert manager.workitem(uid).TransactionUID == first
    second = claim(client, uid, generate_uid())
    assert second.status_code == 409
    assert manager.workitem(uid).TransactionUID == first
    assert [(h["op"], h["state_after"], h["status"]) for h in manager.history(uid)] == [
        ("create", SCHEDULED, 201),
        ("change_state", SCHEDULED, 400),
        ("change_state", IN_PROGRESS, 200),
        ("change_state", IN_PROGRESS, 409),
    ]


def test_update_needs_the_owners_transaction_uid(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid, owner = claimed(manager, client)
    anonymous = send(client, "POST", f"/workitems/{uid}", progress("50"))
    assert anonymous.status_code == 400
    assert "missing" in warning(anonymous)
    wrong = progress("50")
    wrong.TransactionUID = generate_uid()
    assert send(client, "POST", f"/workitems/{uid}", wrong).status_code == 400
    assert not manager.workitem(uid).ProcedureStepProgressInformationSequence

    right = progress("50")
    right.TransactionUID = owner
    assert send(client, "POST", f"/workitems/{uid}", right).status_code == 200
    stored = manager.workitem(uid).ProcedureStepProgressInformationSequence[0]
    assert float(stored.ProcedureStepProgress) == 50
    # PS3.18 11.6.1: the Transaction UID may come as the bare query instead.
    assert send(client, "POST", f"/workitems/{uid}?{owner}", progress("75")).status_code == 200
    stored = manager.workitem(uid).ProcedureStepProgressInformationSequence[0]
    assert float(stored.ProcedureStepProgress) == 75


def test_update_may_not_change_the_state(manager: TaskManager, client: httpx.Client) -> None:
    uid, owner = claimed(manager, client)
    sneaky = progress("90")
    sneaky.TransactionUID = owner
    sneaky.ProcedureStepState = COMPLETED
    assert send(client, "POST", f"/workitems/{uid}", sneaky).status_code == 400
    assert manager.workitem(uid).ProcedureStepState == IN_PROGRESS


def test_complete_needs_the_final_state_attributes(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid, owner = claimed(manager, client)
    complete = state_request(COMPLETED, owner)
    wrong_owner = send(client, "PUT", f"/workitems/{uid}/state", state_request(COMPLETED, "1.2.3"))
    assert wrong_owner.status_code == 400
    assert "The Transaction UID is incorrect." in warning(wrong_owner)
    bare = send(client, "PUT", f"/workitems/{uid}/state", complete)
    assert bare.status_code == 409
    assert "PerformedWorkitemCodeSequence" in warning(bare)

    assert (
        send(client, "POST", f"/workitems/{uid}", performed(owner, with_output=False)).status_code
        == 200
    )
    no_output = send(client, "PUT", f"/workitems/{uid}/state", complete)
    assert no_output.status_code == 409
    assert "OutputInformationSequence" in warning(no_output)
    assert manager.workitem(uid).ProcedureStepState == IN_PROGRESS

    assert send(client, "POST", f"/workitems/{uid}", performed(owner)).status_code == 200
    assert send(client, "PUT", f"/workitems/{uid}/state", complete).status_code == 200
    assert manager.workitem(uid).ProcedureStepState == COMPLETED


def test_a_completed_workitem_refuses_further_changes(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid, owner = claimed(manager, client)
    assert send(client, "POST", f"/workitems/{uid}", performed(owner)).status_code == 200
    assert (
        send(client, "PUT", f"/workitems/{uid}/state", state_request(COMPLETED, owner)).status_code
        == 200
    )

    again = send(client, "PUT", f"/workitems/{uid}/state", state_request(COMPLETED, owner))
    assert again.status_code == 200  # B306: a retry of the same completion is a warning
    assert "already in the requested state of COMPLETED" in warning(again)
    cancel = send(client, "PUT", f"/workitems/{uid}/state", state_request(CANCELED, owner))
    assert cancel.status_code == 409
    assert claim(client, uid, generate_uid()).status_code == 409
    update = progress("10")
    update.TransactionUID = owner
    assert send(client, "POST", f"/workitems/{uid}", update).status_code == 400  # 11.6.2
    assert send(client, "POST", f"/workitems/{uid}/cancelrequest").status_code == 409
    assert manager.workitem(uid).ProcedureStepState == COMPLETED


def test_complete_or_cancel_of_a_scheduled_workitem_conflicts(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid = manager.schedule(workitem())
    for state in (COMPLETED, CANCELED):
        response = send(client, "PUT", f"/workitems/{uid}/state", state_request(state, "1.2.3"))
        assert response.status_code == 409
    assert (
        send(
            client, "PUT", f"/workitems/{uid}/state", state_request(SCHEDULED, "1.2.3")
        ).status_code
        == 400
    )
    assert manager.workitem(uid).ProcedureStepState == SCHEDULED


def test_cancel_with_a_reason(manager: TaskManager, client: httpx.Client) -> None:
    uid, owner = claimed(manager, client)
    cancel = state_request(CANCELED, owner)
    bare = send(client, "PUT", f"/workitems/{uid}/state", cancel)
    assert bare.status_code == 409
    assert "ProcedureStepCancellationDateTime" in warning(bare)
    assert send(client, "POST", f"/workitems/{uid}", cancellation(owner)).status_code == 200
    assert send(client, "PUT", f"/workitems/{uid}/state", cancel).status_code == 200
    stored = manager.workitem(uid)
    assert stored.ProcedureStepState == CANCELED
    reason = stored.ProcedureStepProgressInformationSequence[0].ReasonForCancellation
    assert reason == "input series not a chest CT"


def test_request_cancellation(manager: TaskManager, client: httpx.Client) -> None:
    scheduled = manager.schedule(workitem())
    request = Dataset()
    request.ReasonForCancellation = "order withdrawn"
    accepted = send(client, "POST", f"/workitems/{scheduled}/cancelrequest", request)
    assert accepted.status_code == 202
    canceled = manager.workitem(scheduled)
    assert canceled.ProcedureStepState == CANCELED
    assert (
        canceled.ProcedureStepProgressInformationSequence[0].ReasonForCancellation
        == "order withdrawn"
    )
    repeated = send(client, "POST", f"/workitems/{scheduled}/cancelrequest", request)
    assert repeated.status_code == 202
    assert "already in the requested state of CANCELED" in warning(repeated)

    running, _ = claimed(manager, client)
    assert send(client, "POST", f"/workitems/{running}/cancelrequest", request).status_code == 202
    assert manager.workitem(running).ProcedureStepState == IN_PROGRESS
    assert manager.history(running)[-1]["op"] == "request_cancellation"
    not_action_information = Dataset()
    not_action_information.PatientID = "X"
    assert (
        send(
            client, "POST", f"/workitems/{running}/cancelrequest", not_action_information
        ).status_code
        == 400
    )


def test_unknown_workitems_and_methods(client: httpx.Client) -> None:
    unknown = generate_uid()
    assert client.get(f"/workitems/{unknown}").status_code == 404
    assert claim(client, unknown, generate_uid()).status_code == 404
    assert send(client, "POST", f"/workitems/{unknown}", progress("1")).status_code == 404
    assert send(client, "POST", f"/workitems/{unknown}/cancelrequest").status_code == 404
    assert client.delete(f"/workitems/{unknown}").status_code == 405
    assert client.get(f"/workitems/{unknown}/state").status_code == 405
    assert client.put("/workitems").status_code == 405
    assert client.post(f"/workitems/{unknown}/subscribers/PACSCLIP").status_code == 404


def test_a_task_manager_that_is_down_answers_503(
    manager: TaskManager, client: httpx.Client
) -> None:
    uid = manager.schedule(workitem())
    manager.set_available(False)
    assert client.get("/workitems").status_code == 503
    assert claim(client, uid, generate_uid()).status_code == 503
    assert manager.workitem(uid).ProcedureStepState == SCHEDULED
    manager.set_available(True)
    assert client.get("/workitems").status_code == 200


class _Upstream(BaseHTTPRequestHandler):
    """A DICOMweb origin that echoes what it was sent."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[dict[str, Any]]] = []

    def _echo(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "accept": self.headers.get("Accept"),
                "content_type": self.headers.get("Content-Type"),
                "body": body,
            }
        )
        answer = b'{"echo": true}'
        self.send_response(200 if self.command == "GET" else 202)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_studies_requests_are_forwarded_to_the_dicomweb_upstream() -> None:
    port = free_port()
    _Upstream.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", port), _Upstream)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with (
            TaskManager(dicomweb_upstream=f"http://127.0.0.1:{port}/orthanc/dicom-web/") as tm,
            httpx.Client(base_url=tm.base_url, timeout=10) as http,
        ):
            metadata = http.get(
                f"/studies/{STUDY_UID}/metadata?includefield=all",
                headers={"Accept": DICOM_JSON},
            )
            stored = http.post(
                "/studies",
                content=b"--b\r\n...\r\n--b--",
                headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
            )
    finally:
        server.shutdown()
        server.server_close()
    assert (metadata.status_code, metadata.json()) == (200, {"echo": True})
    assert stored.status_code == 202
    get, post = _Upstream.seen
    assert get["method"] == "GET"
    assert get["path"] == f"/orthanc/dicom-web/studies/{STUDY_UID}/metadata?includefield=all"
    assert get["accept"] == DICOM_JSON
    assert (post["method"], post["path"]) == ("POST", "/orthanc/dicom-web/studies")
    assert post["content_type"].startswith("multipart/related")
    assert post["body"] == b"--b\r\n...\r\n--b--"
