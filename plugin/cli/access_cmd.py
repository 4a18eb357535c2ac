"""``pacsclip tokens`` (named machine tokens with roles) and the access log's reading in
``pacsclip audit list --patient-id``/``--person``."""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import typer

from plugin.cli.common import JsonFlag, command_settings, fail, open_sessions, print_json

tokens_app = typer.Typer(
    no_args_is_help=True, help="Machine tokens of the API, each with its own roles."
)

ROLE_HELP = "A role of the token (repeatable): radiologist, ai-admin, pacs-admin, auditor."


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="What the token is for: prometheus, ris-feed, ...")],
    role: Annotated[list[str], typer.Option("--role", help=ROLE_HELP)],
) -> None:
    """Make a token and print it, once: only its digest is kept. Give it to the machine as
    ``Authorization: Bearer TOKEN``."""
    from plugin.access.tokens import TokenError, TokenStore
    from plugin.roles import Role

    try:
        roles = [Role(r) for r in role]
    except ValueError as exc:
        raise fail(f"{exc}: a role is one of {', '.join(Role)}") from exc
    settings = command_settings(ctx)
    sessions = open_sessions(settings)  # stops where there is no deployment
    try:
        token = TokenStore(settings.data_dir).create(name, roles)
    except TokenError as exc:
        raise fail(str(exc)) from exc
    _log_token_change(sessions, "token_created", name, roles)
    typer.echo(token)
    typer.echo(
        f"token {name!r} made with {', '.join(sorted(roles))}; it is not shown again",
        err=True,
    )


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Every token made here, revoked ones marked (names and roles; never the tokens)."""
    from plugin.access.tokens import TokenError, TokenStore

    try:
        tokens = TokenStore(command_settings(ctx).data_dir).all()
    except TokenError as exc:
        raise fail(str(exc)) from exc
    rows: list[dict[str, Any]] = [
        {
            "name": t.name,
            "roles": [str(r) for r in t.roles],
            "created_at": t.created_at,
            "revoked_at": t.revoked_at,
        }
        for t in tokens
    ]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no tokens (make one with: pacsclip tokens create NAME --role ROLE)")
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        typer.echo(f"{r['name']:<24} {','.join(r['roles']):<40} {r['created_at']}  {state}")


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The token's name.")]
) -> None:
    """Revoke a token: every API process refuses it from its next request on."""
    from plugin.access.tokens import TokenError, TokenStore

    settings = command_settings(ctx)
    sessions = open_sessions(settings)
    try:
        revoked = TokenStore(settings.data_dir).revoke(name)
    except TokenError as exc:
        raise fail(str(exc)) from exc
    _log_token_change(sessions, "token_revoked", name, list(revoked.roles))
    typer.echo(f"token {name!r} revoked")


def _log_token_change(sessions: Any, action: str, name: str, roles: list[Any]) -> None:
    from plugin.catalog.access_log import AccessEntry, record_access

    who = f"cli:{getpass.getuser()}"
    entry = AccessEntry(
        subject=who,
        display_name=who,
        roles="",
        via="cli",
        action=action,
        method="CLI",
        route="pacsclip tokens " + {"token_created": "create"}.get(action, "revoke"),
        status=0,
        detail=f"token {name} ({', '.join(sorted(str(r) for r in roles))})",
    )
    with sessions.begin() as session:
        record_access(session, [entry])


def print_access_log(
    settings: Any,
    *,
    patient_id: str | None,
    person: str | None,
    study: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The access log's entries for a patient, a person (subject) or a study, newest first."""
    from plugin.catalog.access_log import access_events

    with open_sessions(settings)() as session:
        rows = access_events(
            session, patient_id=patient_id, subject=person, study_uid=study, limit=limit
        )
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no access-log entries")
    for r in rows:
        where = f" study={r['study_instance_uid']}" if r["study_instance_uid"] else ""
        typer.echo(
            f"{r['at']}  {r['action']:<20} {r['name']} ({r['subject']}; {r['roles'] or '-'})"
            f"{where} {r['method']} {r['route']} -> {r['status']}  {r['detail'] or ''}"
        )
