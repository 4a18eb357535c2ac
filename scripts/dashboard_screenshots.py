"""Screenshots of the dashboard for the docs: worklist, a study page, operations and validation.

Run from the repository root with the project's virtualenv (needs Debian chromium,
chromium-driver and dcmtk, which scripts/bootstrap installs):

    .venv/bin/python scripts/dashboard_screenshots.py [--out docs/img]

Starts ``pacsclip serve`` with the built-in demo model (synthetic, not for clinical use) in a
fresh data directory on free loopback ports, sends synthetic demo radiographs
(``plugin.demo.radiographs``; made-up patients, two of them with a prior) with DCMTK storescu,
waits for their analyses and saves what headless Chromium shows. For the validation page it
then sends synthetic demo studies (``plugin.demo.studies``), imports their generated reports
with ``pacsclip report import`` and shows how the demo model does against the labels read from
them (floors lowered to five labels per class for this small sample). Stops serve by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's folder is on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from plugin.demo.radiographs import demo_cases, synthetic_radiograph  # noqa: E402
from plugin.demo.studies import write_demo_studies  # noqa: E402
from tests.peers.browser import chromium  # noqa: E402
from tests.peers.dcmtk import echoscu, storescu  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))
# Made-up patients; the first and third have a prior study.
PATIENTS = (
    ("PHANTOM^ALPHA", "PH-0001"),
    ("PHANTOM^ALPHA", "PH-0001"),
    ("PHANTOM^BRAVO", "PH-0002"),
    ("PHANTOM^CHARLIE", "PH-0003"),
    ("PHANTOM^CHARLIE", "PH-0003"),
    ("PHANTOM^DELTA", "PH-0004"),
    ("PHANTOM^ECHO", "PH-0005"),
)
DEMO_SIZE = 128  # the demo model's input size
SEED, STREAM = 7, 5  # cases no training or calibration stream of the demo model used
VALIDATION_STUDIES = 80  # demo studies with reports, for the validation page
VALIDATION_FLOOR = 5  # labeled positives and negatives a figure needs (20 by default)


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"{what} within {timeout_s} s")


def api_get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def write_studies(folder: Path) -> list[tuple[str, Path]]:
    """One synthetic demo radiograph per study, stored as its simulated site stores it."""
    written = []
    cases = demo_cases(len(PATIENTS), SEED, STREAM, DEMO_SIZE)
    for n, ((name, patient_id), case) in enumerate(zip(PATIENTS, cases, strict=True)):
        ds = synthetic_radiograph(case)
        # The patient and study modules a PACS sends (the result builders copy them).
        ds.PatientName, ds.PatientID = name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime = f"202611{10 + n:02d}", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = str(n), f"PH{n:04d}", ""
        ds.StudyDescription = "CHEST PA (synthetic phantom)"
        ds.InstitutionName = case.site  # the simulated site: the worklist's site column
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        path = folder / f"phantom_{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((str(ds.StudyInstanceUID), path))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="pacsclip-shots-") as tmp:
        work = Path(tmp)
        dicom_port, api_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
        env.update(
            PACSCLIP_DATA_DIR=str(work / "data"),
            PACSCLIP_DICOM_HOST="127.0.0.1",
            PACSCLIP_DICOM_PORT=str(dicom_port),
            PACSCLIP_API_PORT=str(api_port),
            PACSCLIP_API_TOKEN=token,
            PACSCLIP_MIN_FREE_DISK_MB="0",
            PACSCLIP_LOG_LEVEL="WARNING",
            # A destination that refuses connections: the operations page shows dead letters.
            PACSCLIP_DESTINATIONS=json.dumps(
                [{"name": "pacs", "ae_title": "OFFLINE", "host": "127.0.0.1", "port": free_port()}]
            ),
            PACSCLIP_DISPATCH_MAX_RETRIES="0",
            PACSCLIP_VALIDATION_MIN_POSITIVES=str(VALIDATION_FLOOR),
            PACSCLIP_VALIDATION_MIN_NEGATIVES=str(VALIDATION_FLOOR),
        )
        log = (work / "serve.log").open("wb")
        serve = subprocess.Popen([PACSCLIP, "serve"], env=env, stdout=log, stderr=log)
        api = f"http://127.0.0.1:{api_port}"
        try:
            wait_until(
                lambda: echoscu("127.0.0.1", dicom_port, aec="PACSCLIP").returncode == 0,
                120,
                "pacsclip serve did not answer C-ECHO",
            )
            studies = write_studies(work)
            for _, path in studies:
                storescu([path], "127.0.0.1", dicom_port, aec="PACSCLIP")
            present: dict[str, int] = {}
            for uid, _ in studies:
                findings = wait_analysed(api, token, uid)["results"][0]["findings"]
                present[uid] = sum(f.get("decision") == "present" for f in findings)
            # The study page shown: a study with a prior, the one with more findings.
            with_prior = [studies[1][0], studies[4][0]]
            shoot(api, token, max(with_prior, key=lambda uid: present[uid]), args.out)

            demo = write_demo_studies(work / "demo", VALIDATION_STUDIES, SEED)
            storescu([demo.studies_dir], "127.0.0.1", dicom_port, aec="PACSCLIP")
            for folder in sorted(demo.studies_dir.iterdir()):
                wait_analysed(api, token, folder.name)
            subprocess.run(
                [PACSCLIP, "report", "import", str(demo.reports_csv)],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            shoot_validation(api, token, args.out)
        except TimeoutError:
            log.flush()
            print((work / "serve.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
            log.close()
    return 0


def wait_analysed(api: str, token: str, uid: str) -> dict[str, Any]:
    def analysed() -> dict[str, Any] | None:
        status, body = api_get(f"{api}/api/studies/{uid}", token)
        detail = json.loads(body) if status == 200 else {}
        return detail if detail.get("results") else None

    detail: dict[str, Any] = wait_until(analysed, 120, f"study {uid} was not analysed")
    return detail


def login(driver: Any, api: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{api}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_until(lambda: driver.find_elements(By.ID, "worklist-rows"), 30, "no worklist")


def images_loaded(driver: Any) -> bool:
    return bool(
        driver.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0);"
        )
    )


def shoot(api: str, token: str, study_uid: str, out: Path) -> None:

    driver = chromium(window=(1400, 900))
    try:
        login(driver, api, token)
        driver.save_screenshot(str(out / "dashboard-worklist.png"))
        driver.get(f"{api}/studies/{study_uid}")
        wait_until(lambda: images_loaded(driver), 30, "the study's images did not load")
        driver.set_window_size(1400, 1900)
        driver.save_screenshot(str(out / "dashboard-study.png"))
        driver.set_window_size(1400, 1300)
        driver.get(f"{api}/operations")
        driver.save_screenshot(str(out / "dashboard-operations.png"))
    finally:
        driver.quit()
    for name in ("worklist", "study", "operations"):
        print(out / f"dashboard-{name}.png")


def shoot_validation(api: str, token: str, out: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = chromium(window=(1400, 1250))
    try:
        login(driver, api, token)
        driver.get(f"{api}/validation")
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "section.site"), 60, "no site")
        wait_until(lambda: images_loaded(driver), 60, "the reliability plot did not load")
        driver.save_screenshot(str(out / "dashboard-validation.png"))
    finally:
        driver.quit()
    print(out / "dashboard-validation.png")


if __name__ == "__main__":
    sys.exit(main())
