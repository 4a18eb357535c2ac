"""Results dispatch over DICOMweb: STOW-RS (PS3.18 10.5) with the standard library's urllib.

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
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from plugin.delivery.outcome import DispatchError, SendReport, is_retryable_status
from plugin.dicom_status import PROCESSING_FAILURE, SUCCESS

logger = logging.getLogger(__name__)

# PS3.18 10.5.3: 200 all stored, 202 some failed or with warnings, 409 none stored.
ANSWERS_WITH_OUTCOMES = frozenset({200, 202, 409})
RETRYABLE_HTTP = frozenset({408, 429})
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
    boundary = f"pacsclip-{uuid.uuid4().hex}"
    answer = _post(destination, _multipart(files, boundary), boundary, timeout_s)
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
    headers = {"Accept": "application/dicom+json"}
    if destination.bearer_token:
        headers["Authorization"] = f"Bearer {destination.bearer_token}"
    url = destination.url.rstrip("/") + "/studies?limit=1"
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(
            request, timeout=timeout_s, context=_ssl_context(destination)
        ) as response:
            response.read()
            return True
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code < 500
    except (urllib.error.URLError, OSError) as exc:
        logger.debug("DICOMweb probe of %s: %s", destination, exc)
        return False


def _sop_instance_uid(destination: StowDestination, path: Path) -> str:
    try:
        return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
    except (OSError, InvalidDicomError, AttributeError) as exc:
        raise DispatchError(
            f"STOW-RS to {destination}: cannot read {path.name}: {exc}",
            destination=destination.name,
            retryable=False,
        ) from exc


def _multipart(files: Sequence[Path], boundary: str) -> bytes:
    """One application/dicom part per Part 10 file, as PS3.18 8.6.1.2 lays out."""
    parts = [
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + path.read_bytes() + b"\r\n"
        for path in files
    ]  # fmt: skip
    return b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"


def _post(
    destination: StowDestination, body: bytes, boundary: str, timeout_s: float
) -> dict[str, Any]:
    """POST the body; the DICOM JSON answer when the HTTP status says it carries outcomes."""
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if destination.bearer_token:
        headers["Authorization"] = f"Bearer {destination.bearer_token}"
    url = destination.url.rstrip("/") + "/studies"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(
            request, timeout=timeout_s, context=_ssl_context(destination)
        ) as response:
            return _json(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in ANSWERS_WITH_OUTCOMES:
            return _json(exc.read())
        raise DispatchError(
            f"STOW-RS to {destination}: HTTP {exc.code} {exc.reason}",
            destination=destination.name,
            retryable=exc.code in RETRYABLE_HTTP or exc.code >= 500,
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        # Refused, reset, DNS failure, timeout: the service may come back.
        raise DispatchError(
            f"STOW-RS to {destination}: could not connect: {exc}",
            destination=destination.name,
            retryable=True,
        ) from exc


def _ssl_context(destination: StowDestination) -> ssl.SSLContext | None:
    if not destination.url.startswith("https:"):
        return None
    cafile = str(destination.tls_ca) if destination.tls_ca else None
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)


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
