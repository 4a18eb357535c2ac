"""Concept lexicon, extraction (medspacy), feature policy and the top-K vocabulary."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from plugin.concepts import (
    Category,
    Concept,
    ConceptExtractor,
    ConceptVocabulary,
    FeaturePolicy,
    Lexicon,
    LexiconError,
    LinkedSpan,
    Mention,
    VocabularyFileError,
    default_lexicon,
    document_concepts,
    mention_codes,
)
from plugin.concepts.lexicon import SECTION_HEADERS, snomed_id_is_well_formed
from plugin.revisit.cohort import GoldMention, synth_annotated_cohort

# --- lexicon ------------------------------------------------------------------------------------


def test_lexicon_has_the_planned_breadth() -> None:
    lexicon = default_lexicon()

    assert len(lexicon) >= 150
    assert {c.category for c in lexicon} == set(Category)
    assert all(re.fullmatch(r"PC\d{4}", c.code) for c in lexicon)


def test_every_code_identifier_is_well_formed() -> None:
    lexicon = default_lexicon()

    snomed = [c.snomed_ct for c in lexicon if c.snomed_ct is not None]
    radlex = [c.radlex for c in lexicon if c.radlex is not None]
    assert len(snomed) > 80
    assert all(snomed_id_is_well_formed(s) for s in snomed)
    assert all(re.fullmatch(r"RID\d+", r) for r in radlex)


def test_snomed_check_digit_catches_a_typo() -> None:
    assert snomed_id_is_well_formed("386661006")  # fever
    assert not snomed_id_is_well_formed("386661007")
    assert not snomed_id_is_well_formed("386661016")  # description partition, not a concept


def test_lexicon_rejects_a_phrase_claimed_by_two_concepts() -> None:
    a = Concept("PC9001", "cough", Category.SYMPTOM, ("tussis",))
    b = Concept("PC9002", "wet cough", Category.SYMPTOM, ("Tussis",))

    with pytest.raises(LexiconError, match=r"(?i)tussis"):
        Lexicon((a, b))


def test_lexicon_rejects_duplicate_codes() -> None:
    a = Concept("PC9001", "cough", Category.SYMPTOM, ())
    with pytest.raises(LexiconError, match="PC9001"):
        Lexicon((a, Concept("PC9001", "fever", Category.SYMPTOM, ())))


def test_lookup_by_phrase_is_case_insensitive() -> None:
    lexicon = default_lexicon()

    assert lexicon.by_phrase("sob").code == "PC0005"
    assert lexicon.get("PC0207").name == "pneumothorax"


# --- extraction ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor() -> ConceptExtractor:
    pytest.importorskip("medspacy", reason="medspacy is not installed (docs/concepts.md)")
    return ConceptExtractor()


def _one(extractor: ConceptExtractor, text: str, code: str) -> Mention:
    found = [m for m in extractor.extract(text) if m.code == code]
    assert len(found) == 1, (text, extractor.extract(text))
    return found[0]


def _status(m: Mention | GoldMention) -> str:
    flags = [
        ("N", m.negated),
        ("U", m.uncertain),
        ("Y", m.hypothetical),
        ("H", m.historical),
        ("F", m.family),
    ]
    return "".join(letter for letter, on in flags if on)


@pytest.mark.parametrize(
    ("text", "code", "status"),
    [
        ("No pneumothorax.", "PC0207", "N"),
        ("IMPRESSION: No pneumothorax.", "PC0207", "N"),
        ("Pneumothorax has resolved.", "PC0207", "N"),
        ("Pneumothorax is not seen.", "PC0207", "N"),
        ("Small left pneumothorax.", "PC0207", ""),
        ("Cannot rule out pneumonia.", "PC0143", "U"),
        ("Possible small left pleural effusion.", "PC0205", "U"),
        ("CXR to evaluate for pneumonia.", "PC0143", "U"),
        ("Mother has diabetes.", "PC0082", "F"),
        ("Diabetes in his mother.", "PC0082", "F"),
        ("History of asthma.", "PC0086", "H"),
        ("Return to the ED for worsening shortness of breath.", "PC0005", "Y"),
        ("Per his wife, he has had fevers.", "PC0001", ""),
        ("Exposure to his COVID-positive wife.", "PC0125", ""),
    ],
)
def test_assertion_status(extractor: ConceptExtractor, text: str, code: str, status: str) -> None:
    assert _status(_one(extractor, text, code)) == status


def test_denial_covers_a_list_and_stops_at_an_affirming_cue(extractor: ConceptExtractor) -> None:
    mentions = extractor.extract("Denies fever, chills or chest pain, reports dry cough.")

    by_code = {m.code: m for m in mentions}
    assert [by_code[c].negated for c in ("PC0001", "PC0002", "PC0022")] == [True, True, True]
    assert by_code["PC0003"].negated is False
    assert by_code["PC0003"].text == "dry cough"


def test_measured_vitals_become_findings(extractor: ConceptExtractor) -> None:
    text = "Vitals: T 38.6 C, HR 112, RR 24, BP 84/52, SpO2 89% on room air."

    found = {m.code: m.text for m in extractor.extract(text)}

    assert found == {
        "PC0061": "T 38.6 C",
        "PC0064": "HR 112",
        "PC0065": "RR 24",
        "PC0066": "BP 84/52",
        "PC0063": "SpO2 89%",
    }
    assert extractor.extract("Vitals: T 37.0 C, HR 80, RR 16, BP 120/80, SpO2 97%.") == []


NOTE = (
    "Chief Complaint: cough.\n"
    "HPI: 70-year-old man presents with cough. Denies chest pain.\n"
    "PMH: COPD.\n"
    "Family History: diabetes.\n"
    "Assessment/Plan: possible pneumonia.\n"
    "Impression: no pleural effusion.\n"
)


def test_sections_and_section_implied_status(extractor: ConceptExtractor) -> None:
    mentions = extractor.extract(NOTE)

    rows = [(m.text, m.section, _status(m)) for m in mentions]
    assert rows == [
        ("cough", "chief_complaint", ""),
        ("70-year-old", "history_of_present_illness", ""),
        ("cough", "history_of_present_illness", ""),
        ("chest pain", "history_of_present_illness", "N"),
        ("COPD", "past_medical_history", "H"),
        ("diabetes", "family_history", "F"),
        ("pneumonia", "assessment_and_plan", "U"),
        ("pleural effusion", "impression", "N"),
    ]
    assert all(NOTE[m.start : m.end] == m.text for m in mentions)


def test_every_section_header_is_recognised(extractor: ConceptExtractor) -> None:
    for category, header in SECTION_HEADERS:
        mention = _one(extractor, f"{header.title()} cough.", "PC0003")
        assert mention.section == category, header


def test_extractor_finds_what_the_cohort_generator_wrote(extractor: ConceptExtractor) -> None:
    encounters = synth_annotated_cohort(seed=3, n_sites=2, n_encounters=160)[::20]

    for encounter in encounters:
        text = encounter.row["note_text"]
        predicted = {(m.code, m.start, m.end, _status(m)) for m in extractor.extract(text)}
        gold = {(g.code, g.start, g.end, _status(g)) for g in encounter.gold}
        assert predicted == gold, text


class _DictLinker:
    """A stand-in for a site's linker: exact phrases to identifiers."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    def link(self, text: str) -> Sequence[LinkedSpan]:
        spans = []
        for phrase, code in self.table.items():
            for match in re.finditer(re.escape(phrase), text, flags=re.IGNORECASE):
                spans.append(LinkedSpan(match.start(), match.end(), code, phrase))
        return spans


def test_linked_concepts_get_context_and_lexicon_wins_ties() -> None:
    pytest.importorskip("medspacy", reason="medspacy is not installed (docs/concepts.md)")
    linker = _DictLinker({"brain fog": "UMLS:C1", "cough": "UMLS:C2"})
    extractor = ConceptExtractor(linker=linker, sentence_splitter="punctuation")

    mentions = extractor.extract("No brain fog. Has cough.")

    assert [(m.code, m.name, m.negated, m.category) for m in mentions] == [
        ("UMLS:C1", "brain fog", True, None),
        ("PC0003", "cough", False, Category.SYMPTOM),
    ]


# --- feature policy -----------------------------------------------------------------------------


def _m(code: str, category: Category, **flags: bool) -> Mention:
    return Mention(code, code, category, code, 0, 1, None, **flags)


MENTIONS = [
    _m("PC0003", Category.SYMPTOM),
    _m("PC0003", Category.SYMPTOM),
    _m("PC0022", Category.SYMPTOM, negated=True),
    _m("PC0143", Category.DIAGNOSIS, uncertain=True),
    _m("PC0085", Category.COMORBIDITY, historical=True),
    _m("PC0001", Category.SYMPTOM, historical=True),
    _m("PC0082", Category.COMORBIDITY, family=True),
    _m("PC0005", Category.SYMPTOM, hypothetical=True),
]


def test_default_policy_keeps_affirmed_patient_concepts() -> None:
    assert document_concepts(MENTIONS) == {"PC0003", "PC0143", "PC0085"}
    assert mention_codes(MENTIONS).count("PC0003") == 2


def test_policy_options() -> None:
    negated = FeaturePolicy(negated_features=True)
    strict = FeaturePolicy(include_uncertain=False, historical_categories=frozenset())
    everyone = FeaturePolicy(include_family=True, include_hypothetical=True)

    assert "NEG:PC0022" in document_concepts(MENTIONS, negated)
    assert document_concepts(MENTIONS, strict) == {"PC0003"}
    assert {"PC0082", "PC0005"} <= document_concepts(MENTIONS, everyone)


# --- vocabulary ---------------------------------------------------------------------------------

DOCS = [["b", "a", "a"], ["a", "c"], ["c", "b"], ["d"], ["a"]]


def test_vocabulary_ranks_by_document_frequency_then_code() -> None:
    vocab = ConceptVocabulary.fit(DOCS, k=3)

    assert vocab.codes == ("a", "b", "c")  # a in 3 documents; b and c in 2, tie broken by code
    assert vocab.document_frequency == (3, 2, 2)
    assert ConceptVocabulary.fit(list(reversed(DOCS)), k=3).codes == vocab.codes


def test_vocabulary_width_is_at_most_k() -> None:
    assert len(ConceptVocabulary.fit(DOCS)) == 4  # default k=1001 > distinct codes
    assert ConceptVocabulary.fit(DOCS, k=1).codes == ("a",)
    with pytest.raises(ValueError, match="k must be"):
        ConceptVocabulary.fit(DOCS, k=0)


def test_transform_binary_and_counts() -> None:
    vocab = ConceptVocabulary.fit(DOCS, k=3)

    binary = vocab.transform([["a", "a", "zzz"], [], ["c"]])
    counts = vocab.transform([["a", "a", "zzz"]], counts=True)

    assert binary.shape == (3, 3) and binary.dtype == np.float32
    np.testing.assert_array_equal(binary, [[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(counts, [[2, 0, 0]])


def test_vocabulary_round_trips_through_json(tmp_path: Path) -> None:
    vocab = ConceptVocabulary.fit(DOCS, k=3)
    path = tmp_path / "vocab.json"

    vocab.save(path)
    loaded = ConceptVocabulary.load(path)

    assert (loaded.codes, loaded.document_frequency, loaded.k) == (
        vocab.codes,
        vocab.document_frequency,
        3,
    )
    assert loaded.n_documents == 5
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]


def test_loading_a_foreign_file_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else", "version": 1}))

    with pytest.raises(VocabularyFileError, match=r"not a pacsclip\.concept-vocabulary"):
        ConceptVocabulary.load(path)
    with pytest.raises(VocabularyFileError, match="cannot read"):
        ConceptVocabulary.load(tmp_path / "missing.json")
