"""Sign-in through the hospital's OpenID Connect provider (Entra ID, Keycloak, ADFS, ...).

Authlib runs the authorization code flow with PKCE (S256), state and nonce, and verifies the ID
token: signature against the provider's published keys, issuer, audience, expiry, nonce. This
module turns what it returns into a Principal with roles from the person's groups, and every
way it can fail into a sentence for the person at the browser. The handshake's state lives for
ten minutes in its own signed cookie (Starlette's SessionMiddleware, path ``/auth``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import httpx
from authlib.integrations.starlette_client import OAuth, OAuthError
from fastapi import Request, Response
from joserfc import errors as jose_errors

from plugin.access.principal import Principal
from plugin.roles import Role, roles_from_groups
from plugin.settings import Settings

logger = logging.getLogger(__name__)

HANDSHAKE_COOKIE: Final = "pacsclip_oidc"
HANDSHAKE_MAX_AGE_S: Final = 600
CLOCK_SKEW_S: Final = 60


def _http_errors() -> tuple[type[Exception], ...]:
    """The HTTP client errors Authlib may raise: it uses httpx2 where installed, else httpx."""
    errors: list[type[Exception]] = [httpx.HTTPError]
    try:
        import httpx2
    except ImportError:
        return tuple(errors)
    errors.append(httpx2.HTTPError)
    return tuple(errors)


HTTP_ERRORS: Final[tuple[type[Exception], ...]] = _http_errors()
ERRORS_OF_DISCOVERY: Final[tuple[type[Exception], ...]] = (*HTTP_ERRORS, ValueError)


class SignInRefused(Exception):
    """The provider answered, and the answer does not sign this person in."""

    def __init__(self, reason: str, *, subject: str | None = None, name: str | None = None):
        super().__init__(reason)
        self.reason, self.subject, self.name = reason, subject, name


class ProviderUnavailable(Exception):
    """The provider did not answer, or answered with something that is not OpenID Connect."""


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


class OidcSignIn:
    """One provider, as the settings configure it."""

    def __init__(
        self, settings: Settings, *, server_metadata: Mapping[str, Any] | None = None
    ) -> None:
        assert settings.oidc_issuer and settings.oidc_client_id  # checked by Settings
        self.issuer = settings.oidc_issuer
        self.provider_name = settings.oidc_provider_name
        self.groups_claim = settings.oidc_groups_claim
        self.role_groups: dict[Role, list[str]] = dict(settings.oidc_role_groups)
        self.redirect_uri = settings.oidc_redirect_uri
        secret = settings.oidc_client_secret
        registration: dict[str, Any] = {
            "client_id": settings.oidc_client_id,
            "client_secret": secret.get_secret_value() if secret else None,
            "client_kwargs": {
                "scope": settings.oidc_scopes,
                "code_challenge_method": "S256",
                "timeout": settings.oidc_timeout_s,
            },
        }
        if server_metadata is not None:  # given, not discovered (Authlib keeps extra keys)
            registration.update(server_metadata)
        else:
            registration["server_metadata_url"] = discovery_url(self.issuer)
        self.client: Any = OAuth().register(name="hospital", **registration)

    @property
    def claims_options(self) -> dict[str, Any]:
        # The configured issuer, not whatever the discovery document says: a token from
        # another provider is refused even if a document names it.
        return {"iss": {"essential": True, "values": [self.issuer.rstrip("/"), self.issuer]}}

    async def check_provider(self) -> dict[str, Any]:
        """The provider's discovery document, checked; raises ProviderUnavailable."""
        try:
            metadata: dict[str, Any] = await self.client.load_server_metadata()
        except ERRORS_OF_DISCOVERY as exc:
            self.client.server_metadata = {}  # try again next time
            raise ProviderUnavailable(
                f"the identity provider at {self.issuer} did not answer "
                f"({_why(exc)}); check oidc_issuer and that this host can reach it"
            ) from exc
        named = str(metadata.get("issuer", "")).rstrip("/")
        if named != self.issuer.rstrip("/"):
            self.client.server_metadata = {}
            raise ProviderUnavailable(
                f"the discovery document at {discovery_url(self.issuer)} names the issuer "
                f"{named or '(none)'}, not {self.issuer}: set oidc_issuer to the provider's "
                "issuer exactly"
            )
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not metadata.get(key):
                raise ProviderUnavailable(f"the provider's discovery document has no {key}")
        return metadata

    async def start(self, request: Request, redirect_uri: str) -> Response:
        """Off to the provider's sign-in page, once it has answered now: a provider that is
        down is said here, not left to the browser's error page at the provider's address."""
        self.client.server_metadata.pop("_loaded_at", None)  # Authlib re-reads it then
        await self.check_provider()
        response: Response = await self.client.authorize_redirect(request, redirect_uri)
        return response

    async def finish(self, request: Request) -> Principal:
        """The provider sent the browser back: exchange the code, verify the ID token."""
        try:
            token = await self.client.authorize_access_token(
                request, claims_options=self.claims_options, leeway=CLOCK_SKEW_S
            )
        except OAuthError as exc:
            raise SignInRefused(_oauth_refusal(exc)) from exc
        except HTTP_ERRORS as exc:
            raise ProviderUnavailable(
                f"the identity provider at {self.issuer} did not answer ({_why(exc)})"
            ) from exc
        except jose_errors.JoseError as exc:
            raise SignInRefused(token_refusal(exc)) from exc
        claims = token.get("userinfo")
        if not claims:
            raise SignInRefused("the identity provider sent no ID token: is openid in oidc_scopes?")
        groups = claims.get(self.groups_claim)
        if groups is None and "access_token" in token:
            try:
                groups = (await self.client.userinfo(token=token)).get(self.groups_claim)
            except HTTP_ERRORS as exc:
                raise ProviderUnavailable(
                    f"the identity provider's userinfo did not answer ({_why(exc)})"
                ) from exc
        return self.principal(claims, groups)

    def principal(self, claims: Mapping[str, Any], groups: Any) -> Principal:
        """The person of verified claims; refused when no group of theirs maps to a role."""
        subject = str(claims.get("sub") or "")
        if not subject:
            raise SignInRefused("the ID token has no subject (sub)")
        name = str(
            claims.get("name") or claims.get("preferred_username") or claims.get("email") or subject
        )
        if isinstance(groups, str):
            groups = [groups]
        held = [str(g) for g in groups] if isinstance(groups, list) else []
        roles = roles_from_groups(held, self.role_groups)
        if not roles:
            raise SignInRefused(
                f"you signed in as {name}, but none of your groups at {self.provider_name} "
                f"gives a pacsclip role (the groups come from the {self.groups_claim!r} claim). "
                "Ask your administrator to add you to one of: "
                + "; ".join(
                    f"{', '.join(names)} ({role})"
                    for role, names in self.role_groups.items()
                    if names
                ),
                subject=subject,
                name=name,
            )
        return Principal(subject, name, roles, "oidc")


def token_refusal(exc: Exception) -> str:
    """What to tell a person whose ID token failed verification."""
    claim = getattr(exc, "claim", None)
    if isinstance(exc, jose_errors.ExpiredTokenError):
        why = "it has expired (check this server's clock)"
    elif isinstance(exc, jose_errors.BadSignatureError):
        why = "its signature does not verify against the provider's keys"
    elif isinstance(exc, jose_errors.InvalidKeyIdError):
        why = "it is signed with a key the provider does not publish"
    elif claim == "iss":
        why = "it was issued by another provider than oidc_issuer"
    elif claim in ("aud", "azp"):
        why = "it was issued to another client than oidc_client_id"
    elif claim == "nonce":
        why = "it does not belong to this sign-in (nonce)"
    elif claim:
        why = f"its {claim} claim is wrong or missing"
    else:
        why = f"it is not a valid token ({type(exc).__name__})"
    return f"the identity provider's ID token was refused: {why}"


def _oauth_refusal(exc: OAuthError) -> str:
    if exc.error == "mismatching_state":
        return "this sign-in did not start here, or took longer than ten minutes: start again"
    if exc.error == "access_denied":
        return "the identity provider did not sign you in (access denied)"
    detail = f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
    return f"the identity provider refused the sign-in ({detail})"


def _why(exc: Exception) -> str:
    # By name: the same for httpx and httpx2.
    kinds = {k.__name__ for k in type(exc).__mro__}
    if "HTTPStatusError" in kinds:
        return f"HTTP {exc.response.status_code}"  # type: ignore[attr-defined]
    if "TimeoutException" in kinds:
        return "timed out"
    if "ConnectError" in kinds:
        return "connection refused or host unreachable"
    return type(exc).__name__
