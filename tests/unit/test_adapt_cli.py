"""Site-adapted triage heads (train, promote, runtime) and per-site drift, over a real catalog.

The catalog is an SQLite file built by the project's migrations in the data directory, with
synthetic embeddings of the built-in demo bundle (128-d) for three sites: A and B from one
distribution, C shifted. "consolidation" follows one linear rule of the unshifted features at
every site, so a head adapted to C can be validated there. Nothing here is clinical.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from plugin.adaptation import TrainConfig
from plugin.adaptation.drift import site_drift
from plugin.adaptation.triage_heads import compare_heads, fit_site_head, read_image_labels
from plugin.api import create_app
from plugin.catalog.db import open_catalog
from plugin.catalog.models import ImageEmbedding, Site, Study
from plugin.cli.main import app
from plugin.demo.radiographs import demo_radiographs
from plugin.demo.train import STREAM_EVAL
from plugin.inference import TriageModel
from plugin.metrics import PacsclipMetrics
from plugin.models.bundle import Bundle
from plugin.models.registry import resolve_bundle
from plugin.settings import Settings
from plugin.triage.site_heads import SiteHeadRegistry
from worker.tasks import WorkerContext

SITES = ("A|Hospital A", "B|Hospital B", "C|Hospital C")
FINDING = "consolidation"
PER_SITE = 160
DIM = 128
TOKEN = "adapt-token"
runner = CliRunner()


@dataclass(frozen=True)
class World:
    data_dir: Path
    bundle: Bundle
    sources_csv: Path  # labels of sites A and B
    flipped_csv: Path  # the same images with every label inverted
    validation_csv: Path  # labels of site C
    vectors: dict[str, np.ndarray]


def _labels_csv(path: Path, uids: list[str], labels: np.ndarray) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sop_instance_uid", FINDING])
        writer.writerows([uid, int(y)] for uid, y in zip(uids, labels, strict=True))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("adapt")
    data_dir = root / "data"
    bundle = resolve_bundle(data_dir)  # the built-in demo bundle
    rng = np.random.default_rng(7)
    rule = rng.normal(size=DIM)
    shift = np.zeros(DIM)
    shift[:8] = 1.5
    catalog = open_catalog(f"sqlite:///{data_dir / 'catalog.sqlite3'}")
    uids: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray] = {}
    vectors: dict[str, np.ndarray] = {}
    with catalog.sessions.begin() as session:
        for index, key in enumerate(SITES):
            x = rng.normal(size=(PER_SITE, DIM))
            labels[key] = (x @ rule + rng.normal(scale=2.0, size=PER_SITE) > 0).astype(int)
            vectors[key] = (x + shift if key.startswith("C") else x).astype(np.float32)
            site = Site(key=key)
            session.add(site)
            session.flush()
            uids[key] = [f"1.2.826.0.1.3680043.8.498.{index + 1}.{i + 1}" for i in range(PER_SITE)]
            for uid, vector in zip(uids[key], vectors[key], strict=True):
                study = Study(
                    study_instance_uid=f"{uid}.0",
                    site=site,
                    state="analysed",
                    calling_ae_title="MODALITY",
                )
                session.add(
                    ImageEmbedding(
                        sop_instance_uid=uid,
                        study=study,
                        site_id=site.id,
                        model_ref=bundle.ref,
                        dim=DIM,
                        vector=vector.astype("<f4").tobytes(),
                    )
                )
    source_uids = uids[SITES[0]] + uids[SITES[1]]
    source_labels = np.concatenate([labels[SITES[0]], labels[SITES[1]]])
    return World(
        data_dir,
        bundle,
        _labels_csv(root / "sources.csv", source_uids, source_labels),
        _labels_csv(root / "flipped.csv", source_uids, 1 - source_labels),
        _labels_csv(root / "validation.csv", uids[SITES[2]], labels[SITES[2]]),
        vectors,
    )


def _cli(world: World, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(
        app, ["--data-dir", str(world.data_dir), "--log-level", "WARNING", "adapt", *args]
    )
    return result.exit_code, result.stdout, result.stderr


def _registry(world: World) -> SiteHeadRegistry:
    return SiteHeadRegistry.for_data_dir(world.data_dir, world.bundle.ref)


# --------------------------------------------------------------------------- drift


def test_drift_is_chance_for_one_distribution_and_high_for_a_shifted_site() -> None:
    rng = np.random.default_rng(0)
    same = rng.normal(size=(600, 16))
    shifted = np.vstack([same[:300], rng.normal(size=(300, 16)) + np.r_[np.ones(4), np.zeros(12)]])
    sites = np.repeat(["north", "south"], 300)

    twins = {d.site: d.auroc for d in site_drift(same, sites)}
    apart = {d.site: d.auroc for d in site_drift(shifted, sites)}

    assert all(abs(a - 0.5) < 0.08 for a in twins.values()), twins
    assert all(a > 0.8 for a in apart.values()), apart


def test_cli_drift_flags_the_shifted_site(world: World) -> None:
    code, out, err = _cli(world, "drift", "--json")

    assert code == 0, err
    document = json.loads(out)
    figures = {row["site"]: row["auroc"] for row in document["sites"]}
    assert document["model_ref"] == world.bundle.ref
    assert figures[SITES[2]] > 0.8
    assert figures[SITES[0]] < figures[SITES[2]] and figures[SITES[1]] < figures[SITES[2]]


def test_api_drift_behind_the_token(world: World) -> None:
    settings = Settings(data_dir=world.data_dir, api_token=TOKEN)
    catalog = open_catalog(settings.effective_database_url)
    client = TestClient(create_app(settings, catalog.sessions, PacsclipMetrics()))

    refused = client.get("/api/sites/drift")
    answered = client.get("/api/sites/drift", headers={"Authorization": f"Bearer {TOKEN}"})

    assert refused.status_code == 401
    assert answered.status_code == 200
    assert {row["site"] for row in answered.json()["sites"]} == set(SITES)


# --------------------------------------------------------------------------- heads


def test_train_promote_refuse_force(world: World) -> None:
    target = SITES[2]
    code, out, err = _cli(
        world, "triage", "--target-site", target, "--labels", str(world.sources_csv)
    )
    assert code == 0, err
    assert "stored, not active" in out
    assert [(e.version, e.site, e.method) for e in _registry(world).entries()] == [
        (1, target, "multi-dann")
    ]
    assert _registry(world).active() == {}

    # Better than the demo's zero-shot scores, which know nothing of these vectors.
    code, out, err = _cli(
        world, "promote", "--site", target, "--head", "1", "--labels", str(world.validation_csv)
    )
    assert code == 0, err
    assert "now active" in out
    assert _registry(world).active() == {target: 1}
    # A worker started now scores that site's studies with the promoted head.
    worker = WorkerContext(Settings(data_dir=world.data_dir))
    assert {site: v for site, (v, _) in worker.analyser.model.site_heads.items()} == {target: 1}
    first = _registry(world).entry(1).validation
    assert first is not None and first["findings"][0]["candidate_auroc"] > 0.8

    # Trained on inverted labels: worse than the site's current head, so refused.
    code, _, err = _cli(
        world, "triage", "--target-site", target, "--labels", str(world.flipped_csv)
    )
    assert code == 0, err
    code, out, err = _cli(
        world, "promote", "--site", target, "--head", "2", "--labels", str(world.validation_csv)
    )
    assert code == 1
    assert "not activated" in err
    assert _registry(world).active() == {target: 1}

    code, out, err = _cli(
        world,
        "promote",
        "--site",
        target,
        "--head",
        "2",
        "--labels",
        str(world.validation_csv),
        "--force",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["activated"] is True
    assert _registry(world).active() == {target: 2}
    second = _registry(world).entry(2).validation
    assert second is not None and second["forced"] is True and second["replaced"] == 1


def test_promote_checks_the_site_and_triage_checks_inputs(world: World, tmp_path: Path) -> None:
    code, _, err = _cli(world, "triage", "--target-site", "Z|Nowhere", "--labels", "x.csv")
    assert code == 2 and "no embeddings of site 'Z|Nowhere'" in err

    bad = tmp_path / "bad.csv"
    bad.write_text("path,consolidation\na.dcm,1\n")
    code, _, err = _cli(world, "triage", "--target-site", SITES[2], "--labels", str(bad))
    assert code == 2 and "sop_instance_uid" in err

    code, _, err = _cli(
        world, "triage", "--target-site", SITES[2], "--labels", str(bad), "--method", "mixed"
    )
    assert code == 2 and "--method" in err


def test_compare_heads_needs_both_classes_to_validate() -> None:
    labels = np.array([[1.0], [0.0], [1.0], [0.0]])
    good, bad = [0.9, 0.1, 0.8, 0.2], [0.1, 0.9, 0.2, 0.8]

    assert compare_heads(labels, {"f": good}, {"f": bad}).not_worse
    assert not compare_heads(labels, {"f": bad}, {"f": good}).not_worse
    one_class = np.array([[1.0], [1.0], [np.nan], [1.0]])
    assert not compare_heads(one_class, {"f": good}, {"f": good}).not_worse


def test_study_level_labels_apply_to_each_image(tmp_path: Path) -> None:
    path = tmp_path / "studies.csv"
    path.write_text("study_instance_uid,consolidation,cardiomegaly\n1.2.3,1,\n1.2.4,0,1\n")
    labels = read_image_labels(path, ["consolidation", "cardiomegaly"])

    aligned = labels.align(["a", "b", "c"], ["1.2.3", "1.2.4", "1.2.3"])
    np.testing.assert_array_equal(aligned, [[1.0, np.nan], [0.0, 1.0], [1.0, np.nan]])


# --------------------------------------------------------------------------- runtime


def test_runtime_uses_the_promoted_head_for_its_site_only(world: World) -> None:
    site, version = SITES[2], 7
    sources = np.concatenate([world.vectors[SITES[0]], world.vectors[SITES[1]]])
    labels = np.concatenate([np.arange(2 * PER_SITE) % 2, np.full(PER_SITE, np.nan)])[:, None]
    head = fit_site_head(
        np.vstack([sources, world.vectors[site]]),
        np.repeat(SITES, PER_SITE),
        labels,
        [FINDING],
        site,
        config=TrainConfig(epochs=2),
    )
    model = TriageModel(world.bundle, site_heads={site: (version, head)})
    plain = TriageModel(world.bundle)
    vectors = world.vectors[site][:20]
    column = model.finding_names.index(FINDING)

    at_site, elsewhere = model.scores(vectors, site), model.scores(vectors, SITES[0])
    np.testing.assert_allclose(at_site[:, column], head.predict_proba(vectors)[:, 0])
    np.testing.assert_array_equal(elsewhere, plain.scores(vectors))
    others = [j for j in range(len(model.finding_names)) if j != column]
    np.testing.assert_array_equal(at_site[:, others], elsewhere[:, others])

    # A phantom of the demo generator: the demo model scores it (a real image it would not).
    study = list(demo_radiographs(1, seed=0, stream=STREAM_EVAL, size=128))
    report = model.triage(study, saliency=False, site=site)
    assert report.scored
    assert report.site_head == f"site-head-v{version}"
    assert report.as_dict()["algorithm"]["site_head"] == f"site-head-v{version}"
    assert model.triage(study, saliency=False, site=SITES[0]).site_head is None
