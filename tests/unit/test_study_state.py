from __future__ import annotations

import pytest

from plugin.errors import InvalidTransition
from plugin.study_state import StudyState, can_transition, reopens, transition


def test_the_happy_path_runs_in_order() -> None:
    state = StudyState.RECEIVING
    for target in ("complete", "queued", "analysed", "delivered"):
        state = transition(state, StudyState(target))
    assert state is StudyState.DELIVERED


def test_skipping_a_step_is_refused() -> None:
    with pytest.raises(InvalidTransition, match="receiving to analysed"):
        transition(StudyState.RECEIVING, StudyState.ANALYSED)


def test_any_working_state_can_fail_and_a_failed_study_can_be_requeued() -> None:
    for state in ("receiving", "complete", "queued", "analysed"):
        assert can_transition(StudyState(state), StudyState.FAILED)
    assert can_transition(StudyState.FAILED, StudyState.QUEUED)
    assert not can_transition(StudyState.DELIVERED, StudyState.FAILED)


def test_a_late_instance_reopens_every_state_but_receiving() -> None:
    assert not reopens(StudyState.RECEIVING)
    for state in ("complete", "queued", "analysed", "delivered", "failed"):
        assert reopens(StudyState(state))
        assert can_transition(StudyState(state), StudyState.RECEIVING)
