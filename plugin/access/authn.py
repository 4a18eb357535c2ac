"""Authentication: who a request comes from.

A bearer token (``api_token`` of the settings, or a named machine token) is checked first;
then the dashboard's session cookie, which a sign-in through the identity provider (or, while
allowed, a login with ``api_token``) sets. The cookie is signed (itsdangerous) and holds the
person's subject, display name and roles, a random session id and its CSRF token: nothing
about patients. It is HttpOnly and SameSite=Strict. Roles are those of the sign-in: a change
of groups at the provider takes effect at the next sign-in (at most ``SESSION_MAX_AGE_S``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import SecretStr

from plugin.access.principal import Principal
from plugin.access.tokens import TokenError, TokenStore
from plugin.roles import Role
from plugin.settings import Settings

logger = logging.getLogger(__name__)

TOKEN_ENV: Final = "PACSCLIP_API_TOKEN"
SESSION_SECRET_FILE: Final = "session-secret"
SESSION_COOKIE: Final = "pacsclip_session"
SESSION_MAX_AGE_S: Final = 12 * 3600


class InvalidBearer(Exception):
    """A bearer token was sent and is not one of ours (or is revoked)."""


def configured_token(value: SecretStr | str | None) -> bytes | None:
    """The token as bytes, or None when unset or blank (a blank token would accept anyone)."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if text is None or not text.strip():
        return None
    return text.encode("utf-8")


class Authenticator:
    """Checks bearer tokens and issues and reads session cookies, for one process' settings."""

    def __init__(self, settings: Settings) -> None:
        self._api_token = configured_token(settings.api_token)
        self._api_roles = frozenset(settings.api_token_roles)
        self.tokens = TokenStore(settings.data_dir)
        self.oidc_enabled = settings.oidc_enabled
        self.token_login = settings.token_login_enabled and self._api_token is not None
        self.signing_key = _session_key(settings, self._api_token)
        self._signer = URLSafeTimedSerializer(self.signing_key, salt="pacsclip-dashboard-session")

    @property
    def configured(self) -> bool:
        """Whether this deployment authenticates at all: a token or a provider is configured,
        or machine tokens were made (a revoked one is then refused with 401, not 503)."""
        if self._api_token is not None or self.oidc_enabled:
            return True
        try:
            return bool(self.tokens.all())
        except TokenError:
            return False

    def api_token_matches(self, candidate: str) -> bool:
        # Compared as bytes: compare_digest refuses non-ASCII str, and a client can send any.
        return self._api_token is not None and secrets.compare_digest(
            candidate.encode("utf-8"), self._api_token
        )

    def api_token_principal(self) -> Principal:
        return Principal("api-token", "API token", self._api_roles, "api-token")

    def bearer(self, presented: str) -> Principal:
        """The principal of a bearer token; raises InvalidBearer for anything else."""
        if self.api_token_matches(presented):
            return self.api_token_principal()
        try:
            token = self.tokens.match(presented)
        except TokenError as exc:
            logger.error("%s", exc)
            token = None
        if token is None:
            raise InvalidBearer
        return Principal(f"token:{token.name}", token.name, frozenset(token.roles), "token")

    def authenticate(self, request: Request) -> Principal | None:
        """Bearer token first, then the session cookie; None when neither is there."""
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return self.bearer(credentials.strip())
        if header:
            raise InvalidBearer
        cookie = request.cookies.get(SESSION_COOKIE)
        return self.session(cookie) if cookie else None

    def new_session(self, principal: Principal) -> tuple[str, Principal]:
        """A signed cookie value and the principal it stands for, with a new session id and
        CSRF token."""
        sid, csrf = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        data = {
            "sid": sid,
            "csrf": csrf,
            "sub": principal.subject,
            "name": principal.name,
            "roles": sorted(str(r) for r in principal.roles),
            "via": principal.via,
        }
        signed = Principal(
            principal.subject, principal.name, principal.roles, principal.via, sid, csrf
        )
        return self._signer.dumps(data), signed

    def session(self, cookie: str) -> Principal | None:
        try:
            data = self._signer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            logger.info("dashboard session cookie refused (expired or not signed by us)")
            return None
        try:
            roles = frozenset(Role(r) for r in data["roles"])
            fields = [data[k] for k in ("sub", "name", "via", "sid", "csrf")]
        except (KeyError, TypeError, ValueError):
            return None
        if not all(isinstance(f, str) for f in fields) or data["via"] not in (
            "oidc",
            "api-token",
        ):
            return None
        sub, name, via, sid, csrf = fields
        return Principal(sub, name, roles, via, sid, csrf)


def _session_key(settings: Settings, api_token: bytes | None) -> str:
    if settings.session_secret is not None and settings.session_secret.get_secret_value():
        secret = settings.session_secret.get_secret_value().encode()
    elif api_token is not None:
        secret = api_token  # changing the token logs everyone out
    else:
        secret = _kept_secret(Path(settings.data_dir) / SESSION_SECRET_FILE)
    return hmac.new(secret, b"pacsclip dashboard session", hashlib.sha256).hexdigest()


def _kept_secret(path: Path) -> bytes:
    """A random key made once per data directory, so sessions survive restarts."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    return path.read_bytes()
