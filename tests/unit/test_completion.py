from __future__ import annotations

from dicom_node.completion import CompletionReason, CompletionTracker

STUDY = "1.2.3"


def tracker(quiet: float = 2.0, max_wait: float = 100.0) -> CompletionTracker:
    return CompletionTracker(quiet_period_s=quiet, max_wait_s=max_wait)


def test_quiet_period_counts_only_after_the_association_ended() -> None:
    t = tracker()
    t.association_started(1)
    t.instance_received(STUDY, 1, now=0.0)

    assert t.due(now=10.0) == []  # association still open
    t.association_ended(1, now=10.0)
    assert t.due(now=11.9) == []
    assert t.due(now=12.0) == [(STUDY, CompletionReason.QUIET_PERIOD)]
    assert t.due(now=20.0) == []  # handed out once


def test_a_new_instance_restarts_the_quiet_period() -> None:
    t = tracker()
    t.instance_received(STUDY, None, now=0.0)
    t.instance_received(STUDY, None, now=1.5)

    assert t.due(now=3.0) == []
    assert t.due(now=3.5) == [(STUDY, CompletionReason.QUIET_PERIOD)]


def test_expected_count_completes_even_while_the_association_is_open() -> None:
    t = tracker()
    t.association_started(1)
    t.instance_received(STUDY, 1, now=0.0)
    t.set_expected(STUDY, 2)
    assert t.due(now=0.1) == []

    t.instance_received(STUDY, 1, now=0.2)

    assert t.due(now=0.2) == [(STUDY, CompletionReason.EXPECTED_COUNT)]


def test_duplicates_do_not_count_towards_the_expected_number() -> None:
    t = tracker()
    t.association_started(1)
    t.instance_received(STUDY, 1, now=0.0)
    t.set_expected(STUDY, 2)
    t.instance_received(STUDY, 1, now=0.1, new=False)

    assert t.due(now=0.2) == []


def test_hard_maximum_wait_completes_a_study_that_never_goes_quiet() -> None:
    t = tracker(max_wait=30.0)
    t.association_started(1)
    t.instance_received(STUDY, 1, now=0.0)
    t.instance_received(STUDY, 1, now=29.0)

    assert t.due(now=29.9) == []
    assert t.due(now=30.0) == [(STUDY, CompletionReason.MAX_WAIT)]


def test_studies_are_tracked_independently() -> None:
    t = tracker()
    t.association_started(1)
    t.association_started(2)
    t.instance_received("a", 1, now=0.0)
    t.instance_received("b", 2, now=0.0)
    t.association_ended(1, now=1.0)

    assert t.due(now=5.0) == [("a", CompletionReason.QUIET_PERIOD)]
    assert t.tracking() == ["b"]


def test_resumed_study_keeps_its_first_arrival_for_the_maximum_wait() -> None:
    t = tracker(max_wait=60.0)
    t.resume(STUDY, first_seen=-59.0, instances=3, now=0.0)

    assert t.due(now=1.0) == [(STUDY, CompletionReason.MAX_WAIT)]


def test_first_instance_of_a_study_is_reported() -> None:
    t = tracker()

    assert t.instance_received(STUDY, None, now=0.0) is True
    assert t.instance_received(STUDY, None, now=0.1) is False
