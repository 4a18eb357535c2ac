"""The dashboard's cookies and where a login returns to.

Authentication itself (bearer tokens, the signed session cookie, roles) is plugin.access; this
module keeps the names the pages share. Requests that carry ``Authorization: Bearer`` are not
exposed to CSRF (a browser never adds that header by itself) and need no CSRF token.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from plugin.access.authn import SESSION_COOKIE, SESSION_MAX_AGE_S
from plugin.access.enforce import CSRF_FIELD, CSRF_HEADER, LoginRequired

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "LOGIN_CSRF_COOKIE",
    "SESSION_COOKIE",
    "SESSION_MAX_AGE_S",
    "LoginRequired",
    "login_location",
    "safe_next",
]

LOGIN_CSRF_COOKIE: Final = "pacsclip_login_csrf"


def login_location(next_path: str) -> str:
    return f"/login?next={quote(safe_next(next_path), safe='/')}"


def safe_next(path: str | None) -> str:
    """Only a path of this site: never another host (``//host``, ``/\\host``) after login."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")):
        return "/"
    return path
