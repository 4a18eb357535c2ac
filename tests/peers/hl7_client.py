"""A RIS sending HL7 v2 messages over MLLP, for tests: an ORU^R01 report and its ACK."""

from __future__ import annotations

import socket
import time

import hl7

from plugin.notify.hl7 import END_BLOCK, START_BLOCK

ACK_TIMEOUT_S = 60


def oru(control_id: str, accession: str, text: str) -> bytes:
    segments = [
        f"MSH|^~\\&|RIS|GENERAL|PACSCLIP|GENERAL|20250304050607||ORU^R01^ORU_R01|{control_id}|P|2.5",
        "PID|1||PID-77^^^GENERAL||DOE^JANE",
        f"OBR|1|PLACER-{control_id}|{accession}^RIS|71020^Chest 2 views^L",
        f"OBX|1|TX|18782-3^Radiology Study observation^LN||{text}||||||F",
    ]
    return "\r".join(segments).encode() + b"\r"


def exchange(conn: socket.socket, raw: bytes) -> tuple[str, str, str]:
    """Send one MLLP-framed message and read its ACK: (MSA-1, MSA-2, MSA-3)."""
    conn.sendall(START_BLOCK + raw + END_BLOCK)
    buffer = b""
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while END_BLOCK not in buffer:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no ACK within {ACK_TIMEOUT_S} s")
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the listener closed the connection without an ACK")
        buffer += chunk
    assert buffer.startswith(START_BLOCK)
    ack = hl7.parse(buffer[len(START_BLOCK) : buffer.index(END_BLOCK)].decode())
    msa = ack.segment("MSA")
    return str(msa[1]), str(msa[2]), ack.unescape(str(msa[3])) if len(msa) > 3 else ""
