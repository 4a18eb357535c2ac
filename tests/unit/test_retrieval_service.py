"""Similar-case retrieval over a real SQLite catalog: queries, filters, restart, rebuild, API.

The model is a stand-in (a manifest-like object and a keyword text encoder) so that the
expected neighbours are known exactly; the index, the catalog and the HTTP API are real.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from numpy.typing import NDArray

from plugin.api import create_app
from plugin.catalog.db import Catalog, open_catalog
from plugin.catalog.models import Analysis, ImageEmbedding, Series, Site, Study
from plugin.metrics import PacsclipMetrics
from plugin.retrieval.index import RetrievalError
from plugin.retrieval.service import Filters, NoTextTower, RetrievalService, UnknownStudy
from plugin.settings import Settings

DIM = 16
MODEL = SimpleNamespace(
    ref="demo@1",
    is_synthetic=True,
    manifest=SimpleNamespace(name="demo", version="1", embedding_dim=DIM),
)
OTHER_MODEL_REF = "demo@2"
TOKEN = "t0ken"


def unit(vector: NDArray[np.float64]) -> NDArray[np.float32]:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def axis(i: int, noise: float = 0.0, seed: int = 0) -> NDArray[np.float32]:
    vector = np.zeros(DIM)
    vector[i] = 1.0
    vector += noise * np.random.default_rng(seed).standard_normal(DIM)
    return unit(vector)


class KeywordEncoder:
    """Text -> the axis of the first keyword it names (effusion 0, pneumothorax 1, nodule 2)."""

    words = ("effusion", "pneumothorax", "nodule")

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> NDArray[np.float32]:
        self.calls += 1
        out = []
        for text in texts:
            hit = next((i for i, w in enumerate(self.words) if w in text.lower()), DIM - 1)
            out.append(axis(hit))
        return np.stack(out)


# (uid, patient, site, modality, date, image axis, effusion probability)
STUDIES = [
    ("1.2.1", "P1", "site-a", "CR", "20260101", 0, 0.9),
    ("1.2.2", "P1", "site-a", "CR", "20250101", 0, 0.8),  # P1's prior, same finding
    ("1.2.3", "P2", "site-b", "DX", "20260105", 0, 0.7),
    ("1.2.4", "P3", "site-a", "CR", "20260110", 1, 0.1),
    ("1.2.5", "P4", "site-b", "CR", "20260111", 2, 0.2),
    ("1.2.6", "P5", "site-a", "CR", "20260112", 0, 0.3),
]


def add_study(catalog: Catalog, row: tuple[Any, ...], model_ref: str = "demo@1") -> None:
    uid, patient, site_key, modality, date, image_axis, effusion = row
    with catalog.sessions.begin() as session:
        site = session.query(Site).filter_by(key=site_key).one_or_none() or Site(key=site_key)
        study = Study(
            study_instance_uid=uid,
            site=site,
            state="analysed",
            priority="routine",
            patient_id=patient,
            study_date=date,
            calling_ae_title="PACS",
            series=[Series(series_instance_uid=f"{uid}.1", modality=modality)],
        )
        session.add(study)
        session.flush()
        session.add(
            ImageEmbedding(
                sop_instance_uid=f"{uid}.1.1",
                study_id=study.id,
                site_id=study.site_id,
                model_ref=model_ref,
                dim=DIM,
                vector=axis(image_axis, 0.05, seed=hash(uid) % 1000).tobytes(),
            )
        )
        session.add(
            Analysis(
                study_id=study.id,
                generation=1,
                algorithm_name="demo",
                algorithm_version="1",
                synthetic=True,
                priority="routine",
                triggered_by=[],
                findings=[{"name": "pleural_effusion", "probability": effusion}],
            )
        )


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    catalog = open_catalog(f"sqlite:///{tmp_path}/catalog.sqlite3")
    for row in STUDIES:
        add_study(catalog, row)
    return catalog


def service(tmp_path: Path, catalog: Catalog, encoder: Any = None) -> RetrievalService:
    return RetrievalService(
        tmp_path / "data",
        catalog.sessions,
        lambda: MODEL,  # type: ignore[arg-type,return-value]
        lambda bundle: encoder,
    )


def uids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["study_instance_uid"] for row in rows]


def test_similar_finds_priors_and_other_patients(tmp_path: Path, catalog: Catalog) -> None:
    answer = service(tmp_path, catalog).similar("1.2.1", k=3)

    assert answer["model"]["name"] == "demo" and "not for clinical use" in answer["model"]["notice"]
    assert uids(answer["priors"]) == ["1.2.2"]
    # The other effusion-like images first; never the query study itself.
    assert set(uids(answer["similar"])[:2]) == {"1.2.3", "1.2.6"}
    assert "1.2.1" not in uids(answer["priors"]) + uids(answer["similar"])
    assert answer["priors"][0]["findings"] == {"pleural_effusion": 0.8}
    assert answer["priors"][0]["best_image"] == "1.2.2.1.1"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(site="site-b"), {"1.2.3", "1.2.5"}),
        (Filters(modality="dx"), {"1.2.3"}),
        (Filters(date_from="20260105", date_to="20260111"), {"1.2.3", "1.2.4", "1.2.5"}),
        (Filters(finding="pleural_effusion", threshold=0.5), {"1.2.2", "1.2.3"}),
        (
            Filters(finding="pleural_effusion", present=False, threshold=0.5),
            {"1.2.4", "1.2.5", "1.2.6"},
        ),
    ],
    ids=["site", "modality", "dates", "finding-present", "finding-absent"],
)
def test_filters_are_honoured(
    tmp_path: Path, catalog: Catalog, filters: Filters, expected: set[str]
) -> None:
    answer = service(tmp_path, catalog).similar("1.2.1", k=10, filters=filters)

    assert set(uids(answer["priors"]) + uids(answer["similar"])) == expected


def test_bad_filters_are_refused_with_what_to_fix() -> None:
    with pytest.raises(ValueError, match="YYYYMMDD"):
        Filters(date_from="2026-01-01")
    with pytest.raises(ValueError, match="between 0 and 1"):
        Filters(finding="nodule", threshold=2.0)


def test_text_search_ranks_matching_images_first(tmp_path: Path, catalog: Catalog) -> None:
    encoder = KeywordEncoder()
    answer = service(tmp_path, catalog, encoder).search("Left pleural effusion.", k=4)

    assert set(uids(answer["studies"])) == {"1.2.1", "1.2.2", "1.2.3", "1.2.6"}
    assert uids(service(tmp_path, catalog, encoder).search("pneumothorax", k=1)["studies"]) == [
        "1.2.4"
    ]


def test_reports_are_indexed_and_found_by_text_and_by_image(
    tmp_path: Path, catalog: Catalog
) -> None:
    retrieval = service(tmp_path, catalog, KeywordEncoder())
    first = retrieval.add_report("1.2.4", "Findings: small apical pneumothorax. No effusion.")
    again = retrieval.add_report("1.2.4", "Findings: small apical pneumothorax. No effusion.")
    retrieval.add_report("1.2.3", "Moderate right pleural effusion.")

    assert first["created"] and not again["created"] and first["report_id"] == again["report_id"]
    found = retrieval.search("pneumothorax", k=1)["reports"]
    assert [(r["study_instance_uid"], r["source"]) for r in found] == [("1.2.4", "api")]
    assert "apical pneumothorax" in found[0]["excerpt"]
    # image -> reports: an effusion image's nearest report is the effusion report.
    by_image = retrieval.similar("1.2.1", k=1)["reports"]
    assert uids(by_image) == ["1.2.3"]
    with pytest.raises(UnknownStudy):
        retrieval.add_report("9.9.9", "text")


def test_index_survives_restart_and_matches_rebuild(tmp_path: Path, catalog: Catalog) -> None:
    before = service(tmp_path, catalog).similar("1.2.1", k=5)
    service(tmp_path, catalog).store.sync(*_images())  # saved as a worker does

    restarted = service(tmp_path, catalog)
    rebuilt = service(tmp_path, catalog)
    counts = rebuilt.rebuild()

    assert restarted.similar("1.2.1", k=5) == before
    assert rebuilt.similar("1.2.1", k=5) == before
    assert counts["images"] == len(STUDIES) and counts["reports"] == 0
    assert (tmp_path / "data" / "retrieval" / "demo@1" / "images.index").is_file()


def test_rows_committed_after_the_snapshot_are_found(tmp_path: Path, catalog: Catalog) -> None:
    saved = service(tmp_path, catalog)
    saved.store.sync(*_images())
    add_study(catalog, ("1.2.7", "P6", "site-a", "CR", "20260120", 0, 0.95))

    # Both a process that had the index open and a fresh one see the new row.
    assert "1.2.7" in uids(saved.similar("1.2.1", k=10)["similar"])
    assert "1.2.7" in uids(service(tmp_path, catalog).similar("1.2.1", k=10)["similar"])


def test_other_model_versions_are_never_mixed_in(tmp_path: Path, catalog: Catalog) -> None:
    add_study(catalog, ("1.2.8", "P7", "site-a", "CR", "20260121", 0, 0.9), OTHER_MODEL_REF)

    answer = service(tmp_path, catalog).similar("1.2.1", k=10)
    other = service(tmp_path, catalog).similar("1.2.8", k=10)

    assert "1.2.8" not in uids(answer["similar"])
    assert other["similar"] == [] and "analyse it first" in other["note"]


def test_empty_catalog_answers_with_empty_results(tmp_path: Path) -> None:
    empty = open_catalog(f"sqlite:///{tmp_path}/empty.sqlite3")
    retrieval = service(tmp_path, empty, KeywordEncoder())

    assert retrieval.search("effusion")["studies"] == []
    assert retrieval.info()["images"]["count"] == 0
    with pytest.raises(UnknownStudy, match=r"no study 1\.2\.1"):
        retrieval.similar("1.2.1")


def test_model_without_text_tower_says_so(tmp_path: Path, catalog: Catalog) -> None:
    with pytest.raises(NoTextTower, match="no text tower"):
        service(tmp_path, catalog, encoder=None).search("effusion")
    with pytest.raises(RetrievalError, match="empty"):
        service(tmp_path, catalog, KeywordEncoder()).search("   ")


def test_api_routes_need_the_token_and_map_errors(tmp_path: Path, catalog: Catalog) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_token=TOKEN)
    retrieval = service(tmp_path, catalog, KeywordEncoder())
    app = create_app(settings, catalog.sessions, PacsclipMetrics(), retrieval=retrieval)
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    assert client.get("/api/studies/1.2.1/similar").status_code == 401
    similar = client.get("/api/studies/1.2.1/similar?site=site-a&k=5", headers=auth)
    assert similar.status_code == 200
    assert uids(similar.json()["priors"]) == ["1.2.2"]
    assert client.get("/api/studies/9.9/similar", headers=auth).status_code == 404
    assert client.get("/api/studies/1.2.1/similar?date_from=2026", headers=auth).status_code == 422
    posted = client.post(
        "/api/studies/1.2.5/reports",
        json={"text": "Solitary nodule, right upper lobe."},
        headers=auth,
    )
    assert posted.status_code == 201 and posted.json()["created"]
    found = client.get("/api/search", params={"q": "nodule", "k": 1}, headers=auth).json()
    assert uids(found["reports"]) == ["1.2.5"] and uids(found["studies"]) == ["1.2.5"]
    assert client.get("/api/index", headers=auth).json()["reports"]["count"] == 1


def _images() -> tuple[Any, str, int]:
    from plugin.retrieval.store import Kind

    return Kind.IMAGES, MODEL.ref, DIM


def test_demo_model_finds_findings_by_words(tmp_path: Path) -> None:
    """The built-in demo model end to end: its image tower's embeddings of held-out synthetic
    radiographs in the catalog, its text tower on the query, the real index in between."""
    from plugin.demo.phantom import FINDINGS
    from plugin.demo.train import model_inputs, onnx_embed, render_cases
    from plugin.models.projection import text_encoder
    from plugin.models.registry import resolve_bundle

    bundle = resolve_bundle(tmp_path / "empty-data-dir")
    assert bundle.is_synthetic
    cases = render_cases(240, seed=7, stream=2, size=bundle.manifest.image.size)
    embeddings = onnx_embed(
        bundle.path_of(bundle.manifest.files.image_tower), model_inputs(cases.images)
    )
    labels = cases.labels()
    catalog = open_catalog(f"sqlite:///{tmp_path}/catalog.sqlite3")
    with catalog.sessions.begin() as session:
        site = Site(key="demo")
        for i, vector in enumerate(embeddings):
            study = Study(
                study_instance_uid=f"2.25.{i}", site=site, state="analysed", calling_ae_title="X"
            )
            session.add(study)
            session.flush()
            session.add(
                ImageEmbedding(
                    sop_instance_uid=f"2.25.{i}.1",
                    study_id=study.id,
                    site_id=study.site_id,
                    model_ref=bundle.ref,
                    dim=int(vector.shape[0]),
                    vector=np.asarray(vector, dtype="<f4").tobytes(),
                )
            )
    retrieval = RetrievalService(
        tmp_path / "data", catalog.sessions, lambda: bundle, lambda b: text_encoder(b)
    )

    for finding, query in (
        ("pleural_effusion", "Large right pleural effusion."),
        ("pneumothorax", "There is a pneumothorax."),
    ):
        found = retrieval.search(query, k=20)["studies"]
        rows = [int(s["study_instance_uid"].rsplit(".", 1)[1]) for s in found]
        precision = labels[rows, FINDINGS.index(finding)].mean()
        prevalence = labels[:, FINDINGS.index(finding)].mean()
        assert precision >= 0.8 > prevalence + 0.3, (finding, precision, prevalence)
