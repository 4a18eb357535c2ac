"""Single sign-on in a real browser against a real OpenID Connect provider (npm's
oidc-provider, tests/peers/oidc.py) and ``pacsclip api`` as a process: a radiologist and a
PACS administrator (who is also the auditor) sign in through the provider and each sees and
does what the role table allows; a person whose groups map to no role is refused with a page
that says why; the access log answers who saw the patient; with the provider down, the sign-in
page says so. The machine token keeps working beside it."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.catalog.access_log import access_events
from plugin.settings import Settings
from tests.integration.test_serve import PACSCLIP, get, wait_until
from tests.peers.browser import browser_installed, headless
from tests.peers.dcmtk import stop_process
from tests.peers.oidc import OidcProvider, provider_installed
from tests.peers.ports import free_port
from tests.unit.test_dashboard import PATIENT_ID, TOKEN, World, build_world

if not browser_installed() or not provider_installed():
    pytest.skip(
        "needs Debian chromium and chromium-driver, node, and oidc-provider in "
        ".cache/oidc-provider (scripts/bootstrap installs them)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

PROVIDER = "Test Hospital IdP"


class Site:
    def __init__(self, api: str, idp: OidcProvider, world: World, log: Path) -> None:
        self.api, self.idp, self.world, self.log = api, idp, world, log


def healthy(api: str) -> bool:
    try:
        return get(f"{api}/api/health", None)[0] == 200
    except urllib.error.URLError:  # not listening yet
        return False


def start_api(world: World, api_port: int, issuer: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    env.update(
        PACSCLIP_DATA_DIR=str(world.settings.data_dir),
        PACSCLIP_API_HOST="127.0.0.1",
        PACSCLIP_API_PORT=str(api_port),
        PACSCLIP_API_TOKEN=TOKEN,
        PACSCLIP_API_TOKEN_ROLES=json.dumps(["pacs-admin"]),
        PACSCLIP_OIDC_ISSUER=issuer,
        PACSCLIP_OIDC_CLIENT_ID="pacsclip-dashboard",
        PACSCLIP_OIDC_CLIENT_SECRET="test-client-secret",
        PACSCLIP_OIDC_SCOPES="openid profile groups",
        PACSCLIP_OIDC_PROVIDER_NAME=PROVIDER,
        PACSCLIP_OIDC_TIMEOUT_S="2",
    )
    with log.open("wb") as out:
        process = subprocess.Popen([PACSCLIP, "api"], env=env, stdout=out, stderr=out)
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{api_port}"), 60, "no API health")
    except BaseException as exc:
        stop_process(process, timeout_s=15)  # never left running by a failed start
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"{exc}; api log:\n{log.read_text()[-4000:]}") from exc
        raise
    return process


@pytest.fixture
def site(tmp_path: Path, make_settings: Callable[..., Settings]) -> Iterator[Site]:
    world = build_world(make_settings(api_token=TOKEN))
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    idp = OidcProvider(f"{api}/auth/callback", tmp_path / "idp.log").start()
    log = tmp_path / "api.log"
    try:
        process = start_api(world, api_port, idp.issuer, log)
    except BaseException:
        idp.stop()
        raise
    try:
        yield Site(api, idp, world, log)
    finally:
        stop_process(process, timeout_s=15)
        idp.stop()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with headless() as driver:
        yield driver


def sign_in(driver: WebDriver, site: Site, login: str, *, start: str = "/") -> None:
    """From a page of pacsclip, through the provider's sign-in form, and back."""
    driver.delete_all_cookies()  # one host (127.0.0.1) for both: a new person, a new session
    driver.get(site.api + start)
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_elements(By.ID, "sso"))
    assert not driver.find_elements(By.ID, "token"), "the shared token form is off with SSO"
    driver.find_element(By.ID, "sso").click()
    wait.until(lambda d: d.find_elements(By.NAME, "login"))
    assert driver.current_url.startswith(site.idp.issuer)
    driver.find_element(By.NAME, "login").send_keys(login)
    driver.find_element(By.NAME, "password").send_keys("any password")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(
        lambda d: (
            d.current_url.startswith(site.api)
            and ("/auth/" not in d.current_url or d.find_elements(By.ID, "login-error"))
        )
    )


def text(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_each_person_signs_in_through_the_provider_and_sees_what_their_role_allows(
    site: Site, browser: WebDriver
) -> None:
    wait = WebDriverWait(browser, 20)

    # Rita, radiologist: the worklist and the study; not the operations page.
    sign_in(browser, site, "rita")
    wait.until(
        lambda d: d.find_elements(By.ID, "worklist-rows") or d.find_elements(By.ID, "worklist")
    )
    assert "Rita Reader" in browser.find_element(By.ID, "person").text
    assert "radiologist" in browser.find_element(By.ID, "person").text
    nav = browser.find_element(By.TAG_NAME, "nav").text
    assert "Worklist" in nav and "Operations" not in nav and "Access log" not in nav
    browser.get(f"{site.api}/studies/{site.world.study_uid}")
    wait.until(lambda d: "Nodule" in text(d))
    browser.get(f"{site.api}/operations")
    assert "This page needs the role ai-admin or pacs-admin" in text(browser)
    assert PROVIDER in text(browser) and "Dead letters" not in text(browser)
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait.until(lambda d: d.find_elements(By.ID, "login-notice"))
    browser.get(f"{site.api}/")
    assert "/login" in browser.current_url  # the session is gone

    # Paul, PACS administrator and auditor: lands on operations; no worklist, no site heads.
    sign_in(browser, site, "paul")
    assert browser.current_url.endswith("/operations")
    wait.until(lambda d: d.find_elements(By.ID, "dead-letters"))
    assert not browser.find_elements(By.ID, "sites")
    browser.find_element(By.CSS_SELECTOR, "tr.dead-letter button.retry").click()
    wait.until(lambda d: d.find_elements(By.ID, "notice"))
    assert "pending again" in browser.find_element(By.ID, "notice").text
    browser.get(f"{site.api}/")
    assert "needs the role radiologist" in text(browser)
    # ... and, as auditor, who saw the patient: Rita's view of the study.
    browser.get(f"{site.api}/access-log")
    browser.find_element(By.ID, "patient-id").send_keys(PATIENT_ID)
    browser.find_element(By.ID, "access-search-button").click()
    wait.until(lambda d: d.find_elements(By.ID, "access-query"))
    assert PATIENT_ID not in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.access-entry")
    # The study page, and the images it loaded (source and overlay), all by Rita.
    seen = [(r.get_attribute("data-action"), "Rita Reader" in r.text) for r in rows]
    assert seen[-1] == ("view_study", True)
    assert set(seen[:-1]) == {("view_image", True)}

    # Nora: signed in at the provider, but no group of hers maps to a role.
    sign_in(browser, site, "nora", start="/studies/" + site.world.study_uid)
    error = browser.find_element(By.ID, "login-error").text
    assert "none of your groups" in error and "pacsclip-radiologists (radiologist)" in error
    assert "Nodule" not in text(browser)

    with site.world.catalog.sessions() as session:
        logged = access_events(session, limit=200)
    by_whom = {(e["subject"], e["action"]) for e in logged}
    assert {
        ("rita", "login"),
        ("rita", "view_study"),
        ("rita", "denied"),
        ("rita", "logout"),
    } <= by_whom
    assert {("paul", "login"), ("paul", "retry_delivery"), ("paul", "search_access_log")} <= by_whom
    assert ("nora", "login_refused") in by_whom
    assert all(e["via"] == "oidc" for e in logged if e["subject"] in ("rita", "paul"))

    # The machine token still works beside single sign-on, with the role it was given.
    assert get(f"{site.api}/operations", TOKEN)[0] == 200
    assert get(f"{site.api}/api/studies", TOKEN)[0] == 403

    # The provider goes down: the sign-in page says so instead of failing somewhere else.
    site.idp.stop()
    browser.delete_all_cookies()
    browser.get(f"{site.api}/login")
    browser.find_element(By.ID, "sso").click()
    wait.until(lambda d: d.find_elements(By.ID, "login-error"))
    assert "Sign-in is unavailable" in text(browser) and "did not answer" in text(browser)
    assert "Traceback" not in site.log.read_text()


def test_a_provider_that_is_down_at_start_is_reported_and_sign_in_says_so(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    world = build_world(make_settings(api_token=TOKEN))
    api_port, dead = free_port(), free_port()
    log = tmp_path / "api.log"
    process = start_api(world, api_port, f"http://127.0.0.1:{dead}", log)
    try:
        status, body = get(f"http://127.0.0.1:{api_port}/auth/login", None)
    finally:
        stop_process(process, timeout_s=15)
    assert status == 503
    assert b"Sign-in is unavailable" in body and b"connection refused" in body
    started = log.read_text()
    assert (
        f"single sign-on: the identity provider at http://127.0.0.1:{dead} did not answer"
        in started
    )
    assert "Traceback" not in started
