"""A Structured Report's content tree as nested nodes a template can show.

Pure: a pydicom dataset in, dataclasses out. Each node is one content item: its concept name,
its value as text (text, code meaning, number with unit, date/time, UID or the referenced
image) and its children.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from pydicom import Dataset

MAX_DEPTH: Final = 12  # TID 1500 is 5-6 deep; a deeper tree is not one pacsclip made
_DATE_KEYWORDS: Final = {"DATETIME": "DateTime", "DATE": "Date", "TIME": "Time"}


@dataclass(frozen=True)
class SrNode:
    relationship: str
    value_type: str
    name: str
    value: str
    children: list[SrNode] = field(default_factory=list)


def content_tree(ds: Dataset) -> SrNode:
    """The document's root container with its content items."""
    return SrNode(
        relationship="",
        value_type=str(ds.get("ValueType", "CONTAINER")),
        name=_code_meaning(ds.get("ConceptNameCodeSequence")),
        value="",
        children=_children(ds, 1),
    )


def _children(item: Dataset, depth: int) -> list[SrNode]:
    if depth > MAX_DEPTH:
        return []
    return [_node(child, depth) for child in item.get("ContentSequence", [])]


def _node(item: Dataset, depth: int) -> SrNode:
    value_type = str(item.get("ValueType", ""))
    return SrNode(
        relationship=str(item.get("RelationshipType", "")),
        value_type=value_type,
        name=_code_meaning(item.get("ConceptNameCodeSequence")),
        value=_value(item, value_type),
        children=_children(item, depth + 1),
    )


def _value(item: Dataset, value_type: str) -> str:
    if value_type == "TEXT":
        return str(item.get("TextValue", ""))
    if value_type == "CODE":
        return _code_meaning(item.get("ConceptCodeSequence"))
    if value_type == "NUM":
        return _number(item.get("MeasuredValueSequence"))
    if value_type in _DATE_KEYWORDS:
        return str(item.get(_DATE_KEYWORDS[value_type], ""))
    if value_type == "UIDREF":
        return str(item.get("UID", ""))
    if value_type in ("IMAGE", "COMPOSITE"):
        refs = item.get("ReferencedSOPSequence", [])
        return f"image {refs[0].ReferencedSOPInstanceUID}" if refs else ""
    if value_type == "PNAME":
        return "(person name)"  # an observer's or patient's name is not repeated here
    return ""


def _code_meaning(sequence: Any) -> str:
    if not sequence:
        return ""
    return str(sequence[0].get("CodeMeaning", ""))


def _number(sequence: Any) -> str:
    if not sequence:
        return ""
    measured = sequence[0]
    unit = _code_meaning(measured.get("MeasurementUnitsCodeSequence"))
    value = str(measured.get("NumericValue", ""))
    return f"{value} {unit}".strip()
