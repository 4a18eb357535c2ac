"""``pacsclip``: run the node, inspect the catalog, test routing rules."""

# Commands import their heavy dependencies (SQLAlchemy and the catalog, pydicom, Celery,
# uvicorn, the DICOM node, the worker) inside the function, so that `pacsclip --help` and
# every other command start fast.

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from plugin.cli.access_cmd import print_access_log, tokens_app
from plugin.cli.adapt_cmd import adapt_app
from plugin.cli.common import (
    JsonFlag,
    command_settings,
    fail,
    find_config,
    open_sessions,
    print_json,
)
from plugin.cli.demo_cmd import demo_app
from plugin.cli.hl7_cmd import hl7_listen
from plugin.cli.model_cmd import model_app
from plugin.cli.performer_cmd import performer, workitems
from plugin.cli.retention_cmd import purge, retention_app
from plugin.cli.retrieval_cmd import index_app, report_app, search, similar
from plugin.cli.revisit_cmd import revisit_app
from plugin.cli.triage_cmd import triage
from plugin.cli.validation_cmd import (
    monitor,
    report_export_labels,
    report_import,
    report_label,
    report_unlinked,
    validate,
)
from plugin.errors import ConfigError, PacsclipError
from plugin.settings import DicomPeer, Settings, mask_url
from plugin.settings_reference import settings_reference

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Effective configuration.")
studies_app = typer.Typer(no_args_is_help=True, help="Studies in the catalog.")
quarantine_app = typer.Typer(no_args_is_help=True, help="Objects that were refused.")
rules_app = typer.Typer(no_args_is_help=True, help="Routing rules.")
db_app = typer.Typer(no_args_is_help=True, help="Catalog database.")
jobs_app = typer.Typer(no_args_is_help=True, help="Result dispatch jobs.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
app.add_typer(config_app, name="config")
app.add_typer(studies_app, name="studies")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(rules_app, name="rules")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(audit_app, name="audit")
app.add_typer(model_app, name="model")
app.add_typer(revisit_app, name="revisit")
app.add_typer(adapt_app, name="adapt")
app.add_typer(demo_app, name="demo")
app.command()(triage)
app.add_typer(index_app, name="index")
app.add_typer(report_app, name="report")
report_app.command("label")(report_label)
report_app.command("import")(report_import)
report_app.command("unlinked")(report_unlinked)
report_app.command("export-labels")(report_export_labels)
app.command()(validate)
app.command()(monitor)
app.command()(similar)
app.command()(search)
app.command("hl7-listen")(hl7_listen)
app.command()(performer)
app.command()(workitems)
app.command()(purge)
app.add_typer(retention_app, name="retention")
app.add_typer(tokens_app, name="tokens")


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", envvar="PACSCLIP_CONFIG", help="TOML config file.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    database_url: Annotated[str | None, typer.Option(help="Catalog database URL.")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING...")] = None,
) -> None:
    ctx.obj = {
        "config": config,
        "config_source": find_config(config),
        "overrides": {"data_dir": data_dir, "database_url": database_url, "log_level": log_level},
    }


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Print the config file read (and where it was found) and the effective settings,
    passwords masked."""
    source = (ctx.obj or {}).get("config_source") or find_config(None)
    data = command_settings(ctx).masked()
    if as_json:
        print_json({"config_file": None if source.path is None else str(source.path), **data})
        return
    typer.echo(f"# config file: {source.describe()}")
    for key, value in data.items():
        typer.echo(f"{key} = {json.dumps(value)}")


@config_app.command("reference")
def config_reference() -> None:
    """Print every setting as a Markdown table (name, env variable, type, default, meaning)."""
    typer.echo(settings_reference(), nl=False)


NodeHost = Annotated[str | None, typer.Option("--host", help="Address to listen on.")]
NodePort = Annotated[int | None, typer.Option("--port", help="DICOM port.")]
NodeAet = Annotated[str | None, typer.Option("--ae-title", help="Our AE title.")]


def _run_node(
    settings: Settings, metrics: Any | None = None, on_signal: Callable[[], None] | None = None
) -> None:
    from dicom_node.node import main
    from dicom_node.routing import RulesError

    try:
        main(settings, metrics, on_signal=on_signal)
    except RulesError as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        where = f"{settings.dicom_host}:{settings.dicom_port}"
        raise fail(f"cannot start the DICOM node on {where}: {exc}") from exc


@app.command()
def node(
    ctx: typer.Context, host: NodeHost = None, port: NodePort = None, ae_title: NodeAet = None
) -> None:
    """Run the DICOM node alone: receive, catalog, and publish complete studies."""
    _run_node(command_settings(ctx, dicom_host=host, dicom_port=port, ae_title=ae_title))


@app.command()
def serve(
    ctx: typer.Context, host: NodeHost = None, port: NodePort = None, ae_title: NodeAet = None
) -> None:
    """Run everything on one machine: DICOM node, a worker process and the HTTP API."""
    from plugin.metrics import PacsclipMetrics
    from plugin.serve import run_api_thread, run_worker_process

    settings = command_settings(ctx, dicom_host=host, dicom_port=port, ae_title=ae_title)
    root: dict[str, Any] = ctx.obj or {}
    metrics = PacsclipMetrics()  # the node counts, the API in the same process reports
    with (
        run_worker_process(
            root.get("config"), root.get("overrides", {}), stop_timeout_s=settings.drain_timeout_s
        ) as worker,
        run_api_thread(settings, metrics),
        _performer_if_configured(settings),
    ):
        # On SIGTERM the worker starts its warm shutdown while the node drains.
        _run_node(settings, metrics, on_signal=worker.begin_stop)


def _performer_if_configured(settings: Settings) -> AbstractContextManager[None]:
    """With ups_url: the IHE AIW-I task performer runs beside the node."""
    if settings.ups_url is None:
        return nullcontext()
    from dicom_node.performer import build_performer, performer_thread

    try:
        return performer_thread(build_performer(settings))
    except PacsclipError as exc:
        raise fail(str(exc)) from exc


@app.command()
def api(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
) -> None:
    """Run the HTTP API alone (worklist flags, results, health, metrics)."""
    import uvicorn

    from plugin.serve import build_api

    settings = command_settings(ctx, api_host=host, api_port=port)
    uvicorn.run(build_api(settings), host=settings.api_host, port=settings.api_port)


@app.command()
def worker(
    ctx: typer.Context,
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues to consume, most urgent first.")
    ] = "stat,dispatch,routine",
    name: Annotated[
        str | None,
        typer.Option(help="Celery node name, NAME@HOST; default pacsclip-PID@HOST (unique)."),
    ] = None,
) -> None:
    """Run a worker process alone (scale-out: as many as the hardware allows)."""
    from worker.main import main

    main(
        command_settings(ctx),
        queues=[q.strip() for q in queues.split(",") if q.strip()],
        node_name=name,
    )


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    state: Annotated[str | None, typer.Option(help="pending, delivered or failed.")] = None,
) -> None:
    """Dispatch jobs, newest first; failed ones are dead-lettered and can be replayed."""
    from plugin.catalog.dispatch_jobs import recent_jobs

    with open_sessions(command_settings(ctx))() as session:
        rows = recent_jobs(session, state=state)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no jobs")
    for r in rows:
        typer.echo(
            f"{r['id']:>5}  {r['state']:<9}  {r['kind']:<7}  {r['destination']:<16} "
            f"attempts={r['attempts']}  "
            f"study={r['study_instance_uid']}  {r['last_error'] or ''}"
        )


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    job_ids: Annotated[list[int] | None, typer.Argument(help="Dead-lettered job ids.")] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every dead-lettered job (of --destination).")
    ] = False,
    destination: Annotated[
        str | None, typer.Option(help="With --all: only the jobs to this destination.")
    ] = None,
) -> None:
    """Replay dead-lettered jobs (results, STAT webhook and HL7): back to pending and onto
    the dispatch queue."""
    from plugin.delivery.jobs import replay, replay_all
    from plugin.task_queue import DISPATCH_QUEUE, DISPATCH_RESULT, make_celery

    if bool(job_ids) == every:
        raise fail("name the job ids, or --all [--destination NAME]")
    if destination is not None and not every:
        raise fail("--destination goes with --all")
    settings = command_settings(ctx)
    sessions = open_sessions(settings)
    app = make_celery(settings)

    def enqueue(job_id: int) -> None:
        app.send_task(DISPATCH_RESULT, args=[job_id], queue=DISPATCH_QUEUE)

    if every:
        queued = replay_all(sessions, enqueue, destination)
    else:
        queued = list(job_ids or [])
        for job_id in queued:
            try:
                replay(sessions, job_id)
            except (LookupError, ValueError) as exc:
                raise fail(str(exc), 1) from exc
        for job_id in queued:
            enqueue(job_id)
    if len(queued) == 1 and not every:
        typer.echo(f"job {queued[0]} queued for dispatch again")
    else:
        typer.echo(f"{len(queued)} jobs queued for dispatch again")


@app.command()
def echo(
    ctx: typer.Context,
    host: str,
    port: int,
    aec: Annotated[str, typer.Option("--aec", help="The peer's AE title.")],
    aet: Annotated[str | None, typer.Option("--aet", help="Our AE title.")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Connect over DICOM TLS.")] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca", help="CA the peer's certificate must chain to (default: system CAs)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="Our client certificate, for a peer that requires one."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="The private key of --tls-cert.")
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            "--tls-server-name", help="Name the peer's certificate must carry (default: HOST)."
        ),
    ] = None,
) -> None:
    """C-ECHO a DICOM node to check the network path and AE titles (and TLS with --tls)."""
    import ssl

    from dicom_node.scu import AssociationFailed
    from dicom_node.scu import echo as send_echo
    from plugin.delivery.dimse import client_ssl_context

    if (tls_cert is None) != (tls_key is None):
        raise fail("--tls-cert and --tls-key go together")
    if not tls and (tls_ca or tls_cert or tls_server_name):
        raise fail("TLS options given: add --tls")
    settings = command_settings(ctx)
    try:
        context = client_ssl_context(ca=tls_ca, cert=tls_cert, key=tls_key) if tls else None
    except (OSError, ssl.SSLError) as exc:
        raise fail(f"TLS files unusable: {exc}") from exc
    try:
        status = send_echo(
            DicomPeer(ae_title=aec, host=host, port=port),
            calling_ae_title=aet or settings.ae_title,
            tls=context,
            server_name=tls_server_name,
        )
    except AssociationFailed as exc:
        raise fail(str(exc), 1) from exc
    if status != 0:
        raise fail(f"C-ECHO answered status 0x{status:04X}", 1)
    typer.echo(f"C-ECHO to {aec}@{host}:{port}: success")


@studies_app.command("list")
def studies_list(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    state: Annotated[str | None, typer.Option(help="Only studies in this state.")] = None,
    priority: Annotated[str | None, typer.Option(help="stat, routine or not_scored.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
) -> None:
    """List studies, newest first."""
    from plugin.catalog.repository import list_studies

    with open_sessions(command_settings(ctx))() as session:
        rows = list_studies(session, state=state, priority=priority, limit=limit)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no studies")
        return
    for r in rows:
        typer.echo(
            f"{r['study_instance_uid']}  {r['state']:<9}  {r['priority'] or '-':<7}  "
            f"{r['instances']:>5} inst  site={r['site']}  received={r['received_at']}"
        )


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    event: Annotated[
        list[str] | None,
        typer.Option(help="Only this event (repeatable): golive, golive_refused, stored, ..."),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Only entries about this study.")] = None,
    patient_id: Annotated[
        str | None,
        typer.Option("--patient-id", help="The access log: who saw this patient's data, and when."),
    ] = None,
    person: Annotated[
        str | None,
        typer.Option(help="The access log: what this person (subject, or token:NAME) did."),
    ] = None,
    access: Annotated[
        bool, typer.Option("--access", help="The access log (people's views and actions).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Audit entries, newest first: what was received or refused and from whom, go-live
    decisions and overrides with their reasons. With --patient-id, --person or --access: the
    access log, who saw which study and patient and who changed what."""
    from plugin.catalog.repository import recent_audit_events

    if patient_id is not None or person is not None or access:
        print_access_log(
            command_settings(ctx),
            patient_id=patient_id,
            person=person,
            study=study,
            limit=limit,
            as_json=as_json,
        )
        return
    with open_sessions(command_settings(ctx))() as session:
        rows = recent_audit_events(session, events=event or (), study_uid=study, limit=limit)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no audit entries")
    for r in rows:
        who = r["calling_ae_title"] or ""
        where = f" study={r['study_instance_uid']}" if r["study_instance_uid"] else ""
        status = f" status=0x{r['status']:04X}" if r["status"] is not None else ""
        typer.echo(f"{r['at']}  {r['event']:<20} {who}{where}{status}  {r['detail'] or ''}")


@studies_app.command("requeue")
def studies_requeue(
    ctx: typer.Context,
    study_uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs.")] = None,
    state: Annotated[
        str | None,
        typer.Option(help="Every study in this state: shadow_only (a model is live now), failed."),
    ] = None,
) -> None:
    """Analyse studies again with the live model: those that ended shadow_only while no model
    was live, or failed ones after their cause is fixed."""
    from plugin.catalog.repository import requeue
    from plugin.errors import InvalidTransition
    from plugin.study_state import StudyState
    from plugin.task_queue import ANALYSE_STUDY, analysis_queue, make_celery

    if not study_uids and state is None:
        raise fail("name the studies (Study Instance UIDs) or --state shadow_only|failed")
    try:
        wanted = None if state is None else StudyState(state)
    except ValueError:
        raise fail(f"unknown state {state!r}; states: {', '.join(StudyState)}") from None
    settings = command_settings(ctx)
    with open_sessions(settings)() as session:
        try:
            queued = requeue(session, list(study_uids or []), wanted)
        except (LookupError, InvalidTransition) as exc:
            raise fail(f"{exc}; nothing was queued", 1) from exc
        session.commit()
    app = make_celery(settings)
    for study in queued:
        app.send_task(
            ANALYSE_STUDY,
            args=[study.study_instance_uid, study.generation],
            queue=analysis_queue(study.priority),
        )
    typer.echo(f"{len(queued)} studies queued for analysis")


@studies_app.command("show")
def studies_show(ctx: typer.Context, study_uid: str, as_json: JsonFlag = False) -> None:
    """One study with its series and instances."""
    from plugin.catalog.repository import study_detail

    with open_sessions(command_settings(ctx))() as session:
        detail = study_detail(session, study_uid)
    if detail is None:
        raise fail(f"no study {study_uid} in the catalog", 1)
    if as_json:
        print_json(detail)
        return
    for key in (
        "study_instance_uid",
        "state",
        "priority",
        "site",
        "instances",
        "received_at",
        "completed_at",
        "completion_reason",
        "expected_instances",
        "needs_reanalysis",
    ):
        typer.echo(f"{key}: {detail[key]}")
    typer.echo(f"routing: {json.dumps(detail['routing'])}")
    for s in detail["series"]:
        typer.echo(
            f"  series {s['series_instance_uid']} {s['modality'] or '-'} "
            f"{s['series_description'] or ''} ({len(s['instances'])} instances)"
        )


@quarantine_app.command("list")
def quarantine_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Refused objects with the reason and the status the sender got."""
    from plugin.catalog.repository import list_quarantine

    settings = command_settings(ctx)
    with open_sessions(settings)() as session:
        rows = list_quarantine(session)
    for row in rows:
        row["file"] = str(settings.quarantine_dir / row["path"])
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("quarantine is empty")
        return
    for r in rows:
        typer.echo(
            f"{r['at']}  {r['status']}  from {r['calling_ae_title']}@{r['peer_host']}: "
            f"{r['reason']}  -> {r['file']}"
        )


@rules_app.command("test")
def rules_test(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A DICOM file to route.")],
    rules: Annotated[Path | None, typer.Option(help="Rules file (default: settings).")] = None,
    calling_ae: Annotated[str, typer.Option(help="Calling AE title to assume.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Print the routing decision the rules make for a file."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_node.routing import RoutingInput, RulesError, default_rules, load_rules

    settings = command_settings(ctx)
    rules_file = rules or settings.rules_file
    try:
        ruleset = load_rules(rules_file) if rules_file else default_rules()
        ds = dcmread(file, stop_before_pixels=True)
    except RulesError as exc:
        raise fail(str(exc)) from exc
    except (OSError, InvalidDicomError) as exc:
        raise fail(f"cannot read {file}: {exc}") from exc
    decision = ruleset.decide(RoutingInput.from_dataset(ds, calling_ae))
    data = {"rules_file": str(rules_file) if rules_file else None, **decision.as_dict()}
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        typer.echo(f"{key}: {value}")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the catalog schema to the newest revision."""
    from plugin.catalog.db import open_catalog

    url = command_settings(ctx).effective_database_url
    open_catalog(url)
    typer.echo(f"catalog at {mask_url(url)} is up to date")


def run() -> None:
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
