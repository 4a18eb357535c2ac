"""Inputs of the result builders: what the model found, for which study, by which algorithm.

Frozen dataclasses with explicit fields, so a test (or a redelivered task) can build the same
result twice and get byte-identical DICOM out of the builders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from plugin.disclaimers import NOT_FOR_CLINICAL_USE, NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL
from plugin.errors import PacsclipError

Decision = Literal["present", "absent", "indeterminate"]
# "not_scored": the study's images are out of the model's distribution (no finding asserted).
Priority = Literal["stat", "routine", "not_scored"]
DECISIONS: Final[tuple[Decision, ...]] = ("present", "absent", "indeterminate")
PRIORITIES: Final[tuple[Priority, ...]] = ("stat", "routine", "not_scored")

# Every result object carries AlgorithmIdentity.disclaimers(): the demo model, or a bundle
# whose model card says not for clinical use, adds a second line.
# Longest value of the LO value representation (Series Description).
_LO_MAX: Final = 64


# The Manufacturer of every object pacsclip writes: how its own SRs are told from reports.
MANUFACTURER = "pacsclip"


class ResultBuildError(PacsclipError):
    """A result cannot be turned into DICOM (inconsistent inputs); the message says which."""


@dataclass(frozen=True)
class FindingCode:
    """A coded concept (code value, coding scheme designator, code meaning), e.g. SCT 36118008."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model bundle that produced a result; `synthetic` marks the bundled demo model,
    `not_for_clinical_use` a bundle whose model card says so."""

    name: str
    version: str
    synthetic: bool
    manufacturer: str = MANUFACTURER
    not_for_clinical_use: bool = False

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.version.strip():
            raise ResultBuildError("algorithm name and version must not be empty")

    def disclaimers(self) -> tuple[str, ...]:
        """The lines every SR and overlay of this algorithm must show."""
        if self.synthetic:
            return (NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL)
        if self.not_for_clinical_use:
            return (NOT_FOR_DIAGNOSIS, NOT_FOR_CLINICAL_USE)
        return (NOT_FOR_DIAGNOSIS,)

    def series_description(self, kind: str) -> str:
        """Series Description of a result series: the algorithm and a warning, within LO's 64.

        `kind` names the object ("SR", "overlay"). The algorithm comes first so a truncated
        description still names it; the full disclaimers are inside each object.
        """
        demo = " (synthetic demo)" if self.synthetic else ""
        text = f"{self.name} {self.version} AI {kind}{demo} - not for diagnosis"
        return text[:_LO_MAX]


Point = tuple[float, float]
Outline = tuple[Point, ...]


@dataclass(frozen=True)
class FindingResult:
    """One finding of one study: calibrated probability, thresholded decision, its regions.

    `outlines` are closed polylines of (column, row) points in DICOM image coordinates of
    the source image ((0, 0) the top-left corner of the top-left pixel), hottest region
    first; results draw them only for a present finding. `code` is None for a finding with
    no standard code; the SR then codes it in pacsclip's private scheme. `scored_by` says
    what produced the score (zero-shot prompts, a head, a site head, the calibration).
    """

    name: str
    display: str
    code: FindingCode | None
    probability: float
    decision: Decision
    threshold: float
    source_sop_instance_uid: str
    outlines: Sequence[Outline] = ()
    scored_by: str | None = None
    # Why a present finding has no region ("localisation off", "multi-frame image", ...).
    region_note: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ResultBuildError("finding name must not be empty")
        for label, value in (("probability", self.probability), ("threshold", self.threshold)):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ResultBuildError(f"{label} of {self.name!r} must be in [0, 1], got {value}")
        if self.decision not in DECISIONS:
            raise ResultBuildError(f"decision of {self.name!r} must be one of {DECISIONS}")
        outlines = tuple(tuple((float(c), float(r)) for c, r in o) for o in self.outlines)
        object.__setattr__(self, "outlines", outlines)
        for outline in outlines:
            closed = len(outline) >= 4 and outline[0] == outline[-1]
            if not closed or not all(math.isfinite(v) and v >= 0 for p in outline for v in p):
                raise ResultBuildError(
                    f"an outline of {self.name!r} is not a closed polyline of at least three "
                    "points with finite, non-negative coordinates"
                )

    @property
    def shown_regions(self) -> tuple[Outline, ...]:
        """The outlines results draw: a present finding's only, never an absent one's."""
        return tuple(self.outlines) if self.decision == "present" else ()


def box_outline(row_min: int, col_min: int, row_max: int, col_max: int) -> Outline:
    """The closed outline of a box of pixel indices (inclusive) along its pixels' edges."""
    left, top, right, bottom = float(col_min), float(row_min), col_max + 1.0, row_max + 1.0
    return ((left, top), (right, top), (right, bottom), (left, bottom), (left, top))


@dataclass(frozen=True)
class DistributionCheck:
    """Where the study's images lie against the model's out-of-distribution reference.

    `distance` is the study's (the median of its images'); `scored` is False when the study is
    out of distribution, and then no finding may be reported.
    """

    method: str
    distance: float
    threshold: float
    images: int
    images_outside: int
    scored: bool

    def __post_init__(self) -> None:
        for label, value in (("distance", self.distance), ("threshold", self.threshold)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ResultBuildError(f"out-of-distribution {label} must be >= 0, got {value}")
        if not 0 <= self.images_outside <= self.images or self.images < 1:
            raise ResultBuildError(
                f"{self.images_outside} of {self.images} images outside is not a count"
            )

    def statement(self, algorithm: AlgorithmIdentity) -> str:
        """The sentence results state, naming the model and version it applies to."""
        where = "out of distribution" if not self.scored else "partly out of distribution"
        return (
            f"{where[0].upper()}{where[1:]} for model {algorithm.name} version "
            f"{algorithm.version}: {self.images_outside} of {self.images} images beyond the "
            f"{self.method} distance threshold {self.threshold:.4g} (study distance "
            f"{self.distance:.4g}); "
            + ("findings not scored" if not self.scored else "those images not scored")
        )


@dataclass(frozen=True)
class StudyResult:
    """Everything the builders need about one analysed study (no patient data)."""

    findings: Sequence[FindingResult]
    priority: Priority
    triggered_by: Sequence[str]
    algorithm: AlgorithmIdentity
    similar_summary: str | None = None
    distribution: DistributionCheck | None = None  # None: the model has no reference

    def __post_init__(self) -> None:
        # Tuples, so a frozen result cannot change under a builder through a caller's list.
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "triggered_by", tuple(self.triggered_by))
        if self.priority not in PRIORITIES:
            raise ResultBuildError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        if not self.scored:
            if self.findings or self.triggered_by or self.priority != "not_scored":
                raise ResultBuildError(
                    "a study out of distribution has no findings, no triggers and priority "
                    "'not_scored'"
                )
            return
        if not self.findings:
            raise ResultBuildError("a study result needs at least one finding")
        if self.priority == "not_scored":
            raise ResultBuildError("priority 'not_scored' is only for a study out of distribution")
        names = [finding.name for finding in self.findings]
        if len(set(names)) != len(names):
            raise ResultBuildError(f"finding names must be unique, got {names}")

    @property
    def scored(self) -> bool:
        return self.distribution is None or self.distribution.scored
