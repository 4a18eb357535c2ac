"""The triage pipeline end to end on a tiny exported tower: DICOM in, ranked findings out."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

from plugin.analysis import StudyAnalyser
from plugin.catalog.db import open_catalog
from plugin.cli.main import app
from plugin.disclaimers import NOT_FOR_CLINICAL_USE
from plugin.imaging import ImageSpec, dataset_input
from plugin.inference import AI_NOTICE, TriageModel
from plugin.models.bundle import SYNTHETIC_NOTICE, load_bundle
from plugin.models.bundle_writer import pin_file
from plugin.models.runtime import ImageEncoder
from plugin.settings import load_settings
from tests.models_fixtures import (
    FINDINGS,
    TinyImageTower,
    build_bundle,
    edit_manifest,
    export_image_tower,
)


def radiograph(pixels: np.ndarray, path: Path) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A bundle whose effusion prompts are the embeddings of two known images."""
    root = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    tower = export_image_tower(TinyImageTower(), root / "tower.onnx")
    bundle_dir = build_bundle(root / "bundle", tower)
    yy, xx = np.mgrid[0:96, 0:80] / 96.0
    positive = radiograph(np.clip(0.2 + 0.8 * (xx < 0.35), 0, 1), root / "positive.dcm")
    negative = radiograph(np.clip(0.1 + 0.9 * yy, 0, 1), root / "negative.dcm")

    bundle = load_bundle(bundle_dir)
    spec = ImageSpec.from_manifest(bundle.manifest.image.model_dump())
    encoder = ImageEncoder(bundle, threads=1)
    pos, neg = encoder.encode(np.stack([dataset_input(d, spec) for d in (positive, negative)]))
    arrays = dict(np.load(bundle_dir / "prompt_embeddings.npz"))
    arrays["pleural_effusion/positive"] = pos[None]
    arrays["pleural_effusion/negative"] = neg[None]
    with (bundle_dir / "prompt_embeddings.npz").open("wb") as f:
        np.savez(f, **arrays)
    files = json.loads((bundle_dir / "bundle.json").read_text())["files"]
    files["prompt_embeddings"] = pin_file(bundle_dir, "prompt_embeddings.npz").model_dump()
    edit_manifest(bundle_dir, files=files)
    return bundle_dir, root / "positive.dcm", root / "negative.dcm"


def test_the_image_matching_the_positive_prompts_scores_high(
    study: tuple[Path, Path, Path],
) -> None:
    from pydicom import dcmread

    bundle_dir, positive, negative = study
    model = TriageModel(load_bundle(bundle_dir), threads=1)

    high = model.triage([dcmread(positive)])
    low = model.triage([dcmread(negative)])

    effusion_high = next(f for f in high.findings if f.name == "pleural_effusion")
    effusion_low = next(f for f in low.findings if f.name == "pleural_effusion")
    assert effusion_high.probability > 0.9 > 0.1 > effusion_low.probability
    assert effusion_high.decision == "present"
    assert effusion_low.decision == "absent"
    assert [f.name for f in high.findings] == [f["name"] for f in FINDINGS]
    assert high.embeddings.shape == (1, 16)


def test_a_study_pools_its_images_and_names_the_image_that_scored(
    study: tuple[Path, Path, Path],
) -> None:
    from pydicom import dcmread

    bundle_dir, positive, negative = study
    model = TriageModel(load_bundle(bundle_dir), threads=1)
    pos, neg = dcmread(positive), dcmread(negative)

    report = model.triage([neg, pos])

    effusion = next(f for f in report.findings if f.name == "pleural_effusion")
    assert effusion.probability > 0.9
    assert effusion.source_sop_instance_uid == pos.SOPInstanceUID
    assert sorted(report.images) == sorted([pos.SOPInstanceUID, neg.SOPInstanceUID])


def test_saliency_maps_are_at_image_size(study: tuple[Path, Path, Path]) -> None:
    from pydicom import dcmread

    bundle_dir, positive, _ = study
    model = TriageModel(load_bundle(bundle_dir), threads=1)

    report = model.triage([dcmread(positive)])

    shown = {s.finding: s for s in report.saliency}
    assert "pleural_effusion" in shown
    heatmap = shown["pleural_effusion"].heatmap
    assert heatmap.shape == (96, 80)
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0


def test_triage_reports_its_step_times_and_keeps_the_decoded_images(
    study: tuple[Path, Path, Path],
) -> None:
    from pydicom import dcmread

    bundle_dir, positive, _ = study
    model = TriageModel(load_bundle(bundle_dir), threads=1)
    ds = dcmread(positive)

    report = model.triage([ds])

    assert set(report.timings) == {"decode", "inference", "saliency"}
    assert all(seconds >= 0 for seconds in report.timings.values())
    # The overlay reuses the image the model saw instead of decoding it again.
    np.testing.assert_array_equal(report.displays[str(ds.SOPInstanceUID)], model.display(ds))
    assert "displays" not in report.as_dict()


def test_triage_cli_prints_findings_with_algorithm_and_notices(
    study: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    bundle_dir, positive, _ = study

    result = CliRunner().invoke(
        app,
        [
            "--data-dir",
            str(tmp_path),
            "triage",
            str(positive),
            "--bundle",
            str(bundle_dir),
            "--json",
            "--threads",
            "1",
        ],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["algorithm"] == {"name": "tiny-clip", "version": "1.0.0", "synthetic": True}
    assert report["notices"] == [AI_NOTICE, SYNTHETIC_NOTICE]
    effusion = next(f for f in report["findings"] if f["name"] == "pleural_effusion")
    assert effusion["decision"] == "present"


@pytest.mark.parametrize(("card_says", "notices"), [(True, 2), (False, 1)])
def test_a_real_bundle_not_for_clinical_use_says_so_in_every_result(
    study: tuple[Path, Path, Path], tmp_path: Path, card_says: bool, notices: int
) -> None:
    bundle_dir, positive, _ = study
    real = Path(shutil.copytree(bundle_dir, tmp_path / "real"))
    card = json.loads((real / "bundle.json").read_text())["model_card"]
    edit_manifest(real, synthetic=False, model_card={**card, "not_for_clinical_use": card_says})
    model = TriageModel(load_bundle(real), threads=1)

    report = model.triage([dcmread(positive)])
    analyser = StudyAnalyser(
        load_settings(data_dir=tmp_path / "data"),
        open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}"),
        model,
    )

    expected = [AI_NOTICE, NOT_FOR_CLINICAL_USE][:notices]
    assert report.notices == expected
    assert report.as_dict()["notices"] == expected
    # The SR, overlays and SEG show what AlgorithmIdentity.disclaimers() gives.
    assert list(analyser.algorithm.disclaimers()) == expected
    assert SYNTHETIC_NOTICE not in report.notices


def test_triage_cli_without_any_bundle_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, study: tuple[Path, Path, Path]
) -> None:
    monkeypatch.setattr("plugin.models.registry.builtin_bundle_dirs", lambda: [])

    result = CliRunner().invoke(app, ["--data-dir", str(tmp_path), "triage", str(study[1])])

    assert result.exit_code == 2
    assert "pacsclip model install" in result.output


@pytest.fixture
def labelled(study: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy of the bundle and a labels CSV of 12 noisy variants of the two images."""
    import shutil

    bundle_dir = shutil.copytree(study[0], tmp_path / "bundle")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:96, 0:80] / 96.0
    rows = ["path,pleural_effusion,pneumothorax"]
    for i in range(12):
        present = i % 2 == 0
        base = 0.2 + 0.8 * (xx < 0.35) if present else 0.1 + 0.9 * yy
        image = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        radiograph(image, tmp_path / f"img{i}.dcm")
        rows.append(f"img{i}.dcm,{int(present)},{'' if i < 2 else 0}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return bundle_dir, tmp_path / "labels.csv"


def test_calibrate_fits_labelled_findings_and_keeps_the_bundle_valid(
    labelled: tuple[Path, Path],
) -> None:
    from plugin.bundle_tuning import calibrate
    from plugin.errors import ConfigError

    bundle_dir, labels = labelled
    with pytest.raises(ConfigError, match=r"finding pneumothorax: .* at least one positive"):
        calibrate(bundle_dir, labels, threads=1)  # that column has no positive
    labels.write_text(re.sub(r",[^,]*$", "", labels.read_text(), flags=re.MULTILINE))

    fitted = calibrate(bundle_dir, labels, threads=1)

    manifest = load_bundle(bundle_dir).manifest  # checksums still verify
    effusion = next(f for f in manifest.findings if f.name == "pleural_effusion")
    untouched = next(f for f in manifest.findings if f.name == "pneumothorax")
    assert effusion.calibration.fitted_on is not None
    assert "labels.csv (10 images, 2 held out" in effusion.calibration.fitted_on
    assert untouched.calibration.fitted_on is None
    assert list(fitted.change.evaluation["findings"]) == ["pleural_effusion"]
    assert fitted.change.evaluation["findings"]["pleural_effusion"]["heldout"]["images"] == 2

    calibrate(bundle_dir, labels, holdout=0.0, threads=1)  # no held-out share: fit on all 12
    effusion = load_bundle(bundle_dir).manifest.findings[0]
    assert effusion.calibration.fitted_on is not None
    assert "labels.csv (12 images, 0 held out" in effusion.calibration.fitted_on


def test_fit_head_stores_a_versioned_head_that_triage_then_uses(
    labelled: tuple[Path, Path],
) -> None:
    from pydicom import dcmread

    from plugin.bundle_tuning import fit_head

    bundle_dir, labels = labelled
    # A head needs every label, positives and negatives: keep the effusion column only.
    labels.write_text(re.sub(r",[^,]*$", "", labels.read_text(), flags=re.MULTILINE))

    first = fit_head(bundle_dir, labels, kind="linear_probe", threads=1).head
    second = fit_head(bundle_dir, labels, kind="linear_probe", threads=1).head

    assert (first.version, second.version) == (1, 2)
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest.active_head == "linear_probe-v2"
    assert (bundle_dir / "heads" / "linear_probe-v2.npz").is_file()
    model = TriageModel(bundle, threads=1)
    assert model.head is not None
    positive, negative = (dcmread(labels.parent / f"img{i}.dcm") for i in (0, 1))
    high = model.triage([positive], saliency=False).findings[0]
    low = model.triage([negative], saliency=False).findings[0]
    assert high.name == "pleural_effusion"
    assert high.raw_probability > low.raw_probability
    embeds = model.encoder.encode(np.stack([dataset_input(positive, model.spec)]))
    assert high.raw_probability == pytest.approx(float(model.head.predict_proba(embeds)[0, 0]))


def test_labels_csv_errors_say_what_to_fix(labelled: tuple[Path, Path]) -> None:
    from plugin.bundle_tuning import fit_head, read_labels
    from plugin.errors import ConfigError

    bundle_dir, labels = labelled
    bad = labels.with_name("bad.csv")
    bad.write_text("path,effusion\nimg0.dcm,1\n")
    with pytest.raises(ConfigError, match="not findings of the bundle"):
        read_labels(bad, ["pleural_effusion"])
    bad.write_text("path,pleural_effusion\nimg0.dcm,yes\n")
    with pytest.raises(ConfigError, match="line 2, column pleural_effusion"):
        read_labels(bad, ["pleural_effusion"])
    with pytest.raises(ConfigError, match="every finding column labelled"):
        fit_head(bundle_dir, labels, kind="linear_probe", threads=1)
    labels.write_text(re.sub(r",$", ",0", labels.read_text(), flags=re.MULTILINE))
    with pytest.raises(ConfigError, match="finding 'pneumothorax' needs at least one positive"):
        fit_head(bundle_dir, labels, kind="linear_probe", threads=1)


def test_the_built_in_demo_model_does_not_score_a_real_radiograph(tmp_path: Path) -> None:
    from tests.peers.data import rg1

    def triage(*options: str) -> dict[str, Any]:
        result = CliRunner().invoke(
            app,
            ["--data-dir", str(tmp_path), "triage", str(rg1("uncompressed")), "--json", *options],
        )
        assert result.exit_code == 0, result.output
        report: dict[str, Any] = json.loads(result.output[result.output.index("{") :])
        assert report["algorithm"]["name"] == "pacsclip-demo"
        assert report["algorithm"]["synthetic"] is True
        assert report["notices"] == [AI_NOTICE, SYNTHETIC_NOTICE]
        return report

    # The synthetic demo model has never seen a real radiograph: it asserts nothing on one.
    report = triage("--no-saliency")
    assert report["ood"]["status"] == "out_of_distribution"
    assert (report["findings"], report["priority"], report["saliency"]) == ([], "not_scored", [])

    unguarded = triage("--no-saliency", "--no-ood-guard")
    assert unguarded["ood"] is None
    assert {f["name"] for f in unguarded["findings"]} >= {"pleural_effusion", "pneumothorax"}


def test_only_findings_not_absent_get_maps_and_present_ones_get_outlines(
    study: tuple[Path, Path, Path],
) -> None:
    from pydicom import dcmread

    bundle_dir, positive, negative = study
    model = TriageModel(load_bundle(bundle_dir), threads=1)

    report = model.triage([dcmread(positive)])
    quiet = model.triage([dcmread(negative)])

    decisions = {f.name: f.decision for f in report.findings}
    shown = {s.finding: s for s in report.saliency}
    assert set(shown) == {name for name, d in decisions.items() if d != "absent"}
    effusion = shown["pleural_effusion"]
    assert effusion.method == "occlusion"
    assert effusion.outlines and effusion.region == effusion.outlines[0].box()
    # The positive image's left band (columns below 34) is what makes it an effusion.
    assert effusion.peak[1] < 34 and effusion.region[3] < 34
    assert all(
        s.finding in {f.name for f in quiet.findings if f.decision != "absent"}
        for s in quiet.saliency
    )


def test_an_image_too_large_for_a_map_keeps_its_scores(
    study: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydicom import dcmread

    from plugin import inference

    bundle_dir, positive, _ = study
    model = TriageModel(load_bundle(bundle_dir), threads=1)
    monkeypatch.setattr(inference, "MAX_MAP_PIXELS", 96 * 80 - 1)

    report = model.triage([dcmread(positive)])

    assert report.saliency == []
    effusion = next(f for f in report.findings if f.name == "pleural_effusion")
    assert effusion.decision == "present"


def test_findings_carry_their_code_and_what_scored_them(
    study: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import shutil

    from pydicom import dcmread

    from plugin.results import FindingCode

    bundle_dir, positive, _ = study
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    findings = json.loads((copy / "bundle.json").read_text())["findings"]
    declared = {"value": "C0034067", "scheme": "UMLS", "meaning": "Effusion (site-declared)"}
    for finding in findings:
        if finding["name"] == "pleural_effusion":
            finding["code"] = declared
    edit_manifest(copy, findings=findings)
    model = TriageModel(load_bundle(copy), threads=1)

    report = model.triage([dcmread(positive)])

    by_name = {f.name: f for f in report.findings}
    assert by_name["pleural_effusion"].code == FindingCode(**declared)
    # No code declared: the default for the name, from the lexicon.
    assert by_name["pneumothorax"].code == FindingCode("36118008", "SCT", "Pneumothorax")
    assert by_name["pleural_effusion"].scored_by == "zero-shot prompts; not calibrated"
    # The JSON output (pacsclip triage --json) carries the code as an object.
    assert json.loads(json.dumps(report.as_dict()))["findings"][0]["code"] == declared
