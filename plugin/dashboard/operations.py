"""The PACS administrator's page: dead letters with retry, quarantine, the AIW-I task
performers and whether their Task Manager answers, routing rules with a
"test this file" upload, per-site drift and adapted heads with promote, the last hour of
the Prometheus figures, and the audit log."""

from __future__ import annotations

import logging
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Form, HTTPException, Query, Request, UploadFile, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from plugin.catalog.dispatch_jobs import recent_jobs
from plugin.catalog.repository import audit_event_names, list_quarantine, recent_audit_events
from plugin.catalog.ups_workitems import performer_statuses
from plugin.dashboard import Dashboard
from plugin.dashboard.pages import Board, PageViewer, PostViewer, render
from plugin.delivery.jobs import replay
from plugin.errors import PacsclipError

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES: Final = 64 * 1024 * 1024  # a header is all the rules read; big files waste time
DRIFT_FOLDS: Final = 3
PAGE_SAMPLE_AGE_S: Final = 2.0  # the plots end with figures this fresh
AUDIT_PAGE_SIZE: Final = 50
AUDIT_MAX_PAGE: Final = 200  # the newest 10,000 entries; `pacsclip audit list` reads as many


def operations_page(
    request: Request,
    board: Board,
    viewer: PageViewer,
    drift: bool = False,
    notice: str | None = None,
    audit_event: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{0,32}$")] = None,
    audit_page: Annotated[int, Query(ge=1, le=AUDIT_MAX_PAGE)] = 1,
) -> HTMLResponse:
    audit = {"event": audit_event, "page": audit_page}
    return _render(board, request, viewer, drift=drift, notice=notice, audit=audit)


def _render(
    board: Dashboard,
    request: Request,
    viewer: Any,
    *,
    drift: bool = False,
    notice: str | None = None,
    rule_test: dict[str, Any] | None = None,
    promotion: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    board.history.sample_if_due(max_age_s=PAGE_SAMPLE_AGE_S)
    audit = audit or {}
    with board.sessions() as session:
        dead_letters = recent_jobs(session, state="failed")
        quarantine = list_quarantine(session)
        performers = performer_statuses(session)
        drift_report = _drift(session) if drift else None
        audit_log = _audit(session, audit.get("event"), audit.get("page", 1))
    return render(
        board,
        request,
        "operations.html",
        viewer,
        status_code,
        dead_letters=dead_letters,
        quarantine=quarantine,
        performers=performers,
        rules=_rules(board),
        rule_test=rule_test,
        drift=drift_report,
        heads=_heads(board),
        promotion=promotion,
        plots=board.history.series(),
        plots_scraped=bool(board.history.scrape_urls),
        plots_unread=sorted(board.history.unreachable),
        audit=audit_log,
        notice=_notice(notice),
    )


_NOTICES: Final = {
    "retried": "The job is pending again and on the dispatch queue.",
}


def _notice(key: str | None) -> str | None:
    # Only fixed texts: a query parameter never becomes page content.
    return _NOTICES.get(key or "")


# --- audit log -----------------------------------------------------------------------------


def _audit(session: Any, event: str | None, page: int) -> dict[str, Any]:
    """One page of the audit log, newest first, optionally of one event. The rows hold AE
    titles, hosts, UIDs, statuses and details; never a patient's name or ID."""
    rows = recent_audit_events(
        session,
        events=[event] if event else (),
        limit=AUDIT_PAGE_SIZE + 1,  # one more: is there a next page?
        offset=(page - 1) * AUDIT_PAGE_SIZE,
    )
    return {
        "rows": rows[:AUDIT_PAGE_SIZE],
        "events": audit_event_names(session),
        "event": event or "",
        "page": page,
        "next": page + 1 if len(rows) > AUDIT_PAGE_SIZE and page < AUDIT_MAX_PAGE else None,
        "previous": page - 1 if page > 1 else None,
    }


# --- dead letters --------------------------------------------------------------------------


def retry_job(job_id: int, board: Board, viewer: PostViewer) -> Response:
    if board.enqueue_dispatch is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="this server cannot queue dispatch jobs"
        )
    try:
        replay(board.sessions, job_id)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    except ValueError as exc:  # not failed any more
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    board.enqueue_dispatch(job_id)
    logger.info("dashboard: dispatch job %d replayed", job_id)
    return RedirectResponse("/operations?notice=retried", status_code=status.HTTP_303_SEE_OTHER)


# --- routing rules -------------------------------------------------------------------------


def _rules(board: Dashboard) -> dict[str, Any]:
    path = board.settings.rules_file
    if path is None:
        return {"file": None, "text": None}
    try:
        return {"file": path.name, "text": Path(path).read_text(encoding="utf-8")}
    except OSError as exc:
        return {"file": path.name, "text": None, "error": f"cannot read it: {exc.strerror}"}


async def test_rules(
    request: Request,
    board: Board,
    viewer: PostViewer,
    file: UploadFile,
    calling_ae: Annotated[str, Form(max_length=16)] = "",
) -> HTMLResponse:
    """The routing decision the configured rules make for an uploaded DICOM file."""
    if board.rule_tester is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the rule tester is not available here"
        )
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        return _rule_error(board, request, viewer, "the file is larger than 64 MiB")
    if not data:
        return _rule_error(board, request, viewer, "the file is empty: choose a DICOM file")
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        return _rule_error(
            board, request, viewer, f"not a DICOM Part 10 file ({type(exc).__name__}): {exc}"
        )
    try:
        decision = board.rule_tester(ds, calling_ae.strip())
    except (PacsclipError, ValueError) as exc:  # the rules file itself is broken
        return _rule_error(board, request, viewer, str(exc))
    return _render(
        board, request, viewer, rule_test={"file": file.filename or "upload", **decision}
    )


def _rule_error(board: Dashboard, request: Request, viewer: Any, message: str) -> HTMLResponse:
    return _render(
        board,
        request,
        viewer,
        rule_test={"error": message},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


# --- site drift and adapted heads ----------------------------------------------------------


def _drift(session: Any) -> dict[str, Any]:
    from plugin.validation.drift_report import drift_document

    try:
        return drift_document(session, folds=DRIFT_FOLDS)
    except (PacsclipError, ValueError) as exc:
        return {"error": str(exc)}


def _heads(board: Dashboard) -> dict[str, Any]:
    from plugin.triage.site_heads import SiteHeadRegistry

    if board.retrieval is None:
        return {"error": "no model is configured for this server"}
    try:
        ref = board.retrieval.bundle.ref
        registry = SiteHeadRegistry.for_data_dir(board.settings.data_dir, ref)
        return {"model_ref": ref, "entries": registry.entries(), "active": registry.active()}
    except (PacsclipError, OSError, ValueError) as exc:
        return {"error": str(exc)}


async def promote_head(
    request: Request,
    board: Board,
    viewer: PostViewer,
    site: Annotated[str, Form(min_length=1, max_length=200)],
    head: Annotated[int, Form(ge=1)],
    labels: UploadFile | None = None,
    force: Annotated[bool, Form()] = False,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> HTMLResponse:
    """Put a site head through the go-live gate on the site's report labels (as `pacsclip
    adapt promote`), or validate it on an uploaded labels CSV of its site."""
    from plugin.validation.head_promotion import promote_site_head

    if board.retrieval is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="no model is configured")
    if labels is None or not labels.filename:
        return _promote_through_gate(request, board, viewer, site, head, force, reason.strip())
    data = await labels.read(MAX_UPLOAD_BYTES + 1)
    if not data or len(data) > MAX_UPLOAD_BYTES:
        return _render(
            board,
            request,
            viewer,
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            promotion={"error": "choose a labels CSV file (at most 64 MiB)"},
        )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.csv"
        path.write_bytes(data)
        try:
            outcome = promote_site_head(
                board.settings.data_dir,
                board.sessions,
                board.retrieval.bundle,
                site,
                head,
                path,
                force=force,
            )
        except (PacsclipError, ValueError) as exc:
            return _render(
                board,
                request,
                viewer,
                status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
                promotion={"error": str(exc)},
            )
    logger.info("dashboard: site head %d validated, activated=%s", head, outcome.activated)
    return _render(board, request, viewer, promotion=outcome.as_dict())


def _promote_through_gate(
    request: Request,
    board: Dashboard,
    viewer: Any,
    site: str,
    head: int,
    force: bool,
    reason: str,
) -> HTMLResponse:
    from plugin.validation.head_promotion import gate_site_head

    assert board.retrieval is not None  # checked by the caller
    if force and not reason:
        return _render(
            board,
            request,
            viewer,
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            promotion={"error": "an override needs a reason: it is kept in the audit log"},
        )
    try:
        outcome = gate_site_head(
            board.settings,
            board.sessions,
            board.retrieval.bundle,
            site,
            head,
            forced_reason=reason if force else None,
        )
    except (PacsclipError, ValueError) as exc:
        return _render(
            board,
            request,
            viewer,
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            promotion={"error": str(exc)},
        )
    logger.info("dashboard: site head %d through the gate, activated=%s", head, outcome.activated)
    return _render(board, request, viewer, promotion={"gate": outcome.as_dict()})


def router() -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    routes.add_api_route(
        "/operations", operations_page, methods=["GET"], response_class=HTMLResponse
    )
    routes.add_api_route("/operations/jobs/{job_id}/retry", retry_job, methods=["POST"])
    routes.add_api_route("/operations/rules/test", test_rules, methods=["POST"])
    routes.add_api_route("/operations/site-heads/promote", promote_head, methods=["POST"])
    return routes
