"""An ER encounter linked to an imaging study: its revisit risk in the study's results.

The encounter's note is scored with the latest revisit model; the study's latest triage
probabilities become the encounter's ``triage_<finding>`` features (the model uses those it
was trained with). Only the risk, the flag and the model's identity are stored, never the note.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.repository import latest_findings
from plugin.catalog.revisit_scores import RevisitRisk, keep_revisit_score
from plugin.catalog.studies import study_id_of
from plugin.disclaimers import NOT_FOR_DIAGNOSIS
from plugin.revisit.encounters import TRIAGE_PREFIX, encounters_from_records
from plugin.revisit.features import RevisitError
from plugin.revisit.risk_model import ModelStore, RevisitModel, score_encounters


class StudyNotFound(RevisitError):
    """The study named in the link is not in the catalog."""


def latest_triage(session: Session, study_id: int) -> dict[str, float]:
    """The study's newest analysis, as ``triage_<finding>`` probabilities."""
    findings = latest_findings(session, [study_id]).get(study_id, {})
    return {f"{TRIAGE_PREFIX}{name}": p for name, p in findings.items()}


def score_study_encounter(
    sessions: sessionmaker[Session],
    data_dir: Path,
    study_uid: str,
    encounter: Mapping[str, Any],
    extract: Callable[[list[str], RevisitModel], Sequence[frozenset[str]]],
    threshold: float,
) -> dict[str, Any]:
    """Score one encounter of a study, store the risk on the study, return what was stored."""
    model = ModelStore.for_data_dir(data_dir).load()
    with sessions() as session:
        study_id = study_id_of(session, study_uid)
        if study_id is None:
            raise StudyNotFound(f"no study {study_uid} in the catalog")
        triage = latest_triage(session, study_id)
    # Scores given with the encounter win over the study's own.
    record = {**triage, **encounter}
    table = encounters_from_records([record], require_labels=False)
    [risk] = score_encounters(model, table, extract(list(table.notes), model))
    linked = sorted(k.removeprefix(TRIAGE_PREFIX) for k in triage)
    score = RevisitRisk(
        study_id=study_id,
        encounter_id=risk.encounter_id,
        algorithm_name=model.name,
        algorithm_version=str(model.version),
        risk=risk.risk,
        flagged=risk.risk >= threshold,
        threshold=threshold,
        method=model.method,
        triage_linked=linked,
    )
    with sessions.begin() as session:
        # The same encounter posted again (say, a corrected note): latest wins.
        keep_revisit_score(session, score)
    return {
        "study_instance_uid": study_uid,
        "encounter_id": risk.encounter_id,
        "algorithm": model.identity(),
        "notices": [NOT_FOR_DIAGNOSIS],
        "risk": score.risk,
        "flagged": score.flagged,
        "threshold": score.threshold,
        "method": score.method,
        "triage_linked": score.triage_linked,
    }
