"""Worklist priority from calibrated finding probabilities."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from plugin.errors import ConfigError

Priority = Literal["stat", "routine"]
STAT: Final = "stat"
ROUTINE: Final = "routine"
# The worklist flag of a study whose images are out of the model's distribution: no finding
# is asserted, so it is neither STAT nor routine (plugin.triage.ood).
NOT_SCORED: Final = "not_scored"
WorklistFlag = Literal["stat", "routine", "not_scored"]


@dataclass(frozen=True)
class PriorityPolicy:
    """`stat` when any listed finding reaches its threshold, otherwise `default`.

    `stat_if_any` maps a finding name to the calibrated probability at or above which it
    makes a study stat; its order is the order in which triggers are reported.
    """

    stat_if_any: Mapping[str, float] = field(default_factory=dict)
    default: Priority = ROUTINE

    def __post_init__(self) -> None:
        if self.default not in (STAT, ROUTINE):
            raise ValueError(f"default priority must be stat or routine, got {self.default!r}")
        for name, threshold in self.stat_if_any.items():
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"stat threshold of {name!r} must be in [0, 1], got {threshold}")

    @classmethod
    def from_manifest(
        cls, priority: Mapping[str, Any], findings: Sequence[Mapping[str, Any]]
    ) -> PriorityPolicy:
        """Build from bundle.json's `priority` block and each finding's `stat_threshold`."""
        default = priority.get("default", ROUTINE)
        if default not in (STAT, ROUTINE):
            raise ConfigError(f"priority.default must be stat or routine, got {default!r}")
        thresholds = {str(f["name"]): f.get("stat_threshold") for f in findings}
        stat_if_any: dict[str, float] = {}
        for name in priority.get("stat_if_any", []):
            if name not in thresholds:
                raise ConfigError(f"priority.stat_if_any names {name!r}, which is not a finding")
            threshold = thresholds[name]
            # No silent fallback: a stat rule without a threshold would never (or always) fire.
            if threshold is None:
                raise ConfigError(
                    f"finding {name!r} is in priority.stat_if_any but has no stat_threshold"
                )
            stat_if_any[name] = float(threshold)
        try:
            return cls(stat_if_any, cast(Priority, default))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def priority_for(self, calibrated_probs: Mapping[str, float]) -> tuple[Priority, list[str]]:
        """The priority and, when stat, the findings that triggered it (in policy order)."""
        missing = [name for name in self.stat_if_any if name not in calibrated_probs]
        if missing:
            # A stat finding that was not scored must not quietly leave a study routine.
            raise ValueError(f"no probability for stat finding(s) {missing}")
        triggers = []
        for name, threshold in self.stat_if_any.items():
            p = calibrated_probs[name]
            if not math.isfinite(p):
                raise ValueError(f"probability of {name!r} is not finite: {p}")
            if p >= threshold:
                triggers.append(name)
        return (STAT, triggers) if triggers else (self.default, [])
