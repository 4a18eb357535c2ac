"""Site identity: which hospital site a study comes from, for per-site models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CALLING_AE_TITLE = "calling_ae_title"


def site_key(tags: Sequence[str], values: Mapping[str, str | None]) -> str:
    """Join the configured tag values into a stable key, e.g. ``ER_CR1|General Hospital``.

    ``values`` maps a DICOM keyword (or ``calling_ae_title``) to its value; missing
    values count as empty so the key stays positional.
    """
    parts = [" ".join((values.get(tag) or "").split()) for tag in tags]
    return "|".join(parts)
