"""Bearer-token authentication of the worklist API."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

logger = logging.getLogger(__name__)

TOKEN_ENV = "PACSCLIP_API_TOKEN"


def configured_token(value: SecretStr | str | None) -> bytes | None:
    """The token as bytes, or None when unset or blank (a blank token would accept anyone)."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if text is None or not text.strip():
        return None
    return text.encode("utf-8")


class BearerAuth:
    """A FastAPI dependency: passes when `Authorization: Bearer <token>` matches settings.

    With no token configured every request is refused with 503: an API that answers
    unauthenticated requests because someone forgot a setting is not a safe default.
    """

    def __init__(self, token: SecretStr | str | None) -> None:
        self._token = configured_token(token)

    def __call__(
        self,
        credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
        ],
    ) -> None:
        if self._token is None:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"the API has no token configured: set {TOKEN_ENV} (or api_token in "
                "the config file) and restart",
            )
        if credentials is None:
            raise _unauthorized("missing bearer token", error=None)
        # Compared as bytes: compare_digest refuses non-ASCII str, and a client can send any.
        if not secrets.compare_digest(credentials.credentials.encode("utf-8"), self._token):
            logger.warning("api request refused: wrong bearer token")
            raise _unauthorized("invalid bearer token", error="invalid_token")


def _unauthorized(detail: str, *, error: str | None) -> HTTPException:
    challenge = 'Bearer realm="pacsclip"'
    if error is not None:
        challenge += f', error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )
