"""``pacsclip similar``, ``pacsclip search``, ``pacsclip index ...``, ``pacsclip report add``.

These run on the server with the catalog's own access rights, like ``studies show``: they may
list other patients' studies. Nothing here sends anything to the PACS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from plugin.cli.common import JsonFlag, command_settings, exit_on_error, fail, open_sessions
from plugin.errors import PacsclipError

# plugin.retrieval.service (the vector indexes, the catalog) is imported inside the functions:
# it is slow to load.

index_app = typer.Typer(no_args_is_help=True, help="The similar-case retrieval indexes.")
report_app = typer.Typer(no_args_is_help=True, help="Report texts linked to studies.")

TopK = Annotated[int, typer.Option("--k", help="How many studies (and reports) to return.")]
Modality = Annotated[str | None, typer.Option(help="Only studies with this modality (CR, DX...).")]
SiteKey = Annotated[str | None, typer.Option("--site", help="Only studies of this site key.")]
DateFrom = Annotated[str | None, typer.Option("--from", help="Study date from, YYYYMMDD.")]
DateTo = Annotated[str | None, typer.Option("--to", help="Study date to, YYYYMMDD.")]
Finding = Annotated[
    str | None, typer.Option(help="Only studies where this finding is present (or --absent).")
]
Absent = Annotated[bool, typer.Option("--absent", help="With --finding: finding absent.")]
Threshold = Annotated[float, typer.Option(help="With --finding: probability threshold.")]


@contextmanager
def _service(ctx: typer.Context) -> Iterator[Any]:
    from plugin.retrieval.service import service_for

    settings = command_settings(ctx)
    try:
        yield service_for(settings, open_sessions(settings))
    except (PacsclipError, ValueError) as exc:
        raise fail(str(exc), 1) from exc


def _filters(**values: Any) -> Any:
    from plugin.retrieval.service import Filters

    absent = values.pop("absent")
    try:
        return Filters(present=not absent, **values)
    except ValueError as exc:
        raise fail(str(exc)) from exc


def similar(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID of an analysed study.")],
    k: TopK = 10,
    modality: Modality = None,
    site: SiteKey = None,
    date_from: DateFrom = None,
    date_to: DateTo = None,
    finding: Finding = None,
    absent: Absent = False,
    threshold: Threshold = 0.5,
    as_json: JsonFlag = False,
) -> None:
    """Studies whose images look most like this study's: priors of the same patient first."""
    filters = _filters(
        modality=modality,
        site=site,
        date_from=date_from,
        date_to=date_to,
        finding=finding,
        absent=absent,
        threshold=threshold,
    )
    with _service(ctx) as service:
        answer = service.similar(study_uid, k, filters)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    _print_model(answer)
    if "note" in answer:
        typer.echo(answer["note"])
    _print_studies("priors of the same patient", answer["priors"])
    _print_studies("similar studies of other patients", answer["similar"])
    _print_reports(answer["reports"])


def search(
    ctx: typer.Context,
    text: Annotated[str, typer.Argument(help='What to look for, e.g. "right pleural effusion".')],
    k: TopK = 10,
    modality: Modality = None,
    site: SiteKey = None,
    date_from: DateFrom = None,
    date_to: DateTo = None,
    finding: Finding = None,
    absent: Absent = False,
    threshold: Threshold = 0.5,
    as_json: JsonFlag = False,
) -> None:
    """Studies whose images (and reports whose text) best match a description."""
    filters = _filters(
        modality=modality,
        site=site,
        date_from=date_from,
        date_to=date_to,
        finding=finding,
        absent=absent,
        threshold=threshold,
    )
    with _service(ctx) as service:
        answer = service.search(text, k, filters)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    _print_model(answer)
    _print_studies("studies", answer["studies"])
    _print_reports(answer["reports"])


@index_app.command("rebuild")
def index_rebuild(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Rebuild the active model's image and report indexes from the catalog."""
    with _service(ctx) as service:
        answer = service.rebuild()
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    _print_model(answer)
    typer.echo(
        f"rebuilt from the catalog: {answer['images']} images, {answer['reports']} reports "
        f"({answer['reports_embedded']} reports newly embedded)"
    )


@index_app.command("info")
def index_info(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """What the active model's indexes hold (after catching up with the catalog)."""
    with _service(ctx) as service:
        answer = service.info()
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    _print_model(answer)
    for kind in ("images", "reports"):
        entry = answer[kind]
        mode = "approximate (PQ scan + exact re-rank)" if entry["approximate"] else "exact"
        typer.echo(f"{kind}: {entry['count']} entries, {mode}")


@report_app.command("add")
def report_add(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID the report belongs to.")],
    file: Annotated[Path, typer.Argument(help="Plain-text report file ('-' for stdin).")],
    as_json: JsonFlag = False,
) -> None:
    """Link a report's text to a study and index it for search."""
    try:
        text = typer.get_text_stream("stdin").read() if str(file) == "-" else file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read the report text: {exc}") from exc
    from plugin.validation.services import intake_for

    settings = command_settings(ctx)
    with exit_on_error(ValueError):
        intake = intake_for(settings, open_sessions(settings))
        outcome = intake.add(text, source="api", study_uid=study_uid)
    if not outcome.linked:
        raise fail(f"{outcome.reason}; the report is kept and linked when the study arrives", 1)
    answer = {"report_id": outcome.report_id, "created": outcome.created}
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    state = "stored, labeled and indexed" if outcome.created else "already stored"
    typer.echo(f"report {outcome.report_id} {state}")


def _print_model(answer: dict[str, Any]) -> None:
    model = answer["model"]
    line = f"model {model['name']} {model['version']}"
    if model.get("notice"):
        line += f" ({model['notice']})"
    typer.echo(line)


def _print_studies(title: str, rows: list[dict[str, Any]]) -> None:
    typer.echo(f"{title}: {len(rows) or 'none'}")
    for row in rows:
        findings = ", ".join(f"{name} {p:.2f}" for name, p in row["findings"].items() if p >= 0.5)
        typer.echo(
            f"  {row['similarity']:.3f}  {row['study_instance_uid']}  "
            f"{row['modality'] or '-':<4} {row['study_date'] or '-':<8}  site={row['site']}"
            + (f"  [{findings}]" if findings else "")
        )


def _print_reports(rows: list[dict[str, Any]]) -> None:
    typer.echo(f"reports: {len(rows) or 'none'}")
    for row in rows:
        typer.echo(f"  {row['similarity']:.3f}  {row['study_instance_uid']}  {row['excerpt']}")
