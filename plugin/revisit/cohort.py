"""A synthetic multi-site COVID-19 ER encounter cohort with the shape of Ji et al. (ICHI 2023).

3,210 discharged ER encounters from 13 sites by default, each with a templated ER note (sections,
negations, possible findings, past and family history, return precautions) and a 7-day revisit
label. Sites differ the way real ERs do: size, case mix (age, comorbidity and symptom prevalence,
severity), documentation habits (section headers, how negatives and vitals are written, which
synonym of a concept clinicians use), imaging and lab ordering, and how strongly each risk factor
drives revisits, so a model trained on some sites does not transfer to another for free.

Nothing here is clinical: the prevalences, weights and revisit rates are invented to give the
data a plausible shape, and figures computed on this cohort say nothing about patients.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypedDict

import numpy as np

from plugin.errors import PacsclipError

COLUMNS = ("encounter_id", "site", "discharge_time", "note_text", "revisit_7d")
DEFAULT_SITES = 13
DEFAULT_ENCOUNTERS = 3210
MIN_SITE_ENCOUNTERS = 80
REVISIT_RATE_RANGE = (0.03, 0.15)
_COHORT_START = datetime(2020, 3, 1, tzinfo=UTC)

Rng = np.random.Generator


class EncounterRow(TypedDict):
    """One row of an encounter export (the columns of ``COLUMNS``)."""

    encounter_id: str
    site: str
    discharge_time: str  # ISO 8601 with offset
    note_text: str
    revisit_7d: int  # 1 if the patient came back to an ER within 7 days of discharge


class CohortFileError(PacsclipError):
    """An encounter CSV is missing columns or has a malformed value."""


@dataclass(frozen=True)
class GoldMention:
    """Where the generator wrote a concept, and the assertion status it meant."""

    code: str
    start: int
    end: int
    section: str
    negated: bool = False
    uncertain: bool = False
    hypothetical: bool = False
    historical: bool = False
    family: bool = False


@dataclass(frozen=True)
class SyntheticEncounter:
    row: EncounterRow
    gold: tuple[GoldMention, ...]
    revisit_probability: float


# --- what each site's clinicians write --------------------------------------------------------
# Noun-phrase forms per concept code; every one is a phrase of that concept in the lexicon (a
# unit test holds this), so the site's word choice changes the text and never the concept.
GENERATOR_PHRASES: Mapping[str, tuple[str, ...]] = {
    "PC0001": ("fever", "fevers", "subjective fevers"),
    "PC0002": ("chills", "rigors"),
    "PC0003": ("cough", "dry cough", "nonproductive cough"),
    "PC0005": (
        "shortness of breath",
        "dyspnea",
        "SOB",
        "difficulty breathing",
        "trouble breathing",
    ),
    "PC0007": ("fatigue", "tiredness"),
    "PC0009": ("myalgias", "body aches", "muscle aches"),
    "PC0011": ("headache",),
    "PC0012": ("sore throat",),
    "PC0013": ("rhinorrhea", "runny nose"),
    "PC0015": ("loss of smell", "anosmia", "loss of sense of smell"),
    "PC0016": ("loss of taste", "ageusia"),
    "PC0017": ("nausea",),
    "PC0018": ("vomiting", "emesis"),
    "PC0019": ("diarrhea", "loose stools"),
    "PC0020": ("abdominal pain",),
    "PC0021": ("decreased appetite", "poor appetite"),
    "PC0022": ("chest pain", "chest discomfort"),
    "PC0024": ("palpitations",),
    "PC0025": ("dizziness", "lightheadedness"),
    "PC0026": ("syncope",),
    "PC0027": ("confusion",),
    "PC0029": ("hemoptysis",),
    "PC0041": ("crackles", "rales", "bibasilar crackles"),
    "PC0042": ("wheezing", "wheezes"),
    "PC0046": ("respiratory distress", "increased work of breathing"),
    "PC0047": ("lower extremity edema", "leg swelling"),
    "PC0081": ("hypertension", "HTN"),
    "PC0082": ("diabetes",),
    "PC0083": ("type 2 diabetes", "T2DM", "DM2"),
    "PC0085": ("COPD",),
    "PC0086": ("asthma",),
    "PC0087": ("CKD", "chronic kidney disease"),
    "PC0089": ("obesity",),
    "PC0090": ("CHF", "heart failure", "congestive heart failure"),
    "PC0091": ("CAD", "coronary artery disease"),
    "PC0092": ("MI", "heart attack"),
    "PC0093": ("atrial fibrillation", "afib"),
    "PC0094": ("hyperlipidemia", "HLD"),
    "PC0095": ("stroke",),
    "PC0097": ("dementia",),
    "PC0098": ("cancer", "malignancy"),
    "PC0100": ("immunosuppression",),
    "PC0103": ("OSA", "obstructive sleep apnea"),
    "PC0121": ("tobacco use", "smoking"),
    "PC0122": ("former smoker", "ex-smoker"),
    "PC0123": ("lives in a nursing home", "resides in a nursing home", "nursing home resident"),
    "PC0125": ("sick contacts", "COVID exposure", "exposure to COVID-19"),
    "PC0141": ("COVID-19", "COVID"),
    "PC0142": ("COVID-19 pneumonia", "COVID pneumonia"),
    "PC0143": ("multifocal pneumonia", "pneumonia"),
    "PC0145": ("bacterial superinfection", "bacterial pneumonia"),
    "PC0153": ("pulmonary embolism",),
    "PC0166": ("viral syndrome", "viral illness"),
    "PC0171": ("COVID-19 PCR positive", "positive SARS-CoV-2 PCR", "COVID positive"),
    "PC0172": ("COVID-19 PCR negative", "negative COVID test"),
    "PC0173": ("elevated D-dimer", "D-dimer elevated"),
    "PC0174": ("lymphopenia",),
    "PC0175": ("leukocytosis",),
    "PC0179": ("elevated CRP",),
    "PC0180": ("elevated ferritin",),
    "PC0182": ("elevated troponin",),
    "PC0185": ("elevated creatinine",),
    "PC0201": ("consolidation",),
    "PC0203": (
        "bilateral opacities",
        "multifocal opacities",
        "bilateral patchy opacities",
        "bilateral airspace opacities",
    ),
    "PC0204": ("ground-glass opacities", "GGOs", "ground glass opacities"),
    "PC0205": ("pleural effusion", "effusion"),
    "PC0206": ("cardiomegaly", "enlarged cardiac silhouette"),
    "PC0207": ("pneumothorax",),
    "PC0210": ("atelectasis", "bibasilar atelectasis"),
    "PC0226": ("no acute cardiopulmonary process", "no acute cardiopulmonary abnormality"),
    "PC0261": ("supplemental oxygen", "oxygen via nasal cannula"),
    "PC0267": ("dexamethasone", "Decadron"),
    "PC0282": ("azithromycin",),
    "PC0283": ("ceftriaxone",),
    "PC0285": ("acetaminophen", "Tylenol"),
    "PC0287": ("IV fluids", "fluid bolus"),
    "PC0288": ("albuterol",),
    "PC0291": ("benzonatate",),
    "PC0292": ("home oxygen", "home O2"),
    "PC0293": ("home pulse oximeter",),
    "PC0321": ("discharged home", "discharged to home"),
    "PC0325": ("left against medical advice", "left AMA"),
    "PC0328": ("discharged to SNF", "discharged to nursing home"),
    "PC0331": ("home isolation", "self-isolation", "home quarantine"),
    "PC0332": ("follow up with PCP", "follow-up with primary care"),
}

# Header text per site style; every header is one the extractor's sectionizer knows.
_HEADER_STYLES: tuple[Mapping[str, str], ...] = (
    {
        "chief_complaint": "Chief Complaint:",
        "history_of_present_illness": "History of Present Illness:",
        "past_medical_history": "Past Medical History:",
        "family_history": "Family History:",
        "social_history": "Social History:",
        "review_of_systems": "Review of Systems:",
        "vital_signs": "Vital Signs:",
        "physical_exam": "Physical Exam:",
        "labs": "Labs:",
        "imaging": "Imaging:",
        "ed_course": "ED Course:",
        "assessment_and_plan": "Assessment and Plan:",
        "disposition": "Disposition:",
        "discharge_instructions": "Discharge Instructions:",
    },
    {
        "chief_complaint": "CC:",
        "history_of_present_illness": "HPI:",
        "past_medical_history": "PMH:",
        "family_history": "FHx:",
        "social_history": "SHx:",
        "review_of_systems": "ROS:",
        "vital_signs": "Vitals:",
        "physical_exam": "Exam:",
        "labs": "Labs:",
        "imaging": "CXR:",
        "ed_course": "Course:",
        "assessment_and_plan": "A/P:",
        "disposition": "Dispo:",
        "discharge_instructions": "Discharge Instructions:",
    },
    {
        "chief_complaint": "Reason for visit:",
        "history_of_present_illness": "History of presenting illness:",
        "past_medical_history": "Medical History:",
        "family_history": "Family History:",
        "social_history": "Social History:",
        "review_of_systems": "Review of Systems:",
        "vital_signs": "Triage Vitals:",
        "physical_exam": "Physical Examination:",
        "labs": "Laboratory:",
        "imaging": "Radiology:",
        "ed_course": "Emergency Department Course:",
        "assessment_and_plan": "Medical Decision Making:",
        "disposition": "Disposition:",
        "discharge_instructions": "Patient Instructions:",
    },
)

# Latent patient features: base prevalence (adults seen in an ER with suspected COVID-19).
_SYMPTOM_PREVALENCE: Mapping[str, float] = {
    "PC0001": 0.60,
    "PC0003": 0.70,
    "PC0005": 0.40,
    "PC0007": 0.35,
    "PC0009": 0.35,
    "PC0002": 0.25,
    "PC0011": 0.25,
    "PC0012": 0.15,
    "PC0013": 0.10,
    "PC0015": 0.15,
    "PC0016": 0.12,
    "PC0017": 0.12,
    "PC0019": 0.12,
    "PC0021": 0.10,
    "PC0022": 0.15,
    "PC0025": 0.06,
    "PC0018": 0.06,
}
# Symptoms written as pertinent negatives when absent.
_NEGATIVE_POOL = (
    "PC0022",
    "PC0020",
    "PC0017",
    "PC0018",
    "PC0019",
    "PC0029",
    "PC0026",
    "PC0011",
    "PC0012",
    "PC0015",
    "PC0024",
    "PC0005",
    "PC0001",
)
_COMORBIDITY_PREVALENCE: Mapping[str, float] = {
    "PC0081": 0.33,
    "PC0083": 0.20,
    "PC0089": 0.22,
    "PC0094": 0.18,
    "PC0086": 0.09,
    "PC0085": 0.06,
    "PC0087": 0.06,
    "PC0090": 0.05,
    "PC0091": 0.07,
    "PC0093": 0.04,
    "PC0098": 0.04,
    "PC0100": 0.03,
    "PC0103": 0.05,
    "PC0097": 0.02,
}
# Comorbidities that add to the revisit risk ("burden").
_MAJOR_COMORBIDITIES = ("PC0083", "PC0085", "PC0087", "PC0090", "PC0098", "PC0100", "PC0097")
_FAMILY_CONDITIONS = ("PC0082", "PC0081", "PC0091", "PC0098", "PC0095", "PC0092")

# Revisit log-odds per unit of each risk feature, before the site's own strength factor.
BASE_RISK_WEIGHTS: Mapping[str, float] = {
    "hypoxia": 1.1,
    "age_65_or_older": 0.8,
    "nursing_home": 0.5,
    "comorbidity_burden": 0.45,
    "oxygen_need_unmet": 0.9,
    "left_ama": 1.2,
    "tachypnea": 0.5,
    "elevated_d_dimer": 0.4,
    "lymphopenia": 0.3,
    "dyspnea": 0.35,
    "home_pulse_oximetry": -0.5,
}


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic ER's population, documentation and revisit risk differ from others."""

    name: str
    n_encounters: int
    target_revisit_rate: float
    age_mean: float
    severity_shift: float
    symptom_factor: Mapping[str, float]
    comorbidity_factor: Mapping[str, float]
    risk_strength: Mapping[str, float]
    phrase_weights: Mapping[str, tuple[float, ...]]
    header_style: int
    negation_style: int  # 0 "Denies x.", 1 "No x.", 2 "Negative for x.", 3 "X: no."
    numeric_vitals: bool
    documents_negatives: float
    imaging_rate: float
    labs_rate: float
    uses_elderly: bool  # writes "elderly" for patients >= 75

    def phrase(self, code: str, rng: Rng) -> str:
        options = GENERATOR_PHRASES[code]
        if len(options) == 1:
            return options[0]
        # Inverse-CDF draw: rng.choice with p= costs ~20 us a call, this a tenth of that.
        u, acc = rng.random(), 0.0
        for option, weight in zip(options, self.phrase_weights[code], strict=True):
            acc += weight
            if u < acc:
                return option
        return options[-1]


@dataclass
class _Patient:
    age: int
    female: bool
    nursing_home: bool
    symptoms: list[str]
    comorbidities: list[str]
    family_conditions: list[str]
    smoking: str  # "current", "former", "never"
    exposure: str  # "known", "household", "none", "unknown"
    fever_measured: bool
    hypoxia: bool
    tachycardia: bool
    tachypnea: bool
    labs: list[str] = field(default_factory=list)
    labs_done: bool = False
    covid_test: str = "none"  # "positive", "negative", "none"
    imaging_done: bool = False
    imaging: list[str] = field(default_factory=list)
    disposition: str = "home"  # "home", "ama", "snf"
    home_oxygen: bool = False
    home_pulse_ox: bool = False
    treatments: list[str] = field(default_factory=list)


# --- public API ---------------------------------------------------------------------------------


def synth_cohort(
    seed: int = 0, n_sites: int = DEFAULT_SITES, n_encounters: int = DEFAULT_ENCOUNTERS
) -> list[EncounterRow]:
    """Encounter rows (the export columns), grouped by site; the same seed gives the same rows."""
    return [e.row for e in synth_annotated_cohort(seed, n_sites, n_encounters)]


def synth_annotated_cohort(
    seed: int = 0, n_sites: int = DEFAULT_SITES, n_encounters: int = DEFAULT_ENCOUNTERS
) -> list[SyntheticEncounter]:
    """Encounters with the generator's gold concept mentions and true revisit probability."""
    if n_sites < 1 or n_encounters < n_sites * MIN_SITE_ENCOUNTERS:
        raise ValueError(
            f"need at least {MIN_SITE_ENCOUNTERS} encounters per site "
            f"({n_sites} sites, {n_encounters} encounters)"
        )
    sites = make_sites(seed, n_sites, n_encounters)
    encounters: list[SyntheticEncounter] = []
    for index, site in enumerate(sites):
        encounters.extend(_site_encounters(site, np.random.default_rng([seed, index, 1])))
    return encounters


def make_sites(seed: int, n_sites: int, n_encounters: int) -> list[SiteProfile]:
    """The site profiles for a seed: sizes add up to ``n_encounters``."""
    rng = np.random.default_rng([seed, 0])
    sizes = _site_sizes(rng, n_sites, n_encounters)
    low, high = REVISIT_RATE_RANGE
    rates = rng.permutation(np.linspace(low, high, n_sites))
    return [
        _make_site(f"ER{i + 1:02d}", int(sizes[i]), float(rates[i]), rng) for i in range(n_sites)
    ]


def write_cohort_csv(path: Path, rows: Iterable[EncounterRow]) -> int:
    """Write rows as CSV (header ``COLUMNS``; notes quoted, newlines kept); returns the count.

    Written to a temporary file and renamed, so a reader never sees half a cohort.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return count


def read_cohort_csv(path: Path) -> list[EncounterRow]:
    """Read an encounter CSV with at least the ``COLUMNS``; extra columns are ignored."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise CohortFileError(f"{path}: missing columns {', '.join(missing)}")
        return [_parse_row(raw, line) for line, raw in enumerate(reader, start=2)]


def _parse_row(raw: Mapping[str, str], line: int) -> EncounterRow:
    label = raw["revisit_7d"].strip()
    if label not in ("0", "1"):
        raise CohortFileError(f"line {line}: revisit_7d must be 0 or 1, not {label!r}")
    try:
        datetime.fromisoformat(raw["discharge_time"])
    except ValueError as exc:
        raise CohortFileError(f"line {line}: discharge_time is not ISO 8601") from exc
    return EncounterRow(
        encounter_id=raw["encounter_id"],
        site=raw["site"],
        discharge_time=raw["discharge_time"],
        note_text=raw["note_text"],
        revisit_7d=int(label),
    )


# --- sites -------------------------------------------------------------------------------------


def _site_sizes(rng: Rng, n_sites: int, n_encounters: int) -> np.ndarray:
    # Unequal ERs, as in multi-site cohorts: a floor per site, the rest split by a Dirichlet,
    # rounded by largest remainder so the total is exact.
    spare = n_encounters - n_sites * MIN_SITE_ENCOUNTERS
    shares = rng.dirichlet(np.full(n_sites, 2.0)) * spare
    sizes = np.floor(shares).astype(int)
    remainder = spare - int(sizes.sum())
    sizes[np.argsort(-(shares - sizes), kind="stable")[:remainder]] += 1
    return sizes + MIN_SITE_ENCOUNTERS


def _make_site(name: str, n: int, rate: float, rng: Rng) -> SiteProfile:
    def factors(codes: Iterable[str], sigma: float) -> dict[str, float]:
        return {c: float(np.exp(rng.normal(0.0, sigma))) for c in codes}

    # A small Dirichlet concentration: each site settles on one or two phrasings per concept.
    phrase_weights = {
        code: tuple(float(w) for w in rng.dirichlet(np.full(len(options), 0.4)))
        for code, options in GENERATOR_PHRASES.items()
    }
    strength = {
        k: float(np.clip(np.exp(rng.normal(0.0, 0.6)), 0.2, 3.0)) for k in BASE_RISK_WEIGHTS
    }
    return SiteProfile(
        name=name,
        n_encounters=n,
        target_revisit_rate=rate,
        age_mean=float(rng.normal(52.0, 8.0)),
        severity_shift=float(rng.normal(0.0, 0.35)),
        symptom_factor=factors(_SYMPTOM_PREVALENCE, 0.25),
        comorbidity_factor=factors(_COMORBIDITY_PREVALENCE, 0.4),
        risk_strength=strength,
        phrase_weights=phrase_weights,
        header_style=int(rng.integers(len(_HEADER_STYLES))),
        negation_style=int(rng.integers(4)),
        numeric_vitals=bool(rng.random() < 0.6),
        documents_negatives=float(rng.uniform(0.3, 0.95)),
        imaging_rate=float(rng.uniform(0.35, 0.85)),
        labs_rate=float(rng.uniform(0.3, 0.85)),
        uses_elderly=bool(rng.random() < 0.4),
    )


def _site_encounters(site: SiteProfile, rng: Rng) -> list[SyntheticEncounter]:
    patients = [_sample_patient(site, rng) for _ in range(site.n_encounters)]
    logits = np.array([_risk_logit(site, p) for p in patients])
    intercept = _calibrate_intercept(logits, site.target_revisit_rate)
    probabilities = 1.0 / (1.0 + np.exp(-(logits + intercept)))
    labels = rng.random(len(patients)) < probabilities
    offsets = np.sort(rng.uniform(0.0, 365.0 * 24 * 60, len(patients)))
    encounters = []
    for i, patient in enumerate(patients):
        text, gold = _write_note(site, patient, rng)
        discharge = _COHORT_START + timedelta(minutes=int(offsets[i]))
        row = EncounterRow(
            encounter_id=f"{site.name}-{i + 1:05d}",
            site=site.name,
            discharge_time=discharge.isoformat(),
            note_text=text,
            revisit_7d=int(labels[i]),
        )
        encounters.append(SyntheticEncounter(row, gold, float(probabilities[i])))
    return encounters


# --- patients and risk -------------------------------------------------------------------------


def _sample_patient(site: SiteProfile, rng: Rng) -> _Patient:
    age = int(np.clip(rng.normal(site.age_mean, 18.0), 18, 98))
    old = age >= 65
    comorbidities = [
        code
        for code, p in _COMORBIDITY_PREVALENCE.items()
        if rng.random() < min(0.9, p * site.comorbidity_factor[code] * (1.8 if old else 0.8))
    ]
    symptoms = [
        code
        for code, p in _SYMPTOM_PREVALENCE.items()
        if rng.random() < min(0.95, p * site.symptom_factor[code])
    ]
    # One latent severity drives the vitals, labs and imaging together, as illness does.
    severity = rng.normal(site.severity_shift + 0.5 * old + 0.15 * len(comorbidities), 1.0)
    patient = _Patient(
        age=age,
        female=bool(rng.random() < 0.5),
        nursing_home=bool(old and rng.random() < 0.12),
        symptoms=symptoms,
        comorbidities=comorbidities,
        family_conditions=[c for c in _FAMILY_CONDITIONS if rng.random() < 0.12],
        smoking=str(rng.choice(["current", "former", "never"], p=[0.15, 0.15, 0.7])),
        exposure=str(
            rng.choice(["known", "household", "none", "unknown"], p=[0.25, 0.1, 0.3, 0.35])
        ),
        fever_measured="PC0001" in symptoms and rng.random() < 0.5,
        hypoxia=bool(severity + rng.normal(0, 0.5) > 1.6),
        tachycardia=bool(severity + rng.normal(0, 0.8) > 1.2),
        tachypnea=bool(severity + rng.normal(0, 0.6) > 1.5),
    )
    _sample_workup(site, patient, severity, rng)
    _sample_disposition(patient, rng)
    return patient


def _sample_workup(site: SiteProfile, patient: _Patient, severity: float, rng: Rng) -> None:
    patient.labs_done = bool(rng.random() < site.labs_rate or patient.hypoxia)
    if patient.labs_done:
        chances = {
            "PC0173": 0.15 + 0.15 * severity,
            "PC0174": 0.3 + 0.1 * severity,
            "PC0179": 0.35 + 0.1 * severity,
            "PC0180": 0.2,
            "PC0175": 0.1,
            "PC0185": 0.05 + 0.1 * ("PC0087" in patient.comorbidities),
        }
        patient.labs = [code for code, p in chances.items() if rng.random() < p]
    patient.covid_test = str(rng.choice(["positive", "negative", "none"], p=[0.65, 0.1, 0.25]))
    patient.imaging_done = bool(rng.random() < site.imaging_rate or patient.hypoxia)
    if patient.imaging_done:
        findings = []
        if rng.random() < 0.2 + 0.2 * severity:
            findings.append("PC0203")
        if rng.random() < 0.15:
            findings.append("PC0204")
        if rng.random() < 0.08:
            findings.append("PC0210")
        if "PC0090" in patient.comorbidities and rng.random() < 0.6:
            findings.append("PC0206")
        patient.imaging = findings
    treatments = []
    if "PC0001" in patient.symptoms and rng.random() < 0.6:
        treatments.append("PC0285")
    if rng.random() < 0.2:
        treatments.append("PC0287")
    if patient.hypoxia:
        treatments.extend(["PC0261", "PC0267"] if rng.random() < 0.7 else ["PC0261"])
    if {"PC0086", "PC0085"} & set(patient.comorbidities) and rng.random() < 0.6:
        treatments.append("PC0288")
    patient.treatments = treatments


def _sample_disposition(patient: _Patient, rng: Rng) -> None:
    if rng.random() < 0.04 + 0.05 * patient.hypoxia:
        patient.disposition = "ama"
    elif patient.nursing_home and rng.random() < 0.8:
        patient.disposition = "snf"
    patient.home_oxygen = patient.hypoxia and patient.disposition != "ama" and rng.random() < 0.45
    patient.home_pulse_ox = bool(rng.random() < (0.35 if patient.hypoxia else 0.1))


def _risk_features(patient: _Patient) -> dict[str, float]:
    """The latent quantities the revisit label depends on (before site strengths)."""
    return {
        "hypoxia": float(patient.hypoxia),
        "age_65_or_older": float(patient.age >= 65),
        "nursing_home": float(patient.nursing_home),
        "comorbidity_burden": float(sum(c in patient.comorbidities for c in _MAJOR_COMORBIDITIES)),
        "oxygen_need_unmet": float(patient.hypoxia and not patient.home_oxygen),
        "left_ama": float(patient.disposition == "ama"),
        "tachypnea": float(patient.tachypnea),
        "elevated_d_dimer": float("PC0173" in patient.labs),
        "lymphopenia": float("PC0174" in patient.labs),
        "dyspnea": float("PC0005" in patient.symptoms),
        "home_pulse_oximetry": float(patient.home_pulse_ox),
    }


def _risk_logit(site: SiteProfile, patient: _Patient) -> float:
    features = _risk_features(patient)
    return sum(
        BASE_RISK_WEIGHTS[name] * site.risk_strength[name] * value
        for name, value in features.items()
    )


def _calibrate_intercept(logits: np.ndarray, target_rate: float) -> float:
    """The intercept that makes the site's mean revisit probability equal ``target_rate``."""
    low, high = -20.0, 10.0
    for _ in range(60):  # bisection: the mean probability rises with the intercept
        mid = (low + high) / 2.0
        mean = float(np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))))
        low, high = (mid, high) if mean < target_rate else (low, mid)
    return (low + high) / 2.0


# --- notes -------------------------------------------------------------------------------------


class _NoteWriter:
    """Builds a note and records the span and assertion flags of every concept written."""

    # Where a mention is written decides part of its status, as it does for the extractor.
    _SECTION_FLAGS: Mapping[str, str] = {
        "past_medical_history": "historical",
        "family_history": "family",
        "discharge_instructions": "hypothetical",
    }

    def __init__(self, site: SiteProfile, rng: Rng) -> None:
        self.site = site
        self.rng = rng
        self._parts: list[str] = []
        self._length = 0
        self._section = ""
        self.gold: list[GoldMention] = []

    def section(self, name: str) -> None:
        if self._parts:
            self.text("\n")
        self._section = name
        self.text(_HEADER_STYLES[self.site.header_style][name] + " ")

    def text(self, value: str) -> None:
        self._parts.append(value)
        self._length += len(value)

    def concept(self, code: str, surface: str | None = None, **flags: bool) -> None:
        """Write ``surface`` (default: the site's phrase for ``code``) as a gold mention."""
        phrase = surface if surface is not None else self.site.phrase(code, self.rng)
        section_flag = self._SECTION_FLAGS.get(self._section)
        if section_flag is not None:
            flags = {**flags, section_flag: True}
        start = self._length
        self.text(phrase)
        self.gold.append(GoldMention(code, start, self._length, self._section, **flags))

    def concept_list(self, codes: Sequence[str], conjunction: str = "and", **flags: bool) -> None:
        for i, code in enumerate(codes):
            if i:
                self.text(f" {conjunction} " if i == len(codes) - 1 else ", ")
            self.concept(code, None, **flags)

    def finish(self) -> tuple[str, tuple[GoldMention, ...]]:
        return "".join(self._parts) + "\n", tuple(self.gold)


def _write_note(site: SiteProfile, p: _Patient, rng: Rng) -> tuple[str, tuple[GoldMention, ...]]:
    note = _NoteWriter(site, rng)
    for write in _NOTE_SECTIONS:
        write(note, p)
    return note.finish()


def _chief_complaint(note: _NoteWriter, p: _Patient) -> None:
    note.section("chief_complaint")
    leading = p.symptoms[:2] if p.symptoms else []
    if leading:
        note.concept_list(leading)
    else:
        note.text("Requesting evaluation")
    note.text(".")


def _hpi(note: _NoteWriter, p: _Patient) -> None:
    note.section("history_of_present_illness")
    _age_phrase(note, p)
    if p.comorbidities and note.rng.random() < 0.5:
        note.text(" with a history of ")
        note.concept_list(p.comorbidities[:2], historical=True)
    note.text(" presents with ")
    if p.symptoms:
        note.concept_list(p.symptoms)
    else:
        note.text("concern for ")
        note.concept("PC0141", "COVID-19", uncertain=True)
    days = int(note.rng.integers(1, 11))
    note.text(f" for {days} day{'s' if days > 1 else ''}. ")
    _exposure_sentence(note, p)
    absent = [c for c in _NEGATIVE_POOL if c not in p.symptoms]
    if absent and note.rng.random() < note.site.documents_negatives:
        picks = note.rng.choice(len(absent), min(3, len(absent)), replace=False)
        chosen = [absent[int(i)] for i in sorted(picks)]
        _negatives_sentence(note, chosen)
    if "PC0015" not in p.symptoms and note.rng.random() < 0.1:
        note.text(" Possible ")
        note.concept("PC0015", uncertain=True)
        note.text(".")


def _age_phrase(note: _NoteWriter, p: _Patient) -> None:
    sex = "woman" if p.female else "man"
    if note.site.uses_elderly and p.age >= 75:
        note.concept("PC0124", "elderly")
        note.text(f" {sex}, {p.age},")
        return
    age = f"{p.age} yo" if note.site.header_style == 1 else f"{p.age}-year-old"
    if p.age >= 65:
        note.concept("PC0124", age)
    else:
        note.text(age)
    note.text(f" {sex}")


def _exposure_sentence(note: _NoteWriter, p: _Patient) -> None:
    if p.exposure == "known":
        note.text("Reports ")
        note.concept("PC0125")
        note.text(". ")
    elif p.exposure == "household":
        note.text("Her husband" if p.female else "His wife")
        note.text(" was recently diagnosed with ")
        note.concept("PC0141", family=True)
        note.text(". ")
    elif p.exposure == "none":
        note.text("No ")
        note.concept("PC0125", "sick contacts", negated=True)
        note.text(". ")


def _negatives_sentence(note: _NoteWriter, codes: Sequence[str]) -> None:
    style = note.site.negation_style
    if style == 3:
        for code in codes:
            phrase = note.site.phrase(code, note.rng)
            note.concept(code, _capitalized(phrase), negated=True)
            note.text(": no. ")
        return
    lead = ("Denies ", "No ", "Negative for ")[style]
    note.text(lead)
    note.concept_list(codes, conjunction="or", negated=True)
    note.text(". ")


def _past_history(note: _NoteWriter, p: _Patient) -> None:
    note.section("past_medical_history")
    if p.comorbidities:
        note.concept_list(p.comorbidities)
        note.text(".")
    else:
        note.text("None.")


def _family_history(note: _NoteWriter, p: _Patient) -> None:
    if not p.family_conditions and note.rng.random() < 0.5:
        return
    note.section("family_history")
    if not p.family_conditions:
        note.text("Noncontributory.")
    for code in p.family_conditions:
        relative = str(note.rng.choice(["Mother", "Father", "Sister", "Brother"]))
        note.text(f"{relative} with ")
        note.concept(code)
        note.text(". ")


def _social_history(note: _NoteWriter, p: _Patient) -> None:
    note.section("social_history")
    if p.smoking == "current":
        note.text("Reports daily ")
        note.concept("PC0121")
        note.text(". ")
    elif p.smoking == "former":
        note.concept("PC0122", note.site.phrase("PC0122", note.rng).capitalize())
        note.text(". ")
    else:
        note.text("Denies ")
        note.concept("PC0121", negated=True)
        note.text(". ")
    if p.nursing_home:
        phrase = note.site.phrase("PC0123", note.rng)
        note.concept("PC0123", _capitalized(phrase))
        note.text(".")


def _vitals(note: _NoteWriter, p: _Patient) -> None:
    note.section("vital_signs")
    rng = note.rng
    temp = rng.uniform(38.1, 39.6) if p.fever_measured else rng.uniform(36.4, 37.6)
    heart = int(rng.integers(102, 131)) if p.tachycardia else int(rng.integers(62, 96))
    resp = int(rng.integers(23, 33)) if p.tachypnea else int(rng.integers(14, 20))
    spo2 = int(rng.integers(85, 94)) if p.hypoxia else int(rng.integers(95, 100))
    if note.site.numeric_vitals:
        _numeric_vital(note, "PC0061" if p.fever_measured else None, f"T {temp:.1f} C")
        _numeric_vital(note, "PC0064" if p.tachycardia else None, f"HR {heart}")
        _numeric_vital(note, "PC0065" if p.tachypnea else None, f"RR {resp}")
        note.text(f"BP {int(rng.integers(105, 150))}/{int(rng.integers(60, 95))}, ")
        _numeric_vital(note, "PC0063" if p.hypoxia else None, f"SpO2 {spo2}%", last=True)
        note.text(" on room air.")
        return
    if p.fever_measured:
        note.concept("PC0061", "Febrile to")
        note.text(f" {temp:.1f}. ")
    else:
        note.concept("PC0062", "Afebrile")
        note.text(". ")
    if p.tachycardia:
        note.concept("PC0064", "Tachycardic")
        note.text(f" to {heart}. ")
    if p.tachypnea:
        note.concept("PC0065", "Tachypneic")
        note.text(". ")
    if p.hypoxia:
        note.concept("PC0063", "Hypoxic")
        note.text(f" to {spo2}% on room air.")
    else:
        note.text(f"Saturating {spo2}% on room air.")


def _capitalized(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:]


def _numeric_vital(note: _NoteWriter, code: str | None, value: str, last: bool = False) -> None:
    if code is None:
        note.text(value)
    else:
        note.concept(code, value)
    if not last:
        note.text(", ")


def _exam(note: _NoteWriter, p: _Patient) -> None:
    note.section("physical_exam")
    if p.hypoxia and note.rng.random() < 0.6:
        note.text("Lungs with ")
        note.concept("PC0041")
        note.text(". ")
    else:
        note.text("Lungs clear, no ")
        note.concept("PC0042", negated=True)
        note.text(". ")
    if p.tachypnea and note.rng.random() < 0.5:
        note.text("Mild ")
        note.concept("PC0046")
        note.text(".")
    else:
        note.text("No ")
        note.concept("PC0046", negated=True)
        note.text(".")


def _labs(note: _NoteWriter, p: _Patient) -> None:
    if not p.labs_done and p.covid_test == "none":
        return
    note.section("labs")
    if p.covid_test == "positive":
        note.concept("PC0171")
        note.text(". ")
    elif p.covid_test == "negative":
        note.concept("PC0172")
        note.text(". ")
    if p.labs_done and p.labs:
        note.text("Notable for ")
        note.concept_list(p.labs)
        note.text(". ")
    if p.labs_done and "PC0175" not in p.labs:
        note.text("No ")
        note.concept("PC0175", negated=True)
        note.text(".")


def _imaging(note: _NoteWriter, p: _Patient) -> None:
    if not p.imaging_done:
        return
    note.section("imaging")
    rng = note.rng
    if not p.imaging:
        note.concept("PC0226", note.site.phrase("PC0226", rng).capitalize())
        note.text(".")
        return
    note.concept_list(p.imaging)
    if "PC0203" in p.imaging and rng.random() < 0.6:
        note.text(" concerning for ")
        note.concept("PC0143", uncertain=True)
    note.text(". No ")
    note.concept("PC0205", negated=True)
    note.text(" or ")
    note.concept("PC0207", negated=True)
    note.text(".")


def _ed_course(note: _NoteWriter, p: _Patient) -> None:
    if not p.treatments:
        return
    note.section("ed_course")
    note.text("Received ")
    note.concept_list(p.treatments)
    note.text(".")


def _assessment(note: _NoteWriter, p: _Patient) -> None:
    note.section("assessment_and_plan")
    rng = note.rng
    if p.covid_test == "positive":
        code = "PC0142" if "PC0203" in p.imaging else "PC0141"
        note.concept(code)
        note.text(". ")
    elif p.covid_test == "negative":
        note.concept("PC0166", note.site.phrase("PC0166", rng).capitalize())
        note.text(". ")
        note.concept("PC0141", uncertain=True, surface="COVID-19")
        note.text(" is possible. ")
    else:
        note.text("Suspected ")
        note.concept("PC0141", uncertain=True)
        note.text(", test pending. ")
    if p.imaging and rng.random() < 0.3:
        note.text("Cannot rule out ")
        note.concept("PC0145", uncertain=True)
        note.text(". ")
    note.concept("PC0331", _capitalized(note.site.phrase("PC0331", rng)))
    note.text(" for 10 days, ")
    note.concept("PC0332")
    note.text(". ")
    if p.home_pulse_ox:
        note.text("Given a ")
        note.concept("PC0293")
        note.text(". ")
    if "PC0005" in p.symptoms and rng.random() < 0.5:
        note.concept("PC0291", "Benzonatate")
        note.text(" prescribed.")


def _disposition(note: _NoteWriter, p: _Patient) -> None:
    note.section("disposition")
    if p.disposition == "ama":
        phrase = note.site.phrase("PC0325", note.rng)
        note.text("Patient ")
        note.concept("PC0325", phrase)
        note.text(".")
        return
    code = "PC0328" if p.disposition == "snf" else "PC0321"
    phrase = note.site.phrase(code, note.rng)
    note.concept(code, _capitalized(phrase))
    if p.home_oxygen:
        note.text(" with ")
        note.concept("PC0292")
    note.text(".")


def _instructions(note: _NoteWriter, p: _Patient) -> None:
    note.section("discharge_instructions")
    note.text("Return to the ED for worsening ")
    note.concept_list(["PC0005", "PC0022"], conjunction="or")
    note.text(".")


_NOTE_SECTIONS: tuple[Callable[[_NoteWriter, _Patient], None], ...] = (
    _chief_complaint,
    _hpi,
    _past_history,
    _family_history,
    _social_history,
    _vitals,
    _exam,
    _labs,
    _imaging,
    _ed_course,
    _assessment,
    _disposition,
    _instructions,
)


def revisit_rates(rows: Iterable[EncounterRow]) -> dict[str, float]:
    """Observed 7-day revisit rate per site."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        count = totals.setdefault(row["site"], [0, 0])
        count[0] += row["revisit_7d"]
        count[1] += 1
    return {site: hits / n for site, (hits, n) in sorted(totals.items())}
