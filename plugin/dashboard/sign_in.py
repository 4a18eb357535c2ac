"""Signing in and out: through the hospital's identity provider (OpenID Connect), or, where
the settings allow it, with the API token; and the pages that say why a sign-in failed."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse

from plugin.access.enforce import notes
from plugin.access.oidc import ProviderUnavailable, SignInRefused
from plugin.access.principal import Principal
from plugin.dashboard.pages import Board, PostViewer, render
from plugin.dashboard.session import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    safe_next,
)
from plugin.roles import Role

logger = logging.getLogger(__name__)

NEXT_KEY = "pacsclip_next"  # where to go after the provider, kept in the handshake cookie


def login_form(
    request: Request, board: Board, next: str = "/", signed_out: bool = False
) -> HTMLResponse:
    return _login_page(board, request, next=next, notice="Signed out." if signed_out else None)


def _login_page(
    board: Board,
    request: Request,
    *,
    next: str = "/",
    error: str | None = None,
    notice: str | None = None,
    status_code: int = 200,
    login_csrf: str | None = None,
) -> HTMLResponse:
    login_csrf = login_csrf or secrets.token_urlsafe(32)
    response = render(
        board,
        request,
        "login.html",
        None,
        status_code,
        next=safe_next(next),
        login_csrf=login_csrf,
        error=error,
        notice=notice,
        configured=board.auth.configured,
        token_login=board.auth.token_login,
        provider=board.oidc.provider_name if board.oidc else None,
    )
    _set_cookie(request, response, LOGIN_CSRF_COOKIE, login_csrf, max_age=3600)
    return response


def login(
    request: Request,
    board: Board,
    token: Annotated[str, Form()],
    csrf_token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    """A login with the API token, while ``dashboard_token_login`` allows it."""
    # Login CSRF: the form's token must match the cookie set with the form (double submit).
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(csrf_token.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="the login form expired or was not sent by this site: reload it and retry",
        )
    if not board.auth.token_login:
        return _login_page(
            board,
            request,
            next=next,
            status_code=status.HTTP_403_FORBIDDEN,
            error="Signing in with the API token is turned off here: sign in with "
            f"{board.oidc.provider_name if board.oidc else 'single sign-on'}.",
        )
    if not board.auth.api_token_matches(token):
        logger.warning("dashboard login refused: wrong token")
        notes(request).add("login_refused", None, "wrong API token")
        return _login_page(
            board,
            request,
            next=next,
            status_code=status.HTTP_401_UNAUTHORIZED,
            login_csrf=expected,
            error="That token is not the one this pacsclip is configured with.",
        )
    return _signed_in(request, board, board.auth.api_token_principal(), next)


def home(principal: Principal, next: str) -> str:
    """Where a sign-in lands: where it was asked for, except that the worklist is only for
    radiologists, and the others start on their own page."""
    next = safe_next(next)
    if next != "/" or Role.RADIOLOGIST in principal.roles:
        return next
    if principal.roles & {Role.PACS_ADMIN, Role.AI_ADMIN}:
        return "/operations"
    return "/access-log"


def _signed_in(request: Request, board: Board, who: Principal, next: str) -> Response:
    next = home(who, next)
    cookie, principal = board.auth.new_session(who)
    access = notes(request)
    access.principal = principal
    access.add("login", None, f"via {principal.via}")
    if principal.via == "oidc":
        # A page, not a redirect: a SameSite=Strict cookie set at the end of a redirect chain
        # that began at the provider's site would not be sent on the next hop.
        response: Response = render(
            board, request, "signed_in.html", None, next=safe_next(next), person=principal
        )
    else:
        response = RedirectResponse(safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    _set_cookie(request, response, SESSION_COOKIE, cookie, max_age=SESSION_MAX_AGE_S)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    logger.info("dashboard sign-in via %s", principal.via)
    return response


def logout(request: Request, board: Board, viewer: PostViewer) -> Response:
    response = RedirectResponse("/login?signed_out=1", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def oidc_start(request: Request, board: Board, next: str = "/") -> Response:
    """Off to the identity provider; it sends the browser back to /auth/callback."""
    if board.oidc is None:
        return _login_page(
            board,
            request,
            next=next,
            status_code=status.HTTP_404_NOT_FOUND,
            error="Single sign-on is not configured here (oidc_issuer).",
        )
    request.session[NEXT_KEY] = safe_next(next)
    redirect_uri = board.oidc.redirect_uri or str(request.url_for("oidc_callback"))
    try:
        return await board.oidc.start(request, redirect_uri)
    except ProviderUnavailable as exc:
        logger.error("sign-in: %s", exc)
        return _login_page(
            board,
            request,
            next=next,
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            error=f"Sign-in is unavailable: {exc}. Try again later; machine tokens still work.",
        )


async def oidc_callback(request: Request, board: Board) -> Response:
    if board.oidc is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="single sign-on is not configured")
    next_path = safe_next(request.session.pop(NEXT_KEY, "/"))
    try:
        principal = await board.oidc.finish(request)
    except SignInRefused as exc:
        logger.warning("sign-in refused: %s", exc.reason.split(":")[0])
        access = notes(request)
        if exc.subject:
            access.principal = Principal(exc.subject, exc.name or exc.subject, frozenset(), "oidc")
        access.add("login_refused", None, exc.reason)
        return _login_page(
            board,
            request,
            next=next_path,
            status_code=status.HTTP_403_FORBIDDEN,
            error=f"Not signed in: {exc.reason}.",
        )
    except ProviderUnavailable as exc:
        logger.error("sign-in: %s", exc)
        notes(request).add("login_refused", None, str(exc))
        return _login_page(
            board,
            request,
            next=next_path,
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            error=f"Sign-in is unavailable: {exc}. Try again later.",
        )
    return _signed_in(request, board, principal, next_path)


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def router() -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    routes.add_api_route("/login", login_form, methods=["GET"], response_class=HTMLResponse)
    routes.add_api_route("/login", login, methods=["POST"])
    routes.add_api_route("/logout", logout, methods=["POST"])
    routes.add_api_route("/auth/login", oidc_start, methods=["GET"])
    routes.add_api_route("/auth/callback", oidc_callback, methods=["GET"], name="oidc_callback")
    return routes
