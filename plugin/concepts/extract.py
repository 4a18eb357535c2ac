"""Clinical concept extraction from ER notes and radiology reports with medspacy.

The pipeline is rule-based and runs offline: medspacy's tokenizer, a sentence splitter (PyRuSH by
default), the sectionizer with the project's headers, the target matcher with the lexicon's
phrases and patterns, and ConText (medspacy's default rules edited by the project) for negation,
uncertainty, hypothetical statements, history and family experiencer.

Building the pipeline costs about a second (after a multi-second import of medspacy), so a process
builds one ``ConceptExtractor`` and keeps it; the extractor holds no per-document state, so one
instance serves any number of documents in sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from plugin.concepts.lexicon import (
    FAMILY_SECTIONS,
    HISTORICAL_SECTIONS,
    HYPOTHETICAL_SECTIONS,
    REMOVED_DEFAULT_CONTEXT_LITERALS,
    SECTION_HEADERS,
    Category,
    Lexicon,
    default_lexicon,
    project_assertion_rules,
)
from plugin.errors import PacsclipError

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Span

logger = logging.getLogger(__name__)

SentenceSplitter = Literal["pyrush", "punctuation"]

_TARGET_MATCHER = "medspacy_target_matcher"
_CONTEXT = "medspacy_context"
_SECTIONIZER = "medspacy_sectionizer"


class ExtractionUnavailable(PacsclipError):
    """medspacy (an optional dependency) is not installed in this environment."""


@dataclass(frozen=True)
class Mention:
    """One concept mention in a document, with its assertion status and section.

    ``start``/``end`` are character offsets into the text given to ``extract``. ``uncertain`` is
    "possible" (ConText POSSIBLE_EXISTENCE); ``hypothetical`` is advice or a conditional ("return if
    short of breath"); ``family`` means the experiencer is a relative or household member.
    """

    code: str
    name: str
    category: Category | None
    text: str
    start: int
    end: int
    section: str | None
    negated: bool = False
    uncertain: bool = False
    hypothetical: bool = False
    historical: bool = False
    family: bool = False

    @property
    def affirmed(self) -> bool:
        return not self.negated


@dataclass(frozen=True)
class FeaturePolicy:
    """Which mentions count as a concept being present in a document, for features.

    The default keeps affirmed mentions about the patient that are not hypothetical; possible
    findings count (a clinician writing "possible pneumonia" is a signal); historical mentions
    count only for comorbidities and risk factors (a history of asthma is a current risk, a past
    fever is not). With ``negated_features`` a negated mention adds ``NEG:<code>``.
    """

    include_uncertain: bool = True
    include_hypothetical: bool = False
    include_family: bool = False
    historical_categories: frozenset[Category] = frozenset(
        {Category.COMORBIDITY, Category.RISK_FACTOR}
    )
    negated_features: bool = False
    negated_prefix: str = "NEG:"


DEFAULT_POLICY = FeaturePolicy()


def feature_code(mention: Mention, policy: FeaturePolicy = DEFAULT_POLICY) -> str | None:
    """The feature a mention contributes under ``policy``, or None if it contributes none."""
    if mention.family and not policy.include_family:
        return None
    if mention.hypothetical and not policy.include_hypothetical:
        return None
    if mention.uncertain and not policy.include_uncertain:
        return None
    if mention.historical and mention.category not in policy.historical_categories:
        return None
    if mention.negated:
        return f"{policy.negated_prefix}{mention.code}" if policy.negated_features else None
    return mention.code


def mention_codes(mentions: Iterable[Mention], policy: FeaturePolicy = DEFAULT_POLICY) -> list[str]:
    """One feature code per counted mention, repeats kept (for count vectors)."""
    codes = (feature_code(m, policy) for m in mentions)
    return [c for c in codes if c is not None]


def document_concepts(
    mentions: Iterable[Mention], policy: FeaturePolicy = DEFAULT_POLICY
) -> frozenset[str]:
    """The set of feature codes present in one document under ``policy``."""
    return frozenset(mention_codes(mentions, policy))


@dataclass(frozen=True)
class LinkedSpan:
    """A concept a ``Linker`` found: character offsets, an identifier such as ``UMLS:C0015967``."""

    start: int
    end: int
    code: str
    name: str


class Linker(Protocol):
    """A site-supplied concept linker (for example over licensed UMLS files).

    ``link`` returns spans of ``text``; the extractor adds them to the lexicon's matches before
    ConText runs, so linked concepts get the same negation, uncertainty, history and family
    assertions. Where a linked span overlaps a lexicon match, the longer span is kept and the
    lexicon's wins a tie.
    """

    def link(self, text: str) -> Sequence[LinkedSpan]: ...


class ConceptExtractor:
    """Finds lexicon concepts in text with their assertion status and section.

    Build one per process: the constructor imports medspacy and compiles every phrase, pattern
    and rule (about a second after the import). ``sentence_splitter="pyrush"`` uses medspacy's
    clinical sentence splitter (accurate on notes without punctuation, but pure Python: about
    50 us per character); ``"punctuation"`` uses spaCy's rule-based splitter plus line breaks,
    which is two orders of magnitude faster and adequate for notes that punctuate sentences.
    """

    def __init__(
        self,
        lexicon: Lexicon | None = None,
        *,
        linker: Linker | None = None,
        sentence_splitter: SentenceSplitter = "pyrush",
    ) -> None:
        self.lexicon = lexicon if lexicon is not None else default_lexicon()
        self._linker = linker
        self._nlp = _build_pipeline(self.lexicon, sentence_splitter)
        logger.info(
            "concept extractor built: %d concepts, splitter=%s, linker=%s",
            len(self.lexicon),
            sentence_splitter,
            type(linker).__name__ if linker is not None else None,
        )

    def extract(self, text: str) -> list[Mention]:
        """All concept mentions in ``text``, in order of position."""
        doc, linked_names = self._process(text)
        return [self._mention(ent, linked_names) for ent in doc.ents]

    def extract_many(self, texts: Iterable[str]) -> list[list[Mention]]:
        return [self.extract(text) for text in texts]

    def _process(self, text: str) -> tuple[Doc, dict[str, str]]:
        doc = self._nlp.make_doc(text)
        linked_names: dict[str, str] = {}
        for name, component in self._nlp.pipeline:
            doc = component(doc)
            if name == _TARGET_MATCHER and self._linker is not None:
                linked_names = _add_linked_spans(doc, self._linker.link(text))
        return doc, linked_names

    def _mention(self, ent: Span, linked_names: dict[str, str]) -> Mention:
        code = ent.label_
        if code in self.lexicon:
            concept = self.lexicon.get(code)
            name, category = concept.name, concept.category
        else:
            name, category = linked_names.get(code, code), None
        section = ent._.section_category
        return Mention(
            code=code,
            name=name,
            category=category,
            text=ent.text,
            start=ent.start_char,
            end=ent.end_char,
            section=section,
            negated=bool(ent._.is_negated),
            uncertain=bool(ent._.is_uncertain),
            hypothetical=bool(ent._.is_hypothetical) or section in HYPOTHETICAL_SECTIONS,
            historical=bool(ent._.is_historical) or section in HISTORICAL_SECTIONS,
            family=bool(ent._.is_family) or section in FAMILY_SECTIONS,
        )


def _add_linked_spans(doc: Doc, linked: Sequence[LinkedSpan]) -> dict[str, str]:
    from spacy.util import filter_spans

    names: dict[str, str] = {}
    spans = list(doc.ents)
    for item in linked:
        span = doc.char_span(item.start, item.end, label=item.code, alignment_mode="expand")
        if span is None:
            logger.warning(
                "linker span %d-%d is outside the document; ignored", item.start, item.end
            )
            continue
        spans.append(span)
        names[item.code] = item.name
    # filter_spans keeps the longest span, and the first listed (the lexicon's) on a tie.
    doc.ents = filter_spans(spans)
    return names


def _import_medspacy() -> Any:
    try:
        import medspacy  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ExtractionUnavailable(
            "concept extraction needs medspacy; see docs/concepts.md for the install step"
        ) from exc
    # PyRuSH logs every sentence boundary, with the note's words, through loguru at DEBUG: that
    # is patient text in the logs, and slow. Silence that library's loguru records only.
    from loguru import logger as loguru_logger

    loguru_logger.disable("PyRuSH")
    return medspacy


def _build_pipeline(lexicon: Lexicon, sentence_splitter: SentenceSplitter) -> Language:
    medspacy = _import_medspacy()
    if sentence_splitter == "pyrush":
        nlp = medspacy.load(medspacy_enable=["medspacy_tokenizer", "medspacy_pyrush"])
    else:
        nlp = medspacy.load(medspacy_enable=["medspacy_tokenizer"])
        # Line breaks end sentences too: list-style notes often have no full stops.
        punct = [".", "!", "?", "\n", "\n\n", "\n\n\n"]
        nlp.add_pipe("sentencizer", config={"punct_chars": punct})
    # Headers become their own sentence, so a header's words never share a ConText scope with
    # the findings after it ("IMPRESSION: No pneumothorax").
    nlp.add_pipe(
        _SECTIONIZER,
        config={"rules": None, "span_attrs": None, "apply_sentence_boundary": True},
    )
    nlp.get_pipe(_SECTIONIZER).add(_section_rules(nlp))
    nlp.add_pipe(_TARGET_MATCHER)
    nlp.get_pipe(_TARGET_MATCHER).add(_target_rules(lexicon, nlp))
    nlp.add_pipe(_CONTEXT, config={"rules": None})
    context = nlp.get_pipe(_CONTEXT)
    context.add(_context_rules(context.DEFAULT_RULES_FILEPATH))
    return nlp  # type: ignore[no-any-return]


def _section_rules(nlp: Language) -> list[Any]:
    from medspacy.section_detection import SectionRule  # type: ignore[import-untyped]

    # Token patterns rather than phrases: the same tokenization as the note, whatever the case,
    # and the sectionizer's token matcher is not left empty (spaCy warns on every document).
    return [
        SectionRule(
            category=category,
            literal=header,
            pattern=[{"LOWER": t.lower_} for t in nlp.make_doc(header)],
        )
        for category, header in SECTION_HEADERS
    ]


def _target_rules(lexicon: Lexicon, nlp: Language) -> list[Any]:
    from medspacy.target_matcher import TargetRule  # type: ignore[import-untyped]

    rules: list[Any] = []
    for concept in lexicon:
        # The rule's category becomes the span label: the project code, resolved in _mention.
        rules.extend(
            TargetRule(literal=p, category=concept.code, pattern=_token_pattern(nlp, p))
            for p in concept.phrases
        )
        rules.extend(
            TargetRule(literal=f"{concept.name} pattern {i}", category=concept.code, pattern=rx)
            for i, rx in enumerate(concept.regexes)
        )
    return rules


def _token_pattern(nlp: Language, phrase: str) -> list[dict[str, str]] | None:
    """A LOWER token pattern where the phrase matcher would miss the phrase, else None.

    medspacy's phrase rules tokenize the lower-cased phrase, and the tokenizer splits some
    words differently by case ("T2DM" is one token, "t2dm" two), so such phrases never match.
    """
    tokens = [t.lower_ for t in nlp.make_doc(phrase)]
    if tokens == [t.text for t in nlp.make_doc(phrase.lower())]:
        return None
    return [{"LOWER": token} for token in tokens]


def _context_rules(default_rules_path: str) -> list[Any]:
    from medspacy.context import ConTextRule  # type: ignore[import-untyped]

    defaults = [
        rule
        for rule in ConTextRule.from_json(default_rules_path)
        if rule.literal.lower() not in REMOVED_DEFAULT_CONTEXT_LITERALS
    ]
    project = [
        ConTextRule(
            literal=rule.literal,
            category=rule.category,
            direction=rule.direction,
            pattern=[dict(token) for token in rule.pattern] if rule.pattern else None,
            excluded_types=set(rule.excluded_codes) or None,
        )
        for rule in project_assertion_rules()
    ]
    return defaults + project
