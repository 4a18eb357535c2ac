"""pacsclip's UPS-RS client against the strict Task Manager peer over real HTTP: it finds only
its own task's scheduled workitems, claims with a new Transaction UID and treats another
performer's claim as taken, reports progress, completes with its outputs listed, cancels with a
reason, reads a workitem's inputs, and reports a Task Manager that is down as worth a retry."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests
from pydicom.uid import generate_uid

from plugin.aiwi.ups import (
    CANCELED,
    COMPLETED,
    IN_PROGRESS,
    ClaimTaken,
    UpsClient,
    UpsError,
    inputs_of,
    performed_procedure,
)
from tests.peers.ports import free_port
from tests.peers.ups_task_manager import TaskManager, triage_workitem

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


@pytest.fixture
def manager() -> Iterator[TaskManager]:
    with TaskManager() as running:
        yield running


@pytest.fixture
def ups(manager: TaskManager) -> Iterator[UpsClient]:
    with requests.Session() as http:
        yield UpsClient(manager.base_url, http, timeout_s=5)


def schedule(manager: TaskManager, code: str = "PACSCLIP-TRIAGE") -> tuple[str, str]:
    study = generate_uid()
    workitem = triage_workitem(
        study,
        generate_uid(),
        [(CT, generate_uid())],
        code_value=code,
        retrieve_url=f"http://pacs.invalid/dicom-web/studies/{study}",
        output_url="http://pacs.invalid/dicom-web/studies",
    )
    return manager.schedule(workitem), study


def test_only_scheduled_workitems_of_its_tasks_are_found(
    manager: TaskManager, ups: UpsClient
) -> None:
    ours, _ = schedule(manager)
    schedule(manager, code="OTHER-TASK")
    claimed, _ = schedule(manager)
    ups.claim(claimed)
    found = [str(w.SOPInstanceUID) for w in ups.scheduled(["PACSCLIP-TRIAGE"])]
    assert found == [ours]
    assert ups.scheduled(["NOBODY"]) == []


def test_a_claim_has_its_own_transaction_uid_and_a_second_claim_is_taken(
    manager: TaskManager, ups: UpsClient
) -> None:
    uid, _ = schedule(manager)
    claim = ups.claim(uid)
    stored = manager.workitem(uid)
    assert stored.ProcedureStepState == IN_PROGRESS
    assert stored.TransactionUID == claim.transaction_uid
    with pytest.raises(ClaimTaken):
        ups.claim(uid)
    assert "TransactionUID" not in ups.get(uid)  # never shown to anyone


def test_progress_then_completion_lists_the_outputs(manager: TaskManager, ups: UpsClient) -> None:
    uid, study = schedule(manager)
    claim = ups.claim(uid)
    ups.progress(claim, 40, "analysing 1 image")
    assert (
        float(
            manager.workitem(uid).ProcedureStepProgressInformationSequence[0].ProcedureStepProgress
        )
        == 40
    )
    series, sop = generate_uid(), generate_uid()
    now = datetime.now(UTC)
    performed = performed_procedure(
        ups.get(uid),
        [(study, series, SR, sop)],
        started=now,
        ended=now,
        station_ae="PACSCLIP",
        retrieve_root="http://pacs.invalid/dicom-web/",
    )
    ups.complete(claim, performed)
    done = manager.workitem(uid)
    assert done.ProcedureStepState == COMPLETED
    [output] = done.UnifiedProcedureStepPerformedProcedureSequence[0].OutputInformationSequence
    assert (output.StudyInstanceUID, output.SeriesInstanceUID) == (study, series)
    assert output.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
    assert output.WADORSRetrievalSequence[0].RetrieveURL == (
        f"http://pacs.invalid/dicom-web/studies/{study}/series/{series}"
    )
    with pytest.raises(UpsError) as again:
        ups.progress(claim, 50, "too late")
    assert again.value.status == 400 and not again.value.retryable


def test_a_cancelled_workitem_carries_the_reason(manager: TaskManager, ups: UpsClient) -> None:
    uid, _ = schedule(manager)
    claim = ups.claim(uid)
    ups.cancel(claim, "the study could not be retrieved: HTTP 404")
    done = manager.workitem(uid)
    assert done.ProcedureStepState == CANCELED
    assert "HTTP 404" in done.ProcedureStepProgressInformationSequence[0].ReasonForCancellation


def test_the_inputs_and_output_destination_are_read_from_where_the_standard_puts_them(
    manager: TaskManager, ups: UpsClient
) -> None:
    uid, study = schedule(manager)
    inputs = inputs_of(ups.get(uid))
    assert inputs.study_uid == study
    assert inputs.retrieve_urls == (f"http://pacs.invalid/dicom-web/studies/{study}",)
    assert inputs.output_url == "http://pacs.invalid/dicom-web/studies"
    empty = ups.get(uid)
    del empty.InputInformationSequence
    with pytest.raises(ValueError, match="no Input Information"):
        inputs_of(empty)
    unretrievable = ups.get(uid)
    del unretrievable.InputInformationSequence[0].WADORSRetrievalSequence
    with pytest.raises(ValueError, match="Retrieve URL"):
        inputs_of(unretrievable)


def test_a_task_manager_that_is_down_is_worth_a_retry(manager: TaskManager, ups: UpsClient) -> None:
    manager.set_available(False)
    with pytest.raises(UpsError) as down:
        ups.scheduled(["PACSCLIP-TRIAGE"])
    assert down.value.status == 503 and down.value.retryable
    with requests.Session() as http:
        nobody = UpsClient(f"http://127.0.0.1:{free_port()}/dicom-web", http, timeout_s=5)
        with pytest.raises(UpsError) as gone:
            nobody.scheduled(["PACSCLIP-TRIAGE"])
    assert gone.value.status is None and gone.value.retryable
