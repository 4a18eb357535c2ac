"""Every route of the app, asked by every role: the allow/deny table below is written here, not
read from plugin.access.policy, so a route added without a decision, or a decision changed by
accident, fails this test."""

from __future__ import annotations

from typing import Final

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount

from plugin.access.tokens import TokenStore
from plugin.roles import Role
from tests.unit.test_dashboard import World, world  # noqa: F401  (the fixture)

R, AI, PACS, AUD = "radiologist", "ai-admin", "pacs-admin", "auditor"
PUBLIC: Final = "public"
ANY_ROLE: Final = frozenset({R, AI, PACS, AUD})

# (method, route as declared) -> the roles allowed, or PUBLIC.
TABLE: Final[dict[tuple[str, str], frozenset[str] | str]] = {
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): PUBLIC,
    ("GET", "/auth/login"): PUBLIC,
    ("GET", "/auth/callback"): PUBLIC,
    ("GET", "/api/health"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("POST", "/logout"): ANY_ROLE,
    ("GET", "/"): frozenset({R}),
    ("GET", "/worklist/rows"): frozenset({R}),
    ("GET", "/studies/{study_uid}"): frozenset({R}),
    ("GET", "/studies/{study_uid}/images/{sop_instance_uid}.png"): frozenset({R}),
    ("GET", "/api/studies"): frozenset({R}),
    ("GET", "/api/studies/{study_uid}"): frozenset({R}),
    ("GET", "/api/studies/{study_uid}/objects/{sop_instance_uid}"): frozenset({R}),
    ("GET", "/api/studies/{study_uid}/similar"): frozenset({R}),
    ("GET", "/api/search"): frozenset({R}),
    ("POST", "/api/revisit/score"): frozenset({R}),
    ("GET", "/validation"): frozenset({R, AI}),
    ("GET", "/validation/reliability.png"): frozenset({R, AI}),
    ("GET", "/validation/monitoring.png"): frozenset({R, AI}),
    ("GET", "/api/index"): frozenset({AI}),
    ("GET", "/api/sites/drift"): frozenset({AI}),
    ("POST", "/operations/site-heads/promote"): frozenset({AI}),
    ("GET", "/operations"): frozenset({PACS, AI}),
    ("POST", "/operations/jobs/{job_id}/retry"): frozenset({PACS}),
    ("POST", "/operations/rules/test"): frozenset({PACS}),
    ("POST", "/api/studies/{study_uid}/encounters"): frozenset({PACS}),
    ("POST", "/api/studies/{study_uid}/reports"): frozenset({PACS}),
    ("GET", "/access-log"): frozenset({AUD}),
    ("POST", "/access-log"): frozenset({AUD}),
}


def app_routes(of: World) -> set[tuple[str, str]]:
    found = set()
    for route in iter_route_contexts(of.app.routes):
        if isinstance(route.original_route, Mount):  # /static: files, no data
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, str(route.path)))
    return found


def url(of: World, path: str) -> str:
    return (
        path.replace("{study_uid}", of.study_uid)
        .replace("{sop_instance_uid}", of.source_uid)
        .replace("{job_id}", str(of.job_id))
    )


@pytest.fixture
def tokens(world: World) -> dict[str, str]:  # noqa: F811
    """One machine token per role."""
    store = TokenStore(world.settings.data_dir)
    return {role.value: store.create(f"only-{role.value}", [role]) for role in Role}


def test_every_route_of_the_app_has_a_decision_in_the_table(world: World) -> None:  # noqa: F811
    routes = app_routes(world)
    assert routes - TABLE.keys() == set(), "routes without a decision in this test's table"
    assert TABLE.keys() - routes == set(), "decisions for routes the app no longer has"


def test_every_route_with_every_role_is_allowed_or_refused_as_the_table_says(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    client = TestClient(world.app)
    wrong: list[str] = []
    for (method, path), allowed in sorted(TABLE.items()):
        target = url(world, path)
        if allowed == PUBLIC:
            answer = client.request(method, target, follow_redirects=False)
            if answer.status_code in (401, 403) or answer.headers.get("location", "").startswith(
                "/login?next"
            ):
                wrong.append(f"{method} {path} anonymous -> {answer.status_code}, want public")
            continue
        anonymous = client.request(method, target, follow_redirects=False)
        if anonymous.status_code not in (401, 303) or (
            anonymous.status_code == 303
            and not anonymous.headers["location"].startswith("/login?next")
        ):
            wrong.append(f"{method} {path} anonymous -> {anonymous.status_code}")
        for role, token in tokens.items():
            answer = client.request(
                method,
                target,
                headers={"Authorization": f"Bearer {token}"},
                follow_redirects=False,
            )
            if role in allowed and answer.status_code in (401, 403):
                wrong.append(f"{method} {path} as {role} -> {answer.status_code}, want allowed")
            if role not in allowed:
                if answer.status_code != 403:
                    wrong.append(f"{method} {path} as {role} -> {answer.status_code}, want 403")
                elif not all(r in answer.text for r in allowed):
                    wrong.append(f"{method} {path}: the 403 does not name {sorted(allowed)}")
    assert wrong == []


def test_a_route_without_a_decision_is_refused(world: World, tokens: dict[str, str]) -> None:  # noqa: F811
    world.app.add_api_route("/api/undecided", lambda: {"leak": "patient"}, methods=["GET"])
    answer = TestClient(world.app).get(
        "/api/undecided", headers={"Authorization": f"Bearer {tokens[AUD]}"}
    )
    assert answer.status_code == 500
    assert "no access decision" in answer.json()["detail"] and "leak" not in answer.text


def test_a_refused_page_says_which_role_it_needs_and_who_asked(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    page = TestClient(world.app).get(
        "/operations", headers={"Authorization": f"Bearer {tokens[R]}"}
    )
    assert page.status_code == 403
    assert "text/html" in page.headers["content-type"]
    assert "ai-admin or pacs-admin" in page.text and "only-radiologist" in page.text
    assert "pacsclip tokens create" in page.text
    api = TestClient(world.app).get("/api/index", headers={"Authorization": f"Bearer {tokens[R]}"})
    assert api.status_code == 403 and "ai-admin" in api.json()["detail"]


def test_the_operations_page_shows_each_role_only_its_own_sections(
    world: World,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    client = TestClient(world.app)
    as_pacs = client.get("/operations", headers={"Authorization": f"Bearer {tokens[PACS]}"}).text
    as_ai = client.get("/operations", headers={"Authorization": f"Bearer {tokens[AI]}"}).text
    assert 'id="dead-letters"' in as_pacs and 'id="sites"' not in as_pacs
    assert 'id="sites"' in as_ai and 'id="dead-letters"' not in as_ai
    assert 'id="quarantine"' not in as_ai and 'id="rules"' not in as_ai
    assert 'href="/operations"' in as_ai and 'href="/access-log"' not in as_ai
