"""The web dashboard over a throwaway SQLite catalog: login and CSRF, escaping of what comes
from DICOM, the study page with a real SR and overlay, images, dead-letter retry, the rule
tester, and the operations page."""

from __future__ import annotations

import datetime
import io
import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from plugin.api import create_app
from plugin.catalog import repository
from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import (
    Analysis,
    DispatchJob,
    Instance,
    ResultObject,
    Series,
    Site,
    Study,
)
from plugin.dashboard import mount_dashboard
from plugin.dashboard.metrics_history import MetricsHistory
from plugin.dashboard.session import SESSION_COOKIE
from plugin.disclaimers import SYNTHETIC_MODEL
from plugin.imaging.preprocess import display_array
from plugin.metrics import PacsclipMetrics, Stage
from plugin.probes import Health, ProbeServer
from plugin.results import (
    AlgorithmIdentity,
    FindingResult,
    StudyResult,
    build_measurement_report,
    build_overlay,
)
from plugin.serve import routing_decision
from plugin.settings import Settings
from tests.peers.ports import free_port

TOKEN = "dashboard-token-7e2"
HOSTILE = "<script>alert(1)</script>"
PATIENT_ID = "PID-DASH-0042"
ACCESSION = "ACC-DASH-7731"
# The nodule's region: a closed polyline in the source's pixel coordinates (CT_small is 128 x
# 128), as the analysis stores it.
OUTLINE = ((10.0, 10.0), (40.0, 10.0), (40.0, 40.0), (10.0, 40.0), (10.0, 10.0))


class World:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings, self.catalog = settings, catalog
        self.enqueued: list[int] = []
        metrics = PacsclipMetrics()
        app = create_app(settings, catalog.sessions, metrics, results_for=repository.results_for)
        mount_dashboard(
            app,
            settings,
            catalog.sessions,
            metrics,
            rule_tester=partial(routing_decision, settings),
            enqueue_dispatch=self.enqueued.append,
        )
        self.app = app
        self.study_uid = ""
        self.source_uid = ""
        self.overlay_uid = ""
        self.job_id = 0

    def client(self) -> TestClient:
        return TestClient(self.app)


def _store(ds: pydicom.Dataset, root: Path, relative: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def world(make_settings: Callable[..., Settings]) -> World:
    """A study with a hostile PatientName and StudyDescription, analysed by a synthetic model
    with a real TID 1500 SR and overlay on disk, and one dead-lettered delivery."""
    return build_world(make_settings(api_token=TOKEN))


def build_world(settings: Settings) -> World:
    """The ``world`` fixture's catalog and files, under ``settings``."""
    catalog = open_catalog(settings.effective_database_url)
    world = World(settings, catalog)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.StudyInstanceUID, source.SeriesInstanceUID = generate_uid(), generate_uid()
    source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    source.PatientName, source.PatientID, source.StudyDescription = HOSTILE, PATIENT_ID, HOSTILE
    spooled = f"{source.StudyInstanceUID}/{source.SeriesInstanceUID}/{source.SOPInstanceUID}.dcm"
    _store(source, settings.spool_dir, spooled)

    algorithm = AlgorithmIdentity("tiny-demo", "1.0", synthetic=True)
    finding = FindingResult(
        name="nodule",
        display="Nodule",
        code=None,
        probability=0.91,
        decision="present",
        threshold=0.5,
        outlines=[OUTLINE],
        source_sop_instance_uid=str(source.SOPInstanceUID),
    )
    result = StudyResult([finding], "stat", ["nodule"], algorithm)
    when = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
    sr = build_measurement_report(
        [source], result, series_uid=generate_uid(), sop_uid=generate_uid(),
        series_number=901, instance_number=1, content_datetime=when,
    )  # fmt: skip
    heat = np.zeros((int(source.Rows), int(source.Columns)))
    heat[10:40, 10:40] = 1.0
    overlay = build_overlay(
        source, heat, result, display_array(source), finding=finding, series_uid=generate_uid(),
        sop_uid=generate_uid(), series_number=902, instance_number=1, content_datetime=when,
    )  # fmt: skip
    study_uid = str(source.StudyInstanceUID)
    _store(sr, settings.results_dir, f"{study_uid}/{sr.SOPInstanceUID}.dcm")
    _store(overlay, settings.results_dir, f"{study_uid}/{overlay.SOPInstanceUID}.dcm")

    with catalog.sessions.begin() as session:
        study = Study(
            study_instance_uid=study_uid,
            site=Site(key="AE1|General"),
            state="delivered",
            priority="stat",
            patient_name=HOSTILE,
            patient_id=PATIENT_ID,
            accession_number=ACCESSION,
            study_date="20261130",
            study_description=HOSTILE,
            calling_ae_title="AE1",
            series=[
                Series(
                    series_instance_uid=str(source.SeriesInstanceUID),
                    modality="CT",
                    instances=[
                        Instance(
                            sop_instance_uid=str(source.SOPInstanceUID),
                            sop_class_uid=str(source.SOPClassUID),
                            transfer_syntax_uid=str(source.file_meta.TransferSyntaxUID),
                            path=spooled,
                            size_bytes=1,
                            sha256="0" * 64,
                            calling_ae_title="AE1",
                        )
                    ],
                )
            ],
        )
        job = DispatchJob(
            destination="pacs", state="failed", attempts=3, last_error="connection refused"
        )
        session.add(
            Analysis(
                study=study,
                generation=1,
                algorithm_name="tiny-demo",
                algorithm_version="1.0",
                synthetic=True,
                priority="stat",
                triggered_by=["nodule"],
                findings=[
                    {
                        "name": "nodule",
                        "display": "Nodule",
                        "probability": 0.91,
                        "raw_probability": 0.8,
                        "decision": "present",
                        "threshold": 0.5,
                        "source_sop_instance_uid": str(source.SOPInstanceUID),
                        "code": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
                        "scored_by": "zero-shot, calibration v2",
                        "localisation": "patch-similarity",
                        "regions": [
                            {
                                "sop_instance_uid": str(source.SOPInstanceUID),
                                "contour": [list(point) for point in OUTLINE],
                            }
                        ],
                    }
                ],
                objects=[
                    ResultObject(
                        kind=kind,
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        series_instance_uid=str(ds.SeriesInstanceUID),
                        path=f"{study_uid}/{ds.SOPInstanceUID}.dcm",
                    )
                    for kind, ds in (("SR", sr), ("SC", overlay))
                ],
                jobs=[job],
            )
        )
        session.flush()
        world.job_id = job.id
    world.study_uid = study_uid
    world.source_uid = str(source.SOPInstanceUID)
    world.overlay_uid = str(overlay.SOPInstanceUID)
    return world


def login(client: TestClient) -> str:
    """Log in through the form; returns the session's CSRF token."""
    form = client.get("/login")
    login_csrf = _csrf(form.text)
    done = client.post(
        "/login",
        data={"token": TOKEN, "csrf_token": login_csrf, "next": "/operations"},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == "/operations"
    return _csrf(client.get("/operations").text)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:2000]
    return found[1]


# --- authentication ----------------------------------------------------------------------


def test_nothing_is_shown_without_authentication(world: World) -> None:
    client = world.client()
    for path in (
        "/",
        f"/studies/{world.study_uid}",
        f"/studies/{world.study_uid}/images/{world.source_uid}.png",
        "/operations",
        "/worklist/rows",
    ):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=/")
        assert HOSTILE not in answer.text and b"PNG" not in answer.content[:8]
    wrong = client.get("/", headers={"Authorization": "Bearer nope"}, follow_redirects=False)
    assert wrong.status_code == 401
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_login_sets_a_strict_httponly_session_cookie(world: World) -> None:
    client = world.client()
    form = client.get("/login")
    forged = client.post(
        "/login", data={"token": TOKEN, "csrf_token": "forged"}, follow_redirects=False
    )
    assert forged.status_code == 403
    wrong = client.post(
        "/login", data={"token": "guess", "csrf_token": _csrf(form.text)}, follow_redirects=False
    )
    assert wrong.status_code == 401 and "not the one" in wrong.text
    assert SESSION_COOKIE not in wrong.cookies
    good = client.post(
        "/login",
        data={"token": TOKEN, "csrf_token": _csrf(form.text), "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"] == "/"  # never off-site
    cookie = next(
        h for h in good.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "=")
    )
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert client.get("/").status_code == 200
    tampered = TestClient(world.app, cookies={SESSION_COOKIE: "x" + good.cookies[SESSION_COOKIE]})
    assert tampered.get("/", follow_redirects=False).status_code == 303


def test_every_post_needs_the_sessions_csrf_token(world: World) -> None:
    client = world.client()
    csrf = login(client)
    retry = f"/operations/jobs/{world.job_id}/retry"
    assert client.post(retry, follow_redirects=False).status_code == 403
    assert client.post(retry, data={"csrf_token": "wrong"}).status_code == 403
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert world.enqueued == []
    done = client.post(retry, data={"csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303
    assert world.enqueued == [world.job_id]
    page = client.get(done.headers["location"]).text
    assert "pending again" in page
    assert client.post(retry, data={"csrf_token": csrf}).status_code == 409  # not failed now
    out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


# --- escaping and patient data -------------------------------------------------------------


def test_dicom_text_renders_as_text_and_pages_forbid_inline_script(world: World) -> None:
    client = world.client()
    login(client)
    for path in ("/", f"/studies/{world.study_uid}", "/worklist/rows"):
        answer = client.get(path)
        assert answer.status_code == 200
        assert HOSTILE not in answer.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in answer.text, path
        assert "script-src 'self'" in answer.headers["content-security-policy"]


def test_no_patient_identifier_in_urls_or_logs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    client = world.client()
    caplog.set_level(logging.DEBUG)
    login(client)
    world.settings.viewer_base_url = "https://pacs.example.org/ohif"
    pages = [client.get("/").text, client.get(f"/studies/{world.study_uid}").text]
    links = [link for page in pages for link in re.findall(r'(?:href|src)="([^"]+)"', page)]
    assert any("StudyInstanceUIDs=" in link for link in links)  # the viewer link is there
    identifiers = (PATIENT_ID, ACCESSION, "alert", "20261130", "2026-11-30")
    assert links and not [link for link in links for i in identifiers if i in link]
    for page in pages:  # shown to the logged-in reader, on the pages only
        assert PATIENT_ID in page and ACCESSION in page and "2026-11-30" in page
    for identifier in (PATIENT_ID, ACCESSION, "alert(1)", "20261130", "2026-11-30"):
        assert identifier not in caplog.text


# --- pages ---------------------------------------------------------------------------------


def test_worklist_shows_flag_findings_and_model(world: World) -> None:
    client = world.client()
    login(client)
    page = client.get("/").text
    assert 'class="flag flag-stat">STAT' in page
    assert "Nodule 0.91" in page
    assert "tiny-demo 1.0" in page and SYNTHETIC_MODEL in page
    assert client.get("/?state=delivered").text.count('class="study ') == 1
    assert client.get("/?state=receiving").text.count('class="study ') == 0
    assert client.get("/?revisit=yes").text.count('class="study ') == 0
    bad = client.get("/?state=bogus")
    assert bad.status_code == 422 and "state must be one of" in bad.text


def test_study_page_shows_findings_images_sr_and_deliveries(world: World) -> None:
    client = world.client()
    login(client)
    page = client.get(f"/studies/{world.study_uid}").text
    assert "0.910" in page and "0.500" in page and "0.800" in page  # prob, threshold, raw
    assert "tiny-demo 1.0" in page and SYNTHETIC_MODEL in page
    assert f"/images/{world.source_uid}.png" in page
    assert f"/images/{world.overlay_uid}.png" in page
    assert 'id="sr-tree"' in page and "Imaging Measurement Report" in page
    assert "connection refused" in page and "failed" in page
    missing = client.get("/studies/1.2.3.4")
    assert missing.status_code == 404


def test_images_are_windowed_pngs_and_cached(world: World) -> None:
    client = world.client()
    login(client)
    url = f"/studies/{world.study_uid}/images/{world.overlay_uid}.png?size=160"
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert "private" in first.headers["cache-control"]
    image = Image.open(io.BytesIO(first.content))
    assert image.mode == "RGB" and max(image.size) <= 160
    cached = Path(world.settings.data_dir) / "dashboard-cache" / f"{world.overlay_uid}-160.png"
    assert cached.read_bytes() == first.content
    grey = client.get(f"/studies/{world.study_uid}/images/{world.source_uid}.png?size=512")
    pixels = np.asarray(Image.open(io.BytesIO(grey.content)))
    assert pixels.ndim == 2 and pixels.min() < 30 and pixels.max() > 220  # windowed, full range
    assert client.get(url.replace("160", "77")).status_code == 422
    other = client.get(f"/studies/1.2.3/images/{world.source_uid}.png")
    assert other.status_code == 404  # an instance is shown only under its own study


def test_rule_tester_routes_an_uploaded_file(world: World, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n"
        "  - name: ct-is-urgent\n    match: {modality: [CT]}\n    priority: stat\n"
    )
    world.settings.rules_file = rules
    client = world.client()
    csrf = login(client)
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    answer = client.post(
        "/operations/rules/test",
        data={"csrf_token": csrf, "calling_ae": "CT1"},
        files={"file": ("ct.dcm", dicom, "application/dicom")},
    )
    assert answer.status_code == 200
    assert re.search(r'id="rule-priority">stat<', answer.text)
    assert "ct-is-urgent" in answer.text
    junk = client.post(
        "/operations/rules/test",
        data={"csrf_token": csrf},
        files={"file": ("notes.txt", b"hello", "text/plain")},
    )
    assert junk.status_code == 422 and "not a DICOM Part 10 file" in junk.text


def test_operations_lists_dead_letters_quarantine_and_plots(world: World) -> None:
    client = world.client()
    login(client)
    page = client.get("/operations").text
    assert f'data-job="{world.job_id}"' in page and "connection refused" in page
    assert "Nothing is quarantined" in page
    assert "instances received" in page and "<polyline" in page
    assert re.search(r"studies delivered: <strong>1</strong>", page)  # the catalog gauge
    assert "no model is configured" in page  # no retrieval service in this app
    drift = client.get("/operations", params={"drift": "true"}).text
    assert "the catalog has no image embeddings yet" in drift  # why there is no drift figure


def test_metrics_history_keeps_the_last_hour() -> None:
    metrics = PacsclipMetrics()
    now = [1_000_000.0]
    history = MetricsHistory(metrics.registry, interval_s=60, clock=lambda: now[0])
    for minute in range(90):
        metrics.observe_stage(Stage.RECEIVED)
        now[0] = 1_000_000.0 + 60 * minute
        history.sample_if_due()
    [received] = history.series([("pacsclip_received_instances_total", "received")])
    assert len(received.points) == 61  # one an interval over the hour, older ones gone
    assert received.latest == 90.0 and received.points[0][1] == 30.0
    xs = [float(p.split(",")[0]) for p in received.svg_points(width=240).split()]
    assert xs == sorted(xs) and xs[0] == 0.0 and xs[-1] == 240.0
    history.sample_if_due()  # not due: no new sample
    assert len(history.series()[0].points) == 61


def test_the_plots_add_what_other_processes_count_and_go_on_without_a_silent_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, node, workers = PacsclipMetrics(), PacsclipMetrics(), [PacsclipMetrics() for _ in "ab"]
    node.observe_stage(Stage.RECEIVED)
    node.observe_stage(Stage.RECEIVED)
    for worker in workers:
        worker.observe_stage(Stage.ANALYSED)
    servers = [
        ProbeServer("127.0.0.1", 0, m.registry, lambda: Health(True, "ready")).start()
        for m in (node, *workers)
    ]
    silent = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    try:
        urls = [f"http://127.0.0.1:{server.port}/metrics" for server in servers]
        history = MetricsHistory(api.registry, scrape_urls=[*urls, silent], scrape_timeout_s=1)
        with caplog.at_level(logging.WARNING, logger="plugin.dashboard.metrics_history"):
            history.sample()
            history.sample()
    finally:
        for server in servers:
            server.stop()

    series = {s.key: s for s in history.series()}
    assert series["pacsclip_received_instances_total"].latest == 2.0  # the node's, not the API's 0
    analysed = history.series([("pacsclip_analysed_studies_total", "analysed")])
    assert analysed[0].latest == 2.0  # both workers
    assert history.unreachable == {silent}
    assert caplog.text.count(silent) == 1  # said once, not at every sample


def test_the_operations_page_plots_a_separate_nodes_figures_and_names_a_silent_one(
    make_settings: Callable[..., Settings],
) -> None:
    node = PacsclipMetrics()
    for _ in range(3):
        node.observe_stage(Stage.RECEIVED)
    server = ProbeServer("127.0.0.1", 0, node.registry, lambda: Health(True, "ready")).start()
    silent = f"http://127.0.0.1:{free_port()}/metrics"
    try:
        urls = [f"http://127.0.0.1:{server.port}/metrics", silent]
        settings = make_settings(api_token=TOKEN, metrics_scrape_urls=urls)
        client = World(settings, open_catalog(settings.effective_database_url)).client()
        login(client)
        page = client.get("/operations").text
    finally:
        server.stop()

    assert "instances received: <strong>3</strong>" in page
    assert f"Not read at the last sample (left out of the plots): {silent}" in page


def test_a_shadow_model_is_shown_as_shadow_never_as_the_study_findings(world: World) -> None:
    with world.catalog.sessions.begin() as session:
        study = session.query(Study).filter_by(study_instance_uid=world.study_uid).one()
        session.add(
            Analysis(
                study_id=study.id,
                generation=1,  # the live analysis's generation
                algorithm_name="tiny-candidate",
                algorithm_version="2.0",
                synthetic=True,
                priority="routine",
                triggered_by=[],
                findings=[
                    {
                        "name": "consolidation",
                        "probability": 0.73,
                        "threshold": 0.5,
                        "decision": "present",
                    },
                    {"name": "nodule", "probability": 0.2, "threshold": 0.5, "decision": "absent"},
                    {  # in the undetermined zone: not a finding, as in the SR
                        "name": "effusion",
                        "probability": 0.55,
                        "threshold": 0.5,
                        "decision": "indeterminate",
                    },
                ],
                role="shadow",
            )
        )
    client = world.client()
    login(client)

    page = client.get(f"/studies/{world.study_uid}").text

    findings = page[page.index('id="result-algorithm"') : page.index('id="shadow-results"')]
    assert "tiny-demo 1.0" in findings and "tiny-candidate" not in findings
    assert "0.730" not in findings
    shadow = page[page.index('id="shadow-results"') :]
    assert "tiny-candidate 2.0" in shadow and "consolidation 0.73" in shadow
    assert "effusion" not in shadow
    assert "nothing of" in shadow


# --- regions, patient fields, priors, viewer links -----------------------------------------


def _add_analysis(world: World, generation: int, findings: list[dict[str, object]]) -> None:
    """A newer live analysis of the world's study (the one the pages show)."""
    with world.catalog.sessions.begin() as session:
        study = session.query(Study).filter_by(study_instance_uid=world.study_uid).one()
        session.add(
            Analysis(
                study_id=study.id,
                generation=generation,
                algorithm_name="tiny-demo",
                algorithm_version="1.0",
                synthetic=True,
                priority="routine",
                triggered_by=[],
                findings=findings,
            )
        )


def _finding(name: str, probability: float, decision: str, **more: object) -> dict[str, object]:
    return {
        "name": name,
        "display": name.title(),
        "probability": probability,
        "threshold": 0.5,
        "decision": decision,
        **more,
    }


def test_study_page_draws_each_present_findings_region_over_the_source_image(
    world: World,
) -> None:
    client = world.client()
    login(client)
    page = client.get(f"/studies/{world.study_uid}").text

    # The SVG lies over the source image, in its pixel coordinates (CT_small: 128 x 128).
    figure = page[page.index('id="source-image"') :]
    figure = figure[: figure.index("</figure>")]
    svg = re.search(r'<svg class="regions" data-image="([^"]+)" viewBox="([^"]+)"', figure)
    assert svg is not None and svg[1] == world.source_uid and svg[2] == "0 0 128 128"
    assert re.findall(r'<polygon points="([^"]+)">', page) == ["10,10 40,10 40,40 10,40 10,10"]
    assert re.search(r"<text [^>]*>Nodule 0\.91</text>", figure)
    listed = page[page.index('id="regions"') : page.index('id="priors"')]
    assert "Nodule" in listed and "patch-similarity" in listed
    assert "columns 10.0 to 40.0, rows 10.0 to 40.0 (5 points)" in listed
    assert "no region was computed" not in listed
    findings = page[page.index('id="result-algorithm"') : page.index('class="images"')]
    assert "zero-shot, calibration v2" in findings and "SCT 27925004" in findings


def test_a_region_on_another_image_is_drawn_on_that_image_in_its_own_size(
    world: World,
) -> None:
    """A second image, 96 columns by 128 rows: its viewBox is Columns x Rows, not square."""
    narrow = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    narrow.StudyInstanceUID = world.study_uid
    narrow.SOPInstanceUID = narrow.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    narrow.PixelData = np.ascontiguousarray(narrow.pixel_array[:, :96]).tobytes()
    narrow.Columns = 96
    relative = f"{world.study_uid}/narrow/{narrow.SOPInstanceUID}.dcm"
    _store(narrow, world.settings.spool_dir, relative)
    with world.catalog.sessions.begin() as session:
        study = session.query(Study).filter_by(study_instance_uid=world.study_uid).one()
        study.series[0].instances.append(
            Instance(
                sop_instance_uid=str(narrow.SOPInstanceUID),
                sop_class_uid=str(narrow.SOPClassUID),
                transfer_syntax_uid=str(narrow.file_meta.TransferSyntaxUID),
                path=relative,
                size_bytes=1,
                sha256="0" * 64,
                calling_ae_title="AE1",
            )
        )
    contour = [[80, 100], [95.5, 100], [95.5, 127], [80, 100]]
    _add_analysis(
        world,
        2,
        [
            _finding(
                "nodule",
                0.91,
                "present",
                source_sop_instance_uid=world.source_uid,
                regions=[{"sop_instance_uid": str(narrow.SOPInstanceUID), "contour": contour}],
            )
        ],
    )
    client = world.client()
    login(client)
    page = client.get(f"/studies/{world.study_uid}").text
    figure = page[page.index('class="region-image"') :]
    figure = figure[: figure.index("</figure>")]
    assert f"/images/{narrow.SOPInstanceUID}.png" in figure
    assert f'data-image="{narrow.SOPInstanceUID}" viewBox="0 0 96 128"' in figure
    assert '<polygon points="80,100 95.5,100 95.5,127 80,100">' in figure
    source = page[page.index('id="source-image"') :]
    assert "<svg" not in source[: source.index("</figure>")]  # nothing on the other image
    png = client.get(f"/studies/{world.study_uid}/images/{narrow.SOPInstanceUID}.png?size=512")
    assert Image.open(io.BytesIO(png.content)).size == (96, 128)  # as the viewBox says


def test_a_present_finding_without_a_region_says_so_and_nothing_else_is_drawn(
    world: World,
) -> None:
    square = [[0, 0], [9, 0], [9, 9], [0, 0]]
    region = [{"sop_instance_uid": world.source_uid, "contour": square}]
    _add_analysis(
        world,
        2,
        [
            _finding("nodule", 0.9, "present", localisation=None, regions=[]),
            _finding("mass", 0.8, "present"),  # stored before regions: no key at all
            _finding("effusion", 0.55, "indeterminate", regions=region),  # never drawn
            _finding("pneumothorax", 0.1, "absent", regions=region),
        ],
    )
    client = world.client()
    login(client)
    page = client.get(f"/studies/{world.study_uid}").text
    assert "<polygon" not in page and '<svg class="regions"' not in page
    listed = page[page.index('id="regions"') : page.index('id="priors"')]
    assert listed.count("no region was computed") == 2
    assert "Nodule" in listed and "Mass" in listed and "Effusion" not in listed

    _add_analysis(world, 3, [_finding("nodule", 0.2, "absent")])
    page = client.get(f"/studies/{world.study_uid}").text
    assert "No finding is present: there is no region to draw." in page


def test_worklist_shows_an_undetermined_score_apart_never_as_a_finding(world: World) -> None:
    _add_analysis(
        world,
        2,
        [_finding("nodule", 0.91, "present"), _finding("effusion", 0.55, "indeterminate")],
    )
    client = world.client()
    login(client)
    for page in (client.get("/").text, client.get("/worklist/rows").text):
        found = re.findall(r'<span class="finding"[^>]*>([^<]+)</span>', page)
        undetermined = re.findall(r'<span class="undetermined"[^>]*>([^<]+)<span', page)
        assert found == ["Nodule 0.91"]
        assert [u.strip() for u in undetermined] == ["Effusion 0.55"]
        assert '<span class="badge">undetermined</span>' in page
    study = client.get(f"/studies/{world.study_uid}").text
    assert re.search(r"0\.550</td>.*?badge-undetermined\">undetermined<", study, re.S)


def test_worklist_and_study_page_show_the_patient_and_study_fields(world: World) -> None:
    client = world.client()
    login(client)
    row = client.get("/").text
    row = row[row.index(f'data-study="{world.study_uid}"') :]
    assert re.search(r'class="patient-name">&lt;script&gt;alert\(1\)&lt;/script&gt;<', row)
    assert f'class="patient-id">ID {PATIENT_ID}<' in row
    assert f'class="accession">{ACCESSION}<' in row
    assert 'class="study-date">2026-11-30<' in row
    study = client.get(f"/studies/{world.study_uid}").text
    assert 'id="patient-name">&lt;script&gt;alert(1)&lt;/script&gt;<' in study
    assert f'id="patient-id">{PATIENT_ID}<' in study
    assert f'id="accession-number">{ACCESSION}<' in study
    assert 'id="study-date">2026-11-30<' in study


def test_study_page_lists_the_patients_priors_by_date(world: World) -> None:
    with world.catalog.sessions.begin() as session:
        site = session.query(Site).one()
        for uid, patient, date in (
            ("1.2.826.0.9.1", PATIENT_ID, "20250101"),
            ("1.2.826.0.9.2", PATIENT_ID, "20260601"),
            ("1.2.826.0.9.3", "SOMEONE-ELSE", "20260701"),
        ):
            session.add(
                Study(
                    study_instance_uid=uid,
                    site=site,
                    state="delivered",
                    priority="routine",
                    patient_id=patient,
                    study_date=date,
                    study_description=f"prior {uid}",
                    calling_ae_title="AE1",
                )
            )
    client = world.client()
    login(client)
    page = client.get(f"/studies/{world.study_uid}").text
    listed = page[page.index('id="priors"') : page.index('class="similar"')]
    assert re.findall(r'<tr class="prior" data-study="([^"]+)">', listed) == [
        "1.2.826.0.9.2",
        "1.2.826.0.9.1",
    ]
    assert listed.index("2026-06-01") < listed.index("2025-01-01")
    assert 'href="/studies/1.2.826.0.9.2"' in listed
    prior = client.get("/studies/1.2.826.0.9.1").text
    assert f'data-study="{world.study_uid}"' in prior[prior.index('id="priors"') :]


def test_each_study_links_into_the_configured_viewer(world: World) -> None:
    client = world.client()
    login(client)
    assert "viewer-link" not in client.get("/").text  # no viewer base: no link
    assert "no viewer configured" in client.get(f"/studies/{world.study_uid}").text

    world.settings.viewer_base_url = "https://pacs.example.org/ohif"
    expected = f"https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={world.study_uid}"
    row = client.get("/worklist/rows").text
    assert f'class="viewer-link" href="{expected}" target="_blank"' in row
    study = client.get(f"/studies/{world.study_uid}").text
    assert f'id="viewer-link" class="viewer-link" href="{expected}"' in study

    world.settings.viewer_url_template = "https://weasis.example/view?study={study_uid}"
    study = client.get(f"/studies/{world.study_uid}").text
    assert f'href="https://weasis.example/view?study={world.study_uid}"' in study
    world.settings.viewer_url_template = ""
    assert "viewer-link" not in client.get("/").text
