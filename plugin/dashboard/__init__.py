"""The web dashboard: worklist, study pages, operations and validation, server-rendered
(Jinja2) beside the JSON API, with a few lines of plain JavaScript for live updates. No build
step.

``mount_dashboard`` adds its routes to the API's FastAPI app from explicit inputs; everything
it needs reaches the routes through ``app.state.dashboard``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jinja2
from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from plugin.access.authn import Authenticator
from plugin.access.enforce import Forbidden
from plugin.access.oidc import HANDSHAKE_COOKIE, HANDSHAKE_MAX_AGE_S, OidcSignIn
from plugin.dashboard.images import PngCache
from plugin.dashboard.metrics_history import MetricsHistory
from plugin.dashboard.session import LoginRequired, login_location
from plugin.disclaimers import NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL
from plugin.metrics import PacsclipMetrics
from plugin.retrieval.service import RetrievalService
from plugin.settings import Settings

if TYPE_CHECKING:
    from plugin.dashboard.validation import ValidationSource

logger = logging.getLogger(__name__)

PACKAGE: Final = Path(__file__).parent
# Routing decision for one file: (header-only dataset, calling AE title) -> decision as a dict.
RuleTester = Callable[[Dataset, str], dict[str, object]]
# Puts a replayed dispatch job on the dispatch queue.
DispatchEnqueuer = Callable[[int], None]

# Defence in depth behind Jinja2's autoescaping: no inline or foreign script can run.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


@dataclass(frozen=True)
class Dashboard:
    settings: Settings
    sessions: sessionmaker[Session]
    auth: Authenticator
    oidc: OidcSignIn | None
    templates: Jinja2Templates
    images: PngCache
    history: MetricsHistory
    retrieval: RetrievalService | None
    rule_tester: RuleTester | None
    enqueue_dispatch: DispatchEnqueuer | None
    validation: ValidationSource


def dashboard(request: Request) -> Dashboard:
    board: Dashboard = request.app.state.dashboard
    return board


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE / "templates"),
        autoescape=True,  # everything from DICOM and the catalog is text, never markup
        undefined=jinja2.StrictUndefined,
    )
    env.globals.update(NOT_FOR_DIAGNOSIS=NOT_FOR_DIAGNOSIS, SYNTHETIC_MODEL=SYNTHETIC_MODEL)
    env.filters["age"] = age
    env.filters["flag"] = flag
    env.filters["dicom_date"] = dicom_date
    env.filters["person_name"] = person_name
    return Jinja2Templates(env=env)


def dicom_date(value: str | None) -> str:
    """A DICOM DA (YYYYMMDD) as 2026-12-01; anything else as it is, none as "-"."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "-"


def person_name(value: str | None) -> str:
    """A DICOM PN as read: "DOE^JANE^M" as "DOE, JANE M" (its alphabetic group only)."""
    alphabetic = (value or "").split("=")[0]
    family, _, rest = alphabetic.partition("^")
    given = " ".join(part for part in rest.split("^") if part)
    name = f"{family}, {given}" if family and given else family or given
    return name.strip() or "-"


def flag(priority: str | None) -> str:
    """A worklist flag as shown: STAT stands out; "not_scored" reads as words."""
    if priority is None:
        return "-"
    return "STAT" if priority == "stat" else priority.replace("_", " ")


def age(moment: datetime, now: datetime) -> str:
    """How long ago, the way a worklist says it: 45 s, 12 min, 3 h, 2 d."""
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def mount_dashboard(
    app: FastAPI,
    settings: Settings,
    sessions: sessionmaker[Session],
    metrics: PacsclipMetrics,
    *,
    retrieval: RetrievalService | None = None,
    rule_tester: RuleTester | None = None,
    enqueue_dispatch: DispatchEnqueuer | None = None,
) -> None:
    from starlette.middleware.sessions import SessionMiddleware

    from plugin.dashboard import access_log, operations, pages, sign_in, validation

    history = MetricsHistory(metrics.registry, scrape_urls=settings.metrics_scrape_urls)
    auth: Authenticator = app.state.auth
    oidc = OidcSignIn(settings) if settings.oidc_enabled else None
    app.state.dashboard = Dashboard(
        settings=settings,
        sessions=sessions,
        auth=auth,
        oidc=oidc,
        templates=make_templates(),
        images=PngCache(Path(settings.data_dir) / "dashboard-cache"),
        history=history,
        retrieval=retrieval,
        rule_tester=rule_tester,
        enqueue_dispatch=enqueue_dispatch,
        validation=validation.ValidationSource(settings, sessions),
    )
    app.include_router(sign_in.router())
    app.include_router(pages.router())
    app.include_router(operations.router())
    app.include_router(validation.router())
    app.include_router(access_log.router())
    app.mount("/static", StaticFiles(directory=PACKAGE / "static"), name="static")
    app.add_exception_handler(LoginRequired, _to_login)
    app.add_exception_handler(Forbidden, _forbidden_page)
    app.middleware("http")(_security_headers)
    if oidc is not None:
        # Only the handshake's state (state, nonce, PKCE verifier, where to go next), for ten
        # minutes, under /auth; Lax, since the provider's redirect back is a cross-site GET.
        app.add_middleware(
            SessionMiddleware,
            secret_key=auth.signing_key,
            session_cookie=HANDSHAKE_COOKIE,
            max_age=HANDSHAKE_MAX_AGE_S,
            path="/auth",
            same_site="lax",
        )
    _sample_while_serving(app, history, oidc)


async def _to_login(request: Request, exc: Exception) -> Response:
    next_path = exc.next_path if isinstance(exc, LoginRequired) else "/"
    return RedirectResponse(login_location(next_path), status_code=303)


async def _forbidden_page(request: Request, exc: Exception) -> Response:
    from plugin.api.app import forbidden_json
    from plugin.dashboard.pages import render

    if request.url.path.startswith("/api/") or not isinstance(exc, Forbidden):
        return await forbidden_json(request, exc)
    board = dashboard(request)
    needed = sorted(str(r) for r in exc.rule.roles or ())
    return render(
        board,
        request,
        "forbidden.html",
        exc.principal,
        403,
        needed=needed,
        message=exc.message,
        provider=board.oidc.provider_name if board.oidc else None,
    )


async def _security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
    response: Response = await call_next(request)
    path = request.url.path
    # The JSON API, /metrics and FastAPI's own /docs (which loads its UI from a CDN) keep theirs.
    if not path.startswith(("/api/", "/metrics", "/docs", "/redoc", "/openapi.json")):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def _sample_while_serving(app: FastAPI, history: MetricsHistory, oidc: OidcSignIn | None) -> None:
    """Sample the metrics in the background for as long as the server runs; at start, say
    whether the identity provider answers."""
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(running: Any) -> AsyncIterator[Any]:
        if oidc is not None:
            await _report_provider(oidc)
        history.start()
        try:
            async with previous(running) as state:
                yield state
        finally:
            history.stop()

    app.router.lifespan_context = lifespan


async def _report_provider(oidc: OidcSignIn) -> None:
    from plugin.access.oidc import ProviderUnavailable

    try:
        await oidc.check_provider()
    except ProviderUnavailable as exc:
        logger.error("single sign-on: %s; sign-in fails until it does", exc)
        return
    logger.info("single sign-on: identity provider %s answers", oidc.issuer)
