"""No live model (``demo_model = "shadow"``, the deploy examples): the built-in demo scores
every study in shadow, nothing is built or sent, studies end ``shadow_only``, and they are
analysed for real once a model is made live on purpose."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Analysis, DispatchJob, ResultObject, Study
from plugin.cli.main import app
from plugin.demo.studies import write_demo_studies
from plugin.models.registry import Registry, live_bundle, resolve_bundle
from plugin.settings import Settings
from tests.catalog_fixtures import arrive

DEMO_SHADOW = {"PACSCLIP_DEMO_MODEL": "shadow"}


def studies(tmp_path: Path, count: int = 4) -> Path:
    write_demo_studies(tmp_path / "demo", count=count, seed=3)
    return tmp_path / "demo" / "studies"


def cli(data: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, list(args), env={"PACSCLIP_DATA_DIR": str(data), **(env or {})}
    )
    return result.exit_code, result.output


def test_the_registry_has_no_live_model_and_the_demo_in_shadow(tmp_path: Path) -> None:
    demo = resolve_bundle(tmp_path).ref

    in_shadow = Registry.for_data_dir(tmp_path, demo="shadow")
    default = Registry.for_data_dir(tmp_path)

    assert in_shadow.live() is None and in_shadow.live_ref() is None
    assert [(s.ref, s.site) for s in in_shadow.shadows()] == [(demo, None)]
    assert live_bundle(tmp_path, demo="shadow") is None
    assert default.live_ref() == demo and default.shadows() == []
    assert [e.active for e in in_shadow.list() if e.ref == demo] == [False]
    assert [e.active for e in default.list() if e.ref == demo] == [True]


def test_model_list_marks_the_demo_as_shadow_at_every_site(tmp_path: Path) -> None:
    demo = resolve_bundle(tmp_path).ref

    code, out = cli(tmp_path, "model", "list", env=DEMO_SHADOW)
    assert code == 0, out
    line = next(line for line in out.splitlines() if demo in line)
    assert "shadow@*" in line and not line.startswith("*")

    code, out = cli(tmp_path, "model", "list")
    line = next(line for line in out.splitlines() if demo in line)
    assert line.startswith("*") and "shadow" not in line


def test_studies_end_shadow_only_with_nothing_built_or_sent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, demo_model="shadow")
    demo = resolve_bundle(data)

    arrive(settings, studies(tmp_path))

    catalog = open_catalog(settings.effective_database_url)
    with catalog.sessions() as session:
        states = set(session.scalars(select(Study.state)))
        roles = {(a.algorithm_version, a.role) for a in session.scalars(select(Analysis))}
        objects = session.scalars(select(ResultObject)).all()
        jobs = session.scalars(select(DispatchJob)).all()
    assert states == {"shadow_only"}
    assert roles == {(demo.version, "shadow")}
    assert objects == [] and jobs == []
    assert not (data / "results").exists() or not any((data / "results").rglob("*.dcm"))

    code, out = cli(data, "validate", "--json", env=DEMO_SHADOW)
    assert code == 0, out
    answer = json.loads(out)
    assert answer["live_model"] is None


def test_requeue_after_a_model_goes_live_analyses_them_for_real(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, demo_model="shadow")
    demo = resolve_bundle(data)
    arrive(settings, studies(tmp_path, count=2))

    code, out = cli(data, "studies", "requeue", "--state", "delivered", env=DEMO_SHADOW)
    assert (code, out.strip()) == (0, "0 studies queued for analysis")
    code, out = cli(data, "studies", "requeue", "1.2.3.4", env=DEMO_SHADOW)
    assert code == 1 and "no study 1.2.3.4" in out

    code, out = cli(
        data,
        "model",
        "promote",
        demo.name,
        demo.version,
        "--force",
        "--reason",
        "test site",
        env=DEMO_SHADOW,
    )
    assert code == 0, out
    assert Registry.for_data_dir(data, demo="shadow").live_ref() == demo.ref
    code, out = cli(data, "studies", "requeue", "--state", "shadow_only", env=DEMO_SHADOW)
    assert (code, out.strip()) == (0, "2 studies queued for analysis")

    catalog = open_catalog(settings.effective_database_url)
    with catalog.sessions() as session:
        queued = session.scalars(select(Study.study_instance_uid).where(Study.state == "queued"))
        uids = list(queued)
    assert len(uids) == 2
    from worker.tasks import WorkerContext

    context = WorkerContext(settings)
    for uid in uids:
        context.analyser.analyse(uid, 1)
    with catalog.sessions() as session:
        states = set(session.scalars(select(Study.state)))
        live = session.scalars(select(Analysis).where(Analysis.role == "live")).all()
        shadow = session.scalars(select(Analysis).where(Analysis.role == "shadow")).all()
    assert states == {"analysed"}  # no destination configured: nothing to deliver
    assert len(live) == 2 and {a.algorithm_version for a in live} == {demo.version}
    assert shadow == []  # the live runs replaced the demo's shadow records
    code, out = cli(data, "studies", "requeue", uids[0], env=DEMO_SHADOW)
    assert code == 1 and "only shadow_only and failed" in out
