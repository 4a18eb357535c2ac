"""The radiologist's pages: login, the worklist (with its live-updated rows) and a study.

Studies are addressed by Study Instance UID only; no patient identifier is ever put in a URL
or a log line (filters are state, priority, site and the revisit flag).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.access.enforce import notes
from plugin.access.principal import Principal
from plugin.catalog import repository
from plugin.catalog.worklist import (
    Cursor,
    Order,
    PatientFacts,
    StoredImage,
    WorklistQuery,
    first_instances,
    patient_facts,
    priors,
    site_keys,
    stored_image,
    study_deliveries,
    worklist_page,
)
from plugin.dashboard import Dashboard, dashboard
from plugin.dashboard.images import SIZES, ImageUnavailable
from plugin.dashboard.regions import image_views, present_findings
from plugin.dashboard.sr_tree import content_tree
from plugin.errors import PacsclipError
from plugin.study_state import StudyState
from plugin.viewer_links import viewer_link

logger = logging.getLogger(__name__)

Board = Annotated[Dashboard, Depends(dashboard)]
PAGE_SIZE: Final = 50
# A study's worklist flag: its priority, or "not_scored" when its images were out of the
# model's distribution (no finding asserted).
WORKLIST_FLAGS: Final = ("stat", "routine", "not_scored")
SIMILAR_K: Final = 8


def signed_in(request: Request) -> Principal:
    """The principal ``authorize`` let through (every dashboard route needs one but login)."""
    principal = notes(request).principal
    if principal is None:  # only a public route has none, and those do not ask
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="sign in first")
    return principal


# Both are the same check; POSTs had theirs (CSRF included) in ``authorize``.
PageViewer = Annotated[Principal, Depends(signed_in)]
PostViewer = Annotated[Principal, Depends(signed_in)]


def render(
    board: Dashboard,
    request: Request,
    template: str,
    viewer: Principal | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    return board.templates.TemplateResponse(
        request,
        template,
        {
            "csrf": viewer.csrf if viewer and viewer.csrf else "",
            "person": viewer,
            "roles": {str(r) for r in viewer.roles} if viewer else set(),
            "model": _active_model(board),
            "viewer_url": partial(
                viewer_link, board.settings.viewer_url_template, board.settings.viewer_base_url
            ),
            **values,
        },
        status_code=status_code,
    )


def _active_model(board: Dashboard) -> dict[str, Any] | None:
    """The model the workers run now (name, version, synthetic), shown in every page's header."""
    if board.retrieval is None:
        return None
    try:
        return board.retrieval.model
    except (PacsclipError, OSError, ValueError) as exc:  # no bundle: the page still renders
        logger.warning("dashboard: active model unknown (%s)", type(exc).__name__)
        return None


# --- worklist ------------------------------------------------------------------------------


def worklist_query(
    state: str | None = None,
    priority: str | None = None,
    site: str | None = None,
    revisit: str | None = None,
    order: Order = "newest",
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE,
) -> WorklistQuery:
    states = [s.value for s in StudyState]
    if state and state not in states:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"state must be one of {', '.join(states)}; got {state!r}",
        )
    if priority and priority not in WORKLIST_FLAGS:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"priority must be one of {', '.join(WORKLIST_FLAGS)}; got {priority!r}",
        )
    if revisit not in (None, "", "yes", "no"):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"revisit must be yes or no; got {revisit!r}",
        )
    try:
        cursor = Cursor.parse(after) if after else None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    return WorklistQuery(
        state=state or None,
        priority=priority or None,
        site=site or None,
        revisit_flagged={"yes": True, "no": False}.get(revisit or ""),
        order=order,
        after=cursor,
        limit=limit,
    )


Worklist = Annotated[WorklistQuery, Depends(worklist_query)]


def worklist(request: Request, board: Board, viewer: PageViewer, query: Worklist) -> HTMLResponse:
    with board.sessions() as session:
        page = worklist_page(session, query)
        sites = site_keys(session)
    return render(
        board,
        request,
        "worklist.html",
        viewer,
        page=page,
        query=query,
        sites=sites,
        states=[s.value for s in StudyState],
        flags=WORKLIST_FLAGS,
        now=datetime.now(UTC),
        next_url=_next_url(request, page.next_cursor),
    )


def worklist_rows(
    request: Request, board: Board, viewer: PageViewer, query: Worklist
) -> HTMLResponse:
    """The rows alone, which the worklist polls to update itself live."""
    with board.sessions() as session:
        page = worklist_page(session, query)
    return render(board, request, "worklist_rows.html", viewer, page=page, now=datetime.now(UTC))


def _next_url(request: Request, cursor: Cursor | None) -> str | None:
    if cursor is None:
        return None
    url = request.url.include_query_params(after=cursor.token())
    return f"{url.path}?{url.query}"


# --- study ---------------------------------------------------------------------------------


def study_page(study_uid: str, request: Request, board: Board, viewer: PageViewer) -> HTMLResponse:
    with board.sessions() as session:
        detail = repository.study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, detail=f"no study with Study Instance UID {study_uid}"
            )
        results = repository.results_for(session, study_uid)
        deliveries = study_deliveries(session, study_uid)
        facts = patient_facts(session, study_uid)
        patient_priors = priors(session, study_uid)
    header = _patient_header(board, detail, facts)
    similar, similar_note = _similar(board, study_uid)
    with board.sessions() as session:
        thumbnails = first_instances(
            session,
            [m["study_instance_uid"] for m in similar if not m.get("best_image")],
        )
    # Shadow models' results are for validation only: never shown as the study's findings.
    live = [r for r in results if r.get("role", "live") == "live"]
    newest = live[0] if live else None
    shadows = [
        r
        for r in results
        if r.get("role") == "shadow" and (newest is None or r["generation"] == newest["generation"])
    ]
    present = present_findings(newest["findings"]) if newest else []
    source_image = _source_image(detail, newest)
    uids = {source_image} | {r.sop_instance_uid for f in present for r in f.regions}
    images = image_views(present, source_image, _image_sizes(board, detail, uids))
    return render(
        board,
        request,
        "study.html",
        viewer,
        study=detail,
        header=header,
        newest=newest,
        results=live,
        shadows=shadows,
        sr=_sr_tree(board, study_uid, newest),
        similar=similar,
        similar_note=similar_note,
        thumbnails=thumbnails,
        deliveries=deliveries,
        present=present,
        images=images,
        priors=patient_priors,
    )


def _patient_header(
    board: Dashboard, detail: dict[str, Any], facts: PatientFacts | None
) -> dict[str, str]:
    """Patient name, ID, accession number, study date and description as the catalog
    recorded them; a field it lacks (a study recorded before the catalog kept patient names)
    is read from the first instance's header. Shown on the page, never logged."""
    recorded = {
        "patient_name": facts.patient_name if facts else None,
        "patient_id": facts.patient_id if facts else None,
        "accession_number": facts.accession_number if facts else None,
        "study_date": facts.study_date if facts else None,
        "study_description": facts.study_description if facts else None,
    }
    if all(recorded.values()):
        return {k: str(v) for k, v in recorded.items()}
    from_file = _header_from_file(board, detail)
    return {k: str(v or from_file.get(k, "")) for k, v in recorded.items()}


HEADER_TAGS: Final = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "study_description": "StudyDescription",
}


def _header_from_file(board: Dashboard, detail: dict[str, Any]) -> dict[str, str]:
    first = next((i for s in detail["series"] for i in s["instances"]), None)
    if first is None:
        return {}
    path = Path(board.settings.spool_dir) / first["path"]
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS.values()))
    except (OSError, InvalidDicomError) as exc:
        logger.warning("dashboard: study header unreadable (%s)", type(exc).__name__)
        return {}
    return {key: str(ds.get(keyword, "") or "") for key, keyword in HEADER_TAGS.items()}


def _image_sizes(
    board: Dashboard, detail: dict[str, Any], uids: set[str | None]
) -> dict[str, tuple[int, int]]:
    """(Columns, Rows) of the study's received images among ``uids``, from their headers."""
    sizes = {}
    for series in detail["series"]:
        for instance in series["instances"]:
            uid = instance["sop_instance_uid"]
            if uid not in uids:
                continue
            path = Path(board.settings.spool_dir) / instance["path"]
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
                columns, rows = int(ds.Columns), int(ds.Rows)
            except (OSError, InvalidDicomError, AttributeError, TypeError, ValueError) as exc:
                logger.warning("dashboard: size of image %s unknown (%s)", uid, type(exc).__name__)
                continue
            if columns > 0 and rows > 0:
                sizes[uid] = (columns, rows)
    return sizes


def _similar(board: Dashboard, study_uid: str) -> tuple[list[dict[str, Any]], str | None]:
    """Similar studies, the patient's priors first."""
    if board.retrieval is None:
        return [], "similar-case retrieval is not enabled"
    try:
        answer = board.retrieval.similar(study_uid, SIMILAR_K)
    except (PacsclipError, ValueError, OSError) as exc:  # RetrievalError among them
        return [], f"similar cases unavailable: {exc}"
    priors = [{**m, "prior": True} for m in answer.get("priors", [])]
    others = [{**m, "prior": False} for m in answer.get("similar", [])]
    return priors + others, answer.get("note")


def _sr_tree(board: Dashboard, study_uid: str, newest: dict[str, Any] | None) -> Any:
    if newest is None:
        return None
    sr = next((o for o in newest["objects"] if o["kind"] == "SR"), None)
    if sr is None:
        return None
    with board.sessions() as session:
        where = stored_image(session, study_uid, sr["sop_instance_uid"])
    if where is None:
        return None
    try:
        return content_tree(dcmread(_file(board, where)))
    except (OSError, InvalidDicomError) as exc:
        logger.warning("dashboard: SR unreadable (%s)", type(exc).__name__)
        return None


def _source_image(detail: dict[str, Any], newest: dict[str, Any] | None) -> str | None:
    """The image of the newest analysis's most probable present finding, else of its most
    probable finding, else the study's first instance."""
    if newest:
        scored = sorted(
            (f for f in newest["findings"] if f.get("source_sop_instance_uid")),
            key=lambda f: (f.get("decision") != "present", -float(f.get("probability", 0.0))),
        )
        if scored:
            return str(scored[0]["source_sop_instance_uid"])
    first = next((i for s in detail["series"] for i in s["instances"]), None)
    return None if first is None else str(first["sop_instance_uid"])


def _file(board: Dashboard, where: StoredImage) -> Path:
    root = board.settings.spool_dir if where.root == "spool" else board.settings.results_dir
    return Path(root) / where.path


def study_image(
    study_uid: str, sop_instance_uid: str, board: Board, viewer: PageViewer, size: int = 512
) -> Response:
    if size not in SIZES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"size must be one of {', '.join(map(str, SIZES))}",
        )
    with board.sessions() as session:
        where = stored_image(session, study_uid, sop_instance_uid)
    if where is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no image {sop_instance_uid} in study {study_uid}"
        )
    try:
        png = board.images.png(_file(board, where), sop_instance_uid, size)
    except FileNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="the stored file is gone") from exc
    except ImageUnavailable as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    # Private: a shared cache must never keep patient images.
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def router() -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    routes.add_api_route("/", worklist, methods=["GET"], response_class=HTMLResponse)
    routes.add_api_route("/worklist/rows", worklist_rows, methods=["GET"])
    routes.add_api_route("/studies/{study_uid}", study_page, methods=["GET"])
    routes.add_api_route(
        "/studies/{study_uid}/images/{sop_instance_uid}.png", study_image, methods=["GET"]
    )
    return routes
