"""The auditor's page: who saw which patient's data, and who changed what.

A patient is searched by a POSTed form, never a query string: a Patient ID does not go into a
URL (nor, so, into a proxy's or browser's history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse

from plugin.catalog.access_log import access_events
from plugin.dashboard.pages import Board, PageViewer, PostViewer, render

LIMIT: Final = 200


@dataclass(frozen=True)
class AccessQuery:
    patient_id: str | None = None
    study_uid: str | None = None
    subject: str | None = None

    @property
    def any(self) -> bool:
        return bool(self.patient_id or self.study_uid or self.subject)

    @property
    def described(self) -> str:
        parts = [
            f"{label} {value}"
            for label, value in (
                ("patient", self.patient_id),
                ("study", self.study_uid),
                ("person", self.subject),
            )
            if value
        ]
        return ", ".join(parts)


def access_log_page(request: Request, board: Board, viewer: PageViewer) -> HTMLResponse:
    return _page(request, board, viewer, AccessQuery())


def search_access_log(
    request: Request,
    board: Board,
    viewer: PostViewer,
    patient_id: Annotated[str, Form(max_length=64)] = "",
    study_uid: Annotated[str, Form(max_length=64)] = "",
    subject: Annotated[str, Form(max_length=255)] = "",
) -> HTMLResponse:
    query = AccessQuery(
        patient_id.strip() or None, study_uid.strip() or None, subject.strip() or None
    )
    return _page(request, board, viewer, query)


def _page(request: Request, board: Board, viewer: PageViewer, query: AccessQuery) -> HTMLResponse:
    with board.sessions() as session:
        entries = access_events(
            session,
            patient_id=query.patient_id,
            study_uid=query.study_uid,
            subject=query.subject,
            limit=LIMIT,
        )
    return render(
        board, request, "access_log.html", viewer, entries=entries, query=query, limit=LIMIT
    )


def router() -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    routes.add_api_route(
        "/access-log", access_log_page, methods=["GET"], response_class=HTMLResponse
    )
    routes.add_api_route(
        "/access-log", search_access_log, methods=["POST"], response_class=HTMLResponse
    )
    return routes
