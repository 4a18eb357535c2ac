"""A running worker follows the model registry: a newly activated model, shadow or site head
is loaded before the next study, without a restart; one that fails keeps the old one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.models.registry import REGISTRY_FILE, Registry
from plugin.settings import Settings
from plugin.triage.site_heads import FindingNetwork, SiteHead, SiteHeadRegistry
from tests.models_fixtures import TinyImageTower, build_bundle, export_image_tower
from worker.tasks import WorkerContext

TINY = "tiny-clip@1.0.0"


@pytest.fixture(scope="module")
def image_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_image_tower(TinyImageTower(), tmp_path_factory.mktemp("tower") / "tower.onnx")


@pytest.fixture
def bundle_dir(tmp_path: Path, image_onnx: Path) -> Path:
    return build_bundle(tmp_path / "src" / "tiny", image_onnx)


@pytest.fixture
def context(tmp_path: Path) -> WorkerContext:
    """A worker that started with the built-in demo live, as after ``pacsclip worker``."""
    context = WorkerContext(Settings(data_dir=tmp_path / "data", demo_model="live"))
    assert context.warm_up() is not None
    context.readiness.set_ready("consuming")
    return context


def test_a_newly_activated_model_analyses_the_next_study(
    context: WorkerContext, bundle_dir: Path
) -> None:
    demo = context.analyser
    assert demo.model.bundle.name == "pacsclip-demo"
    assert context.retrieval.bundle.name == "pacsclip-demo"

    context.refresh_models()
    assert context.analyser is demo  # the registry did not change: nothing is reloaded

    Registry.for_data_dir(context.settings.data_dir).install(bundle_dir, activate=True)
    context.refresh_models()

    assert context.live is not None and context.live.ref == TINY
    assert context.analyser.model.bundle.ref == TINY
    assert context.retrieval.bundle.ref == TINY  # search and the index follow the live model
    health = context.readiness.check()
    assert health.ready and health.reason == f"model {TINY} loaded and ran once"


def test_a_model_that_fails_to_load_leaves_the_old_one_analysing_and_says_so(
    context: WorkerContext, bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    demo = context.analyser
    data_dir = context.settings.data_dir
    registry = Registry.for_data_dir(data_dir)
    registry.install(bundle_dir)
    # The installed copy is damaged after it was checked, then made live by hand.
    tower = data_dir / "models" / "tiny-clip" / "1.0.0" / "image_tower.onnx"
    tower.write_bytes(tower.read_bytes()[:-1] + b"\0")
    state = json.loads((registry.root / REGISTRY_FILE).read_text())
    state["active"] = TINY
    (registry.root / ".registry.json.new").write_text(json.dumps(state))
    (registry.root / ".registry.json.new").replace(registry.root / REGISTRY_FILE)

    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        context.refresh_models()
        context.refresh_models()  # not tried again until the registry changes again

    assert context.analyser is demo
    health = context.readiness.check()
    assert not health.ready
    assert health.reason.startswith(f"model {TINY} failed to load: ")
    assert "image_tower.onnx" in health.reason
    assert health.reason.endswith(f"; still analysing with {demo.model.bundle.ref}")
    assert [r.getMessage() for r in caplog.records] == [
        f"model {TINY} not taken up; the model loaded before goes on"
    ]


def test_a_promoted_site_head_reaches_the_running_worker(context: WorkerContext) -> None:
    bundle = context.analyser.model.bundle
    assert context.analyser.model.site_heads == {}
    dim = bundle.manifest.embedding_dim
    network = FindingNetwork(np.zeros(dim), np.ones(dim), (), np.zeros(dim), 0.0)
    finding = bundle.findings[0].name
    heads = SiteHeadRegistry.for_data_dir(context.settings.data_dir, bundle.ref)
    entry = heads.add(
        SiteHead((finding,), (network,)),
        site="site-a",
        method="multi_dann",
        source_sites=["site-b"],
        fitted_on="test",
    )
    heads.activate("site-a", entry.version, {"passed": True})

    context.refresh_models()

    assert set(context.analyser.model.site_heads) == {"site-a"}
    assert context.readiness.check().ready


def test_search_in_the_api_follows_the_registry_too(tmp_path: Path, bundle_dir: Path) -> None:
    from plugin.catalog.db import open_catalog
    from plugin.retrieval.service import service_for

    settings = Settings(data_dir=tmp_path / "data")
    service = service_for(settings, open_catalog(settings.effective_database_url).sessions)
    assert service.bundle.name == "pacsclip-demo"

    Registry.for_data_dir(settings.data_dir).install(bundle_dir, activate=True)

    assert service.bundle.ref == TINY
    assert service.model["name"] == "tiny-clip"
