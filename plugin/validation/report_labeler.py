"""Report labels per finding: present, absent, uncertain, or not mentioned (None).

The CheXpert labeler's conventions, on the project's medspacy pipeline (sectionizer, target
matcher, ConText): a mention in the findings or impression counts, one in the indication,
history, comparison or technique sections does not ("History: rule out pneumothorax"); a mention
asserted anywhere makes the finding present, else an uncertain one ("cannot exclude", "possible",
"versus") makes it uncertain, else a negated or resolved one ("no pneumothorax", "effusion has
resolved") or a normal statement ("heart size is normal") makes it absent. Hypothetical and
historical mentions ("if symptoms persist", "history of") are not findings of this exam.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from plugin.concepts.extract import ConceptExtractor, Mention
from plugin.errors import PacsclipError
from plugin.validation.vocabulary import Vocabulary, finding_of

# Bump when the rules below change: stored labels name the version that made them.
LABELER_RULES_VERSION = "2026.12.0"

# Sections whose mentions describe why the exam was done or how, not what it shows.
NOT_FINDING_SECTIONS = frozenset(
    {"indication", "comparison", "technique", "chief_complaint", "history_of_present_illness"}
)


class ReportLabel(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


class ReportRefused(PacsclipError):
    """The report cannot be labeled (empty, or not text)."""


def check_report_text(text: object) -> str:
    """The report's text, or ReportRefused saying what is wrong with it."""
    if not isinstance(text, str):
        raise ReportRefused(f"a report must be text, got {type(text).__name__}")
    if "\x00" in text:
        raise ReportRefused("the report holds NUL bytes: send its text, not a binary file")
    if not any(ch.isalpha() for ch in text):
        raise ReportRefused("the report is empty (no words)")
    return text


@dataclass(frozen=True)
class LabeledReport:
    labels: dict[str, ReportLabel | None]

    def as_json(self) -> dict[str, str | None]:
        return {k: (None if v is None else v.value) for k, v in self.labels.items()}


class ReportLabeler:
    """Labels report texts for a vocabulary's findings. Build one per process (about a second,
    after medspacy's import) and reuse it; it keeps no state between reports."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        # The punctuation splitter: reports punctuate their sentences, and it is two orders of
        # magnitude faster than PyRuSH.
        self._extractor = ConceptExtractor(vocabulary.lexicon(), sentence_splitter="punctuation")

    @property
    def version(self) -> str:
        """Rules version and vocabulary digest: a changed site vocabulary relabels reports."""
        return f"{LABELER_RULES_VERSION}+{self.vocabulary.digest[:12]}"

    def label(self, text: str) -> LabeledReport:
        mentions = self._extractor.extract(check_report_text(text))
        return LabeledReport(aggregate(mentions, self.vocabulary.names))

    def label_many(self, texts: Iterable[str]) -> list[LabeledReport]:
        return [self.label(text) for text in texts]


def aggregate(
    mentions: Iterable[Mention], findings: Iterable[str]
) -> dict[str, ReportLabel | None]:
    """One label per finding from its mentions: present > uncertain > absent > None."""
    seen: dict[str, set[ReportLabel]] = {name: set() for name in findings}
    for mention in mentions:
        finding, normal = finding_of(mention.code)
        if finding not in seen or not _counts(mention):
            continue
        seen[finding].add(_mention_label(mention, normal))
    return {name: _strongest(labels) for name, labels in seen.items()}


def _counts(mention: Mention) -> bool:
    if mention.section in NOT_FINDING_SECTIONS:
        return False
    # ConText's historical cues ("prior", "previous") mostly mark the comparison in a report
    # ("compared with the prior study, the pneumonia is worse"): not a reason to drop it.
    return not (mention.hypothetical or mention.family)


# Cues inside a span that a regular expression matched ("heart is not enlarged", "heart size
# may be enlarged"): ConText reads only the words around a span, never inside it.
_NEGATION_INSIDE = re.compile(r"\b(?:not|no)\b", re.IGNORECASE)
_HEDGE_INSIDE = re.compile(
    r"\b(?:may|might|could|possibly|probably|likely|borderline|questionabl[ey])\b", re.IGNORECASE
)


def _mention_label(mention: Mention, normal: bool) -> ReportLabel:
    if _NEGATION_INSIDE.search(mention.text):
        return ReportLabel.UNCERTAIN if normal else ReportLabel.ABSENT
    if _HEDGE_INSIDE.search(mention.text):
        return ReportLabel.UNCERTAIN
    if normal:
        # "heart size is normal" denies cardiomegaly; a hedged or negated normal statement
        # ("heart size is not normal") says the finding may be there.
        return (
            ReportLabel.ABSENT
            if mention.affirmed and not mention.uncertain
            else (ReportLabel.UNCERTAIN)
        )
    if mention.negated:
        return ReportLabel.ABSENT
    if mention.uncertain:
        return ReportLabel.UNCERTAIN
    return ReportLabel.PRESENT


_ORDER: Mapping[ReportLabel, int] = {
    ReportLabel.PRESENT: 3,
    ReportLabel.UNCERTAIN: 2,
    ReportLabel.ABSENT: 1,
}


def _strongest(labels: set[ReportLabel]) -> ReportLabel | None:
    return max(labels, key=_ORDER.__getitem__) if labels else None
