"""Similar cases, text search and report intake over HTTP, behind the API's bearer token.

Answers that list other patients' studies are given only here and in the operator's CLI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from plugin.retrieval.index import RetrievalError
from plugin.retrieval.service import (
    MAX_K,
    Filters,
    NoTextTower,
    RetrievalService,
    UnknownStudy,
)


class ReportIn(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)
    source: Literal["api", "hl7", "sr"] = "api"


def retrieval(request: Request) -> RetrievalService:
    service: RetrievalService | None = request.app.state.retrieval
    if service is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="similar-case retrieval is not enabled"
        )
    return service


Service = Annotated[RetrievalService, Depends(retrieval)]
TopK = Annotated[int, Query(ge=1, le=MAX_K)]


def filters(
    modality: str | None = None,
    site: str | None = None,
    date_from: Annotated[str | None, Query(pattern=r"^\d{8}$")] = None,
    date_to: Annotated[str | None, Query(pattern=r"^\d{8}$")] = None,
    finding: str | None = None,
    absent: bool = False,
    threshold: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
) -> Filters:
    return Filters(
        modality=modality,
        site=site,
        date_from=date_from,
        date_to=date_to,
        finding=finding,
        present=not absent,
        threshold=threshold,
    )


Filtering = Annotated[Filters, Depends(filters)]


def similar(study_uid: str, service: Service, where: Filtering, k: TopK = 10) -> dict[str, Any]:
    return _answer(lambda: service.similar(study_uid, k, where))


def search(
    service: Service,
    where: Filtering,
    q: Annotated[str, Query(min_length=1, max_length=1000)],
    k: TopK = 10,
) -> dict[str, Any]:
    return _answer(lambda: service.search(q, k, where))


def add_report(study_uid: str, report: ReportIn, service: Service) -> dict[str, Any]:
    return _answer(lambda: service.add_report(study_uid, report.text, report.source))


def index_info(service: Service) -> dict[str, Any]:
    return _answer(service.info)


def _answer(call: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = call()
    except UnknownStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    except NoTextTower as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except (RetrievalError, ValueError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    return result


def router() -> APIRouter:
    routes = APIRouter()
    routes.add_api_route("/api/studies/{study_uid}/similar", similar, methods=["GET"])
    routes.add_api_route("/api/search", search, methods=["GET"])
    routes.add_api_route(
        "/api/studies/{study_uid}/reports",
        add_report,
        methods=["POST"],
        status_code=status.HTTP_201_CREATED,
    )
    routes.add_api_route("/api/index", index_info, methods=["GET"])
    return routes
