"""Inputs of the result builders: what the model found, for which study, by which algorithm.

Frozen dataclasses with explicit fields, so a test (or a redelivered task) can build the same
result twice and get byte-identical DICOM out of the builders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from plugin.disclaimers import NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL
from plugin.errors import PacsclipError

Decision = Literal["present", "absent", "indeterminate"]
# "not_scored": the study's images are out of the model's distribution (no finding asserted).
Priority = Literal["stat", "routine", "not_scored"]
DECISIONS: Final[tuple[Decision, ...]] = ("present", "absent", "indeterminate")
PRIORITIES: Final[tuple[Priority, ...]] = ("stat", "routine", "not_scored")

# Every result object carries these lines; the demo model adds the second one.
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
    """The model bundle that produced a result; `synthetic` marks the bundled demo model."""

    name: str
    version: str
    synthetic: bool
    manufacturer: str = MANUFACTURER

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.version.strip():
            raise ResultBuildError("algorithm name and version must not be empty")

    def disclaimers(self) -> tuple[str, ...]:
        """The lines every SR and overlay of this algorithm must show."""
        if self.synthetic:
            return (NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL)
        return (NOT_FOR_DIAGNOSIS,)

    def series_description(self, kind: str) -> str:
        """Series Description of a result series: the algorithm and a warning, within LO's 64.

        `kind` names the object ("SR", "overlay"). The algorithm comes first so a truncated
        description still names it; the full disclaimers are inside each object.
        """
        demo = " (synthetic demo)" if self.synthetic else ""
        text = f"{self.name} {self.version} AI {kind}{demo} - not for diagnosis"
        return text[:_LO_MAX]


@dataclass(frozen=True)
class FindingResult:
    """One finding of one study: calibrated probability, thresholded decision, optional box.

    `region` is (row_min, col_min, row_max, col_max) in pixel indices of the source image,
    inclusive at both ends (as `plugin.triage.Region`). `code` is None for a finding the
    bundle gives no standard code; the SR then codes it in pacsclip's private scheme.
    """

    name: str
    display: str
    code: FindingCode | None
    probability: float
    decision: Decision
    threshold: float
    region: tuple[int, int, int, int] | None
    source_sop_instance_uid: str

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ResultBuildError("finding name must not be empty")
        for label, value in (("probability", self.probability), ("threshold", self.threshold)):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ResultBuildError(f"{label} of {self.name!r} must be in [0, 1], got {value}")
        if self.decision not in DECISIONS:
            raise ResultBuildError(f"decision of {self.name!r} must be one of {DECISIONS}")
        if self.region is not None:
            row_min, col_min, row_max, col_max = self.region
            if min(self.region) < 0 or row_min > row_max or col_min > col_max:
                raise ResultBuildError(f"region of {self.name!r} is not a box: {self.region}")


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
