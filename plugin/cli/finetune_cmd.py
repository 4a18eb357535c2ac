"""``pacsclip model finetune`` and ``pacsclip model promote``: tune a bundle on the site's own
image-report pairs into a new version, then switch to it explicitly (docs/finetune.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from plugin.cli.common import (
    JsonFlag,
    command_settings,
    exit_on_error,
    fail,
    open_sessions,
    print_json,
)

if TYPE_CHECKING:
    from plugin.finetune.job import FinetuneRequest
    from plugin.settings import Settings

# torch, onnxruntime and the catalog are imported inside the commands: they take seconds.

_POLL_S = 0.5


def model_finetune(
    ctx: typer.Context,
    parent: Annotated[
        str, typer.Option("--from", help="Bundle to tune: NAME@VERSION, NAME or a folder.")
    ],
    version: Annotated[str, typer.Option(help="Version of the tuned bundle, e.g. 2026.12.0.")],
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="CSV with 'image' and 'report' columns (and optional 1/0 finding columns); "
            "default: the catalog's studies with an indexed report.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the tuned bundle.")] = None,
    rank: Annotated[int, typer.Option(min=1, help="Rank of the text adapter.")] = 32,
    image_rank: Annotated[
        int, typer.Option(min=0, help="Rank of the image adapter (0: image side unchanged).")
    ] = 0,
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    holdout: Annotated[float, typer.Option(help="Share of pairs held out for the eval.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seeds the split and the adapters.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="onnxruntime threads.")] = None,
    queue: Annotated[
        bool, typer.Option("--queue", help="Run it as a task on the 'training' queue.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="With --queue: wait for the task and report.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune a bundle on image-report pairs; install the result as a new, inactive version."""
    from plugin.finetune.adapters import AdapterConfig
    from plugin.finetune.job import FinetuneRequest

    settings = command_settings(ctx)
    defaults = AdapterConfig()
    request = FinetuneRequest(
        # A worker may run elsewhere: paths travel absolute.
        parent=str(Path(parent).resolve()) if Path(parent).is_dir() else parent,
        version=version,
        name=name,
        pairs_csv=None if pairs is None else str(pairs.resolve()),
        holdout=holdout,
        threads=threads,
        adapter=AdapterConfig(
            rank=rank,
            image_rank=image_rank,
            epochs=epochs,
            seed=seed,
            batch_size=defaults.batch_size,
        ),
    )
    if queue:
        outcome = _run_queued(settings, request, wait)
        if outcome is None:
            return
    else:
        outcome = _run_local(settings, request)
    if as_json:
        print_json(outcome)
        return
    typer.echo(outcome["summary"])
    ref = outcome["ref"]
    typer.echo(
        f"installed {ref} (not active; took {outcome['seconds']:.1f} s): switch to it with "
        f"`pacsclip model promote {ref.replace('@', ' ')}`"
    )


def _run_local(settings: Settings, request: FinetuneRequest) -> dict[str, Any]:
    from plugin.finetune.job import run_finetune

    bars = _StageBars()
    try:
        with exit_on_error():
            return run_finetune(settings, request, bars.update).as_dict()
    finally:
        bars.close()


def _run_queued(settings: Settings, request: FinetuneRequest, wait: bool) -> dict[str, Any] | None:
    from plugin.task_queue import FINETUNE_BUNDLE, TRAINING_QUEUE, make_celery

    app = make_celery(settings)
    result = app.send_task(
        FINETUNE_BUNDLE, kwargs={"request": request.to_message()}, queue=TRAINING_QUEUE
    )
    typer.echo(
        f"queued fine-tuning task {result.id} on the '{TRAINING_QUEUE}' queue (run by a worker "
        f"started with `pacsclip worker --queues {TRAINING_QUEUE}`)",
        err=True,
    )
    if not wait:
        return None
    last = None
    while not result.ready():
        info = result.info if result.state == "PROGRESS" else None
        if isinstance(info, dict) and info != last:
            typer.echo(f"  {info['stage']}: {info['done']}/{info['total']}", err=True)
            last = info
        time.sleep(_POLL_S)
    if result.failed():
        raise fail(f"fine-tuning task {result.id} failed: {result.result}")
    value: dict[str, Any] = result.get()
    return value


class _StageBars:
    """One progress bar per stage (images, reports, training, writing), on stderr."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar: Any = None
        self._done = 0

    def update(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._done = stage, 0
            self._bar = typer.progressbar(length=max(total, 1), label=stage, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def model_promote(
    ctx: typer.Context,
    name: str,
    version: str,
    site: Annotated[
        str | None, typer.Option(help="Judge by this site's validation only (default: all).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Go live although the gate refuses (needs --reason).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option(help="Why the gate is overridden; kept in the audit log.")
    ] = None,
) -> None:
    """Make a bundle the live (active) one: checksums, its eval vs its parent, then the go-live
    gate on the sites' report-label validation (pacsclip validate)."""
    from plugin.finetune.evaluation import format_comparison
    from plugin.finetune.job import METHOD as FINETUNE_METHOD
    from plugin.models.registry import Registry
    from plugin.validation.services import check_golive

    if force and not (reason and reason.strip()):
        raise fail("--force needs --reason TEXT: the override is kept in the audit log")
    settings = command_settings(ctx)
    registry = Registry.for_data_dir(settings.data_dir)
    with exit_on_error():
        report = registry.info(name, version)
    ref = report.manifest.ref
    if not report.checksums_ok:
        problems = "\n".join(f"  - {c.describe()}" for c in report.checks if not c.ok)
        raise fail(
            f"{ref} failed its checksums and was not promoted:\n{problems}\n"
            "Fine-tune or install it again; the active bundle is unchanged."
        )
    lineage = report.manifest.lineage
    if lineage is None:
        typer.echo(f"{ref} has no lineage (it was not derived from another bundle)")
    elif lineage.method == FINETUNE_METHOD:
        typer.echo(
            f"{ref}: fine-tuned from {lineage.parent} on {lineage.pairs} pairs "
            f"({lineage.created}); {lineage.data}"
        )
        if lineage.evaluation:
            typer.echo(format_comparison(lineage.evaluation))
    else:
        # calibrate, fit-head, fit-ood, embed-prompts (plugin/bundle_versions.py)
        typer.echo(
            f"{ref}: {lineage.method}, from {lineage.parent} ({lineage.created}); {lineage.data}"
        )
        if "summary" in lineage.evaluation:
            typer.echo(str(lineage.evaluation["summary"]))
        for note in lineage.dropped:
            typer.echo(f"not carried over: {note}")
    with exit_on_error():
        decision = check_golive(
            settings,
            open_sessions(settings),
            ref,
            has_ood_reference=report.manifest.ood is not None,
            site=site,
            forced_reason=reason if force else None,
        )
    for line in decision.passed:
        typer.echo(f"go-live check passed: {line}")
    if not decision.allowed:
        refusals = "\n".join(f"  - {r}" for r in decision.reasons)
        if not force:
            raise fail(
                f"{ref} may not go live yet:\n{refusals}\n"
                "The live model is unchanged. Override with --force --reason TEXT (audited)."
            )
        typer.echo(f"go-live gate overridden ({reason}); refused because:\n{refusals}")
    with exit_on_error():
        bundle = registry.activate(name, version)
    typer.echo(f"active model: {bundle.ref} (workers load it when they start: restart them)")
