"""What the ``pacsclip`` commands share: settings, catalog sessions, JSON output, errors.

Every command module imports this one at its top; none imports ``plugin.cli.main``, which only
assembles the commands into the ``pacsclip`` app.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from plugin.errors import ConfigError, PacsclipError
from plugin.logs import configure_logging
from plugin.settings import Settings, load_settings

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


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
    try:
        settings = load_settings(root.get("config"), **root.get("overrides", {}), **overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    configure_logging(settings.log_level)
    return settings


def open_sessions(settings: Settings) -> Any:
    """The catalog's session factory (the schema is created or migrated first)."""
    # Imported here: SQLAlchemy and the catalog take a while to load, and most commands
    # never open the catalog.
    from plugin.catalog.db import open_catalog

    return open_catalog(settings.effective_database_url).sessions


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
