"""The original-mode acknowledgment (ACK) of a received HL7 message.

    MSH  we send it; the message's sender receives it; ACK^<trigger event>^ACK; a new control
         id; the message's processing and version ids (P and 2.5 when its MSH was unreadable)
    MSA  MSA-1 the acknowledgment code, MSA-2 the control id of the message acknowledged,
         MSA-3 a text: why it was not accepted, or that the report waits for its study
    ERR  for AE and AR only: ERR-3 the condition (HL7 table 0357), ERR-4 E (error),
         ERR-8 the same text for the sender's operators

Built from explicit inputs (control id, time), so a test can build the same ACK twice. The
framing, delimiters and escaping are the ones `plugin.notify.hl7` sends ORU flags with.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum, StrEnum

from plugin.hl7_inbound.parse import MessageHeader
from plugin.notify.hl7 import (
    ENCODING_CHARACTERS,
    SEGMENT_SEPARATOR,
    escape,
    hl7_timestamp,
    numbered_segment,
    segment,
)

SENDING_APPLICATION = "PACSCLIP"
DEFAULT_PROCESSING_ID = "P"
DEFAULT_VERSION_ID = "2.5"
# The header of a message whose MSH could not be read: the ACK names no one.
_UNREAD = MessageHeader(*[""] * 9)


class AckCode(StrEnum):
    """HL7 table 0008, original mode."""

    APPLICATION_ACCEPT = "AA"
    APPLICATION_ERROR = "AE"
    APPLICATION_REJECT = "AR"


class ErrorCondition(Enum):
    """HL7 table 0357: (code, text) of ERR-3."""

    SEGMENT_SEQUENCE_ERROR = ("100", "Segment sequence error")
    REQUIRED_FIELD_MISSING = ("101", "Required field missing")
    DATA_TYPE_ERROR = ("102", "Data type error")
    UNSUPPORTED_MESSAGE_TYPE = ("200", "Unsupported message type")
    APPLICATION_INTERNAL_ERROR = ("207", "Application internal error")


def build_ack(
    code: AckCode,
    acknowledged_id: str,
    *,
    control_id: str,
    timestamp: datetime,
    header: MessageHeader | None = None,
    text: str = "",
    error: ErrorCondition | None = None,
    sending_application: str = SENDING_APPLICATION,
) -> str:
    """The ACK of the message with control id ``acknowledged_id`` (``header``: its MSH, when it
    could be read), segments joined with carriage returns."""
    segments = [
        _msh(header, control_id, hl7_timestamp(timestamp), sending_application),
        segment("MSA", code.value, escape(acknowledged_id), escape(text)),
    ]
    if error is not None:
        number, name = error.value
        segments.append(
            numbered_segment(
                "ERR", {3: f"{number}^{escape(name)}^HL70357", 4: "E", 8: escape(text)}
            )
        )
    return SEGMENT_SEPARATOR.join(segments) + SEGMENT_SEPARATOR


def _msh(header: MessageHeader | None, control_id: str, when: str, sending_app: str) -> str:
    # The ACK goes back the way the message came: its receiver sends, its sender receives.
    h = header or _UNREAD
    return segment(
        "MSH",
        ENCODING_CHARACTERS,
        escape(sending_app),
        escape(h.receiving_facility),
        escape(h.sending_application),
        escape(h.sending_facility),
        when,
        "",
        f"ACK^{escape(h.trigger_event)}^ACK" if h.trigger_event else "ACK",
        escape(control_id),
        escape(h.processing_id or DEFAULT_PROCESSING_ID),
        escape(h.version_id or DEFAULT_VERSION_ID),
    )
