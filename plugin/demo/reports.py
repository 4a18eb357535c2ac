"""Report sentences for the synthetic phantoms: many phrasings, split into train and held-out.

A *phrasing* is one way of saying something (a sentence frame filled with a noun phrase, or a
fixed sentence); it expands into *sentences* by filling its slots (side, size, lobe...). The
split into ``train`` and ``heldout`` is made per phrasing, before expansion, so a held-out
sentence is never a re-filled training sentence, and some frames are held out entirely
(e.g. every "... is not identified" sentence), which tests whether the text tower generalises
negation rather than memorising strings.

Every finding has positive phrasings (with synonyms, laterality and size words) and negative or
normal phrasings ("no pleural effusion", "the costophrenic angles are sharp", "lungs are
clear"); normal statements may cover several findings at once and are only true when all of
them are absent. Uncertainty ("possible", "cannot exclude") is deliberately not generated.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

from plugin.demo.phantom import (
    BILATERAL,
    CARDIOMEGALY,
    CONSOLIDATION,
    FINDINGS,
    LEFT,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    RIGHT,
    SUPPORT_DEVICES,
)

POSITIVE, NEGATIVE = "positive", "negative"
TRAIN, HELDOUT = "train", "heldout"

DISPLAY_NAMES: dict[str, str] = {
    CONSOLIDATION: "Consolidation",
    PLEURAL_EFFUSION: "Pleural effusion",
    CARDIOMEGALY: "Cardiomegaly",
    PNEUMOTHORAX: "Pneumothorax",
    NODULE: "Nodule",
    SUPPORT_DEVICES: "Support devices",
}

# Size words per finding for the phantom's three severity steps; "" means "no word".
_SIZE_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    PLEURAL_EFFUSION: {"small": ("small",), "moderate": ("moderate",), "large": ("large",)},
    PNEUMOTHORAX: {"small": ("small",), "moderate": ("moderate",), "large": ("large",)},
    CONSOLIDATION: {"small": ("small",), "moderate": ("moderate",), "large": ("extensive",)},
    NODULE: {"small": ("small", "tiny"), "moderate": ("",), "large": ("large",)},
    CARDIOMEGALY: {"small": ("mild",), "moderate": ("moderate",), "large": ("marked", "severe")},
}
_SIZE_ADVERBS = {"small": "mildly", "moderate": "moderately", "large": "markedly"}
_LOBE_ADJ = {
    (RIGHT, "upper"): "right upper lobe",
    (RIGHT, "middle"): "right middle lobe",
    (RIGHT, "lower"): "right lower lobe",
    (LEFT, "upper"): "left upper lobe",
    (LEFT, "middle"): "lingular",
    (LEFT, "lower"): "left lower lobe",
}
_LOBE_NOUN = {
    key: ("the lingula" if key == (LEFT, "middle") else f"the {adj}")
    for key, adj in _LOBE_ADJ.items()
}
_ZONES = {"upper": "upper zone", "middle": "mid zone", "lower": "lower zone"}
# Where "bilateral" reads naturally in a {side} slot ("bilateral pleural effusion", not
# "bilateral-sided" or "the bilateral lung").
_BILATERAL_SLOT = re.compile(
    r"{side} (pleural effusion|effusion|pleural fluid|consolidation|airspace disease|hydrothorax)"
)

# Frames for positive noun phrases. "{np}" is the bare phrase, "{np_a}" the phrase with its
# article (countable phrases are written "a ..." in the noun-phrase lists below).
_POSITIVE_FRAMES: tuple[str, ...] = (
    "{np}",
    "there is {np_a}",
    "{np_a} is present",
    "{np_a} is seen",
    "{np_a} is noted",
    "{np_a} is identified",
    "{np_a} is demonstrated",
    "{np_a} is visible",
    "evidence of {np}",
    "there is evidence of {np}",
    "findings consistent with {np}",
    "findings compatible with {np}",
    "radiographic evidence of {np}",
    "the radiograph shows {np_a}",
    "the film demonstrates {np_a}",
    "positive for {np}",
    "the study shows {np_a}",
    "we see {np_a}",
)
_NEGATIVE_FRAMES: tuple[str, ...] = (
    "no {np}",
    "no evidence of {np}",
    "there is no {np}",
    "there is no evidence of {np}",
    "no radiographic evidence of {np}",
    "without {np}",
    "negative for {np}",
    "{np} is not seen",
    "{np} is not identified",
    "{np} is absent",
    "{np} is not present",
    "no {np} is seen",
    "no {np} is identified",
    "no {np} is present",
    "no signs of {np}",
    "no visible {np}",
    "no findings of {np}",
    "the radiograph shows no {np}",
)
# Whole frames kept out of training, so held-out negations and positives use sentence
# shapes the text projection never saw.
_HELDOUT_FRAMES = frozenset(
    {
        "{np_a} is identified",
        "findings compatible with {np}",
        "the film demonstrates {np_a}",
        "{np} is not identified",
        "no signs of {np}",
        "no {np} is present",
    }
)

# Positive noun phrases per finding. Slots: {side} {size} {lobe} {lobe_noun} {zone} {ptx}.
_POSITIVE_NPS: dict[str, tuple[str, ...]] = {
    CONSOLIDATION: (
        "consolidation",
        "a focal consolidation",
        "airspace disease",
        "airspace consolidation",
        "a pulmonary infiltrate",
        "lobar consolidation",
        "an area of consolidation",
        "{side} consolidation",
        "{size} {side} consolidation",
        "{lobe} consolidation",
        "consolidation in {lobe_noun}",
        "airspace opacity in {lobe_noun}",
        "patchy airspace disease in {lobe_noun}",
        "a {lobe} infiltrate",
        "a patchy opacity in the {side} {zone}",
        "{size} airspace consolidation in the {side} lung",
        "{side} airspace disease",
        "a {side} lung infiltrate",
    ),
    PLEURAL_EFFUSION: (
        "a pleural effusion",
        "a {size} pleural effusion",
        "a {side} pleural effusion",
        "a {size} {side} pleural effusion",
        "a {size} {side} effusion",
        "a {side} effusion",
        "pleural fluid",
        "{side} pleural fluid",
        "fluid in the {side} pleural space",
        "a {side} basal meniscus",
        "blunting of the {side} costophrenic angle",
        "a {size} {side} hydrothorax",
        "fluid in the pleural space",
        "an effusion",
        "a {side}-sided pleural effusion",
    ),
    CARDIOMEGALY: (
        "cardiomegaly",
        "{size} cardiomegaly",
        "an enlarged heart",
        "an enlarged cardiac silhouette",
        "cardiac enlargement",
        "{size} cardiac enlargement",
        "enlargement of the cardiac silhouette",
        "an increased cardiothoracic ratio",
        "a large heart",
        "a {size} enlarged cardiac silhouette",
    ),
    PNEUMOTHORAX: (
        "a pneumothorax",
        "a {side} pneumothorax",
        "a {size} pneumothorax",
        "a {size} {side} pneumothorax",
        "a {side} {ptx} pneumothorax",
        "a {size} {side} {ptx} pneumothorax",
        "air in the {side} pleural space",
        "a visceral pleural line in the {side} hemithorax",
        "a {side}-sided pneumothorax",
        "pleural air",
        "a {side} pneumothorax with absent peripheral lung markings",
        "free air in the pleural space",
        "a collapsed {side} lung edge",
    ),
    NODULE: (
        "a pulmonary nodule",
        "a lung nodule",
        "a {size} pulmonary nodule",
        "a {side} lung nodule",
        "a {size} nodule in the {side} lung",
        "a {side} pulmonary nodule",
        "a solitary pulmonary nodule",
        "a round opacity in the {side} lung",
        "a {size} nodular opacity in the {side} lung",
        "a well circumscribed nodule",
        "a nodular opacity",
        "a {size} {side} lung nodule",
        "a rounded density in the {side} lung",
    ),
    SUPPORT_DEVICES: (
        "support devices",
        "lines and tubes",
        "medical devices",
        "a support device",
        "an indwelling catheter",
        "monitoring and support devices",
        "an endotracheal tube",
        "an endotracheal tube with its tip above the carina",
        "an ett in the trachea",
        "a {side} central venous catheter",
        "a {side} subclavian central line",
        "a central venous line",
        "a {side} central line with its tip in the superior vena cava",
        "a {side} pigtail catheter",
        "a {side} pleural drain",
        "a {side} pigtail drainage catheter",
        "a chest drain",
    ),
}
# Noun phrases that name a device variant (the rest of support_devices' phrases are generic).
_DEVICE_WORDS = {
    "endotracheal": "endotracheal_tube",
    "ett": "endotracheal_tube",
    "central": "central_line",
    "pigtail": "pigtail_drain",
    "pleural drain": "pigtail_drain",
    "chest drain": "pigtail_drain",
}
_NEGATIVE_NPS: dict[str, tuple[str, ...]] = {
    CONSOLIDATION: (
        "consolidation",
        "focal consolidation",
        "airspace disease",
        "focal airspace opacity",
        "pulmonary infiltrate",
        "lobar consolidation",
    ),
    PLEURAL_EFFUSION: ("pleural effusion", "effusion", "pleural fluid", "pleural effusions"),
    CARDIOMEGALY: ("cardiomegaly", "cardiac enlargement", "enlargement of the heart"),
    PNEUMOTHORAX: ("pneumothorax", "pleural air", "pneumothoraces", "air in the pleural space"),
    NODULE: ("pulmonary nodule", "lung nodule", "nodular opacity", "pulmonary nodules"),
    SUPPORT_DEVICES: ("support devices", "lines or tubes", "medical devices", "indwelling lines"),
}
# Whole positive sentences (not frames); slots as above, plus {size_adv}.
_POSITIVE_SENTENCES: dict[str, tuple[str, ...]] = {
    CONSOLIDATION: (
        "the {side} lower lung is consolidated",
        "air bronchograms in {lobe_noun}",
        "patchy opacification of the {side} {zone}",
    ),
    PLEURAL_EFFUSION: (
        "the {side} costophrenic angle is blunted",
        "{side} costophrenic angle blunting",
        "meniscus sign at the {side} base",
        "the {side} hemidiaphragm is obscured by fluid",
        "both costophrenic angles are blunted",
        "bilateral pleural effusions",
        "{size} bilateral effusions",
    ),
    CARDIOMEGALY: (
        "the heart is enlarged",
        "the heart is {size_adv} enlarged",
        "the cardiac silhouette is enlarged",
        "heart size is increased",
        "the cardiothoracic ratio is increased",
        "the heart is large",
        "the cardiac silhouette is {size_adv} enlarged",
    ),
    PNEUMOTHORAX: (
        "the {side} lung is partially collapsed",
        "no lung markings beyond the {side} pleural line",
        "the {side} lung edge is separated from the chest wall",
        "there is air between the {side} lung and the chest wall",
    ),
    NODULE: (
        "a nodule projects over the {side} lung",
        "there is a {size} {side} lung nodule",
        "a round nodule overlies the {side} hemithorax",
    ),
    SUPPORT_DEVICES: (
        "the patient is intubated",
        "tubes and lines are in place",
        "an endotracheal tube terminates above the carina",
        "a {side} central line terminates in the superior vena cava",
        "a pigtail catheter projects over the {side} lower chest",
        "support devices are in place",
    ),
}
_NEGATIVE_SENTENCES: dict[str, tuple[str, ...]] = {
    CONSOLIDATION: (
        "no focal lung opacity",
        "the lungs are free of consolidation",
        "there is no airspace consolidation",
        "no focal airspace disease is seen",
    ),
    PLEURAL_EFFUSION: (
        "the costophrenic angles are sharp",
        "costophrenic angles are clear",
        "sharp costophrenic angles",
        "the pleural spaces are free of fluid",
        "pleural spaces are clear",
        "both costophrenic angles are preserved",
        "the hemidiaphragms are well defined",
        "no fluid in the pleural spaces",
    ),
    CARDIOMEGALY: (
        "the heart is not enlarged",
        "heart size is normal",
        "normal heart size",
        "the cardiac silhouette is normal in size",
        "the cardiomediastinal silhouette is within normal limits",
        "the cardiothoracic ratio is normal",
        "the heart is normal in size",
        "heart size within normal limits",
        "normal cardiomediastinal contours",
        "the cardiac silhouette is not enlarged",
        "the heart size is unremarkable",
    ),
    PNEUMOTHORAX: (
        "the lungs are fully expanded",
        "no visceral pleural line is seen",
        "lung markings extend to the chest wall",
        "both lungs are fully inflated",
        "no air in the pleural spaces",
    ),
    NODULE: (
        "no focal lung lesion",
        "no nodules or masses",
        "no focal pulmonary lesion",
        "no suspicious pulmonary nodule",
        "no lung mass or nodule",
    ),
    SUPPORT_DEVICES: (
        "no lines or tubes are present",
        "no support devices are seen",
        "no medical devices are visible",
        "the patient has no lines or tubes",
        "no catheters or tubes",
    ),
}
# Normal statements covering several findings: true only when all of them are absent.
_ALL = tuple(FINDINGS)
_NORMAL_STATEMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("normal chest radiograph", _ALL),
    ("unremarkable chest radiograph", _ALL),
    ("the chest is normal", _ALL),
    ("no abnormality is seen", _ALL),
    ("no acute cardiopulmonary abnormality", (CONSOLIDATION, PLEURAL_EFFUSION, PNEUMOTHORAX)),
    ("no acute cardiopulmonary process", (CONSOLIDATION, PLEURAL_EFFUSION, PNEUMOTHORAX)),
    ("no acute findings in the chest", (CONSOLIDATION, PLEURAL_EFFUSION, PNEUMOTHORAX)),
    ("no pleural effusion or pneumothorax", (PLEURAL_EFFUSION, PNEUMOTHORAX)),
    ("no pneumothorax or pleural effusion", (PLEURAL_EFFUSION, PNEUMOTHORAX)),
    ("no pleural abnormality", (PLEURAL_EFFUSION, PNEUMOTHORAX)),
    ("the pleural spaces are normal", (PLEURAL_EFFUSION, PNEUMOTHORAX)),
    (
        "no focal consolidation, effusion or pneumothorax",
        (CONSOLIDATION, PLEURAL_EFFUSION, PNEUMOTHORAX),
    ),
    (
        "no pneumothorax, effusion or consolidation",
        (CONSOLIDATION, PLEURAL_EFFUSION, PNEUMOTHORAX),
    ),
    ("the lungs are clear", (CONSOLIDATION, NODULE)),
    ("lungs are clear bilaterally", (CONSOLIDATION, NODULE)),
    ("clear lungs", (CONSOLIDATION, NODULE)),
    ("the lung fields are clear", (CONSOLIDATION, NODULE)),
    ("the lungs are well aerated and clear", (CONSOLIDATION, NODULE)),
    (
        "the heart and lungs are normal",
        (CONSOLIDATION, PLEURAL_EFFUSION, CARDIOMEGALY, PNEUMOTHORAX, NODULE),
    ),
    (
        "heart and lungs are unremarkable",
        (CONSOLIDATION, PLEURAL_EFFUSION, CARDIOMEGALY, PNEUMOTHORAX, NODULE),
    ),
    (
        "the lungs and pleural spaces are clear",
        (CONSOLIDATION, PLEURAL_EFFUSION, PNEUMOTHORAX, NODULE),
    ),
    ("no cardiomegaly or pleural effusion", (CARDIOMEGALY, PLEURAL_EFFUSION)),
    ("no new lines or tubes and no pneumothorax", (SUPPORT_DEVICES, PNEUMOTHORAX)),
)


@dataclass(frozen=True)
class Sentence:
    """One report sentence and what it asserts about the image."""

    text: str
    polarity: str  # POSITIVE (a finding is there) or NEGATIVE (findings are absent)
    findings: tuple[str, ...]  # one finding for positives; all covered findings for negatives
    side: str | None  # asserted side (positives)
    size: str | None  # asserted size label (positives)
    variant: str | None  # asserted lobe, pneumothorax site or device
    phrasing: str  # the phrasing it was expanded from
    split: str

    @property
    def generic(self) -> bool:
        """Says only that the finding is there or not: usable as a zero-shot prompt."""
        return (
            len(self.findings) == 1
            and self.side is None
            and self.size is None
            and self.variant is None
        )


@dataclass(frozen=True)
class SentenceBank:
    """All generated sentences, each tagged with its split."""

    sentences: tuple[Sentence, ...]

    def select(self, split: str | None = None) -> list[Sentence]:
        return [s for s in self.sentences if split is None or s.split == split]

    def texts(self, split: str | None = None) -> list[str]:
        return [s.text for s in self.select(split)]

    def prompts(self, finding: str, polarity: str, split: str = TRAIN) -> list[str]:
        """Generic single-finding sentences: the prompt set of one finding and polarity."""
        return [
            s.text
            for s in self.select(split)
            if s.generic and s.findings == (finding,) and s.polarity == polarity
        ]

    def phrasings(self, finding: str, polarity: str, split: str | None = None) -> set[str]:
        return {
            s.phrasing
            for s in self.select(split)
            if finding in s.findings and s.polarity == polarity
        }


def build_sentence_bank(
    seed: int = 0, heldout_fraction: float = 0.2, fills_per_phrasing: int = 4
) -> SentenceBank:
    """Expand every phrasing, split phrasings into train/held-out, drop cross-split clashes."""
    rng = np.random.default_rng(seed)
    sentences: list[Sentence] = []
    for phrasing, polarity, findings, frame in _all_phrasings():
        split = _split_of(phrasing, frame, heldout_fraction, seed)
        fills = _fills(phrasing, findings[0] if polarity == POSITIVE else None)
        if len(fills) > fills_per_phrasing:
            # Always keep the slot-free fill (if any) so every phrasing yields a prompt form.
            keep = [i for i, fill in enumerate(fills) if not fill[1]]
            rest = [i for i in range(len(fills)) if i not in keep]
            picked = rng.choice(rest, size=fills_per_phrasing - len(keep), replace=False)
            fills = [fills[i] for i in sorted([*keep, *picked.tolist()])]
        for text, slots in fills:
            sentences.append(_sentence(text, polarity, findings, slots, phrasing, split))
    return SentenceBank(_deduplicate(sentences))


def judge(sentence: Sentence, truth: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """Is the sentence true of an image with this ground truth? None: partly (not used)."""
    if sentence.polarity == NEGATIVE:
        return not any(truth[name]["present"] for name in sentence.findings)
    fact = truth[sentence.findings[0]]
    if not fact["present"]:
        return False
    devices = (fact["variant"] or "").split("+")
    if sentence.findings[0] == SUPPORT_DEVICES and sentence.variant not in (None, *devices):
        return False
    if sentence.side is not None and sentence.side != fact["side"]:
        # "left effusion" of a bilateral effusion is true but incomplete.
        return None if fact["side"] == BILATERAL and sentence.side != BILATERAL else False
    if sentence.size is not None and sentence.size != fact.get("size_label"):
        return None
    if sentence.variant is not None and sentence.findings[0] != SUPPORT_DEVICES:
        return None if sentence.variant != fact["variant"] else True
    return True


TruthKey = tuple[str, bool, str | None, str | None, str | None]


def truth_key(name: str, fact: Mapping[str, Any]) -> TruthKey:
    """What matters about one finding when judging sentences about it."""
    if not fact["present"]:
        return (name, False, None, None, None)
    return (name, True, fact["side"], fact.get("size_label"), fact["variant"])


class SentenceIndex:
    """Fast look-ups of true and false sentences about one finding, over a fixed list.

    Judging thousands of sentences per image would dominate data preparation, so the
    answers are cached per :func:`truth_key` (there are only a few hundred distinct keys).
    """

    def __init__(self, sentences: Sequence[Sentence]) -> None:
        self.sentences = list(sentences)
        self._positives: dict[str, list[int]] = {name: [] for name in FINDINGS}
        self._negatives: dict[str, list[int]] = {name: [] for name in FINDINGS}
        self._normals: list[int] = []
        for i, sentence in enumerate(self.sentences):
            if sentence.polarity == POSITIVE:
                self._positives[sentence.findings[0]].append(i)
            elif len(sentence.findings) == 1:
                self._negatives[sentence.findings[0]].append(i)
            else:
                self._normals.append(i)
        self._cache: dict[tuple[str, TruthKey], list[int]] = {}

    def true_about(self, key: TruthKey) -> list[int]:
        """Sentences about this finding alone that are true for it."""
        name, present = key[0], key[1]
        if not present:
            return self._negatives[name]
        return self._cached("true", key, True)

    def false_about(self, key: TruthKey) -> list[int]:
        """Sentences about this finding that are false for it: its negations, or its positives."""
        name, present = key[0], key[1]
        if not present:
            return self._positives[name]
        cache_key = ("negations", (name, True, None, None, None))
        if cache_key not in self._cache:
            covering = [i for i in self._normals if name in self.sentences[i].findings]
            self._cache[cache_key] = self._negatives[name] + covering
        return self._cache[cache_key]

    def wrong_positives(self, key: TruthKey) -> list[int]:
        """Positives of a present finding that are false for it (wrong side or device)."""
        if not key[1]:
            return []
        return self._cached("wrong", key, False)

    def normals_true(self, absent: Iterable[str]) -> list[int]:
        gone = set(absent)
        return [i for i in self._normals if gone.issuperset(self.sentences[i].findings)]

    def compose(
        self,
        truth: Mapping[str, Mapping[str, Any]],
        rng: np.random.Generator,
        mention_negative: float = 0.6,
    ) -> list[int]:
        """Sentence positions of a short report; see :func:`compose_report`."""
        chosen: list[int] = []
        covered: set[str] = set()
        for name in FINDINGS:
            if truth[name]["present"]:
                chosen.append(_pick(self.true_about(truth_key(name, truth[name])), rng))
                covered.add(name)
        absent = [name for name in FINDINGS if not truth[name]["present"]]
        normals = self.normals_true(absent)
        if normals and rng.random() < 0.5:
            chosen.append(_pick(normals, rng))
            covered.update(self.sentences[chosen[-1]].findings)
        for name in absent:
            if name not in covered and rng.random() < mention_negative:
                chosen.append(_pick(self.true_about(truth_key(name, truth[name])), rng))
        if not chosen:
            name = absent[int(rng.integers(len(absent)))]
            chosen.append(_pick(self.true_about(truth_key(name, truth[name])), rng))
        order = rng.permutation(len(chosen))
        return [chosen[i] for i in order]

    def _cached(self, kind: str, key: TruthKey, verdict: bool) -> list[int]:
        """Positives of the key's finding whose judgement for that key is ``verdict``."""
        cache_key = (kind, key)
        if cache_key not in self._cache:
            truth = _truth_of(key)
            self._cache[cache_key] = [
                i for i in self._positives[key[0]] if judge(self.sentences[i], truth) is verdict
            ]
        return self._cache[cache_key]


def _truth_of(key: TruthKey) -> dict[str, dict[str, Any]]:
    truth: dict[str, dict[str, Any]] = {
        name: {"present": False, "side": None, "variant": None} for name in FINDINGS
    }
    name, present, side, size, variant = key
    truth[name] = {"present": present, "side": side, "size_label": size, "variant": variant}
    return truth


def compose_report(
    truth: Mapping[str, Mapping[str, Any]],
    index: SentenceIndex,
    rng: np.random.Generator,
    mention_negative: float = 0.6,
) -> list[Sentence]:
    """A short report: one true sentence per present finding, some true negations.

    Every sentence returned is judged True for ``truth``; absent findings are sometimes not
    mentioned at all, as in real reports, and sometimes covered by one normal statement.
    """
    return [index.sentences[i] for i in index.compose(truth, rng, mention_negative)]


def _pick(pool: Sequence[int], rng: np.random.Generator) -> int:
    if not pool:
        raise ValueError("no sentence fits this ground truth; the sentence bank is too small")
    return pool[int(rng.integers(len(pool)))]


def report_text(sentences: Iterable[Sentence]) -> str:
    return " ".join(s.text[0].upper() + s.text[1:] + "." for s in sentences)


def split_sentences(text: str) -> list[str]:
    """Split free text into the sentences the demo text tower embeds one by one."""
    parts = re.split(r"[.;\n]+", text)
    return [" ".join(p.lower().split()) for p in parts if p.strip()]


# --------------------------------------------------------------------------- expansion


def _all_phrasings() -> list[tuple[str, str, tuple[str, ...], str | None]]:
    """(phrasing, polarity, findings, frame it was built on or None) for every phrasing."""
    phrasings: list[tuple[str, str, tuple[str, ...], str | None]] = []
    for name in FINDINGS:
        for frame, np_ in product(_POSITIVE_FRAMES, _POSITIVE_NPS[name]):
            phrasings.append((_frame_fill(frame, np_), POSITIVE, (name,), frame))
        phrasings += [(text, POSITIVE, (name,), None) for text in _POSITIVE_SENTENCES[name]]
        for frame, np_ in product(_NEGATIVE_FRAMES, _NEGATIVE_NPS[name]):
            phrasings.append((_frame_fill(frame, np_), NEGATIVE, (name,), frame))
        phrasings += [(text, NEGATIVE, (name,), None) for text in _NEGATIVE_SENTENCES[name]]
    phrasings += [(text, NEGATIVE, covers, None) for text, covers in _NORMAL_STATEMENTS]
    return phrasings


def _frame_fill(frame: str, noun_phrase: str) -> str:
    bare = noun_phrase.removeprefix("a ").removeprefix("an ")
    if re.search(r"[^s]s$", bare):  # plural: "support devices are present"
        frame = frame.replace("} is ", "} are ").replace("there is ", "there are ")
    return frame.format(np=bare, np_a=noun_phrase)


def _split_of(phrasing: str, frame: str | None, heldout_fraction: float, seed: int) -> str:
    """Held out: every phrasing built on a held-out frame, plus a hashed share of the rest."""
    if frame in _HELDOUT_FRAMES:
        return HELDOUT
    digest = hashlib.sha256(f"{seed}:{phrasing}".encode()).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    return HELDOUT if share < heldout_fraction else TRAIN


def _slot_values(
    finding: str | None, bilateral: bool
) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """For each slot, its possible (word, assertion) pairs for one finding."""
    sides = [(LEFT, {"side": LEFT}), (RIGHT, {"side": RIGHT})]
    values: dict[str, list[tuple[str, dict[str, str]]]] = {"side": sides}
    if finding in (PLEURAL_EFFUSION, CONSOLIDATION) and bilateral:
        values["side"] = [*sides, (BILATERAL, {"side": BILATERAL})]
    sizes = _SIZE_WORDS.get(finding or "", {})
    values["size"] = [(w, {"size": label}) for label, words in sizes.items() for w in words]
    values["size_adv"] = [(w, {"size": label}) for label, w in _SIZE_ADVERBS.items()]
    values["lobe"] = [
        (adj, {"side": side, "variant": lobe}) for (side, lobe), adj in _LOBE_ADJ.items()
    ]
    values["lobe_noun"] = [
        (noun, {"side": side, "variant": lobe}) for (side, lobe), noun in _LOBE_NOUN.items()
    ]
    values["zone"] = [(zone, {"variant": lobe}) for lobe, zone in _ZONES.items()]
    values["ptx"] = [(site, {"variant": site}) for site in ("apical", "lateral")]
    return values


def _fills(phrasing: str, finding: str | None) -> list[tuple[str, dict[str, str]]]:
    """Every slot filling of a phrasing, with what each filling asserts."""
    slots = re.findall(r"{(\w+)}", phrasing)
    values = _slot_values(finding, bool(_BILATERAL_SLOT.search(phrasing)))
    fills: list[tuple[str, dict[str, str]]] = []
    for combo in product(*(values[slot] for slot in slots)):
        asserted: dict[str, str] = {}
        consistent = True
        for _, assertion in combo:
            for key, value in assertion.items():
                consistent &= asserted.setdefault(key, value) == value
        if not consistent:
            continue
        text = phrasing.format(**{slot: word for slot, (word, _) in zip(slots, combo, strict=True)})
        # A size word that is "" asserts nothing about size.
        if "size" in slots and not dict(zip(slots, combo, strict=True))["size"][0]:
            asserted.pop("size", None)
        if "side" not in asserted and re.search(r"\b(bilateral|both)\b", text):
            asserted["side"] = BILATERAL
        fills.append((_tidy(text), asserted))
    if finding == SUPPORT_DEVICES:
        fills = [(text, {**asserted, **_device_assertion(text)}) for text, asserted in fills]
    return fills


def _device_assertion(text: str) -> dict[str, str]:
    for word, device in _DEVICE_WORDS.items():
        if word in text:
            return {"variant": device}
    return {}


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    # Articles follow the filled-in word: "a moderate effusion" but "an extensive ...".
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
    text = re.sub(r"\ban ([^aeiou\s])", r"a \1", text)
    return text


def _sentence(
    text: str,
    polarity: str,
    findings: tuple[str, ...],
    asserted: Mapping[str, str],
    phrasing: str,
    split: str,
) -> Sentence:
    side = asserted.get("side")
    return Sentence(
        text=text,
        polarity=polarity,
        findings=findings,
        side=side if polarity == POSITIVE else None,
        size=asserted.get("size") if polarity == POSITIVE else None,
        variant=asserted.get("variant") if polarity == POSITIVE else None,
        phrasing=phrasing,
        split=split,
    )


def _deduplicate(sentences: list[Sentence]) -> tuple[Sentence, ...]:
    """One entry per text; a text produced in both splits stays in train only."""
    by_text: dict[str, Sentence] = {}
    for sentence in sentences:
        seen = by_text.get(sentence.text)
        if seen is None or (seen.split == HELDOUT and sentence.split == TRAIN):
            by_text[sentence.text] = sentence
    return tuple(by_text.values())


# --------------------------------------------------------------------------- site phrasing

# A site's own reporting style: terse, with local abbreviations and synonyms the demo model
# never read in training. Ordered: longer phrases are rewritten before the words inside them.
_ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    (r"\bthere (is|are) no evidence of\b", "nil"),
    (r"\bthere (is|are) no\b", "nil"),
    (r"\bno evidence of\b", "nil"),
    (r"^no\b", "nil"),
    (r"\bwithout\b", "nil"),
    (r"\bthere (is|are)\b", ""),
    (r"\b(is|are) not (seen|identified|present)\b", "not seen"),
    (r"\b(is|are) (seen|noted|present|identified|visible|demonstrated)\b", "seen"),
    (r"\bpleural effusion\b", "pleural collection"),
    (r"\beffusion\b", "collection"),
    (r"\bpneumothorax\b", "ptx"),
    (r"\bconsolidation\b", "airspace opacification"),
    (r"\bcardiomegaly\b", "big heart"),
    (r"\bpulmonary nodule\b", "coin lesion"),
    (r"\bnodule\b", "coin lesion"),
    (r"\bendotracheal tube\b", "ett"),
    (r"\bcentral (venous catheter|venous line|line)\b", "cvc"),
    (r"\bright\b", "rt"),
    (r"\bleft\b", "lt"),
    (r"\bbilateral\b", "b/l"),
    (r"\b(a|an|the)\b", ""),
)


def abbreviate(text: str) -> str:
    """One sentence rewritten in the terse, abbreviated style of the shifted demo site."""
    for pattern, replacement in _ABBREVIATIONS:
        text = re.sub(pattern, replacement, text)
    return " ".join(text.split())
