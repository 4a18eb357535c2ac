"""The Validation page's monitoring section: per site and model, the figures that monitoring
(``plugin.validation.monitoring``) kept after each run, as a table of the newest ones with their
open alerts, and as a PNG plot over time (AUROC and alert rate per finding, the AUROC floor,
markers on the runs that had a problem).

The history is read from ``DATA_DIR/monitoring/history.jsonl`` at each request: a worker
appends to it, the API process only reads it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import Any

from fastapi import HTTPException, status
from fastapi.responses import Response

from plugin.dashboard.pages import Board, PageViewer
from plugin.errors import PacsclipError
from plugin.models.registry import parse_ref
from plugin.settings import Settings
from plugin.validation.monitoring import MonitorStore, WindowFigure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One (site, model, finding)'s figures from one monitoring run."""

    at: datetime
    figure: WindowFigure


class HistoryUnreadable(PacsclipError):
    """The monitoring history cannot be read or a line of it is not a run's figures."""


def read_history(settings: Settings) -> list[Run]:
    """Every kept run's figures, oldest first."""
    try:
        rows = MonitorStore(settings.data_dir / "monitoring").history()
    except (OSError, ValueError) as exc:
        raise HistoryUnreadable(f"the monitoring history cannot be read: {exc}") from exc
    return sorted((_run(row, n) for n, row in enumerate(rows, start=1)), key=lambda r: r.at)


def _run(row: Any, number: int) -> Run:
    try:
        values = {k: v for k, v in row.items() if k != "at"}
        values["problems"] = tuple(values.get("problems") or ())
        at = datetime.fromisoformat(row["at"])
        return Run(at=at if at.tzinfo else at.replace(tzinfo=UTC), figure=WindowFigure(**values))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise HistoryUnreadable(f"line {number} of the monitoring history is damaged") from exc


def by_site_and_model(
    runs: list[Run], *, site: str | None = None, model: str | None = None
) -> dict[tuple[str, str], list[Run]]:
    """The runs per (site, model) under the page's filters, in order of site and model."""
    grouped: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if site in (None, run.figure.site) and model in (None, run.figure.model):
            grouped[(run.figure.site, run.figure.model)].append(run)
    return dict(sorted(grouped.items()))


def monitoring_section(
    settings: Settings, *, site: str | None, model: str | None
) -> dict[str, Any]:
    """What the page's monitoring section shows: per site and model, its newest run's figures
    (``recorded``: whether any run was kept at all, whatever the filters)."""
    floor = settings.golive_auroc_floor
    try:
        runs = read_history(settings)
    except HistoryUnreadable as exc:
        logger.warning("dashboard: monitoring history unreadable (%s)", exc)
        return {"error": str(exc), "recorded": True, "groups": [], "auroc_floor": floor}
    groups = []
    for (site_key, model_ref), kept in by_site_and_model(runs, site=site, model=model).items():
        newest = kept[-1].at
        figures = sorted((r.figure for r in kept if r.at == newest), key=lambda f: f.finding)
        groups.append(
            {
                "site": site_key,
                "model": model_ref,
                "at": newest,
                "runs": len({r.at for r in kept}),
                "figures": figures,
                "open_alerts": sum(1 for f in figures if f.problems),
            }
        )
    return {"error": None, "recorded": bool(runs), "groups": groups, "auroc_floor": floor}


def monitoring_png(board: Board, viewer: PageViewer, site: str, model: str) -> Response:
    try:
        parse_ref(model)
    except PacsclipError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    try:
        runs = by_site_and_model(read_history(board.settings), site=site, model=model)
    except HistoryUnreadable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
    if (site, model) not in runs:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no monitoring run has figures of {model} at {site}"
        )
    png = draw_monitoring(
        runs[(site, model)], board.settings.golive_auroc_floor, f"{model} at site {site}"
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def draw_monitoring(runs: list[Run], auroc_floor: float, title: str) -> bytes:
    """AUROC (top) and alert rate (bottom) over time, one line per finding; the AUROC floor
    dashed, each finding's alert rate before its window dotted, red markers on the runs with a
    problem."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend state and no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_finding: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_finding[run.figure.finding].append(run)

    figure = Figure(figsize=(6.4, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    auroc_ax, rate_ax = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    auroc_ax.axhline(
        auroc_floor, color="#a3151b", linewidth=1.0, linestyle="--", label=f"floor {auroc_floor}"
    )
    flagged = False
    for finding, points in sorted(by_finding.items()):
        when = [p.at for p in points]
        auroc = [_value(p.figure.auroc) for p in points]
        rate = [_value(p.figure.alert_rate) for p in points]
        (line,) = auroc_ax.plot(when, auroc, marker="o", markersize=3, linewidth=1.2, label=finding)
        color = line.get_color()
        rate_ax.plot(when, rate, marker="o", markersize=3, linewidth=1.2, color=color)
        baseline = [_value(p.figure.baseline_alert_rate) for p in points]
        rate_ax.plot(when, baseline, linewidth=0.8, linestyle=":", color=color)
        problems = [p for p in points if p.figure.problems]
        if not problems:
            continue
        for ax, values in (
            (auroc_ax, [_value(p.figure.auroc) for p in problems]),
            (rate_ax, [_value(p.figure.alert_rate) for p in problems]),
        ):
            ax.scatter(
                [p.at for p in problems],
                values,
                marker="X",
                s=60,
                color="#a3151b",
                zorder=3,
                label="_" if flagged or ax is rate_ax else "open alert",  # "_": not in the legend
            )
        flagged = True
    auroc_ax.set_ylim(0, 1.02)
    auroc_ax.set_ylabel("AUROC (window)")
    auroc_ax.set_title(f"Monitoring: {title}", fontsize=9)
    auroc_ax.legend(loc="lower left", fontsize=8)
    rate_ax.set_ylim(0, 1.02)
    rate_ax.set_ylabel("alert rate (dotted: before)")
    times = sorted({r.at for r in runs})
    if len(times) == 1:  # one run: a day around it, not years
        rate_ax.set_xlim(times[0] - timedelta(hours=12), times[0] + timedelta(hours=12))
    rate_ax.tick_params(axis="x", labelrotation=30)
    out = BytesIO()
    figure.savefig(out, format="png", dpi=100)
    return out.getvalue()


def _value(v: float | None) -> float:
    """A missing figure as NaN: a gap in its line."""
    return float("nan") if v is None else float(v)
