"""The worklist HTTP API: studies with state and priority, their AI results, health, metrics.

`create_app` wires everything from explicit inputs (settings, a session factory, the process'
metrics, and readers for tables other modules own), so a test builds the same app over a
throwaway SQLite catalog. Routes are plain functions; their shared inputs reach them through
`app.state`, not module globals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from plugin.access.authn import Authenticator
from plugin.access.enforce import Forbidden, access_recorder, authorize
from plugin.api import retrieval_routes
from plugin.api.revisit_routes import revisit_router
from plugin.catalog import repository
from plugin.catalog.db import ping
from plugin.catalog.studies import count_by_state
from plugin.metrics import CatalogSnapshot, PacsclipMetrics
from plugin.retrieval.service import RetrievalService
from plugin.settings import Settings
from plugin.study_state import StudyState
from plugin.triage.priority import WorklistFlag
from plugin.validation.monitoring import MonitoringGauges, MonitorStore

logger = logging.getLogger(__name__)

# Readers of tables owned by other modules, passed in so this module does not depend on them.
ResultsReader = Callable[[Session, str], list[dict[str, Any]]]
ObjectLocator = Callable[[Session, str, str], Path | None]
FailedJobsCounter = Callable[[Session], int]

DICOM_MEDIA_TYPE = "application/dicom"


def no_results(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """Default results reader until the results table exists: no study has results."""
    return []


def no_objects(session: Session, study_uid: str, sop_instance_uid: str) -> Path | None:
    """Default object locator until result objects are stored: none can be downloaded."""
    return None


@dataclass(frozen=True)
class ApiContext:
    sessions: sessionmaker[Session]
    metrics: PacsclipMetrics
    results_for: ResultsReader
    object_file: ObjectLocator


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session],
    metrics: PacsclipMetrics,
    *,
    results_for: ResultsReader = no_results,
    object_file: ObjectLocator = no_objects,
    failed_dispatch_jobs: FailedJobsCounter | None = None,
    retrieval: RetrievalService | None = None,
) -> FastAPI:
    # Every route, API and dashboard alike, goes through one access check (plugin.access).
    app = FastAPI(title="pacsclip worklist API", version="1", dependencies=[Depends(authorize)])
    app.state.auth = Authenticator(settings)
    app.state.context = ApiContext(sessions, metrics, results_for, object_file)
    app.state.retrieval = retrieval
    metrics.include_catalog(partial(read_catalog, sessions, failed_dispatch_jobs))
    # What the workers' monitoring computed last, read at each scrape.
    metrics.registry.register(
        MonitoringGauges(MonitorStore(settings.data_dir / "monitoring").latest)
    )
    app.add_exception_handler(SQLAlchemyError, _catalog_unavailable)
    app.add_exception_handler(Forbidden, forbidden_json)
    app.middleware("http")(access_recorder(sessions))

    app.add_api_route("/api/health", health, methods=["GET"])
    app.add_api_route("/api/studies", list_studies, methods=["GET"])
    app.add_api_route("/api/studies/{study_uid}", get_study, methods=["GET"])
    app.add_api_route(
        "/api/studies/{study_uid}/objects/{sop_instance_uid}",
        get_object,
        methods=["GET"],
        response_class=FileResponse,
    )
    app.include_router(retrieval_routes.router())
    app.include_router(revisit_router(settings, sessions))
    # Unauthenticated like most scrape targets: counts and durations only, no patient data.
    app.add_api_route("/metrics", render_metrics, methods=["GET"], include_in_schema=False)
    return app


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx


Context = Annotated[ApiContext, Depends(context)]


def db_session(ctx: Context) -> Iterator[Session]:
    with ctx.sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(db_session)]


def health(session: DbSession) -> JSONResponse:
    try:
        ping(session)
    except SQLAlchemyError as exc:
        logger.warning("health check: catalog unreachable (%s)", type(exc).__name__)
        return JSONResponse(
            {"status": "error", "database": "error"}, status.HTTP_503_SERVICE_UNAVAILABLE
        )
    return JSONResponse({"status": "ok", "database": "ok"})


def list_studies(
    session: DbSession,
    state: StudyState | None = None,
    priority: WorklistFlag | None = None,
    revisit_flagged: Annotated[
        bool | None, Query(description="Only studies with (or without) a flagged revisit risk.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    return repository.list_studies(
        session, state=state, priority=priority, revisit_flagged=revisit_flagged, limit=limit
    )


def get_study(study_uid: str, session: DbSession, ctx: Context) -> dict[str, Any]:
    detail = repository.study_detail(session, study_uid)
    if detail is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no study with Study Instance UID {study_uid}"
        )
    detail["results"] = [
        with_object_links(result, study_uid) for result in ctx.results_for(session, study_uid)
    ]
    return detail


def with_object_links(result: dict[str, Any], study_uid: str) -> dict[str, Any]:
    """A copy of `result` whose objects each carry the API path that downloads them."""
    objects = [
        {**obj, "link": object_link(study_uid, obj["sop_instance_uid"])}
        for obj in result.get("objects", [])
    ]
    return {**result, "objects": objects}


def object_link(study_uid: str, sop_instance_uid: str) -> str:
    return f"/api/studies/{quote(study_uid, safe='')}/objects/{quote(sop_instance_uid, safe='')}"


def get_object(
    study_uid: str, sop_instance_uid: str, session: DbSession, ctx: Context
) -> FileResponse:
    path = ctx.object_file(session, study_uid, sop_instance_uid)
    if path is None or not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no result object {sop_instance_uid} in study {study_uid}",
        )
    return FileResponse(path, media_type=DICOM_MEDIA_TYPE, filename=f"{sop_instance_uid}.dcm")


def render_metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def read_catalog(
    sessions: sessionmaker[Session], failed_dispatch_jobs: FailedJobsCounter | None
) -> CatalogSnapshot | None:
    """Catalog counts for the scrape-time gauges; None when the database cannot be read."""
    try:
        with sessions() as session:
            counts = count_by_state(session)
            failed = failed_dispatch_jobs(session) if failed_dispatch_jobs else None
    except SQLAlchemyError as exc:
        logger.warning("metrics: catalog unreachable (%s)", type(exc).__name__)
        return None
    return CatalogSnapshot(counts, failed)


async def forbidden_json(request: Request, exc: Exception) -> JSONResponse:
    message = exc.message if isinstance(exc, Forbidden) else "forbidden"
    return JSONResponse({"detail": message}, status.HTTP_403_FORBIDDEN)


async def _catalog_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Only the class name: a driver's message can quote SQL parameters, i.e. patient data.
    logger.error("api %s: catalog error (%s)", request.url.path, type(exc).__name__)
    return JSONResponse(
        {"detail": "the catalog database is unavailable"}, status.HTTP_503_SERVICE_UNAVAILABLE
    )
