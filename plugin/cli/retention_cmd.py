"""``pacsclip purge`` (everything about one patient or study) and ``pacsclip retention run``
(what the retention settings allow to go, once)."""

from __future__ import annotations

from typing import Annotated

import typer

from plugin.cli.common import JsonFlag, command_settings, fail, print_json

retention_app = typer.Typer(no_args_is_help=True, help="Retention of stored data.")


def purge(
    ctx: typer.Context,
    patient_id: Annotated[
        str | None, typer.Option("--patient-id", help="Every study of this Patient ID.")
    ] = None,
    study: Annotated[str | None, typer.Option("--study", help="This Study Instance UID.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Remove everything pacsclip holds about one patient or one study: catalog rows, spool,
    results, quarantined objects, rendered images, HL7 messages and index vectors. One audit
    entry records the purge by counts (no Patient ID, no UID)."""
    from plugin.catalog.db import open_catalog
    from plugin.cli.common import open_sessions
    from plugin.purge import NothingToPurge, find_target
    from plugin.purge import purge as run_purge

    if (patient_id is None) == (study is None):
        raise fail("give --patient-id ID or --study UID (one of them)")
    if patient_id is not None and not patient_id.strip():
        raise fail("--patient-id is empty")
    settings = command_settings(ctx)
    open_sessions(settings)  # stops when there is no deployment at these settings
    catalog = open_catalog(settings.effective_database_url)
    try:
        target = find_target(catalog, patient_id=patient_id, study_uid=study)
    except NothingToPurge as exc:
        raise fail(str(exc), 1) from exc
    counts = ", ".join(f"{n} {what}" for what, n in target.counts.items())
    if not yes:
        typer.confirm(
            f"Remove {counts} and every file, row and index vector about them? "
            "This cannot be undone",
            abort=True,
        )
    outcome = run_purge(settings, catalog, target, patient_id=patient_id)
    if as_json:
        print_json({"by": target.by, **target.counts, **outcome.as_dict()})
        return
    files = sum(outcome.files.values())
    rows = sum(outcome.rows.values())
    typer.echo(
        f"purged {counts}: {rows} rows, {files} files, {outcome.indexes_rebuilt} indexes rebuilt"
    )
    if not outcome.scrubbed:
        typer.echo(
            "warning: the SQLite log is still in use by another process; run "
            "`pacsclip purge` again later, or stop the services, to clear it",
            err=True,
        )


@retention_app.command("run")
def retention_run(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be deleted.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Apply the retention settings once (the DICOM node does it every
    retention_interval_s): delete what is older than each kind's limit, then the oldest
    items of retention_disk_kinds while free disk is below the floor."""
    from plugin.catalog.db import open_catalog
    from plugin.cli.common import open_sessions
    from plugin.retention import RetentionPolicy, run_retention

    settings = command_settings(ctx)
    open_sessions(settings)  # stops when there is no deployment at these settings
    if not RetentionPolicy.from_settings(settings).enabled:
        message = "retention is off (no retention_*_days, no retention_free_disk_floor_mb)"
        if as_json:
            print_json({"enabled": False})
        else:
            typer.echo(f"{message}: nothing deleted")
        return
    report = run_retention(settings, open_catalog(settings.effective_database_url), dry_run=dry_run)
    if as_json:
        print_json({"enabled": True, **report.as_dict()})
        return
    verb = "would delete" if dry_run else "deleted"
    for kind, count in sorted(report.deleted.items()):
        size = report.freed_bytes.get(kind, 0)
        typer.echo(f"{kind:<11} {verb} {count:>7}  ({size / 2**20:.1f} MiB)")
    if not report.deleted:
        typer.echo(f"nothing to delete ({'dry run' if dry_run else 'nothing deleted'})")
    typer.echo(f"free disk: {report.free_bytes_after / 2**20:.0f} MiB")
