"""HL7 v2.5 ORU^R01 carrying an AI flag to an RIS or worklist, sent over MLLP.

Hand-built: the message is a handful of segments and the ACK needs only MSA, so the `hl7`
package would add a dependency without removing code. Layout of the message:

    MSH  sender, receiver, time, ORU^R01^ORU_R01, control id, P, 2.5
    PID  PID-3 the patient id, only when the flag has one
    OBR  OBR-3 and OBR-18 the accession number, OBR-4 the service, OBR-25 P (preliminary)
    NTE  one per disclaimer, then the algorithm's name and version
    TQ1  TQ1-9 the priority (S = STAT, R = routine)
    OBX  one NM per finding: the probability, OBX-8 "A" when present, OBX-11 P;
         then one ST with the Study Instance UID (DCM 113014 "DICOM Study")

An AI result is never final: OBR-25 and every OBX-11 say P (preliminary).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from plugin.notify import NotificationError, disclaimers

logger = logging.getLogger(__name__)

# MLLP framing: <VT> message <FS><CR>.
START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c\x0d"
SEGMENT_SEPARATOR: Final = "\r"
ENCODING_CHARACTERS: Final = "^~\\&"
ACCEPTED: Final = frozenset({"AA", "CA"})
REJECTED: Final = frozenset({"AR", "CR"})
MAX_ACK_BYTES: Final = 1 << 20  # an ACK is a few hundred bytes; stop reading a runaway peer
DEFAULT_SERVICE: Final = ("PACSCLIP-AI", "AI triage", "L")
_PRIORITY_CODES: Final = {"stat": "S^STAT^HL70485", "routine": "R^Routine^HL70485"}

# HL7 escape sequences for the default delimiters; the escape character itself goes first.
_ESCAPES: Final = (
    ("\\", "\\E\\"),
    ("|", "\\F\\"),
    ("^", "\\S\\"),
    ("&", "\\T\\"),
    ("~", "\\R\\"),
    ("\r", "\\X0D\\"),
    ("\n", "\\X0A\\"),
)


def escape(value: object) -> str:
    """A value as HL7 text, its delimiters escaped so they cannot split a field."""
    text = str(value)
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    return text


def hl7_timestamp(moment: datetime) -> str:
    """HL7 DTM: YYYYMMDDHHMMSS, with the UTC offset when the time is timezone-aware."""
    return moment.strftime("%Y%m%d%H%M%S%z")


def segment(name: str, *fields: str) -> str:
    """A segment from already-escaped fields in order; trailing empty fields are dropped."""
    values = list(fields)
    while values and not values[-1]:
        values.pop()
    return "|".join([name, *values])


def numbered_segment(name: str, fields: Mapping[int, str]) -> str:
    """A segment from {field number: escaped value}, so each field is placed by its number."""
    return segment(name, *(fields.get(n, "") for n in range(1, max(fields, default=0) + 1)))


def build_oru(
    result: Mapping[str, Any],
    *,
    sending_app: str = "PACSCLIP",
    receiving_app: str,
    control_id: str,
    timestamp: datetime,
    sending_facility: str = "",
    receiving_facility: str = "",
    service: tuple[str, str, str] = DEFAULT_SERVICE,
) -> str:
    """The ORU^R01 for one flag (see `plugin.notify`), segments joined with carriage returns."""
    when = hl7_timestamp(timestamp)
    algorithm = result["algorithm"]
    segments = [
        _msh(sending_app, sending_facility, receiving_app, receiving_facility, when, control_id),
        numbered_segment("PID", {1: "1", 3: escape(result.get("patient_id") or "")}),
        _obr(result.get("accession_number") or "", service, when),
        *_notes(algorithm),
        numbered_segment("TQ1", {1: "1", 9: _PRIORITY_CODES.get(result["priority"], "")}),
        *_finding_observations(result.get("findings", []), when),
        _study_observation(len(result.get("findings", [])) + 1, result["study_instance_uid"]),
    ]
    return SEGMENT_SEPARATOR.join(segments) + SEGMENT_SEPARATOR


def _msh(
    sending_app: str,
    sending_facility: str,
    receiving_app: str,
    receiving_facility: str,
    when: str,
    control_id: str,
) -> str:
    # MSH-1 is the field separator itself, so the segment starts "MSH|^~\&|" (MSH-2).
    return segment(
        "MSH",
        ENCODING_CHARACTERS,
        escape(sending_app),
        escape(sending_facility),
        escape(receiving_app),
        escape(receiving_facility),
        when,
        "",
        "ORU^R01^ORU_R01",
        escape(control_id),
        "P",
        "2.5",
    )


def _obr(accession_number: str, service: tuple[str, str, str], when: str) -> str:
    accession = escape(accession_number)
    return numbered_segment(
        "OBR",
        {
            1: "1",
            3: accession,  # filler order number
            4: "^".join(escape(part) for part in service),  # universal service id
            7: when,  # observation date/time
            18: accession,  # placer field 1: where many RIS expect the accession number
            22: when,  # results status change date/time
            25: "P",  # result status: preliminary
        },
    )


def _notes(algorithm: Mapping[str, Any]) -> list[str]:
    lines = [*disclaimers(algorithm), f"algorithm: {algorithm['name']} {algorithm['version']}"]
    return [segment("NTE", str(i), "L", escape(line)) for i, line in enumerate(lines, start=1)]


def _finding_observations(findings: Iterable[Mapping[str, Any]], when: str) -> list[str]:
    return [
        numbered_segment(
            "OBX",
            {
                1: str(i),
                2: "NM",
                3: f"{escape(_local_code(f['name']))}^{escape(f['name'])}^L",
                5: f"{float(f['probability']):.4f}",
                8: "A" if f.get("decision") == "present" else "",  # abnormal flag
                11: "P",  # observation result status: preliminary
                14: when,
            },
        )
        for i, f in enumerate(findings, start=1)
    ]


def _study_observation(set_id: int, study_uid: str) -> str:
    return numbered_segment(
        "OBX",
        {1: str(set_id), 2: "ST", 3: "113014^DICOM Study^DCM", 5: escape(study_uid), 11: "P"},
    )


def _local_code(name: str) -> str:
    """A code value for a finding without a standard code: its name, upper-case, A-Z0-9_."""
    return "".join(c if c.isalnum() else "_" for c in name.upper())


def send_mllp(host: str, port: int, message: str, timeout_s: float = 5.0) -> str:
    """Send one message framed for MLLP and return the ACK; raise unless MSA-1 is AA or CA."""
    control_id = _field(_first_segment(message, "MSH"), 10, msh=True)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(START_BLOCK + message.encode("utf-8") + END_BLOCK)
            ack = _read_frame(conn)
    except OSError as exc:
        raise NotificationError(f"HL7 receiver {host}:{port} unreachable: {exc}") from exc
    check_ack(ack, control_id)
    logger.info("hl7 oru control_id=%s accepted", control_id)
    return ack


def check_ack(ack: str, control_id: str) -> None:
    """Raise `NotificationError` unless the ACK accepts the message with this control id."""
    msa = _first_segment(ack, "MSA")
    code, acked_id = _field(msa, 1), _field(msa, 2)
    if code not in ACCEPTED:
        reason = _field(msa, 3) or "no reason given"
        logger.warning("hl7 oru control_id=%s refused: %s", control_id, code)
        # AR/CR: the receiver rejects this message, so sending it again cannot help.
        raise NotificationError(
            f"HL7 receiver answered {code or 'no code'}: {reason}",
            retryable=code not in REJECTED,
        )
    if acked_id != control_id:
        raise NotificationError(f"HL7 ACK is for message {acked_id!r}, not {control_id!r}")


def _read_frame(conn: socket.socket) -> str:
    buffer = b""
    while END_BLOCK not in buffer:
        if len(buffer) > MAX_ACK_BYTES:
            raise NotificationError("HL7 receiver sent no end of block within 1 MiB")
        chunk = conn.recv(4096)
        if not chunk:
            raise NotificationError("HL7 receiver closed the connection without an ACK")
        buffer += chunk
    frame = buffer[: buffer.index(END_BLOCK)]
    if not frame.startswith(START_BLOCK):
        raise NotificationError("HL7 receiver's answer is not MLLP-framed")
    return frame[len(START_BLOCK) :].decode("utf-8", errors="replace")


def _first_segment(message: str, name: str) -> str:
    for line in message.replace("\n", "\r").split("\r"):
        if line.startswith(name + "|"):
            return line
    raise NotificationError(f"HL7 message has no {name} segment")


def _field(segment_text: str, number: int, *, msh: bool = False) -> str:
    """Field `number` of a segment; MSH counts its field separator as MSH-1."""
    fields = segment_text.split("|")
    index = number - 1 if msh else number
    return fields[index] if index < len(fields) else ""
