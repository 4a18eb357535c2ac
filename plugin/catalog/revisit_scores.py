"""Revisit risks of encounters linked to studies (table ``revisit_score``); no note text."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from plugin.catalog.models import RevisitScore


@dataclass(frozen=True)
class RevisitRisk:
    """One encounter's risk as a model version scored it."""

    study_id: int
    encounter_id: str
    algorithm_name: str
    algorithm_version: str
    risk: float
    flagged: bool
    threshold: float
    method: str
    triage_linked: list[str]


def keep_revisit_score(session: Session, score: RevisitRisk) -> None:
    """Add the score, or update the one of the same study, encounter and model version:
    the same encounter posted again (say, a corrected note) keeps only its latest score."""
    row = session.scalar(
        select(RevisitScore).where(
            RevisitScore.study_id == score.study_id,
            RevisitScore.encounter_id == score.encounter_id,
            RevisitScore.algorithm_version == score.algorithm_version,
        )
    )
    values = {
        "risk": score.risk,
        "flagged": score.flagged,
        "threshold": score.threshold,
        "method": score.method,
        "triage_linked": score.triage_linked,
    }
    if row is None:
        session.add(
            RevisitScore(
                study_id=score.study_id,
                encounter_id=score.encounter_id,
                algorithm_name=score.algorithm_name,
                algorithm_version=score.algorithm_version,
                **values,
            )
        )
        return
    for key, value in values.items():
        setattr(row, key, value)
