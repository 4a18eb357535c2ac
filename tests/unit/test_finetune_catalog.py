"""Fine-tuning pairs from the catalog: every image of each reported study with its report text;
report SRs and unreported studies are left out, and the run installs an inactive bundle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Instance, Series, Site, Study, StudyReport
from plugin.finetune.adapters import AdapterConfig
from plugin.finetune.job import FinetuneRequest, catalog_pairs, run_finetune
from plugin.models.registry import Registry
from tests.finetune_fixtures import REPORTS, build_tiny_parent, write_pairs


def _instance(uid: str, sop_class: str, path: str) -> Instance:
    return Instance(
        sop_instance_uid=uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        path=path,
        size_bytes=1,
        sha256="0" * 64,
        calling_ae_title="MODALITY",
    )


def test_pairs_come_from_reported_studies(tmp_path: Path, make_settings: Any) -> None:
    settings = make_settings()
    pictures = tmp_path / "pictures"
    write_pairs(pictures, 13)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    with open_catalog(settings.effective_database_url).sessions() as session:
        site = Site(key="demo")
        for i in range(13):
            uid = f"2.25.{i + 1}"
            shutil.copyfile(pictures / f"{i}.png", settings.spool_dir / f"{i}.png")
            series = Series(series_instance_uid=f"{uid}.1", modality="CR")
            series.instances = [
                _instance(f"{uid}.1.1", SecondaryCaptureImageStorage, f"{i}.png"),
                _instance(f"{uid}.1.2", BasicTextSRStorage, f"{i}-report.dcm"),
            ]
            study = Study(
                study_instance_uid=uid,
                site=site,
                state="analysed",
                calling_ae_title="MODALITY",
                series=[series],
            )
            session.add(study)
            session.flush()
            if i < 12:  # the last study has no report
                source = "hl7" if i % 2 else "api"
                session.add(
                    StudyReport(
                        study_id=study.id, source=source, digest=str(i), text=REPORTS[i % 4]
                    )
                )
        session.commit()

    pairs = catalog_pairs(settings)
    assert len(pairs) == 12
    assert pairs.description == "12 image-report pairs from 12 catalog studies (reports: api, hl7)"
    assert {p.image.name for p in pairs.pairs} == {f"{i}.png" for i in range(12)}
    assert pairs.pairs[1].report == REPORTS[1]

    parent = build_tiny_parent(tmp_path / "parent")
    request = FinetuneRequest(
        parent=str(parent), version="2.0.0", adapter=AdapterConfig(rank=4, epochs=5)
    )
    outcome = run_finetune(settings, request)
    registry = Registry.for_data_dir(settings.data_dir)
    assert outcome.ref == "tiny-clip@2.0.0" and registry.active() is None
    lineage = registry.info("tiny-clip", "2.0.0").manifest.lineage
    assert lineage is not None and lineage.pairs == 12
    assert "catalog studies" in lineage.data
