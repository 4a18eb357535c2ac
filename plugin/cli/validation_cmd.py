"""``pacsclip report label|import|unlinked`` and ``pacsclip validate``."""

from __future__ import annotations

import csv
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from plugin.cli.common import (
    JsonFlag,
    command_settings,
    exit_on_error,
    fail,
    open_sessions,
    print_json,
)


def report_label(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="CSV with columns id,text ('-' for stdin).")
    ] = None,
    text: Annotated[str | None, typer.Option("--text", help="Label this one text.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Label report texts per finding: present, absent, uncertain or not mentioned (null)."""
    from plugin.validation.report_labeler import ReportRefused
    from plugin.validation.services import labeler_for

    if (file is None) == (text is None):
        raise fail("give a CSV file (id,text) or --text, not both")
    rows = [("text", text or "")] if text is not None else _id_text_rows(file)  # type: ignore[arg-type]
    settings = command_settings(ctx)
    with exit_on_error():
        labeler = labeler_for(settings)
    answers: list[dict[str, Any]] = []
    for key, body in rows:
        try:
            answers.append({"id": key, "labels": labeler.label(body).as_json()})
        except ReportRefused as exc:
            answers.append({"id": key, "labels": None, "error": str(exc)})
    if as_json:
        print_json(answers)
    else:
        for answer in answers:
            labels = answer["labels"] or {}
            said = ", ".join(f"{k}={v}" for k, v in labels.items() if v is not None)
            typer.echo(f"{answer['id']}: {said or answer.get('error') or 'nothing mentioned'}")
    typer.echo(f"labeler {labeler.version}", err=True)
    if any("error" in a for a in answers):
        raise typer.Exit(1)


def _id_text_rows(file: Path) -> list[tuple[str, str]]:
    try:
        handle = sys.stdin if str(file) == "-" else file.open(encoding="utf-8", newline="")
        with handle:
            reader = csv.DictReader(handle)
            if not {"id", "text"} <= set(reader.fieldnames or ()):
                raise fail(f"{file}: needs the columns id,text (found {reader.fieldnames})")
            return [(row["id"], row["text"] or "") for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise fail(f"cannot read {file}: {exc}") from exc


def report_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with study_uid,text or accession,text.")],
    as_json: JsonFlag = False,
) -> None:
    """Import reports, link them to their studies and label them (unlinked ones are kept)."""
    from plugin.validation.services import intake_for, run_monitoring

    settings = command_settings(ctx)
    with exit_on_error():
        sessions = open_sessions(settings)
        intake = intake_for(settings, sessions)
        intake.link_waiting()
        summary = intake.import_csv(file)
        run_monitoring(settings, sessions, intake)
    if as_json:
        print_json(summary.as_dict())
    else:
        typer.echo(
            f"{summary.linked} linked, {summary.already_stored} already stored, "
            f"{summary.waiting} waiting for their study, {len(summary.refused)} refused; "
            f"{summary.labeled} labeled"
        )
        for refused in summary.refused:
            typer.echo(f"  line {refused['line']}: {refused['reason']}")
    if summary.refused:
        raise typer.Exit(1)


def report_unlinked(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Reports that name no study in the catalog yet, with the reason (linked when it arrives)."""
    from plugin.catalog.report_labels import waiting_reports
    from plugin.validation.services import intake_for

    settings = command_settings(ctx)
    sessions = open_sessions(settings)
    with exit_on_error():
        intake_for(settings, sessions, embed=False).link_waiting()
    with sessions() as session:
        rows = waiting_reports(session)
    data = [
        {
            "id": r.id,
            "source": r.source,
            "study_instance_uid": r.study_instance_uid,
            "accession_number": r.accession_number,
            "reason": r.reason,
            "received_at": r.received_at.isoformat(),
        }
        for r in rows
    ]
    if as_json:
        print_json(data)
        return
    if not data:
        typer.echo("No reports waiting for their study.")
    for row in data:
        typer.echo(f"{row['id']}  {row['received_at']}  {row['source']}  {row['reason']}")


def validate(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option(help="Only this site key.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Only this model (NAME@VERSION) beside the live one.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only studies received on or after this date (YYYY-MM-DD).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """How each model does at each site, per finding, against labels from the site's reports."""
    from plugin.validation.services import floors_of, intake_for, live_ref
    from plugin.validation.site_validation import validate as run_validation

    settings = command_settings(ctx)
    when = _date(since)
    sessions = open_sessions(settings)
    with exit_on_error():
        version = intake_for(settings, sessions, embed=False).catch_up()
        live = live_ref(settings)
        answer = run_validation(
            sessions,
            version,
            live_model=live,
            site=site,
            model=model,
            since=when,
            floors=floors_of(settings),
        )
    if as_json:
        print_json(answer)
        return
    _print_validation(answer)


def _date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as exc:
        raise fail(f"--since must be a date as YYYY-MM-DD, got {value!r}") from exc


def _print_validation(answer: dict[str, Any]) -> None:
    typer.echo(f"labels by report labeler {answer['labeler']}; live model {answer['live_model']}")
    if not answer["sites"]:
        typer.echo(
            "No labeled studies with results yet: import reports with 'pacsclip report import'."
        )
    for site in answer["sites"]:
        typer.echo(f"\nsite {site['site']}")
        for model in site["models"]:
            typer.echo(
                f"  {model['model']} ({model['role']}): {model['studies']} studies, "
                f"{model['not_scored']} not scored (out of distribution)"
            )
            versus = model.get("versus_live", {})
            for name, f in model["findings"].items():
                head = (
                    f"    {name:<18} pos {f['positives']:>4} neg {f['negatives']:>4} "
                    f"unc {f['uncertain']:>3}"
                )
                if not f["enough"]:
                    typer.echo(f"{head}  too few labels: {f['missing']}")
                    continue
                low, high = f["auroc_ci95"]
                line = (
                    f"{head}  AUROC {f['auroc']:.3f} [{low:.3f}, {high:.3f}]  "
                    f"sens {f['sensitivity']:.2f} spec {f['specificity']:.2f} "
                    f"PPV {_fmt(f['ppv'])} alerts {f['alert_rate']:.1%}"
                )
                diff = versus.get(name)
                if diff and diff.get("enough"):
                    line += (
                        f"  vs live {diff['auroc_difference']:+.3f} "
                        f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
                    )
                typer.echo(line)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def monitor(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Recompute the monitoring window per site, model and finding; alert on what fell below
    its floor (log and webhook). Workers do this on their own after labeled reports; run it
    from a timer where no worker runs."""
    from plugin.validation.services import run_monitoring

    settings = command_settings(ctx)
    with exit_on_error():
        figures, alerts = run_monitoring(settings, open_sessions(settings))
    if as_json:
        print_json(
            {
                "figures": [asdict(f) for f in figures],
                "alerts": [{**asdict(a), "message": a.message()} for a in alerts],
            }
        )
        return
    if not figures:
        typer.echo(
            "No labeled studies with results yet: import reports with 'pacsclip report import'."
        )
    for f in figures:
        auroc = "n/a" if f.auroc is None else f"{f.auroc:.3f}"
        rate = "n/a" if f.alert_rate is None else f"{f.alert_rate:.1%}"
        state = "; ".join(f.problems) or "ok"
        typer.echo(
            f"{f.site}  {f.model}  {f.finding:<18} {f.labeled:>4} labeled  AUROC {auroc}  "
            f"alerts {rate}  {state}"
        )
    for alert in alerts:
        typer.echo(alert.message())


def report_export_labels(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Labels CSV to write (path + findings).")],
    model: Annotated[
        str | None, typer.Option(help="The model whose scored images to list (default: live).")
    ] = None,
    site: Annotated[str | None, typer.Option(help="Only this site key.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only studies received on or after this date (YYYY-MM-DD).")
    ] = None,
) -> None:
    """Write the report labels as a labels CSV for `pacsclip model calibrate --labels` (and
    `fit-head`): one row per scored image, 1/0/empty per finding."""
    from plugin.models.registry import resolve_bundle
    from plugin.validation.labels_export import export_labels_csv
    from plugin.validation.services import intake_for

    settings = command_settings(ctx)
    when = _date(since)
    sessions = open_sessions(settings)
    with exit_on_error():
        version = intake_for(settings, sessions, embed=False).catch_up()
        ref = model or resolve_bundle(settings.data_dir, settings.model_bundle).ref
        export = export_labels_csv(
            sessions, version, ref, settings.spool_dir, out, site=site, since=when
        )
    typer.echo(f"{export.images} images of {export.studies} studies scored by {ref} -> {out}")
    for name in export.positives:
        typer.echo(
            f"  {name}: {export.positives[name]} positive, {export.negatives[name]} negative"
        )
