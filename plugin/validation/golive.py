"""The go-live gate: a candidate becomes the live model only on evidence from the sites.

Evidence is ``pacsclip validate``'s answer: at every site the candidate scored (or the one site
named), for every finding it scores, enough report-labeled positives and negatives, an AUROC at
or above the floor, and no sign of being worse than the live model on the same studies (the
upper end of the paired interval of the difference below zero). A candidate with no
out-of-distribution reference would assert findings on any input, so it is refused too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plugin.validation.statistics import Floors


@dataclass(frozen=True)
class GateDecision:
    candidate: str
    allowed: bool
    reasons: list[str] = field(default_factory=list)  # why not, one line each
    passed: list[str] = field(default_factory=list)  # what was checked and met

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "allowed": self.allowed,
            "reasons": self.reasons,
            "passed": self.passed,
        }


def golive_decision(
    validation: Mapping[str, Any],
    candidate: str,
    *,
    floors: Floors,
    has_ood_reference: bool,
) -> GateDecision:
    reasons: list[str] = []
    passed: list[str] = []
    if not has_ood_reference:
        reasons.append(
            f"{candidate} has no out-of-distribution reference: fit one on this site's images "
            "(pacsclip model fit-ood) so it cannot assert findings on inputs unlike them"
        )
    sites = [
        (site["site"], model)
        for site in validation.get("sites", [])
        for model in site["models"]
        if model["model"] == candidate
    ]
    if not sites:
        reasons.append(
            f"{candidate} has no validation: run it in shadow (pacsclip model shadow) until "
            "the sites' reports label enough of its studies, then check pacsclip validate"
        )
    for site, model in sites:
        for finding, figures in sorted(model["findings"].items()):
            where = f"{finding} at site {site}"
            if not figures["enough"]:
                reasons.append(f"{where}: too few labels ({figures['missing']})")
                continue
            if figures["auroc"] is None or figures["auroc"] < floors.auroc_floor:
                reasons.append(
                    f"{where}: AUROC {figures['auroc']} below the floor {floors.auroc_floor}"
                )
            else:
                passed.append(f"{where}: AUROC {figures['auroc']:.3f} >= {floors.auroc_floor}")
            versus = model.get("versus_live", {}).get(finding)
            if versus and versus.get("enough"):
                low, high = versus["ci95"]
                diff = versus["auroc_difference"]
                if high < 0:
                    reasons.append(
                        f"{where}: worse than the live model (AUROC {diff:+.3f}, "
                        f"95% interval [{low:+.3f}, {high:+.3f}] below zero)"
                    )
                else:
                    interval = f"[{low:+.3f}, {high:+.3f}]"
                    passed.append(f"{where}: not worse than live (AUROC {diff:+.3f} {interval})")
    return GateDecision(candidate, allowed=not reasons, reasons=reasons, passed=passed)
