"""Flags for systems outside the PACS: a webhook on STAT results, HL7 v2 ORU^R01 over MLLP.

Both take a *flag*: a result dict as the API shows it (`algorithm` {name, version, synthetic},
`findings` [{name, probability, decision}], `priority`, optionally `triggered_by`, the names of
the findings that made it STAT) plus the study's identity (`study_instance_uid`,
`accession_number`, optionally `patient_id`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plugin.disclaimers import NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL
from plugin.errors import PacsclipError


class NotificationError(PacsclipError):
    """A receiver did not accept a flag after the allowed attempts; the message says why.

    ``retryable`` is False when the receiver refused the flag itself, so that sending it
    again would get the same answer."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def disclaimers(algorithm: Mapping[str, Any]) -> tuple[str, ...]:
    if algorithm.get("synthetic"):
        return (NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL)
    return (NOT_FOR_DIAGNOSIS,)


def triggering_findings(flag: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The findings that raised the flag: those named in `triggered_by`, else those present."""
    findings: list[Mapping[str, Any]] = list(flag.get("findings", []))
    triggers = flag.get("triggered_by")
    if triggers is not None:
        names = set(triggers)
        return [f for f in findings if f["name"] in names]
    return [f for f in findings if f.get("decision") == "present"]
