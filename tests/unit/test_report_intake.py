"""Reports that arrive as SRs from the PACS: their text is found, stored and searchable."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from plugin.catalog.db import open_catalog
from plugin.catalog.models import Instance, Series, Site, Study
from plugin.retrieval.sr_text import is_foreign_report, report_text
from plugin.settings import Settings
from worker.tasks import WorkerContext


def item(value_type: str, meaning: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.RelationshipType = "CONTAINS"
    ds.ValueType = value_type
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121071", "DCM", meaning
    ds.ConceptNameCodeSequence = [code]
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def radiologist_sr(study_uid: str, manufacturer: str = "RIS vendor") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.Manufacturer = manufacturer
    ds.ValueType = "CONTAINER"
    findings = item("CONTAINER", "Findings")
    findings.ContentSequence = [
        item("TEXT", "Finding", TextValue="Large right  pneumothorax\nwith mediastinal shift."),
    ]
    ds.ContentSequence = [
        findings,
        item("TEXT", "Impression", TextValue="Tension pneumothorax."),
        item("TEXT", "Comparison", TextValue=""),
    ]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_text_items_come_out_under_their_headings() -> None:
    ds = radiologist_sr("1.2.3")

    assert report_text(ds) == (
        "Findings: Large right pneumothorax with mediastinal shift.\n"
        "Impression: Tension pneumothorax."
    )
    assert is_foreign_report(ds)
    assert not is_foreign_report(radiologist_sr("1.2.3", manufacturer="pacsclip"))


def test_worker_stores_and_indexes_a_report_that_came_with_the_study(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    catalog = open_catalog(settings.effective_database_url)
    study_uid = generate_uid()
    sr = radiologist_sr(study_uid)
    relative = f"{study_uid}/{sr.SeriesInstanceUID}/{sr.SOPInstanceUID}.dcm"
    (settings.spool_dir / relative).parent.mkdir(parents=True)
    sr.save_as(settings.spool_dir / relative, enforce_file_format=True)
    ours = radiologist_sr(study_uid, manufacturer="pacsclip")
    ours_relative = f"{study_uid}/{ours.SeriesInstanceUID}/{ours.SOPInstanceUID}.dcm"
    (settings.spool_dir / ours_relative).parent.mkdir(parents=True)
    ours.save_as(settings.spool_dir / ours_relative, enforce_file_format=True)
    with catalog.sessions.begin() as session:
        session.add(
            Study(
                study_instance_uid=study_uid,
                site=Site(key="a"),
                state="analysed",
                calling_ae_title="PACS",
                series=[
                    Series(
                        series_instance_uid=ds.SeriesInstanceUID,
                        modality="SR",
                        instances=[
                            Instance(
                                sop_instance_uid=ds.SOPInstanceUID,
                                sop_class_uid=BasicTextSRStorage,
                                transfer_syntax_uid=ExplicitVRLittleEndian,
                                path=path,
                                size_bytes=1,
                                sha256="0" * 64,
                                calling_ae_title="PACS",
                            )
                        ],
                    )
                    for ds, path in ((sr, relative), (ours, ours_relative))
                ],
            )
        )
    context = WorkerContext(settings)

    context.keep_reports(study_uid)
    context.keep_reports(study_uid)  # a redelivered task stores nothing twice

    found = context.retrieval.search("pneumothorax", k=5)
    assert [r["study_instance_uid"] for r in found["reports"]] == [study_uid]
    assert found["reports"][0]["source"] == "sr"
    assert "Tension pneumothorax" in found["reports"][0]["excerpt"]
    assert context.retrieval.info()["reports"]["count"] == 1
