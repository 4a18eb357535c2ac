"""The pipelines a routing rule may run on a study (``pipelines:`` in the rules file).

``triage`` scores the study and sends its SR and overlays, and raises its flags; it also keeps
the image embeddings and the similar-case index up to date, which it computes anyway.
``retrieval`` keeps only the image embeddings and the similar-case index: nothing is sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

TRIAGE: Final = "triage"
RETRIEVAL: Final = "retrieval"
PIPELINES: Final = (TRIAGE, RETRIEVAL)


def pipelines_of(routing: dict[str, object] | None) -> tuple[str, ...]:
    """The pipelines a study's routing decision names; a study routed before pipelines were
    honoured (no key) runs triage, as it did then."""
    named = (routing or {}).get("pipelines", [TRIAGE])
    return tuple(str(n) for n in named) if isinstance(named, Iterable) else (TRIAGE,)
