"""Report text out of Structured Reports that the PACS sends with a study.

A radiologist's SR (Basic Text, Enhanced or Comprehensive) carries the report as TEXT content
items under headings; pacsclip's own SRs are recognised by their Manufacturer and skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)

from plugin.results.study_result import MANUFACTURER

REPORT_SR_CLASSES = frozenset(
    {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage}
)


def is_foreign_report(ds: Dataset) -> bool:
    """An SR that someone else wrote (a report), not one of pacsclip's results."""
    return (
        str(ds.get("SOPClassUID", "")) in REPORT_SR_CLASSES
        and str(ds.get("Manufacturer", "")) != MANUFACTURER
    )


def report_text(ds: Dataset) -> str:
    """The SR's TEXT items, one per line, each after its heading ("Impression: ...")."""
    return "\n".join(_lines(ds, heading=None)).strip()


def _lines(item: Dataset, heading: str | None) -> Iterator[str]:
    for child in item.get("ContentSequence", []):
        name = _meaning(child)
        if child.get("ValueType") == "TEXT" and str(child.get("TextValue", "")).strip():
            text = " ".join(str(child.TextValue).split())
            label = name if name and name.lower() not in {"finding", "text"} else heading
            yield f"{label}: {text}" if label else text
        yield from _lines(child, name or heading)


def _meaning(item: Dataset) -> str | None:
    codes = item.get("ConceptNameCodeSequence")
    return str(codes[0].get("CodeMeaning", "")) or None if codes else None
