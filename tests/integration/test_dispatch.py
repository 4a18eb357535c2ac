"""Results dispatch (C-STORE SCU) against DCMTK storescp, Orthanc and a scripted pynetdicom SCP."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from plugin.delivery.dimse import Destination, send_files
from plugin.delivery.outcome import DispatchError, SendReport
from plugin.delivery.stow import StowDestination, stow_files
from plugin.dicom_logging import quiet_identifiers
from plugin.dicom_status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import storescp
from tests.peers.orthanc import OrthancServer
from tests.peers.ports import free_port
from tests.peers.tls import make_tls_materials

CALLING_AET = "PACSCLIP"
STORESCP_AET = "STORESCP"
COERCED = 0xB000  # warning: stored with coerced elements
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_dicomweb = pytest.mark.skipif(
    not DICOMWEB_PLUGIN.is_file(), reason="Orthanc's DICOMweb plugin (orthanc-dicomweb) absent"
)
# Short enough that a test of an unreachable peer stays fast, long enough for loopback peers.
TIMEOUT_S = 5


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _received(directory: Path) -> dict[str, pydicom.Dataset]:
    """Files storescp wrote, by SOPInstanceUID."""
    datasets = (pydicom.dcmread(path) for path in directory.iterdir())
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _storescp_destination(port: int, **tls: Any) -> Destination:
    return Destination("archive", STORESCP_AET, "127.0.0.1", port, **tls)


def test_storescp_receives_every_file_with_identical_pixel_data(tmp_path: Path) -> None:
    files = ct_small_copies(3, tmp_path / "results")
    port, received = free_port(), tmp_path / "received"
    with storescp(port, received):
        report = send_files(
            _storescp_destination(port), files, calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S
        )

    assert report == SendReport("archive", [(_uid(f), SUCCESS) for f in files])
    assert report.ok
    arrived = _received(received)
    for path in files:
        assert arrived[_uid(path)].PixelData == pydicom.dcmread(path).PixelData


def test_peer_accepting_only_implicit_vr_gets_the_explicit_vr_file_converted(
    tmp_path: Path,
) -> None:
    [ct] = ct_small_copies(1, tmp_path / "results")
    port, received = free_port(), tmp_path / "received"
    with storescp(port, received, extra_args=["+xi"]):
        report = send_files(
            _storescp_destination(port), [ct], calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S
        )

    assert report.ok
    [arrived] = _received(received).values()
    assert arrived.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert arrived.PixelData == pydicom.dcmread(ct).PixelData


def test_compressed_file_goes_in_its_own_syntax_or_is_reported_unsendable(
    tmp_path: Path,
) -> None:
    rle_source = get_testdata_file("MR_small_RLE.dcm")
    assert rle_source is not None
    rle = Path(shutil.copy(rle_source, tmp_path / "mr_rle.dcm"))
    [ct] = ct_small_copies(1, tmp_path / "results")

    # storescp's default accepts uncompressed syntaxes only: the CT goes, the RLE file cannot.
    port = free_port()
    with storescp(port, tmp_path / "uncompressed_only"), pytest.raises(DispatchError) as caught:
        send_files(_storescp_destination(port), [ct, rle], calling_ae_title=CALLING_AET)
    assert not caught.value.retryable
    assert "no accepted presentation context" in str(caught.value)
    assert _uid(rle) in str(caught.value)
    assert caught.value.report == SendReport("archive", [(_uid(ct), SUCCESS)])

    port, received = free_port(), tmp_path / "all_syntaxes"
    with storescp(port, received, extra_args=["+xa"]):
        report = send_files(_storescp_destination(port), [ct, rle], calling_ae_title=CALLING_AET)
    assert report.ok
    arrived = _received(received)[_uid(rle)]
    assert arrived.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert arrived.PixelData == pydicom.dcmread(rle).PixelData


def test_nothing_listening_is_retryable(tmp_path: Path) -> None:
    files = ct_small_copies(1, tmp_path / "results")
    destination = Destination("gone", "PACS", "127.0.0.1", free_port())

    with pytest.raises(DispatchError) as caught:
        send_files(destination, files, calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)

    assert caught.value.retryable
    assert caught.value.destination == "gone"
    assert f"gone (PACS@127.0.0.1:{destination.port})" in str(caught.value)
    assert "could not connect" in str(caught.value)
    assert caught.value.report is None


def test_abort_during_store_is_retryable(tmp_path: Path) -> None:
    files = ct_small_copies(2, tmp_path / "results")
    port = free_port()
    aborting = storescp(port, tmp_path / "received", extra_args=["--abort-after"])
    with aborting, pytest.raises(DispatchError) as caught:
        send_files(_storescp_destination(port), files, calling_ae_title=CALLING_AET)

    assert caught.value.retryable
    assert "aborted" in str(caught.value)
    assert caught.value.report == SendReport("archive", [])


def test_mutual_tls(tmp_path: Path) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    files = ct_small_copies(1, tmp_path / "results")
    port, received = free_port(), tmp_path / "received"
    tls = {"tls": True, "tls_ca": client.ca_cert, "tls_cert": client.cert, "tls_key": client.key}
    with storescp(port, received, tls=server):
        report = send_files(_storescp_destination(port, **tls), files, calling_ae_title=CALLING_AET)
        # Without a client certificate the TLS handshake fails: the association never opens.
        with pytest.raises(DispatchError) as caught:
            send_files(
                _storescp_destination(port, tls=True, tls_ca=client.ca_cert),
                files,
                calling_ae_title=CALLING_AET,
                timeout_s=TIMEOUT_S,
            )

    assert report.ok
    assert set(_received(received)) == {_uid(files[0])}
    assert caught.value.retryable


class CheckingOrthanc(OrthancServer):
    """Orthanc refusing associations addressed to another AE title, with DICOMweb when the
    Debian package orthanc-dicomweb is installed."""

    def _config(self, workdir: Path) -> dict[str, Any]:
        config = {**super()._config(workdir), "DicomCheckCalledAet": True}
        if DICOMWEB_PLUGIN.is_file():
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with CheckingOrthanc(workdir=tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _orthanc_instances(orthanc: OrthancServer, study_uid: str, count: int) -> dict[str, str]:
    """Orthanc's instance ids by SOPInstanceUID, once it holds count instances of the study."""
    orthanc_id = orthanc.wait_for_instances(study_uid, count, timeout_s=5)
    instances = orthanc.study_instances(orthanc_id)
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances}


def test_orthanc_stores_every_instance(tmp_path: Path, orthanc: OrthancServer) -> None:
    files = ct_small_copies(3, tmp_path / "results")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    destination = Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port)

    report = send_files(destination, files, calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)

    assert report.ok
    assert set(_orthanc_instances(orthanc, study_uid, 3)) == {_uid(f) for f in files}


def test_wrong_called_ae_title_is_retryable(tmp_path: Path, orthanc: OrthancServer) -> None:
    files = ct_small_copies(1, tmp_path / "results")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    destination = Destination("pacs", "NOT-ORTHANC", "127.0.0.1", orthanc.dicom_port)

    with pytest.raises(DispatchError) as caught:
        send_files(destination, files, calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)

    assert caught.value.retryable
    message = str(caught.value)
    assert f"NOT-ORTHANC@127.0.0.1:{orthanc.dicom_port}" in message
    # Orthanc closes the connection right after its A-ASSOCIATE-RJ; in about 1 of 100 tries
    # here the close overtakes the RJ and pynetdicom sees only a closed transport.
    assert (
        "association rejected (Rejected Permanent, Service User: Called AE title not recognised)"
        in message
        or "association aborted during negotiation" in message
    )
    assert orthanc.find_study(study_uid) is None


def _answer_with(event: evt.Event, statuses: Mapping[str, int]) -> int:
    """EVT_C_STORE handler: the scripted status for this instance, success otherwise."""
    request = event.request
    if not isinstance(request, C_STORE):
        raise TypeError(f"expected a C-STORE request, got {type(request).__name__}")
    return statuses.get(str(request.AffectedSOPInstanceUID), SUCCESS)


@pytest.fixture
def scripted_scp() -> Iterator[tuple[int, dict[str, int]]]:
    """A pynetdicom SCP answering C-STOREs with the statuses put into the yielded dict."""
    quiet_identifiers()
    statuses: dict[str, int] = {}
    ae = AE(ae_title="SCRIPTED")
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, _answer_with, [statuses])],
    )
    if server is None:  # only a blocking server returns None
        raise RuntimeError("pynetdicom did not start a non-blocking server")
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("scripted", "retryable"),
    [
        ((OUT_OF_RESOURCES, CANNOT_UNDERSTAND), False),
        ((OUT_OF_RESOURCES, SUCCESS), True),
        ((CANNOT_UNDERSTAND, SUCCESS), False),
    ],
)
def test_failure_statuses_are_reported_per_instance(
    tmp_path: Path,
    scripted_scp: tuple[int, dict[str, int]],
    scripted: tuple[int, int],
    retryable: bool,
) -> None:
    port, statuses = scripted_scp
    files = ct_small_copies(3, tmp_path / "results")
    uids = [_uid(f) for f in files]
    statuses.update(zip(uids, scripted, strict=False))
    expected = [(uid, statuses.get(uid, SUCCESS)) for uid in uids]

    with pytest.raises(DispatchError) as caught:
        send_files(Destination("scripted", "SCRIPTED", "127.0.0.1", port), files,
                   calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)  # fmt: skip

    assert caught.value.retryable is retryable
    assert caught.value.report == SendReport("scripted", expected)
    for uid, status in expected:
        named = f"{uid} 0x{status:04X}" in str(caught.value)
        assert named is (status != SUCCESS)


def test_warning_status_counts_as_stored(
    tmp_path: Path, scripted_scp: tuple[int, dict[str, int]]
) -> None:
    port, statuses = scripted_scp
    files = ct_small_copies(2, tmp_path / "results")
    statuses[_uid(files[0])] = COERCED

    report = send_files(Destination("scripted", "SCRIPTED", "127.0.0.1", port), files,
                        calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)  # fmt: skip

    assert report.ok
    assert report.sent == [(_uid(files[0]), COERCED), (_uid(files[1]), SUCCESS)]


def _sr_file(directory: Path) -> Path:
    """A Part 10 file of Comprehensive 3D SR Storage: a class the scripted SCP does not take."""
    ds = Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


SR_CLASS = f"Comprehensive 3D SR Storage ({Comprehensive3DSRStorage})"


def test_a_refused_sop_class_is_named_in_the_dead_letter_reason(
    tmp_path: Path, scripted_scp: tuple[int, dict[str, int]]
) -> None:
    port, _ = scripted_scp  # CT Image Storage only
    destination = Destination("scripted", "SCRIPTED", "127.0.0.1", port)
    [ct] = ct_small_copies(1, tmp_path / "results")
    sr = _sr_file(tmp_path / "results")

    # The CT goes; the SR has no accepted context and is named with its class.
    with pytest.raises(DispatchError) as mixed:
        send_files(destination, [ct, sr], calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)
    # Nothing the destination takes: it accepts no context at all, and the message says which.
    with pytest.raises(DispatchError) as only_sr:
        send_files(destination, [sr], calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)

    assert not mixed.value.retryable and not only_sr.value.retryable
    assert mixed.value.report == SendReport("scripted", [(_uid(ct), SUCCESS)])
    assert (
        f"no accepted presentation context for {SR_CLASS} in Explicit VR Little Endian: "
        f"{_uid(sr)}" in str(mixed.value)
    )
    assert f"accepts none of the SOP classes sent: {SR_CLASS}" in str(only_sr.value)
    assert "CT Image Storage" not in str(only_sr.value)


def test_no_files_opens_no_association() -> None:
    destination = Destination("gone", "PACS", "127.0.0.1", free_port())

    assert send_files(destination, [], calling_ae_title=CALLING_AET) == SendReport("gone", [])


@needs_dicomweb
def test_stow_rs_stores_every_instance(tmp_path: Path, orthanc: OrthancServer) -> None:
    files = ct_small_copies(3, tmp_path / "results")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    destination = StowDestination("web", f"{orthanc.url}/dicom-web")

    report = stow_files(destination, files, timeout_s=TIMEOUT_S)

    assert report == SendReport("web", [(_uid(f), SUCCESS) for f in files])
    stored = _orthanc_instances(orthanc, study_uid, 3)
    assert set(stored) == {_uid(f) for f in files}
    # STOW-RS carries the Part 10 files as they are.
    assert orthanc.instance_file(stored[_uid(files[0])]) == files[0].read_bytes()


@needs_dicomweb
def test_stow_rs_wrong_root_is_not_retryable(tmp_path: Path, orthanc: OrthancServer) -> None:
    files = ct_small_copies(1, tmp_path / "results")
    destination = StowDestination("web", f"{orthanc.url}/no-dicom-web-here")

    with pytest.raises(DispatchError) as caught:
        stow_files(destination, files, timeout_s=TIMEOUT_S)

    assert not caught.value.retryable
    assert "HTTP 404" in str(caught.value)


def test_stow_rs_nothing_listening_is_retryable(tmp_path: Path) -> None:
    files = ct_small_copies(1, tmp_path / "results")
    destination = StowDestination("web", f"http://127.0.0.1:{free_port()}/dicom-web")

    with pytest.raises(DispatchError) as caught:
        stow_files(destination, files, timeout_s=TIMEOUT_S)

    assert caught.value.retryable
    assert "could not connect" in str(caught.value)


class _CannedStowServer(ThreadingHTTPServer):
    """A DICOMweb stand-in answering every POST with ``status`` and the DICOM JSON ``answer``,
    keeping the request's Content-Type and body for the test to inspect."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CannedStowHandler)
        self.status = 202
        self.answer: dict[str, Any] = {}
        self.content_type = ""
        self.body = b""


class _CannedStowHandler(BaseHTTPRequestHandler):
    server: _CannedStowServer

    def do_POST(self) -> None:
        self.server.content_type = self.headers["Content-Type"]
        self.server.body = self.rfile.read(int(self.headers["Content-Length"]))
        payload = json.dumps(self.server.answer).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the test asserts on what was sent, not on the access log."""


@pytest.fixture
def canned_stow() -> Iterator[_CannedStowServer]:
    server = _CannedStowServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _sop_items(outcomes: Sequence[tuple[str, int | None]]) -> dict[str, Any]:
    """A STOW-RS answer sequence: one item per (SOPInstanceUID, FailureReason or None)."""
    items = []
    for uid, reason in outcomes:
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {"vr": "SQ", "Value": items}


# 409 (none stored) comes from dicomweb-client as an HTTPError; its answer still counts.
@pytest.mark.parametrize("status", [202, 409])
def test_stow_rs_failure_reasons_are_reported_per_instance(
    tmp_path: Path, canned_stow: _CannedStowServer, status: int
) -> None:
    files = ct_small_copies(4, tmp_path / "results")
    uids = [_uid(f) for f in files]
    canned_stow.status = status
    canned_stow.answer = {
        "00081199": _sop_items([(uids[0], None)]),
        "00081198": _sop_items([(uids[1], OUT_OF_RESOURCES), (uids[2], CANNOT_UNDERSTAND)]),
    }
    port = canned_stow.server_address[1]

    with pytest.raises(DispatchError) as caught:
        stow_files(StowDestination("web", f"http://127.0.0.1:{port}/dicom-web"), files)

    assert not caught.value.retryable  # 0xC000 will not go away by resending
    expected = [(uids[0], SUCCESS), (uids[1], OUT_OF_RESOURCES), (uids[2], CANNOT_UNDERSTAND)]
    assert caught.value.report == SendReport("web", expected)
    message = str(caught.value)
    assert f"{uids[1]} 0xA700" in message
    assert f"{uids[2]} 0xC000" in message
    assert f"not acknowledged {uids[3]}" in message
    assert canned_stow.content_type.startswith('multipart/related; type="application/dicom"')
    assert canned_stow.body.count(b"Content-Type: application/dicom\r\n") == len(files)
