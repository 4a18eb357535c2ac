"""DICOM TLS with client certificates: DCMTK storescu against the node."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom

from plugin.catalog import repository
from tests.integration.conftest import RunningNode
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import StoreResult, storescu
from tests.peers.tls import TlsFiles, make_tls_materials

SUCCESS = 0x0000
NODE_AET = "PACSCLIP"
# storescu's own bounds: connect, association and DIMSE timeouts (seconds).
STORESCU_TIMEOUTS = ["-to", "5", "-ta", "5", "-td", "5"]
# How long a trusted caller is given while another connection sits idle (it needs ~0.2 s).
IDLE_BLOCK_PROBE_S = 4


def _store(
    files: list[Path], node: RunningNode, *, tls: TlsFiles | None, extra: list[str]
) -> StoreResult:
    return storescu(
        files,
        "127.0.0.1",
        node.port,
        aec=NODE_AET,
        tls=tls,
        extra_args=[*STORESCU_TIMEOUTS, *extra],
        timeout_s=30,
    )


def _cataloged(node: RunningNode) -> tuple[int, int]:
    """(studies, stored audit events) in the node's catalog."""
    with node.sessions() as session:
        return (
            len(repository.list_studies(session)),
            len(repository.audit_events(session, event="stored")),
        )


def test_tls_requires_a_trusted_client_certificate(
    tmp_path: Path, start_node: Callable[..., RunningNode]
) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    files = ct_small_copies(2, tmp_path / "ct")
    node = start_node(tls_cert=server.cert, tls_key=server.key, tls_ca=server.ca_cert)

    plain = _store(files, node, tls=None, extra=[])
    assert plain.returncode != 0, plain.stdout[-2000:]
    assert SUCCESS not in plain.statuses

    # TLS that trusts the node's CA but shows no certificate of its own.
    anonymous = _store(files, node, tls=None, extra=["+tla", "+cf", str(client.ca_cert)])
    assert anonymous.returncode != 0, anonymous.stdout[-2000:]
    assert SUCCESS not in anonymous.statuses

    assert _cataloged(node) == (0, 0)

    # The refused handshakes did not take the listener down: a trusted client gets through.
    result = _store(files, node, tls=client, extra=[])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.sent == [(path, SUCCESS) for path in files]
    node.publisher.wait_for(1)  # complete: every instance is cataloged

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with node.sessions() as session:
        detail = repository.study_detail(session, study_uid)
    assert detail is not None
    assert detail["instances"] == 2
    assert detail["calling_ae_title"] == "STORESCU"
    cataloged = {i["sop_instance_uid"] for s in detail["series"] for i in s["instances"]}
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert cataloged == sent
    assert _cataloged(node) == (1, 2)


def test_idle_connection_does_not_block_tls_callers(
    tmp_path: Path, start_node: Callable[..., RunningNode]
) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    files = ct_small_copies(1, tmp_path / "ct")
    node = start_node(tls_cert=server.cert, tls_key=server.key, tls_ca=server.ca_cert)

    result: StoreResult | None = None
    with socket.create_connection(("127.0.0.1", node.port), timeout=5):  # says nothing
        try:
            result = storescu(
                files,
                "127.0.0.1",
                node.port,
                aec=NODE_AET,
                tls=client,
                extra_args=STORESCU_TIMEOUTS,
                timeout_s=IDLE_BLOCK_PROBE_S,
            )
        except subprocess.TimeoutExpired:
            result = None
    assert result is not None, f"storescu got no answer within {IDLE_BLOCK_PROBE_S} s"
    assert result.sent == [(files[0], SUCCESS)]
