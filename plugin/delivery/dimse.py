"""Results dispatch over DICOM: C-STORE result objects (SR, SC) to one destination node.

One association per call; each instance's C-STORE status is checked. The caller
(``plugin.delivery.jobs``) decides about retries from ``DispatchError.retryable``:

- the destination could not be reached, refused the association, aborted it or stopped
  answering: retryable, the destination may come back;
- an instance answered "out of resources" (0xA7xx) or "processing failure" (0x0110):
  retryable, a transient condition on the peer;
- an instance answered any other failure (0xA9xx, 0xCxxx, 0x01xx, 0x02xx), the peer accepted
  none of the presentation contexts an instance needs, or a file cannot be read: not retryable,
  sending the same bytes again gives the same answer.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from plugin.delivery.outcome import DispatchError, SendReport, is_retryable_status
from plugin.dicom_logging import quiet_identifiers

logger = logging.getLogger(__name__)

# PS3.8 9.3.2.2: at most 128 presentation contexts (odd ids 1..255) in one association.
MAX_PRESENTATION_CONTEXTS = 128
# Sent alongside an uncompressed file's own syntax, so a peer that accepts only one of
# them still takes the file; pynetdicom re-encodes between uncompressed syntaxes.
UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Destination:
    """A DICOM node results are sent to (built from settings' DestinationConfig)."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    # TLS: CA to verify the destination (system CAs when None); own certificate and key
    # when the destination requires client certificates.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self.name}: tls_cert and tls_key go together")

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


@dataclass(frozen=True)
class _Outgoing:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def send_files(
    destination: Destination,
    files: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout_s: float = 30,
) -> SendReport:
    """C-STORE files to destination in one association; raise DispatchError unless all stored.

    timeout_s bounds the TCP connect, the association negotiation and each C-STORE response.
    """
    if not files:
        return SendReport(destination.name)
    quiet_identifiers()
    outgoing = [_read_meta(destination, path) for path in files]
    contexts = _presentation_contexts(destination, outgoing)
    assoc = _associate(destination, contexts, calling_ae_title, timeout_s)
    try:
        report, unsendable, interrupted = _send_all(destination, assoc, outgoing)
    finally:
        # Released even when a file fails to load, so the peer is not left waiting.
        if assoc.is_established:
            assoc.release()
    logger.info(
        "dispatch to %s: %d sent, %d failed, %d without context, released=%s",
        destination.name,
        len(report.sent),
        len(report.failures),
        len(unsendable),
        not interrupted,
    )
    _raise_for_outcome(destination, report, unsendable, interrupted)
    return report


def echo(destination: Destination, *, calling_ae_title: str, timeout_s: float = 10) -> bool:
    """Whether the destination answers a C-ECHO with success (over TLS when it is set)."""
    quiet_identifiers()
    try:
        assoc = _associate(destination, [build_context(Verification)], calling_ae_title, timeout_s)
    except DispatchError as exc:
        logger.debug("C-ECHO to %s: %s", destination, exc)
        return False
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    return bool(status) and int(status.Status) == 0x0000


def _read_meta(destination: Destination, path: Path) -> _Outgoing:
    """SOP class, instance and transfer syntax from the file meta; pixel data is not read."""
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        # The result files are written before the task runs; a missing one will not reappear.
        raise DispatchError(
            f"dispatch to {destination}: cannot read {path.name}: {exc}",
            destination=destination.name,
            retryable=False,
        ) from exc
    missing = [
        keyword
        for keyword in (
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
        )
        if keyword not in meta
    ]
    if missing:
        raise DispatchError(
            f"dispatch to {destination}: {path.name} lacks file meta {', '.join(missing)}",
            destination=destination.name,
            retryable=False,
        )
    return _Outgoing(
        path=path,
        sop_class_uid=UID(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=UID(meta.TransferSyntaxUID),
    )


def _presentation_contexts(
    destination: Destination, outgoing: Sequence[_Outgoing]
) -> list[PresentationContext]:
    """One context per (SOP class, file transfer syntax), in first-seen order.

    Not one per SOP class: the peer accepts a single syntax per context, so two files of one
    class in different compressed syntaxes need two contexts.
    """
    wanted: dict[tuple[UID, UID], list[str | UID]] = {}
    for item in outgoing:
        syntaxes: list[str | UID] = [item.transfer_syntax_uid]
        if not item.transfer_syntax_uid.is_compressed:
            syntaxes += [ts for ts in UNCOMPRESSED_SYNTAXES if ts != item.transfer_syntax_uid]
        wanted.setdefault((item.sop_class_uid, item.transfer_syntax_uid), syntaxes)
    if len(wanted) > MAX_PRESENTATION_CONTEXTS:
        raise DispatchError(
            f"dispatch to {destination}: {len(wanted)} SOP class/transfer syntax pairs, "
            f"more than the {MAX_PRESENTATION_CONTEXTS} one association can carry",
            destination=destination.name,
            retryable=False,
        )
    return [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def _associate(
    destination: Destination,
    contexts: list[PresentationContext],
    calling_ae_title: str,
    timeout_s: float,
) -> Association:
    """Open the association or raise DispatchError saying why it did not open."""
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    negotiation = _Negotiation()
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        tls_args=_tls_args(destination),
        evt_handlers=[
            (evt.EVT_CONN_OPEN, negotiation.on_connection_open),
            (evt.EVT_ACSE_RECV, negotiation.on_acse_received),
        ],
    )
    if assoc.is_established:
        return assoc
    raise DispatchError(
        f"dispatch to {destination} from {calling_ae_title}: {negotiation.why_not_open(assoc)}",
        destination=destination.name,
        # A peer that accepts none of our SOP classes will not change its mind by itself.
        retryable=not _no_context_accepted(assoc),
    )


@dataclass
class _Negotiation:
    """What pynetdicom's events told about an association request, for the error message."""

    connected: bool = False
    rejection: A_ASSOCIATE | None = None

    def on_connection_open(self, event: evt.Event) -> None:
        # Only after TCP connect and, with TLS, the handshake succeeded.
        self.connected = True

    def on_acse_received(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            self.rejection = primitive

    def why_not_open(self, assoc: Association) -> str:
        if not self.connected:
            return "could not connect (refused, timed out, or TLS handshake failed)"
        if (rj := self.rejection) is not None:
            return f"association rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})"
        if _no_context_accepted(assoc):
            refused = dict.fromkeys(
                _sop_class(cx.abstract_syntax) for cx in assoc.rejected_contexts
            )
            return "the destination accepts none of the SOP classes sent: " + ", ".join(refused)
        if assoc.is_aborted:
            return "association aborted during negotiation"
        return "no answer to the association request (timed out)"


def _sop_class(uid: str | None) -> str:
    """A SOP class as an operator reads it: its name and UID."""
    return f"{UID(uid or '').name} ({uid})"


def _no_context_accepted(assoc: Association) -> bool:
    return bool(assoc.rejected_contexts) and not assoc.accepted_contexts


def client_ssl_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Client TLS 1.2 or later, verifying the peer against ``ca`` (the system CAs when None) and
    presenting ``cert``/``key`` when given. OSError or ssl.SSLError for unusable files."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def _tls_args(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """Client TLS verifying the destination's certificate against the host name or IP."""
    if not destination.tls:
        return None
    try:
        context = client_ssl_context(
            ca=destination.tls_ca, cert=destination.tls_cert, key=destination.tls_key
        )
    except (OSError, ssl.SSLError) as exc:
        # Bad certificate files are a configuration error: retries cannot fix them.
        raise DispatchError(
            f"dispatch to {destination}: TLS configuration unusable: {exc}",
            destination=destination.name,
            retryable=False,
        ) from exc
    return context, destination.host


def _send_all(
    destination: Destination, assoc: Association, outgoing: Sequence[_Outgoing]
) -> tuple[SendReport, list[_Outgoing], bool]:
    """C-STORE each file; returns the report, files with no accepted context, and whether
    the association broke (abort, timeout, bad response) before every file was sent."""
    report = SendReport(destination.name)
    unsendable: list[_Outgoing] = []
    for message_id, item in enumerate(outgoing, start=1):
        if not _has_context(assoc, item):
            unsendable.append(item)
            continue
        status = _store_one(destination, assoc, item, message_id)
        if status is None:
            return report, unsendable, True
        report.sent.append((item.sop_instance_uid, status))
        logger.info(
            "C-STORE %s to %s: status 0x%04X", item.sop_instance_uid, destination.name, status
        )
    return report, unsendable, False


def _has_context(assoc: Association, item: _Outgoing) -> bool:
    """An accepted context for the file's class in its own syntax, or any uncompressed one
    when the file is uncompressed (pynetdicom converts between those)."""
    for context in assoc.accepted_contexts:
        if context.abstract_syntax != item.sop_class_uid:
            continue
        syntax = UID(context.transfer_syntax[0])
        if syntax == item.transfer_syntax_uid or (
            not item.transfer_syntax_uid.is_compressed and not syntax.is_compressed
        ):
            return True
    return False


def _store_one(
    destination: Destination, assoc: Association, item: _Outgoing, message_id: int
) -> int | None:
    """Send one file; its status, or None when no response came (the association is gone)."""
    if not assoc.is_established:
        return None
    try:
        # The whole file is read (pixel data as stored bytes, not decoded), so pynetdicom can
        # re-encode it when the peer accepted the other uncompressed syntax.
        dataset = dcmread(item.path)
        response = assoc.send_c_store(dataset, msg_id=message_id % 0x10000)
    except (OSError, InvalidDicomError, ValueError) as exc:
        # A body that cannot be parsed or encoded fails the same way on every attempt.
        raise DispatchError(
            f"dispatch to {destination}: cannot send {item.path.name} "
            f"({item.sop_instance_uid}): {exc}",
            destination=destination.name,
            retryable=False,
        ) from exc
    if "Status" not in response:
        return None
    return int(response.Status)


def _raise_for_outcome(
    destination: Destination,
    report: SendReport,
    unsendable: Sequence[_Outgoing],
    interrupted: bool,
) -> None:
    problems: list[str] = []
    retryable = True
    if report.failures:
        problems.append(
            "failure status for "
            + ", ".join(f"{uid} 0x{status:04X}" for uid, status in report.failures)
        )
        retryable = all(is_retryable_status(status) for _, status in report.failures)
    if unsendable:
        by_class: dict[str, list[str]] = {}
        for item in unsendable:
            key = f"{_sop_class(item.sop_class_uid)} in {item.transfer_syntax_uid.name}"
            by_class.setdefault(key, []).append(item.sop_instance_uid)
        problems.append(
            "no accepted presentation context for "
            + "; ".join(f"{key}: {', '.join(uids)}" for key, uids in by_class.items())
        )
        retryable = False
    if interrupted:
        problems.append(f"association aborted or timed out after {len(report.sent)} responses")
    if problems:
        raise DispatchError(
            f"dispatch to {destination}: " + "; ".join(problems),
            destination=destination.name,
            retryable=retryable,
            report=report,
        )
