"""A UPS-RS client for a task performer: find scheduled workitems [RAD-81], read one [RAD-83],
claim it [RAD-82], report progress [RAD-84], complete or cancel it [RAD-85].

Requests and answers are DICOM JSON (``application/dicom+json``) over one requests session, the
same one the performer's WADO-RS and STOW-RS go through (``plugin.dicomweb``), which carries the
Task Manager's auth (a bearer token, or a client certificate for mTLS). dicomweb-client has no
UPS-RS calls; these are written here on that session. The
performer's rules of the standard live here: a claim carries a new Transaction UID; a 409 on a
claim means another performer took the workitem (ClaimTaken, not an error); the final state's
attributes go in an Update before the state change, which carries only the state and the
Transaction UID.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import requests
from pydicom import Dataset
from pydicom.uid import generate_uid

from plugin.errors import PacsclipError

DICOM_JSON: Final = "application/dicom+json"
SCHEDULED: Final = "SCHEDULED"
IN_PROGRESS: Final = "IN PROGRESS"
COMPLETED: Final = "COMPLETED"
CANCELED: Final = "CANCELED"


# The Task Manager refuses our credentials: nothing a workitem did, nothing it can fix.
AUTH: Final = frozenset({401, 403})


class UpsError(PacsclipError):
    """The Task Manager refused a request, or did not answer."""

    def __init__(self, what: str, status: int | None, warning: str | None = None) -> None:
        reason = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{what}: {reason}{f' ({warning})' if warning else ''}")
        self.status, self.warning = status, warning

    @property
    def retryable(self) -> bool:
        """Worth trying again later: no answer, the Task Manager's own trouble, or our
        credentials refused (an operator fixes those; the workitem stays ours meanwhile)."""
        return (
            self.status is None or self.status >= 500 or self.status == 429 or self.status in AUTH
        )


class ClaimTaken(UpsError):
    """Another performer claimed the workitem first (409 on the claim): skip it."""


@dataclass(frozen=True)
class Claim:
    workitem_uid: str
    transaction_uid: str


class UpsClient:
    """One Task Manager, at ``base_url`` (the UPS-RS root: ``{base_url}/workitems``)."""

    def __init__(self, base_url: str, session: requests.Session, *, timeout_s: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = session
        self.timeout_s = timeout_s
        # The last request's outcome for the performer's heartbeat: None when no request was
        # made since ``forget_contact``, "" when the Task Manager answered, else why not.
        self.contact: str | None = None

    def forget_contact(self) -> None:
        self.contact = None

    def scheduled(self, task_codes: Sequence[str], *, limit: int = 20) -> list[Dataset]:
        """SCHEDULED, READY workitems whose Scheduled Workitem Code is one of ``task_codes``."""
        found: list[Dataset] = []
        for code in task_codes:
            params = {
                "ProcedureStepState": SCHEDULED,
                "InputReadinessState": "READY",
                "ScheduledWorkitemCodeSequence.CodeValue": code,
                "limit": str(limit),
            }
            answer = self._send("GET", "/workitems", "search workitems", params=params)
            if answer.status_code == 204:
                continue
            found += self._datasets(answer, "search workitems")
        return found

    def get(self, uid: str) -> Dataset:
        what = f"retrieve workitem {uid}"
        found = self._datasets(self._send("GET", f"/workitems/{uid}", what), what)
        if not found:
            self.contact = f"{what}: an empty answer"
            raise UpsError(what, None, "an empty answer")
        return found[0]

    def claim(self, uid: str, transaction_uid: str | None = None) -> Claim:
        """IN PROGRESS under a new Transaction UID (or ``transaction_uid``, decided before the
        call so that a performer that dies right after it still knows its own claim)."""
        transaction = transaction_uid or generate_uid()
        try:
            self._change_state(uid, IN_PROGRESS, transaction)
        except UpsError as exc:
            if exc.status == 409:
                raise ClaimTaken(f"claim workitem {uid}", 409, exc.warning) from exc
            raise
        return Claim(uid, transaction)

    def progress(self, claim: Claim, percent: float, description: str) -> None:
        item = Dataset()
        item.ProcedureStepProgress = f"{max(0.0, min(100.0, percent)):g}"
        item.ProcedureStepProgressDescription = description[:64]
        changes = Dataset()
        changes.ProcedureStepProgressInformationSequence = [item]
        self._update(claim, changes, f"report progress of {claim.workitem_uid}")

    def complete(self, claim: Claim, performed: Dataset) -> None:
        """Set the Performed Procedure Sequence (``performed``: its one item), then COMPLETED."""
        changes = Dataset()
        changes.UnifiedProcedureStepPerformedProcedureSequence = [performed]
        self._update(claim, changes, f"record the outputs of {claim.workitem_uid}")
        self._change_state(claim.workitem_uid, COMPLETED, claim.transaction_uid)

    def cancel(self, claim: Claim, reason: str) -> None:
        """CANCELED with ``reason`` (Reason For Cancellation) and its discontinuation code."""
        item = Dataset()
        item.ProcedureStepCancellationDateTime = _now()
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "110513", "DCM"
        code.CodeMeaning = "Discontinued for unspecified reason"
        item.ProcedureStepDiscontinuationReasonCodeSequence = [code]
        item.ReasonForCancellation = reason[:1024]
        changes = Dataset()
        changes.ProcedureStepProgressInformationSequence = [item]
        self._update(claim, changes, f"record why {claim.workitem_uid} is cancelled")
        self._change_state(claim.workitem_uid, CANCELED, claim.transaction_uid)

    def _datasets(self, answer: requests.Response, what: str) -> list[Dataset]:
        """The workitems of a DICOM JSON answer. An answer that is none (a proxy's page, a
        malformed element) is the Task Manager's trouble: a retry, never a crash."""
        try:
            body = answer.json()
            items = body if isinstance(body, list) else [body]
            return [Dataset.from_json(item) for item in items]
        except Exception as exc:  # requests' JSON error, or pydicom's several kinds
            error = UpsError(what, None, f"the answer is not DICOM JSON ({type(exc).__name__})")
            self.contact = str(error)
            raise error from exc

    def _update(self, claim: Claim, changes: Dataset, what: str) -> None:
        # The Transaction UID both as the bare query of PS3.18 11.6.1 (POST
        # /workitems/{uid}?{transaction-uid}) and in the payload, as N-SET carries it.
        changes.TransactionUID = claim.transaction_uid
        path = f"/workitems/{claim.workitem_uid}?{claim.transaction_uid}"
        self._send("POST", path, what, body=changes)

    def _change_state(self, uid: str, state: str, transaction_uid: str) -> None:
        change = Dataset()
        change.ProcedureStepState = state
        change.TransactionUID = transaction_uid
        self._send("PUT", f"/workitems/{uid}/state", f"set workitem {uid} {state}", body=change)

    def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: dict[str, str] | None = None,
        body: Dataset | None = None,
    ) -> requests.Response:
        content = None if body is None else json.dumps([body.to_json_dict()])
        headers = {"Accept": DICOM_JSON}
        if content is not None:
            headers["Content-Type"] = DICOM_JSON
        try:
            answer = self.http.request(
                method,
                self.base_url + path,
                params=params,
                data=content,
                headers=headers,
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            error = UpsError(what, None, type(exc).__name__)
            self.contact = str(error)
            raise error from exc
        if answer.status_code >= 400:
            error = UpsError(what, answer.status_code, answer.headers.get("Warning"))
            self.contact = str(error) if error.retryable or answer.status_code in AUTH else ""
            raise error
        self.contact = ""
        return answer


def _now() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")


def performed_procedure(
    workitem: Dataset,
    outputs: Sequence[tuple[str, str, str, str]],
    *,
    started: datetime,
    ended: datetime,
    station_ae: str,
    retrieve_root: str | None = None,
) -> Dataset:
    """The one item of the Unified Procedure Step Performed Procedure Sequence: what was done
    (the scheduled task's code), where (this performer), when, and the outputs as (Study,
    Series, SOP Class, SOP Instance) UIDs; with ``retrieve_root`` (the DICOMweb root they were
    stored to) each output series' WADO-RS URL."""
    performed = Dataset()
    station = Dataset()
    station.CodeValue, station.CodingSchemeDesignator = station_ae, "99PACSCLIP"
    station.CodeMeaning = f"pacsclip task performer {station_ae}"
    performed.PerformedStationNameCodeSequence = [station]
    performed.PerformedWorkitemCodeSequence = list(workitem.ScheduledWorkitemCodeSequence)
    performed.PerformedProcedureStepStartDateTime = started.strftime("%Y%m%d%H%M%S+0000")
    performed.PerformedProcedureStepEndDateTime = ended.strftime("%Y%m%d%H%M%S+0000")
    by_series: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for study, series, sop_class, sop_instance in outputs:
        by_series.setdefault((study, series), []).append((sop_class, sop_instance))
    items = []
    for (study, series), instances in by_series.items():
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID, item.SeriesInstanceUID = study, series
        refs = []
        for sop_class, sop_instance in instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_instance
            refs.append(ref)
        item.ReferencedSOPSequence = refs
        if retrieve_root:
            location = Dataset()
            location.RetrieveURL = f"{retrieve_root.rstrip('/')}/studies/{study}/series/{series}"
            item.WADORSRetrievalSequence = [location]
        items.append(item)
    performed.OutputInformationSequence = items
    return performed


@dataclass(frozen=True)
class WorkitemInputs:
    """What a triage workitem asks to analyse, and where to put the results."""

    study_uid: str
    retrieve_urls: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    output_url: str | None


def inputs_of(workitem: Dataset) -> WorkitemInputs:
    """The Input Information Sequence's study, its WADO-RS URLs and instances, and the Output
    Destination Sequence's STOW-RS URL; raises ValueError (the cancellation's reason) when the
    workitem names no study or no way to retrieve it."""
    items = list(workitem.get("InputInformationSequence", []))
    if not items:
        raise ValueError("the workitem has no Input Information Sequence: nothing to analyse")
    studies = {str(i.get("StudyInstanceUID", "")) for i in items} - {""}
    if len(studies) != 1:
        raise ValueError(f"the inputs name {len(studies)} studies; a triage task takes one")
    urls = tuple(
        str(location.RetrieveURL)
        for item in items
        for location in item.get("WADORSRetrievalSequence", [])
        if location.get("RetrieveURL")
    )
    if not urls:
        raise ValueError("no input has a WADO-RS Retrieve URL (0008,1190): cannot retrieve it")
    instances = tuple(
        str(ref.ReferencedSOPInstanceUID)
        for item in items
        for ref in item.get("ReferencedSOPSequence", [])
    )
    output = None
    for destination in workitem.get("OutputDestinationSequence", []):
        for storage in destination.get("STOWRSStorageSequence", []):
            if storage.get("StorageURL"):
                output = str(storage.StorageURL)
    return WorkitemInputs(studies.pop(), urls, instances, output)


def task_code(workitem: Dataset) -> str | None:
    codes = workitem.get("ScheduledWorkitemCodeSequence", [])
    return str(codes[0].CodeValue) if codes and codes[0].get("CodeValue") else None
