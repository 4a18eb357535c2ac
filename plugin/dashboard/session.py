"""Who may see the dashboard: the API's bearer token, or a login with that token that sets a
signed session cookie; and the CSRF token every cookie-authenticated POST must carry.

The cookie is signed (itsdangerous) with a key derived from the API token, so changing the
token logs everyone out, and holds only a random session id and its CSRF token: nothing about
patients. It is HttpOnly and SameSite=Strict. Requests that carry ``Authorization: Bearer``
are not exposed to CSRF (a browser never adds that header by itself) and need no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from fastapi import HTTPException, Request, status
from itsdangerous import BadSignature, URLSafeTimedSerializer

from plugin.api.auth import TOKEN_ENV, configured_token

logger = logging.getLogger(__name__)

SESSION_COOKIE: Final = "pacsclip_session"
LOGIN_CSRF_COOKIE: Final = "pacsclip_login_csrf"
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "X-CSRF-Token"
SESSION_MAX_AGE_S: Final = 12 * 3600


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Viewer:
    """An authenticated request: ``csrf`` is None when it came with the bearer token."""

    session_id: str | None
    csrf: str | None


class DashboardAuth:
    """Issues and checks session cookies and CSRF tokens for one API token."""

    def __init__(self, token: object) -> None:
        self._token = configured_token(token)  # type: ignore[arg-type]
        key = (
            hmac.new(self._token, b"pacsclip dashboard session", hashlib.sha256).hexdigest()
            if self._token
            else secrets.token_hex(32)  # no token: nobody can log in, and nothing verifies
        )
        self._signer = URLSafeTimedSerializer(key, salt="pacsclip-dashboard-session")

    @property
    def configured(self) -> bool:
        return self._token is not None

    def token_matches(self, candidate: str) -> bool:
        # Compared as bytes: compare_digest refuses non-ASCII str, and a client can send any.
        return self._token is not None and secrets.compare_digest(
            candidate.encode("utf-8"), self._token
        )

    def new_session(self) -> tuple[str, Viewer]:
        """A signed cookie value and the viewer it stands for."""
        viewer = Viewer(secrets.token_urlsafe(16), secrets.token_urlsafe(32))
        return self._signer.dumps({"sid": viewer.session_id, "csrf": viewer.csrf}), viewer

    def viewer(self, request: Request) -> Viewer | None:
        """The viewer of a request: bearer token first, then the session cookie."""
        if not self.configured:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials:
            if self.token_matches(credentials.strip()):
                return Viewer(None, None)
            logger.warning("dashboard request refused: wrong bearer token")
            return None
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            logger.info("dashboard session cookie refused (expired or not signed by us)")
            return None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("sid", "csrf")
        ):
            return None
        return Viewer(data["sid"], data["csrf"])

    def page_viewer(self, request: Request) -> Viewer:
        """A FastAPI dependency for pages and images: the viewer, or off to the login page."""
        if not self.configured:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"the dashboard has no token configured: set {TOKEN_ENV} and restart",
            )
        viewer = self.viewer(request)
        if viewer is None:
            if request.headers.get("Authorization"):
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="invalid bearer token")
            raise LoginRequired(request.url.path)
        return viewer

    async def post_viewer(self, request: Request) -> Viewer:
        """A FastAPI dependency for POSTs: authenticated, and with the session's CSRF token."""
        viewer = self.page_viewer(request)
        if viewer.csrf is None:  # bearer token: no ambient credential to forge
            return viewer
        sent = request.headers.get(CSRF_HEADER)
        if sent is None:
            form = await request.form()
            value = form.get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
        if not sent or not secrets.compare_digest(sent.encode(), viewer.csrf.encode()):
            logger.warning(
                "dashboard POST %s refused: missing or wrong CSRF token", request.url.path
            )
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail="missing or wrong CSRF token: reload the page and submit the form again",
            )
        return viewer


def login_location(next_path: str) -> str:
    return f"/login?next={quote(safe_next(next_path), safe='/')}"


def safe_next(path: str | None) -> str:
    """Only a path of this site: never another host (``//host``, ``/\\host``) after login."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")):
        return "/"
    return path
