"""The conformance statement's tables match what the node accepts and answers."""

from __future__ import annotations

import re
from pathlib import Path

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.ae import ACCEPTED_TRANSFER_SYNTAXES, build_ae
from dicom_node.object_checks import Problem
from plugin import dicom_status as status
from plugin.settings import Settings

DOC = Path(__file__).parents[2] / "docs" / "conformance.md"
SECTION = re.compile(r"^#+ ", re.MULTILINE)


def _section(title: str) -> str:
    """The text of the section whose heading contains ``title``, up to the next heading."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(title)
    following = SECTION.search(text, text.index("\n", start))
    return text[start : following.start() if following else len(text)]


def _uids_in_table(text: str, after: str) -> list[str]:
    """The UIDs of the first markdown table after ``after``, in table order."""
    table = text[text.index(after) :]
    rows: list[str] = []
    for line in table.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        match = re.search(r"`(1\.2\.840\.10008\.[0-9.]+)`", line)
        if match:
            rows.append(match[1])
    return rows


def test_storage_sop_classes_and_transfer_syntaxes_are_those_of_the_node() -> None:
    ae = build_ae(Settings(data_dir=Path("unused")))
    section = _section("Association acceptance policy")
    storage = {str(c.abstract_syntax) for c in ae.supported_contexts} - {str(Verification)}

    documented = _uids_in_table(section, "Storage SOP classes accepted")
    assert len(documented) == len(set(documented))
    assert set(documented) == storage
    # The table's order is the order of preference the node applies.
    syntaxes = _uids_in_table(section, "Transfer syntaxes accepted")
    assert syntaxes == [str(ts) for ts in ACCEPTED_TRANSFER_SYNTAXES]


def test_every_status_the_node_answers_is_documented() -> None:
    section = _section("SOP specific conformance: Storage SCP")
    answered = {p.value for p in Problem} | {
        status.SUCCESS,
        status.OUT_OF_RESOURCES,
        status.PROCESSING_FAILURE,
    }

    documented = {int(code, 16) for code in re.findall(r"^\| `0x([0-9A-F]{4})`", section, re.M)}

    assert documented == answered
