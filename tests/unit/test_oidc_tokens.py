"""ID tokens that must not sign anyone in, checked the way a sign-in checks them (Authlib's
verification with the issuer pinned to oidc_issuer), each with the sentence a person reads;
and the mapping from a person's groups to roles, or to a refusal that says what to ask for."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from plugin.access.oidc import CLOCK_SKEW_S, OidcSignIn, SignInRefused, token_refusal
from plugin.roles import Role
from plugin.settings import Settings

ISSUER = "https://login.example.org/realms/hospital"
CLIENT = "pacsclip-dashboard"
NONCE = "n-0S6_WzA2Mj"


@pytest.fixture(scope="module")
def keys() -> tuple[RSAKey, RSAKey]:
    """The provider's signing key, and a key nobody published."""
    return RSAKey.generate_key(2048, parameters={"kid": "idp-1"}), RSAKey.generate_key(
        2048, parameters={"kid": "idp-1"}
    )


def sign_in(published: RSAKey, **settings: Any) -> OidcSignIn:
    config = Settings(oidc_issuer=ISSUER, oidc_client_id=CLIENT, **settings)
    metadata = {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/auth",
        "token_endpoint": f"{ISSUER}/token",
        "jwks_uri": f"{ISSUER}/certs",
        "jwks": KeySet([published]).as_dict(private=False),
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    return OidcSignIn(config, server_metadata=metadata)


def id_token(key: RSAKey, **changes: Any) -> dict[str, str]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": CLIENT,
        "sub": "rita",
        "name": "Rita Reader",
        "iat": now,
        "exp": now + 300,
        "nonce": NONCE,
        "groups": ["pacsclip-radiologists"],
    }
    claims.update(changes)
    token = jwt.encode({"alg": "RS256", "kid": "idp-1"}, claims, key)
    return {"id_token": token, "access_token": "opaque"}


def verify(client: OidcSignIn, token: dict[str, str]) -> Any:
    return asyncio.run(
        client.client.parse_id_token(
            token, NONCE, claims_options=client.claims_options, leeway=CLOCK_SKEW_S
        )
    )


def test_a_good_token_signs_in_with_the_roles_of_its_groups(keys: tuple[RSAKey, RSAKey]) -> None:
    client = sign_in(keys[0])
    claims = verify(client, id_token(keys[0]))
    who = client.principal(claims, claims["groups"])
    assert (who.subject, who.name, who.roles, who.via) == (
        "rita",
        "Rita Reader",
        frozenset({Role.RADIOLOGIST}),
        "oidc",
    )


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"iss": "https://evil.example.org/realms/hospital"}, "issued by another provider"),
        ({"aud": "another-app"}, "issued to another client"),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
        ({"nonce": "replayed"}, "does not belong to this sign-in"),
    ],
    ids=["other-issuer", "other-audience", "expired", "other-nonce"],
)
def test_a_token_that_is_not_for_this_sign_in_is_refused_with_the_reason(
    keys: tuple[RSAKey, RSAKey], change: dict[str, Any], said: str
) -> None:
    client = sign_in(keys[0])
    with pytest.raises(Exception) as refused:
        verify(client, id_token(keys[0], **change))
    assert said in token_refusal(refused.value)


def test_a_tampered_or_foreign_signed_token_is_refused(keys: tuple[RSAKey, RSAKey]) -> None:
    client = sign_in(keys[0])
    good = id_token(keys[0])["id_token"]
    header, _, signature = good.split(".")
    forged = id_token(keys[0], sub="chief-of-staff")["id_token"].split(".")[1]
    for token in (f"{header}.{forged}.{signature}", id_token(keys[1])["id_token"]):
        with pytest.raises(Exception) as refused:
            verify(client, {"id_token": token, "access_token": "opaque"})
        assert "signature does not verify" in token_refusal(refused.value)


def test_a_person_whose_groups_map_to_no_role_is_refused_with_what_to_ask_for(
    keys: tuple[RSAKey, RSAKey],
) -> None:
    client = sign_in(keys[0], oidc_role_groups={"auditor": ["compliance"]})
    with pytest.raises(SignInRefused) as refused:
        client.principal({"sub": "nora", "name": "Nora"}, ["cafeteria"])
    assert refused.value.subject == "nora"
    assert "none of your groups" in refused.value.reason
    assert "compliance (auditor)" in refused.value.reason
    # Entra may send a single group as a string; Keycloak a list.
    assert client.principal({"sub": "a"}, "compliance").roles == frozenset({Role.AUDITOR})


def test_provider_settings_that_cannot_work_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="must be https"):
        Settings(oidc_issuer="http://idp.example.org", oidc_client_id=CLIENT)
    with pytest.raises(ValueError, match="needs oidc_client_id"):
        Settings(oidc_issuer=ISSUER)
    with pytest.raises(ValueError, match="include openid"):
        Settings(oidc_issuer=ISSUER, oidc_client_id=CLIENT, oidc_scopes="profile")
    with pytest.raises(ValueError, match="nobody could sign in"):
        Settings(oidc_issuer=ISSUER, oidc_client_id=CLIENT, oidc_role_groups={"auditor": []})
    with pytest.raises(ValueError, match="auditors"):
        Settings(oidc_issuer=ISSUER, oidc_client_id=CLIENT, oidc_role_groups={"auditors": ["x"]})
