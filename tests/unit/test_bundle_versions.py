"""``pacsclip model calibrate``, ``fit-head`` and ``embed-prompts`` write a new bundle version
(copy, change, new version, lineage, installed inactive) and never touch the source bundle."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from plugin.bundle_tuning import split_rows
from plugin.bundle_versions import next_version
from plugin.cli.main import app
from plugin.imaging import dataset_input
from plugin.inference import TriageModel
from plugin.models.bundle import Bundle, BundleError, load_bundle, sha256_file
from plugin.models.registry import Registry
from plugin.triage import Calibration
from tests.finetune_fixtures import build_tiny_parent

N_IMAGES = 30


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-clip@1.0.0 (ONNX image and text towers) and a labels CSV of noisy images."""
    from tests.unit.test_inference import radiograph

    root = tmp_path_factory.mktemp("versions")
    bundle = build_tiny_parent(root)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:48, 0:40] / 48.0
    rows = ["path,pleural_effusion"]
    for i in range(N_IMAGES):
        mix = rng.uniform()
        base = mix * (0.2 + 0.8 * (xx < 0.35)) + (1 - mix) * (0.1 + 0.9 * yy)
        radiograph(np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1), root / f"img{i}.dcm")
        rows.append(f"img{i}.dcm,{int(mix + rng.normal(0, 0.2) > 0.5)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return bundle


def cli(data_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["--data-dir", str(data_dir), "--log-level", "WARNING", "model", *args]
    )
    return result.exit_code, result.output


def installed(data_dir: Path, version: str) -> Bundle:
    registry = Registry.for_data_dir(data_dir)
    return load_bundle(registry.info("tiny-clip", version).entry.path)


def test_calibrate_installs_a_new_inactive_version_and_leaves_the_source_unchanged(
    source: Path, tmp_path: Path
) -> None:
    before = file_digests(source)
    labels = source.parent / "labels.csv"
    data = tmp_path / "data"

    code, output = cli(data, "calibrate", "--labels", str(labels), "--bundle", str(source))

    assert code == 0, output
    assert file_digests(source) == before
    assert (
        "installed tiny-clip@1.0.0+cal1 (not active; pacsclip model promote tiny-clip "
        "1.0.0+cal1 makes it live)"
    ) in output
    [entry] = [e for e in Registry.for_data_dir(data).list() if not e.builtin]
    assert (entry.ref, entry.active) == ("tiny-clip@1.0.0+cal1", False)
    child = installed(data, "1.0.0+cal1")
    lineage = child.manifest.lineage
    assert lineage is not None
    assert lineage.parent == "tiny-clip@1.0.0"
    assert lineage.parent_manifest_sha256 == sha256_file(source / "bundle.json")
    assert lineage.pairs == N_IMAGES
    assert lineage.data == f"labels.csv: {N_IMAGES} labelled images, 24 to fit and 6 held out"
    assert lineage.hyperparameters == {"holdout": 0.2, "seed": 0}
    assert "calibration" in lineage.method and "pleural_effusion" in lineage.method
    # Every file but bundle.json is the parent's.
    changed = {k for k, v in file_digests(child.directory).items() if before.get(k) != v}
    assert changed == {"bundle.json"}
    effusion = child.findings[0].calibration
    assert effusion.fitted_on is not None and "24 images, 6 held out" in effusion.fitted_on

    # The held-out figures are those of the parent's and of the new calibration on the
    # held-out images: recomputed here from the scores.
    report = lineage.evaluation["findings"]["pleural_effusion"]["heldout"]
    model = TriageModel(load_bundle(source), threads=1)
    paths = [source.parent / f"img{i}.dcm" for i in range(N_IMAGES)]
    probs = model.probabilities(np.stack([dataset_input(dcmread(p), model.spec) for p in paths]))
    y = np.array([int(line.split(",")[1]) for line in labels.read_text().split()[1:]])
    _, held = split_rows(N_IMAGES, 0.2, 0)
    after = Calibration.from_manifest(effusion.model_dump())
    assert report["images"] == 6 and report["positives"] == int(y[held].sum())
    assert report["before"]["brier"] == pytest.approx(np.mean((probs[held, 0] - y[held]) ** 2))
    new = after.apply(probs[held, 0])
    assert report["after"]["brier"] == pytest.approx(np.mean((new - y[held]) ** 2))
    assert 0.0 <= report["after"]["ece"] <= 1.0
    called = new >= after.threshold
    if y[held].any():
        assert report["sensitivity"] == pytest.approx(called[y[held] == 1].mean())
    assert re.search(r"held out \(6 images, \d positive\): ECE [\d.]+ -> [\d.]+, Brier", output)

    # Calibrating again makes the next version; the first one stays as it was.
    first = file_digests(child.directory)
    code, output = cli(data, "calibrate", "--labels", str(labels), "--bundle", str(source))
    assert code == 0, output
    assert "installed tiny-clip@1.0.0+cal2" in output
    assert file_digests(child.directory) == first


def test_target_sensitivity_sets_the_highest_threshold_reaching_it_on_the_fitting_split(
    source: Path, tmp_path: Path
) -> None:
    labels = source.parent / "labels.csv"
    data = tmp_path / "data"

    code, output = cli(
        data,
        "calibrate",
        "--labels",
        str(labels),
        "--bundle",
        str(source),
        "--target-sensitivity",
        "0.9",
        "--holdout",
        "0.3",
        "--seed",
        "4",
        "--version",
        "1.0.0-site",
    )

    assert code == 0, output
    assert "for sensitivity >= 0.9" in output
    child = installed(data, "1.0.0-site")
    lineage = child.manifest.lineage
    assert lineage is not None
    assert lineage.hyperparameters == {"holdout": 0.3, "seed": 4, "target_sensitivity": 0.9}
    report = lineage.evaluation["findings"]["pleural_effusion"]
    assert report["fit"]["sensitivity"] >= 0.9
    assert report["heldout"]["images"] == 9
    assert set(report["heldout"]) >= {"sensitivity", "specificity", "before", "after"}

    model = TriageModel(load_bundle(source), threads=1)
    paths = [source.parent / f"img{i}.dcm" for i in range(N_IMAGES)]
    probs = model.probabilities(np.stack([dataset_input(dcmread(p), model.spec) for p in paths]))
    y = np.array([int(line.split(",")[1]) for line in labels.read_text().split()[1:]])
    fit, _ = split_rows(N_IMAGES, 0.3, 4)
    calibration = Calibration.from_manifest(child.findings[0].calibration.model_dump())
    scores = calibration.apply(probs[fit, 0])
    positives = np.sort(scores[y[fit] == 1])[::-1]
    lowest_needed = positives[math.ceil(0.9 * len(positives)) - 1]
    # Reached, and no higher threshold would reach it: no fitting score lies between.
    assert calibration.threshold <= lowest_needed
    assert not np.any((scores > calibration.threshold) & (scores < lowest_needed))
    assert np.mean(scores[y[fit] == 1] >= calibration.threshold) >= 0.9


def test_fit_head_writes_a_new_version_to_out_and_refuses_a_taken_version(
    source: Path, tmp_path: Path
) -> None:
    before = file_digests(source)
    labels = source.parent / "labels.csv"
    data, out = tmp_path / "data", tmp_path / "head-bundle"

    code, output = cli(
        data, "fit-head", "--labels", str(labels), "--bundle", str(source), "--out", str(out)
    )

    assert code == 0, output
    assert file_digests(source) == before
    assert f"wrote tiny-clip@1.0.0+head1 to {out} (not installed" in " ".join(output.split())
    assert not [e for e in Registry.for_data_dir(data).list() if not e.builtin]
    child = load_bundle(out)
    assert child.manifest.active_head == "linear_probe-v1"
    lineage = child.manifest.lineage
    assert lineage is not None and lineage.parent == "tiny-clip@1.0.0"
    assert lineage.method == "few-shot head linear_probe-v1 for pleural_effusion (active)"
    assert "pacsclip model calibrate" in lineage.dropped[0]

    code, output = cli(data, "install", str(out))
    assert code == 0, output
    taken = ("--version", "1.0.0+head1")
    code, output = cli(data, "fit-head", "--labels", str(labels), "--bundle", str(source), *taken)
    assert code == 2
    assert "tiny-clip@1.0.0+head1 is already installed: choose a new --version" in output
    code, output = cli(data, "fit-head", "--labels", str(labels), "--bundle", str(source))
    assert code == 0, output
    assert "installed tiny-clip@1.0.0+head2 (not active" in output


def test_a_failed_fit_leaves_no_version_behind(source: Path, tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("path,pleural_effusion\n" + "".join(f"img{i}.dcm,1\n" for i in range(8)))
    for i in range(8):
        shutil.copy(source.parent / f"img{i}.dcm", tmp_path)
    data = tmp_path / "data"

    code, output = cli(data, "calibrate", "--labels", str(bad), "--bundle", str(source))

    assert code == 2
    assert "at least one positive and one negative" in " ".join(output.split())
    assert not [e for e in Registry.for_data_dir(data).list() if not e.builtin]
    assert not [p for p in (data / "models").iterdir() if p.name.startswith(".derive-")]


def test_next_version_counts_from_the_source_and_skips_taken_ones() -> None:
    assert next_version("2026.1.0", "cal", set()) == "2026.1.0+cal1"
    assert next_version("2026.1.0", "cal", {"2026.1.0+cal1"}) == "2026.1.0+cal2"
    assert next_version("2026.1.0+cal1", "cal", {"2026.1.0+cal1"}) == "2026.1.0+cal2"
    assert next_version("2026.1.0+cal1", "ood", set()) == "2026.1.0+cal1+ood1"


def test_edited_prompts_are_refused_until_embedded_into_a_new_version(
    source: Path, tmp_path: Path
) -> None:
    data, embedded = tmp_path / "data", tmp_path / "embedded"
    code, output = cli(
        data, "embed-prompts", "--bundle", str(source), "--out", str(embedded), "--version", "1.1.0"
    )
    assert code == 0, output
    manifest = load_bundle(embedded).manifest
    assert all(f.embedded_prompts_sha256 == f.prompts_digest() for f in manifest.findings)
    TriageModel(load_bundle(embedded), threads=1)  # loads: the prompts match

    # An operator edits a prompt in bundle.json: the checksums still pass, but scoring would
    # silently keep the old prompt's embedding.
    edited = tmp_path / "edited"
    shutil.copytree(embedded, edited)
    data_json = json.loads((edited / "bundle.json").read_text())
    data_json["findings"][0]["positive_prompts"] = ["pleural effusion"]
    (edited / "bundle.json").write_text(json.dumps(data_json))
    with pytest.raises(
        BundleError, match=r"pleural_effusion .*pacsclip model embed-prompts --bundle"
    ):
        TriageModel(load_bundle(edited), threads=1)
    code, output = cli(data, "install", str(edited))
    assert code == 0, output
    code, output = cli(data, "info", "tiny-clip", "--version", "1.1.0")
    assert code == 1
    assert "prompts of pleural_effusion were edited" in " ".join(output.split())

    before = file_digests(edited)
    code, output = cli(data, "embed-prompts", "--bundle", str(edited))
    assert code == 0, output
    assert "installed tiny-clip@1.1.0+prompts1 (not active" in output
    assert file_digests(edited) == before
    child = installed(data, "1.1.0+prompts1")
    assert child.findings[0].positive_prompts == ["pleural effusion"]
    assert child.manifest.lineage is not None
    assert "edited: pleural_effusion" in child.manifest.lineage.method
    model = TriageModel(child, threads=1)
    assert model.prompts[0].name == "pleural_effusion"
    code, output = cli(data, "info", "tiny-clip", "--version", "1.1.0+prompts1")
    assert code == 0, output
    assert "lineage: from tiny-clip@1.1.0" in output
