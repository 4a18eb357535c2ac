"""Site heads go live through the go-live gate on the site's own report labels: a head that
separates the site's findings is allowed, one that does worse than the site's current scores
is refused and changes nothing, and an override is kept in the audit log with its reason."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sqlalchemy import select
from typer.testing import CliRunner

from plugin.catalog.db import open_catalog
from plugin.catalog.embeddings import load_embeddings
from plugin.catalog.models import AuditEvent, Site
from plugin.cli.main import app
from plugin.demo.studies import write_demo_studies
from plugin.models.registry import resolve_bundle
from plugin.settings import Settings
from plugin.triage.site_heads import FindingNetwork, SiteHead, SiteHeadRegistry
from tests.catalog_fixtures import arrive

pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

FLOORS = {"PACSCLIP_VALIDATION_MIN_POSITIVES": "5", "PACSCLIP_VALIDATION_MIN_NEGATIVES": "5"}
FINDINGS = ("pneumothorax", "nodule")


@pytest.fixture(scope="module")
def site_with_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """40 demo studies scored by the live demo model, their reports imported and labeled."""
    root = tmp_path_factory.mktemp("head-gate")
    demo = write_demo_studies(root / "demo", count=40, seed=5)
    data = root / "data"
    arrive(Settings(data_dir=data), demo.studies_dir)
    code, out = cli(data, "report", "import", str(demo.reports_csv))
    assert code == 0, out
    with open_catalog(Settings(data_dir=data).effective_database_url).sessions() as session:
        (site,) = session.scalars(select(Site.key)).all()
    return data, site, demo.truth_csv


def cli(data: Path, *args: str) -> tuple[int, str]:
    env = {"PACSCLIP_DATA_DIR": str(data), **FLOORS}
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


def fitted_head(data: Path, truth_csv: Path, sign: float) -> SiteHead:
    """Logistic regression per finding on the stored embeddings and the generator's truth;
    ``sign`` -1 turns it into a head that ranks the findings backwards."""
    truth = {row["study_uid"]: row for row in csv.DictReader(truth_csv.open())}
    bundle = resolve_bundle(data)
    with open_catalog(Settings(data_dir=data).effective_database_url).sessions() as session:
        stored = load_embeddings(session, bundle.ref)
    x = stored.vectors.astype(np.float64)
    networks = []
    for finding in FINDINGS:
        y = np.array([truth[uid][finding] == "1" for uid in stored.study_instance_uids])
        model = LogisticRegression(C=10.0, max_iter=2000).fit(x, y)
        networks.append(
            FindingNetwork(
                mean=np.zeros(x.shape[1]),
                scale=np.ones(x.shape[1]),
                layers=(),
                out_weight=sign * model.coef_[0],
                out_bias=float(sign * model.intercept_[0]),
            )
        )
    return SiteHead(FINDINGS, tuple(networks))


def add_head(data: Path, site: str, head: SiteHead) -> int:
    registry = SiteHeadRegistry.for_data_dir(data, resolve_bundle(data).ref)
    entry = registry.add(head, site=site, method="test", source_sites=[site], fitted_on="truth")
    return entry.version


def active(data: Path) -> dict[str, int]:
    return SiteHeadRegistry.for_data_dir(data, resolve_bundle(data).ref).active()


def audit_details(data: Path) -> list[tuple[str, str]]:
    with open_catalog(Settings(data_dir=data).effective_database_url).sessions() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        return [(r.event, r.detail or "") for r in rows if r.event.startswith("golive")]


def test_a_worse_head_is_refused_and_the_site_keeps_its_scores(
    site_with_reports: tuple[Path, str, Path],
) -> None:
    data, site, truth = site_with_reports
    backwards = add_head(data, site, fitted_head(data, truth, sign=-1.0))

    code, out = cli(data, "adapt", "promote", "--site", site, "--head", str(backwards))

    assert code == 2, out
    assert f"site head {backwards} may not go live at {site}" in out
    assert "below the floor" in out and "worse than the live model" in out
    assert active(data) == {}
    assert audit_details(data)[-1][0] == "golive_refused"

    code, out = cli(data, "adapt", "promote", "--site", site, "--head", str(backwards), "--force")
    assert code == 2 and "--force needs --reason" in out


def test_a_better_head_goes_live_and_an_override_is_audited(
    site_with_reports: tuple[Path, str, Path],
) -> None:
    data, site, truth = site_with_reports
    good = add_head(data, site, fitted_head(data, truth, sign=1.0))

    code, out = cli(data, "adapt", "promote", "--site", site, "--head", str(good), "--json")

    assert code == 0, out
    answer = json.loads(out)
    assert answer["gate"]["allowed"] and answer["activated"] and not answer["forced"]
    candidate = next(
        m for m in answer["validation"]["sites"][0]["models"] if m["model"] == answer["candidate"]
    )
    assert set(FINDINGS) <= set(candidate["findings"])
    assert all(candidate["findings"][name]["auroc"] >= 0.9 for name in FINDINGS)
    assert active(data) == {site: good}

    worse = add_head(data, site, fitted_head(data, truth, sign=-1.0))
    code, out = cli(
        data,
        "adapt",
        "promote",
        "--site",
        site,
        "--head",
        str(worse),
        "--force",
        "--reason",
        "vendor support case 12",
    )
    assert code == 0, out
    assert active(data) == {site: worse}
    event, detail = audit_details(data)[-1]
    assert event == "golive_forced" and "vendor support case 12" in detail
    assert f"site-head-v{good}" in detail  # it replaced the head that was live

    code, out = cli(data, "audit", "list", "--event", "golive_forced", "--event", "golive")
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 2  # newest first: the override, then the head that passed
    assert "golive_forced" in lines[0] and "vendor support case 12" in lines[0]
    assert "golive " in lines[1] and "every check passed" in lines[1]


def test_the_operations_page_says_why_a_head_may_not_go_live(
    site_with_reports: tuple[Path, str, Path],
) -> None:
    from fastapi.testclient import TestClient

    from plugin.api import create_app
    from plugin.catalog import repository
    from plugin.dashboard import mount_dashboard
    from plugin.metrics import PacsclipMetrics
    from plugin.retrieval.service import service_for
    from tests.unit.test_dashboard import TOKEN, login

    data, site, truth = site_with_reports
    settings = Settings(
        data_dir=data, api_token=TOKEN, validation_min_positives=5, validation_min_negatives=5
    )
    catalog = open_catalog(settings.effective_database_url)
    metrics = PacsclipMetrics()
    api = create_app(settings, catalog.sessions, metrics, results_for=repository.results_for)
    retrieval = service_for(settings, catalog.sessions)
    mount_dashboard(api, settings, catalog.sessions, metrics, retrieval=retrieval)
    client = TestClient(api)
    csrf = login(client)
    backwards = add_head(data, site, fitted_head(data, truth, sign=-1.0))
    before = active(data)
    form = {"csrf_token": csrf, "site": site, "head": str(backwards)}

    refused = client.post("/operations/site-heads/promote", data=form)
    no_reason = client.post("/operations/site-heads/promote", data={**form, "force": "true"})

    assert refused.status_code == 200, refused.text[-2000:]
    assert "not activated" in refused.text and "Why it may not go live" in refused.text
    assert "below the floor" in refused.text
    assert no_reason.status_code == 422 and "needs a reason" in no_reason.text
    assert active(data) == before
