"""The four roles and how a person's groups at the identity provider map to them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Final


class Role(StrEnum):
    RADIOLOGIST = "radiologist"  # worklist, studies, similar cases; validation read-only
    AI_ADMIN = "ai-admin"  # models, shadow, validation, go-live, site heads
    PACS_ADMIN = "pacs-admin"  # deliveries, dead letters, routing rules, quarantine, retention
    AUDITOR = "auditor"  # the access log


ALL_ROLES: Final = frozenset(Role)

ROLE_DUTIES: Final[Mapping[Role, str]] = {
    Role.RADIOLOGIST: "the worklist, studies, similar cases and validation (read-only)",
    Role.AI_ADMIN: "models, shadow models, validation, go-live and site heads",
    Role.PACS_ADMIN: "deliveries, dead letters, routing rules, quarantine and retention",
    Role.AUDITOR: "the access log",
}

# Group names a site creates at its provider unless it maps its own (oidc_role_groups).
DEFAULT_ROLE_GROUPS: Final[Mapping[Role, tuple[str, ...]]] = {
    Role.RADIOLOGIST: ("pacsclip-radiologists",),
    Role.AI_ADMIN: ("pacsclip-ai-admins",),
    Role.PACS_ADMIN: ("pacsclip-pacs-admins",),
    Role.AUDITOR: ("pacsclip-auditors",),
}


def roles_from_groups(
    groups: Iterable[str], mapping: Mapping[Role, Iterable[str]]
) -> frozenset[Role]:
    """The roles whose mapped groups include any of ``groups`` (exact, case-sensitive match:
    Entra sends group object IDs, Keycloak group names or paths)."""
    held = set(groups)
    return frozenset(role for role, names in mapping.items() if held.intersection(names))


def describe(roles: Iterable[Role]) -> str:
    """Roles as a reader wants them: "ai-admin, radiologist", or "no role"."""
    names = sorted(str(role) for role in roles)
    return ", ".join(names) if names else "no role"
