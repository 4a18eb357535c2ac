"""``pacsclip demo studies``: synthetic DICOM studies, their reports and their ground truth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.demo import reports as rp
from plugin.demo.phantom import FINDINGS
from plugin.demo.sites import SHIFTED_SITE, SITES
from plugin.demo.studies import SENTENCE_BANK_SEED

runner = CliRunner()
COUNT = 6
SEED = 3


def demo(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--log-level", "WARNING", "demo", "studies", *args])
    return result.exit_code, result.stdout, result.stderr


def write(out: Path, *args: str, seed: int = SEED) -> Path:
    code, stdout, stderr = demo(
        "--out", str(out), "--count", str(COUNT), "--seed", str(seed), *args
    )
    assert code == 0, stdout + stderr
    return out


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("demo") / "base")


def test_studies_are_dicom_files_named_by_their_uids(base: Path) -> None:
    paths = sorted((base / "studies").glob("*/*.dcm"))
    assert len(paths) == COUNT
    accessions = set()
    for path in paths:
        ds = dcmread(path)
        assert path.parent.name == ds.StudyInstanceUID
        assert path.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.InstitutionName == SITES[0].name
        assert ds.PatientName == "Synthetic^Demo"
        assert ds.PatientID.startswith("DEMO-")
        assert "synthetic demo - not for clinical use" in ds.StudyDescription
        assert ds.StudyDate == "20240101"
        assert len(ds.AccessionNumber) <= 16
        accessions.add(ds.AccessionNumber)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert ds.pixel_array.max() > ds.pixel_array.min()
    assert len(accessions) == COUNT
    readme = (base / "README.txt").read_text()
    assert "not patient data" in readme and "storescu" in readme
    assert "pacsclip report import reports.csv" in readme


def test_reports_and_truth_rows_match_the_studies(base: Path) -> None:
    study_uids = sorted(p.name for p in (base / "studies").iterdir())
    reports, truth = rows(base / "reports.csv"), rows(base / "truth.csv")
    assert list(reports[0]) == ["study_uid", "text"]
    assert list(truth[0]) == ["study_uid", "accession", "site", *FINDINGS]
    assert sorted(r["study_uid"] for r in reports) == study_uids
    assert [r["study_uid"] for r in truth] == [r["study_uid"] for r in reports]
    by_uid = {dcmread(p).StudyInstanceUID: dcmread(p) for p in (base / "studies").glob("*/*.dcm")}
    for row in truth:
        assert row["accession"] == by_uid[row["study_uid"]].AccessionNumber
        assert row["site"] == SITES[0].name
        assert {row[name] for name in FINDINGS} <= {"0", "1"}


def test_reports_say_what_the_truth_says_in_held_out_phrasings(base: Path) -> None:
    bank = {s.text: s for s in rp.build_sentence_bank(SENTENCE_BANK_SEED).select()}
    truth = {r["study_uid"]: r for r in rows(base / "truth.csv")}
    positives_checked = 0
    for report in rows(base / "reports.csv"):
        labels = truth[report["study_uid"]]
        sentences = [bank[text] for text in rp.split_sentences(report["text"])]
        assert all(s.split == rp.HELDOUT for s in sentences)
        mentioned = set()
        for sentence in sentences:
            if sentence.polarity == rp.POSITIVE:
                assert labels[sentence.findings[0]] == "1", (report["text"], labels)
                mentioned.add(sentence.findings[0])
                positives_checked += 1
            else:
                assert all(labels[name] == "0" for name in sentence.findings), report["text"]
        assert mentioned == {name for name in FINDINGS if labels[name] == "1"}
    assert positives_checked > 0


def test_same_seed_same_bytes_other_seed_other_uids(base: Path, tmp_path: Path) -> None:
    again = write(tmp_path / "again")
    assert files(again) == files(base)
    other = write(tmp_path / "other", seed=SEED + 1)
    assert not {p.name for p in (other / "studies").iterdir()} & {
        p.name for p in (base / "studies").iterdir()
    }


def test_shift_changes_pixels_and_site_not_truth_or_reports(base: Path, tmp_path: Path) -> None:
    shifted = write(tmp_path / "shifted", "--shift", SHIFTED_SITE.name)
    base_truth, shifted_truth = rows(base / "truth.csv"), rows(shifted / "truth.csv")
    assert [[r[n] for n in FINDINGS] for r in shifted_truth] == [
        [r[n] for n in FINDINGS] for r in base_truth
    ]
    assert [r["text"] for r in rows(shifted / "reports.csv")] == [
        r["text"] for r in rows(base / "reports.csv")
    ]
    assert {r["site"] for r in shifted_truth} == {SHIFTED_SITE.name}
    for before, after in zip(base_truth, shifted_truth, strict=True):
        old = dcmread(next((base / "studies" / before["study_uid"]).glob("*.dcm")))
        new = dcmread(next((shifted / "studies" / after["study_uid"]).glob("*.dcm")))
        assert new.InstitutionName == SHIFTED_SITE.name
        assert new.StudyInstanceUID != old.StudyInstanceUID
        assert not np.array_equal(new.pixel_array, old.pixel_array)


def test_site_picks_the_acquiring_site(tmp_path: Path) -> None:
    out = write(tmp_path / "b", "--site", SITES[1].name, "--json")
    ds = dcmread(next((out / "studies").glob("*/*.dcm")))
    assert ds.InstitutionName == SITES[1].name
    assert ds.PhotometricInterpretation == SITES[1].photometric_interpretation


def test_json_summary(tmp_path: Path) -> None:
    code, stdout, _ = demo("--out", str(tmp_path / "j"), "--count", "2", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["count"] == 2 and summary["site"] == SITES[0].name
    assert summary["shift"] is None
    assert Path(summary["reports_csv"]).is_file()
    assert sum(summary["positives"].values()) >= 0 and set(summary["positives"]) == set(FINDINGS)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--site", "nowhere"), [s.name for s in SITES]),
        (("--shift", "sideways"), [SHIFTED_SITE.name]),
        (("--count", "0"), ["count must be between 1 and"]),
    ],
)
def test_bad_arguments_exit_2_and_say_what_is_valid(
    tmp_path: Path, args: tuple[str, ...], expected: list[str]
) -> None:
    code, _, stderr = demo("--out", str(tmp_path / "bad"), *args)
    assert code == 2
    assert all(text in stderr for text in expected), stderr
    assert not (tmp_path / "bad" / "studies").exists()


def test_refuses_a_folder_that_already_has_studies(base: Path) -> None:
    code, _, stderr = demo("--out", str(base), "--count", "1")
    assert code == 2
    assert "already holds files" in stderr
    assert len(list((base / "studies").iterdir())) == COUNT


def test_help_lists_the_choices() -> None:
    result = runner.invoke(app, ["demo", "studies", "--help"])
    assert result.exit_code == 0
    assert all(site.name in result.stdout for site in SITES)
    assert SHIFTED_SITE.name in result.stdout
