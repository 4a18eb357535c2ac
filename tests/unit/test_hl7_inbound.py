"""Reports over HL7: ORU^R01 parsing, the ACK, the inbox, and the MLLP listener in this process
(with a recording intake) on a free loopback port."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import start_hl7_server

from plugin.errors import ConfigError
from plugin.hl7_inbound.ack import AckCode, ErrorCondition, build_ack
from plugin.hl7_inbound.framing import (
    OversizeNotKept,
    UnframedBlock,
    read_message,
    stream_limit,
)
from plugin.hl7_inbound.inbox import Inbox, OversizeMessage, file_name
from plugin.hl7_inbound.listener import ReportListener, server_ssl_context
from plugin.hl7_inbound.parse import (
    MAX_FORMAT_REPEAT,
    UnparseableMessage,
    UnsupportedMessage,
    UnusableReport,
    parse_report,
    peek_control_id,
    peek_header,
    unescape,
)
from plugin.notify.hl7 import END_BLOCK, START_BLOCK
from plugin.settings import load_settings
from plugin.validation.intake import Intake
from plugin.validation.report_labeler import ReportRefused
from tests.peers.tls import make_tls_materials

WHEN = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
STUDY_UID = "1.2.826.0.1.3680043.8.498.42"
MSH = "MSH|^~\\&|RIS|GENERAL|PACSCLIP|GENERAL|20250304050607||ORU^R01^ORU_R01|MSG-0001|P|2.5"


def message(*segments: str, msh: str = MSH, separator: str = "\r") -> bytes:
    return separator.join([msh, *segments]).encode("utf-8") + separator.encode()


def oru(accession: str = "ACC-1", text: str = "No pneumothorax.", **changes: str) -> bytes:
    return message(
        "PID|1||PID-77^^^GENERAL||DOE^JANE",
        changes.get("obr", f"OBR|1|PLACER-9|{accession}^RIS|71020^Chest 2 views^L"),
        f"OBX|1|TX|18782-3^Radiology Study observation^LN||{text}||||||F",
    )


# Parsing


def test_accession_from_obr3_and_text_from_the_tx_observation() -> None:
    report = parse_report(oru("ACC-7", "Small left pleural effusion."))

    assert report.accession_number == "ACC-7"
    assert report.study_instance_uid is None
    assert report.text == "Small left pleural effusion."
    assert report.header.control_id == "MSG-0001"
    assert report.header.message_type == "ORU^R01"
    assert report.header.sending_application == "RIS"


def test_accession_falls_back_to_obr2_then_orc3() -> None:
    from_placer = message("OBR|1|PLACER-9||71020", "OBX|1|TX|||Clear lungs.")
    from_order = message("ORC|RE|PL-1|FILLER-3", "OBR|1|||71020", "OBX|1|TX|||Clear lungs.")

    assert parse_report(from_placer).accession_number == "PLACER-9"
    assert parse_report(from_order).accession_number == "FILLER-3"


def test_study_uid_from_the_dicom_study_observation_which_is_not_text() -> None:
    report = parse_report(
        message(
            "OBR|1||ACC-2|71020",
            "OBX|1|TX|||Heart size is normal.",
            f"OBX|2|ST|113014^Study Instance UID^DCM||{STUDY_UID}||||||F",
        )
    )

    assert report.study_instance_uid == STUDY_UID
    assert report.accession_number == "ACC-2"
    assert report.text == "Heart size is normal."


def test_study_uid_from_zds_when_no_observation_gives_it() -> None:
    report = parse_report(
        message("OBR|1|||71020", "OBX|1|TX|||Clear.", f"ZDS|{STUDY_UID}^PACS^Application^DICOM")
    )

    assert report.study_instance_uid == STUDY_UID
    assert report.accession_number is None


def test_escape_sequences_are_decoded() -> None:
    text = (
        "Line one\\.br\\Line two: a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f "
        "\\H\\bold\\N\\ \\X48\\\\X49\\ \\.in2\\x\\.fi\\"
    )
    report = parse_report(oru(text=text))

    assert report.text == "Line one\nLine two: a|b^c&d~e\\f bold HI   x"


def test_escapes_use_the_delimiters_the_message_declares() -> None:
    msh = MSH.replace("|", "#")  # MSH#^~\\&#RIS#...
    report = parse_report(message("OBR#1##ACC-3#71020", "OBX#1#TX###a\\F\\b|c", msh=msh))

    assert report.accession_number == "ACC-3"
    assert report.text == "a#b|c"


def test_formatting_repeats_are_bounded_and_malformed_sequences_do_not_raise() -> None:
    assert unescape("a\\.sp999999999\\b") == "a" + "\n" * MAX_FORMAT_REPEAT + "b"
    assert unescape("a\\.brx\\b") == "a\nb"
    assert unescape("a\\Xzz\\b\\C2842\\c") == "abc"
    assert unescape("no closing \\escape") == "no closing \\escape"


def test_observations_and_repetitions_are_joined_as_lines_in_order() -> None:
    report = parse_report(
        message(
            "OBR|1||ACC-4|71020",
            "OBX|1|TX|||FINDINGS:~Lungs are clear.",
            "OBX|2|NM|PTX^probability^L||0.12",
            "OBX|3|FT|||",
            "OBX|4|ST|||IMPRESSION: normal chest.",
        )
    )

    assert report.text == "FINDINGS:\nLungs are clear.\n\nIMPRESSION: normal chest."


def test_segments_separated_by_line_feeds_are_read() -> None:
    report = parse_report(message("OBR|1||ACC-5|71020", "OBX|1|TX|||Clear.", separator="\n"))

    assert (report.accession_number, report.text) == ("ACC-5", "Clear.")


def test_another_message_type_is_unsupported_with_its_header() -> None:
    adt = message("PID|1||PID-77", msh=MSH.replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01"))

    with pytest.raises(UnsupportedMessage, match="ADT\\^A01 is not ORU\\^R01") as refused:
        parse_report(adt)

    assert refused.value.header is not None
    assert refused.value.header.control_id == "MSG-0001"


def test_a_report_without_text_is_unusable() -> None:
    empty = message("OBR|1||ACC-6|71020", "OBX|1|TX|||", "OBX|2|NM|X^x^L||1.0")

    with pytest.raises(UnusableReport, match="no text"):
        parse_report(empty)


def test_a_report_naming_no_study_is_unusable() -> None:
    with pytest.raises(UnusableReport, match="names no study"):
        parse_report(message("OBR|1|||71020", "OBX|1|TX|||Clear lungs."))


def test_a_study_uid_that_is_not_a_uid_is_unusable() -> None:
    with pytest.raises(UnusableReport, match="not a DICOM UID"):
        parse_report(message("OBR|1|||71020", "OBX|1|TX|||Clear.", "ZDS|../../etc"))


@pytest.mark.parametrize("raw", [b"", b"garbage", b"MSH", b"\x00\xff\x0b", b"PID|1||x\rMSH|^~"])
def test_garbage_cannot_be_parsed(raw: bytes) -> None:
    with pytest.raises(UnparseableMessage, match="cannot parse"):
        parse_report(raw)


def test_the_control_id_is_read_without_parsing() -> None:
    assert peek_control_id(oru()) == "MSG-0001"
    assert peek_control_id(b"MSH|^~\\&|A") == ""
    assert peek_control_id(b"garbage") == ""


# ACK


def parse_ack(ack: str) -> Any:
    return hl7.parse(ack)


def test_the_ack_answers_the_message_with_its_control_id() -> None:
    header = parse_report(oru()).header
    ack = build_ack(
        AckCode.APPLICATION_ACCEPT,
        header.control_id,
        control_id="ACK-1",
        timestamp=WHEN,
        header=header,
    )
    parsed = parse_ack(ack)

    msa = parsed.segment("MSA")
    assert (str(msa[1]), str(msa[2])) == ("AA", "MSG-0001")
    msh = parsed.segment("MSH")
    assert str(msh[9]) == "ACK^R01^ACK"
    assert str(msh[10]) == "ACK-1"
    assert (str(msh[3]), str(msh[5]), str(msh[6])) == ("PACSCLIP", "RIS", "GENERAL")
    assert (str(msh[11]), str(msh[12])) == ("P", "2.5")
    with pytest.raises(KeyError):
        parsed.segment("ERR")
    # Explicit inputs: the same ACK twice.
    assert ack == build_ack(
        AckCode.APPLICATION_ACCEPT, "MSG-0001", control_id="ACK-1", timestamp=WHEN, header=header
    )


def test_a_refusal_carries_its_reason_in_msa3_and_err() -> None:
    ack = build_ack(
        AckCode.APPLICATION_REJECT,
        "",
        control_id="ACK-2",
        timestamp=WHEN,
        text="cannot parse | not HL7",
        error=ErrorCondition.SEGMENT_SEQUENCE_ERROR,
    )
    parsed = parse_ack(ack)

    msa = parsed.segment("MSA")
    assert str(msa[1]) == "AR"
    assert parsed.unescape(str(msa[3])) == "cannot parse | not HL7"
    err = parsed.segment("ERR")
    assert str(err[3]) == "100^Segment sequence error^HL70357"
    assert str(err[4]) == "E"
    assert str(parsed.segment("MSH")[9]) == "ACK"


# Inbox


def test_inbox_names_cannot_leave_the_inbox(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "hl7" / "inbox")

    path = inbox.keep(b"MSH|...", "../../etc/passwd", WHEN)
    again = inbox.keep(b"MSH|second", "../../etc/passwd", WHEN)

    assert path.parent == inbox.root and again.parent == inbox.root
    assert path.name == "20250304T050607123456Z-_.._etc_passwd.hl7"
    assert again.name == "20250304T050607123456Z-_.._etc_passwd-2.hl7"
    assert path.read_bytes() == b"MSH|..."
    assert file_name(WHEN, "") == "20250304T050607123456Z-no-control-id"
    assert not list((inbox.root / ".incoming").iterdir())


# Settings


def test_hl7_listener_settings_are_checked() -> None:
    settings = load_settings(hl7_allowed_hosts=["10.0.0.7", "::1"], hl7_listen_port=2600)
    assert settings.hl7_listen_port == 2600
    assert settings.hl7_listen_host == "127.0.0.1"
    with pytest.raises(ConfigError, match="not an IP address"):
        load_settings(hl7_allowed_hosts=["ris.example.org"])
    with pytest.raises(ConfigError, match="hl7_tls_cert and hl7_tls_key"):
        load_settings(hl7_tls_cert=Path("cert.pem"))


# The listener, in this process


@dataclass
class RecordingIntake:
    """Stands in for ReportIntake: known accessions link, others wait; can be made to fail."""

    known: set[str] = field(default_factory=lambda: {"ACC-1"})
    fail_with: Exception | None = None
    added: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        text: str,
        *,
        source: str,
        study_uid: str | None = None,
        accession: str | None = None,
    ) -> Intake:
        if self.fail_with is not None:
            raise self.fail_with
        self.added.append({"text": text, "source": source, "accession": accession})
        if accession in self.known:
            return Intake(True, STUDY_UID, report_id=1, created=True)
        return Intake(False, study_uid, reason=f"no study with accession number {accession}")


class RunningListener:
    def __init__(self, listener: ReportListener, port: int) -> None:
        self.listener = listener
        self.port = port

    def send(self, *raws: bytes) -> list[bytes]:
        """Each message MLLP-framed on one connection; the ACKs, unframed."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            acks = []
            for raw in raws:
                conn.sendall(START_BLOCK + raw + END_BLOCK)
                acks.append(read_frame(conn))
            return acks


def read_frame(conn: socket.socket) -> bytes:
    buffer = b""
    while END_BLOCK not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an ACK after {buffer!r}")
        buffer += chunk
    assert buffer.startswith(START_BLOCK)
    return buffer[len(START_BLOCK) : buffer.index(END_BLOCK)]


def msa(ack: bytes) -> tuple[str, str, str]:
    segment = hl7.parse(ack.decode()).segment("MSA")
    return str(segment[1]), str(segment[2]), str(segment(3)) if len(segment) > 3 else ""


@dataclass
class Harness:
    intake: RecordingIntake
    inbox: Inbox
    allowed: frozenset[Any] = frozenset()
    limit: int = 1 << 20
    kept: int = 16 << 20
    ssl: ssl.SSLContext | None = None


def run_listener(harness: Harness, body: Any) -> None:
    """Serve on a free loopback port while ``body(running)``, a blocking client, runs in a
    thread; then stop the listener as SIGTERM would."""

    async def main() -> None:
        listener = ReportListener(
            harness.intake,
            harness.inbox,
            allowed_hosts=harness.allowed,
            read_timeout_s=5,
            max_message_bytes=harness.limit,
            oversize_kept_bytes=harness.kept,
        )
        server = await start_hl7_server(
            listener.handle_connection,
            "127.0.0.1",
            0,
            limit=stream_limit(harness.limit),
            ssl=harness.ssl,
        )
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(asyncio.to_thread(body, RunningListener(listener, port)), 60)
        finally:
            server.close()
            await listener.stop(5)
            await server.wait_closed()

    asyncio.run(main())


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield Harness(RecordingIntake(), Inbox(tmp_path / "hl7" / "inbox"))


def test_listener_acks_each_outcome_on_one_connection(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    adt = message("PID|1", msh=MSH.replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01"))
    results: list[bytes] = []
    caplog.set_level(logging.INFO, logger="plugin.hl7_inbound")

    run_listener(
        harness,
        lambda running: results.extend(
            running.send(oru("ACC-1"), oru("ACC-404"), adt, b"garbage", oru(text=""))
        ),
    )

    codes = [msa(ack) for ack in results]
    assert codes[0] == ("AA", "MSG-0001", "")
    assert codes[1][:2] == ("AA", "MSG-0001") and codes[1][2].startswith("waiting for study:")
    assert codes[2][0] == "AR"
    assert codes[3] == ("AR", "", "cannot parse: the message does not start with an MSH segment")
    assert codes[4][0] == "AE" and "no text" in codes[4][2]
    assert [a["accession"] for a in harness.intake.added] == ["ACC-1", "ACC-404"]
    assert all(a["source"] == "hl7" for a in harness.intake.added)
    kept = harness.inbox.messages()
    assert len(kept) == 5
    assert sorted(p.read_bytes() for p in kept) == sorted(
        [oru("ACC-1"), oru("ACC-404"), adt, b"garbage", oru(text="")]
    )
    # No patient data in the log: no accession, name, patient id or text.
    logged = caplog.text
    for secret in ("ACC-1", "ACC-404", "DOE", "PID-77", "pneumothorax"):
        assert secret not in logged
    assert "accession=present" in logged


def test_a_failing_intake_answers_ae_and_the_listener_goes_on(harness: Harness) -> None:
    results: list[bytes] = []

    def body(running: RunningListener) -> None:
        harness.intake.fail_with = RuntimeError("database is locked: INSERT ... ('ACC-1',)")
        results.extend(running.send(oru()))
        harness.intake.fail_with = ReportRefused("the report is empty (no words)")
        results.extend(running.send(oru()))
        harness.intake.fail_with = None
        results.extend(running.send(oru()))

    run_listener(harness, body)

    assert [msa(a)[0] for a in results] == ["AE", "AE", "AA"]
    assert "internal error" in msa(results[0])[2]
    assert "ACC-1" not in msa(results[0])[2]
    assert msa(results[1])[2] == "the report is empty (no words)"


def test_a_host_outside_the_allow_list_is_closed_without_reading(harness: Harness) -> None:
    harness.allowed = frozenset({ipaddress.ip_address("192.0.2.10")})
    outcome: list[str] = []

    def body(running: RunningListener) -> None:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as conn:
            conn.sendall(START_BLOCK + oru() + END_BLOCK)
            try:
                outcome.append("ack" if conn.recv(4096) else "closed")
            except ConnectionResetError:
                outcome.append("closed")

    run_listener(harness, body)

    assert outcome == ["closed"]
    assert harness.inbox.messages() == []
    assert harness.intake.added == []


def test_the_allow_list_matches_ipv4_peers_of_a_dual_stack_socket(harness: Harness) -> None:
    listener = ReportListener(
        harness.intake,
        harness.inbox,
        allowed_hosts=frozenset({ipaddress.ip_address("127.0.0.1")}),
    )

    assert listener.allows("127.0.0.1")
    assert listener.allows("::ffff:127.0.0.1")
    assert not listener.allows("127.0.0.2")
    assert not listener.allows("not-an-address")


def test_a_message_over_the_limit_is_kept_refused_with_its_size_and_the_connection_goes_on(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.limit = 4096
    large = oru(text="x" * 10_000)
    results: list[bytes] = []
    caplog.set_level(logging.INFO, logger="plugin.hl7_inbound")

    run_listener(harness, lambda running: results.extend(running.send(large, oru())))

    assert msa(results[0]) == (
        "AR",
        "MSG-0001",
        f"message of {len(large)} bytes is larger than the limit of 4096 bytes",
    )
    # Answered as the message's own header asks: back to its sender.
    assert hl7.parse(results[0].decode()).segment("MSH")[5][0] == "RIS"
    assert msa(results[1])[0] == "AA"
    assert [a["accession"] for a in harness.intake.added] == ["ACC-1"]
    (oversize,) = harness.inbox.root.glob("*.oversize.hl7")
    assert oversize.name.endswith("-MSG-0001.oversize.hl7")
    assert oversize.read_bytes() == large
    assert len(harness.inbox.messages()) == 2
    assert not list((harness.inbox.root / ".incoming").iterdir())
    assert "x" * 20 not in caplog.text and "DOE" not in caplog.text


def test_a_block_without_its_start_character_is_kept_refused_and_the_next_one_served(
    harness: Harness,
) -> None:
    unframed = oru("ACC-9")

    def send(running: RunningListener) -> list[bytes]:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as conn:
            conn.sendall(unframed + END_BLOCK)  # no <VT> before it
            first = read_frame(conn)
            conn.sendall(START_BLOCK + oru() + END_BLOCK)
            return [first, read_frame(conn)]

    results: list[bytes] = []
    run_listener(harness, lambda running: results.extend(send(running)))

    assert msa(results[0]) == ("AR", "", "cannot parse: not framed as MLLP")
    assert msa(results[1])[0] == "AA"
    (kept,) = harness.inbox.root.glob("*-unframed.hl7")
    assert kept.read_bytes() == unframed + END_BLOCK
    assert [a["accession"] for a in harness.intake.added] == ["ACC-1"]


def test_what_is_kept_of_a_message_over_the_limit_is_capped_and_marked(harness: Harness) -> None:
    harness.limit, harness.kept = 4096, 8192
    large = oru(text="y" * 50_000)
    results: list[bytes] = []

    run_listener(harness, lambda running: results.extend(running.send(large, oru())))

    assert [msa(a)[0] for a in results] == ["AR", "AA"]
    assert f"message of {len(large)} bytes" in msa(results[0])[2]
    (kept,) = harness.inbox.root.glob("*.oversize-truncated.hl7")
    assert kept.read_bytes() == large[:8192]


def test_with_a_ca_only_senders_with_a_trusted_certificate_get_through(
    harness: Harness, tmp_path: Path
) -> None:
    server, client = make_tls_materials(tmp_path / "tls")
    settings = load_settings(
        hl7_tls_cert=server.cert, hl7_tls_key=server.key, hl7_tls_ca=server.ca_cert
    )
    harness.ssl = server_ssl_context(settings)
    results: list[Any] = []

    def body(running: RunningListener) -> None:
        for certificate in (None, client):
            context = ssl.create_default_context(cafile=str(client.ca_cert))
            if certificate is not None:
                context.load_cert_chain(certificate.cert, certificate.key)
            try:
                with (
                    socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as conn,
                ):
                    conn.sendall(START_BLOCK + oru() + END_BLOCK)
                    results.append(msa(read_frame(conn))[0])
            except (ssl.SSLError, ConnectionError) as exc:
                results.append(type(exc).__name__)

    run_listener(harness, body)

    assert results[0] != "AA"  # no client certificate: the handshake (or the first read) fails
    assert results[1] == "AA"
    assert len(harness.inbox.messages()) == 1
    with pytest.raises(ConfigError, match="cannot be loaded"):
        server_ssl_context(
            load_settings(hl7_tls_cert=tmp_path / "missing.pem", hl7_tls_key=server.key)
        )


# Framing


def framed(*raws: bytes) -> bytes:
    return b"".join(START_BLOCK + raw + END_BLOCK for raw in raws)


def read_all(
    data: bytes, inbox: Inbox, *, limit: int, kept: int = 1 << 20, chunk: int = 1 << 20
) -> list[bytes | OversizeMessage | BaseException]:
    """Every message ``read_message`` finds in ``data``, fed to the stream ``chunk`` bytes at a
    time as a socket would; last, the exception after which the listener closes the
    connection."""

    async def main() -> list[bytes | OversizeMessage | BaseException]:
        reader = asyncio.StreamReader(limit=stream_limit(limit))

        async def feed() -> None:
            for start in range(0, len(data), chunk):
                reader.feed_data(data[start : start + chunk])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeding = asyncio.create_task(feed())
        found: list[bytes | OversizeMessage | BaseException] = []
        while True:
            try:
                found.append(await read_message(reader, lambda: inbox.receive_oversize(kept)))
            except (asyncio.IncompleteReadError, UnframedBlock, OversizeNotKept) as exc:
                found.append(exc)
                if not isinstance(exc, UnframedBlock):  # the listener closes the connection
                    break
        await feeding
        return found

    return asyncio.run(main())


@pytest.mark.parametrize("chunk", [1 << 20, 4093, 7])
def test_messages_around_one_over_the_limit_are_read_whole(tmp_path: Path, chunk: int) -> None:
    inbox = Inbox(tmp_path / "inbox")
    at_limit, over = b"a" * 1000, b"MSH|^~\\&|" + b"b" * 5000

    found = read_all(framed(at_limit, over, b"next"), inbox, limit=1000, chunk=chunk)

    assert found[0] == at_limit
    oversize = found[1]
    assert isinstance(oversize, OversizeMessage)
    assert (oversize.received, oversize.stored, oversize.truncated) == (len(over), len(over), False)
    assert oversize.head.startswith(b"MSH|")
    kept = inbox.keep_oversize(oversize, "MSG-9", WHEN)
    assert kept.name == "20250304T050607123456Z-MSG-9.oversize.hl7"
    assert kept.read_bytes() == over
    assert found[2] == b"next"
    assert isinstance(found[3], asyncio.IncompleteReadError) and found[3].partial == b""


def test_an_oversize_message_keeps_its_first_bytes_up_to_the_cap(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox")
    over = bytes(range(256)).replace(b"\x1c", b"") * 100

    (oversize, end) = read_all(framed(over), inbox, limit=1000, kept=3000, chunk=999)

    assert isinstance(oversize, OversizeMessage) and isinstance(end, asyncio.IncompleteReadError)
    assert (oversize.received, oversize.stored, oversize.truncated) == (len(over), 3000, True)
    kept = inbox.keep_oversize(oversize, "", WHEN)
    assert kept.name == "20250304T050607123456Z-no-control-id.oversize-truncated.hl7"
    assert kept.read_bytes() == over[:3000]


def test_an_oversize_message_cut_off_leaves_nothing_behind(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox")

    (end,) = read_all(START_BLOCK + b"c" * 5000, inbox, limit=1000, chunk=1500)

    assert isinstance(end, asyncio.IncompleteReadError)
    assert not list((inbox.root / ".incoming").iterdir())
    assert inbox.messages() == []


def test_a_block_without_its_start_character_is_unframed_and_the_next_one_read(
    tmp_path: Path,
) -> None:
    found = read_all(b"loose" + END_BLOCK + framed(b"ok"), Inbox(tmp_path), limit=1000)

    assert isinstance(found[0], UnframedBlock)
    assert found[1] == b"ok"


def test_an_oversize_message_the_disk_refuses_is_not_kept(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox")
    (inbox.root / ".incoming").rmdir()

    found = read_all(framed(b"d" * 5000), inbox, limit=1000)

    assert isinstance(found[0], OversizeNotKept)


def test_the_header_of_a_message_is_read_from_its_first_segment_alone() -> None:
    header = peek_header(oru() + b"OBX|2|TX|||" + b"z" * 100)

    assert header is not None
    assert (header.control_id, header.message_type, header.sending_application) == (
        "MSG-0001",
        "ORU^R01",
        "RIS",
    )
    assert peek_header(b"not HL7") is None
    assert peek_header(b"") is None
