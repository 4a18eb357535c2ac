"""DICOMweb over HTTP (PS3.18): one ``requests.Session`` per service, ``dicomweb-client`` on it.

``http_session`` carries the service's credentials (bearer token, CA bundle, client certificate);
``web_client`` puts a ``DICOMwebClient`` on that session with the library's own retries off,
because callers classify each failure (``WebError.retryable``) and retry later through their
durable queues rather than block a worker in back-off. ``retrieve_instances`` is WADO-RS by a
full Retrieve URL, as a UPS workitem's WADORSRetrievalSequence gives it.
"""

from __future__ import annotations

import io
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.uri import URI, URIType
from pydicom.errors import InvalidDicomError

from plugin.errors import PacsclipError

if TYPE_CHECKING:
    from requests.sessions import _Settings


RETRYABLE_HTTP = frozenset({408, 429})
# Any transfer syntax: the server sends each instance as it holds it (PS3.18 8.7.3.5.2),
# rather than decompressed to the default Explicit VR Little Endian.
AS_STORED = (("application/dicom", "*"),)


@dataclass(frozen=True)
class WebAuth:
    """How to authenticate to a DICOMweb service and verify it."""

    # Sent as "Authorization: Bearer ..."; never logged.
    bearer_token: str | None = None
    # CA bundle to verify an https service (system CAs when None).
    tls_ca: Path | None = None
    # Mutual TLS: client certificate (PEM) and its key, given together.
    client_cert: Path | None = None
    client_key: Path | None = None


class WebError(PacsclipError):
    """A DICOMweb request failed: ``status`` is the HTTP status, None when no answer came
    (refused, reset, timed out, name not resolved); ``retryable`` says whether trying again
    later can help (no answer, 408, 429, 5xx)."""

    def __init__(self, message: str, *, status: int | None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = is_retryable_http(status) if retryable is None else retryable


class _Session(requests.Session):
    """A session whose own CA bundle wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, which plain
    requests lets override ``Session.verify`` (psf/requests#3829); proxies still come from the
    environment, as they did with urllib."""

    def merge_environment_settings(
        self,
        url: str | bytes | None,
        proxies: MutableMapping[str, str] | None,
        stream: bool | None,
        verify: bool | str | None,
        cert: str | tuple[str, str] | None,
    ) -> _Settings:
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and isinstance(self.verify, str):
            merged["verify"] = self.verify
        return merged


def http_session(auth: WebAuth) -> requests.Session:
    """A session carrying auth on every request (header, CA bundle, client certificate)."""
    if (auth.client_cert is None) != (auth.client_key is None):
        raise ValueError("client_cert and client_key go together")
    session = _Session()
    if auth.bearer_token:
        session.headers["Authorization"] = f"Bearer {auth.bearer_token}"
    if auth.tls_ca is not None:
        session.verify = str(auth.tls_ca)
    if auth.client_cert is not None and auth.client_key is not None:
        session.cert = (str(auth.client_cert), str(auth.client_key))
    return session


def web_client(url: str, session: requests.Session, *, timeout_s: float = 30) -> DICOMwebClient:
    """A client of the service rooted at url (".../dicom-web") on session, without retries."""
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout_s)
    # retry=False, not max_attempts=1: with retries on, a last 429/503 becomes a
    # retrying.RetryError instead of requests' HTTPError.
    client.set_http_retry_params(retry=False)
    return client


def is_retryable_http(status: int | None) -> bool:
    """No answer at all, or an HTTP status that may clear by itself."""
    return status is None or status in RETRYABLE_HTTP or status >= 500


def web_error(what: str, exc: requests.RequestException) -> WebError:
    """The WebError for a failed request; ``what`` names the request ("STOW-RS to pacs")."""
    response = exc.response
    if isinstance(exc, requests.HTTPError) and response is not None:
        status = response.status_code
        return WebError(f"{what}: HTTP {status} {response.reason}", status=status)
    # Refused, reset, DNS failure, timeout: the service may come back.
    return WebError(f"{what}: could not connect: {_reason(exc)}", status=None)


def _reason(exc: requests.RequestException) -> str:
    """urllib3's innermost reason ("Connection refused"), without its "Max retries exceeded"
    wrapper, which reads like retries when none were made."""
    inner = exc.args[0] if exc.args else None
    reason = getattr(inner, "reason", None)
    return str(reason or exc)


def retrieve_instances(
    session: requests.Session, retrieve_url: str, *, timeout_s: float = 60
) -> list[bytes]:
    """WADO-RS retrieve of the study, series or instance at retrieve_url: each instance as Part
    10 file bytes in the transfer syntax the server sent.

    ValueError for a URL that names no study, series or instance; WebError when the request
    fails (a 404 is not retryable, no answer is) or its answer is not multipart DICOM (status
    200, not retryable).
    """
    base_url, uids = _retrieve_uids(retrieve_url)
    client = web_client(base_url, session, timeout_s=timeout_s)
    what = f"WADO-RS retrieve from {base_url}"
    try:
        datasets = _retrieve(client, uids)
    except requests.RequestException as exc:
        raise web_error(what, exc) from exc
    except (InvalidDicomError, ValueError, KeyError) as exc:
        # The UIDs were validated above, so this is the answer: not multipart/related, no
        # Content-Type, or a part that is no DICOM file.
        raise WebError(f"{what}: the answer is not multipart DICOM: {exc}", status=200) from exc
    return [_part10(ds) for ds in datasets]


def _retrieve_uids(retrieve_url: str) -> tuple[str, list[str]]:
    """The service root and the study [, series [, instance]] UIDs of the URL; ValueError
    saying what is wrong when it is not such a resource."""
    if urlsplit(retrieve_url).query:
        raise ValueError(f"WADO-RS retrieve URL {retrieve_url!r} has a query; expected none")
    try:
        uri = URI.from_string(retrieve_url.rstrip("/"))
    except ValueError as exc:
        raise ValueError(f"WADO-RS retrieve URL {retrieve_url!r} is malformed: {exc}") from exc
    if uri.type not in (URIType.STUDY, URIType.SERIES, URIType.INSTANCE) or uri.suffix:
        raise ValueError(
            f"WADO-RS retrieve URL {retrieve_url!r} names no study, series or instance: "
            "expected .../studies/{uid}[/series/{uid}[/instances/{uid}]]"
        )
    uids = [uri.study_instance_uid, uri.series_instance_uid, uri.sop_instance_uid]
    return uri.base_url, [uid for uid in uids if uid is not None]


def _retrieve(client: DICOMwebClient, uids: list[str]) -> list[pydicom.Dataset]:
    """Study, series or instance by how many UIDs there are (1 to 3)."""
    if len(uids) == 1:
        return client.retrieve_study(uids[0], media_types=AS_STORED)
    if len(uids) == 2:
        return client.retrieve_series(uids[0], uids[1], media_types=AS_STORED)
    return [client.retrieve_instance(uids[0], uids[1], uids[2], media_types=AS_STORED)]


def _part10(ds: pydicom.Dataset) -> bytes:
    """The dataset as read (preamble, file meta, transfer syntax), written back as it came."""
    with io.BytesIO() as buffer:
        ds.save_as(buffer, enforce_file_format=False)
        return buffer.getvalue()
