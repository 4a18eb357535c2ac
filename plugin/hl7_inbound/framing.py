"""MLLP framing of received messages: ``<VT>message<FS><CR>`` read from an asyncio stream.

The stream's limit is the largest message accepted (`stream_limit`). A message within it comes
back as bytes. A larger one is not dropped: it is streamed, a buffer at a time, to an
`OversizeMessage` (a temp file in the inbox) until its end block, so that it can be kept and
answered, and the connection goes on with the next message. Memory stays within a few times
the limit per connection (asyncio stops reading a socket whose buffer holds twice the limit),
whatever the sender sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from plugin.errors import PacsclipError
from plugin.hl7_inbound.inbox import OversizeMessage
from plugin.notify.hl7 import END_BLOCK, START_BLOCK

logger = logging.getLogger(__name__)


class UnframedBlock(PacsclipError):
    """A block that does not start with the MLLP start character <VT>; ``raw`` holds what
    came (up to its end block), to be kept like any message."""

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


class OversizeNotKept(PacsclipError):
    """A message over the limit could not be written to disk as it arrived."""


def stream_limit(max_message_bytes: int) -> int:
    """The stream limit that lets a message of ``max_message_bytes`` through: asyncio counts
    the start block in it."""
    return max_message_bytes + len(START_BLOCK)


async def read_message(
    reader: asyncio.StreamReader, receive_oversize: Callable[[], OversizeMessage]
) -> bytes | OversizeMessage:
    """The next block's message: its bytes, or the `OversizeMessage` it was streamed to.

    Raises `UnframedBlock` (the block is consumed), `asyncio.IncompleteReadError` (the
    connection closed in the middle of a message) and `OversizeNotKept`; an oversize message
    that does not reach its end block leaves no file behind.
    """
    try:
        block = await reader.readuntil(END_BLOCK)
    except asyncio.LimitOverrunError as exc:
        try:
            message = receive_oversize()
        except OSError as error:
            raise OversizeNotKept(error.strerror or str(error)) from error
        return await _stream_to(message, reader, exc.consumed)
    if block[: len(START_BLOCK)] != START_BLOCK:
        raise UnframedBlock("cannot parse: not framed as MLLP", block)
    return block[len(START_BLOCK) : -len(END_BLOCK)]


async def _stream_to(
    message: OversizeMessage, reader: asyncio.StreamReader, buffered: int
) -> OversizeMessage:
    # LimitOverrunError leaves the buffer in place and says how much of it is surely before
    # the end block: take that much, write it, and look for the end block again.
    try:
        data = await reader.readexactly(buffered)
        if data.startswith(START_BLOCK):
            data = data[len(START_BLOCK) :]
        while True:
            await _write(message, data)
            try:
                data = await reader.readuntil(END_BLOCK)
            except asyncio.LimitOverrunError as exc:
                data = await reader.readexactly(exc.consumed)
            else:
                await _write(message, data[: -len(END_BLOCK)])
                return message
    except BaseException:
        logger.warning(
            "hl7 message over the limit not received whole (%d bytes came): not kept",
            message.received,
        )
        message.discard()
        raise


async def _write(message: OversizeMessage, data: bytes) -> None:
    try:
        await asyncio.to_thread(message.write, data)
    except OSError as exc:
        raise OversizeNotKept(exc.strerror or str(exc)) from exc
