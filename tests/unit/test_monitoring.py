"""Monitoring after go-live: rolling window figures, alerts once when they start and end,
gauges read from what was recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from plugin.catalog.report_labels import ScoredStudy
from plugin.validation.monitoring import (
    MonitoringGauges,
    MonitorStore,
    Window,
    alert_payload,
    window_figures,
)
from plugin.validation.statistics import Floors

FLOORS = Floors(min_positives=10, min_negatives=10, auroc_floor=0.75, bootstrap=100)
START = datetime(2026, 11, 1, tzinfo=UTC)


def stream(n: int, *, shifted_after: int | None, seed: int = 0) -> tuple[list[ScoredStudy], dict]:
    """Studies of one site; after ``shifted_after`` the scores stop following the labels."""
    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    for i in range(n):
        present = bool(rng.random() < 0.4)
        good = shifted_after is None or i < shifted_after
        score = (0.7 if present else 0.2) + rng.normal(0, 0.12) if good else rng.random()
        rows.append(
            ScoredStudy(
                study_id=i,
                study_instance_uid=f"1.2.{i}",
                site="a",
                received_at=START + timedelta(hours=i),
                model="m@1",
                role="live",
                scored=True,
                probabilities={"pneumothorax": float(np.clip(score, 0, 1))},
                thresholds={"pneumothorax": 0.5},
            )
        )
        labels[i] = {"pneumothorax": "present" if present else "absent"}
    return rows, labels


def test_a_window_that_stops_following_the_labels_raises_an_alert_once(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "monitoring")
    window = Window(studies=60, days=365, alert_rate_tolerance=0.2)
    rows, labels = stream(300, shifted_after=150)
    opened_at = None
    for end in range(60, 301, 20):
        now = rows[end - 1].received_at
        figures = window_figures(rows[:end], labels, window=window, floors=FLOORS, now=now)
        alerts = store.record(figures, now)
        if alerts:
            assert opened_at is None, "an open alert is raised once"
            (alert,) = alerts
            assert alert.started and alert.message().startswith("validation alert: pneumothorax")
            assert alert_payload(alert)["event"] == "validation_alert"
            opened_at = end
    assert opened_at is not None and 150 < opened_at <= 200
    (figure,) = store.latest()
    assert figure["labeled"] == 60
    assert any("below the floor 0.75" in p for p in figure["problems"])
    assert len(store.history()) == len(range(60, 301, 20))


def test_a_steady_model_raises_nothing_and_recovery_is_reported(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "monitoring")
    window = Window(studies=60, days=365)
    rows, labels = stream(200, shifted_after=None, seed=3)
    now = rows[-1].received_at
    (figure,) = window_figures(rows, labels, window=window, floors=FLOORS, now=now)
    assert figure.auroc is not None and figure.auroc > 0.9 and not figure.problems
    assert figure.baseline_alert_rate is not None
    assert store.record([figure], now) == []

    bad_rows, bad_labels = stream(200, shifted_after=0, seed=4)
    bad = window_figures(bad_rows, bad_labels, window=window, floors=FLOORS, now=now)
    assert [a.started for a in store.record(bad, now)] == [True]
    (recovered,) = store.record([figure], now)
    assert not recovered.started and "within its floors again" in recovered.message()


def test_too_few_labels_in_the_window_give_counts_and_no_alert() -> None:
    rows, labels = stream(12, shifted_after=0)
    (figure,) = window_figures(
        rows, labels, window=Window(studies=60, days=365), floors=FLOORS, now=rows[-1].received_at
    )
    assert figure.auroc is None and figure.problems == ()
    assert figure.labeled == 12


def test_old_studies_leave_the_window_by_days() -> None:
    rows, labels = stream(100, shifted_after=None)
    now = rows[-1].received_at
    (figure,) = window_figures(
        rows, labels, window=Window(studies=500, days=1), floors=FLOORS, now=now
    )
    assert figure.labeled == 25  # hourly studies: the last day and the one at its edge


def test_gauges_report_the_latest_figures(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "monitoring")
    rows, labels = stream(120, shifted_after=None)
    now = rows[-1].received_at
    store.record(window_figures(rows, labels, window=Window(), floors=FLOORS, now=now), now)
    registry = CollectorRegistry()
    registry.register(MonitoringGauges(store.latest))

    text = generate_latest(registry).decode()

    labels_text = 'finding="pneumothorax",model="m@1",site="a"'
    assert f"pacsclip_validation_auroc{{{labels_text}}}" in text
    assert f"pacsclip_validation_alert_rate{{{labels_text}}}" in text
    assert f"pacsclip_validation_alerting{{{labels_text}}} 0.0" in text
