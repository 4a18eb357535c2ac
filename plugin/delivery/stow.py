"""Results dispatch over DICOMweb: STOW-RS (PS3.18 10.5) with dicomweb-client (``plugin.dicomweb``).

One POST of multipart/related; type="application/dicom" to ``{root}/studies`` per call; the
answer's ReferencedSOPSequence and FailedSOPSequence give each instance's outcome, reported
like a C-STORE status in the same SendReport / DispatchError as ``plugin.delivery.dimse``:

- connection refused or timed out, HTTP 408, 429 and 5xx: retryable;
- a FailureReason 0xA7xx or 0x0110 for an instance: retryable; any other: not retryable;
- any other HTTP 4xx (bad URL, authentication, unsupported media type): not retryable.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from plugin.delivery.outcome import DispatchError, SendReport, is_retryable_status
from plugin.dicom_status import PROCESSING_FAILURE, SUCCESS
from plugin.dicomweb import WebAuth, WebError, http_session, web_client, web_error

logger = logging.getLogger(__name__)

# PS3.18 10.5.3: 200 all stored, 202 some failed or with warnings, 409 none stored.
ANSWERS_WITH_OUTCOMES = frozenset({200, 202, 409})
# DICOM JSON tags of the STOW-RS response (PS3.18 Table 10.5.3-1).
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service results are stored to; ``url`` is its root (".../dicom-web")."""

    name: str
    url: str
    # Sent as "Authorization: Bearer ..."; never logged.
    bearer_token: str | None = None
    # CA bundle to verify an https service (system CAs when None).
    tls_ca: Path | None = None
    # Mutual TLS: client certificate (PEM) and its key, given together.
    client_cert: Path | None = None
    client_key: Path | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"


def stow_files(
    destination: StowDestination, files: Sequence[Path], *, timeout_s: float = 30
) -> SendReport:
    """STOW-RS files to destination in one request; raise DispatchError unless all stored.

    The whole request body is built in memory: results are a few small SR/SC objects.
    """
    if not files:
        return SendReport(destination.name)
    uids = [_sop_instance_uid(destination, path) for path in files]
    answer = _post(destination, [path.read_bytes() for path in files], timeout_s)
    report, unacknowledged = _report(destination, uids, answer)
    logger.info(
        "STOW-RS to %s: %d acknowledged, %d failed, %d unacknowledged",
        destination.name,
        len(report.sent),
        len(report.failures),
        len(unacknowledged),
    )
    _raise_for_outcome(destination, report, unacknowledged)
    return report


def answers(destination: StowDestination, *, timeout_s: float = 10) -> bool:
    """Whether the DICOMweb service answers (a QIDO-RS search for one study): any HTTP
    answer below 500 counts, so that a service that is up but lists nothing still does."""
    try:
        with _session(destination) as session:
            web_client(destination.url, session, timeout_s=timeout_s).search_for_studies(limit=1)
        return True
    except requests.HTTPError as exc:
        return exc.response is None or exc.response.status_code < 500
    except requests.JSONDecodeError:
        return True  # an answer, if not a DICOM JSON one
    except requests.RequestException as exc:
        logger.debug("DICOMweb probe of %s: %s", destination, exc)
        return False


def _session(destination: StowDestination) -> requests.Session:
    auth = WebAuth(
        bearer_token=destination.bearer_token,
        tls_ca=destination.tls_ca,
        client_cert=destination.client_cert,
        client_key=destination.client_key,
    )
    return http_session(auth)


def _sop_instance_uid(destination: StowDestination, path: Path) -> str:
    try:
        return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
    except (OSError, InvalidDicomError, AttributeError) as exc:
        raise DispatchError(
            f"STOW-RS to {destination}: cannot read {path.name}: {exc}",
            destination=destination.name,
            retryable=False,
        ) from exc


def _post(destination: StowDestination, parts: Sequence[bytes], timeout_s: float) -> dict[str, Any]:
    """POST the Part 10 files as they are; the DICOM JSON answer when the HTTP status says it
    carries outcomes (a 409 comes as requests' HTTPError, its answer in the response)."""
    try:
        with _session(destination) as session:
            client = web_client(destination.url, session, timeout_s=timeout_s)
            return _json(_post_multipart(client, parts).content)
    except requests.HTTPError as exc:
        response = exc.response
        if response is not None and response.status_code in ANSWERS_WITH_OUTCOMES:
            return _json(response.content)
        raise _dispatch_error(destination, web_error(f"STOW-RS to {destination}", exc)) from exc
    except requests.RequestException as exc:
        raise _dispatch_error(destination, web_error(f"STOW-RS to {destination}", exc)) from exc


def _post_multipart(client: DICOMwebClient, parts: Sequence[bytes]) -> requests.Response:
    """The client's own multipart encoding and POST, with the files' bytes untouched.

    Not ``store_instances``: it takes datasets and writes them again with pydicom, which need
    not give back the bytes of the file. Not ``_http_post_multipart_application_dicom`` either:
    it parses only an answer whose Content-Type is exactly application/dicom+json, so one with a
    charset parameter would read as no outcomes at all.
    """
    boundary = f"pacsclip-{uuid.uuid4().hex}"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    body = client._encode_multipart_message(parts, content_type)
    # One body with a Content-Length: above its chunk size the client switches to chunked
    # transfer encoding, which some DICOMweb servers and proxies refuse.
    client.set_chunk_size(max(len(body), 1))
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    return client._http_post(client.base_url.rstrip("/") + "/studies", body, headers)


def _dispatch_error(destination: StowDestination, error: WebError) -> DispatchError:
    return DispatchError(str(error), destination=destination.name, retryable=error.retryable)


def _json(data: bytes) -> dict[str, Any]:
    """The DICOM JSON answer; an empty or non-object answer counts as no outcomes at all."""
    if not data.strip():
        return {}
    try:
        answer = json.loads(data)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _report(
    destination: StowDestination, uids: Sequence[str], body: dict[str, Any]
) -> tuple[SendReport, list[str]]:
    """Statuses in sending order, and the instances the answer does not mention."""
    outcomes = {uid: SUCCESS for uid in _items_uids(body, REFERENCED_SOP_SEQUENCE)}
    outcomes.update(_failures(body))
    report = SendReport(destination.name, [(uid, outcomes[uid]) for uid in uids if uid in outcomes])
    return report, [uid for uid in uids if uid not in outcomes]


def _sequence_items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    items = body.get(tag, {}).get("Value", [])
    return [item for item in items if isinstance(item, dict)]


def _first_value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value", [])
    return values[0] if values else None


def _items_uids(body: dict[str, Any], tag: str) -> list[str]:
    uids = (_first_value(item, REFERENCED_SOP_INSTANCE_UID) for item in _sequence_items(body, tag))
    return [str(uid) for uid in uids if uid]


def _failures(body: dict[str, Any]) -> dict[str, int]:
    """FailedSOPSequence as {SOPInstanceUID: FailureReason}; 0x0110 when no reason is given."""
    failures: dict[str, int] = {}
    for item in _sequence_items(body, FAILED_SOP_SEQUENCE):
        uid = _first_value(item, REFERENCED_SOP_INSTANCE_UID)
        reason = _first_value(item, FAILURE_REASON)
        if uid:
            failures[str(uid)] = int(reason) if reason is not None else PROCESSING_FAILURE
    return failures


def _raise_for_outcome(
    destination: StowDestination, report: SendReport, unacknowledged: Sequence[str]
) -> None:
    problems: list[str] = []
    retryable = True
    if report.failures:
        problems.append(
            "failed " + ", ".join(f"{uid} 0x{status:04X}" for uid, status in report.failures)
        )
        retryable = all(is_retryable_status(status) for _, status in report.failures)
    if unacknowledged:
        # Not in the answer: the service may or may not have kept it; sending it again is safe
        # because a DICOMweb store of the same SOP Instance UID replaces or ignores the copy.
        problems.append("not acknowledged " + ", ".join(unacknowledged))
    if problems:
        raise DispatchError(
            f"STOW-RS to {destination}: " + "; ".join(problems),
            destination=destination.name,
            retryable=retryable,
            report=report,
        )
