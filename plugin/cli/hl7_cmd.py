"""``pacsclip hl7-listen``: receive radiology reports as HL7 v2 ORU^R01 over MLLP
(docs/hl7-inbound.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from plugin.cli.common import command_settings, exit_on_error, fail


def hl7_listen(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (hl7_listen_host).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="MLLP port (hl7_listen_port).")] = None,
) -> None:
    """Receive reports as HL7 ORU^R01 over MLLP: keep, link to their study, label, ACK."""
    # Imported here: the intake loads SQLAlchemy, the catalog and (when built) medspacy.
    from plugin.hl7_inbound.listener import main
    from plugin.validation.services import intake_for

    settings = command_settings(ctx, hl7_listen_host=host, hl7_listen_port=port)

    def listening(bound_host: str, bound_port: int) -> None:
        typer.echo(f"listening on {bound_host}:{bound_port}")

    from plugin.catalog.db import open_catalog

    with exit_on_error():
        # A service: like the node, it may be the first process of a new deployment.
        intake = intake_for(settings, open_catalog(settings.effective_database_url).sessions)
        try:
            main(settings, intake, on_listening=listening)
        except OSError as exc:
            where = f"{settings.hl7_listen_host}:{settings.hl7_listen_port}"
            raise fail(f"cannot listen for HL7 on {where}: {exc}") from exc
