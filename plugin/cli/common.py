"""What the ``pacsclip`` commands share: settings, catalog sessions, JSON output, errors.

Every command module imports this one at its top; none imports ``plugin.cli.main``, which only
assembles the commands into the ``pacsclip`` app.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from plugin.errors import ConfigError, PacsclipError
from plugin.logs import configure_logging
from plugin.settings import Settings, load_settings

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

CONFIG_ENV: Final = "PACSCLIP_CONFIG"
# Where an operator's shell finds the service's settings when it names no file: the systemd
# recipe's file, then one in the current directory.
CONFIG_SEARCH: Final = (Path("/etc/pacsclip/pacsclip.toml"), Path("pacsclip.toml"))


@dataclass(frozen=True)
class ConfigSource:
    path: Path | None
    origin: str  # --config, PACSCLIP_CONFIG, search path, or none

    def describe(self, searched: Sequence[Path] | None = None) -> str:
        if self.path is None:
            tried = ", ".join(str(p) for p in (CONFIG_SEARCH if searched is None else searched))
            return f"none (no --config or {CONFIG_ENV}; not found: {tried})"
        return f"{self.path} ({self.origin})"


def find_config(
    given: Path | None,
    environ: dict[str, str] | os._Environ[str] = os.environ,
    searched: Sequence[Path] | None = None,
) -> ConfigSource:
    """The config file a command reads: ``--config``, else ``PACSCLIP_CONFIG``, else the
    first of ``searched`` that exists."""
    if given is not None:
        from_env = environ.get(CONFIG_ENV)
        origin = CONFIG_ENV if from_env and Path(from_env) == given else "--config"
        return ConfigSource(given, origin)
    for path in CONFIG_SEARCH if searched is None else searched:
        if path.is_file():
            return ConfigSource(path, "search path")
    return ConfigSource(None, "none")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: <message>`` and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def exit_on_error(*also: type[Exception]) -> Iterator[None]:
    """The core's errors (and ``also``) become ``error: <message>`` and exit code 2; their
    messages say what to fix, so no traceback."""
    caught: tuple[type[Exception], ...] = (PacsclipError, *also)
    try:
        yield
    except caught as exc:
        raise fail(str(exc)) from exc


def command_settings(ctx: typer.Context, **overrides: Any) -> Settings:
    """Build the settings once per command: CLI > environment > config file > defaults."""
    root: dict[str, Any] = ctx.obj or {}
    source = root.get("config_source") or find_config(root.get("config"))
    try:
        settings = load_settings(source.path, **root.get("overrides", {}), **overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    configure_logging(settings.log_level)
    return settings


def open_sessions(settings: Settings) -> Any:
    """The catalog's session factory (the schema is created or migrated first).

    An operator's command never makes a deployment of its own: with the catalog in the data
    directory and no such directory, it stops and says which settings it read.
    """
    # Imported here: SQLAlchemy and the catalog take a while to load, and most commands
    # never open the catalog.
    from plugin.catalog.db import open_catalog

    if settings.database_url is None and not settings.data_dir.is_dir():
        raise fail(
            f"no pacsclip data directory at {settings.data_dir.resolve()}: point this command "
            f"at the service's settings (--config FILE, {CONFIG_ENV}, /etc/pacsclip/"
            "pacsclip.toml) or its data (--data-dir, PACSCLIP_DATA_DIR); `pacsclip config "
            "show` prints what it reads"
        )
    return open_catalog(settings.effective_database_url).sessions


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
