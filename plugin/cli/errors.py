"""How the commands turn the core's errors into a message and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from plugin.errors import PacsclipError


@contextmanager
def exit_on_error(*also: type[Exception]) -> Iterator[None]:
    """The core's errors (and ``also``) become ``error: <message>`` and exit code 2; their
    messages say what to fix, so no traceback."""
    caught: tuple[type[Exception], ...] = (PacsclipError, *also)
    try:
        yield
    except caught as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
