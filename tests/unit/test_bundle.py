"""Bundle manifests, checksum verification, and the registry (install, activate, persist)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.errors import PacsclipError
from plugin.models.bundle import (
    BundleError,
    load_bundle,
    parse_manifest,
    read_manifest,
    sha256_file,
)
from plugin.models.bundle_writer import write_manifest
from plugin.models.registry import Registry, RegistryError, builtin_bundle_dirs
from tests.models_fixtures import (
    TinyImageTower,
    build_bundle,
    edit_manifest,
    export_image_tower,
    manifest_data,
)


@pytest.fixture(scope="module")
def image_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_image_tower(TinyImageTower(), tmp_path_factory.mktemp("tower") / "tower.onnx")


@pytest.fixture
def bundle_dir(tmp_path: Path, image_onnx: Path) -> Path:
    return build_bundle(tmp_path / "src" / "tiny", image_onnx)


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- manifest and load_bundle ---------------------------------------------------------------


def test_load_bundle_round_trips_the_manifest(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)

    assert bundle.ref == "tiny-clip@1.0.0"
    assert bundle.is_synthetic
    assert [f.name for f in bundle.findings] == ["pleural_effusion", "pneumothorax"]
    assert bundle.image_tower_path == bundle_dir / "image_tower.onnx"
    assert bundle.prompt_embeddings_path == bundle_dir / "prompt_embeddings.npz"
    assert bundle.text_tower_path is None
    assert bundle.findings[0].prompt_texts(positive=True)[-1] == (
        "chest radiograph showing fluid in the pleural space"
    )
    # Writing and reading again gives the same manifest.
    write_manifest(bundle_dir, bundle.manifest)
    assert read_manifest(bundle_dir) == bundle.manifest


def test_a_corrupted_weight_file_names_the_file_and_both_digests(bundle_dir: Path) -> None:
    tower = bundle_dir / "image_tower.onnx"
    expected = sha256_file(tower)
    flip_byte(tower)

    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)

    message = str(info.value)
    assert isinstance(info.value, PacsclipError)
    assert "image_tower.onnx" in message
    assert expected in message
    assert sha256_file(tower) in message
    assert "prompt_embeddings" not in message  # only the bad file is reported


def test_a_missing_file_is_reported(bundle_dir: Path) -> None:
    (bundle_dir / "prompt_embeddings.npz").unlink()

    with pytest.raises(BundleError, match=r"prompt_embeddings\.npz.*missing"):
        load_bundle(bundle_dir)


def test_a_missing_manifest_says_it_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"not a model bundle: bundle\.json is missing"):
        load_bundle(tmp_path)


def test_an_unknown_key_is_named_with_the_allowed_keys(bundle_dir: Path) -> None:
    findings = manifest_data()["findings"]
    findings[0]["calibration"]["treshold"] = 0.4
    edit_manifest(bundle_dir, findings=findings, colour="blue")

    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)

    message = str(info.value)
    assert "findings.0.calibration.treshold: unknown key" in message
    assert "threshold" in message.split("treshold: unknown key")[1]  # the allowed keys
    assert "colour: unknown key" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"name": "My Model"}, "name: 'My Model' is not allowed"),
        ({"embedding_dim": 0}, "embedding_dim: Input should be greater than or equal to 1"),
        (
            {"image": {"size": 32, "channels": 3, "mean": [0.5, 0.5], "std": [0.25]}},
            "image.mean has 2 values but image.channels is 3",
        ),
        (
            {"files": {"image_tower": {"path": "../tower.onnx", "sha256": "0" * 64}}},
            "must be a relative path inside the bundle",
        ),
        (
            {"files": {"image_tower": {"path": "tower.onnx", "sha256": "abc"}}},
            "must be 64 lowercase hex digits",
        ),
        (
            {"priority": {"stat_if_any": ["pleural_effusion"]}},
            "in priority.stat_if_any but have no stat_threshold",
        ),
        ({"priority": {"stat_if_any": ["cardiomegaly"]}}, "not in findings: ['cardiomegaly']"),
        ({"model_card": None}, "model_card: Input should be a valid dictionary"),
    ],
)
def test_invalid_manifests_say_what_to_fix(change: dict[str, object], expected: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_manifest(manifest_data(**change))

    assert expected in str(info.value)


def test_findings_without_prompt_embeddings_or_text_encoder_are_refused() -> None:
    files = {"image_tower": {"path": "image_tower.onnx", "sha256": "0" * 64}}

    with pytest.raises(BundleError, match="findings need prompt embeddings"):
        parse_manifest(manifest_data(files=files))
    assert parse_manifest(manifest_data(files=files, findings=[], priority={})).findings == []


# -- registry --------------------------------------------------------------------------------


def test_install_activate_and_active_persist_across_registry_objects(
    tmp_path: Path, bundle_dir: Path
) -> None:
    root = tmp_path / "data" / "models"

    assert Registry(root).install(bundle_dir) == "tiny-clip@1.0.0"
    assert Registry(root).active() is None
    Registry(root).activate("tiny-clip", "1.0.0")

    fresh = Registry(root)
    [entry] = fresh.list()
    assert (entry.ref, entry.active, entry.synthetic, entry.builtin) == (
        "tiny-clip@1.0.0",
        True,
        True,
        False,
    )
    assert entry.path == root / "tiny-clip" / "1.0.0"
    active = fresh.active()
    assert active is not None
    assert active.directory == root / "tiny-clip" / "1.0.0"  # the copy, not the source
    assert json.loads((root / "registry.json").read_text())["active"] == "tiny-clip@1.0.0"
    assert not list(root.glob(".registry.json.*"))  # no temp file left behind


def test_reinstalling_the_same_bundle_is_a_no_op_and_a_different_one_is_refused(
    tmp_path: Path, bundle_dir: Path, image_onnx: Path
) -> None:
    registry = Registry(tmp_path / "models")
    registry.install(bundle_dir)
    registry.install(bundle_dir, activate=True)  # same bytes: fine, and now active
    other = build_bundle(tmp_path / "other", image_onnx, prompt_seed=1)  # same name@version

    with pytest.raises(RegistryError, match=r"already installed .* different contents"):
        registry.install(other)

    assert len(registry.list()) == 1
    assert registry.list()[0].active
    newer = build_bundle(tmp_path / "newer", image_onnx, version="1.10.0", prompt_seed=1)
    registry.install(newer)
    assert [e.version for e in registry.list()] == ["1.0.0", "1.10.0"]
    assert registry.info("tiny-clip").entry.version == "1.0.0"  # active wins over newest


def test_install_refuses_a_corrupted_bundle_and_copies_nothing(
    tmp_path: Path, bundle_dir: Path
) -> None:
    flip_byte(bundle_dir / "image_tower.onnx")
    registry = Registry(tmp_path / "models")

    with pytest.raises(BundleError, match=r"image_tower\.onnx"):
        registry.install(bundle_dir)

    assert registry.list() == []
    assert not (tmp_path / "models" / "tiny-clip" / "1.0.0").exists()


def test_builtin_bundles_are_listed_and_activated_in_place(
    tmp_path: Path, bundle_dir: Path
) -> None:
    registry = Registry(tmp_path / "models", builtin_dirs=[bundle_dir, tmp_path / "absent"])

    [entry] = registry.list()
    assert entry.builtin and entry.path == bundle_dir
    registry.activate("tiny-clip", "1.0.0")

    active = Registry(tmp_path / "models", builtin_dirs=[bundle_dir]).active()
    assert active is not None and active.directory == bundle_dir
    assert not (tmp_path / "models" / "tiny-clip").exists()  # nothing was copied


def test_activating_an_unknown_bundle_says_what_is_known(tmp_path: Path, bundle_dir: Path) -> None:
    registry = Registry(tmp_path / "models")
    registry.install(bundle_dir)

    with pytest.raises(RegistryError, match=r"no bundle named 'other' \(known: tiny-clip\)"):
        registry.activate("other", "1.0.0")
    with pytest.raises(RegistryError, match=r"no version '2.0.0' \(versions: 1.0.0\)"):
        registry.activate("tiny-clip", "2.0.0")


def test_info_reports_a_checksum_failure_without_raising(tmp_path: Path, bundle_dir: Path) -> None:
    registry = Registry(tmp_path / "models")
    registry.install(bundle_dir)
    flip_byte(tmp_path / "models" / "tiny-clip" / "1.0.0" / "image_tower.onnx")

    report = registry.info("tiny-clip", "1.0.0")

    assert not report.checksums_ok
    assert [c.label for c in report.checks if not c.ok] == ["image_tower"]
    with pytest.raises(BundleError):
        registry.activate("tiny-clip", "1.0.0")


# -- CLI ---------------------------------------------------------------------------------------


def cli(data_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "model", *args])
    return result.exit_code, result.output


def test_cli_install_list_info_activate(tmp_path: Path, bundle_dir: Path) -> None:
    data = tmp_path / "data"

    code, before = cli(data, "list")
    assert code == 0
    # Only the demo bundle shipped inside the package is known before anything is installed,
    # and it is live ('*') while no bundle is active (demo_model "live", the default).
    demo_version = json.loads((builtin_bundle_dirs()[0] / "bundle.json").read_text())["version"]
    assert [line.split()[:2] for line in before.splitlines()] == [
        ["*", f"pacsclip-demo@{demo_version}"]
    ]
    assert "built-in synthetic" in before
    code, out = cli(data, "install", str(bundle_dir), "--activate")
    assert (code, out) == (0, "installed tiny-clip@1.0.0 (active)\n")

    code, out = cli(data, "list", "--json")
    assert code == 0, out
    entries = {e["name"]: e for e in json.loads(out)}
    assert set(entries) == {"tiny-clip", "pacsclip-demo"}
    entry = entries["tiny-clip"]
    assert entry["active"] and entry["synthetic"]
    assert entries["pacsclip-demo"]["builtin"] and not entries["pacsclip-demo"]["active"]

    code, out = cli(data, "info", "tiny-clip")
    assert code == 0, out
    assert "synthetic: yes, synthetic demo model - not for clinical use" in out
    assert "pneumothorax (Pneumothorax)" in out
    assert "intended use: Unit tests of pacsclip." in out
    assert "checksums: OK" in out

    code, out = cli(data, "info", "tiny-clip", "--json")
    assert json.loads(out)["checksums_ok"] is True
    assert cli(data, "activate", "tiny-clip", "1.0.0") == (0, "active model: tiny-clip@1.0.0\n")


def test_cli_info_shows_a_failed_checksum_and_exits_1(tmp_path: Path, bundle_dir: Path) -> None:
    data = tmp_path / "data"
    cli(data, "install", str(bundle_dir))
    flip_byte(data / "models" / "tiny-clip" / "1.0.0" / "prompt_embeddings.npz")

    code, out = cli(data, "info", "tiny-clip", "--version", "1.0.0")

    assert code == 1
    assert "checksums: FAILED" in out
    assert "FAILED  prompt_embeddings" in out and "expected sha256" in out


def test_cli_errors_exit_2_with_what_to_fix(tmp_path: Path, bundle_dir: Path) -> None:
    data = tmp_path / "data"
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    edit_manifest(broken, embeding_dim=16)

    code, out = cli(data, "install", str(broken))
    assert code == 2
    assert "embeding_dim: unknown key" in out
    code, out = cli(data, "activate", "nothing", "1")
    assert code == 2
    assert "no bundle named 'nothing'" in out


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_a_decision_threshold_of_zero_or_one_is_refused_at_install(
    bundle_dir: Path, threshold: float
) -> None:
    # The triage's calibration refuses them; the bundle must not install only to fail there.
    data = json.loads((bundle_dir / "bundle.json").read_text())
    data["findings"][0]["calibration"] = {"threshold": threshold}
    (bundle_dir / "bundle.json").write_text(json.dumps(data))

    with pytest.raises(BundleError, match="threshold"):
        load_bundle(bundle_dir)
