"""The dashboard's validation page over a throwaway SQLite catalog: live and shadow models of
the built-in demo bundle scored studies whose reports arrive unlabeled; the page labels them
(its labeler built once), shows the figures per site, model and finding, the "too few labels"
message, the go-live gate per shadow candidate, a reliability PNG, and the monitoring figures
over time from a history kept by ``MonitorStore``."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from plugin.api import create_app
from plugin.catalog import repository
from plugin.catalog.db import Catalog, open_catalog
from plugin.dashboard import mount_dashboard
from plugin.dashboard.validation import Filters
from plugin.disclaimers import SYNTHETIC_MODEL
from plugin.metrics import PacsclipMetrics
from plugin.models.registry import Registry, builtin_bundle_dirs
from plugin.settings import Settings
from plugin.validation.intake import ReportIntake
from plugin.validation.monitoring import MonitorStore, WindowFigure
from plugin.validation.report_labeler import ReportLabeler
from tests.unit.test_dashboard import TOKEN, login
from tests.unit.test_site_validation import add_analysis, add_study

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

LIVE = "pacsclip-demo@2026.11.1"  # the built-in demo bundle: live when none is activated
CANDIDATE = "pacsclip-demo@2026.12.0-candidate"
UNINSTALLED = "other@1"  # scored in shadow, but its bundle is not in this registry


def _no_labeler() -> ReportLabeler:
    raise AssertionError("the test stores reports unlabeled: the page labels them")


@pytest.fixture
def app(make_settings: Callable[..., Settings], tmp_path: Path) -> TestClient:
    settings = make_settings(
        api_token=TOKEN, validation_min_positives=5, validation_min_negatives=5
    )
    name, version = CANDIDATE.split("@")
    candidate = tmp_path / "candidate"
    shutil.copytree(builtin_bundle_dirs()[0], candidate)
    manifest = json.loads((candidate / "bundle.json").read_text())
    manifest["version"] = version
    (candidate / "bundle.json").write_text(json.dumps(manifest))
    registry = Registry.for_data_dir(settings.data_dir)
    registry.install(candidate)
    registry.set_shadow(name, version, site=None)

    catalog = open_catalog(settings.effective_database_url)
    _populate(catalog)
    metrics = PacsclipMetrics()
    api = create_app(settings, catalog.sessions, metrics, results_for=repository.results_for)
    mount_dashboard(api, settings, catalog.sessions, metrics)
    return TestClient(api)


def _populate(catalog: Catalog) -> None:
    """site-a: 24 labeled studies, the candidate separates them, the live model barely;
    site-b: two studies, too few labels for a figure."""
    intake = ReportIntake(catalog.sessions, _no_labeler)
    rng = np.random.default_rng(3)
    for i in range(24):
        present = i % 2 == 0
        study_id, uid = add_study(catalog, "site-a")
        text = "Left pleural effusion." if present else "No pleural effusion."
        intake.add(text, source="api", study_uid=uid, label=False)
        truth = float(present)
        add_analysis(
            catalog, study_id, LIVE, {"pleural_effusion": 0.2 * truth + 0.7 * rng.random()}
        )
        add_analysis(
            catalog,
            study_id,
            CANDIDATE,
            {"pleural_effusion": 0.7 * truth + 0.25 * rng.random()},
            role="shadow",
        )
    for text in ("No pleural effusion.", "Small right pleural effusion."):
        study_id, uid = add_study(catalog, "site-b")
        intake.add(text, source="api", study_uid=uid, label=False)
        add_analysis(catalog, study_id, LIVE, {"pleural_effusion": 0.3})
        add_analysis(catalog, study_id, UNINSTALLED, {"pleural_effusion": 0.6}, role="shadow")


def _section(page: str, marker: str) -> str:
    start = page.index(marker)
    end = page.find('<section class="site"', start + 1)
    return page[start : end if end != -1 else len(page)]


def test_the_page_and_its_plot_need_a_login(app: TestClient) -> None:
    for path in (
        "/validation",
        f"/validation/reliability.png?site=site-a&model={LIVE}",
        f"/validation/monitoring.png?site=site-a&model={LIVE}",
    ):
        answer = app.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=/validation")
        assert b"PNG" not in answer.content[:8]
    wrong = app.get("/validation", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_validation_page_shows_models_figures_shortfalls_and_the_gate(app: TestClient) -> None:
    login(app)
    page = app.get("/validation").text

    assert '<a href="/validation">Validation</a>' in page  # in the navigation
    site_a = _section(page, 'data-site="site-a"')
    roles = re.findall(r'data-model="([^"]+)" data-role="(\w+)"', site_a)
    assert roles == [(LIVE, "live"), (CANDIDATE, "shadow")]  # live first
    assert "pacsclip-demo 2026.11.1" in site_a and "pacsclip-demo 2026.12.0-candidate" in site_a
    assert SYNTHETIC_MODEL in site_a
    # Enough labels at site-a: figures with intervals, the paired difference, and a plot.
    assert site_a.count('class="auroc">') == 2
    assert "1.000 [1.000, 1.000]" in site_a  # the candidate separates the labels perfectly
    assert 'class="versus">+' in site_a and "on 24 studies" in site_a
    assert site_a.count("/validation/reliability.png?site=site-a&amp;model=pacsclip-demo") == 2
    # site-b: one positive and one negative label, below the floors of five.
    site_b = _section(page, 'data-site="site-b"')
    assert "too few labels: 1 positive and 1 negative labeled studies" in site_b
    assert 'class="auroc"' not in site_b and "reliability.png" not in site_b
    # The go-live gate, read-only: the installed candidate passes, the other one does not.
    gate = page[page.index('id="golive"') : page.index('<section class="site"')]
    assert "<form" not in gate
    allowed = gate[gate.index(f'data-candidate="{CANDIDATE}"') :]
    assert "may go live" in allowed.split("</div>")[0]
    assert "pleural_effusion at site site-a: AUROC 1.000 &gt;= 0.7" in allowed
    refused = gate[gate.index(f'data-candidate="{UNINSTALLED}"') :].split("</div>")[0]
    assert "may not go live" in refused
    assert "pleural_effusion at site site-b: too few labels" in refused
    assert "no out-of-distribution reference" in refused

    only_b = app.get("/validation", params={"site": "site-b"}).text
    assert 'data-site="site-b"' in only_b and 'data-site="site-a"' not in only_b
    assert 'data-site="site-a"' not in app.get("/validation?since=2999-01-01").text
    assert app.get("/validation?since=yesterday").status_code == 422


def test_reliability_plot_is_a_png_from_the_pages_answer(app: TestClient) -> None:
    login(app)
    app.get("/validation")
    source = app.app.state.dashboard.validation  # type: ignore[attr-defined]
    page_answer = source.answer(Filters())

    answer = app.get("/validation/reliability.png", params={"site": "site-a", "model": CANDIDATE})

    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert len(answer.content) > 10_000
    image = Image.open(io.BytesIO(answer.content))
    assert image.format == "PNG" and image.size[0] >= 400
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 50 and pixels.std() > 10  # drawn on, not a blank canvas
    # The plot came from the page's answer: nothing was computed again.
    assert source.answer(Filters(site="site-a", model=CANDIDATE), wider=True) is page_answer
    assert source.answer(Filters(site="site-a")) is not page_answer  # the page's own filters
    missing = app.get("/validation/reliability.png", params={"site": "site-b", "model": LIVE})
    assert missing.status_code == 404 and "enough labels" in missing.text
    assert app.get("/validation/reliability.png?site=site-a&model=nope").status_code == 422


# --- monitoring over time ------------------------------------------------------------------

FIRST_RUN = datetime(2026, 11, 2, 6, tzinfo=UTC)
LOW_AUROC = "AUROC 0.612 below the floor 0.7"
OLD_PROBLEM = "alert rate 31.0% left its band 12.0% +/- 10%"


def _figure(
    site: str, model: str, finding: str, auroc: float, alert_rate: float, *problems: str
) -> WindowFigure:
    return WindowFigure(
        site=site,
        model=model,
        finding=finding,
        labeled=120,
        positives=40,
        negatives=80,
        auroc=auroc,
        ppv=0.55,
        alert_rate=alert_rate,
        baseline_alert_rate=0.12,
        problems=tuple(problems),
    )


def _record_runs(app: TestClient) -> None:
    """Four daily runs: the live model's pneumothorax AUROC falls below the floor in the last
    one; an alert-rate problem of the second run is over by the third; site-b has its own."""
    store = MonitorStore(app.app.state.dashboard.settings.data_dir / "monitoring")  # type: ignore[attr-defined]
    aurocs = (0.811, 0.790, 0.744, 0.612)
    for day, auroc in enumerate(aurocs):
        rate = 0.31 if day == 1 else 0.14
        figures = [
            _figure("site-a", LIVE, "pleural_effusion", 0.9 - 0.01 * day, rate),
            _figure(
                "site-a",
                LIVE,
                "pneumothorax",
                auroc,
                0.15,
                *([LOW_AUROC] if auroc < 0.7 else []),
                *([OLD_PROBLEM] if day == 1 else []),
            ),
            _figure("site-a", CANDIDATE, "pleural_effusion", 0.95, 0.13),
            _figure("site-b", LIVE, "pleural_effusion", 0.88, 0.12),
        ]
        store.record(figures, FIRST_RUN + timedelta(days=day))


def _monitoring(page: str) -> str:
    return page[page.index('<section id="monitoring">') :]


def test_monitoring_section_shows_the_latest_figures_and_open_alerts(app: TestClient) -> None:
    login(app)
    empty = _monitoring(app.get("/validation").text)
    assert "No monitoring run yet: workers compute it after labeled reports" in empty
    assert "monitoring.png" not in empty

    _record_runs(app)
    section = _monitoring(app.get("/validation").text)

    assert "No monitoring run yet" not in section
    groups = re.findall(r'data-monitor-site="([^"]+)" data-monitor-model="([^"]+)"', section)
    assert groups == [("site-a", LIVE), ("site-a", CANDIDATE), ("site-b", LIVE)]
    live_a = section[section.index(f'data-monitor-site="site-a" data-monitor-model="{LIVE}"') :]
    live_a = live_a.split("</div>")[0]
    assert "Latest run 2026-11-05 06:00 UTC, 4 runs kept." in live_a
    assert "1 open alert" in live_a
    pneumothorax = live_a[live_a.index('data-finding="pneumothorax"') :].split("</tr>")[0]
    assert 'class="alerting"' in pneumothorax and "<td>0.612</td>" in pneumothorax
    assert f'<ul class="problems error"><li>{LOW_AUROC}</li></ul>' in pneumothorax
    assert OLD_PROBLEM.split(" +/-")[0] not in section  # over since the third run
    effusion = live_a[live_a.index('data-finding="pleural_effusion"') :].split("</tr>")[0]
    assert "<td>0.870</td>" in effusion and "alerting" not in effusion and "none" in effusion
    assert f"/validation/monitoring.png?site=site-a&amp;model={LIVE.replace('@', '%40')}" in live_a
    calm = section[section.index(f'data-monitor-model="{CANDIDATE}"') :].split("</div>")[0]
    assert "no open alert" in calm and "problems" not in calm

    only_b = _monitoring(app.get("/validation", params={"site": "site-b"}).text)
    assert re.findall(r'data-monitor-site="([^"]+)"', only_b) == ["site-b"]
    candidate = _monitoring(app.get("/validation", params={"model": CANDIDATE}).text)
    assert re.findall(r'data-monitor-model="([^"]+)"', candidate) == [CANDIDATE]
    nothing = _monitoring(app.get("/validation", params={"site": "site-z"}).text)
    assert "No monitoring figures for this site and model." in nothing


def _red_pixels(png: bytes) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(np.count_nonzero((red > 140) & (green < 80) & (blue < 80)))


def test_monitoring_plot_is_a_png_per_site_and_model(app: TestClient) -> None:
    login(app)
    _record_runs(app)

    answer = app.get("/validation/monitoring.png", params={"site": "site-a", "model": LIVE})

    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert len(answer.content) > 10_000
    image = Image.open(io.BytesIO(answer.content))
    assert image.format == "PNG" and image.size[0] >= 600
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 50 and pixels.std() > 10  # drawn on, not a blank canvas
    # Both plots have the red dashed floor; only the live model's has red alert markers.
    calm = app.get("/validation/monitoring.png", params={"site": "site-a", "model": CANDIDATE})
    assert calm.status_code == 200
    assert _red_pixels(answer.content) > _red_pixels(calm.content) + 100

    unknown_site = app.get("/validation/monitoring.png", params={"site": "site-z", "model": LIVE})
    assert unknown_site.status_code == 404 and "no monitoring run" in unknown_site.text
    other_model = {"site": "site-b", "model": CANDIDATE}  # monitored at site-a only
    assert app.get("/validation/monitoring.png", params=other_model).status_code == 404
    assert app.get("/validation/monitoring.png?site=site-a&model=nope").status_code == 422
    assert app.get(f"/validation/monitoring.png?model={LIVE}").status_code == 422  # no site


def test_a_damaged_history_is_reported_not_drawn(app: TestClient) -> None:
    login(app)
    _record_runs(app)
    history = app.app.state.dashboard.settings.data_dir / "monitoring" / "history.jsonl"  # type: ignore[attr-defined]
    with history.open("a", encoding="utf-8") as out:
        out.write('{"site": "site-a"}\n')

    section = _monitoring(app.get("/validation").text)

    assert "line 17 of the monitoring history is damaged" in section
    assert "monitoring.png" not in section
    plot = app.get("/validation/monitoring.png", params={"site": "site-a", "model": LIVE})
    assert plot.status_code == 503
