"""The revisit risk model: train, store, load, score; its CLI and HTTP route.

A 3-site, 300-encounter synthetic cohort (seed 0: ER02 has 16 revisits, ER03 11, ER01 1), with
concepts extracted once per module (medspacy, about 4 s) and few epochs, to stay fast.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from plugin.adaptation import TrainConfig, auroc
from plugin.api import create_app
from plugin.catalog.db import open_catalog
from plugin.cli.main import app
from plugin.metrics import PacsclipMetrics
from plugin.revisit.cohort import CohortFileError, synth_cohort, write_cohort_csv
from plugin.revisit.encounters import Encounters, read_encounters
from plugin.revisit.features import MEDSPACY_INSTALL, FeatureSpec, NoteConcepts, RevisitError
from plugin.revisit.risk_model import (
    ALGORITHM_NAME,
    MANIFEST_FILE,
    STATE_FILE,
    ModelNotFound,
    ModelStore,
    RevisitModel,
    fit_revisit_model,
    load_artefact,
    score_encounters,
)
from plugin.settings import Settings

pytest.importorskip("medspacy", reason="medspacy is not installed (scripts/bootstrap)")

TARGET = "ER02"
TOKEN = "revisit-token"
runner = CliRunner()


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cohort") / "encounters.csv"
    write_cohort_csv(path, synth_cohort(0, n_sites=3, n_encounters=300))
    return path


@pytest.fixture(scope="module")
def encounters(cohort_csv: Path) -> Encounters:
    return read_encounters(cohort_csv, require_labels=True)


@pytest.fixture(scope="module")
def documents(encounters: Encounters) -> list[frozenset[str]]:
    return NoteConcepts().documents(encounters.notes)


@pytest.fixture(scope="module")
def trained(encounters: Encounters, documents: list[frozenset[str]]) -> RevisitModel:
    spec = FeatureSpec.fit(documents, [], k=1001)
    return fit_revisit_model(
        encounters, documents, TARGET, "multi-dann", features=spec, config=TrainConfig(epochs=15)
    )


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_multi_dann_ranks_the_target_sites_revisits_without_its_labels(
    encounters: Encounters, documents: list[frozenset[str]], trained: RevisitModel
) -> None:
    risks = score_encounters(trained, encounters, documents)
    target = np.array(encounters.sites) == TARGET

    assert encounters.labels is not None
    assert [r.encounter_id for r in risks] == list(encounters.ids)
    assert all(0.0 <= r.risk <= 1.0 for r in risks)
    assert auroc(encounters.labels[target], [r.risk for r in risks if r.site == TARGET]) > 0.65
    # The target's outcomes were never used, so none are recorded with the model.
    assert "revisits" not in trained.training["sites"][TARGET]
    assert trained.training["sites"]["ER03"] == {"encounters": 91, "revisits": 11}


def test_artefact_round_trip_gives_identical_scores(
    tmp_path: Path, encounters: Encounters, documents: list[frozenset[str]], trained: RevisitModel
) -> None:
    store = ModelStore(tmp_path / "models")
    first, second = store.save(trained), store.save(trained)
    loaded = store.load()
    X = trained.features.matrix(documents, encounters)

    assert (first.version, second.version, loaded.version) == ("1", "2", "2")
    np.testing.assert_array_equal(loaded.predict(X), trained.predict(X))
    manifest = json.loads((store.path("v1") / MANIFEST_FILE).read_text())
    assert manifest["algorithm"] == {"name": ALGORITHM_NAME, "version": "1"}
    assert (manifest["method"], manifest["target_site"]) == ("multi-dann", TARGET)
    assert manifest["architecture"]["n_domain_heads"] == 2  # one per source site
    assert manifest["features"]["names"] == list(trained.features.vocabulary.codes)
    assert manifest["training"]["software"]["torch"]


def test_a_damaged_artefact_is_refused(tmp_path: Path, trained: RevisitModel) -> None:
    store = ModelStore(tmp_path / "models")
    store.save(trained)
    state = store.path() / STATE_FILE
    state.write_bytes(state.read_bytes()[:-8] + b"XXXXXXXX")

    with pytest.raises(RevisitError, match="checksum"):
        load_artefact(store.path())


def test_no_model_yet_and_unknown_version_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="revisit train"):
        ModelStore(tmp_path / "none").load()


def test_missing_columns_are_named(tmp_path: Path, cohort_csv: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "revisit_7d"} for r in _rows(cohort_csv)[:3]]
    path = _write(tmp_path / "no-label.csv", rows)

    with pytest.raises(CohortFileError, match=r"missing column.*revisit_7d"):
        read_encounters(path, require_labels=True)
    assert len(read_encounters(path, require_labels=False)) == 3  # enough to score


def test_bad_values_name_line_and_column(tmp_path: Path, cohort_csv: Path) -> None:
    rows = _rows(cohort_csv)[:3]
    rows[1]["revisit_7d"] = "yes"
    with pytest.raises(CohortFileError, match="line 3: revisit_7d"):
        read_encounters(_write(tmp_path / "bad.csv", rows), require_labels=True)
    rows[1] = {**rows[1], "revisit_7d": "0"}
    rows = [{**r, "triage_consolidation": "0.2"} for r in rows]
    rows[2]["triage_consolidation"] = "1.7"
    with pytest.raises(CohortFileError, match="line 4: triage_consolidation"):
        read_encounters(_write(tmp_path / "bad-triage.csv", rows), require_labels=True)


def test_linked_triage_scores_become_features(
    tmp_path: Path, cohort_csv: Path, encounters: Encounters, documents: list[frozenset[str]]
) -> None:
    rows = _rows(cohort_csv)
    for i, row in enumerate(rows):
        row["triage_pneumothorax"] = "" if i % 2 else f"{(i % 10) / 10:.1f}"
    with_triage = read_encounters(_write(tmp_path / "t.csv", rows), require_labels=True)
    spec = FeatureSpec.fit(documents, list(with_triage.triage), k=1001)
    X = spec.matrix(documents, with_triage)

    assert spec.names[-2:] == ["triage_pneumothorax", "triage:linked"]
    np.testing.assert_array_equal(X[:4, -2:], [[0.0, 1.0], [0.0, 0.0], [0.2, 1.0], [0.0, 0.0]])
    with pytest.raises(RevisitError, match="triage_pneumothorax"):
        spec.matrix(documents, encounters)  # a file without the column the model uses


def test_without_medspacy_the_error_gives_the_install_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry makes `import medspacy` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "medspacy", None)

    with pytest.raises(RevisitError) as raised:
        NoteConcepts()
    assert MEDSPACY_INSTALL in str(raised.value)
    assert "pip install --no-deps medspacy==1.3.1 PyRuSH==1.0.13" in MEDSPACY_INSTALL


def test_cli_synth_train_score(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"]
    cohort = tmp_path / "e.csv"
    synth = runner.invoke(
        app, ["revisit", "synth", "--out", str(cohort), "--sites", "3", "--encounters", "240"]
    )
    assert synth.exit_code == 0, synth.output
    assert "Synthetic data" in synth.output and "nothing" in synth.output
    assert len(_rows(cohort)) == 240

    no_model = runner.invoke(app, [*data, "revisit", "score", "--encounters", str(cohort)])
    assert no_model.exit_code == 2
    assert "no revisit model is trained yet" in no_model.output

    unknown = runner.invoke(
        app, [*data, "revisit", "train", "--encounters", str(cohort), "--target-site", "ER99"]
    )
    assert unknown.exit_code == 2 and "ER99" in unknown.output and "ER01" in unknown.output

    train = runner.invoke(
        app,
        [
            *data,
            *("revisit", "train", "--encounters", str(cohort), "--target-site", "ER02"),
            *("--method", "single-dann", "--epochs", "3", "--json"),
        ],
    )
    assert train.exit_code == 0, train.output
    summary = json.loads(train.stdout)
    assert (summary["version"], summary["method"], summary["target_site"]) == (
        "1",
        "single-dann",
        "ER02",
    )
    assert summary["source_sites"] == ["ER01", "ER03"]

    to_score = _write(
        tmp_path / "s.csv",
        [
            {"encounter_id": r["encounter_id"], "note_text": r["note_text"]}
            for r in _rows(cohort)[:5]
        ],
    )
    score = runner.invoke(app, [*data, "revisit", "score", "--encounters", str(to_score), "--json"])
    assert score.exit_code == 0, score.output
    document = json.loads(score.stdout)
    assert document["algorithm"]["name"] == ALGORITHM_NAME
    assert document["algorithm"]["version"] == "1"
    assert document["notices"] == ["AI result - not for diagnosis"]
    assert [r["encounter_id"] for r in document["risks"]] == [f"ER01-{i:05d}" for i in range(1, 6)]


def test_cli_train_with_a_bad_file_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.csv", [{"id": "1", "text": "cough"}])
    result = runner.invoke(
        app,
        [
            *("--data-dir", str(tmp_path), "revisit", "train", "--encounters", str(bad)),
            *("--target-site", "ER01"),
        ],
    )

    assert result.exit_code == 2
    assert "missing column(s) encounter_id, site, note_text, revisit_7d" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_eval_json_writes_the_report(tmp_path: Path, cohort_csv: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            *("--data-dir", str(tmp_path / "data"), "--log-level", "WARNING", "revisit", "eval"),
            *("--encounters", str(cohort_csv), "--methods", "source-only,multi-dann"),
            *("--seeds", "1", "--epochs", "2", "--bootstrap", "20", "--target-site", TARGET),
            *("--out", str(out), "--json"),
        ],
    )

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["methods"] == ["source-only", "multi-dann"]
    assert document["target_sites"] == [TARGET]
    assert {s["method"] for s in document["summary"]} == {"source-only", "multi-dann"}
    assert document["report"] == str(out / "report.html")
    assert "multi-dann" in (out / "report.html").read_text()
    assert (out / "roc.png").stat().st_size > 1000
    assert (out / "reliability.png").stat().st_size > 1000


def test_api_scores_encounters_behind_the_token(
    tmp_path: Path, encounters: Encounters, trained: RevisitModel
) -> None:
    ModelStore.for_data_dir(tmp_path).save(trained)
    settings = Settings(data_dir=tmp_path, api_token=TOKEN)
    catalog = open_catalog(f"sqlite:///{tmp_path}/c.sqlite3")
    client = TestClient(create_app(settings, catalog.sessions, PacsclipMetrics()))
    body = [
        {"encounter_id": "E1", "site": TARGET, "note_text": encounters.notes[0]},
        {"encounter_id": "E2", "note_text": encounters.notes[1]},
    ]

    refused = client.post("/api/revisit/score", json=body)
    scored = client.post(
        "/api/revisit/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    unknown = client.post(
        "/api/revisit/score",
        json=[{**body[0], "age": 40}],
        headers={"Authorization": f"Bearer {TOKEN}"},
    )

    assert refused.status_code == 401
    assert scored.status_code == 200, scored.text
    document = scored.json()
    assert document["algorithm"]["version"] == "1"
    assert document["algorithm"]["method"] == "multi-dann"
    assert [r["encounter_id"] for r in document["risks"]] == ["E1", "E2"]
    assert 0.0 < document["risks"][0]["risk"] < 1.0
    assert unknown.status_code == 422


def test_encounter_linked_to_a_study_joins_its_results_and_flags_the_worklist(
    tmp_path: Path, encounters: Encounters, documents: list[frozenset[str]]
) -> None:
    from plugin.catalog.models import Analysis, Site, Study

    # A model that uses the pneumothorax triage score of the linked study.
    rows = _rows(Path(encounters.source))
    for i, row in enumerate(rows):
        row["triage_pneumothorax"] = f"{(i % 10) / 10:.1f}"
    with_triage = read_encounters(_write(tmp_path / "t.csv", rows), require_labels=True)
    spec = FeatureSpec.fit(documents, list(with_triage.triage), k=1001)
    model = fit_revisit_model(
        with_triage, documents, TARGET, "source-only", features=spec, config=TrainConfig(epochs=3)
    )
    ModelStore.for_data_dir(tmp_path).save(model)
    catalog = open_catalog(f"sqlite:///{tmp_path}/c.sqlite3")
    with catalog.sessions.begin() as session:
        site = Site(key="er")
        for uid, pneumothorax in (("1.2.1", 0.9), ("1.2.2", 0.1), ("1.2.3", None)):
            study = Study(study_instance_uid=uid, site=site, state="analysed", calling_ae_title="X")
            session.add(study)
            session.flush()
            if pneumothorax is not None:
                session.add(
                    Analysis(
                        study_id=study.id,
                        generation=1,
                        algorithm_name="demo",
                        algorithm_version="1",
                        synthetic=True,
                        priority="routine",
                        triggered_by=[],
                        findings=[{"name": "pneumothorax", "probability": pneumothorax}],
                    )
                )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    note = encounters.notes[0]
    # The threshold sits between the two studies' risks so that exactly one is flagged.
    probe = Settings(data_dir=tmp_path, api_token=TOKEN, revisit_flag_threshold=1.0)
    client = TestClient(create_app(probe, catalog.sessions, PacsclipMetrics()))
    risks = {
        uid: client.post(
            f"/api/studies/{uid}/encounters",
            json={"encounter_id": "E1", "note_text": note},
            headers=auth,
        ).json()["risk"]
        for uid in ("1.2.1", "1.2.2")
    }
    assert risks["1.2.1"] != risks["1.2.2"]  # the study's own triage score is a feature
    threshold = (risks["1.2.1"] + risks["1.2.2"]) / 2
    settings = Settings(data_dir=tmp_path, api_token=TOKEN, revisit_flag_threshold=threshold)
    client = TestClient(create_app(settings, catalog.sessions, PacsclipMetrics()))

    stored = [
        client.post(
            f"/api/studies/{uid}/encounters",
            json={"encounter_id": "E1", "note_text": note},
            headers=auth,
        )
        for uid in ("1.2.1", "1.2.2")
    ]

    assert [r.status_code for r in stored] == [201, 201]
    assert stored[0].json()["triage_linked"] == ["pneumothorax"]
    assert stored[0].json()["algorithm"]["name"] == ALGORITHM_NAME
    higher = max(risks, key=lambda uid: risks[uid])
    flagged = client.get("/api/studies?revisit_flagged=true", headers=auth).json()
    assert [s["study_instance_uid"] for s in flagged] == [higher]
    detail = client.get(f"/api/studies/{higher}", headers=auth).json()
    # Posted twice (probe, then real threshold): one stored score per encounter and model.
    [revisit] = detail["revisit"]
    assert revisit["flagged"] and revisit["encounter_id"] == "E1"
    assert revisit["risk"] == pytest.approx(risks[higher], abs=1e-4)
    assert "not for diagnosis" in revisit["notices"][0].lower()
    # A study with no analysis lacks the score the model uses: a clear 422, nothing stored.
    missing = client.post(
        "/api/studies/1.2.3/encounters",
        json={"encounter_id": "E1", "note_text": note},
        headers=auth,
    )
    assert missing.status_code == 422 and "triage_pneumothorax" in missing.text
    unknown = client.post(
        "/api/studies/9.9/encounters", json={"encounter_id": "E1", "note_text": note}, headers=auth
    )
    assert unknown.status_code == 404
