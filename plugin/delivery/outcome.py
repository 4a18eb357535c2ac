"""What a destination answered: each instance's status, and the error when not all were stored.

C-STORE (``plugin.delivery.dimse``) and STOW-RS (``plugin.delivery.stow``) report the same way,
so the caller decides about retries from ``DispatchError.retryable`` whatever the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plugin.dicom_status import PROCESSING_FAILURE, SUCCESS
from plugin.errors import PacsclipError

# PS3.4 B.2.3: warnings mean the peer stored the instance (possibly with coerced elements).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
# PS3.7 C.4.2 "Processing failure" (0x0110) is the peer's generic error, usually transient
# (a locked database, a full disk reported generically), so worth a bounded retry, as is
# "out of resources".
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)


@dataclass(frozen=True)
class SendReport:
    """What one call sent: (SOPInstanceUID, C-STORE status) per instance, in sending order."""

    destination: str
    sent: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(is_stored(status) for _, status in self.sent)

    @property
    def failures(self) -> list[tuple[str, int]]:
        return [(uid, status) for uid, status in self.sent if not is_stored(status)]


class DispatchError(PacsclipError):
    """Sending to a destination failed; ``retryable`` says whether trying again can help.

    ``report`` holds the per-instance statuses when the association got that far.
    """

    def __init__(
        self,
        message: str,
        *,
        destination: str,
        retryable: bool,
        report: SendReport | None = None,
    ) -> None:
        super().__init__(message)
        self.destination = destination
        self.retryable = retryable
        self.report = report


def is_stored(status: int) -> bool:
    """Success or a warning: the peer kept the instance."""
    return status == SUCCESS or status in WARNING_STATUSES


def is_retryable_status(status: int) -> bool:
    """A failure status that may clear by itself on the peer's side."""
    return status == PROCESSING_FAILURE or status in OUT_OF_RESOURCES_RANGE
