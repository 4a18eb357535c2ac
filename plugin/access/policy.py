"""Which role each route needs, and what each access is recorded as.

One table for every route of the app, API and dashboard alike. A route that is not in it is
refused (fail closed), and the role-table test walks every route of the app against its own
copy of this table, so a new route without a decision fails the suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from plugin.roles import Role

R, AI, PACS, AUD = Role.RADIOLOGIST, Role.AI_ADMIN, Role.PACS_ADMIN, Role.AUDITOR


@dataclass(frozen=True)
class Rule:
    roles: frozenset[Role] | None  # None: public (no login)
    action: str | None = None  # recorded in the access log as this; None: not recorded

    @property
    def public(self) -> bool:
        return self.roles is None


def _needs(*roles: Role, action: str | None = None) -> Rule:
    return Rule(frozenset(roles), action)


PUBLIC: Final = Rule(None)

RULES: Final[dict[tuple[str, str], Rule]] = {
    # Sign-in and sign-out, health, the scrape target (counts only) and the API's schema.
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): PUBLIC,
    ("POST", "/logout"): _needs(R, AI, PACS, AUD, action="logout"),
    ("GET", "/auth/login"): PUBLIC,
    ("GET", "/auth/callback"): PUBLIC,
    ("GET", "/api/health"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    # The radiologist's pages and reads of patient data.
    ("GET", "/"): _needs(R, action="view_worklist"),
    ("GET", "/worklist/rows"): _needs(R),  # the worklist's live refresh, every few seconds
    ("GET", "/studies/{study_uid}"): _needs(R, action="view_study"),
    ("GET", "/studies/{study_uid}/images/{sop_instance_uid}.png"): _needs(R, action="view_image"),
    ("GET", "/api/studies"): _needs(R, action="api_list_studies"),
    ("GET", "/api/studies/{study_uid}"): _needs(R, action="api_read_study"),
    ("GET", "/api/studies/{study_uid}/objects/{sop_instance_uid}"): _needs(
        R, action="api_read_object"
    ),
    ("GET", "/api/studies/{study_uid}/similar"): _needs(R, action="api_similar_cases"),
    ("GET", "/api/search"): _needs(R, action="api_search"),
    ("POST", "/api/revisit/score"): _needs(R, action="api_revisit_score"),
    # Validation: read by radiologists, owned by the AI team.
    ("GET", "/validation"): _needs(R, AI, action="view_validation"),
    ("GET", "/validation/reliability.png"): _needs(R, AI),
    ("GET", "/validation/monitoring.png"): _needs(R, AI),
    # The AI team: models, indexes, site drift and heads.
    ("GET", "/api/index"): _needs(AI),
    ("GET", "/api/sites/drift"): _needs(AI),
    ("POST", "/operations/site-heads/promote"): _needs(AI, action="promote_site_head"),
    # PACS administrators: deliveries, routing, the encounters feed.
    ("GET", "/operations"): _needs(PACS, AI),
    ("POST", "/operations/jobs/{job_id}/retry"): _needs(PACS, action="retry_delivery"),
    ("POST", "/operations/rules/test"): _needs(PACS, action="test_routing_rules"),
    ("POST", "/api/studies/{study_uid}/encounters"): _needs(PACS, action="api_add_encounter"),
    ("POST", "/api/studies/{study_uid}/reports"): _needs(PACS, action="api_add_report"),
    # The auditor's access log.
    ("GET", "/access-log"): _needs(AUD, action="view_access_log"),
    ("POST", "/access-log"): _needs(AUD, action="search_access_log"),
}


def rule_for(method: str, path: str) -> Rule | None:
    """The rule of a route (``path`` as declared, with its {parameters}); HEAD as GET."""
    return RULES.get(("GET" if method == "HEAD" else method, path))
