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


def released_tracker(grace: float = 0.3) -> CompletionTracker:
    return CompletionTracker(quiet_period_s=2.0, max_wait_s=100.0, release_grace_s=grace)


def test_study_of_one_association_completes_a_grace_after_its_release() -> None:
    t = released_tracker()
    t.association_started("a", "ORTHANC")
    t.instance_received(STUDY, "a", now=0.0)
    t.instance_received(STUDY, "a", now=0.5)
    t.association_ended("a", now=1.0)

    assert t.due(now=1.2) == []
    assert t.due(now=1.3) == [(STUDY, CompletionReason.ASSOCIATION_RELEASED)]


def test_sender_with_another_association_open_keeps_the_quiet_period() -> None:
    t = released_tracker()
    t.association_started("a", "MODALITY")
    t.instance_received(STUDY, "a", now=0.0)
    t.association_started("b", "MODALITY")  # the same sender, still sending
    t.association_ended("a", now=1.0)

    assert t.due(now=1.5) == []
    t.association_ended("b", now=1.6)  # carried nothing of this study
    assert t.due(now=1.7) == []  # the grace counts from the sender's last release
    assert t.due(now=2.0) == [(STUDY, CompletionReason.ASSOCIATION_RELEASED)]


def test_study_spread_over_several_associations_waits_for_the_quiet_period() -> None:
    t = released_tracker()
    for n, assoc in enumerate(["a", "b"]):
        t.association_started(assoc, "MODALITY")
        t.instance_received(STUDY, assoc, now=float(n))
        t.association_ended(assoc, now=n + 0.1)

    assert t.due(now=2.0) == []
    assert t.due(now=3.1) == [(STUDY, CompletionReason.QUIET_PERIOD)]


def test_other_senders_do_not_hold_a_released_study() -> None:
    t = released_tracker()
    t.association_started("a", "ORTHANC")
    t.association_started("x", "OTHER")
    t.instance_received(STUDY, "a", now=0.0)
    t.association_ended("a", now=0.1)

    assert t.due(now=0.4) == [(STUDY, CompletionReason.ASSOCIATION_RELEASED)]
