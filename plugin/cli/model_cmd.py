"""``pacsclip model ...``: model bundles, their registry, import, calibration and evaluation."""

from __future__ import annotations

import typer

model_app = typer.Typer(no_args_is_help=True, help="Model bundles.")
