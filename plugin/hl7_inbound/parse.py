r"""An HL7 v2 ORU^R01 to the radiology report it carries: its study keys and its text.

Where each part is read from:

    MSH  MSH-9 the message type (ORU^R01), MSH-10 the control id, MSH-3..6 who sent it to whom
    OBR  OBR-3 (filler order number), else OBR-2 (placer order number): the accession number
    ORC  ORC-3 (filler order number): the accession number when no OBR gives one
    OBX  identifier 113014^Study Instance UID^DCM: the Study Instance UID (OBX-5), not text;
         value type TX, FT or ST: the report text, OBX-5 of each in order, a repetition a line
    ZDS  ZDS-1 the Study Instance UID (IHE Scheduled Workflow), when no OBX gives it

The grammar (segments, fields, repetitions, components, the delimiters MSH-1 and MSH-2 declare)
is python-hl7's. Escape sequences are decoded here rather than by python-hl7's ``unescape``,
which logs the whole field (the report text) on a sequence it does not know, raises on some
(``\.brx\``) and expands ``\.sp999999999\`` without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import hl7  # type: ignore[import-untyped]

from plugin.errors import PacsclipError

REPORT_MESSAGE_TYPE: Final = ("ORU", "R01")
TEXT_VALUE_TYPES: Final = frozenset({"TX", "FT", "ST"})
# DCM 113014 names the Study Instance UID in an OBX (DICOM PS3.16; "DICOM Study" in some systems).
STUDY_UID_CODE: Final = ("113014", "DCM")
MAX_ACCESSION_CHARS: Final = 64  # the catalog's column; DICOM's AccessionNumber (SH) holds 16
_UID: Final = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_CHARS: Final = 64
# Formatting sequences such as \.sp5\ repeat a line break or a space; a sender cannot make one
# line of text grow past this many.
MAX_FORMAT_REPEAT: Final = 20
# What python-hl7 raises on input it cannot split (found by fuzzing: a truncated MSH gives
# IndexError; a segment that declares other delimiters, AssertionError from its containers).
_GRAMMAR_ERRORS: Final = (hl7.HL7Exception, ValueError, IndexError, AssertionError)


@dataclass(frozen=True)
class MessageHeader:
    """What MSH says about the message: enough to answer it."""

    control_id: str
    message_code: str  # MSH-9.1, e.g. ORU
    trigger_event: str  # MSH-9.2, e.g. R01
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    processing_id: str
    version_id: str

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}"


@dataclass(frozen=True)
class ReportMessage:
    """One report: at least one study key, and text."""

    header: MessageHeader
    accession_number: str | None
    study_instance_uid: str | None
    text: str


class MessageRefused(PacsclipError):
    """The message gives no report to keep; ``header`` when its MSH could be read.

    The reasons never quote the message's content: they are logged.
    """

    def __init__(self, reason: str, header: MessageHeader | None = None) -> None:
        super().__init__(reason)
        self.header = header


class UnparseableMessage(MessageRefused):
    """Not an HL7 v2 message: no MSH first, or a grammar python-hl7 cannot split."""


class UnsupportedMessage(MessageRefused):
    """An HL7 message, but not an ORU^R01."""


class UnusableReport(MessageRefused):
    """An ORU^R01 without report text, without any study key, or with a key that is not one."""


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    repetition: str = "~"
    component: str = "^"
    subcomponent: str = "&"
    escape: str = "\\"


def peek_control_id(raw: bytes) -> str:
    """MSH-10 read without parsing, to name the kept file and to answer a message that cannot
    be parsed; "" when there is none."""
    text = raw.lstrip().decode("latin-1")
    if not text.startswith("MSH") or len(text) < 4:
        return ""
    first_segment = re.split(r"[\r\n]", text, maxsplit=1)[0]
    fields = first_segment.split(text[3])
    # fields[0] is "MSH" and MSH-1 is the separator itself, so fields[n - 1] is MSH-n.
    return fields[9].strip() if len(fields) > 9 else ""


def peek_header(raw: bytes) -> MessageHeader | None:
    """The MSH of a message that is not parsed whole (one over the size limit), to address its
    answer; None when its first segment is not a readable MSH."""
    first_segment = re.split(rb"[\r\n]", raw.lstrip(), maxsplit=1)[0]
    try:
        message = _parse(first_segment + b"\r")
        return _header(message, _delimiters(message))
    except (MessageRefused, *_GRAMMAR_ERRORS):
        return None


def parse_report(raw: bytes) -> ReportMessage:
    """The report an ORU^R01 carries, or `MessageRefused` saying why there is none."""
    message = _parse(raw)
    delimiters = _delimiters(message)
    try:
        header = _header(message, delimiters)
    except _GRAMMAR_ERRORS as exc:
        raise UnparseableMessage(f"cannot parse: unreadable MSH ({type(exc).__name__})") from exc
    if (header.message_code, header.trigger_event) != REPORT_MESSAGE_TYPE:
        shown = header.message_type if header.message_code else "none"
        raise UnsupportedMessage(
            f"message type {shown} is not ORU^R01: only reports are received here", header
        )
    try:
        accession = _accession(message, delimiters)
        study_uid = _study_uid(message, delimiters)
        text = _report_text(message, delimiters)
    except _GRAMMAR_ERRORS as exc:
        raise UnparseableMessage(f"cannot parse: {type(exc).__name__}", header) from exc
    keys = _checked_keys(accession, study_uid, header)
    return ReportMessage(header, *keys, _checked(text, header))


def _parse(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # HL7's 8859/1 (and most of Windows-1252)
    # Segments end with CR; a message without any CR ends them with LF. Where CRs are there, an LF
    # stays inside its field: senders put raw line breaks in report text.
    text = text.replace("\r\n", "\r")
    if "\r" not in text:
        text = text.replace("\n", "\r")
    if not text.lstrip().startswith("MSH"):
        raise UnparseableMessage("cannot parse: the message does not start with an MSH segment")
    try:
        return hl7.parse(text)
    except _GRAMMAR_ERRORS as exc:
        raise UnparseableMessage(f"cannot parse: {type(exc).__name__}") from exc


def _delimiters(message: Any) -> Delimiters:
    separators: str = message.separators  # segment, field, repetition, component, subcomponent
    return Delimiters(
        field=separators[1],
        repetition=separators[2],
        component=separators[3],
        subcomponent=separators[4],
        escape=message.esc,
    )


def _header(message: Any, d: Delimiters) -> MessageHeader:
    msh = _segments(message, "MSH")[0]
    return MessageHeader(
        control_id=_raw_field(msh, 10).strip(),
        message_code=_value(msh, 9, d, component=1),
        trigger_event=_value(msh, 9, d, component=2),
        sending_application=_value(msh, 3, d),
        sending_facility=_value(msh, 4, d),
        receiving_application=_value(msh, 5, d),
        receiving_facility=_value(msh, 6, d),
        processing_id=_value(msh, 11, d),
        version_id=_value(msh, 12, d),
    )


def _accession(message: Any, d: Delimiters) -> str:
    obr = _segments(message, "OBR")
    for field_number in (3, 2):  # filler order number, then placer order number
        for segment in obr:
            if value := _value(segment, field_number, d):
                return value
    for segment in _segments(message, "ORC"):
        if value := _value(segment, 3, d):
            return value
    return ""


def _study_uid(message: Any, d: Delimiters) -> str:
    for segment in _segments(message, "OBX"):
        if _is_study_uid(segment, d) and (value := _value(segment, 5, d)):
            return value
    for segment in _segments(message, "ZDS"):
        if value := _value(segment, 1, d):
            return value
    return ""


def _report_text(message: Any, d: Delimiters) -> str:
    lines: list[str] = []
    for segment in _segments(message, "OBX"):
        if _value(segment, 2, d).upper() not in TEXT_VALUE_TYPES or _is_study_uid(segment, d):
            continue
        observation = _field(segment, 5)
        if observation is None:
            lines.append("")
            continue
        lines += [unescape(str(repetition), d) for repetition in _repetitions(observation)]
    return "\n".join(lines).strip()


def _is_study_uid(obx: Any, d: Delimiters) -> bool:
    return (_value(obx, 3, d, component=1), _value(obx, 3, d, component=3)) == STUDY_UID_CODE


def _checked_keys(
    accession: str, study_uid: str, header: MessageHeader
) -> tuple[str | None, str | None]:
    if not (accession or study_uid):
        raise UnusableReport(
            "the report names no study: no accession number (OBR-3, OBR-2, ORC-3) and no "
            "Study Instance UID (OBX 113014^^DCM, ZDS-1)",
            header,
        )
    if len(accession) > MAX_ACCESSION_CHARS:
        raise UnusableReport(
            f"the accession number is longer than {MAX_ACCESSION_CHARS} characters", header
        )
    if study_uid and (len(study_uid) > MAX_UID_CHARS or not _UID.fullmatch(study_uid)):
        raise UnusableReport("the Study Instance UID is not a DICOM UID", header)
    return accession or None, study_uid or None


def _checked(text: str, header: MessageHeader) -> str:
    if not text:
        raise UnusableReport("the report has no text: no TX, FT or ST OBX with a value", header)
    return text


def unescape(value: str, d: Delimiters = Delimiters()) -> str:
    r"""A field's text with HL7 escape sequences decoded: \F\ \S\ \T\ \R\ \E\ the delimiters,
    \.br\ \.sp\ \.ce\ line breaks, \.in\ \.ti\ \.sk\ spaces, \Xhh..\ bytes (UTF-8); highlighting
    (\H\ \N\), character-set switches and site-defined sequences carry no text and are dropped.
    An escape character without its closing one is kept as text."""
    if d.escape not in value:
        return value
    out: list[str] = []
    start = 0
    while (begin := value.find(d.escape, start)) >= 0:
        end = value.find(d.escape, begin + 1)
        if end < 0:
            break
        out += [value[start:begin], _sequence(value[begin + 1 : end], d)]
        start = end + 1
    out.append(value[start:])
    return "".join(out)


def _sequence(code: str, d: Delimiters) -> str:
    delimiters = {
        "F": d.field,
        "S": d.component,
        "T": d.subcomponent,
        "R": d.repetition,
        "E": d.escape,
    }
    if code in delimiters:
        return delimiters[code]
    if code.startswith("X"):
        try:
            return bytes.fromhex(code[1:]).decode("utf-8", errors="replace")
        except ValueError:
            return ""
    if code.startswith("."):
        return _formatting(code[1:3], code[3:])
    return ""


def _formatting(command: str, argument: str) -> str:
    try:
        count = int(argument) if argument else 1
    except ValueError:
        count = 1
    count = max(0, min(count, MAX_FORMAT_REPEAT))
    if command in ("br", "ce"):
        return "\n"
    if command == "sp":
        return "\n" * max(1, count)
    if command in ("in", "ti", "sk"):
        return " " * count
    return ""  # .fi, .nf: fill mode on and off


# python-hl7's containers: a Field holds Repetitions once any delimiter below the field separator
# is in it, else the plain value; a Repetition holds Components or plain values likewise.


def _segments(message: Any, name: str) -> list[Any]:
    return [segment for segment in message if str(segment[0]) == name]


def _field(segment: Any, number: int) -> Any | None:
    # segment[0] is the segment's name; for MSH, segment[1] is MSH-1 (the field separator).
    return segment[number] if number < len(segment) else None


def _raw_field(segment: Any, number: int) -> str:
    field = _field(segment, number)
    return "" if field is None else str(field)


def _repetitions(field: Any) -> list[Any]:
    if len(field) and isinstance(field[0], hl7.Repetition):
        return list(field)
    return [field]


def _value(segment: Any, number: int, d: Delimiters, component: int = 1) -> str:
    """Component ``component`` of the field's first repetition, decoded and stripped."""
    field = _field(segment, number)
    if field is None:
        return ""
    first = _repetitions(field)[0]
    components = [str(c) for c in first] if isinstance(first, hl7.Repetition) else [str(first)]
    if component > len(components):
        return ""
    return unescape(components[component - 1], d).strip()
