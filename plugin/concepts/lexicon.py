"""The project's concept lexicon, section headers and assertion-rule edits, as data.

Each concept has a stable project code (``PC0001``...), a preferred name, a category, the phrases
that mean it in ER notes and radiology reports (matched case-insensitively on whole tokens), and
optional regular expressions for measured values ("SpO2 89%", "HR 118").

SNOMED CT and RadLex identifiers are given only where the authors knew them with confidence; the
rest are ``None`` on purpose. Every SNOMED CT identifier here passes the Verhoeff check digit and
the concept partition test (see ``snomed_id_is_well_formed``), which catches typing errors but not
a wrong concept: a site that relies on the codes checks them against its licensed release.

Codes are written out, never computed from list order, so that adding a concept never renumbers
the others (saved vocabularies and trained models refer to codes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class Category(StrEnum):
    """What kind of clinical statement a concept is; feature policies select by category."""

    SYMPTOM = "symptom"
    EXAM_FINDING = "exam finding"
    VITAL_SIGN_FINDING = "vital sign finding"
    COMORBIDITY = "comorbidity"
    RISK_FACTOR = "risk factor"
    DIAGNOSIS = "diagnosis"
    LAB_FINDING = "lab finding"
    RADIOLOGY_FINDING = "radiology finding"
    SUPPORT_DEVICE = "support device"
    TREATMENT = "treatment"
    DISPOSITION = "disposition"


@dataclass(frozen=True)
class Concept:
    """One entry of the lexicon."""

    code: str
    name: str
    category: Category
    synonyms: tuple[str, ...]
    snomed_ct: str | None = None
    radlex: str | None = None
    # Case-insensitive regular expressions over the note text, for measured values.
    regexes: tuple[str, ...] = ()

    @property
    def phrases(self) -> tuple[str, ...]:
        """The preferred name followed by the synonyms, without repeats."""
        return tuple(dict.fromkeys((self.name, *self.synonyms)))


class LexiconError(ValueError):
    """The lexicon data is inconsistent (duplicate code, a phrase claimed by two concepts...)."""


@dataclass(frozen=True)
class Lexicon:
    """An immutable, validated set of concepts with lookups by code, name and phrase."""

    concepts: tuple[Concept, ...]
    _by_code: Mapping[str, Concept] = field(init=False, repr=False, compare=False)
    _by_phrase: Mapping[str, Concept] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_code: dict[str, Concept] = {}
        by_phrase: dict[str, Concept] = {}
        for concept in self.concepts:
            if concept.code in by_code:
                raise LexiconError(f"duplicate concept code {concept.code}")
            by_code[concept.code] = concept
            for phrase in concept.phrases:
                key = phrase.lower()
                other = by_phrase.get(key)
                if other is not None and other.code != concept.code:
                    # One surface form for two concepts would make the matcher's choice arbitrary.
                    raise LexiconError(f"phrase {phrase!r} is in {other.code} and {concept.code}")
                by_phrase[key] = concept
        object.__setattr__(self, "_by_code", MappingProxyType(by_code))
        object.__setattr__(self, "_by_phrase", MappingProxyType(by_phrase))

    def __iter__(self) -> Iterator[Concept]:
        return iter(self.concepts)

    def __len__(self) -> int:
        return len(self.concepts)

    def __contains__(self, code: object) -> bool:
        return code in self._by_code

    def get(self, code: str) -> Concept:
        """The concept with this project code; KeyError if there is none."""
        return self._by_code[code]

    def by_phrase(self, phrase: str) -> Concept:
        """The concept a phrase (or preferred name) belongs to, case-insensitively."""
        return self._by_phrase[phrase.lower()]

    def in_category(self, category: Category) -> tuple[Concept, ...]:
        return tuple(c for c in self.concepts if c.category is category)


def _c(
    code: str,
    name: str,
    category: Category,
    synonyms: Iterable[str] = (),
    *,
    snomed: str | None = None,
    radlex: str | None = None,
    regexes: Iterable[str] = (),
) -> Concept:
    return Concept(code, name, category, tuple(synonyms), snomed, radlex, tuple(regexes))


S = Category.SYMPTOM
EX = Category.EXAM_FINDING
V = Category.VITAL_SIGN_FINDING
CM = Category.COMORBIDITY
RF = Category.RISK_FACTOR
DX = Category.DIAGNOSIS
LB = Category.LAB_FINDING
RAD = Category.RADIOLOGY_FINDING
DEV = Category.SUPPORT_DEVICE
TX = Category.TREATMENT
DISP = Category.DISPOSITION

# Measured-value patterns. Thresholds follow common ED triage cut-offs: temperature >= 38.0 C
# (100.4 F), SpO2 <= 93 %, heart rate >= 100 (bradycardia < 50), respiratory rate >= 22,
# systolic pressure < 90. They fire on values written next to the vital's usual label.
_TEMP = r"(?:t|temp|temperature|tmax)\s*:?\s*(?:of\s+)?"
_SPO2 = (
    r"(?:spo2|sp02|o2 sats?|oxygen saturation|sats?|saturating|pulse ox(?:imetry)?)"
    r"\s*:?\s*(?:of\s+|was\s+|at\s+)?"
)
_HR = r"(?:hr|heart rate|pulse)\s*:?\s*(?:of\s+)?"
_RR = r"(?:rr|resp(?:iratory)? rate)\s*:?\s*(?:of\s+)?"
_BP = r"(?:bp|blood pressure)\s*:?\s*(?:of\s+)?"

CONCEPTS: tuple[Concept, ...] = (
    # --- symptoms -------------------------------------------------------------------------
    _c(
        "PC0001",
        "fever",
        S,
        ["fevers", "subjective fever", "subjective fevers", "feverish", "pyrexia"],
        snomed="386661006",
    ),
    _c("PC0002", "chills", S, ["rigors", "shaking chills", "chill"], snomed="43724002"),
    _c(
        "PC0003",
        "cough",
        S,
        ["coughing", "dry cough", "nonproductive cough", "non-productive cough"],
        snomed="49727002",
    ),
    _c(
        "PC0004",
        "productive cough",
        S,
        ["cough productive of sputum", "wet cough"],
        snomed="28743005",
    ),
    _c(
        "PC0005",
        "dyspnea",
        S,
        [
            "shortness of breath",
            "SOB",
            "difficulty breathing",
            "breathlessness",
            "short of breath",
            "trouble breathing",
            "dyspneic",
            "dyspnoea",
        ],
        snomed="267036007",
    ),
    _c(
        "PC0006",
        "dyspnea on exertion",
        S,
        [
            "DOE",
            "exertional dyspnea",
            "shortness of breath with exertion",
            "shortness of breath on exertion",
        ],
        snomed="60845006",
    ),
    _c("PC0007", "fatigue", S, ["fatigued", "tiredness", "tired", "exhaustion"], snomed="84229001"),
    _c("PC0008", "malaise", S, ["generalized malaise", "feeling unwell"], snomed="367391008"),
    _c(
        "PC0009",
        "myalgia",
        S,
        ["myalgias", "body aches", "body ache", "muscle aches", "muscle pain", "bodyaches"],
        snomed="68962001",
    ),
    _c("PC0010", "arthralgia", S, ["arthralgias", "joint pain", "joint pains"], snomed="57676002"),
    _c("PC0011", "headache", S, ["headaches", "cephalgia"], snomed="25064002"),
    _c("PC0012", "sore throat", S, ["throat pain", "pharyngeal pain"], snomed="162397003"),
    _c("PC0013", "rhinorrhea", S, ["runny nose", "rhinorrhoea"], snomed="64531003"),
    _c("PC0014", "nasal congestion", S, ["congestion", "stuffy nose"], snomed="68235000"),
    _c(
        "PC0015",
        "anosmia",
        S,
        [
            "loss of smell",
            "loss of sense of smell",
            "lost sense of smell",
            "loss of the sense of smell",
            "decreased sense of smell",
        ],
        snomed="44169009",
    ),
    _c(
        "PC0016",
        "ageusia",
        S,
        [
            "loss of taste",
            "loss of sense of taste",
            "lost sense of taste",
            "loss of the sense of taste",
            "decreased sense of taste",
        ],
        snomed="36955009",
    ),
    _c("PC0017", "nausea", S, ["nauseated", "nauseous"], snomed="422587007"),
    _c("PC0018", "vomiting", S, ["emesis", "vomited", "vomits"], snomed="422400008"),
    _c("PC0019", "diarrhea", S, ["loose stools", "diarrhoea", "watery stools"], snomed="62315008"),
    _c(
        "PC0020", "abdominal pain", S, ["belly pain", "stomach pain", "abd pain"], snomed="21522001"
    ),
    _c(
        "PC0021",
        "loss of appetite",
        S,
        ["decreased appetite", "poor appetite", "anorexia"],
        snomed="79890006",
    ),
    _c("PC0022", "chest pain", S, ["chest discomfort", "chest pains"], snomed="29857009"),
    _c("PC0023", "chest tightness", S, ["tightness in the chest", "chest pressure"]),
    _c("PC0024", "palpitations", S, ["palpitation", "heart racing"], snomed="80313002"),
    _c(
        "PC0025",
        "dizziness",
        S,
        ["dizzy", "lightheadedness", "lightheaded", "light-headedness"],
        snomed="404640003",
    ),
    _c(
        "PC0026",
        "syncope",
        S,
        ["syncopal episode", "passed out", "fainting", "fainted"],
        snomed="271594007",
    ),
    _c("PC0027", "confusion", S, ["confused", "disoriented", "disorientation"], snomed="286933003"),
    _c("PC0028", "altered mental status", S, ["AMS", "altered mentation"], snomed="419284004"),
    _c("PC0029", "hemoptysis", S, ["coughing up blood", "blood-tinged sputum"], snomed="66857006"),
    _c("PC0030", "night sweats", S, ["nocturnal sweats"], snomed="42984000"),
    _c("PC0031", "weakness", S, ["generalized weakness", "asthenia"], snomed="13791008"),
    _c("PC0032", "back pain", S, ["backache", "low back pain"], snomed="161891005"),
    _c("PC0033", "rash", S, ["skin rash", "skin eruption"], snomed="271807003"),
    _c("PC0034", "conjunctivitis", S, ["red eyes", "pink eye"], snomed="9826008"),
    _c("PC0035", "sneezing", S, ["sneezes"], snomed="76067001"),
    _c("PC0036", "orthopnea", S, ["orthopnoea"], snomed="62744007"),
    _c("PC0037", "pleuritic chest pain", S, ["pleuritic pain"]),
    _c(
        "PC0038",
        "decreased oral intake",
        S,
        ["poor oral intake", "poor PO intake", "decreased PO intake"],
    ),
    # --- examination findings ------------------------------------------------------------
    _c(
        "PC0041",
        "crackles",
        EX,
        ["rales", "crackle", "inspiratory crackles", "bibasilar crackles"],
        snomed="48409008",
    ),
    _c("PC0042", "wheezing", EX, ["wheezes", "wheeze", "expiratory wheezing"], snomed="56018004"),
    _c("PC0043", "rhonchi", EX, ["rhonchus", "coarse breath sounds"]),
    _c(
        "PC0044",
        "diminished breath sounds",
        EX,
        ["decreased breath sounds", "diminished air entry", "decreased air movement"],
    ),
    _c(
        "PC0045",
        "accessory muscle use",
        EX,
        ["use of accessory muscles", "accessory muscle usage", "retractions"],
    ),
    _c(
        "PC0046",
        "respiratory distress",
        EX,
        ["increased work of breathing", "labored breathing", "labored respirations"],
        snomed="271825005",
    ),
    _c(
        "PC0047",
        "peripheral edema",
        EX,
        [
            "lower extremity edema",
            "leg edema",
            "pedal edema",
            "leg swelling",
            "bilateral leg swelling",
            "pitting edema",
        ],
        snomed="271809000",
    ),
    _c("PC0048", "cyanosis", EX, ["cyanotic"], snomed="3415004"),
    _c("PC0049", "dry mucous membranes", EX, ["dry mucosa"]),
    # --- vital sign findings -------------------------------------------------------------
    _c(
        "PC0061",
        "measured fever",
        V,
        ["febrile", "febrile to", "elevated temperature"],
        regexes=[
            rf"\b{_TEMP}(?:3[89]\.\d|4[0-2](?:\.\d)?|100\.[4-9]|10[1-6](?:\.\d)?)"
            r"\s*(?:°\s*)?[cf]?\b"
        ],
    ),
    _c("PC0062", "afebrile", V, ["normothermic"]),
    _c(
        "PC0063",
        "hypoxia",
        V,
        [
            "hypoxemia",
            "hypoxic",
            "hypoxemic",
            "desaturation",
            "desaturated",
            "desaturating",
            "low oxygen saturation",
            "hypoxaemia",
        ],
        snomed="389087006",
        regexes=[rf"\b{_SPO2}(?:[5-8]\d|9[0-3])\s*%"],
    ),
    _c(
        "PC0064",
        "tachycardia",
        V,
        ["tachycardic", "sinus tachycardia"],
        snomed="3424008",
        regexes=[rf"\b{_HR}(?:1\d\d|2[0-4]\d)\b"],
    ),
    _c(
        "PC0065",
        "tachypnea",
        V,
        ["tachypneic", "tachypnoea", "rapid breathing"],
        snomed="271823003",
        regexes=[rf"\b{_RR}(?:2[2-9]|[3-6]\d)\b"],
    ),
    _c(
        "PC0066",
        "hypotension",
        V,
        ["hypotensive", "low blood pressure"],
        snomed="45007003",
        regexes=[rf"\b{_BP}(?:[4-8]\d)\s*/\s*\d{{2,3}}\b"],
    ),
    _c(
        "PC0067",
        "bradycardia",
        V,
        ["bradycardic"],
        snomed="48867003",
        regexes=[rf"\b{_HR}(?:[2-4]\d)\b"],
    ),
    _c("PC0068", "hypothermia", V, ["hypothermic"], snomed="386689009"),
    # --- comorbidities ---------------------------------------------------------------------
    _c(
        "PC0081",
        "hypertension",
        CM,
        ["HTN", "high blood pressure", "essential hypertension"],
        snomed="38341003",
    ),
    _c("PC0082", "diabetes mellitus", CM, ["diabetes", "DM", "diabetic"], snomed="73211009"),
    _c(
        "PC0083",
        "type 2 diabetes mellitus",
        CM,
        [
            "type 2 diabetes",
            "type II diabetes",
            "T2DM",
            "DM2",
            "DMII",
            "NIDDM",
            "type II diabetes mellitus",
        ],
        snomed="44054006",
    ),
    _c(
        "PC0084",
        "type 1 diabetes mellitus",
        CM,
        ["type 1 diabetes", "type I diabetes", "T1DM", "DM1", "IDDM"],
        snomed="46635009",
    ),
    _c(
        "PC0085",
        "chronic obstructive pulmonary disease",
        CM,
        ["COPD", "chronic obstructive lung disease"],
        snomed="13645005",
    ),
    _c(
        "PC0086",
        "asthma",
        CM,
        ["asthmatic", "reactive airway disease", "bronchial asthma"],
        snomed="195967001",
    ),
    _c(
        "PC0087",
        "chronic kidney disease",
        CM,
        [
            "CKD",
            "chronic renal insufficiency",
            "chronic renal failure",
            "chronic kidney disease stage 3",
        ],
        snomed="709044004",
    ),
    _c(
        "PC0088",
        "end-stage renal disease",
        CM,
        ["ESRD", "end stage renal disease", "dialysis-dependent", "on hemodialysis"],
        snomed="46177005",
    ),
    _c("PC0089", "obesity", CM, ["obese", "morbid obesity", "morbidly obese"], snomed="414916001"),
    _c(
        "PC0090",
        "heart failure",
        CM,
        [
            "CHF",
            "congestive heart failure",
            "HFrEF",
            "HFpEF",
            "systolic heart failure",
            "diastolic heart failure",
        ],
        snomed="84114007",
    ),
    _c(
        "PC0091",
        "coronary artery disease",
        CM,
        ["CAD", "ischemic heart disease"],
        snomed="53741008",
    ),
    _c(
        "PC0092",
        "myocardial infarction",
        CM,
        ["MI", "heart attack", "NSTEMI", "STEMI"],
        snomed="22298006",
    ),
    _c(
        "PC0093",
        "atrial fibrillation",
        CM,
        ["afib", "a-fib", "AFib", "atrial flutter"],
        snomed="49436004",
    ),
    _c(
        "PC0094",
        "hyperlipidemia",
        CM,
        ["HLD", "high cholesterol", "dyslipidemia", "hypercholesterolemia"],
        snomed="55822004",
    ),
    _c("PC0095", "stroke", CM, ["CVA", "cerebrovascular accident"], snomed="230690007"),
    _c("PC0096", "transient ischemic attack", CM, ["TIA"], snomed="266257000"),
    _c(
        "PC0097",
        "dementia",
        CM,
        ["Alzheimer disease", "Alzheimer's disease", "Alzheimer's dementia"],
        snomed="52448006",
    ),
    _c(
        "PC0098",
        "cancer",
        CM,
        [
            "malignancy",
            "malignant neoplasm",
            "active cancer",
            "metastatic cancer",
            "lymphoma",
            "leukemia",
        ],
        snomed="363346000",
    ),
    _c(
        "PC0099",
        "HIV infection",
        CM,
        ["HIV", "human immunodeficiency virus infection", "HIV/AIDS"],
        snomed="86406008",
    ),
    _c(
        "PC0100",
        "immunosuppression",
        CM,
        ["immunosuppressed", "immunocompromised", "on chemotherapy"],
    ),
    _c(
        "PC0101",
        "solid organ transplant",
        CM,
        [
            "kidney transplant",
            "renal transplant",
            "liver transplant",
            "transplant recipient",
            "heart transplant",
            "lung transplant",
        ],
    ),
    _c("PC0102", "cirrhosis", CM, ["liver cirrhosis", "cirrhosis of the liver"], snomed="19943007"),
    _c("PC0103", "obstructive sleep apnea", CM, ["OSA", "sleep apnea"], snomed="78275009"),
    _c(
        "PC0104",
        "interstitial lung disease",
        CM,
        ["ILD", "idiopathic pulmonary fibrosis", "IPF"],
        snomed="233703007",
    ),
    _c(
        "PC0105",
        "pulmonary hypertension",
        CM,
        ["pulmonary arterial hypertension"],
        snomed="70995007",
    ),
    _c("PC0106", "sickle cell disease", CM, ["sickle cell anemia"]),
    _c(
        "PC0107",
        "depression",
        CM,
        ["depressive disorder", "major depressive disorder", "MDD"],
        snomed="35489007",
    ),
    _c(
        "PC0108",
        "anxiety disorder",
        CM,
        ["anxiety", "generalized anxiety disorder", "GAD"],
        snomed="197480006",
    ),
    _c("PC0109", "hypothyroidism", CM, ["hypothyroid"], snomed="40930008"),
    _c("PC0110", "pregnancy", CM, ["pregnant", "currently pregnant", "gravid"], snomed="77386006"),
    _c(
        "PC0111",
        "alcohol use disorder",
        CM,
        ["alcohol abuse", "alcoholism", "EtOH abuse", "alcohol dependence"],
        snomed="7200002",
    ),
    _c(
        "PC0112", "gastroesophageal reflux disease", CM, ["GERD", "acid reflux"], snomed="235595009"
    ),
    _c("PC0113", "rheumatoid arthritis", CM, ["RA"], snomed="69896004"),
    _c("PC0114", "systemic lupus erythematosus", CM, ["SLE", "lupus"], snomed="55464009"),
    _c("PC0115", "seizure disorder", CM, ["epilepsy", "seizures"]),
    _c("PC0116", "peripheral vascular disease", CM, ["PVD", "peripheral arterial disease", "PAD"]),
    # --- risk factors and social context ---------------------------------------------------
    _c(
        "PC0121",
        "current smoker",
        RF,
        [
            "smoker",
            "smokes",
            "tobacco use",
            "smoking",
            "cigarette smoker",
            "active smoker",
            "tobacco",
        ],
        snomed="77176002",
    ),
    _c(
        "PC0122",
        "former smoker",
        RF,
        ["ex-smoker", "quit smoking", "remote tobacco use", "former tobacco use"],
        snomed="8517006",
    ),
    _c(
        "PC0123",
        "nursing home resident",
        RF,
        [
            "lives in a nursing home",
            "resides in a nursing home",
            "nursing home",
            "long-term care facility",
            "long term care facility",
            "skilled nursing facility resident",
            "assisted living facility",
            "assisted living",
        ],
    ),
    _c(
        "PC0124",
        "age 65 years or older",
        RF,
        ["elderly", "advanced age", "geriatric patient"],
        regexes=[
            r"\b(?:6[5-9]|[7-9]\d|1[01]\d)\s*(?:-|\s)?\s*(?:year|yr)s?\s*(?:-|\s)?\s*old\b",
            r"\b(?:6[5-9]|[7-9]\d|1[01]\d)\s*(?:yo|y/o|y\.o\.)(?!\w)",
        ],
    ),
    _c(
        "PC0125",
        "COVID-19 exposure",
        RF,
        [
            "sick contact",
            "sick contacts",
            "COVID exposure",
            "COVID-19 exposure",
            "exposure to COVID-19",
            "exposure to COVID",
            "exposed to COVID",
            "exposed to COVID-19",
            "known COVID-positive contact",
            "close contact with a COVID-positive person",
        ],
        # "exposure to his COVID-positive wife": the whole phrase is the patient's exposure, so
        # neither "COVID" (a diagnosis) nor "wife" (a family cue) is read inside it.
        regexes=[
            r"\bexpos(?:ure|ed)\s+to\s+(?:(?:a|an|his|her|their|my)\s+)?"
            r"(?:covid(?:-19)?|sars-cov-2)(?:[- ]?(?:positive|\+))?"
            r"(?:\s+(?:wife|husband|spouse|partner|mother|father|son|daughter|sister|"
            r"brother|roommate|coworker|co-worker|family member|contact|patient))?\b"
        ],
    ),
    _c(
        "PC0126",
        "healthcare worker",
        RF,
        ["health care worker", "works in healthcare", "works in health care"],
    ),
    _c(
        "PC0127",
        "homelessness",
        RF,
        ["homeless", "experiencing homelessness", "unhoused", "unstably housed"],
        snomed="32911000",
    ),
    _c("PC0128", "lives alone", RF, ["living alone"], snomed="105529008"),
    _c(
        "PC0129",
        "recent travel",
        RF,
        ["recent travel history", "travelled recently", "traveled recently"],
    ),
    # --- diagnoses --------------------------------------------------------------------------
    _c(
        "PC0141",
        "COVID-19",
        DX,
        [
            "COVID",
            "COVID 19",
            "COVID19",
            "SARS-CoV-2 infection",
            "coronavirus disease 2019",
            "novel coronavirus infection",
        ],
        snomed="840539006",
    ),
    _c(
        "PC0142",
        "COVID-19 pneumonia",
        DX,
        ["COVID pneumonia", "COVID-19 pneumonitis", "SARS-CoV-2 pneumonia", "COVID 19 pneumonia"],
    ),
    _c(
        "PC0143",
        "pneumonia",
        DX,
        [
            "PNA",
            "multifocal pneumonia",
            "community-acquired pneumonia",
            "community acquired pneumonia",
            "lobar pneumonia",
        ],
        snomed="233604007",
    ),
    _c("PC0144", "viral pneumonia", DX, ["viral pneumonitis"], snomed="75570004"),
    _c(
        "PC0145",
        "bacterial pneumonia",
        DX,
        [
            "bacterial superinfection",
            "superimposed bacterial pneumonia",
            "superimposed bacterial infection",
        ],
    ),
    _c("PC0146", "influenza", DX, ["flu", "influenza A", "influenza B"], snomed="6142004"),
    _c("PC0147", "acute bronchitis", DX, ["bronchitis"], snomed="10509002"),
    _c(
        "PC0148",
        "upper respiratory infection",
        DX,
        ["URI", "upper respiratory tract infection", "viral URI"],
        snomed="54150009",
    ),
    _c("PC0149", "sepsis", DX, ["septic"], snomed="91302008"),
    _c("PC0150", "septic shock", DX, [], snomed="76571007"),
    _c("PC0151", "acute respiratory distress syndrome", DX, ["ARDS"], snomed="67782005"),
    _c(
        "PC0152",
        "acute respiratory failure",
        DX,
        [
            "respiratory failure",
            "hypoxic respiratory failure",
            "acute hypoxic respiratory failure",
            "acute hypoxemic respiratory failure",
            "AHRF",
        ],
        snomed="65710008",
    ),
    _c(
        "PC0153",
        "pulmonary embolism",
        DX,
        ["pulmonary embolus", "pulmonary emboli"],
        snomed="59282003",
    ),
    _c("PC0154", "deep vein thrombosis", DX, ["DVT", "deep venous thrombosis"], snomed="128053003"),
    _c("PC0155", "acute kidney injury", DX, ["AKI", "acute renal failure"], snomed="14669001"),
    _c("PC0156", "myocarditis", DX, [], snomed="50920009"),
    _c(
        "PC0157",
        "dehydration",
        DX,
        ["dehydrated", "volume depletion", "hypovolemia"],
        snomed="34095006",
    ),
    _c("PC0158", "pharyngitis", DX, ["strep throat"], snomed="405737000"),
    _c("PC0159", "sinusitis", DX, ["sinus infection"], snomed="36971009"),
    _c("PC0160", "urinary tract infection", DX, ["UTI"], snomed="68566005"),
    _c("PC0161", "gastroenteritis", DX, ["stomach flu"], snomed="25374005"),
    _c("PC0162", "asthma exacerbation", DX, ["asthma attack", "exacerbation of asthma"]),
    _c(
        "PC0163",
        "COPD exacerbation",
        DX,
        ["AECOPD", "exacerbation of COPD", "acute exacerbation of COPD"],
        snomed="195951007",
    ),
    _c(
        "PC0164",
        "heart failure exacerbation",
        DX,
        ["CHF exacerbation", "decompensated heart failure", "acute on chronic heart failure"],
    ),
    _c("PC0165", "panic attack", DX, ["panic attacks"], snomed="225624000"),
    _c("PC0166", "viral syndrome", DX, ["viral illness", "viral infection"]),
    # --- laboratory findings ---------------------------------------------------------------
    _c(
        "PC0171",
        "positive SARS-CoV-2 test",
        LB,
        [
            "COVID positive",
            "COVID-19 positive",
            "tested positive for COVID",
            "tested positive for COVID-19",
            "positive COVID test",
            "positive COVID-19 test",
            "positive SARS-CoV-2 PCR",
            "SARS-CoV-2 PCR positive",
            "COVID PCR positive",
            "COVID-19 PCR positive",
            "positive for SARS-CoV-2",
            "positive for COVID-19",
        ],
    ),
    _c(
        "PC0172",
        "negative SARS-CoV-2 test",
        LB,
        [
            "COVID negative",
            "COVID-19 negative",
            "negative COVID test",
            "negative COVID-19 test",
            "SARS-CoV-2 PCR negative",
            "COVID PCR negative",
            "COVID-19 PCR negative",
            "negative for SARS-CoV-2",
            "negative for COVID-19",
            "tested negative for COVID",
        ],
    ),
    _c(
        "PC0173",
        "elevated D-dimer",
        LB,
        [
            "D-dimer elevated",
            "elevated d dimer",
            "high D-dimer",
            "D-dimer was elevated",
            "raised D-dimer",
        ],
    ),
    _c("PC0174", "lymphopenia", LB, ["lymphocytopenia", "low lymphocyte count", "lymphopenic"]),
    _c("PC0175", "leukocytosis", LB, ["elevated white count", "elevated WBC"], snomed="111583006"),
    _c("PC0176", "leukopenia", LB, ["low white count", "low WBC"], snomed="84828003"),
    _c(
        "PC0177",
        "thrombocytopenia",
        LB,
        ["low platelets", "low platelet count"],
        snomed="302215000",
    ),
    _c("PC0178", "anemia", LB, ["anaemia", "low hemoglobin"], snomed="271737000"),
    _c(
        "PC0179",
        "elevated C-reactive protein",
        LB,
        ["elevated CRP", "CRP elevated", "high CRP", "CRP was elevated"],
    ),
    _c(
        "PC0180",
        "elevated ferritin",
        LB,
        ["ferritin elevated", "hyperferritinemia", "high ferritin"],
    ),
    _c("PC0181", "elevated procalcitonin", LB, ["procalcitonin elevated"]),
    _c(
        "PC0182",
        "elevated troponin",
        LB,
        ["troponin elevated", "troponinemia", "troponin leak", "positive troponin"],
    ),
    _c("PC0183", "elevated BNP", LB, ["BNP elevated", "elevated NT-proBNP", "elevated pro-BNP"]),
    _c("PC0184", "elevated LDH", LB, ["LDH elevated", "elevated lactate dehydrogenase"]),
    _c("PC0185", "elevated creatinine", LB, ["creatinine elevated", "Cr elevated", "elevated Cr"]),
    _c("PC0186", "hyponatremia", LB, ["low sodium"], snomed="89627008"),
    _c("PC0187", "hyperkalemia", LB, ["high potassium"], snomed="14140009"),
    _c("PC0188", "hypokalemia", LB, ["low potassium"], snomed="43339004"),
    _c("PC0189", "hyperglycemia", LB, ["high blood sugar", "elevated glucose"], snomed="80394007"),
    _c(
        "PC0190", "elevated lactate", LB, ["lactate elevated", "lactic acidosis", "hyperlactatemia"]
    ),
    _c(
        "PC0191",
        "transaminitis",
        LB,
        ["elevated LFTs", "elevated liver enzymes", "elevated transaminases"],
    ),
    _c(
        "PC0192",
        "bacteremia",
        LB,
        ["positive blood cultures", "positive blood culture"],
        snomed="5758002",
    ),
    # --- radiology findings ----------------------------------------------------------------
    _c(
        "PC0201",
        "consolidation",
        RAD,
        [
            "consolidations",
            "consolidative opacity",
            "consolidative opacities",
            "airspace consolidation",
            "lobar consolidation",
        ],
        snomed="95436008",
        radlex="RID43255",
    ),
    _c(
        "PC0202",
        "airspace opacity",
        RAD,
        [
            "airspace opacities",
            "airspace disease",
            "opacity",
            "opacities",
            "opacification",
            "infiltrate",
            "infiltrates",
            "patchy opacities",
            "patchy opacity",
        ],
    ),
    _c(
        "PC0203",
        "bilateral multifocal opacities",
        RAD,
        [
            "bilateral opacities",
            "bilateral infiltrates",
            "multifocal opacities",
            "bilateral patchy opacities",
            "multifocal airspace opacities",
            "bilateral airspace opacities",
            "multifocal infiltrates",
        ],
    ),
    _c(
        "PC0204",
        "ground-glass opacity",
        RAD,
        [
            "ground glass opacity",
            "ground-glass opacities",
            "ground glass opacities",
            "GGO",
            "GGOs",
            "ground-glass opacification",
            "ground glass opacification",
        ],
        radlex="RID28531",
    ),
    _c(
        "PC0205",
        "pleural effusion",
        RAD,
        ["pleural effusions", "effusion", "effusions", "pleural fluid"],
        snomed="60046008",
        radlex="RID34539",
    ),
    _c(
        "PC0206",
        "cardiomegaly",
        RAD,
        [
            "enlarged cardiac silhouette",
            "enlarged heart",
            "cardiac enlargement",
            "enlarged heart size",
        ],
        snomed="8186001",
    ),
    _c(
        "PC0207",
        "pneumothorax",
        RAD,
        ["pneumothoraces", "PTX"],
        snomed="36118008",
        radlex="RID5352",
    ),
    _c(
        "PC0208",
        "pulmonary nodule",
        RAD,
        [
            "nodule",
            "nodules",
            "pulmonary nodules",
            "lung nodule",
            "lung nodules",
            "nodular opacity",
            "nodular opacities",
        ],
        radlex="RID3875",
    ),
    _c("PC0209", "lung mass", RAD, ["pulmonary mass", "mass"], radlex="RID3874"),
    _c(
        "PC0210",
        "atelectasis",
        RAD,
        [
            "atelectatic",
            "subsegmental atelectasis",
            "atelectatic changes",
            "bibasilar atelectasis",
            "plate-like atelectasis",
        ],
        snomed="46621007",
        radlex="RID28493",
    ),
    _c(
        "PC0211",
        "pulmonary edema",
        RAD,
        ["interstitial edema", "alveolar edema", "pulmonary oedema"],
        snomed="19242006",
    ),
    _c("PC0212", "pulmonary vascular congestion", RAD, ["vascular congestion", "cephalization"]),
    _c(
        "PC0213",
        "interstitial opacities",
        RAD,
        [
            "reticular opacities",
            "interstitial markings",
            "increased interstitial markings",
            "reticulonodular opacities",
        ],
    ),
    _c("PC0214", "crazy paving", RAD, ["crazy-paving", "crazy paving pattern"]),
    _c("PC0215", "emphysema", RAD, ["emphysematous changes"], snomed="87433001"),
    _c(
        "PC0216",
        "hyperinflation",
        RAD,
        ["hyperinflated lungs", "hyperexpanded lungs", "hyperexpansion"],
    ),
    _c("PC0217", "pericardial effusion", RAD, [], snomed="373945007"),
    _c("PC0218", "pleural thickening", RAD, []),
    _c("PC0219", "pulmonary fibrosis", RAD, ["fibrotic changes", "fibrosis", "scarring"]),
    _c(
        "PC0220",
        "lymphadenopathy",
        RAD,
        ["hilar lymphadenopathy", "mediastinal lymphadenopathy", "hilar enlargement"],
    ),
    _c("PC0221", "rib fracture", RAD, ["rib fractures", "fractured rib"], snomed="33737001"),
    _c("PC0222", "pneumomediastinum", RAD, []),
    _c("PC0223", "subcutaneous emphysema", RAD, ["subcutaneous air"]),
    _c("PC0224", "widened mediastinum", RAD, ["mediastinal widening"]),
    _c("PC0225", "elevated hemidiaphragm", RAD, []),
    _c(
        "PC0226",
        "no acute cardiopulmonary abnormality",
        RAD,
        [
            "no acute cardiopulmonary process",
            "no acute cardiopulmonary disease",
            "no acute intrathoracic process",
            "normal chest radiograph",
            "unremarkable chest radiograph",
            "no acute cardiopulmonary findings",
        ],
    ),
    _c(
        "PC0227",
        "peribronchial thickening",
        RAD,
        ["peribronchial cuffing", "bronchial wall thickening"],
    ),
    _c("PC0228", "bronchiectasis", RAD, [], snomed="12295008"),
    _c("PC0229", "cavitary lesion", RAD, ["cavitation", "cavity"]),
    _c("PC0230", "mucus plugging", RAD, ["mucous plugging", "mucus plug"]),
    # --- support devices (radiology) -------------------------------------------------------
    _c("PC0241", "endotracheal tube", DEV, ["ET tube", "ETT"]),
    _c(
        "PC0242",
        "enteric tube",
        DEV,
        [
            "nasogastric tube",
            "NG tube",
            "NGT",
            "orogastric tube",
            "OG tube",
            "feeding tube",
            "Dobhoff tube",
        ],
    ),
    _c(
        "PC0243",
        "central venous catheter",
        DEV,
        ["central line", "CVC", "internal jugular catheter", "IJ catheter", "IJ central line"],
    ),
    _c("PC0244", "peripherally inserted central catheter", DEV, ["PICC", "PICC line"]),
    _c("PC0245", "chest tube", DEV, ["pleural drain", "pigtail catheter", "thoracostomy tube"]),
    _c(
        "PC0246",
        "cardiac pacemaker",
        DEV,
        ["pacemaker", "AICD", "defibrillator", "pacer leads", "ICD leads"],
    ),
    _c("PC0247", "tracheostomy tube", DEV, ["tracheostomy", "trach tube"]),
    _c("PC0248", "sternotomy wires", DEV, ["median sternotomy wires", "sternal wires"]),
    _c("PC0249", "support devices", DEV, ["lines and tubes", "support device"], snomed="49062001"),
    # --- treatments ------------------------------------------------------------------------
    _c(
        "PC0261",
        "supplemental oxygen",
        TX,
        [
            "supplemental O2",
            "oxygen therapy",
            "nasal cannula",
            "oxygen via nasal cannula",
            "O2 via nasal cannula",
            "O2 via NC",
            "placed on oxygen",
            "started on oxygen",
            "oxygen requirement",
            "new oxygen requirement",
            "O2 requirement",
            "required oxygen",
        ],
        snomed="57485005",
    ),
    _c(
        "PC0262",
        "high-flow nasal cannula",
        TX,
        ["HFNC", "high flow nasal cannula", "high-flow oxygen", "heated high flow"],
    ),
    _c(
        "PC0263",
        "noninvasive ventilation",
        TX,
        [
            "BiPAP",
            "CPAP",
            "NIV",
            "non-invasive ventilation",
            "NIPPV",
            "non-invasive positive pressure ventilation",
        ],
    ),
    _c(
        "PC0264",
        "endotracheal intubation",
        TX,
        ["intubated", "intubation", "emergent intubation"],
        snomed="112798008",
    ),
    _c(
        "PC0265",
        "mechanical ventilation",
        TX,
        ["mechanically ventilated", "on the ventilator", "ventilator support"],
    ),
    _c(
        "PC0266",
        "prone positioning",
        TX,
        ["proning", "awake proning", "placed prone", "self-proning"],
    ),
    _c("PC0267", "dexamethasone", TX, ["decadron"], snomed="372584003"),
    _c("PC0268", "methylprednisolone", TX, ["solumedrol", "Solu-Medrol"]),
    _c("PC0269", "prednisone", TX, [], snomed="116602009"),
    _c(
        "PC0270",
        "systemic corticosteroids",
        TX,
        ["steroids", "corticosteroids", "systemic steroids", "steroid burst"],
    ),
    _c("PC0271", "remdesivir", TX, ["Veklury"]),
    _c("PC0272", "tocilizumab", TX, ["Actemra"]),
    _c("PC0273", "convalescent plasma", TX, ["COVID convalescent plasma"]),
    _c(
        "PC0274",
        "anti-SARS-CoV-2 monoclonal antibody",
        TX,
        [
            "bamlanivimab",
            "casirivimab",
            "monoclonal antibody infusion",
            "monoclonal antibody",
            "monoclonal antibodies",
        ],
    ),
    _c("PC0275", "hydroxychloroquine", TX, ["Plaquenil"]),
    _c(
        "PC0276",
        "anticoagulation",
        TX,
        [
            "anticoagulated",
            "anticoagulant",
            "therapeutic anticoagulation",
            "blood thinner",
            "blood thinners",
        ],
    ),
    _c(
        "PC0277",
        "heparin",
        TX,
        ["heparin drip", "heparin gtt", "unfractionated heparin"],
        snomed="372877000",
    ),
    _c("PC0278", "enoxaparin", TX, ["Lovenox"], snomed="372562003"),
    _c("PC0279", "apixaban", TX, ["Eliquis"]),
    _c("PC0280", "warfarin", TX, ["Coumadin"], snomed="372756006"),
    _c("PC0281", "antibiotics", TX, ["antibiotic", "abx", "antibiotic therapy"]),
    _c(
        "PC0282",
        "azithromycin",
        TX,
        ["Zithromax", "azithro", "Z-pak", "Z-pack"],
        snomed="387531004",
    ),
    _c("PC0283", "ceftriaxone", TX, ["Rocephin"], snomed="372670001"),
    _c("PC0284", "doxycycline", TX, []),
    _c("PC0285", "acetaminophen", TX, ["Tylenol", "paracetamol", "APAP"], snomed="387517004"),
    _c("PC0286", "ibuprofen", TX, ["Motrin", "Advil"], snomed="387207008"),
    _c(
        "PC0287",
        "intravenous fluids",
        TX,
        [
            "IV fluids",
            "IVF",
            "fluid bolus",
            "NS bolus",
            "normal saline bolus",
            "LR bolus",
            "IV fluid bolus",
        ],
    ),
    _c(
        "PC0288",
        "albuterol",
        TX,
        ["salbutamol", "albuterol nebulizer", "ProAir", "Ventolin"],
        snomed="372897005",
    ),
    _c("PC0289", "ipratropium", TX, ["DuoNeb", "Atrovent"]),
    _c("PC0290", "ondansetron", TX, ["Zofran"]),
    _c("PC0291", "benzonatate", TX, ["Tessalon", "Tessalon Perles"]),
    _c(
        "PC0292",
        "home oxygen",
        TX,
        [
            "home O2",
            "home oxygen therapy",
            "portable oxygen",
            "discharged on oxygen",
            "home oxygen prescription",
        ],
    ),
    _c(
        "PC0293",
        "home pulse oximetry",
        TX,
        ["home pulse oximeter", "pulse oximeter at home", "home oximetry monitoring"],
    ),
    _c("PC0294", "guaifenesin", TX, ["Mucinex"]),
    _c("PC0295", "aspirin", TX, ["ASA"], snomed="387458008"),
    _c("PC0296", "oseltamivir", TX, ["Tamiflu"]),
    _c("PC0297", "budesonide", TX, ["Pulmicort"]),
    # --- dispositions ----------------------------------------------------------------------
    _c(
        "PC0321",
        "discharged home",
        DISP,
        [
            "discharge home",
            "discharged to home",
            "sent home",
            "discharged home with self-care",
            "discharge to home",
        ],
        snomed="306689006",
    ),
    _c(
        "PC0322",
        "admitted to hospital",
        DISP,
        [
            "admitted",
            "admit to medicine",
            "admitted to medicine",
            "admitted to the hospital",
            "hospital admission",
            "admit to hospitalist",
            "admitted to the hospitalist service",
        ],
        snomed="32485007",
    ),
    _c(
        "PC0323",
        "admitted to intensive care",
        DISP,
        [
            "admitted to the ICU",
            "ICU admission",
            "admit to ICU",
            "admitted to ICU",
            "transferred to the ICU",
            "admitted to the intensive care unit",
        ],
        snomed="305351004",
    ),
    _c(
        "PC0324",
        "transferred to another facility",
        DISP,
        [
            "transferred to another hospital",
            "transfer to outside hospital",
            "transferred to a tertiary center",
            "interfacility transfer",
        ],
    ),
    _c(
        "PC0325",
        "left against medical advice",
        DISP,
        ["left AMA", "AMA", "signed out against medical advice", "signed out AMA"],
        snomed="225928004",
    ),
    _c("PC0326", "left without being seen", DISP, ["LWBS"]),
    _c("PC0327", "eloped", DISP, ["elopement", "eloped from the department"]),
    _c(
        "PC0328",
        "discharged to skilled nursing facility",
        DISP,
        [
            "discharged to SNF",
            "discharged to nursing home",
            "returned to nursing home",
            "discharged back to facility",
        ],
    ),
    _c(
        "PC0329",
        "observation stay",
        DISP,
        [
            "placed in observation",
            "observation status",
            "admitted to observation",
            "observation unit",
        ],
    ),
    _c(
        "PC0330",
        "death in the emergency department",
        DISP,
        ["expired", "pronounced dead", "deceased"],
        snomed="419099009",
    ),
    _c(
        "PC0331",
        "home isolation advised",
        DISP,
        [
            "home quarantine",
            "self-isolation",
            "self-quarantine",
            "home isolation",
            "quarantine at home",
            "isolate at home",
            "self isolate",
        ],
    ),
    _c(
        "PC0332",
        "primary care follow-up",
        DISP,
        [
            "follow up with PCP",
            "follow-up with PCP",
            "follow up with primary care",
            "follow-up with primary care",
            "PCP follow-up",
        ],
    ),
    _c(
        "PC0333",
        "return precautions given",
        DISP,
        ["return precautions", "strict return precautions"],
    ),
)


def default_lexicon() -> Lexicon:
    """The project lexicon, validated (cheap: build it where needed, no shared instance)."""
    return Lexicon(CONCEPTS)


# --- SNOMED CT identifier check ----------------------------------------------------------------

_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def snomed_id_is_well_formed(sctid: str) -> bool:
    """True for a 6-18 digit SNOMED CT concept identifier with a valid Verhoeff check digit.

    The partition identifier (the two digits before the check digit) must be ``00`` or ``10``,
    the concept partitions of the international edition and of extensions.
    """
    if not (sctid.isdigit() and 6 <= len(sctid) <= 18 and sctid[0] != "0"):
        return False
    if sctid[-3:-1] not in ("00", "10"):
        return False
    check = 0
    for i, digit in enumerate(reversed(sctid)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][int(digit)]]
    return check == 0


# --- section headers ---------------------------------------------------------------------------
# (category, header text). Headers are matched case-insensitively and need their colon, so that
# "history of present illness" inside a sentence is not taken for a header.
SECTION_HEADERS: tuple[tuple[str, str], ...] = (
    ("chief_complaint", "chief complaint:"),
    ("chief_complaint", "cc:"),
    ("chief_complaint", "reason for visit:"),
    ("history_of_present_illness", "history of present illness:"),
    ("history_of_present_illness", "history of presenting illness:"),
    ("history_of_present_illness", "hpi:"),
    ("past_medical_history", "past medical history:"),
    ("past_medical_history", "pmh:"),
    ("past_medical_history", "pmhx:"),
    ("past_medical_history", "medical history:"),
    ("past_medical_history", "past history:"),
    ("past_medical_history", "past surgical history:"),
    ("medications", "medications:"),
    ("medications", "home medications:"),
    ("medications", "current medications:"),
    ("medications", "meds:"),
    ("allergies", "allergies:"),
    ("family_history", "family history:"),
    ("family_history", "fhx:"),
    ("family_history", "fh:"),
    ("social_history", "social history:"),
    ("social_history", "shx:"),
    ("social_history", "sh:"),
    ("review_of_systems", "review of systems:"),
    ("review_of_systems", "ros:"),
    ("vital_signs", "vital signs:"),
    ("vital_signs", "vitals:"),
    ("vital_signs", "triage vitals:"),
    ("physical_exam", "physical exam:"),
    ("physical_exam", "physical examination:"),
    ("physical_exam", "exam:"),
    ("labs", "labs:"),
    ("labs", "laboratory:"),
    ("labs", "laboratory results:"),
    ("imaging", "imaging:"),
    ("imaging", "radiology:"),
    ("imaging", "chest x-ray:"),
    ("imaging", "cxr:"),
    ("ed_course", "ed course:"),
    ("ed_course", "emergency department course:"),
    ("ed_course", "course:"),
    ("assessment_and_plan", "assessment and plan:"),
    ("assessment_and_plan", "assessment/plan:"),
    ("assessment_and_plan", "a/p:"),
    ("assessment_and_plan", "assessment:"),
    ("assessment_and_plan", "plan:"),
    ("assessment_and_plan", "medical decision making:"),
    ("assessment_and_plan", "mdm:"),
    ("diagnoses", "diagnosis:"),
    ("diagnoses", "diagnoses:"),
    ("diagnoses", "final diagnosis:"),
    ("diagnoses", "clinical impression:"),
    ("disposition", "disposition:"),
    ("disposition", "dispo:"),
    ("discharge_instructions", "discharge instructions:"),
    ("discharge_instructions", "patient instructions:"),
    ("discharge_instructions", "return precautions:"),
    ("indication", "indication:"),
    ("indication", "clinical history:"),
    ("indication", "history:"),
    ("indication", "clinical details:"),
    ("indication", "clinical information:"),
    ("indication", "clinical indication:"),
    ("indication", "reason for exam:"),
    ("indication", "reason for examination:"),
    ("indication", "reason for study:"),
    ("comparison", "comparison:"),
    ("technique", "technique:"),
    ("findings", "findings:"),
    ("impression", "impression:"),
    ("impression", "conclusion:"),
    ("impression", "opinion:"),
)

# Sections whose content is, by where it is written, about the past, a relative, or advice.
HISTORICAL_SECTIONS = frozenset({"past_medical_history"})
FAMILY_SECTIONS = frozenset({"family_history"})
HYPOTHETICAL_SECTIONS = frozenset({"discharge_instructions"})


# --- ConText rule edits ------------------------------------------------------------------------
# medspacy's default English ConText rules are used, less the ones named here, plus the project's
# rules below. Each removal says why in the comment next to it.
REMOVED_DEFAULT_CONTEXT_LITERALS = frozenset(
    {
        # Backward ": no" negated the finding *before* a header colon: "IMPRESSION: No effusion"
        # negated nothing and "Fever: no" style is re-added below with a required full stop.
        ": no",
        ": none",
        # Forward-only "resolved" missed "pneumothorax has resolved"; re-added as backward.
        "resolved",
        # "evaluate for pneumonia" is an open question, not a denial: re-added as possible.
        "evaluate for",
        # Re-added below with the exposure concept excluded ("wife has COVID" is about the wife,
        # "exposure to his COVID-positive wife" is the patient's exposure).
        "family",
    }
)

_RELATIVES = [
    "mother",
    "father",
    "mom",
    "dad",
    "sister",
    "brother",
    "sibling",
    "siblings",
    "parent",
    "parents",
    "grandmother",
    "grandfather",
    "aunt",
    "uncle",
    "son",
    "daughter",
    "cousin",
    "husband",
    "wife",
    "spouse",
    "partner",
    "grandparents",
]
_STOP_TOKENS = {"TEXT": {"REGEX": r"^(?:[.;,]|\n+)$"}}


@dataclass(frozen=True)
class AssertionRule:
    """A ConText rule in plain data; ``pattern`` is a spaCy Matcher token pattern or None."""

    literal: str
    category: str
    direction: str
    pattern: tuple[Mapping[str, Any], ...] | None = None
    # Concept codes this rule never modifies (e.g. "exposure" is not the relative's illness).
    excluded_codes: frozenset[str] = frozenset()


def project_assertion_rules() -> list[AssertionRule]:
    """The project's ConText rules, added to medspacy's defaults (built fresh on each call)."""
    neg, poss, hyp = "NEGATED_EXISTENCE", "POSSIBLE_EXISTENCE", "HYPOTHETICAL"
    hist, fam = "HISTORICAL", "FAMILY"
    fwd, bwd, bidir, term, pseudo = "FORWARD", "BACKWARD", "BIDIRECTIONAL", "TERMINATE", "PSEUDO"
    no_words = ["no", "none", "negative", "absent", "denies", "denied"]
    not_words = ["not", "n't"]
    exposure = frozenset({"PC0125"})
    return [
        # "Fever: no." -- a yes/no list; the stop token after "no" keeps "IMPRESSION: No x" out.
        AssertionRule(
            ": no.", neg, bwd, ({"ORTH": ":"}, {"LOWER": {"IN": no_words}}, _STOP_TOKENS)
        ),
        AssertionRule(
            "- no.", neg, bwd, ({"ORTH": "-"}, {"LOWER": {"IN": no_words}}, _STOP_TOKENS)
        ),
        # Both ways: "the pneumothorax has resolved" and an impression's "resolved pneumonia".
        AssertionRule(
            "resolved",
            neg,
            bidir,
            (
                {"LOWER": {"IN": ["has", "have", "had"]}, "OP": "?"},
                {"LOWER": {"IN": ["resolved", "cleared", "re-expanded", "reexpanded"]}},
            ),
        ),
        # A device taken out: "interval removal of the ETT", "chest tube removed".
        AssertionRule("removed", neg, bidir, ({"LOWER": {"IN": ["removed", "removal"]}},)),
        AssertionRule(
            "no longer seen",
            neg,
            bwd,
            (
                {"LOWER": "no"},
                {"LOWER": "longer"},
                {"LOWER": {"IN": ["seen", "visualized", "identified", "present", "evident"]}},
            ),
        ),
        AssertionRule(
            "resolution of",
            neg,
            fwd,
            ({"LOWER": {"IN": ["resolution", "resolved"]}}, {"LOWER": "of"}),
        ),
        AssertionRule("no longer", neg, fwd, ({"LOWER": "no"}, {"LOWER": "longer"})),
        # "No significant change in the effusion" reports the effusion; it denies a change.
        AssertionRule(
            "no change",
            neg,
            pseudo,
            (
                {"LOWER": "no"},
                {
                    "LOWER": {"IN": ["significant", "substantial", "interval", "appreciable"]},
                    "OP": "*",
                },
                {"LOWER": {"IN": ["change", "changes", "progression"]}},
            ),
        ),
        AssertionRule(
            "is not seen",
            neg,
            bwd,
            (
                {"LOWER": {"IN": ["is", "are", "was", "were"]}},
                {"LOWER": {"IN": not_words}},
                {"LOWER": {"IN": ["seen", "identified", "present", "visualized", "appreciated"]}},
            ),
        ),
        AssertionRule(
            "is absent",
            neg,
            bwd,
            ({"LOWER": {"IN": ["is", "are", "was", "were"]}}, {"LOWER": "absent"}),
        ),
        AssertionRule(
            "without evidence of",
            neg,
            fwd,
            ({"LOWER": "without"}, {"LOWER": "evidence"}, {"LOWER": {"IN": ["of", "for"]}}),
        ),
        # "cannot rule out" is a possibility; longer than "can not" (negation) so it wins.
        AssertionRule(
            "cannot rule out",
            poss,
            fwd,
            (
                {"LOWER": {"IN": ["can", "could", "cannot"]}},
                {"LOWER": {"IN": not_words}, "OP": "?"},
                {"LOWER": {"IN": ["rule", "exclude"]}},
                {"LOWER": "out", "OP": "?"},
            ),
        ),
        AssertionRule(
            "cannot be excluded",
            poss,
            bwd,
            (
                {"LOWER": {"IN": ["cannot", "can", "could"]}},
                {"LOWER": {"IN": not_words}, "OP": "?"},
                {"LOWER": "be"},
                {"LOWER": {"IN": ["excluded", "ruled"]}},
                {"LOWER": "out", "OP": "?"},
            ),
        ),
        # The optional verb makes this longer than the default "is not" negation, so it wins.
        AssertionRule(
            "not excluded",
            poss,
            bwd,
            (
                {"LOWER": {"IN": ["is", "are", "was", "were"]}, "OP": "?"},
                {"LOWER": {"IN": not_words}},
                {"LOWER": "excluded"},
            ),
        ),
        AssertionRule(
            "evaluate for",
            poss,
            fwd,
            ({"LOWER": {"IN": ["evaluate", "evaluation", "eval", "assess"]}}, {"LOWER": "for"}),
        ),
        AssertionRule(
            "probable",
            poss,
            fwd,
            (
                {
                    "LOWER": {
                        "IN": [
                            "probable",
                            "questionable",
                            "equivocal",
                            "presumed",
                            "suspected",
                            "presumptive",
                            "borderline",
                            "possibly",
                            "probably",
                            "likely",
                            "questionably",
                        ]
                    }
                },
            ),
        ),
        AssertionRule(
            "concern for",
            poss,
            fwd,
            (
                {"LOWER": {"IN": ["concern", "concerning", "worrisome"]}},
                {"LOWER": {"IN": ["for", "about"]}},
            ),
        ),
        AssertionRule(
            "may represent",
            poss,
            fwd,
            (
                {"LOWER": {"IN": ["may", "might", "could", "can"]}},
                {"LOWER": {"IN": ["represent", "reflect", "indicate"]}},
            ),
        ),
        AssertionRule(
            "may be",
            poss,
            fwd,
            ({"LOWER": {"IN": ["may", "could"]}}, {"LOWER": "be"}),
        ),
        AssertionRule("versus", poss, bidir, ({"LOWER": {"IN": ["versus", "vs", "vs."]}},)),
        AssertionRule(
            "differential includes",
            poss,
            fwd,
            ({"LOWER": "differential"}, {"LOWER": {"IN": ["includes", "diagnosis"]}, "OP": "?"}),
        ),
        AssertionRule(
            "is possible",
            poss,
            bwd,
            (
                {"LOWER": {"IN": ["is", "are"]}},
                {"LOWER": {"IN": ["possible", "likely", "suspected"]}},
            ),
        ),
        AssertionRule(
            "return for",
            hyp,
            fwd,
            (
                {"LOWER": {"IN": ["return", "come"]}},
                {"LOWER": "back", "OP": "?"},
                {"LOWER": "to", "OP": "?"},
                {"LOWER": "the", "OP": "?"},
                {"LOWER": {"IN": ["ed", "er", "hospital"]}, "OP": "?"},
                {"LOWER": {"IN": ["for", "if"]}},
            ),
        ),
        AssertionRule(
            "in case of", hyp, fwd, ({"LOWER": "in"}, {"LOWER": "case"}, {"LOWER": "of"})
        ),
        AssertionRule(
            "history of", hist, fwd, ({"LOWER": {"IN": ["history", "hx", "h/o"]}}, {"LOWER": "of"})
        ),
        AssertionRule(
            "previous",
            hist,
            fwd,
            ({"LOWER": {"IN": ["previous", "prior", "remote", "previously"]}},),
        ),
        AssertionRule(
            "in the past", hist, bwd, ({"LOWER": "in"}, {"LOWER": "the"}, {"LOWER": "past"})
        ),
        # "Diabetes in his mother": the default family rule only looks forward.
        AssertionRule(
            "in mother",
            fam,
            bwd,
            (
                {"LOWER": "in"},
                {"LOWER": {"IN": ["his", "her", "their", "the", "a"]}, "OP": "?"},
                {"LOWER": {"IN": _RELATIVES}},
            ),
            excluded_codes=exposure,
        ),
        AssertionRule(
            "family",
            fam,
            fwd,
            ({"LOWER": {"IN": [*_RELATIVES, "family"]}}, {"LOWER": {"IN": ["'s", "'"]}, "OP": "?"}),
            excluded_codes=exposure,
        ),
        # The relative is the informant or a companion, not the one with the condition.
        AssertionRule(
            "per mother",
            fam,
            pseudo,
            (
                {"LOWER": {"IN": ["per", "according", "accompanied", "by"]}},
                {"LOWER": {"IN": ["to", "by"]}, "OP": "?"},
                {"LOWER": {"IN": ["his", "her", "the", "their"]}, "OP": "?"},
                {"LOWER": {"IN": _RELATIVES}},
            ),
        ),
        AssertionRule(
            "mother reports",
            fam,
            pseudo,
            (
                {"LOWER": {"IN": _RELATIVES}},
                {
                    "LOWER": {
                        "IN": ["reports", "states", "says", "notes", "at", "brought", "noticed"]
                    }
                },
            ),
        ),
        # An affirming cue ends a preceding denial's scope: "denies fever, reports cough".
        # ("has"/"with" are not cues: they would cut "mother has diabetes" short.)
        AssertionRule(
            "reports",
            "AFFIRMED",
            term,
            ({"LOWER": {"IN": ["reports", "endorses", "complains", "admits", "notes"]}},),
        ),
        AssertionRule(
            "positive for",
            "AFFIRMED",
            term,
            ({"LOWER": {"IN": ["positive", "pos", "+"]}}, {"LOWER": "for"}),
        ),
        AssertionRule(";", "AFFIRMED", term, ({"ORTH": ";"},)),
    ]
