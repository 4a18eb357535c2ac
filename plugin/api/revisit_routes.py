"""HTTP routes of the revisit model and of site drift (docs/revisit.md).

``POST /api/revisit/score``: a JSON list of encounters (``encounter_id``, ``note_text``,
optional ``site`` and ``triage_<finding>`` scores) -> each one's 7-day revisit risk, with the
model's name and version. ``POST /api/studies/{uid}/encounters``: one encounter linked to a
study; its risk is stored with the study's results and flagged for the worklist.
``GET /api/sites/drift``: per-site drift of the stored embeddings.
Built by :func:`revisit_router` from explicit inputs; ``create_app`` mounts it behind the same
bearer-token dependency as the other routes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session, sessionmaker

from plugin.concepts.extract import SentenceSplitter
from plugin.errors import ConfigError
from plugin.revisit.cohort import CohortFileError
from plugin.revisit.encounters import TRIAGE_PREFIX, encounters_from_records
from plugin.revisit.features import NoteConcepts, RevisitError
from plugin.settings import Settings

logger = logging.getLogger(__name__)

MAX_ENCOUNTERS: Final = 1000


class EncounterIn(BaseModel):
    """One encounter to score; extra keys are allowed only as ``triage_<finding>`` scores."""

    model_config = ConfigDict(extra="allow")

    encounter_id: str = Field(min_length=1, max_length=128)
    note_text: str
    site: str | None = None

    @model_validator(mode="after")
    def _only_triage_extras(self) -> EncounterIn:
        unknown = [k for k in (self.model_extra or {}) if not k.startswith(TRIAGE_PREFIX)]
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; extra fields must be triage_<finding>")
        return self


class _Extractors:
    """One medspacy pipeline per extraction setting, built on first use and kept.

    A pipeline serves one document at a time, and routes run in a thread pool: a lock
    serialises extraction (scoring is the cheap part).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[tuple[SentenceSplitter, bool], NoteConcepts] = {}

    def documents(
        self, notes: list[str], splitter: SentenceSplitter, negated: bool
    ) -> list[frozenset[str]]:
        with self._lock:
            source = self._built.get((splitter, negated))
            if source is None:
                source = NoteConcepts(splitter, negated_features=negated)
                self._built[(splitter, negated)] = source
            return source.documents(notes)


def revisit_router(settings: Settings, sessions: sessionmaker[Session]) -> APIRouter:
    """The revisit and drift routes over ``settings.data_dir`` and the catalog."""
    router = APIRouter()
    data_dir = Path(settings.data_dir)
    extractors = _Extractors()

    @router.post("/api/revisit/score")
    def score(
        encounters: Annotated[list[EncounterIn], Body(max_length=MAX_ENCOUNTERS)],
        model: Annotated[str | None, Query(description="Model version; default latest.")] = None,
    ) -> dict[str, Any]:
        # Imported on first use: torch, which the rest of the API never needs.
        from plugin.revisit.risk_model import (
            ModelNotFound,
            ModelStore,
            risks_document,
            score_encounters,
        )

        try:
            chosen = ModelStore.for_data_dir(data_dir).load(model)
        except ModelNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
        except RevisitError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
        records = [e.model_dump() for e in encounters]
        try:
            table = encounters_from_records(records, require_labels=False)
        except CohortFileError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        spec = chosen.features
        try:
            documents = extractors.documents(
                list(table.notes), spec.splitter, spec.negated_features
            )
        except RevisitError as exc:  # medspacy is not installed
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
        try:
            risks = score_encounters(chosen, table, documents)
        except RevisitError as exc:  # e.g. a triage column the model uses is missing
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        logger.info("revisit scores: %d encounters, model v%s", len(risks), chosen.version)
        return risks_document(chosen, risks)

    @router.post("/api/studies/{study_uid}/encounters", status_code=status.HTTP_201_CREATED)
    def link_encounter(study_uid: str, encounter: EncounterIn) -> dict[str, Any]:
        """An ER encounter of this study's patient: its revisit risk joins the study's
        results (``GET /api/studies/{uid}``), flagged at ``revisit_flag_threshold``."""
        from plugin.revisit.risk_model import ModelNotFound
        from plugin.revisit.study_link import StudyNotFound, score_study_encounter

        def extract(notes: list[str], model: Any) -> list[frozenset[str]]:
            spec = model.features
            return extractors.documents(notes, spec.splitter, spec.negated_features)

        try:
            stored = score_study_encounter(
                sessions,
                data_dir,
                study_uid,
                encounter.model_dump(),
                extract,
                settings.revisit_flag_threshold,
            )
        except (StudyNotFound, ModelNotFound) as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
        except CohortFileError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        except RevisitError as exc:  # medspacy missing, or a triage column the model needs
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        logger.info("revisit risk linked to a study: flagged=%s", stored["flagged"])
        return stored

    @router.get("/api/sites/drift")
    def drift(
        model_ref: Annotated[str | None, Query(description="name@version; default newest.")] = None,
    ) -> dict[str, Any]:
        from plugin.validation.drift_report import drift_document

        with sessions() as session:
            try:
                return drift_document(session, model_ref)
            except ConfigError as exc:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc

    return router
