"""Raw bytes on the node's DICOM socket: garbage, broken PDUs, garbage after a good request.

The node must answer each with a PDU (A-ASSOCIATE-AC/RJ, A-ABORT) or close the connection,
and keep serving; it must never keep a connection that sent garbage open.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from hypothesis import strategies as st

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}  # fmt: skip


@dataclass(frozen=True)
class RawCase:
    mutation: str
    data: bytes
    after_accept: bool  # send a good A-ASSOCIATE-RQ first, then ``data``


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def associate_rq(calling: bytes = b"FUZZER", called: bytes = b"PACSCLIP") -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    context = _item(
        0x20, b"\x01\x00\x00\x00" + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_LE)
    )
    user_info = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">H", 1) + b"\x00\x00"
        + called.ljust(16) + calling.ljust(16) + b"\x00" * 32
        + _item(0x10, APPLICATION_CONTEXT) + context + user_info
    )  # fmt: skip
    return struct.pack(">BxI", 0x01, len(body)) + body


@st.composite
def raw_cases(draw: st.DrawFn) -> RawCase:
    kind = draw(
        st.sampled_from(
            ["random", "bad_type", "huge_length", "short_length", "mutated_rq", "after_accept"]
        )
    )
    good = associate_rq()
    if kind == "random":
        return RawCase(kind, draw(st.binary(min_size=1, max_size=512)), False)
    if kind == "bad_type":
        body = draw(st.binary(max_size=64))
        pdu_type = draw(st.sampled_from([0, 8, 0x20, 0xFF]))
        return RawCase(kind, struct.pack(">BxI", pdu_type, len(body)) + body, False)
    if kind == "huge_length":  # a header promising far more than ever comes
        length = draw(st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF, 10_000_000]))
        return RawCase(kind, struct.pack(">BxI", 1, length) + good[6:], False)
    if kind == "short_length":
        return RawCase(kind, struct.pack(">BxI", 1, draw(st.integers(0, 60))) + good[6:], False)
    if kind == "mutated_rq":
        out = bytearray(good)
        for _ in range(draw(st.integers(1, 6))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return RawCase(kind, bytes(out), False)
    # A good association, then a broken P-DATA-TF, release or unknown PDU.
    pdu_type = draw(st.sampled_from([4, 5, 1, 9]))
    body = draw(st.binary(max_size=256))
    length = draw(st.sampled_from([len(body), len(body) + 10, 0, 0xFFFFFFFF]))
    return RawCase(kind, struct.pack(">BxI", pdu_type, length) + body, True)


def send_raw(host: str, port: int, case: RawCase, timeout_s: float) -> str:
    """Send one raw case; returns the node's reaction: the PDUs it sent, then how it ended.

    Raises TimeoutError when the node still holds the connection ``timeout_s`` after the
    fuzzer stopped writing."""
    answers: list[str] = []
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        if case.after_accept:
            sock.sendall(associate_rq())
            first = _read_pdu(sock)
            answers.append(PDU_NAMES.get(first, f"type {first}") if first else "closed")
            if first != 2:
                return ",".join(answers)
        try:
            sock.sendall(case.data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return ",".join([*answers, "closed while sending"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pdu = _read_pdu(sock)
            if pdu is None:
                return ",".join([*answers, "closed"])
            answers.append(PDU_NAMES.get(pdu, f"type {pdu}"))
    raise TimeoutError(f"connection still open {timeout_s} s after {case.mutation}: {answers}")


def _read_pdu(sock: socket.socket) -> int | None:
    """The type of the next PDU the node sends (its body skipped), or None on close."""
    header = _read_exact(sock, 6)
    if header is None:
        return None
    pdu_type, length = struct.unpack(">BxI", header)
    if _read_exact(sock, length) is None:
        return None
    return int(pdu_type)


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        try:
            chunk = sock.recv(size - len(chunks))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)
