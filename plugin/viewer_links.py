"""Links from pacsclip's pages into the site's image viewer, from a URL template.

The template names the study by ``{study_uid}`` only: a patient identifier never goes into a
URL. A template that starts with ``/`` is relative to the viewer's base URL (OHIF's
``/viewer?StudyInstanceUIDs={study_uid}`` by default); a template with ``http://`` or
``https://`` is used as it is. An empty template, or a relative one with no base, gives no link.
"""

from __future__ import annotations

from string import Formatter
from typing import Final
from urllib.parse import quote, urlsplit

OHIF_TEMPLATE: Final = "/viewer?StudyInstanceUIDs={study_uid}"
PLACEHOLDERS: Final = frozenset({"study_uid"})
SCHEMES: Final = ("http", "https")


def check_template(template: str) -> None:
    """ValueError saying what is wrong with a template (an empty one is valid: no link)."""
    if not template:
        return
    try:
        names = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"viewer_url_template {template!r}: {exc}") from exc
    if names - PLACEHOLDERS or any(not name for name in names):
        raise ValueError(
            f"viewer_url_template {template!r} may only use {{study_uid}}; got "
            + ", ".join(sorted(f"{{{name}}}" for name in names))
        )
    if not template.startswith("/") and urlsplit(template).scheme not in SCHEMES:
        raise ValueError(
            f"viewer_url_template {template!r} must start with / (relative to "
            "viewer_base_url) or with http:// or https://"
        )


def check_base(base: str | None) -> None:
    """ValueError unless ``base`` is unset, ``/`` (same origin) or an http(s) URL."""
    if base and base != "/" and urlsplit(base).scheme not in SCHEMES:
        raise ValueError(f"viewer_base_url {base!r} must be an http:// or https:// URL, or /")


def viewer_link(template: str, base: str | None, study_uid: str) -> str | None:
    """The viewer's URL of the study, or None when no viewer is configured."""
    if not template:
        return None
    if template.startswith("/"):
        if not base:
            return None
        template = base.rstrip("/") + template
    return template.format(study_uid=quote(study_uid, safe=""))
