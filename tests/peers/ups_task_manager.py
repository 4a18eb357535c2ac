"""A strict DICOM UPS-RS Task Manager as a test peer, for IHE AI Workflow for Imaging (AIW-I).

pacsclip acts as the AIW-I Task Performer: it searches this worklist (RAD-81), claims a workitem
(RAD-82), reads it (RAD-83), reports progress (RAD-84) and completes or cancels it (RAD-85).
:class:`TaskManager` serves the Worklist Service of DICOM PS3.18 section 11 on 127.0.0.1 from a
daemon thread of the test process, with the state machine and Transaction UID rules of PS3.4
Annex CC. It is written from the standard (2020 text of PS3.18 and PS3.4, checked against the
2024-2026 editions of the PS3.18 tables) and refuses what the standard refuses.

Status codes (PS3.18 tables 11.4.3-1 to 11.9.3-1; DIMSE codes of PS3.4 tables CC.1.1-2, CC.2.1-2,
CC.2.2-2, CC.2.6-1); every failure carries ``Warning: 299 {base_url}: {reason}`` (PS3.18 8.4):

============================================================  ======  ===========================
Rule                                                          Status  Source
============================================================  ======  ===========================
Create: payload breaks the Req. Type N-CREATE column          400     11.4.3-1, CC.2.5-3
Create: Procedure Step State not SCHEDULED                    400     CC.2.5.3 (C309)
Create: Transaction UID with a value ("2, shall be empty")    400     CC.2.5-3
Create: the Workitem UID exists                               409     11.4.3-1
Search: no match / unknown or unsupported key                 204/400 8.3.4.4.1, 11.9.3-1
Retrieve: never returns Transaction UID (0008,1195)           200     11.5.2, CC.2.7.3
Unknown workitem (any transaction)                            404     11.5.3-1 .. 11.8.3-1
Change State: Transaction UID missing / incorrect             400     11.7.3-1 (C301)
Change State: claim of a workitem that is not SCHEDULED       409     11.7.3-1 (C302, C300)
Change State: COMPLETED/CANCELED of a SCHEDULED workitem      409     11.7.3-1 (C310)
Change State: Final State requirements not met                409     11.7.3-1 (C304)
Change State: COMPLETED <-> CANCELED, final to IN PROGRESS    409     11.7.3-1 (C300)
Change State: already in the requested final state            200 +W  11.7.3.2 (B304, B306)
Change State: requested state SCHEDULED or another value      400     11.7.1.4 (C303)
Update: COMPLETED or CANCELED workitem                        400     11.6.2
Update: Transaction UID missing / incorrect (IN PROGRESS)     400     11.6.3-1 (C301)
Update: Transaction UID on a SCHEDULED workitem               400     CC.2.6.2
Update: sets Procedure Step State or a "Not allowed" attr     400     CC.2.6.2, CC.2.5-3
Request Cancellation: SCHEDULED (canceled by this SCP)        202     CC.2.2.3
Request Cancellation: IN PROGRESS (recorded, not applied)     202     CC.2.2.3
Request Cancellation: COMPLETED / already CANCELED            409/202 11.8.3-1 (C311, B304)
Payload not application/dicom+json / unacceptable Accept      415/406 8.5, 11.1.3
Other method on a workitem resource                           405     8.5
The Task Manager is down (``set_available(False)``)           503     8.5
============================================================  ======  ===========================

The Transaction UID of Update is taken from the payload (PS3.4 CC.2.6.2, as dcm4chee-arc reads it)
or from the bare query ``?{transaction-uid}`` of PS3.18 11.6.1; both given and different is a 400.
A payload is one dataset in the DICOM JSON Model, sent as an object or as an array of one;
Retrieve answers an array of one dataset, Search an array.

Left out: Subscribe / Unsubscribe / Suspend and event reports (RAD-86, RAD-87; their URLs answer
404), the XML media type, fuzzy matching (answered with the 8.3.4.2 Warning), deletion of final
workitems (so no 410), and conditional (1C/2C) requirements other than those written below.
"""

from __future__ import annotations

import copy
import http.client
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.peers.ports import free_port

logger = logging.getLogger(__name__)

DICOMWEB_PREFIX: Final = "/dicom-web"
DICOM_JSON: Final = "application/dicom+json"
UPS_PUSH_SOP_CLASS_UID: Final = "1.2.840.10008.5.1.4.34.6.1"  # PS3.4 CC.2.5.1.3.1
CODING_SCHEME: Final = "99PACSCLIP"

SCHEDULED: Final = "SCHEDULED"
IN_PROGRESS: Final = "IN PROGRESS"
COMPLETED: Final = "COMPLETED"
CANCELED: Final = "CANCELED"
FINAL_STATES: Final = frozenset({COMPLETED, CANCELED})

# Warning texts of PS3.18 11.6.3.2, 11.7.3.2 and 11.8.3.2.
MISSING_UID: Final = "The Transaction UID is missing."
INCORRECT_UID: Final = "The Transaction UID is incorrect."
INCONSISTENT: Final = "The submitted request is inconsistent with the state of the UPS Instance."
UPDATE_INCONSISTENT: Final = (
    "The submitted request is inconsistent with the current state of the Workitem."
)
NOT_CLAIMED: Final = "The target URI did not reference a claimed Workitem."

# PS3.4 Table CC.2.5-3, Req. Type N-CREATE (SCU): top-level Type 1 and Type 2 attributes.
_CREATE_TYPE_1: Final = (
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
    "ProcedureStepState",
)
_CREATE_TYPE_2: Final = (
    "TransactionUID",
    "WorklistLabel",
    "ScheduledProcessingParametersSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledWorkitemCodeSequence",
    "CommentsOnTheScheduledProcedureStep",
    "InputInformationSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReferencedRequestSequence",
    "ProcedureStepProgressInformationSequence",
    "UnifiedProcedureStepPerformedProcedureSequence",
)
# "Shall be empty" / "Shall be created empty" at N-CREATE.
_CREATE_EMPTY: Final = (
    "TransactionUID",
    "ProcedureStepProgressInformationSequence",
    "UnifiedProcedureStepPerformedProcedureSequence",
)
_CODE_SEQUENCES: Final = (
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledWorkitemCodeSequence",
    "AdmittingDiagnosesCodeSequence",
)
# Req. Type N-SET "Not allowed" (or "Use N-ACTION").
_SET_NOT_ALLOWED: Final = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "ProcedureStepState",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "PatientBirthDate",
        "PatientSex",
        "AdmissionID",
        "IssuerOfAdmissionIDSequence",
        "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence",
        "ReferencedRequestSequence",
        "ReplacedProcedureStepSequence",
    }
)
_ENUMS: Final = {
    "ScheduledProcedureStepPriority": frozenset({"HIGH", "MEDIUM", "LOW"}),
    "InputReadinessState": frozenset({"READY", "UNAVAILABLE", "INCOMPLETE"}),
}
_RETRIEVAL_SEQUENCES: Final = (
    "DICOMRetrievalSequence",
    "DICOMMediaRetrievalSequence",
    "WADORetrievalSequence",
    "XDSRetrievalSequence",
    "WADORSRetrievalSequence",
)
_STORAGE_SEQUENCES: Final = ("DICOMStorageSequence", "STOWRSStorageSequence", "XDSStorageSequence")
# Change UPS State Action Information (PS3.4 Table CC.2.1-1).
_CHANGE_STATE_ATTRIBUTES: Final = frozenset({"ProcedureStepState", "TransactionUID"})
# Request UPS Cancel Action Information (PS3.4 Table CC.2.2-1).
_CANCEL_REQUEST_ATTRIBUTES: Final = frozenset(
    {
        "ReasonForCancellation",
        "ProcedureStepDiscontinuationReasonCodeSequence",
        "ContactURI",
        "ContactDisplayName",
    }
)
# Return Key Type 1 or 2 at the top level of Table CC.2.5-3 (PS3.18 11.9.2).
_RETURN_KEYS: Final = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "WorklistLabel",
    "ScheduledProcessingParametersSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledHumanPerformersSequence",
    "ScheduledProcedureStepStartDateTime",
    "ScheduledWorkitemCodeSequence",
    "InputReadinessState",
    "InputInformationSequence",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReferencedRequestSequence",
    "ProcedureStepState",
    "ProcedureStepProgressInformationSequence",
)
# The matching keys this Task Manager supports; any other key is a 400.
_MATCH_KEYS: Final = frozenset(
    {
        ("ProcedureStepState",),
        ("InputReadinessState",),
        ("ScheduledProcedureStepPriority",),
        ("ScheduledProcedureStepStartDateTime",),
        ("WorklistLabel",),
        ("ProcedureStepLabel",),
        ("PatientID",),
        ("SOPInstanceUID",),
        ("StudyInstanceUID",),
        ("ScheduledStationAETitle",),
        ("ScheduledWorkitemCodeSequence", "CodeValue"),
        ("ScheduledWorkitemCodeSequence", "CodingSchemeDesignator"),
        ("ScheduledStationNameCodeSequence", "CodeValue"),
        ("ScheduledStationClassCodeSequence", "CodeValue"),
        ("ScheduledStationGeographicLocationCodeSequence", "CodeValue"),
    }
)
_UID_PATTERN: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DT_PATTERN: Final = re.compile(
    r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"
)
_UINT_PATTERN: Final = re.compile(r"^[0-9]+$")
# Response headers of the DICOMweb upstream not passed on.
_NOT_FORWARDED: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
)


class WorkitemRefused(Exception):
    """A UPS-RS request refused with an HTTP status and the reason its Warning header carries."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


def _now_dt() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def _has_value(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and not ds[keyword].is_empty


def _text(ds: Dataset, keyword: str) -> str | None:
    return str(ds[keyword].value) if _has_value(ds, keyword) else None


def _state(ds: Dataset) -> str:
    return str(ds.ProcedureStepState)


def _is_uid(value: str) -> bool:
    return len(value) <= 64 and _UID_PATTERN.match(value) is not None


def _bad(reason: str) -> WorkitemRefused:
    return WorkitemRefused(400, reason)


# Validation against PS3.4 Table CC.2.5-3 and its macros (CC.2.5-2a, -2b, -2c, -2g).


def _check_code_items(items: Iterable[Dataset], where: str) -> None:
    """UPS Code Sequence Macro: Code Meaning (1) and one code value with its scheme (1C)."""
    for item in items:
        if not _has_value(item, "CodeMeaning"):
            raise _bad(f"{where}: an item has no Code Meaning (0008,0104)")
        values = [k for k in ("CodeValue", "LongCodeValue", "URNCodeValue") if _has_value(item, k)]
        if len(values) != 1:
            raise _bad(f"{where}: an item needs exactly one of Code Value, Long or URN Code Value")
        if values[0] != "URNCodeValue" and not _has_value(item, "CodingSchemeDesignator"):
            raise _bad(f"{where}: an item has no Coding Scheme Designator (0008,0102)")


def _check_sequence_of_codes(ds: Dataset, keyword: str) -> None:
    if keyword in ds:
        _check_code_items(ds[keyword].value, keyword)


def _check_instances_item(item: Dataset, where: str, *, retrieval_required: bool) -> None:
    """Referenced Instances and Access Macro (Table CC.2.5-2c)."""
    if not _has_value(item, "TypeOfInstances"):
        raise _bad(f"{where}: an item has no Type of Instances (0040,E020)")
    if str(item.TypeOfInstances) == "DICOM":
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not _has_value(item, keyword) or not _is_uid(str(item[keyword].value)):
                raise _bad(f"{where}: a DICOM item needs a valid {keyword}")
    if not _has_value(item, "ReferencedSOPSequence"):
        raise _bad(f"{where}: an item has no Referenced SOP Sequence (0008,1199) item")
    for ref in item.ReferencedSOPSequence:
        for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"):
            if not _has_value(ref, keyword) or not _is_uid(str(ref[keyword].value)):
                raise _bad(f"{where}: a Referenced SOP item needs a valid {keyword}")
    retrievals = [k for k in _RETRIEVAL_SEQUENCES if _has_value(item, k)]
    if retrieval_required and not retrievals:
        raise _bad(f"{where}: an item names no retrieval location (e.g. WADO-RS Retrieval Seq.)")
    if "WADORSRetrievalSequence" in retrievals:
        for location in item.WADORSRetrievalSequence:
            url = _text(location, "RetrieveURL") or ""
            if not url.startswith(("http://", "https://")):
                raise _bad(f"{where}: a WADO-RS Retrieval item has no http(s) Retrieve URL")
    if "DICOMRetrievalSequence" in retrievals:
        for location in item.DICOMRetrievalSequence:
            if not _has_value(location, "RetrieveAETitle"):
                raise _bad(f"{where}: a DICOM Retrieval item has no Retrieve AE Title")


def _check_output_destination(ds: Dataset) -> None:
    """Output Destination Sequence (0040,4070), Storage Macro (Table CC.2.5-2g)."""
    for item in ds.get("OutputDestinationSequence", []):
        storages = [k for k in _STORAGE_SEQUENCES if _has_value(item, k)]
        if not storages:
            raise _bad("OutputDestinationSequence: an item names no DICOM, STOW-RS or XDS storage")
        for location in item.get("STOWRSStorageSequence", []):
            url = _text(location, "StorageURL") or ""
            if not url.startswith(("http://", "https://")):
                raise _bad("STOWRSStorageSequence: an item has no http(s) Storage URL (0040,4073)")
        for location in item.get("DICOMStorageSequence", []):
            if not _has_value(location, "DestinationAE"):
                raise _bad("DICOMStorageSequence: an item has no Destination AE")


def _check_datetime(ds: Dataset, keyword: str) -> None:
    value = _text(ds, keyword)
    if value is not None and not _DT_PATTERN.match(value):
        raise _bad(f"{keyword} is not a DICOM DT value: {value!r}")


def check_create(workitem: Dataset) -> None:
    """Raise WorkitemRefused(400) unless the dataset meets the Req. Type N-CREATE column."""
    if _text(workitem, "ProcedureStepState") not in (None, SCHEDULED):
        raise _bad("Procedure Step State (0074,1000) shall be SCHEDULED at creation (C309)")
    for keyword in _CREATE_TYPE_1:
        if not _has_value(workitem, keyword):
            raise _bad(f"the Type 1 attribute {keyword} is missing or empty")
    for keyword in _CREATE_TYPE_2:
        if keyword not in workitem:
            raise _bad(f"the Type 2 attribute {keyword} is missing")
    for keyword in _CREATE_EMPTY:
        if not workitem[keyword].is_empty:
            raise _bad(f"{keyword} shall be empty at creation")
    for keyword, allowed in _ENUMS.items():
        if str(workitem[keyword].value) not in allowed:
            raise _bad(f"{keyword} has a value outside {sorted(allowed)}")
    if _text(workitem, "SOPClassUID") not in (None, UPS_PUSH_SOP_CLASS_UID):
        raise _bad("SOP Class UID (0008,0016) shall be the UPS Push SOP Class")
    for keyword in ("ScheduledProcedureStepStartDateTime", "ExpectedCompletionDateTime"):
        _check_datetime(workitem, keyword)
    for keyword in _CODE_SEQUENCES:
        _check_sequence_of_codes(workitem, keyword)
    for parameter in workitem.ScheduledProcessingParametersSequence:
        if not _has_value(parameter, "ValueType") or not _has_value(
            parameter, "ConceptNameCodeSequence"
        ):
            raise _bad("ScheduledProcessingParametersSequence: an item lacks Value Type or name")
        _check_code_items(parameter.ConceptNameCodeSequence, "ConceptNameCodeSequence")
    for item in workitem.InputInformationSequence:
        _check_instances_item(item, "InputInformationSequence", retrieval_required=True)
    for request in workitem.ReferencedRequestSequence:
        if not _has_value(request, "StudyInstanceUID"):
            raise _bad("ReferencedRequestSequence: an item has no Study Instance UID")
    _check_output_destination(workitem)


def _check_progress(changes: Dataset) -> None:
    for item in changes.get("ProcedureStepProgressInformationSequence", []):
        if _has_value(item, "ProcedureStepProgress"):
            progress = float(item.ProcedureStepProgress)
            if not 0 <= progress <= 100:
                raise _bad("Procedure Step Progress (0074,1004) is a percentage, 0 to 100")
        _check_datetime(item, "ProcedureStepCancellationDateTime")
        _check_sequence_of_codes(item, "ProcedureStepDiscontinuationReasonCodeSequence")
        for uri in item.get("ProcedureStepCommunicationsURISequence", []):
            if not _has_value(uri, "ContactURI"):
                raise _bad("ProcedureStepCommunicationsURISequence: an item has no Contact URI")


def _check_performed(changes: Dataset) -> None:
    for performed in changes.get("UnifiedProcedureStepPerformedProcedureSequence", []):
        for keyword in (
            "PerformedStationNameCodeSequence",
            "PerformedStationClassCodeSequence",
            "PerformedStationGeographicLocationCodeSequence",
            "PerformedWorkitemCodeSequence",
        ):
            _check_sequence_of_codes(performed, keyword)
        for keyword in ("PerformedProcedureStepStartDateTime", "PerformedProcedureStepEndDateTime"):
            _check_datetime(performed, keyword)
        for item in performed.get("OutputInformationSequence", []):
            _check_instances_item(item, "OutputInformationSequence", retrieval_required=False)


def check_update(changes: Dataset) -> None:
    """Raise WorkitemRefused(400) unless the N-SET payload meets the Req. Type N-SET column."""
    for element in changes:
        keyword = element.keyword
        if keyword in _SET_NOT_ALLOWED:
            raise _bad(f"{keyword or element.tag} may not be set by Update (N-SET not allowed)")
    for keyword in _CODE_SEQUENCES:
        if keyword in changes:
            _check_sequence_of_codes(changes, keyword)
    for keyword in _ENUMS:
        if keyword in changes and str(changes[keyword].value) not in _ENUMS[keyword]:
            raise _bad(f"{keyword} has a value outside {sorted(_ENUMS[keyword])}")
    for item in changes.get("InputInformationSequence", []):
        _check_instances_item(item, "InputInformationSequence", retrieval_required=True)
    _check_output_destination(changes)
    _check_progress(changes)
    _check_performed(changes)


def final_state_problems(workitem: Dataset, state: str) -> list[str]:
    """The Final State requirements (PS3.4 CC.2.5.1.1, Table CC.2.5-3) a workitem misses.

    R: needed for both final states; P: needed for COMPLETED; X: needed for CANCELED.
    """
    missing = [
        keyword
        for keyword in (
            "SOPClassUID",
            "SOPInstanceUID",
            "ScheduledProcedureStepPriority",
            "ScheduledProcedureStepModificationDateTime",
            "ScheduledProcedureStepStartDateTime",
            "InputReadinessState",
        )
        if not _has_value(workitem, keyword)
    ]
    if state == COMPLETED:
        performed = workitem.get("UnifiedProcedureStepPerformedProcedureSequence", [])
        if not performed:
            missing.append("UnifiedProcedureStepPerformedProcedureSequence")
        missing += [
            f"UnifiedProcedureStepPerformedProcedureSequence>{keyword}"
            for keyword in (
                "PerformedStationNameCodeSequence",
                "PerformedProcedureStepStartDateTime",
                "PerformedWorkitemCodeSequence",
                "PerformedProcedureStepEndDateTime",
                "OutputInformationSequence",
            )
            if not performed or not _has_value(performed[0], keyword)
        ]
    else:
        progress = workitem.get("ProcedureStepProgressInformationSequence", [])
        if not progress:
            missing.append("ProcedureStepProgressInformationSequence")
        missing += [
            f"ProcedureStepProgressInformationSequence>{keyword}"
            for keyword in (
                "ProcedureStepCancellationDateTime",
                "ProcedureStepDiscontinuationReasonCodeSequence",
            )
            if not progress or not _has_value(progress[0], keyword)
        ]
    return missing


# Search (PS3.18 8.3.4 and 11.9).


def _attribute_path(text: str) -> tuple[str, ...]:
    """A dotted attribute path of keywords or 8-hex tags as keywords; unknown ones are a 400."""
    keywords = []
    for part in text.split("."):
        if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
            keyword = keyword_for_tag(int(part, 16))
        elif tag_for_keyword(part) is not None:
            keyword = part
        else:
            keyword = ""
        if not keyword:
            raise _bad(f"unknown attribute in the query: {text!r}")
        keywords.append(keyword)
    return tuple(keywords)


def _values_at(ds: Dataset, path: tuple[str, ...]) -> list[str]:
    if path[0] not in ds:
        return []
    element = ds[path[0]]
    if len(path) == 1:
        if element.is_empty:
            return []
        return [str(v) for v in element.value] if element.VM > 1 else [str(element.value)]
    if element.VR != "SQ":
        return []
    return [value for item in element.value for value in _values_at(item, path[1:])]


def _matches(values: list[str], query: str, keyword: str) -> bool:
    """Single value, wildcard, UID list and DT range matching (PS3.4 C.2.2.2)."""
    if query == "":
        return True  # universal matching
    vr = dictionary_VR(keyword)
    if vr == "UI":
        wanted = set(query.split(","))
        return any(value in wanted for value in values)
    if vr in ("DT", "DA", "TM") and "-" in query:
        low, _, high = query.partition("-")
        return any(
            (not low or value[: len(low)] >= low) and (not high or value[: len(high)] <= high)
            for value in values
        )
    if "*" in query or "?" in query:
        pattern = re.escape(query).replace(r"\*", ".*").replace(r"\?", ".")
        return any(re.fullmatch(pattern, value) for value in values)
    return query in values


class SearchResult:
    def __init__(self, matches: list[Dataset], remaining: int, warnings: list[str]) -> None:
        self.matches, self.remaining, self.warnings = matches, remaining, warnings


def search(workitems: Iterable[Dataset], query: list[tuple[str, str]]) -> SearchResult:
    """Search Transaction (PS3.18 11.9): filter, page and project the workitems."""
    matchers: dict[tuple[str, ...], str] = {}
    include: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    warnings: list[str] = []
    for name, value in query:
        if name == "includefield":
            for field in value.split(","):
                if field == "all":
                    include_all = True
                    continue
                path = _attribute_path(field)
                if path[0] == "TransactionUID":
                    raise _bad("Transaction UID (0008,1195) cannot be queried")
                include.add(path[0])
        elif name in ("limit", "offset"):
            if not _UINT_PATTERN.match(value):
                raise _bad(f"{name} shall be an unsigned integer")
            if name == "limit":
                limit = int(value)
            else:
                offset = int(value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise _bad("fuzzymatching shall be true or false")
            if value == "true":
                warnings.append(
                    "The fuzzymatching parameter is not supported. "
                    "Only literal matching has been performed."
                )
        else:
            path = _attribute_path(name)
            if path not in _MATCH_KEYS:
                raise _bad(f"{'.'.join(path)} is not a supported matching key")
            if path in matchers:
                raise _bad(f"{'.'.join(path)} is repeated in the query")
            matchers[path] = value
    matched = [
        ds
        for ds in workitems
        if all(_matches(_values_at(ds, p), v, p[-1]) for p, v in matchers.items())
    ]
    page = matched[offset:] if limit is None else matched[offset : offset + limit]
    remaining = max(0, len(matched) - offset - len(page))
    keys = set(_RETURN_KEYS) | {path[0] for path in matchers} | include
    projected = []
    for ds in page:
        result = Dataset()
        for element in ds:
            if element.keyword == "TransactionUID":
                continue
            if include_all or element.keyword in keys:
                result.add(copy.deepcopy(element))
        projected.append(result)
    return SearchResult(projected, remaining, warnings)


class Worklist:
    """The UPS instances and the state machine of PS3.4 Annex CC; no I/O, one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Dataset] = {}
        self._history: dict[str, list[dict[str, Any]]] = {}

    def _record(
        self,
        uid: str,
        op: str,
        before: str | None,
        after: str | None,
        transaction_uid: str | None,
        status: int,
        reason: str | None = None,
    ) -> None:
        entry = {
            "op": op,
            "state_before": before,
            "state_after": after,
            "transaction_uid": transaction_uid,
            "status": status,
            "reason": reason,
            "at": datetime.now(UTC),
        }
        self._history.setdefault(uid, []).append(entry)
        logger.info("UPS %s %s: %s -> %s (%s)", op, uid, before, after, status)

    def _get(self, uid: str) -> Dataset:
        if uid not in self._items:
            raise WorkitemRefused(404, f"The Target Workitem {uid} was not found.")
        return self._items[uid]

    def _run(
        self,
        uid: str,
        op: str,
        transaction_uid: str | None,
        step: Callable[[Dataset], tuple[int, str | None]],
    ) -> tuple[int, str | None]:
        """Apply one transaction to a workitem and record it, accepted or refused."""
        with self._lock:
            item = self._get(uid)
            before = _state(item)
            try:
                status, warning = step(item)
            except WorkitemRefused as exc:
                self._record(uid, op, before, before, transaction_uid, exc.status, exc.reason)
                raise
            self._record(uid, op, before, _state(item), transaction_uid, status, warning)
            return status, warning

    def create(self, workitem: Dataset, uid: str | None) -> str:
        """Create Workitem (PS3.18 11.4, N-CREATE): uid from the query, else from the dataset."""
        stated = _text(workitem, "SOPInstanceUID")
        if uid is not None and stated is not None and stated != uid:
            raise _bad("the SOP Instance UID in the payload differs from the workitem query")
        uid = uid or stated
        if uid is None:
            raise _bad("no Workitem UID: neither ?{workitem} nor SOP Instance UID (0008,0018)")
        if not _is_uid(uid):
            raise _bad(f"the Workitem UID is not a valid UID: {uid!r}")
        check_create(workitem)
        stored = copy.deepcopy(workitem)
        stored.SOPClassUID = UPS_PUSH_SOP_CLASS_UID
        stored.SOPInstanceUID = uid
        stored.ScheduledProcedureStepModificationDateTime = _now_dt()
        if not _has_value(stored, "WorklistLabel"):
            stored.WorklistLabel = "PACSCLIP-TEST"  # CC.2.5-3: the SCP fills it in
        with self._lock:
            if uid in self._items:
                raise WorkitemRefused(409, f"The Target Workitem {uid} already exists.")
            self._items[uid] = stored
            self._record(uid, "create", None, SCHEDULED, None, 201)
        return uid

    def stored(self, uid: str) -> Dataset:
        with self._lock:
            return copy.deepcopy(self._get(uid))

    def retrieve(self, uid: str) -> Dataset:
        """Retrieve Workitem (PS3.18 11.5): never with the Transaction UID (11.5.2)."""
        workitem = self.stored(uid)
        if "TransactionUID" in workitem:
            del workitem.TransactionUID
        return workitem

    def history(self, uid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry) for entry in self._history.get(uid, [])]

    def search(self, query: list[tuple[str, str]]) -> SearchResult:
        with self._lock:
            return search(list(self._items.values()), query)

    def change_state(self, uid: str, request: Dataset) -> str | None:
        """Change Workitem State (PS3.18 11.7, N-ACTION Change UPS State, Table CC.1.1-2)."""
        transaction_uid = _text(request, "TransactionUID")

        def step(item: Dataset) -> tuple[int, str | None]:
            extra = [
                e.keyword or str(e.tag)
                for e in request
                if e.keyword not in _CHANGE_STATE_ATTRIBUTES
            ]
            if extra:
                raise _bad(f"only Procedure Step State and Transaction UID may be sent: {extra}")
            requested = _text(request, "ProcedureStepState")
            if requested not in (IN_PROGRESS, COMPLETED, CANCELED):
                raise _bad(
                    "Procedure Step State shall be IN PROGRESS, COMPLETED or CANCELED; "
                    "a UPS becomes SCHEDULED only by Create (C303)"
                )
            if transaction_uid is None:
                raise _bad(MISSING_UID)
            if not _is_uid(transaction_uid):
                raise _bad(f"the Transaction UID is not a valid UID: {transaction_uid!r}")
            state = _state(item)
            if requested == IN_PROGRESS:
                if state != SCHEDULED:  # C302 already IN PROGRESS, C300 final
                    raise WorkitemRefused(409, INCONSISTENT)
                item.TransactionUID = transaction_uid
                item.ProcedureStepState = IN_PROGRESS
                return 200, None
            if state == SCHEDULED:  # C310: not yet IN PROGRESS
                raise WorkitemRefused(409, INCONSISTENT)
            if transaction_uid != _text(item, "TransactionUID"):  # C301
                raise _bad(INCORRECT_UID)
            if state == requested:  # B304 / B306
                return 200, f"The UPS is already in the requested state of {requested}."
            if state in FINAL_STATES:  # C300: may no longer be updated
                raise WorkitemRefused(409, INCONSISTENT)
            missing = final_state_problems(item, requested)
            if missing:  # C304
                raise WorkitemRefused(
                    409, f"{INCONSISTENT} Final State requirements not met: {', '.join(missing)}"
                )
            item.ProcedureStepState = requested
            return 200, None

        return self._run(uid, "change_state", transaction_uid, step)[1]

    def update(self, uid: str, changes: Dataset, query_transaction_uid: str | None) -> None:
        """Update Workitem (PS3.18 11.6, N-SET; PS3.4 CC.2.6)."""
        body_uid = _text(changes, "TransactionUID")
        transaction_uid = body_uid or query_transaction_uid

        def step(item: Dataset) -> tuple[int, str | None]:
            if body_uid and query_transaction_uid and body_uid != query_transaction_uid:
                raise _bad("the Transaction UIDs of the query and of the payload differ")
            state = _state(item)
            if state in FINAL_STATES:  # 11.6.2: a 400 for COMPLETED or CANCELED
                raise _bad(UPDATE_INCONSISTENT)
            if state == SCHEDULED and transaction_uid is not None:  # CC.2.6.2
                raise _bad(NOT_CLAIMED)
            if state == IN_PROGRESS:
                if transaction_uid is None:
                    raise _bad(MISSING_UID)
                if transaction_uid != _text(item, "TransactionUID"):
                    raise _bad(INCORRECT_UID)
            check_update(changes)
            for element in changes:
                if element.keyword != "TransactionUID":
                    item[element.tag] = copy.deepcopy(element)
            item.ScheduledProcedureStepModificationDateTime = _now_dt()
            return 200, None

        self._run(uid, "update", transaction_uid, step)

    def request_cancellation(self, uid: str, request: Dataset) -> str | None:
        """Request Cancellation (PS3.18 11.8, N-ACTION Request UPS Cancel; PS3.4 CC.2.2.3)."""

        def step(item: Dataset) -> tuple[int, str | None]:
            extra = [
                e.keyword or str(e.tag)
                for e in request
                if e.keyword not in _CANCEL_REQUEST_ATTRIBUTES
            ]
            if extra:
                raise _bad(f"not Request UPS Cancel Action Information: {extra}")
            _check_sequence_of_codes(request, "ProcedureStepDiscontinuationReasonCodeSequence")
            state = _state(item)
            if state == COMPLETED:  # C311
                raise WorkitemRefused(409, "The UPS is already COMPLETED.")
            if state == CANCELED:  # B304
                return 202, "The UPS is already in the requested state of CANCELED."
            if state == IN_PROGRESS:
                # Not the performer: the request is recorded for the test to see, nothing else.
                return 202, None
            # SCHEDULED: this SCP moves it to IN PROGRESS then CANCELED, meeting the Final State.
            progress = Dataset()
            progress.ProcedureStepCancellationDateTime = _now_dt()
            if "ReasonForCancellation" in request:
                progress.ReasonForCancellation = request.ReasonForCancellation
            if _has_value(request, "ProcedureStepDiscontinuationReasonCodeSequence"):
                progress.ProcedureStepDiscontinuationReasonCodeSequence = copy.deepcopy(
                    request.ProcedureStepDiscontinuationReasonCodeSequence
                )
            else:
                progress.ProcedureStepDiscontinuationReasonCodeSequence = [
                    code_item("110513", "DCM", "Discontinued for unspecified reason")
                ]
            item.ProcedureStepProgressInformationSequence = [progress]
            item.TransactionUID = generate_uid()
            item.ProcedureStepState = CANCELED
            return 202, None

        return self._run(uid, "request_cancellation", None, step)[1]


# HTTP edge.


def _dataset_from_payload(body: bytes, *, optional: bool = False) -> Dataset:
    """One dataset of the DICOM JSON Model: an object or an array of exactly one object."""
    if not body.strip():
        if optional:
            return Dataset()
        raise _bad("the request has no payload")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the payload is not JSON: {exc}") from exc
    if isinstance(document, list):
        if len(document) != 1:
            raise _bad("the payload shall hold exactly one dataset")
        document = document[0]
    if not isinstance(document, dict):
        raise _bad("the payload is not a DICOM JSON dataset")
    try:
        return Dataset.from_json(document)
    except (ValueError, TypeError, KeyError) as exc:
        raise _bad(f"the payload is not a valid DICOM JSON dataset: {exc}") from exc


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def _accepts_dicom_json(accept: str | None) -> bool:
    if not accept:
        return True
    ranges = {_media_type(part) for part in accept.split(",")}
    return bool(ranges & {DICOM_JSON, "application/*", "*/*"})


class UpsRsHandler(BaseHTTPRequestHandler):
    """One HTTP request to the Task Manager: a UPS-RS transaction or a forwarded Studies call."""

    protocol_version = "HTTP/1.1"
    server_version = "pacsclip-ups-task-manager"
    timeout = 30  # an idle keep-alive connection ends its thread

    def __init__(self, *args: Any, manager: TaskManager) -> None:
        self.manager = manager
        super().__init__(*args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.manager.available:
            self._answer(503, warnings=["The Task Manager is not available."])
            return
        split = urllib.parse.urlsplit(self.path)
        path, query = split.path, split.query
        if path == DICOMWEB_PREFIX + "/studies" or path.startswith(DICOMWEB_PREFIX + "/studies/"):
            self._forward(body)
            return
        if not (
            path == DICOMWEB_PREFIX + "/workitems"
            or path.startswith(DICOMWEB_PREFIX + "/workitems/")
        ):
            self._answer(404, warnings=["No such resource."])
            return
        segments = path[len(DICOMWEB_PREFIX) + 1 :].rstrip("/").split("/")
        try:
            self._route(segments, query, body)
        except WorkitemRefused as exc:
            self._answer(exc.status, warnings=[exc.reason])
        except Exception:  # a defect of this peer: answered and logged, never hidden
            logger.exception("UPS-RS peer failed on %s %s", self.command, self.path)
            self._answer(500, warnings=["The Task Manager test peer failed; see its log."])

    def _route(self, segments: list[str], query: str, body: bytes) -> None:
        method, worklist = self.command, self.manager.worklist
        if len(segments) == 1:  # /workitems
            if method == "GET":
                self._search(query)
            elif method == "POST":
                self._require_json(body)
                uid = urllib.parse.unquote(query) if query else None
                uid = worklist.create(_dataset_from_payload(body), uid)
                location = f"{self.manager.base_url}/workitems/{uid}"
                self._answer(201, headers=[("Location", location), ("Content-Location", location)])
            else:
                self._not_allowed("GET, POST")
            return
        uid = segments[1]
        if len(segments) == 2:  # /workitems/{uid}
            if method == "GET":
                if not _accepts_dicom_json(self.headers.get("Accept")):
                    raise WorkitemRefused(406, "Only application/dicom+json is supported.")
                workitem = worklist.retrieve(uid)
                self._answer_json(200, [workitem.to_json_dict()])
            elif method == "POST":
                self._require_json(body)
                transaction_uid = urllib.parse.unquote(query) if query else None
                if transaction_uid is not None and not _is_uid(transaction_uid):
                    raise _bad("the query of Update shall be the bare Transaction UID")
                worklist.update(uid, _dataset_from_payload(body), transaction_uid)
                self._answer(200)
            else:
                self._not_allowed("GET, POST")
            return
        if len(segments) == 3 and segments[2] == "state":
            if method != "PUT":
                self._not_allowed("PUT")
                return
            self._require_json(body)
            warning = worklist.change_state(uid, _dataset_from_payload(body))
            self._answer(200, warnings=[warning] if warning else [])
            return
        if len(segments) == 3 and segments[2] == "cancelrequest":
            if method != "POST":
                self._not_allowed("POST")
                return
            if body.strip():
                self._require_json(body)
            warning = worklist.request_cancellation(uid, _dataset_from_payload(body, optional=True))
            self._answer(202, warnings=[warning] if warning else [])
            return
        # Subscriptions (/subscribers/...) and anything else: not served here.
        raise WorkitemRefused(404, "No such resource.")

    def _search(self, query: str) -> None:
        if not _accepts_dicom_json(self.headers.get("Accept")):
            raise WorkitemRefused(406, "Only application/dicom+json is supported.")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        result = self.manager.worklist.search(pairs)
        warnings = list(result.warnings)
        if result.remaining:
            warnings.append(
                f"There are {result.remaining} additional results that can be requested"
            )
        if not result.matches:
            self._answer(204, warnings=warnings)
            return
        self._answer_json(200, [ds.to_json_dict() for ds in result.matches], warnings)

    def _require_json(self, body: bytes) -> None:
        if _media_type(self.headers.get("Content-Type")) != DICOM_JSON:
            raise WorkitemRefused(415, "The payload shall be application/dicom+json.")

    def _not_allowed(self, allow: str) -> None:
        self._answer(405, headers=[("Allow", allow)], warnings=[f"Allowed: {allow}."])

    def _forward(self, body: bytes) -> None:
        """WADO-RS and STOW-RS calls go to the DICOMweb upstream unchanged."""
        upstream = self.manager.dicomweb_upstream
        if upstream is None:
            self._answer(404, warnings=["This Task Manager has no DICOMweb upstream."])
            return
        if self.command not in ("GET", "POST"):
            self._not_allowed("GET, POST")
            return
        target = urllib.parse.urlsplit(upstream)
        path = target.path.rstrip("/") + self.path[len(DICOMWEB_PREFIX) :]
        headers = {
            name: value
            for name in ("Accept", "Content-Type")
            if (value := self.headers.get(name)) is not None
        }
        connection = http.client.HTTPConnection(
            target.hostname or "127.0.0.1", target.port, timeout=60
        )
        try:
            connection.request(self.command, path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            forwarded = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() not in _NOT_FORWARDED
            ]
            status = response.status
        except OSError as exc:
            self._answer(502, warnings=[f"The DICOMweb upstream did not answer: {exc}"])
            return
        finally:
            connection.close()
        self.send_response(status)
        for name, value in forwarded:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer_json(self, status: int, document: Any, warnings: list[str] | None = None) -> None:
        body = json.dumps(document).encode()
        self._answer(status, body, DICOM_JSON, warnings=warnings)

    def _answer(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        *,
        headers: list[tuple[str, str]] | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in headers or []:
            self.send_header(name, value)
        for warning in warnings or []:
            self.send_header("Warning", f"299 {self.manager.base_url}: {warning}")
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class TaskManager:
    """A UPS-RS Task Manager on 127.0.0.1 in a daemon thread; a context manager.

    ``base_url`` is the DICOMweb root (``{base_url}/workitems`` is the worklist), known from
    construction on. With ``dicomweb_upstream`` (e.g. Orthanc's ``.../dicom-web``),
    ``{base_url}/studies...`` is forwarded there, so a workitem's Retrieve URL and Storage URL
    may point at this one origin.
    """

    def __init__(self, *, dicomweb_upstream: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}{DICOMWEB_PREFIX}"
        self.dicomweb_upstream = dicomweb_upstream.rstrip("/") if dicomweb_upstream else None
        self.worklist = Worklist()
        self._available = threading.Event()
        self._available.set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._available.is_set()

    def set_available(self, up: bool) -> None:
        """When False every request answers 503, as a Task Manager that is down."""
        if up:
            self._available.set()
        else:
            self._available.clear()

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the Task Manager is already started")
        server = ThreadingHTTPServer(("127.0.0.1", self.port), partial(UpsRsHandler, manager=self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so that stop() returns at once
            name=f"ups-task-manager-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def schedule(self, workitem: Dataset) -> str:
        """Create a workitem as RAD-80 would; its SOP Instance UID, or a new one, is returned.

        Raises WorkitemRefused (status 400 or 409) as the Create transaction would answer.
        """
        return self.worklist.create(
            workitem, None if "SOPInstanceUID" in workitem else generate_uid()
        )

    def workitem(self, uid: str) -> Dataset:
        """The stored workitem, Transaction UID included (KeyError when unknown)."""
        try:
            return self.worklist.stored(uid)
        except WorkitemRefused as exc:
            raise KeyError(uid) from exc

    def history(self, uid: str) -> list[dict[str, Any]]:
        """Every transaction on the workitem, accepted or refused, oldest first.

        Keys: op (create, change_state, update, request_cancellation), state_before,
        state_after, transaction_uid (as sent), status (HTTP), reason (Warning text), at (UTC).
        """
        return self.worklist.history(uid)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def triage_workitem(
    study_uid: str,
    series_uid: str,
    sop_instances: list[tuple[str, str]],
    *,
    code_value: str = "PACSCLIP-TRIAGE",
    retrieve_url: str,
    output_url: str | None = None,
    patient_id: str = "PACSCLIP-TEST-1",
    patient_name: str = "Test^Triage",
    scheduled_at: datetime | None = None,
) -> Dataset:
    """A SCHEDULED workitem as an AIW-I Task Requester creates it (PS3.4 Table CC.2.5-3).

    ``sop_instances`` are (SOP Class UID, SOP Instance UID) pairs of the input series;
    ``retrieve_url`` (the study's WADO-RS URL) goes where the standard puts it, in
    Input Information Sequence > WADO-RS Retrieval Sequence (0040,E025) > Retrieve URL
    (0008,1190); ``output_url`` (a STOW-RS URL) in Output Destination Sequence (0040,4070) >
    STOW-RS Storage Sequence (0040,4072) > Storage URL (0040,4073). No SOP Instance UID is set:
    ``TaskManager.schedule`` assigns one, a Create request passes it as ``?{workitem}``.
    """
    if not sop_instances:
        raise ValueError("a workitem needs at least one input instance")
    when = scheduled_at or datetime.now(UTC)
    ds = Dataset()
    ds.TransactionUID = ""  # Type 2, shall be empty at creation
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = "pacsclip triage"
    ds.WorklistLabel = "PACSCLIP"
    ds.ScheduledProcessingParametersSequence = Sequence([])
    ds.ScheduledStationNameCodeSequence = [code_item("PACSCLIP", CODING_SCHEME, "pacsclip")]
    ds.ScheduledStationClassCodeSequence = Sequence([])
    ds.ScheduledStationGeographicLocationCodeSequence = Sequence([])
    ds.ScheduledProcedureStepStartDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.ScheduledWorkitemCodeSequence = [
        code_item(code_value, CODING_SCHEME, "pacsclip triage of a study")
    ]
    ds.CommentsOnTheScheduledProcedureStep = ""
    ds.InputReadinessState = "READY"
    source = Dataset()
    source.TypeOfInstances = "DICOM"
    source.StudyInstanceUID = study_uid
    source.SeriesInstanceUID = series_uid
    references = []
    for sop_class_uid, sop_instance_uid in sop_instances:
        reference = Dataset()
        reference.ReferencedSOPClassUID = sop_class_uid
        reference.ReferencedSOPInstanceUID = sop_instance_uid
        references.append(reference)
    source.ReferencedSOPSequence = references
    location = Dataset()
    location.RetrieveURL = retrieve_url
    source.WADORSRetrievalSequence = [location]
    ds.InputInformationSequence = [source]
    ds.StudyInstanceUID = study_uid
    if output_url is not None:
        storage = Dataset()
        storage.StorageURL = output_url
        destination = Dataset()
        destination.STOWRSStorageSequence = [storage]
        ds.OutputDestinationSequence = [destination]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = ""
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([])
    ds.OtherPatientIDsSequence = Sequence([])
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = Sequence([])
    ds.AdmittingDiagnosesDescription = ""
    ds.AdmittingDiagnosesCodeSequence = Sequence([])
    ds.ReferencedRequestSequence = Sequence([])
    ds.ProcedureStepState = SCHEDULED
    ds.ProcedureStepProgressInformationSequence = Sequence([])
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([])
    return ds
