"""The synthetic 13-site ER encounter cohort: shape, site differences, determinism, CSV."""

from __future__ import annotations

import csv
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from plugin.concepts import default_lexicon
from plugin.revisit import (
    COLUMNS,
    CohortFileError,
    SyntheticEncounter,
    make_sites,
    read_cohort_csv,
    revisit_rates,
    synth_annotated_cohort,
    synth_cohort,
    write_cohort_csv,
)
from plugin.revisit.cohort import GENERATOR_PHRASES


@pytest.fixture(scope="module")
def cohort() -> list[SyntheticEncounter]:
    return synth_annotated_cohort(seed=0)


def test_cohort_has_the_papers_shape(cohort: list[SyntheticEncounter]) -> None:
    rows = [e.row for e in cohort]

    assert len(rows) == 3210
    assert len({r["site"] for r in rows}) == 13
    assert len({r["encounter_id"] for r in rows}) == 3210
    assert all(tuple(r) == COLUMNS for r in rows)
    assert {r["revisit_7d"] for r in rows} == {0, 1}
    assert all(datetime.fromisoformat(r["discharge_time"]).tzinfo is not None for r in rows)


def test_revisit_rates_vary_by_site_within_a_few_percent_to_about_15(
    cohort: list[SyntheticEncounter],
) -> None:
    rates = revisit_rates(e.row for e in cohort)
    overall = sum(e.row["revisit_7d"] for e in cohort) / len(cohort)

    assert all(0.015 <= r <= 0.2 for r in rates.values()), rates
    assert min(rates.values()) < 0.05 and max(rates.values()) > 0.12
    assert 0.05 <= overall <= 0.13


def test_site_sizes_are_unequal_and_add_up() -> None:
    sites = make_sites(seed=0, n_sites=13, n_encounters=3210)

    sizes = [s.n_encounters for s in sites]
    assert sum(sizes) == 3210
    assert max(sizes) > 2 * min(sizes)


def test_sites_document_and_weigh_risk_differently() -> None:
    sites = make_sites(seed=0, n_sites=13, n_encounters=3210)

    assert len({s.header_style for s in sites}) > 1
    assert len({s.negation_style for s in sites}) > 1
    # Each site prefers its own word for shortness of breath ...
    favourites = {max(range(5), key=lambda i: s.phrase_weights["PC0005"][i]) for s in sites}
    assert len(favourites) >= 3
    # ... and hypoxia drives revisits several times more strongly at some sites than at others.
    strengths = [s.risk_strength["hypoxia"] for s in sites]
    assert max(strengths) / min(strengths) > 2.0


def test_revisits_follow_the_risk_concepts(cohort: list[SyntheticEncounter]) -> None:
    def rate(group: list[SyntheticEncounter]) -> float:
        return sum(e.row["revisit_7d"] for e in group) / len(group)

    def is_hypoxic(e: SyntheticEncounter) -> bool:
        return any(g.code == "PC0063" for g in e.gold)

    hypoxic = [e for e in cohort if is_hypoxic(e)]
    others = [e for e in cohort if not is_hypoxic(e)]

    assert len(hypoxic) > 100
    assert rate(hypoxic) > 2 * rate(others)


def test_notes_carry_negation_uncertainty_history_and_family(
    cohort: list[SyntheticEncounter],
) -> None:
    flags = Counter(
        flag
        for e in cohort[:300]
        for g in e.gold
        for flag in ("negated", "uncertain", "hypothetical", "historical", "family")
        if getattr(g, flag)
    )

    assert all(
        flags[f] > 20 for f in ("negated", "uncertain", "hypothetical", "historical", "family")
    ), flags
    assert all(e.row["note_text"][g.start : g.end] for e in cohort[:50] for g in e.gold)


def test_generator_phrases_are_lexicon_phrases_of_their_concept() -> None:
    lexicon = default_lexicon()

    for code, phrases in GENERATOR_PHRASES.items():
        for phrase in phrases:
            assert lexicon.by_phrase(phrase).code == code, phrase


def test_same_seed_same_cohort_other_seed_other_cohort() -> None:
    first = synth_cohort(seed=5, n_sites=4, n_encounters=400)

    assert synth_cohort(seed=5, n_sites=4, n_encounters=400) == first
    assert synth_cohort(seed=6, n_sites=4, n_encounters=400) != first


def test_too_few_encounters_per_site_is_refused() -> None:
    with pytest.raises(ValueError, match="per site"):
        synth_cohort(n_sites=13, n_encounters=500)


def test_csv_round_trip_keeps_multiline_notes(tmp_path: Path) -> None:
    rows = synth_cohort(seed=1, n_sites=2, n_encounters=160)
    path = tmp_path / "encounters.csv"

    assert write_cohort_csv(path, rows) == 160
    loaded = read_cohort_csv(path)

    assert loaded == rows
    assert "\n" in loaded[0]["note_text"]
    assert [p.name for p in tmp_path.iterdir()] == ["encounters.csv"]


def test_csv_with_a_missing_column_or_bad_label_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("encounter_id,site,note_text\nE1,ER01,cough\n")
    with pytest.raises(CohortFileError, match="discharge_time, revisit_7d"):
        read_cohort_csv(path)

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerow(["E1", "ER01", "2020-04-01T10:00:00+00:00", "cough", "yes"])
    with pytest.raises(CohortFileError, match="line 2: revisit_7d"):
        read_cohort_csv(path)
