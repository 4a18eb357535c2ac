"""What a report says of each finding: the words that name it, the normal statements that deny it.

Defaults cover the demo model's findings and common chest radiograph findings; a bundle's finding
may add its own terms (``report_terms`` in bundle.json), and a site file may add more. Terms are
matched case-insensitively on whole tokens; normal statements ("the lungs are clear", "heart size
is normal") are regular expressions, since radiologists vary their wording too much for phrases.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from plugin.concepts.lexicon import Category, Concept, Lexicon
from plugin.errors import ConfigError

# Prefixes of the labeler's own concept codes: a term of the finding, or a normal statement.
TERM_PREFIX = "T:"
NORMAL_PREFIX = "N:"


@dataclass(frozen=True)
class FindingTerms:
    """The words for one finding (``terms``) and the normal statements that mean it is absent."""

    finding: str
    terms: tuple[str, ...]
    normal_patterns: tuple[str, ...] = ()
    # Regular expressions for wordings too varied for phrases ("the heart is mildly enlarged").
    term_patterns: tuple[str, ...] = ()


_ENLARGED = r"(?:mildly |moderately |markedly |severely |slightly |minimally )?enlarged"
_HEART = (
    r"(?:heart size|heart|cardiac size|cardiac silhouette|cardiomediastinal silhouette"
    r"|cardiomediastinal contours?|cardiac contours?|heart and mediastinum"
    r"|cardiac and mediastinal contours?|cardiac and mediastinal silhouettes?)"
)

DEFAULT_TERMS: tuple[FindingTerms, ...] = (
    FindingTerms(
        "consolidation",
        (
            "consolidation",
            "consolidations",
            "consolidative opacity",
            "consolidative opacities",
            "consolidative changes",
            "airspace consolidation",
            "pneumonia",
            "pneumonias",
            "bronchopneumonia",
            "airspace opacity",
            "airspace opacities",
            "air space opacity",
            "air space opacities",
            "air-space opacity",
            "air-space opacities",
            "airspace disease",
            "air space disease",
            "air-space disease",
            "infiltrate",
            "infiltrates",
            "pulmonary infiltrate",
            "pulmonary infiltrates",
        ),
        (r"\b(?:the )?lungs (?:are |remain |appear )?(?:\w+ )?clear\b", r"\bclear lungs\b"),
    ),
    FindingTerms(
        "pleural_effusion",
        (
            "pleural effusion",
            "pleural effusions",
            "effusion",
            "effusions",
            "pleural fluid",
            "hydrothorax",
            "blunting of the costophrenic angle",
            "blunting of the left costophrenic angle",
            "blunting of the right costophrenic angle",
            "blunting of the costophrenic angles",
            "costophrenic angle blunting",
            "costophrenic blunting",
        ),
        (
            r"\bcostophrenic (?:angles?|sulci|recesses) (?:are |is |remain )?(?:\w+ )?"
            r"(?:sharp|clear|preserved)\b",
            r"\bsharp costophrenic angles?\b",
        ),
    ),
    FindingTerms(
        "cardiomegaly",
        (
            "cardiomegaly",
            "enlarged cardiac silhouette",
            "enlarged heart",
            "enlarged heart size",
            "cardiac enlargement",
            "enlargement of the cardiac silhouette",
            "enlargement of the heart",
            "large heart",
            "large cardiac silhouette",
        ),
        term_patterns=(
            rf"\b{_HEART} (?:[\w-]+,? ){{0,5}}?{_ENLARGED}\b",
            rf"\b{_HEART} (?:is |are |remains? |appears? |looks? )?(?:\w+ )?large\b",
        ),
        normal_patterns=(
            rf"\b{_HEART} (?:is |are |remains? |appears? |looks? )?(?:\w+ ){{0,3}}?"
            r"(?:normal|within normal limits|wnl|unremarkable|upper limits? of normal)\b",
            rf"\bnormal (?:\w+ )?{_HEART}\b",
            rf"\b{_HEART} (?:is |are |remains? |appears? )?(?:\w+ )?normal in size\b",
            rf"\b{_HEART} (?:is |are |remains? |appears? )?(?:at |within )?(?:the )?"
            r"upper limits? of normal\b",
        ),
    ),
    FindingTerms(
        "pneumothorax",
        ("pneumothorax", "pneumothoraces", "PTX", "hydropneumothorax", "pneumothoraxes"),
    ),
    FindingTerms(
        "nodule",
        (
            "nodule",
            "nodules",
            "pulmonary nodule",
            "pulmonary nodules",
            "lung nodule",
            "nodular opacity",
            "nodular opacities",
            "nodular density",
            "mass",
            "masses",
            "lung mass",
            "pulmonary mass",
            "granuloma",
            "granulomas",
            "calcified granuloma",
            "calcified granulomas",
        ),
    ),
    FindingTerms(
        "support_devices",
        (
            "support devices",
            "support device",
            "medical devices",
            "medical device",
            "devices",
            "device",
            "lines",
            "tubes",
            "tubes/lines",
            "lines/tubes",
            "catheter",
            "catheters",
            "port",
            "chest port",
            "port catheter",
            "port-a-cath",
            "pacing wires",
            "pacing wire",
            "introducer sheath",
            "dialysis catheter",
            "gastrostomy tube",
            "chest drain",
            "chest drains",
            "intercostal drain",
            "drain",
            "lines and tubes",
            "lines or tubes",
            "tubes and lines",
            "tubes or lines",
            "endotracheal tube",
            "ET tube",
            "ETT",
            "enteric tube",
            "nasogastric tube",
            "NG tube",
            "NGT",
            "orogastric tube",
            "OG tube",
            "feeding tube",
            "Dobhoff tube",
            "Dobhoff",
            "central venous catheter",
            "central line",
            "central venous line",
            "CVC",
            "internal jugular catheter",
            "IJ catheter",
            "IJ line",
            "IJ central line",
            "PICC",
            "PICC line",
            "Swan-Ganz catheter",
            "pulmonary artery catheter",
            "chest tube",
            "chest tubes",
            "pleural drain",
            "pigtail catheter",
            "thoracostomy tube",
            "pacemaker",
            "pacer",
            "pacer leads",
            "pacemaker leads",
            "AICD",
            "ICD",
            "defibrillator",
            "ICD leads",
            "tracheostomy",
            "tracheostomy tube",
            "trach tube",
            "sternotomy wires",
            "median sternotomy wires",
            "sternal wires",
        ),
    ),
    FindingTerms(
        "atelectasis",
        (
            "atelectasis",
            "atelectatic",
            "atelectatic changes",
            "subsegmental atelectasis",
            "plate-like atelectasis",
            "platelike atelectasis",
            "discoid atelectasis",
            "bibasilar atelectasis",
            "lobar collapse",
            "collapse",
            "volume loss",
        ),
    ),
    FindingTerms(
        "pulmonary_edema",
        (
            "pulmonary edema",
            "pulmonary oedema",
            "edema",
            "oedema",
            "interstitial edema",
            "interstitial oedema",
            "alveolar edema",
            "alveolar oedema",
        ),
    ),
)


@dataclass(frozen=True)
class Vocabulary:
    """The terms of every finding a labeler answers for, in the order the findings are listed."""

    findings: tuple[FindingTerms, ...]
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        names = [f.finding for f in self.findings]
        if len(set(names)) != len(names):
            raise ConfigError(f"a finding is listed twice in the report vocabulary: {names}")
        canonical = json.dumps(
            [
                [f.finding, sorted(f.terms), sorted(f.term_patterns), sorted(f.normal_patterns)]
                for f in self.findings
            ]
        )
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.finding for f in self.findings)

    def lexicon(self) -> Lexicon:
        """The vocabulary as concepts for the project's medspacy pipeline.

        A term claimed by two findings goes to the first that lists it (for example a site file
        that adds "opacity" to two findings): the matcher must give each span one meaning.
        """
        claimed: set[str] = set()
        concepts: list[Concept] = []
        for entry in self.findings:
            terms = [t for t in dict.fromkeys(entry.terms) if t.lower() not in claimed]
            claimed.update(t.lower() for t in terms)
            if terms:
                concepts.append(
                    Concept(
                        TERM_PREFIX + entry.finding,
                        terms[0],
                        Category.RADIOLOGY_FINDING,
                        tuple(terms[1:]),
                        regexes=entry.term_patterns,
                    )
                )
            if entry.normal_patterns:
                concepts.append(
                    Concept(
                        NORMAL_PREFIX + entry.finding,
                        f"normal statement about {entry.finding}",
                        Category.RADIOLOGY_FINDING,
                        (),
                        regexes=entry.normal_patterns,
                    )
                )
        return Lexicon(tuple(concepts))


def default_vocabulary(findings: Sequence[str] | None = None) -> Vocabulary:
    """The default terms, for ``findings`` (in that order) or for every default finding."""
    return build_vocabulary(findings, extra=None)


def build_vocabulary(
    findings: Sequence[str] | None,
    extra: Mapping[str, Mapping[str, Sequence[str]]] | None,
    *,
    bundle_terms: Mapping[str, Sequence[str]] | None = None,
) -> Vocabulary:
    """Defaults, plus a bundle's ``report_terms``, plus a site file's additions.

    ``findings`` names the findings to label (a bundle's); a finding with no terms anywhere is
    refused, since it could never be labeled. ``extra`` maps a finding to ``terms``,
    ``patterns`` (regular expressions that name it) and ``normal`` (regular expressions of
    statements that deny it); it may also name findings the defaults do not know.
    """
    defaults = {f.finding: f for f in DEFAULT_TERMS}
    wanted = list(findings) if findings is not None else list(defaults)
    if findings is None and extra:
        wanted += [name for name in extra if name not in defaults]
    entries: list[FindingTerms] = []
    for name in wanted:
        base = defaults.get(name, FindingTerms(name, ()))
        added = (extra or {}).get(name, {})
        terms = (*base.terms, *(bundle_terms or {}).get(name, ()), *added.get("terms", ()))
        normal = (*base.normal_patterns, *added.get("normal", ()))
        if not terms:
            raise ConfigError(
                f"finding {name!r} has no report terms: add them to the bundle's finding "
                "(report_terms) or to the site's report vocabulary file (terms: [...])"
            )
        patterns = (*base.term_patterns, *added.get("patterns", ()))
        entries.append(FindingTerms(name, tuple(terms), tuple(normal), tuple(patterns)))
    return Vocabulary(tuple(entries))


def read_vocabulary_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A site's additions: YAML or JSON ``{finding: {terms: [...], patterns: [regex, ...],
    normal: [regex, ...]}}``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the report vocabulary {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of finding -> {{terms, normal}}")
    result: dict[str, dict[str, list[str]]] = {}
    for finding, entry in data.items():
        if not isinstance(entry, dict) or not set(entry) <= {"terms", "patterns", "normal"}:
            raise ConfigError(
                f"{path}: finding {finding!r} must map to 'terms', 'patterns' and/or 'normal' lists"
            )
        result[str(finding)] = {key: _strings(path, finding, key, entry[key]) for key in entry}
    return result


def _strings(path: Path, finding: str, key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{path}: {finding}.{key} must be a list of non-empty strings")
    return list(value)


def finding_of(code: str) -> tuple[str, bool]:
    """The finding a labeler concept code stands for, and whether it is a normal statement."""
    if code.startswith(NORMAL_PREFIX):
        return code[len(NORMAL_PREFIX) :], True
    return code[len(TERM_PREFIX) :], False
