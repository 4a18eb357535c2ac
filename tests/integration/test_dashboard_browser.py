"""The dashboard in a real browser (headless Debian Chromium driven by Selenium) against a
running ``pacsclip serve``: log in, watch a study DCMTK storescu sends appear with its flag
and patient fields, open it and see its images load with a finding's region drawn on the
source image where it lies, its prior and its viewer link, open a similar case, retry a dead
letter and test a file against the routing rules. A PatientName of
``<script>alert(1)</script>`` stays text."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Analysis, Study
from tests.integration.test_serve import PACSCLIP, TOKEN, get, serve_env, wait_until
from tests.peers.browser import browser_installed, headless
from tests.peers.data import ct_small_copies
from tests.peers.dcmtk import echoscu, storescu
from tests.peers.ports import free_port

HOSTILE = "<script>alert(1)</script>"
VIEWER = "http://viewer.invalid/ohif"
# A region of a present finding in the source's pixel coordinates (CT_small: 128 x 128).
SQUARE = [[32.0, 16.0], [96.0, 16.0], [96.0, 64.0], [32.0, 64.0], [32.0, 16.0]]
RULES = """\
version: 1
rules:
  - name: ct-goes-first
    match:
      modality: [CT]
    priority: stat
"""

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not browser_installed():
    pytest.skip(
        "Debian chromium and chromium-driver are not installed (scripts/bootstrap installs them)",
        allow_module_level=True,
    )

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class Served:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        api: str,
        dicom_port: int,
        log: Path,
        data_dir: Path,
    ):
        self.process, self.api, self.dicom_port, self.log = process, api, dicom_port, log
        self.data_dir = data_dir


@pytest.fixture
def served(tmp_path: Path, bundle_dir: Path) -> Iterator[Served]:
    """``pacsclip serve`` whose only destination refuses connections: deliveries are
    dead-lettered after one attempt."""
    dicom_port, api_port, dead_port = free_port(), free_port(), free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    env = serve_env(tmp_path / "data", dicom_port, api_port, bundle_dir)
    env.update(
        PACSCLIP_VIEWER_BASE_URL=VIEWER,
        PACSCLIP_RULES_FILE=str(rules),
        PACSCLIP_DESTINATIONS=json.dumps(
            [{"name": "pacs", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": dead_port}]
        ),
        PACSCLIP_DISPATCH_MAX_RETRIES="0",
        PACSCLIP_DISPATCH_BACKOFF_S="0.1",
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([PACSCLIP, "serve"], env=env, stdout=out, stderr=out)
    try:
        api = f"http://127.0.0.1:{api_port}"
        try:
            wait_until(
                lambda: echoscu("127.0.0.1", dicom_port, aec="PACSCLIP").returncode == 0,
                90,
                "the node did not answer C-ECHO",
            )
            wait_until(lambda: get(f"{api}/api/health", None)[0] == 200, 30, "no API health")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; serve log:\n{log.read_text()[-4000:]}") from exc
        yield Served(process, api, dicom_port, log, tmp_path / "data")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with headless() as driver:
        yield driver


def hostile_copy(out_dir: Path, accession: str, study_date: str) -> Path:
    """A CT_small copy (new UIDs) whose PatientName and StudyDescription are markup."""
    [path] = ct_small_copies(1, out_dir)
    ds = pydicom.dcmread(path)
    ds.PatientName = HOSTILE
    ds.StudyDescription = HOSTILE
    ds.AccessionNumber, ds.StudyDate = accession, study_date
    ds.save_as(path)
    return path


def draw_a_region(data_dir: Path, study_uid: str, sop_instance_uid: str) -> None:
    """Make the newest analysis's first finding present with SQUARE as its region, as the
    analysis stores regions (whatever the demo model found in CT_small)."""
    catalog = open_catalog(f"sqlite:///{(data_dir / 'catalog.sqlite3').resolve()}")
    try:
        with catalog.sessions.begin() as session:
            analysis = session.scalars(
                select(Analysis)
                .join(Study, Study.id == Analysis.study_id)
                .where(Study.study_instance_uid == study_uid, Analysis.role == "live")
                .order_by(Analysis.id.desc())
            ).first()
            assert analysis is not None and analysis.findings
            first, *rest = analysis.findings
            region = {"sop_instance_uid": sop_instance_uid, "contour": SQUARE}
            first = {**first, "decision": "present", "probability": 0.87, "regions": [region]}
            analysis.findings = [first, *rest]
    finally:
        catalog.engine.dispose()


def study_json(api: str, uid: str) -> dict[str, Any] | None:
    status, body = get(f"{api}/api/studies/{uid}")
    return json.loads(body) if status == 200 else None


def analysed(api: str, uid: str) -> dict[str, Any] | None:
    detail = study_json(api, uid)
    return detail if detail and detail.get("results") else None


def no_alert(driver: WebDriver) -> bool:
    try:
        driver.switch_to.alert  # noqa: B018 - raises when no dialog is open
    except NoAlertPresentException:
        return True
    return False


def image_loaded(driver: WebDriver, element: Any) -> bool:
    return bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0;", element
        )
    )


def test_dashboard_in_a_browser(served: Served, browser: WebDriver, tmp_path: Path) -> None:
    started = time.monotonic()
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)

    # Log in: the worklist redirects to the login form first.
    browser.get(f"{served.api}/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait.until(lambda d: d.find_elements(By.ID, "worklist-rows"))

    # Two studies of one patient: each is the other's prior (a similar case).
    source = hostile_copy(tmp_path / "first", "ACC-BROWSER-2", "20261204")
    prior = hostile_copy(tmp_path / "prior", "ACC-BROWSER-1", "20251104")
    study_uid = str(pydicom.dcmread(source).StudyInstanceUID)
    prior_uid = str(pydicom.dcmread(prior).StudyInstanceUID)
    for path in (prior, source):
        sent = storescu([path], "127.0.0.1", served.dicom_port, aec="PACSCLIP")
        assert sent.statuses == [0], sent.stdout[-2000:]
    detail = wait_until(lambda: analysed(served.api, study_uid), 90, "the study was not analysed")
    wait_until(lambda: analysed(served.api, prior_uid), 90, "the prior was not analysed")

    # The worklist updates itself (no reload) and shows the study with its flag.
    row_css = f'tr[data-study="{study_uid}"]'
    flag = detail["priority"].replace("_", " ")  # stat, routine or not scored
    wait.until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, row_css)
            and d.find_element(By.CSS_SELECTOR, f"{row_css} .flag").text.lower() == flag
        )
    )
    row = browser.find_element(By.CSS_SELECTOR, row_css)
    assert row.find_element(By.CSS_SELECTOR, ".study-link").text == HOSTILE  # text, not markup
    assert row.find_element(By.CSS_SELECTOR, ".patient-name").text == HOSTILE
    assert row.find_element(By.CSS_SELECTOR, ".patient-id").text == "ID 1CT1"
    assert row.find_element(By.CSS_SELECTOR, ".accession").text == "ACC-BROWSER-2"
    assert row.find_element(By.CSS_SELECTOR, ".study-date").text == "2026-12-04"
    assert no_alert(browser)

    # The study: source image and every overlay the analysis made load in the browser, the
    # finding's region is drawn where it lies on the source image.
    source_uid = str(pydicom.dcmread(source).SOPInstanceUID)
    draw_a_region(served.data_dir, study_uid, source_uid)
    row.find_element(By.CSS_SELECTOR, ".study-link").click()
    wait.until(lambda d: d.find_elements(By.ID, "source-image"))
    assert browser.find_element(By.ID, "patient-name").text == HOSTILE
    assert browser.find_element(By.ID, "patient-id").text == "1CT1"
    assert browser.find_element(By.ID, "accession-number").text == "ACC-BROWSER-2"
    assert browser.find_element(By.ID, "study-date").text == "2026-12-04"
    link = browser.find_element(By.ID, "viewer-link").get_attribute("href")
    assert link == f"{VIEWER}/viewer?StudyInstanceUIDs={study_uid}"
    assert no_alert(browser)
    [result] = detail["results"]
    algorithm = f"{result['algorithm']['name']} {result['algorithm']['version']}"
    assert algorithm in browser.find_element(By.ID, "result-algorithm").text
    overlays = [o for o in result["objects"] if o["kind"] == "SC"]
    images = [browser.find_element(By.ID, "source-image")]
    images += browser.find_elements(By.CSS_SELECTOR, ".overlay-image")
    assert len(images) == 1 + len(overlays)
    wait.until(lambda d: all(image_loaded(d, image) for image in images))
    [polygon] = browser.find_elements(By.CSS_SELECTOR, "svg.regions polygon")
    assert polygon.get_attribute("points") == "32,16 96,16 96,64 32,64 32,16"
    label = browser.find_element(By.CSS_SELECTOR, "svg.regions text").text
    assert label.endswith(" 0.87")
    # Drawn over the image, scaled with it: x 32..96 and y 16..64 of 128 pixels.
    image_box, shape = browser.execute_script(
        "const r = e => e.getBoundingClientRect();"
        "return [r(arguments[0]), r(arguments[1])].map(b => [b.left, b.top, b.width, b.height]);",
        images[0],
        polygon,
    )
    scale_x, scale_y = image_box[2] / 128, image_box[3] / 128
    expected = [32 * scale_x, 16 * scale_y, 64 * scale_x, 48 * scale_y]
    placed = [shape[0] - image_box[0], shape[1] - image_box[1], shape[2], shape[3]]
    assert all(abs(a - b) <= 2 for a, b in zip(placed, expected, strict=True)), (placed, expected)
    assert browser.find_elements(By.CSS_SELECTOR, f'#priors tr.prior[data-study="{prior_uid}"]')

    # A similar case: the patient's prior, with a thumbnail that loads; open it.
    case = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "a.similar-case.prior"))[0]
    thumbnail = case.find_element(By.TAG_NAME, "img")
    wait.until(lambda d: image_loaded(d, thumbnail))
    case.click()
    wait.until(lambda d: d.current_url.endswith(f"/studies/{prior_uid}"))
    assert no_alert(browser)

    # A dead letter (the destination refuses connections): retry it, it is sent again.
    def dead_letter_attempts() -> int | None:
        browser.get(f"{served.api}/operations")
        cells = browser.find_elements(By.CSS_SELECTOR, "tr.dead-letter .attempts")
        return int(cells[0].text) if cells else None

    attempts = wait_until(dead_letter_attempts, 60, "no dead letter appeared")
    browser.find_element(By.CSS_SELECTOR, "tr.dead-letter button.retry").click()
    assert "pending again" in wait.until(lambda d: d.find_element(By.ID, "notice")).text
    wait_until(
        lambda: (dead_letter_attempts() or 0) > attempts, 60, "the retried job was not sent again"
    )

    # The rule tester routes an uploaded file with the configured rules.
    upload = tmp_path / "upload.dcm"
    shutil.copy(source, upload)
    browser.find_element(By.ID, "rule-file").send_keys(str(upload))
    browser.find_element(By.ID, "rule-test").click()
    assert wait.until(lambda d: d.find_element(By.ID, "rule-priority")).text == "stat"
    assert "ct-goes-first" in browser.find_element(By.ID, "rule-matched").text
    assert no_alert(browser)
    assert time.monotonic() - started < 120
