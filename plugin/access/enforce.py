"""The check every route goes through, and the access log it feeds.

``authorize`` is a dependency of the whole app: it finds the route's rule (plugin.access.policy),
authenticates, checks the role and, for a POST from a session, its CSRF token, and notes what
the access log should record. ``record_accesses`` (a middleware) writes those notes with the
answer's status once the response is ready, so a refused or failed request is recorded as such.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from fastapi import HTTPException, Request, Response, status
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from plugin.access.authn import TOKEN_ENV, Authenticator, InvalidBearer
from plugin.access.policy import Rule, rule_for
from plugin.access.principal import Principal
from plugin.catalog.access_log import AccessEntry, record_access
from plugin.roles import describe

logger = logging.getLogger(__name__)

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "X-CSRF-Token"


class LoginRequired(Exception):
    """A page asked for without a session: answered with a redirect to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class Forbidden(Exception):
    """Authenticated, without a role the route needs: a 403 that names the roles."""

    def __init__(self, principal: Principal, rule: Rule) -> None:
        super().__init__(principal.subject)
        self.principal, self.rule = principal, rule

    @property
    def message(self) -> str:
        needed = " or ".join(sorted(str(r) for r in self.rule.roles or ()))
        held = describe(self.principal.roles)
        return f"this needs the role {needed}; {self.principal.name} has {held}"


@dataclass
class AccessNotes:
    """What one request should leave in the access log."""

    principal: Principal | None = None
    entries: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def add(self, action: str, study_uid: str | None = None, detail: str | None = None) -> None:
        self.entries.append((action, study_uid, detail))


def notes(request: Request) -> AccessNotes:
    found = getattr(request.state, "access", None)
    if found is None:
        found = AccessNotes()
        request.state.access = found
    return found


def note_access(
    request: Request, action: str, study_uid: str | None = None, detail: str | None = None
) -> None:
    """For handlers: record ``action`` (on ``study_uid``) as done by this request's principal."""
    notes(request).add(action, study_uid, detail)


async def authorize(request: Request) -> Principal | None:
    """The app-wide dependency: the principal of an allowed request, None on a public route."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    rule = rule_for(request.method, path) if path else None
    if rule is None:
        logger.error("no access decision for %s %s: refused", request.method, path)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            detail=f"no access decision for {request.method} {path}: refused",
        )
    if rule.public:
        return None
    auth: Authenticator = request.app.state.auth
    if not auth.configured:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"nobody can sign in: set {TOKEN_ENV} (or api_token in the config file), "
            "make a token with `pacsclip tokens create`, or configure oidc_issuer, and restart",
        )
    try:
        principal = auth.authenticate(request)
    except InvalidBearer:
        notes(request).add("refused_token", None, f"{request.method} {path}")
        logger.warning("request refused: wrong or revoked bearer token")
        raise _unauthorized("invalid bearer token", error="invalid_token") from None
    if principal is None:
        if request.url.path.startswith("/api/"):
            raise _unauthorized("missing bearer token", error=None)
        if request.method not in SAFE_METHODS:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, detail="sign in first: your session ended"
            )
        raise LoginRequired(request.url.path)
    access = notes(request)
    access.principal = principal
    study_uid = request.path_params.get("study_uid")
    if not principal.has_any(rule.roles or frozenset()):
        access.add("denied", study_uid, f"{request.method} {path}")
        raise Forbidden(principal, rule)
    if request.method not in SAFE_METHODS and principal.csrf is not None:
        await _check_csrf(request, principal.csrf)
    if rule.action:
        sop = request.path_params.get("sop_instance_uid")
        access.add(rule.action, study_uid, f"SOP Instance UID {sop}" if sop else None)
    return principal


async def _check_csrf(request: Request, expected: str) -> None:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not secrets.compare_digest(sent.encode(), expected.encode()):
        logger.warning("POST %s refused: missing or wrong CSRF token", request.url.path)
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="missing or wrong CSRF token: reload the page and submit the form again",
        )


def _unauthorized(detail: str, *, error: str | None) -> HTTPException:
    challenge = 'Bearer realm="pacsclip"'
    if error is not None:
        challenge += f', error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )


def access_recorder(
    sessions: sessionmaker[Session],
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """A middleware that writes each request's notes, with its status, to the access log."""

    async def record_accesses(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        access: AccessNotes | None = getattr(request.state, "access", None)
        if access is None or not access.entries:
            return response
        who = access.principal
        route = getattr(request.scope.get("route"), "path", None) or request.url.path
        client = request.client.host if request.client else None
        entries = [
            AccessEntry(
                subject=who.subject if who else "unknown",
                display_name=who.name if who else "unknown",
                roles=",".join(sorted(str(r) for r in who.roles)) if who else "",
                via=who.via if who else "-",
                action=action,
                method=request.method,
                route=route,
                status=response.status_code,
                study_instance_uid=study_uid,
                client_host=client,
                detail=detail,
            )
            for action, study_uid, detail in access.entries
        ]
        try:
            await run_in_threadpool(_write, sessions, entries)
        except SQLAlchemyError as exc:
            logger.error("access log not written (%s)", type(exc).__name__)
        return response

    return record_accesses


def _write(sessions: sessionmaker[Session], entries: list[AccessEntry]) -> None:
    with sessions.begin() as session:
        record_access(session, entries)
