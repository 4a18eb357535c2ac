from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.errors import ConfigError
from plugin.settings import CallerRule, load_settings


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_cli_over_environment_over_file_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(
        tmp_path / "pacsclip.toml",
        'ae_title = "FROMFILE"\ndicom_port = 104\nquiet_period_s = 7.5\n',
    )
    monkeypatch.setenv("PACSCLIP_DICOM_PORT", "4242")
    monkeypatch.setenv("PACSCLIP_AE_TITLE", "FROMENV")

    settings = load_settings(config, ae_title="FROMCLI")

    assert settings.ae_title == "FROMCLI"  # CLI beats environment
    assert settings.dicom_port == 4242  # environment beats file
    assert settings.quiet_period_s == 7.5  # file beats default
    assert settings.max_associations == 10  # default


def test_defaults_put_the_catalog_and_broker_in_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)

    assert settings.ae_title == "PACSCLIP"
    assert settings.dicom_port == 11112
    assert settings.effective_database_url == f"sqlite:///{tmp_path.resolve()}/catalog.sqlite3"
    assert settings.effective_broker_url.startswith("sqla+sqlite:///")


def test_allowed_callers_from_json_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PACSCLIP_ALLOWED_CALLERS", '["PACS1", {"ae_title": "CR2", "host": "10.1.2.3"}]'
    )

    callers = load_settings().allowed_callers

    assert callers == [CallerRule(ae_title="PACS1"), CallerRule(ae_title="CR2", host="10.1.2.3")]
    assert callers[1].allows("CR2", "10.1.2.3")
    assert not callers[1].allows("CR2", "10.1.2.4")


def test_invalid_settings_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_settings(tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(ae_title="A" * 17)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown_key"):
        load_settings(write_toml(tmp_path / "bad.toml", "unknown_key = 1\n"))


def test_config_show_masks_passwords(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "--data-dir",
            str(tmp_path),
            "--database-url",
            "postgresql+psycopg://pacs:s3cret@db.example:5432/pacsclip",
            "config",
            "show",
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert "s3cret" not in result.output
    assert shown["database_url"] == "postgresql+psycopg://pacs:***@db.example:5432/pacsclip"
    assert shown["ae_title"] == "PACSCLIP"
