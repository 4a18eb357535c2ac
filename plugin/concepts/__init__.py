"""Clinical concepts from ER notes and radiology reports: lexicon, extraction, feature vectors.

``ConceptExtractor`` needs medspacy (imported when an extractor is built, not on import of this
package), so the lexicon and the vocabulary are usable without it.
"""

from plugin.concepts.extract import (
    DEFAULT_POLICY,
    ConceptExtractor,
    ExtractionUnavailable,
    FeaturePolicy,
    LinkedSpan,
    Linker,
    Mention,
    document_concepts,
    feature_code,
    mention_codes,
)
from plugin.concepts.lexicon import Category, Concept, Lexicon, LexiconError, default_lexicon
from plugin.concepts.vectorize import DEFAULT_K, ConceptVocabulary, VocabularyFileError

__all__ = [
    "DEFAULT_K",
    "DEFAULT_POLICY",
    "Category",
    "Concept",
    "ConceptExtractor",
    "ConceptVocabulary",
    "ExtractionUnavailable",
    "FeaturePolicy",
    "Lexicon",
    "LexiconError",
    "LinkedSpan",
    "Linker",
    "Mention",
    "VocabularyFileError",
    "default_lexicon",
    "document_concepts",
    "feature_code",
    "mention_codes",
]
