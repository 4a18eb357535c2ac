"""WADO-RS retrieval by Retrieve URL (plugin.dicomweb) against Orthanc's DICOMweb plugin, and
against a canned server for what Orthanc cannot show (headers sent, a 503, mutual TLS)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from plugin.dicomweb import WebAuth, WebError, http_session, retrieve_instances
from tests.peers.data import ct_small_copies
from tests.peers.orthanc import OrthancServer, dicomweb_installed
from tests.peers.ports import free_port
from tests.peers.tls import make_tls_materials

TIMEOUT_S = 5
needs_dicomweb = pytest.mark.skipif(
    not dicomweb_installed(), reason="Orthanc's DICOMweb plugin (orthanc-dicomweb) absent"
)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(data))


def _by_uid(files: list[Path]) -> dict[str, pydicom.Dataset]:
    datasets = (pydicom.dcmread(path) for path in files)
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


class _Stored:
    """One study in Orthanc: a series of two CT images and a series of one."""

    def __init__(self, orthanc: OrthancServer, directory: Path) -> None:
        self.root = f"{orthanc.url}/dicom-web"
        first = ct_small_copies(2, directory / "first")
        self.study_uid = str(pydicom.dcmread(first[0]).StudyInstanceUID)
        second = ct_small_copies(1, directory / "second", study_uid=self.study_uid)
        for path in first + second:
            orthanc.upload(path)
        self.first, self.second = first, second
        self.series_uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Stored]:
    if not dicomweb_installed():
        pytest.skip("Orthanc's DICOMweb plugin (orthanc-dicomweb) absent")
    workdir = tmp_path_factory.mktemp("orthanc")
    with OrthancServer(dicomweb=True, workdir=workdir) as orthanc:
        yield _Stored(orthanc, tmp_path_factory.mktemp("stored"))


def _assert_same_instances(retrieved: list[bytes], files: list[Path]) -> None:
    expected = _by_uid(files)
    got = {str(ds.SOPInstanceUID): ds for ds in map(_read, retrieved)}
    assert set(got) == set(expected)
    for uid, ds in got.items():
        assert ds.PixelData == expected[uid].PixelData
        assert ds.file_meta.TransferSyntaxUID == expected[uid].file_meta.TransferSyntaxUID


@needs_dicomweb
def test_study_series_and_instance_are_retrieved_as_part10(stored: _Stored) -> None:
    session = http_session(WebAuth())
    study_url = f"{stored.root}/studies/{stored.study_uid}"
    series_url = f"{study_url}/series/{stored.series_uid}"
    one = stored.first[0]
    instance_url = f"{series_url}/instances/{pydicom.dcmread(one).SOPInstanceUID}"

    study = retrieve_instances(session, study_url, timeout_s=TIMEOUT_S)
    series = retrieve_instances(session, series_url, timeout_s=TIMEOUT_S)
    instance = retrieve_instances(session, instance_url, timeout_s=TIMEOUT_S)

    _assert_same_instances(study, stored.first + stored.second)
    _assert_same_instances(series, stored.first)
    _assert_same_instances(instance, [one])
    assert instance[0][128:132] == b"DICM"  # a Part 10 file: preamble, then file meta


@needs_dicomweb
def test_unknown_study_is_not_retryable(stored: _Stored) -> None:
    url = f"{stored.root}/studies/{generate_uid()}"

    with pytest.raises(WebError) as caught:
        retrieve_instances(http_session(WebAuth()), url, timeout_s=TIMEOUT_S)

    assert caught.value.status == 404
    assert not caught.value.retryable
    assert "HTTP 404" in str(caught.value)


def test_nothing_listening_is_retryable_without_status() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web/studies/{generate_uid()}"

    with pytest.raises(WebError) as caught:
        retrieve_instances(http_session(WebAuth()), url, timeout_s=TIMEOUT_S)

    assert caught.value.status is None
    assert caught.value.retryable
    assert "could not connect" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://pacs/dicom-web", "names no study, series or instance"),
        ("http://pacs/dicom-web/studies/1.2.3/metadata", "names no study, series or instance"),
        ("http://pacs/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1", "names no"),
        ("http://pacs/dicom-web/studies/1.2.3/patients/4.5", "is malformed"),
        ("http://pacs/dicom-web/studies/not-a-uid", "is malformed"),
        ("ftp://pacs/dicom-web/studies/1.2.3", "is malformed"),
        ("http://pacs/dicom-web/studies/1.2.3?token=x", "has a query"),
    ],
)
def test_a_url_naming_no_resource_is_a_value_error(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        retrieve_instances(http_session(WebAuth()), url)


class _CannedWadoServer(ThreadingHTTPServer):
    """A WADO-RS stand-in answering every GET with ``status`` and, when 200, ``files`` as one
    multipart/related answer; it keeps each request's headers for the test to inspect."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(("127.0.0.1", 0), _CannedWadoHandler)
        self.status = 200
        self.files = files
        self.requests: list[dict[str, str]] = []

    @property
    def root(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}/dicom-web"


class _CannedWadoHandler(BaseHTTPRequestHandler):
    server: _CannedWadoServer

    def do_GET(self) -> None:
        self.server.requests.append(dict(self.headers))
        boundary = "canned"
        parts = [
            b"\r\n--canned\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes()
            for path in self.server.files
        ]
        body = b"".join(parts) + b"\r\n--canned--" if self.server.status == 200 else b""
        self.send_response(self.server.status)
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the test asserts on what was asked, not on the access log."""


@contextmanager
def _serving(server: _CannedWadoServer) -> Iterator[_CannedWadoServer]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def canned_wado(tmp_path: Path) -> Iterator[_CannedWadoServer]:
    with _serving(_CannedWadoServer(ct_small_copies(1, tmp_path / "canned"))) as server:
        yield server


def _instance_url(server: _CannedWadoServer) -> str:
    ds = pydicom.dcmread(server.files[0])
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    return f"{server.root}/studies/{study}/series/{series}/instances/{sop}"


def test_bearer_token_and_any_transfer_syntax_are_asked(canned_wado: _CannedWadoServer) -> None:
    session = http_session(WebAuth(bearer_token="s3cret"))

    retrieved = retrieve_instances(session, _instance_url(canned_wado), timeout_s=TIMEOUT_S)

    assert retrieved == [canned_wado.files[0].read_bytes()]  # written back byte for byte
    (headers,) = canned_wado.requests
    assert headers["Authorization"] == "Bearer s3cret"
    assert "transfer-syntax=*" in headers["Accept"]


def test_server_error_is_retryable_and_tried_once(canned_wado: _CannedWadoServer) -> None:
    canned_wado.status = 503

    with pytest.raises(WebError) as caught:
        retrieve_instances(http_session(WebAuth()), _instance_url(canned_wado))

    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert len(canned_wado.requests) == 1  # no retries inside dicomweb-client


def test_mutual_tls(tmp_path: Path) -> None:
    server_tls, client_tls = make_tls_materials(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(server_tls.ca_cert))
    context.load_cert_chain(server_tls.cert, server_tls.key)
    context.verify_mode = ssl.CERT_REQUIRED
    server = _CannedWadoServer(ct_small_copies(1, tmp_path / "canned"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    auth = WebAuth(
        tls_ca=client_tls.ca_cert, client_cert=client_tls.cert, client_key=client_tls.key
    )

    with _serving(server) as running:
        retrieved = retrieve_instances(http_session(auth), _instance_url(running), timeout_s=5)
        assert (
            _read(retrieved[0]).SOPInstanceUID == pydicom.dcmread(running.files[0]).SOPInstanceUID
        )
        with pytest.raises(WebError) as caught:  # no client certificate: no answer
            retrieve_instances(
                http_session(WebAuth(tls_ca=client_tls.ca_cert)), _instance_url(running)
            )
        assert caught.value.status is None
