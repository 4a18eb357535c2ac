"""The validation page: per site, per model, per finding, how the scores compare with the labels
from the sites' reports (``pacsclip validate`` as a page), the go-live gate's answer for each
shadow candidate (read-only), a reliability plot per site and model as a PNG, and the
monitoring figures over time (``plugin.dashboard.monitoring``).

The report labeler takes seconds to build (medspacy), so ``ValidationSource`` builds it once per
process, on first use; the answers of the last minute are kept, so a page and its plots compute
the bootstrap intervals once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.worklist import site_keys
from plugin.dashboard.monitoring import monitoring_png, monitoring_section
from plugin.dashboard.pages import Board, PageViewer, render
from plugin.errors import PacsclipError
from plugin.models.registry import Registry, parse_ref
from plugin.settings import Settings
from plugin.validation.golive import golive_decision
from plugin.validation.intake import ReportIntake
from plugin.validation.services import floors_of, intake_for, live_ref
from plugin.validation.site_validation import validate

logger = logging.getLogger(__name__)

ANSWER_MAX_AGE_S: Final = 60.0
MAX_ANSWERS: Final = 16
ROLE_ORDER: Final = {"live": 0, "shadow": 1, "earlier": 2}


@dataclass(frozen=True)
class Filters:
    site: str | None = None
    model: str | None = None
    since: datetime | None = None

    def covers(self, other: Filters) -> bool:
        """An answer under these filters holds everything one under ``other`` would."""
        return (
            self.since == other.since
            and self.site in (None, other.site)
            and self.model in (None, other.model)
        )


class ValidationSource:
    """Validation answers for the dashboard, from one report intake built on first use (and
    again only when another model goes live)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        max_age_s: float = ANSWER_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._max_age_s = max_age_s
        self._clock = clock
        self._intake: tuple[str | None, ReportIntake] | None = None  # (live model, its intake)
        self._answers: dict[Filters, tuple[float, dict[str, Any]]] = {}
        # One computation at a time: a page's plots wait for its answer instead of repeating it.
        self._lock = threading.Lock()

    def answer(self, filters: Filters, *, wider: bool = False) -> dict[str, Any]:
        """``validate()``'s answer under ``filters``, at most ``max_age_s`` old; with ``wider``,
        possibly one under wider filters (more sites or models), for a caller that picks its
        site and model from it."""
        with self._lock:
            now = self._clock()
            fresh = {k: v for k, v in self._answers.items() if now - v[0] < self._max_age_s}
            self._answers = fresh
            for key, (_, answer) in fresh.items():
                if key == filters or (wider and key.covers(filters)):
                    return answer
            answer = self._compute(filters)
            if len(self._answers) >= MAX_ANSWERS:
                del self._answers[min(self._answers, key=lambda k: self._answers[k][0])]
            self._answers[filters] = (now, answer)
            return answer

    def _compute(self, filters: Filters) -> dict[str, Any]:
        started = time.monotonic()
        live = live_ref(self._settings)
        if self._intake is None or self._intake[0] != live:
            # The labeler's vocabulary holds the live bundle's findings: a new one, a new labeler.
            self._intake = (live, intake_for(self._settings, self._sessions, embed=False))
        version = self._intake[1].catch_up()
        answer = validate(
            self._sessions,
            version,
            live_model=live,
            site=filters.site,
            model=filters.model,
            since=filters.since,
            floors=floors_of(self._settings),
        )
        logger.info("dashboard: validation computed in %.2f s", time.monotonic() - started)
        return answer


def _filters(site: str | None, model: str | None, since: str | None) -> Filters:
    when = None
    if since:
        try:
            when = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"since must be a date as YYYY-MM-DD, got {since!r}",
            ) from exc
    return Filters(site=site or None, model=model or None, since=when)


# --- the page ------------------------------------------------------------------------------


def validation_page(
    request: Request,
    board: Board,
    viewer: PageViewer,
    site: str | None = None,
    model: str | None = None,
    since: str | None = None,
) -> HTMLResponse:
    filters = _filters(site, model, since)
    with board.sessions() as session:
        sites = site_keys(session)
    values: dict[str, Any] = {
        "filters": filters,
        "since": filters.since.date().isoformat() if filters.since else "",
        "sites": sites,
        "answer": None,
        "golive": [],
        "error": None,
        # From the monitoring folder, not the catalog: shown even when validation is not.
        "monitoring": monitoring_section(board.settings, site=filters.site, model=filters.model),
    }
    try:
        answer = board.validation.answer(filters)
    except (PacsclipError, OSError, ValueError) as exc:  # no bundle, unreadable vocabulary
        logger.warning("dashboard: validation unavailable (%s)", type(exc).__name__)
        values["error"] = f"validation is unavailable: {exc}"
        return render(board, request, "validation.html", viewer, **values)
    registry = Registry.for_data_dir(board.settings.data_dir, board.settings.demo_model)
    known = _registry_models(registry)
    values.update(
        answer=answer,
        site_tables=[
            {"site": s["site"], "models": _models(s["models"], known)} for s in answer["sites"]
        ],
        golive=_golive(board, registry, answer, filters),
    )
    return render(board, request, "validation.html", viewer, **values)


def _registry_models(registry: Registry) -> dict[str, bool]:
    """Whether each bundle the registry knows is synthetic, by ``name@version``."""
    try:
        return {e.ref: e.synthetic for e in registry.list()}
    except (PacsclipError, OSError, ValueError) as exc:
        logger.warning("dashboard: model registry unreadable (%s)", type(exc).__name__)
        return {}


def _models(models: list[dict[str, Any]], known: dict[str, bool]) -> list[dict[str, Any]]:
    """Live first, then shadow candidates, then earlier models, each with name and version."""
    shown = []
    for m in sorted(models, key=lambda m: ROLE_ORDER.get(m["role"], len(ROLE_ORDER))):
        name, _, version = m["model"].partition("@")
        shown.append({**m, "name": name, "version": version, "synthetic": known.get(m["model"])})
    return shown


def _golive(
    board: Board, registry: Registry, answer: dict[str, Any], filters: Filters
) -> list[dict[str, Any]]:
    """The gate's decision for every shadow candidate (in the answer or in the registry)."""
    candidates = {m["model"] for s in answer["sites"] for m in s["models"] if m["role"] == "shadow"}
    try:
        candidates |= {s.ref for s in registry.shadows()}
    except (PacsclipError, OSError, ValueError) as exc:
        logger.warning("dashboard: shadow models unknown (%s)", type(exc).__name__)
    if filters.model is not None:
        candidates &= {filters.model}
    candidates.discard(answer["live_model"])
    boxes = []
    floors = floors_of(board.settings)
    for ref in sorted(candidates):
        note = None
        try:
            has_ood = registry.shadow_bundle(ref).manifest.ood is not None
        except (PacsclipError, OSError, ValueError) as exc:
            has_ood, note = False, f"its bundle cannot be read here: {exc}"
        decision = golive_decision(answer, ref, floors=floors, has_ood_reference=has_ood)
        name, _, version = ref.partition("@")
        boxes.append({**decision.as_dict(), "name": name, "version": version, "note": note})
    return boxes


# --- the reliability plot ------------------------------------------------------------------


def reliability_png(
    board: Board,
    viewer: PageViewer,
    site: str,
    model: str,
    since: str | None = None,
) -> Response:
    try:
        parse_ref(model)
    except PacsclipError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    filters = _filters(site, model, since)
    try:
        answer = board.validation.answer(filters, wider=True)
    except (PacsclipError, OSError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"validation is unavailable: {exc}"
        ) from exc
    figures = next(
        (
            m
            for s in answer["sites"]
            if s["site"] == site
            for m in s["models"]
            if m["model"] == model
        ),
        None,
    )
    if figures is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"{model} has no labeled studies at site {site}"
        )
    bins = {
        name: f["reliability"] for name, f in figures["findings"].items() if f.get("reliability")
    }
    if not bins:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no finding of {model} at site {site} has enough labels for a plot",
        )
    png = draw_reliability(bins, f"{model} at site {site}")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def draw_reliability(bins: dict[str, list[dict[str, float]]], title: str) -> bytes:
    """Predicted against observed frequency per finding (marker area ~ studies per bin)."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend state and no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle=":", label="perfect")
    for name, rows in sorted(bins.items()):
        predicted = [r["predicted"] for r in rows]
        observed = [r["observed"] for r in rows]
        largest = max(r["count"] for r in rows) or 1
        (line,) = ax.plot(predicted, observed, linewidth=1.0, alpha=0.8, label=name)
        sizes = [8.0 + 100.0 * (r["count"] / largest) ** 0.5 for r in rows]
        ax.scatter(predicted, observed, s=sizes, color=line.get_color(), alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency (report labels)")
    ax.set_title(f"Reliability: {title}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    out = BytesIO()
    figure.savefig(out, format="png", dpi=100)
    return out.getvalue()


def router() -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    routes.add_api_route(
        "/validation", validation_page, methods=["GET"], response_class=HTMLResponse
    )
    routes.add_api_route("/validation/reliability.png", reliability_png, methods=["GET"])
    routes.add_api_route("/validation/monitoring.png", monitoring_png, methods=["GET"])
    return routes
