"""``pacsclip model finetune`` and ``model promote`` end to end on a tiny bundle with an ONNX
text tower, on synthetic image-report pairs (tests/finetune_fixtures.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from plugin.catalog.db import open_catalog
from plugin.catalog.repository import audit_events
from plugin.cli.main import app
from plugin.finetune.adapters import PairFeatures
from plugin.finetune.evaluation import retrieval
from plugin.finetune.features import report_key
from plugin.finetune.pairs import load_inputs, read_pairs_csv
from plugin.imaging import ImageSpec
from plugin.models.bundle import Bundle, load_bundle, sha256_file
from plugin.models.registry import Registry
from plugin.models.runtime import ImageEncoder, TextEncoder
from plugin.retrieval.service import sentences
from plugin.settings import Settings
from tests.finetune_fixtures import build_tiny_parent, write_pairs
from tests.models_fixtures import FINDINGS

runner = CliRunner()


@dataclass(frozen=True)
class Parent:
    directory: Path
    root: Path


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Parent:
    root = tmp_path_factory.mktemp("finetune")
    return Parent(build_tiny_parent(root), root)


def cli(data_dir: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(
        app, ["--data-dir", str(data_dir), "--log-level", "WARNING", "model", *args]
    )
    return result.exit_code, result.stdout, result.stderr


@dataclass(frozen=True)
class Tuned:
    data_dir: Path
    pairs_csv: Path
    stdout: str


@pytest.fixture(scope="module")
def tuned(parent: Parent) -> Tuned:
    pairs = write_pairs(parent.root / "pairs", 40)
    data_dir = parent.root / "data"
    code, out, err = cli(
        data_dir,
        "finetune",
        "--from", str(parent.directory),
        "--pairs", str(pairs),
        "--version", "2.0.0",
        "--rank", "8",
        "--image-rank", "4",
        "--epochs", "100",
        "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    return Tuned(data_dir, pairs, out)


def _copy(tuned: Tuned, tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    shutil.copytree(tuned.data_dir, data_dir)
    return data_dir


def _features(bundle: Bundle, pairs_csv: Path) -> PairFeatures:
    """The pairs embedded by the bundle's own runtime (ONNX towers as installed)."""
    pairs = read_pairs_csv(pairs_csv, [f["name"] for f in FINDINGS]).pairs
    spec = ImageSpec.from_manifest(bundle.manifest.image.model_dump())
    images = ImageEncoder(bundle, threads=1).encode(np.stack([load_inputs(p, spec) for p in pairs]))
    per_report = [sentences(p.report) for p in pairs]
    text = TextEncoder(bundle, threads=1)
    return PairFeatures(
        images,
        text.encode([s for group in per_report for s in group]),
        np.array([i for i, group in enumerate(per_report) for _ in group]),
        np.unique([report_key(p.report) for p in pairs], return_inverse=True)[1].reshape(-1),
    )


def test_finetune_installs_a_new_inactive_version_with_its_lineage(
    parent: Parent, tuned: Tuned
) -> None:
    assert "installed tiny-clip@2.0.0 (not active" in tuned.stdout
    registry = Registry.for_data_dir(tuned.data_dir)
    assert registry.active() is None
    child = load_bundle(registry.info("tiny-clip", "2.0.0").entry.path)
    lineage = child.manifest.lineage
    assert lineage is not None
    assert lineage.parent == "tiny-clip@1.0.0"
    assert lineage.parent_manifest_sha256 == sha256_file(parent.directory / "bundle.json")
    assert lineage.pairs == 40
    assert lineage.hyperparameters["rank"] == 8
    assert "40 image-report pairs from pairs.csv" in lineage.data
    evaluation = lineage.evaluation
    assert evaluation["heldout_pairs"] == 8 and evaluation["training_pairs"] == 32
    assert evaluation["training_loss"]["last_epoch"] < evaluation["training_loss"]["first_epoch"]
    assert set(evaluation["child"]["auroc"]) == {"pleural_effusion", "pneumothorax"}
    for name in ("finetune-eval.json", "finetune-eval.txt"):
        assert (child.directory / name).is_file()
    # The tuned towers are new files; the tokenizer is the parent's.
    assert (
        child.manifest.files.image_tower.sha256
        != load_bundle(parent.directory).manifest.files.image_tower.sha256
    )
    assert child.manifest.files.tokenizer == load_bundle(parent.directory).manifest.files.tokenizer


def test_tuned_bundle_retrieves_its_training_like_pairs_no_worse(
    parent: Parent, tuned: Tuned
) -> None:
    registry = Registry.for_data_dir(tuned.data_dir)
    child = load_bundle(registry.info("tiny-clip", "2.0.0").entry.path)
    fresh = write_pairs(parent.root / "fresh", 24, seed=1)
    before, after = _features(load_bundle(parent.directory), fresh), _features(child, fresh)
    same = before.groups[:, None] == before.groups[None, :]
    recall_before = retrieval(before, same)["text_to_image"]["R@1"]
    recall_after = retrieval(after, same)["text_to_image"]["R@1"]
    assert recall_after >= recall_before


def test_promote_switches_the_active_bundle_and_shows_the_eval(
    tuned: Tuned, tmp_path: Path
) -> None:
    data_dir = _copy(tuned, tmp_path)
    code, out, err = cli(data_dir, "promote", "tiny-clip", "2.0.0")
    # No site has validated it: the go-live gate refuses, and says what is missing.
    assert code == 2
    assert "tiny-clip@2.0.0 may not go live yet" in err
    assert "has no validation: run it in shadow" in err
    assert "has no out-of-distribution reference" in err
    assert Registry.for_data_dir(data_dir).active() is None
    code, _, err = cli(data_dir, "promote", "tiny-clip", "2.0.0", "--force")
    assert code == 2 and "--force needs --reason" in err

    reason = "vendor acceptance test signed off"
    code, out, err = cli(data_dir, "promote", "tiny-clip", "2.0.0", "--force", "--reason", reason)
    assert code == 0, err
    assert "fine-tuned from tiny-clip@1.0.0 on 40 pairs" in out
    assert "text_to_image" in out and "AUROC pleural_effusion" in out
    assert f"go-live gate overridden ({reason})" in out
    active = Registry.for_data_dir(data_dir).active()
    assert active is not None and active.ref == "tiny-clip@2.0.0"
    catalog = open_catalog(Settings(data_dir=data_dir).effective_database_url)
    with catalog.sessions() as session:
        events = [(e.event, e.detail) for e in audit_events(session)]
    assert [e for e, _ in events] == ["golive_refused", "golive_forced"]
    assert reason in (events[1][1] or "")


def test_promote_refuses_a_corrupted_bundle(tuned: Tuned, tmp_path: Path) -> None:
    data_dir = _copy(tuned, tmp_path)
    path = Registry.for_data_dir(data_dir).info("tiny-clip", "2.0.0").entry.path
    tower = path / "image_tower.onnx"
    tower.write_bytes(tower.read_bytes()[:-8] + b"tampered")
    code, _, err = cli(data_dir, "promote", "tiny-clip", "2.0.0")
    assert code == 2
    assert "tiny-clip@2.0.0 failed its checksums and was not promoted" in err
    assert "image_tower" in err and "the active bundle is unchanged" in err
    assert Registry.for_data_dir(data_dir).active() is None


def test_the_same_version_is_refused(tuned: Tuned, parent: Parent, tmp_path: Path) -> None:
    data_dir = _copy(tuned, tmp_path)
    code, _, err = cli(
        data_dir, "finetune", "--from", str(parent.directory), "--pairs", str(tuned.pairs_csv),
        "--version", "2.0.0",
    )  # fmt: skip
    assert code == 2 and "tiny-clip@2.0.0 is already installed: choose a new --version" in err


BadPairs = Callable[[Path], None]


def _too_few(folder: Path) -> None:
    write_pairs(folder, 5)


def _unreadable(folder: Path) -> None:
    write_pairs(folder, 12)
    (folder / "1.png").write_bytes(b"not a picture")


def _empty_report(folder: Path) -> None:
    write_pairs(folder, 12)
    lines = (folder / "pairs.csv").read_text().splitlines()
    lines[3] = "2.png,   ,1,1"
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_too_few, "fine-tuning needs at least 10 image-report pairs, got 5"),
        (_unreadable, "pairs.csv row 3: cannot read image"),
        (_empty_report, "pairs.csv row 4: the report is empty: give the report text"),
    ],
)
def test_bad_pairs_fail_with_a_clear_message(
    parent: Parent, tmp_path: Path, make: BadPairs, message: str
) -> None:
    make(tmp_path / "pairs")
    code, _, err = cli(
        tmp_path / "data", "finetune", "--from", str(parent.directory),
        "--pairs", str(tmp_path / "pairs" / "pairs.csv"), "--version", "2.0.1",
    )  # fmt: skip
    assert code == 2
    assert message in " ".join(err.split())
    assert not (tmp_path / "data" / "models" / "tiny-clip").exists()
