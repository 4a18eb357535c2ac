"""Self-test of the peer helpers against real DCMTK and Orthanc processes on 127.0.0.1."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.peers.data import ct_small_copies, rg1
from tests.peers.dcmtk import echoscu, stop_process, storescp, storescu
from tests.peers.ohif import OhifServer, ohif_installed
from tests.peers.orthanc import OrthancServer, dicomweb_installed
from tests.peers.ports import free_port
from tests.peers.tls import make_tls_materials

SUCCESS = 0x0000


def _received_sop_uids(output_dir: Path) -> set[str]:
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in output_dir.iterdir()}


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}


def test_storescu_statuses_and_echo(tmp_path: Path) -> None:
    files = ct_small_copies(3, tmp_path / "in")
    port, received = free_port(), tmp_path / "received"
    with storescp(port, received):
        result = storescu(files, "127.0.0.1", port, aec="STORESCP")
        echo = echoscu("127.0.0.1", port, aec="STORESCP")

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.sent == [(path, SUCCESS) for path in files]
    assert _received_sop_uids(received) == _sop_uids(files)
    assert echo.returncode == 0, echo.stderr
    assert not result.association_rejected


def test_popen_mode_and_directory_input(tmp_path: Path) -> None:
    files = ct_small_copies(2, tmp_path / "in")
    port = free_port()
    with storescp(port, tmp_path / "received"):
        process, finish = storescu([tmp_path / "in"], "127.0.0.1", port, aec="STORESCP", popen=True)
        result = finish()

    assert process.returncode == 0
    assert sorted(result.sent) == [(path, SUCCESS) for path in files]


def test_popen_result_after_receiver_killed_mid_association(tmp_path: Path) -> None:
    files = ct_small_copies(2, tmp_path / "in")
    port, log = free_port(), tmp_path / "storescp.log"
    slow = ["--sleep-during", "5"]
    with storescp(port, tmp_path / "received", log_path=log, extra_args=slow) as scp:
        process, finish = storescu(files, "127.0.0.1", port, aec="STORESCP", popen=True)
        deadline = time.monotonic() + 5
        while "Received Store Request" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        stop_process(scp)
        result = finish()

    assert process.returncode != 0
    assert result.sent == [(files[0], None)]


def test_rejected_association_is_detected(tmp_path: Path) -> None:
    port = free_port()
    with storescp(port, tmp_path / "received", extra_args=["--refuse"]):
        result = storescu(ct_small_copies(1, tmp_path / "in"), "127.0.0.1", port, aec="STORESCP")

    assert result.returncode != 0
    assert result.association_rejected
    assert result.sent == []


def test_orthanc_finds_and_stores_to_storescp(tmp_path: Path) -> None:
    [ct] = ct_small_copies(1, tmp_path / "in")
    study_uid = str(pydicom.dcmread(ct).StudyInstanceUID)
    port, received = free_port(), tmp_path / "received"
    with (
        storescp(port, received),
        OrthancServer(
            modalities={"scp": ("STORESCP", "127.0.0.1", port)}, workdir=tmp_path / "orthanc"
        ) as orthanc,
    ):
        assert orthanc.upload(ct)["Status"] == "Success"
        orthanc_id = orthanc.find_study(study_uid)
        assert orthanc_id is not None
        assert orthanc.wait_for_instances(study_uid, 1, timeout_s=5) == orthanc_id
        assert orthanc.study(orthanc_id)["MainDicomTags"]["StudyInstanceUID"] == study_uid
        [instance] = orthanc.study_instances(orthanc_id)
        assert orthanc.instance_file(instance["ID"]) == ct.read_bytes()
        assert orthanc.echo("scp")
        answer = orthanc.store_to_modality("scp", [orthanc_id])
        assert answer["FailedInstancesCount"] == 0, answer

    assert _received_sop_uids(received) == _sop_uids([ct])


def test_storescu_over_mutual_tls(tmp_path: Path) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    files = ct_small_copies(1, tmp_path / "in")
    port, received = free_port(), tmp_path / "received"
    with storescp(port, received, tls=server):
        result = storescu(files, "127.0.0.1", port, aec="STORESCP", tls=client)
        anonymous = ["+tla", "+cf", str(client.ca_cert)]
        no_cert = storescu(files, "127.0.0.1", port, aec="STORESCP", extra_args=anonymous)

    assert result.sent == [(files[0], SUCCESS)], result.stderr[-2000:]
    assert _received_sop_uids(received) == _sop_uids(files)
    assert no_cert.returncode != 0


def test_rg1_files_are_the_chest_radiograph() -> None:
    for encoding in ("uncompressed", "j2k"):
        ds = pydicom.dcmread(rg1(encoding), stop_before_pixels=True)
        assert (ds.Modality, ds.Rows, ds.Columns) == ("CR", 1955, 1841)
    assert pydicom.dcmread(rg1("j2k"), stop_before_pixels=True).file_meta.TransferSyntaxUID == (
        "1.2.840.10008.1.2.4.90"
    )


def test_ohif_origin_serves_the_viewer_and_orthancs_dicomweb(tmp_path: Path) -> None:
    if not (dicomweb_installed() and ohif_installed()):
        pytest.skip("orthanc-dicomweb or OHIF's build (.cache/ohif, scripts/bootstrap) missing")
    [source] = ct_small_copies(1, tmp_path / "in")
    study_uid = str(pydicom.dcmread(source).StudyInstanceUID)
    with (
        OrthancServer(workdir=tmp_path / "orthanc", dicomweb=True) as orthanc,
        OhifServer(orthanc.url, tmp_path / "ohif.log") as ohif,
    ):
        orthanc.upload(source)

        def get(path: str, accept: str = "*/*") -> tuple[str, bytes]:
            request = urllib.request.Request(ohif.url + path, headers={"Accept": accept})
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(response.headers["Content-Type"]), response.read()

        # A route of the single-page app answers index.html; app-config.js is the generated one.
        kind, page = get(f"/viewer?StudyInstanceUIDs={study_uid}")
        assert kind.startswith("text/html") and b"app-config.js" in page
        _, config = get("/app-config.js")
        assert b'"qidoRoot": "/dicom-web"' in config
        # QIDO-RS through the same origin finds the study in Orthanc.
        kind, found = get(f"/dicom-web/studies?StudyInstanceUID={study_uid}", "application/json")
        assert kind.startswith("application/dicom+json")
        [study] = json.loads(found)
        assert study["0020000D"]["Value"] == [study_uid]
        # A missing asset is a 404, not the app.
        with pytest.raises(urllib.error.HTTPError) as missing:
            get("/no-such-bundle.js")
        assert missing.value.code == 404
