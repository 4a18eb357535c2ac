"""The MLLP server of ``pacsclip hl7-listen``: one HL7 message in, one ACK out.

Per message, in this order:

1. the raw message is kept in the inbox, durably, whatever comes next (a disk that cannot take
   it: AE, so that the sender sends it again);
2. it is parsed: not HL7 -> AR "cannot parse"; not an ORU^R01 -> AR; an ORU^R01 without report
   text or without any study key -> AE;
3. the report goes to the intake (in a thread, one at a time): linked to its study, or kept
   waiting for it -> AA ("waiting for study: ..." in MSA-3); refused (no words) -> AE;
4. the ACK is sent and the connection waits for the next message.

A connection from an address outside ``hl7_allowed_hosts`` is closed before anything is read.
A message is at most `MAX_MESSAGE_BYTES`: a larger one is streamed to the inbox as it arrives
(at most `OVERSIZE_KEPT_BYTES` of it stored, the rest counted), then answered AR with its size,
and the connection goes on. A connection that completes no message within `READ_TIMEOUT_S` is
closed (senders reconnect). Logs name control ids, whether keys were present and the outcome:
never the keys, the text or the patient.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from hl7.mllp import start_hl7_server  # type: ignore[import-untyped]

from plugin.errors import ConfigError
from plugin.hl7_inbound.ack import AckCode, ErrorCondition, build_ack
from plugin.hl7_inbound.framing import (
    OversizeNotKept,
    UnframedBlock,
    read_message,
    stream_limit,
)
from plugin.hl7_inbound.inbox import Inbox, OversizeMessage, file_name, inbox_dir
from plugin.hl7_inbound.parse import (
    MessageHeader,
    MessageRefused,
    ReportMessage,
    UnparseableMessage,
    UnsupportedMessage,
    parse_report,
    peek_control_id,
    peek_header,
)
from plugin.settings import Settings
from plugin.validation.intake import ReportIntake
from plugin.validation.report_labeler import ReportRefused

logger = logging.getLogger(__name__)

SOURCE: Final = "hl7"
MAX_MESSAGE_BYTES: Final = 1 << 20
# What is stored of a message over the limit: enough to show the sender's operators what came
# (a whole report with a large embedded document), bounded so that no sender fills the disk.
OVERSIZE_KEPT_BYTES: Final = 16 * MAX_MESSAGE_BYTES
READ_TIMEOUT_S: Final = 60.0
NO_FRAME_ID: Final = "unframed"  # the inbox name of a block without its MLLP start character

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Outcome:
    """What one message gets back, and what is logged of it."""

    code: AckCode
    text: str = ""
    error: ErrorCondition | None = None
    header: MessageHeader | None = None
    report: ReportMessage | None = None
    summary: str = ""  # for the log: linked, waiting for its study, refused: why, ...


class ReportListener:
    """Connections and messages; built once per process around one intake."""

    def __init__(
        self,
        intake: ReportIntake,
        inbox: Inbox,
        *,
        allowed_hosts: frozenset[IPAddress] = frozenset(),
        read_timeout_s: float = READ_TIMEOUT_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        oversize_kept_bytes: int = OVERSIZE_KEPT_BYTES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_control_id: Callable[[], str] = lambda: uuid.uuid4().hex[:20],
    ) -> None:
        self.intake = intake
        self.inbox = inbox
        self.allowed_hosts = frozenset(_unmapped(a) for a in allowed_hosts)
        self.read_timeout_s = read_timeout_s
        self.max_message_bytes = max_message_bytes
        self.oversize_kept_bytes = oversize_kept_bytes
        self._clock = clock
        self._new_control_id = new_control_id
        # The intake labels every report not yet labeled and appends to the report index:
        # one report at a time, so two connections never label the same report twice.
        self._intake_lock = asyncio.Lock()
        self._connections: set[asyncio.Task[Any]] = set()
        self._reading: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def allows(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        return _unmapped(address) in self.allowed_hosts

    async def handle_connection(self, reader: Any, writer: Any) -> None:
        """One sender's connection: messages in, ACKs out, until it closes or goes quiet."""
        peer = writer.get_extra_info("peername") or ("", 0)
        if not self.allows(str(peer[0])):
            logger.warning("hl7 connection from %s closed: not in hl7_allowed_hosts", peer[0])
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while not self._stopping:
                raw = await self._next_message(reader, writer, task)
                if raw is None:
                    break
                if isinstance(raw, OversizeMessage):
                    ack = await self.handle_oversize(raw)
                else:
                    ack = await self.handle_message(raw)
                writer.writeblock(ack.encode("utf-8"))
                await writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            logger.info("hl7 connection from %s lost: %s", peer[0], type(exc).__name__)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _next_message(
        self, reader: Any, writer: Any, task: asyncio.Task[Any] | None
    ) -> bytes | OversizeMessage | None:
        """The next message: its bytes, or the temp file a message over the limit was streamed
        to; None when the connection is to be closed. While it waits, `stop` may cancel it."""
        if task is not None:
            self._reading.add(task)
        try:
            while True:
                try:
                    return await asyncio.wait_for(
                        read_message(reader, self._receive_oversize), self.read_timeout_s
                    )
                except UnframedBlock as exc:
                    await self._keep_unframed(exc.raw)
                    await self._answer_unframed(writer, str(exc))
                except OversizeNotKept as exc:
                    # The rest of the message is still on its way: the framing is lost.
                    logger.error(
                        "hl7 message over %d bytes not kept: %s", self.max_message_bytes, exc
                    )
                    outcome = _not_kept()
                    writer.writeblock(self._ack(outcome, "").encode("utf-8"))
                    await writer.drain()
                    return None
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        logger.warning("hl7 connection closed in the middle of a message")
                    return None
                except TimeoutError:
                    logger.info("hl7 connection quiet for %.0f s: closed", self.read_timeout_s)
                    return None
        finally:
            if task is not None:
                self._reading.discard(task)

    def _receive_oversize(self) -> OversizeMessage:
        return self.inbox.receive_oversize(self.oversize_kept_bytes)

    async def _keep_unframed(self, raw: bytes) -> None:
        """Kept like any message, refused or not: the sender's bytes are its record."""
        try:
            kept = await asyncio.to_thread(self.inbox.keep, raw, NO_FRAME_ID, self._clock())
        except OSError as exc:
            logger.error("hl7 block without its MLLP start character not kept: %s", exc)
            return
        logger.warning(
            "hl7 block without its MLLP start character (%d bytes) refused, kept as %s",
            len(raw),
            kept.name,
        )

    async def _answer_unframed(self, writer: Any, reason: str) -> None:
        outcome = Outcome(AckCode.APPLICATION_REJECT, reason, ErrorCondition.SEGMENT_SEQUENCE_ERROR)
        writer.writeblock(self._ack(outcome, "").encode("utf-8"))
        await writer.drain()

    async def handle_message(self, raw: bytes) -> str:
        """Keep, parse, store one message; the ACK to send back."""
        received_at = self._clock()
        control_id = peek_control_id(raw)
        try:
            kept = await asyncio.to_thread(self.inbox.keep, raw, control_id, received_at)
        except OSError as exc:
            logger.error(
                "hl7 message %s not kept: %s", file_name(received_at, control_id), exc.strerror
            )
            return self._ack(_not_kept(), control_id)
        outcome = await self._outcome(raw, kept.name)
        report = outcome.report
        logger.info(
            "hl7 message %s: type=%s accession=%s study_uid=%s -> %s %s",
            kept.name,
            outcome.header.message_type if outcome.header else "unreadable",
            _presence(report.accession_number if report else None),
            _presence(report.study_instance_uid if report else None),
            outcome.code.value,
            outcome.summary,
        )
        acknowledged = outcome.header.control_id if outcome.header else control_id
        return self._ack(outcome, acknowledged)

    async def handle_oversize(self, message: OversizeMessage) -> str:
        """Keep a message over the limit (what was stored of it) and refuse it; the ACK."""
        received_at = self._clock()
        header = peek_header(message.head)
        control_id = header.control_id if header else peek_control_id(message.head)
        try:
            kept = await asyncio.to_thread(
                self.inbox.keep_oversize, message, control_id, received_at
            )
        except OSError as exc:
            message.discard()
            logger.error(
                "hl7 message %s not kept: %s", file_name(received_at, control_id), exc.strerror
            )
            return self._ack(_not_kept(), control_id)
        reason = (
            f"message of {message.received} bytes is larger than the limit of "
            f"{self.max_message_bytes} bytes"
        )
        logger.warning(
            "hl7 message %s: %d bytes, over the limit of %d; %d bytes kept%s -> %s",
            kept.name,
            message.received,
            self.max_message_bytes,
            message.stored,
            " (truncated)" if message.truncated else "",
            AckCode.APPLICATION_REJECT.value,
        )
        outcome = Outcome(
            AckCode.APPLICATION_REJECT, reason, ErrorCondition.SEGMENT_SEQUENCE_ERROR, header
        )
        return self._ack(outcome, control_id)

    async def _outcome(self, raw: bytes, kept_as: str) -> Outcome:
        try:
            report = parse_report(raw)
        except UnparseableMessage as exc:
            condition = ErrorCondition.SEGMENT_SEQUENCE_ERROR
            return _refused(AckCode.APPLICATION_REJECT, exc, condition)
        except UnsupportedMessage as exc:
            condition = ErrorCondition.UNSUPPORTED_MESSAGE_TYPE
            return _refused(AckCode.APPLICATION_REJECT, exc, condition)
        except MessageRefused as exc:
            condition = ErrorCondition.REQUIRED_FIELD_MISSING
            return _refused(AckCode.APPLICATION_ERROR, exc, condition)
        header = report.header
        try:
            async with self._intake_lock:
                intake = await asyncio.to_thread(
                    self.intake.add,
                    report.text,
                    source=SOURCE,
                    study_uid=report.study_instance_uid,
                    accession=report.accession_number,
                )
        except ReportRefused as exc:
            # The intake's reasons describe the text ("empty", "NUL bytes"), never quote it.
            return Outcome(
                AckCode.APPLICATION_ERROR,
                str(exc),
                ErrorCondition.REQUIRED_FIELD_MISSING,
                header,
                report,
                summary=f"refused: {exc}",
            )
        except Exception as exc:  # the catalog or the index failed: the report is not stored
            # Only the type is logged: database errors quote the statement's parameters.
            logger.error("hl7 message %s: report not stored: %s", kept_as, type(exc).__name__)
            return Outcome(
                AckCode.APPLICATION_ERROR,
                "not stored: internal error; send it again",
                ErrorCondition.APPLICATION_INTERNAL_ERROR,
                header,
                report,
                summary="not stored",
            )
        if intake.linked:
            return Outcome(AckCode.APPLICATION_ACCEPT, "", None, header, report, summary="linked")
        return Outcome(
            AckCode.APPLICATION_ACCEPT,
            f"waiting for study: {intake.reason}",
            None,
            header,
            report,
            summary="waiting for its study",
        )

    def _ack(self, outcome: Outcome, acknowledged_id: str) -> str:
        return build_ack(
            outcome.code,
            acknowledged_id,
            control_id=self._new_control_id(),
            timestamp=self._clock(),
            header=outcome.header,
            text=outcome.text,
            error=outcome.error,
        )

    async def stop(self, timeout_s: float) -> None:
        """Close connections waiting for a message now; let those handling one finish and
        answer it, for at most ``timeout_s``."""
        self._stopping = True
        for task in self._reading:
            task.cancel()
        busy = set(self._connections)
        if busy:
            _, late = await asyncio.wait(busy, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)


def _not_kept() -> Outcome:
    return Outcome(
        AckCode.APPLICATION_ERROR,
        "not stored: the message cannot be written to disk; send it again",
        ErrorCondition.APPLICATION_INTERNAL_ERROR,
        summary="not kept",
    )


def _refused(code: AckCode, exc: MessageRefused, condition: ErrorCondition) -> Outcome:
    # MessageRefused reasons never quote the message, so they can be logged.
    return Outcome(code, str(exc), condition, exc.header, summary=f"refused: {exc}")


def _presence(value: str | None) -> str:
    return "present" if value else "absent"


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4 peer on a dual-stack socket appears as ::ffff:a.b.c.d: compare it as a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowed_addresses(settings: Settings) -> frozenset[IPAddress]:
    return frozenset(ipaddress.ip_address(host) for host in settings.hl7_allowed_hosts)


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the listening socket; with a CA, senders must present a certificate it signed."""
    if settings.hl7_tls_cert is None or settings.hl7_tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=settings.hl7_tls_cert, keyfile=settings.hl7_tls_key)
        if settings.hl7_tls_ca is not None:
            context.load_verify_locations(cafile=settings.hl7_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"HL7 TLS files cannot be loaded: {exc}") from exc
    return context


def main(
    settings: Settings,
    intake: ReportIntake,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Receive reports until SIGTERM or SIGINT; then answer the messages in hand and return."""
    started = time.monotonic()
    labeler = intake.labeler  # medspacy takes seconds to build: before the first message
    logger.info("report labeler %s ready in %.1f s", labeler.version, time.monotonic() - started)
    asyncio.run(serve(settings, intake, on_listening))


async def serve(
    settings: Settings,
    intake: ReportIntake,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    inbox = Inbox(inbox_dir(settings.data_dir))
    inbox.discard_incomplete()
    listener = ReportListener(intake, inbox, allowed_hosts=allowed_addresses(settings))
    if not listener.allowed_hosts:
        logger.warning("hl7_allowed_hosts is empty: any host may send reports")
    server = await start_hl7_server(
        listener.handle_connection,
        settings.hl7_listen_host,
        settings.hl7_listen_port,
        limit=stream_limit(listener.max_message_bytes),
        ssl=server_ssl_context(settings),
    )
    port = int(server.sockets[0].getsockname()[1])
    logger.info(
        "hl7 listening on %s:%d%s",
        settings.hl7_listen_host,
        port,
        " (TLS)" if settings.hl7_tls_cert else "",
    )
    if on_listening is not None:
        on_listening(settings.hl7_listen_host, port)
    await stop.wait()
    logger.info("hl7 listener stopping")
    server.close()
    await listener.stop(settings.drain_timeout_s)
    await server.wait_closed()
    logger.info("hl7 listener stopped")
