"""``pacsclip performer`` (the IHE AIW-I task performer) and ``pacsclip workitems`` (its
claims journal)."""

from __future__ import annotations

from typing import Annotated

import typer

from plugin.cli.common import JsonFlag, command_settings, exit_on_error, open_sessions, print_json


def performer(
    ctx: typer.Context,
    ae_title: Annotated[
        str | None, typer.Option("--ae-title", help="This performer's AE title (ups_ae_title).")
    ] = None,
) -> None:
    """Take UPS-RS workitems from the Task Manager at ups_url: claim, retrieve the inputs by
    WADO-RS, analyse on the workers, store the results by STOW-RS, complete or cancel."""
    from dicom_node.performer import main

    settings = command_settings(ctx, ups_ae_title=ae_title)
    with exit_on_error():
        main(settings)


def workitems(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Workitems the task performers of this deployment took, newest first, and each
    performer's Task Manager status."""
    from plugin.catalog.ups_workitems import performer_statuses, recent_workitems

    with open_sessions(command_settings(ctx))() as session:
        rows = recent_workitems(session)
        performers = performer_statuses(session)
    if as_json:
        print_json({"performers": [p.as_dict() for p in performers], "workitems": rows})
        return
    for p in performers:
        reach = "reachable" if p.reachable else f"NOT REACHABLE since {p.down_since:%F %T}Z"
        typer.echo(f"performer {p.performer} on {p.host} (pid {p.pid}): {p.task_manager} {reach}")
    if not rows:
        typer.echo("no workitems")
    for r in rows:
        typer.echo(
            f"{r['workitem_uid']}  {r['performer']:<16} {r['step']:<10} "
            f"study={r['study_instance_uid'] or '-'}  {r['reason'] or ''}"
        )
