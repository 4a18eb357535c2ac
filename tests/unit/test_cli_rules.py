from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from plugin.cli.main import app
from tests.peers.data import rg1

EXAMPLE_RULES = Path(__file__).parents[2] / "deploy" / "rules.example.yaml"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_rules_test_prints_the_decision_for_a_real_chest_radiograph() -> None:
    code, out = run(
        "rules",
        "test",
        str(rg1("uncompressed")),
        "--rules",
        str(EXAMPLE_RULES),
        "--calling-ae",
        "ER_CR1",
        "--json",
    )

    assert code == 0, out
    decision = json.loads(out[out.index("{") :])
    assert decision["priority"] == "stat"
    assert decision["pipelines"] == ["triage", "retrieval"]
    assert decision["matched_rules"] == ["er-chest-xray", "chest-xray-similar-cases"]


def test_rules_test_without_rules_uses_the_defaults() -> None:
    code, out = run("rules", "test", str(rg1("uncompressed")), "--json")

    assert code == 0, out
    decision = json.loads(out[out.index("{") :])
    assert decision["pipelines"] == ["triage"]
    assert decision["destinations"] == ["*"]


def test_rules_test_explains_a_broken_rules_file(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text("version: 1\nrules:\n  - name: x\n    match: {modallity: [CR]}\n")

    code, out = run("rules", "test", str(rg1("uncompressed")), "--rules", str(broken))

    assert code == 2
    assert "modallity" in out


def test_rules_test_on_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")

    code, out = run("rules", "test", str(junk))

    assert code == 2
    assert "cannot read" in out


def test_example_config_file_loads() -> None:
    from plugin.settings import load_settings

    settings = load_settings(EXAMPLE_RULES.with_name("pacsclip.example.toml"))

    assert settings.allowed_callers[1].host == "10.20.30.41"
