"""Who a request comes from, once authenticated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plugin.roles import Role

# How they proved it: a person through the identity provider, a named machine token, the
# one token of the settings (api_token), or a dashboard login with that token.
Via = Literal["oidc", "token", "api-token"]


@dataclass(frozen=True)
class Principal:
    subject: str  # the provider's `sub`, "token:NAME" or "api-token"
    name: str  # what people read: display name, or the token's name
    roles: frozenset[Role]
    via: Via
    session_id: str | None = None  # set for a dashboard session (cookie)
    csrf: str | None = None  # the session's CSRF token; None for a bearer token

    def has_any(self, roles: frozenset[Role]) -> bool:
        return bool(self.roles & roles)
