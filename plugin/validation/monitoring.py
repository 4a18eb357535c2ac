"""Monitoring after go-live: per site, model and finding, the figures of a rolling window of
labeled studies, compared with floors and with the alert rate of the labeled studies before
the window (at most `BASELINE_WINDOWS` windows' worth).

A figure that falls below its floor, or an alert rate that leaves its band, raises an alert
once (when it starts; a recovery is logged too): a warning in the log, and the STAT webhook's
URL gets a ``validation_alert`` event. Each run's figures are appended to
``DATA_DIR/monitoring/history.jsonl`` (the plot over time) and the latest ones kept in
``latest.json``, which the Prometheus gauges read at scrape time, in whichever process serves
the metrics.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric

from plugin.catalog.report_labels import ScoredStudy
from plugin.durable import write_durably
from plugin.validation.report_labeler import ReportLabel
from plugin.validation.statistics import Floors, finding_figures

logger = logging.getLogger(__name__)

LATEST = "latest.json"
HISTORY = "history.jsonl"
STATE = "alerts.json"
# The alert rate's baseline: at most this many windows' worth of labeled studies before the
# window. Bounded, so that a run reads the same number of studies however old the site is;
# five windows keep the baseline's noise well below the window's (a baseline of one window
# would double the variance of the difference, and with it the false alerts).
BASELINE_WINDOWS = 5


@dataclass(frozen=True)
class Window:
    studies: int = 200
    days: int = 30
    alert_rate_tolerance: float = 0.10

    @property
    def history(self) -> int:
        """How many of the newest labeled studies per (site, model, finding) the figures read:
        the window and the baseline before it."""
        return (1 + BASELINE_WINDOWS) * self.studies


@dataclass(frozen=True)
class WindowFigure:
    site: str
    model: str
    finding: str
    labeled: int
    positives: int
    negatives: int
    auroc: float | None
    ppv: float | None
    alert_rate: float | None
    baseline_alert_rate: float | None  # the alert rate of the labeled studies before the window
    problems: tuple[str, ...]  # empty when every figure is within its floor or band


def window_figures(
    rows: Sequence[ScoredStudy],
    labels: Mapping[int, Mapping[str, str | None]],
    *,
    window: Window,
    floors: Floors,
    now: datetime,
) -> list[WindowFigure]:
    """The window's figures of every (site, model, finding) among ``rows`` (oldest first).

    Of each (site, model, finding), only the newest `Window.history` studies labeled present or
    absent count, and the newest row's thresholds: rows older than those may be left out
    (`plugin.catalog.report_labels.monitored_studies`) without changing a figure.
    """
    groups: dict[tuple[str, str], list[ScoredStudy]] = defaultdict(list)
    for row in rows:
        if row.scored:
            groups[(row.site, row.model)].append(row)
    since = now - timedelta(days=window.days)
    figures = []
    for (site, model), scored in sorted(groups.items()):
        recent = [r for r in scored if r.received_at >= since]
        for finding in sorted({f for r in scored for f in r.probabilities}):
            figures.append(_figure(site, model, finding, scored, recent, labels, window, floors))
    return figures


def _figure(
    site: str,
    model: str,
    finding: str,
    scored: Sequence[ScoredStudy],
    recent: Sequence[ScoredStudy],
    labels: Mapping[int, Mapping[str, str | None]],
    window: Window,
    floors: Floors,
) -> WindowFigure:
    labeled = [r for r in scored if _label(labels, r, finding) is not None]
    recent_ids = {r.study_id for r in recent}
    in_window = [r for r in labeled if r.study_id in recent_ids][-window.studies :]
    end = labeled.index(in_window[0]) if in_window else len(labeled)
    before = labeled[max(end - BASELINE_WINDOWS * window.studies, 0) : end]
    # The newest analysis's: the threshold the model flags with now.
    threshold = next(
        (r.thresholds[finding] for r in reversed(scored) if finding in r.thresholds), 0.5
    )
    scores = [r.probabilities[finding] for r in in_window if finding in r.probabilities]
    truth = [_label(labels, r, finding) is True for r in in_window if finding in r.probabilities]
    result = finding_figures(scores, truth, threshold, floors)
    baseline = (
        float(np.mean([r.probabilities.get(finding, 0.0) >= threshold for r in before]))
        # A baseline from fewer studies than the window would be noisier than the window.
        if len(before) >= window.studies
        else None
    )
    problems = []
    # Too few labels yet: counts only, no alert.
    if result.auroc is not None and result.auroc.estimate < floors.auroc_floor:
        problems.append(f"AUROC {result.auroc.estimate:.3f} below the floor {floors.auroc_floor}")
    if (
        baseline is not None
        and result.alert_rate is not None
        and abs(result.alert_rate - baseline) > window.alert_rate_tolerance
    ):
        problems.append(
            f"alert rate {result.alert_rate:.1%} left its band {baseline:.1%} "
            f"+/- {window.alert_rate_tolerance:.0%}"
        )
    return WindowFigure(
        site=site,
        model=model,
        finding=finding,
        labeled=len(in_window),
        positives=result.positives,
        negatives=result.negatives,
        auroc=None if result.auroc is None else round(result.auroc.estimate, 4),
        ppv=result.ppv,
        alert_rate=result.alert_rate,
        baseline_alert_rate=baseline,
        problems=tuple(problems),
    )


def _label(
    labels: Mapping[int, Mapping[str, str | None]], row: ScoredStudy, finding: str
) -> bool | None:
    """True for present, False for absent, None for uncertain or not mentioned."""
    value = labels.get(row.study_id, {}).get(finding)
    if value == ReportLabel.PRESENT:
        return True
    if value == ReportLabel.ABSENT:
        return False
    return None


@dataclass(frozen=True)
class Alert:
    site: str
    model: str
    finding: str
    started: bool  # True: a problem began; False: it is over
    problems: tuple[str, ...]

    def message(self) -> str:
        what = f"{self.finding} of {self.model} at site {self.site}"
        if self.started:
            return f"validation alert: {what}: {'; '.join(self.problems)}"
        return f"validation recovered: {what} is within its floors again"


class MonitorStore:
    """The monitoring folder: latest figures, their history, which alerts are open."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def record(self, figures: Sequence[WindowFigure], at: datetime) -> list[Alert]:
        """Keep the figures and return the alerts that start or end with them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = [{**asdict(f), "at": at.isoformat()} for f in figures]
        with (self.directory / HISTORY).open("a", encoding="utf-8") as history:
            history.writelines(json.dumps(row) + "\n" for row in rows)
        self._write(LATEST, rows)
        open_before = set(self._read(STATE) or [])
        open_now = {_key(f) for f in figures if f.problems}
        by_key = {_key(f): f for f in figures}
        alerts = [
            Alert(f.site, f.model, f.finding, True, f.problems)
            for key, f in by_key.items()
            if key in open_now - open_before
        ]
        for key in sorted(open_before - open_now):
            site, model, finding = key.split("\t")
            alerts.append(Alert(site, model, finding, started=False, problems=()))
        self._write(STATE, sorted(open_now))
        return alerts

    def latest(self) -> list[dict[str, Any]]:
        data = self._read(LATEST)
        return list(data) if isinstance(data, list) else []

    def history(self) -> list[dict[str, Any]]:
        path = self.directory / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def _write(self, name: str, data: Any) -> None:
        staging = self.directory / ".incoming"
        staging.mkdir(exist_ok=True)
        write_durably(self.directory / name, json.dumps(data).encode(), staging)

    def _read(self, name: str) -> Any:
        try:
            return json.loads((self.directory / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            logger.warning("monitoring file %s is damaged; starting it again", name)
            return None


def _key(figure: WindowFigure) -> str:
    return "\t".join((figure.site, figure.model, figure.finding))


def alert_payload(alert: Alert) -> dict[str, Any]:
    return {
        "event": "validation_alert" if alert.started else "validation_recovered",
        "site": alert.site,
        "model": alert.model,
        "finding": alert.finding,
        "problems": list(alert.problems),
    }


class MonitoringGauges:
    """Prometheus gauges of the latest window figures, read from the monitoring folder at each
    scrape (so the API process reports what a worker computed)."""

    def __init__(self, read: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(self._read())

    @staticmethod
    def _families(rows: Iterable[Mapping[str, Any]]) -> list[Metric]:
        labels = ["site", "model", "finding"]
        families = {
            "auroc": GaugeMetricFamily(
                "pacsclip_validation_auroc",
                "AUROC against report labels over the monitoring window",
                labels=labels,
            ),
            "alert_rate": GaugeMetricFamily(
                "pacsclip_validation_alert_rate",
                "Share of the window's studies at or above the finding's threshold",
                labels=labels,
            ),
            "ppv": GaugeMetricFamily(
                "pacsclip_validation_ppv",
                "Positive predictive value at the threshold over the monitoring window",
                labels=labels,
            ),
            "alerting": GaugeMetricFamily(
                "pacsclip_validation_alerting",
                "1 while a figure is below its floor or the alert rate out of its band",
                labels=labels,
            ),
        }
        for row in rows:
            key = [str(row["site"]), str(row["model"]), str(row["finding"])]
            for name in ("auroc", "alert_rate", "ppv"):
                if row.get(name) is not None:
                    families[name].add_metric(key, float(row[name]))
            families["alerting"].add_metric(key, 1.0 if row.get("problems") else 0.0)
        return list(families.values())


def now_utc() -> datetime:
    return datetime.now(UTC)
