from __future__ import annotations

import json
import os
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


def test_the_cli_finds_the_service_config_file_and_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugin.cli.common import find_config

    service = write_toml(tmp_path / "etc.toml", f'data_dir = "{tmp_path / "service-data"}"\n')
    local = tmp_path / "pacsclip.toml"
    searched = (service, local)

    assert find_config(None, {}, searched).path == service
    assert find_config(local, {}, searched).origin == "--config"
    assert find_config(local, {"PACSCLIP_CONFIG": str(local)}, searched).origin == (
        "PACSCLIP_CONFIG"
    )
    nothing = find_config(None, {}, (tmp_path / "none.toml",))
    assert nothing.path is None and "not found" in nothing.describe((tmp_path / "none.toml",))

    monkeypatch.setattr("plugin.cli.common.CONFIG_SEARCH", searched)
    monkeypatch.delenv("PACSCLIP_CONFIG", raising=False)
    monkeypatch.delenv("PACSCLIP_DATA_DIR", raising=False)
    shown = CliRunner().invoke(app, ["config", "show"])
    assert shown.exit_code == 0, shown.output
    assert f"# config file: {service} (search path)" in shown.output
    assert f'data_dir = "{tmp_path / "service-data"}"' in shown.output


def test_a_read_command_without_a_deployment_says_so_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("plugin.cli.common.CONFIG_SEARCH", (tmp_path / "absent.toml",))
    for name in [n for n in os.environ if n.startswith("PACSCLIP_")]:
        monkeypatch.delenv(name)

    result = CliRunner().invoke(app, ["studies", "list"])

    assert result.exit_code == 2
    assert f"no pacsclip data directory at {tmp_path / 'pacsclip-data'}" in result.output
    assert "--config" in result.output and "PACSCLIP_DATA_DIR" in result.output
    assert list(tmp_path.iterdir()) == []


def test_deliveries_are_retried_for_two_hours_with_capped_jittered_delays() -> None:
    from plugin.delivery.jobs import retry_countdown, retry_schedule_s
    from plugin.delivery.outcome import DispatchError

    settings = load_settings()
    busy = DispatchError("association rejected (busy)", destination="pacs", retryable=True)
    fixed = [retry_countdown(busy, a, settings, jitter=lambda: 1.0) for a in range(40)]

    assert retry_schedule_s(settings) >= 2 * 3600
    assert fixed[:4] == [2.0, 4.0, 8.0, 16.0]
    assert max(f for f in fixed if f is not None) == settings.dispatch_backoff_max_s
    assert fixed[settings.dispatch_max_retries] is None  # then the dead letter
    jittered = {retry_countdown(busy, 20, settings) for _ in range(50)}
    assert len(jittered) > 1 and all(0.8 * 240 <= d <= 1.2 * 240 for d in jittered if d)
    permanent = DispatchError("SOP class not supported", destination="pacs", retryable=False)
    assert retry_countdown(permanent, 0, settings) is None
    with pytest.raises(ConfigError, match="below task_visibility_timeout_s"):
        load_settings(dispatch_backoff_max_s=600, broker_url="redis://127.0.0.1:6379/0")
    assert load_settings(dispatch_backoff_max_s=600).dispatch_backoff_max_s == 600  # no Redis
