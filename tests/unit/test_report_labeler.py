"""Report labels per finding under the CheXpert conventions, on the medspacy pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.errors import ConfigError
from plugin.validation.report_labeler import ReportLabeler, ReportRefused
from plugin.validation.vocabulary import build_vocabulary, default_vocabulary, read_vocabulary_file

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")


@pytest.fixture(scope="module")
def labeler() -> ReportLabeler:
    return ReportLabeler(default_vocabulary())


CASES = [
    # negation, lists
    (
        "No focal consolidation, effusion, or pneumothorax.",
        {"consolidation": "absent", "pleural_effusion": "absent", "pneumothorax": "absent"},
    ),
    ("Negative for pneumothorax.", {"pneumothorax": "absent"}),
    ("Pneumothorax is not seen.", {"pneumothorax": "absent"}),
    ("Effusion is absent.", {"pleural_effusion": "absent"}),
    # uncertainty
    (
        "Left basilar opacity may represent atelectasis versus pneumonia.",
        {"atelectasis": "uncertain", "consolidation": "uncertain"},
    ),
    ("Cannot exclude a small apical pneumothorax.", {"pneumothorax": "uncertain"}),
    ("Possible small right effusion.", {"pleural_effusion": "uncertain"}),
    ("Suspected right lower lobe pneumonia.", {"consolidation": "uncertain"}),
    ("The heart may be mildly enlarged.", {"cardiomegaly": "uncertain"}),
    # resolution and removal
    ("The right pneumothorax has resolved.", {"pneumothorax": "absent"}),
    ("Interval resolution of the left effusion.", {"pleural_effusion": "absent"}),
    ("Resolved left lower lobe pneumonia.", {"consolidation": "absent"}),
    ("The effusion is no longer visualized.", {"pleural_effusion": "absent"}),
    ("Interval removal of the endotracheal tube.", {"support_devices": "absent"}),
    # indication / history sections are not findings
    (
        "History: rule out pneumothorax.\nFindings: Small left pleural effusion.",
        {"pneumothorax": None, "pleural_effusion": "present"},
    ),
    ("INDICATION: Evaluate for pneumonia.\nIMPRESSION: Clear lungs.", {"consolidation": "absent"}),
    # synonyms
    ("Enlarged cardiac silhouette.", {"cardiomegaly": "present"}),
    ("Airspace opacity in the right lower lobe.", {"consolidation": "present"}),
    ("Calcified granuloma in the left upper lobe.", {"nodule": "present"}),
    ("Right PICC terminates in the SVC. Pacemaker leads in place.", {"support_devices": "present"}),
    ("Mild interstitial oedema.", {"pulmonary_edema": "present"}),
    # normal statements
    (
        "Heart size is normal. The lungs are clear. Costophrenic angles are sharp.",
        {"cardiomegaly": "absent", "consolidation": "absent", "pleural_effusion": "absent"},
    ),
    ("The heart is not enlarged.", {"cardiomegaly": "absent"}),
    # "no change" reports the finding
    (
        "No significant interval change in the left basilar consolidation.",
        {"consolidation": "present"},
    ),
    # present beats uncertain beats absent
    ("No right effusion. Small left effusion.", {"pleural_effusion": "present"}),
    ("No acute cardiopulmonary process.", {"consolidation": None, "pneumothorax": None}),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_labels_follow_the_chexpert_conventions(
    labeler: ReportLabeler, text: str, expected: dict[str, str | None]
) -> None:
    labels = labeler.label(text).as_json()

    assert {name: labels[name] for name in expected} == expected


def test_every_finding_of_the_vocabulary_gets_an_answer(labeler: ReportLabeler) -> None:
    labels = labeler.label("Small left pleural effusion.").as_json()

    assert set(labels) == set(default_vocabulary().names)
    assert [k for k, v in labels.items() if v is not None] == ["pleural_effusion"]


@pytest.mark.parametrize("text", ["", "   \n", "12345 ...", 42, "text\x00with nul"])
def test_empty_or_non_text_reports_are_refused_with_a_reason(
    labeler: ReportLabeler, text: object
) -> None:
    with pytest.raises(ReportRefused, match=r"empty|text|NUL"):
        labeler.label(text)  # type: ignore[arg-type]


def test_a_site_file_adds_words_and_findings_and_changes_the_version(tmp_path: Path) -> None:
    site_file = tmp_path / "vocabulary.yaml"
    site_file.write_text(
        "consolidation:\n  terms: [bronchopneumonic change]\n"
        "rib_fracture:\n  terms: [rib fracture, fractured rib]\n"
    )
    extra = read_vocabulary_file(site_file)
    vocabulary = build_vocabulary(None, extra)
    site = ReportLabeler(vocabulary)

    labels = site.label("Bronchopneumonic change at the left base. No rib fracture.").as_json()

    assert labels["consolidation"] == "present"
    assert labels["rib_fracture"] == "absent"
    assert site.version != ReportLabeler(default_vocabulary()).version


def test_a_bad_site_file_says_what_to_fix(tmp_path: Path) -> None:
    site_file = tmp_path / "vocabulary.yaml"
    site_file.write_text("consolidation:\n  words: [x]\n")

    with pytest.raises(ConfigError, match="'terms', 'patterns' and/or 'normal'"):
        read_vocabulary_file(site_file)


def test_a_finding_without_words_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no report terms"):
        build_vocabulary(["consolidation", "enlarged_spleen"], None)
