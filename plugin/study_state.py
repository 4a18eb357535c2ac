"""The per-study state machine: receiving -> complete -> queued -> analysed -> delivered.

``failed`` can be reached from any working state; a late instance reopens a study
(back to ``receiving``) from any state but ``receiving`` itself. ``shadow_only`` ends a study
that arrived while no model was live: shadow models scored it, nothing was sent; an operator
may queue it again once a model is live.
"""

from __future__ import annotations

from enum import StrEnum

from plugin.errors import InvalidTransition


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    ANALYSED = "analysed"
    DELIVERED = "delivered"
    SHADOW_ONLY = "shadow_only"
    FAILED = "failed"


_FORWARD: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.COMPLETE, StudyState.FAILED}),
    StudyState.COMPLETE: frozenset({StudyState.QUEUED, StudyState.FAILED}),
    StudyState.QUEUED: frozenset({StudyState.ANALYSED, StudyState.SHADOW_ONLY, StudyState.FAILED}),
    StudyState.ANALYSED: frozenset({StudyState.DELIVERED, StudyState.FAILED}),
    StudyState.DELIVERED: frozenset(),
    StudyState.SHADOW_ONLY: frozenset({StudyState.QUEUED}),  # a model went live since
    StudyState.FAILED: frozenset({StudyState.QUEUED}),  # an operator retry
}


def can_transition(current: StudyState, target: StudyState) -> bool:
    if target is StudyState.RECEIVING:
        return current is not StudyState.RECEIVING
    return target in _FORWARD[current]


def transition(current: StudyState, target: StudyState) -> StudyState:
    if not can_transition(current, target):
        raise InvalidTransition(f"study cannot move from {current} to {target}")
    return target


def reopens(current: StudyState) -> bool:
    """Whether an instance arriving now means the study must be analysed again."""
    return current is not StudyState.RECEIVING
