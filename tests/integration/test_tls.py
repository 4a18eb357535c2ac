"""DICOM TLS with client certificates: DCMTK storescu against the node."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from plugin.catalog import repository
from plugin.cli.main import app
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


def test_cli_echo_over_tls(tmp_path: Path, start_node: Callable[..., RunningNode]) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    node = start_node(tls_cert=server.cert, tls_key=server.key, tls_ca=server.ca_cert)
    echo = ["--data-dir", str(tmp_path / "cli"), "echo", "127.0.0.1", str(node.port)]
    echo += ["--aec", NODE_AET]
    trusted = ["--tls", "--tls-ca", str(client.ca_cert)]
    identified = [*trusted, "--tls-cert", str(client.cert), "--tls-key", str(client.key)]
    runner = CliRunner()

    ok = runner.invoke(app, [*echo, *identified])
    by_name = runner.invoke(app, [*echo, *identified, "--tls-server-name", "localhost"])
    wrong_name = runner.invoke(app, [*echo, *identified, "--tls-server-name", "pacs.example"])
    anonymous = runner.invoke(app, [*echo, *trusted])
    plain = runner.invoke(app, echo)
    no_tls_flag = runner.invoke(app, [*echo, "--tls-ca", str(client.ca_cert)])

    assert ok.exit_code == 0, ok.output
    assert f"C-ECHO to {NODE_AET}@127.0.0.1:{node.port}: success" in ok.output
    assert by_name.exit_code == 0, by_name.output
    # The certificate names 127.0.0.1 and localhost only; the node requires a client one.
    for refused in (wrong_name, anonymous, plain):
        assert refused.exit_code == 1, refused.output
        assert "refused the association" in refused.output
    assert "TLS handshake failed" in anonymous.output
    assert no_tls_flag.exit_code == 2
    assert "add --tls" in no_tls_flag.output


@pytest.mark.parametrize("receiver_processes", [0, 1])
def test_plain_and_tls_on_separate_ports(
    tmp_path: Path, start_node: Callable[..., RunningNode], receiver_processes: int
) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    node = start_node(
        tls_cert=server.cert,
        tls_key=server.key,
        tls_ca=server.ca_cert,
        dicom_tls_port=0,
        receiver_processes=receiver_processes,
    )
    assert node.node.tls_port is not None
    files = ct_small_copies(1, tmp_path / "ct")

    plain = _store(files, node, tls=None, extra=[])
    secure = storescu(
        files, "127.0.0.1", node.node.tls_port, aec=NODE_AET, tls=client,
        extra_args=STORESCU_TIMEOUTS, timeout_s=30,
    )  # fmt: skip
    plain_to_tls = storescu(
        files, "127.0.0.1", node.node.tls_port, aec=NODE_AET,
        extra_args=STORESCU_TIMEOUTS, timeout_s=30,
    )  # fmt: skip

    assert plain.sent == [(files[0], SUCCESS)], plain.stdout[-2000:]
    assert secure.sent == [(files[0], SUCCESS)], secure.stdout[-2000:]
    assert plain_to_tls.returncode != 0
    assert SUCCESS not in plain_to_tls.statuses
