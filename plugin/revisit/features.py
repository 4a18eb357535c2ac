"""Encounter features of the revisit model: concepts in the note, and linked triage scores.

Columns, in order: the top-K concept codes of the training notes (presence, 0/1; Ji et al. used
K = 1001), then one column per ``triage_<finding>`` probability of the linked imaging study
(0 where none is linked), then ``triage:linked`` (1 when any triage score is present), so a
model can tell "no study" from "a study scoring 0". The spec is saved with the model and
rebuilds exactly these columns, with the same extraction settings, when it scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from plugin.concepts import (
    ConceptExtractor,
    ConceptVocabulary,
    ExtractionUnavailable,
    FeaturePolicy,
    document_concepts,
)
from plugin.concepts.extract import SentenceSplitter
from plugin.errors import PacsclipError
from plugin.revisit.encounters import Encounters, FloatArray

TRIAGE_LINKED: Final = "triage:linked"
# spaCy's rule-based splitter: as accurate as PyRuSH on notes that punctuate sentences or
# break lines (docs/concepts.md), and about 3x faster.
DEFAULT_SPLITTER: Final[SentenceSplitter] = "punctuation"
SPLITTERS: Final[tuple[SentenceSplitter, ...]] = ("punctuation", "pyrush")
# medspacy pins spacy<3.8, whose thinc needs numpy 1; this order keeps numpy 2 (docs/concepts.md).
MEDSPACY_INSTALL: Final = (
    'pip install "spacy>=3.8,<3.9" && '
    "pip install --no-deps medspacy==1.3.1 PyRuSH==1.0.13 && "
    'pip install "pysbd==0.3.4" jsonschema "medspacy_quickumls==3.2" PyFastNER quicksectx loguru'
)


class RevisitError(PacsclipError):
    """The revisit model cannot do what was asked; the message says what to change."""


class ConceptSource(Protocol):
    """Turns note texts into the set of concept codes present in each."""

    def documents(self, notes: Sequence[str]) -> list[frozenset[str]]: ...


class NoteConcepts:
    """medspacy extraction of notes to concept sets; build one per process and keep it.

    There is no lexicon-only extractor in the project to fall back on: without medspacy this
    raises :class:`RevisitError` with the exact install commands.
    """

    def __init__(
        self, splitter: SentenceSplitter = DEFAULT_SPLITTER, *, negated_features: bool = False
    ) -> None:
        try:
            self._extractor = ConceptExtractor(sentence_splitter=splitter)
        except ExtractionUnavailable as exc:
            raise RevisitError(
                "concept extraction from notes needs medspacy, which is not installed in this "
                f"environment. Run scripts/bootstrap, or install it with: {MEDSPACY_INSTALL}"
            ) from exc
        self.splitter = splitter
        self.policy = FeaturePolicy(negated_features=negated_features)

    def documents(self, notes: Sequence[str]) -> list[frozenset[str]]:
        return [document_concepts(self._extractor.extract(note), self.policy) for note in notes]


@dataclass(frozen=True, eq=False)
class FeatureSpec:
    """How a model's feature columns are built from an encounter; saved with the model."""

    vocabulary: ConceptVocabulary
    triage_columns: tuple[str, ...]
    splitter: SentenceSplitter = DEFAULT_SPLITTER
    negated_features: bool = False

    @classmethod
    def fit(
        cls,
        documents: Iterable[Iterable[str]],
        triage_columns: Sequence[str],
        *,
        k: int,
        splitter: SentenceSplitter = DEFAULT_SPLITTER,
        negated_features: bool = False,
    ) -> FeatureSpec:
        """The top-``k`` concepts of ``documents`` (no labels involved) and the triage columns."""
        vocabulary = ConceptVocabulary.fit(documents, k=k)
        if len(vocabulary) == 0:
            raise RevisitError("no clinical concept was found in any note: nothing to learn from")
        return cls(vocabulary, tuple(sorted(triage_columns)), splitter, negated_features)

    @property
    def names(self) -> list[str]:
        triage = [*self.triage_columns, TRIAGE_LINKED] if self.triage_columns else []
        return [*self.vocabulary.codes, *triage]

    def matrix(self, documents: Sequence[Iterable[str]], encounters: Encounters) -> FloatArray:
        """Features [N, len(names)] of ``encounters`` with their notes' concept sets."""
        if len(documents) != len(encounters):
            raise ValueError("one concept set per encounter is needed")
        concepts = self.vocabulary.transform(documents).astype(np.float64)
        if not self.triage_columns:
            return concepts
        missing = [c for c in self.triage_columns if c not in encounters.triage]
        if missing:
            raise RevisitError(
                f"{encounters.source}: the model uses the linked triage column(s) "
                f"{', '.join(missing)}; add them (empty where no study is linked)"
            )
        scores = np.column_stack([encounters.triage[c] for c in self.triage_columns])
        linked = (~np.isnan(scores)).any(axis=1, keepdims=True).astype(np.float64)
        result: FloatArray = np.hstack([concepts, np.nan_to_num(scores, nan=0.0), linked])
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "vocabulary_size": len(self.vocabulary),
            "k": self.vocabulary.k,
            "triage_columns": list(self.triage_columns),
            "sentence_splitter": self.splitter,
            "negated_features": self.negated_features,
            "names": self.names,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], vocabulary: ConceptVocabulary) -> FeatureSpec:
        splitter = data.get("sentence_splitter")
        if splitter not in SPLITTERS:
            raise RevisitError(f"unknown sentence splitter {splitter!r} in the model file")
        spec = cls(
            vocabulary,
            tuple(str(c) for c in data.get("triage_columns", [])),
            splitter,
            bool(data.get("negated_features", False)),
        )
        if spec.names != list(data.get("names", [])):
            raise RevisitError("the model's feature names do not match its vocabulary file")
        return spec
