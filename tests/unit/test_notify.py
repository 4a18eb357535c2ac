"""STAT webhook and HL7 ORU^R01 over MLLP, against small receivers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from plugin.errors import ConfigError
from plugin.notify import NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL, NotificationError
from plugin.notify.hl7 import build_oru, check_ack, escape, send_mllp
from plugin.notify.webhook import SIGNATURE_HEADER, notify_stat, stat_payload

STUDY_UID = "1.2.826.0.1.3680043.8.498.7"
WHEN = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def flag(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "study_instance_uid": STUDY_UID,
        "accession_number": "ACC-0042",
        "patient_id": "PID-77",
        "priority": "stat",
        "algorithm": {"name": "demo-cxr", "version": "1.2", "synthetic": True},
        "findings": [
            {"name": "pneumothorax", "probability": 0.91, "decision": "present"},
            {"name": "effusion", "probability": 0.12, "decision": "absent"},
        ],
        "triggered_by": ["pneumothorax"],
    }
    base.update(changes)
    return base


def start(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return thread


def stop(server: socketserver.BaseServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def closed_port() -> int:
    """A port nothing listens on: bound, read, and released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- webhook ------------------------------------------------------------------------------


class HookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HookHandler)
        self.received: list[tuple[bytes, dict[str, str]]] = []
        self.statuses: list[int] = []  # answered in order; 200 once used up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?key=abc"


class HookHandler(BaseHTTPRequestHandler):
    server: HookServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((body, dict(self.headers.items())))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the default handler writes every request to stderr."""


@pytest.fixture
def hook() -> Iterator[HookServer]:
    server = HookServer()
    thread = start(server)
    yield server
    stop(server, thread)


class Sleeps(list[float]):
    """Records the backoff instead of sleeping, so retry tests take milliseconds."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_stat_payload_names_the_triggering_findings_and_the_disclaimers() -> None:
    payload = stat_payload(flag())

    assert payload["study_instance_uid"] == STUDY_UID
    assert payload["accession_number"] == "ACC-0042"
    assert payload["priority"] == "stat"
    assert payload["findings"] == [
        {"name": "pneumothorax", "probability": 0.91, "decision": "present"}
    ]
    assert payload["algorithm"] == {"name": "demo-cxr", "version": "1.2", "synthetic": True}
    assert payload["disclaimer"] == f"{NOT_FOR_DIAGNOSIS}; {SYNTHETIC_MODEL}"
    assert "patient_id" not in payload


def test_without_triggers_the_present_findings_are_named_and_a_real_model_not_synthetic() -> None:
    real = {"name": "cxr", "version": "2", "synthetic": False}
    payload = stat_payload(flag(triggered_by=None, algorithm=real))

    assert [f["name"] for f in payload["findings"]] == ["pneumothorax"]
    assert payload["disclaimer"] == NOT_FOR_DIAGNOSIS


def test_webhook_posts_the_json_signed_with_the_secret(hook: HookServer) -> None:
    payload = stat_payload(flag())

    notify_stat(hook.url, payload, secret="shared-secret")

    ((body, headers),) = hook.received
    assert json.loads(body) == payload
    assert headers["Content-Type"] == "application/json"
    expected = hmac.new(b"shared-secret", body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}"


def test_webhook_without_a_secret_sends_no_signature(hook: HookServer) -> None:
    notify_stat(hook.url, stat_payload(flag()))

    ((_, headers),) = hook.received
    assert SIGNATURE_HEADER not in headers


def test_webhook_retries_a_5xx_then_gives_up(hook: HookServer) -> None:
    hook.statuses = [500] * 10
    sleeps = Sleeps()

    with pytest.raises(NotificationError, match=r"after 4 attempts.*HTTP 500"):
        notify_stat(hook.url, stat_payload(flag()), sleep=sleeps)

    assert len(hook.received) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_webhook_recovers_when_the_receiver_does(hook: HookServer) -> None:
    hook.statuses = [503, 502]
    sleeps = Sleeps()

    notify_stat(hook.url, stat_payload(flag()), sleep=sleeps)

    assert len(hook.received) == 3
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 401, 302])
def test_webhook_does_not_retry_a_refusal(hook: HookServer, status: int) -> None:
    hook.statuses = [status]
    sleeps = Sleeps()

    with pytest.raises(NotificationError, match=rf"refused.*HTTP {status}"):
        notify_stat(hook.url, stat_payload(flag()), sleep=sleeps)

    assert len(hook.received) == 1
    assert sleeps == []


def test_webhook_retries_connection_errors() -> None:
    sleeps = Sleeps()

    with pytest.raises(NotificationError, match="no response"):
        notify_stat(
            f"http://127.0.0.1:{closed_port()}/", stat_payload(flag()), timeout_s=1, sleep=sleeps
        )

    assert len(sleeps) == 3


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "127.0.0.1:80"])
def test_webhook_refuses_urls_that_are_not_http(url: str) -> None:
    with pytest.raises(ConfigError):
        notify_stat(url, stat_payload(flag()))


def test_webhook_logs_the_study_uid_and_status_only(
    hook: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="plugin.notify")

    notify_stat(hook.url, stat_payload(flag()), secret="shared-secret")

    assert STUDY_UID in caplog.text
    assert "status=200" in caplog.text
    for private in ("ACC-0042", "PID-77", "shared-secret", "key=abc", "pneumothorax"):
        assert private not in caplog.text


# --- HL7 ------------------------------------------------------------------------------------


def oru(**changes: Any) -> str:
    return build_oru(flag(**changes), receiving_app="RIS", control_id="MSG0001", timestamp=WHEN)


def fields(message: str, name: str) -> list[list[str]]:
    return [s.split("|") for s in message.split("\r") if s.startswith(name + "|")]


def test_oru_has_the_segments_of_an_r01_in_order() -> None:
    message = oru()

    assert "\n" not in message
    assert message.endswith("\r")
    names = [s[:3] for s in message.rstrip("\r").split("\r")]
    assert names == ["MSH", "PID", "OBR", "NTE", "NTE", "NTE", "TQ1", "OBX", "OBX", "OBX"]
    (msh,) = fields(message, "MSH")
    assert msh[1] == "^~\\&"
    assert msh[2] == "PACSCLIP"
    assert msh[4] == "RIS"
    assert msh[6] == "20250304050607+0000"
    assert msh[8] == "ORU^R01^ORU_R01"
    assert msh[9] == "MSG0001"
    assert msh[11] == "2.5"


def test_oru_carries_ids_priority_findings_and_disclaimers() -> None:
    message = oru()

    (pid,) = fields(message, "PID")
    assert pid[3] == "PID-77"
    (obr,) = fields(message, "OBR")
    assert obr[3] == obr[18] == "ACC-0042"
    assert obr[25] == "P"
    (tq1,) = fields(message, "TQ1")
    assert tq1[9].startswith("S^")
    notes = [n[3] for n in fields(message, "NTE")]
    assert notes == [NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL, "algorithm: demo-cxr 1.2"]
    pneumothorax, effusion, study = fields(message, "OBX")
    assert pneumothorax[2:6] == ["NM", "PNEUMOTHORAX^pneumothorax^L", "", "0.9100"]
    assert pneumothorax[8] == "A"
    assert effusion[5] == "0.1200"
    assert effusion[8] == ""
    assert study[2:6] == ["ST", "113014^DICOM Study^DCM", "", STUDY_UID]


def test_oru_without_a_patient_id_leaves_pid3_empty() -> None:
    (pid,) = fields(oru(patient_id=None), "PID")

    assert pid == ["PID", "1"]


def test_oru_escapes_delimiters_in_text() -> None:
    finding = {"name": "mass|node^left&right~x", "probability": 0.5, "decision": "present"}
    message = oru(findings=[finding], accession_number="A|1")

    (obr,) = fields(message, "OBR")
    assert obr[3] == "A\\F\\1"
    obx = fields(message, "OBX")[0]
    assert obx[3] == "MASS_NODE_LEFT_RIGHT_X^mass\\F\\node\\S\\left\\T\\right\\R\\x^L"
    assert escape("C:\\dir\r\n") == "C:\\E\\dir\\X0D\\\\X0A\\"


def test_oru_is_deterministic() -> None:
    assert oru() == oru()


def test_ack_must_name_the_message_it_accepts() -> None:
    check_ack("MSH|^~\\&|RIS\rMSA|CA|MSG0001\r", "MSG0001")
    with pytest.raises(NotificationError, match="not 'MSG0001'"):
        check_ack("MSH|^~\\&|RIS\rMSA|AA|OTHER\r", "MSG0001")
    with pytest.raises(NotificationError, match="no MSA"):
        check_ack("MSH|^~\\&|RIS\r", "MSG0001")


class MllpServer(socketserver.TCPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MllpHandler)
        self.received: list[str] = []
        self.ack_code: str | None = "AA"  # None: hang up without answering

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


class MllpHandler(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while b"\x1c\r" not in data and len(data) < 1 << 20:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            data += chunk
        if not data.startswith(b"\x0b"):
            return  # not MLLP: the client then sees a hang-up
        message = data[1 : data.index(b"\x1c\r")].decode()
        self.server.received.append(message)
        if self.server.ack_code is None:
            return
        control_id = message.split("\r")[0].split("|")[9]
        ack = (
            "MSH|^~\\&|RIS||PACSCLIP||20250304050608||ACK^R01^ACK|ACK1|P|2.5\r"
            f"MSA|{self.server.ack_code}|{control_id}|unknown accession\r"
        )
        self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")


@pytest.fixture
def mllp() -> Iterator[MllpServer]:
    server = MllpServer()
    thread = start(server)
    yield server
    stop(server, thread)


def test_mllp_round_trip_returns_the_ack(mllp: MllpServer) -> None:
    message = oru()

    ack = send_mllp("127.0.0.1", mllp.port, message, timeout_s=2)

    assert mllp.received == [message]
    assert "MSA|AA|MSG0001" in ack


def test_mllp_error_ack_raises(mllp: MllpServer) -> None:
    mllp.ack_code = "AE"

    with pytest.raises(NotificationError, match="AE: unknown accession"):
        send_mllp("127.0.0.1", mllp.port, oru(), timeout_s=2)


def test_mllp_hang_up_without_ack_raises(mllp: MllpServer) -> None:
    mllp.ack_code = None

    with pytest.raises(NotificationError, match="without an ACK"):
        send_mllp("127.0.0.1", mllp.port, oru(), timeout_s=2)


def test_mllp_unreachable_receiver_raises() -> None:
    with pytest.raises(NotificationError, match="unreachable"):
        send_mllp("127.0.0.1", closed_port(), oru(), timeout_s=1)
