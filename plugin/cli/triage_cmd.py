"""``pacsclip triage FILE...``: run the triage on DICOM files with no server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from plugin.cli.common import JsonFlag, command_settings, fail
from plugin.errors import PacsclipError
from plugin.models.registry import resolve_bundle


def triage(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="DICOM files of one study (or folders).")],
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle folder (default: the active or built-in one).")
    ] = None,
    as_json: JsonFlag = False,
    saliency: Annotated[bool, typer.Option(help="Compute heat maps.")] = True,
    saliency_out: Annotated[
        Path | None, typer.Option(help="Write each heat map here as .npy.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads.")] = None,
    ood_guard: Annotated[
        bool | None,
        typer.Option(
            "--ood-guard/--no-ood-guard",
            help="Leave out-of-distribution studies unscored (default: the OOD_GUARD setting).",
        ),
    ] = None,
) -> None:
    """Score a study's images: findings, calibrated decisions, priority, heat maps."""
    # Imported here: pydicom and onnxruntime (plugin.inference) are slow to load.
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from plugin.inference import TriageModel

    settings = command_settings(ctx, **({} if ood_guard is None else {"ood_guard": ood_guard}))
    paths = [p for f in files for p in (sorted(f.rglob("*")) if f.is_dir() else [f]) if p.is_file()]
    try:
        datasets = [dcmread(p) for p in paths]
    except (OSError, InvalidDicomError) as exc:
        raise fail(f"cannot read a DICOM file: {exc}") from exc
    try:
        model = TriageModel(
            resolve_bundle(settings.data_dir, bundle), threads=threads, ood_guard=settings.ood_guard
        )
        report = model.triage(datasets, saliency=saliency)
    except (PacsclipError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if saliency_out is not None:
        saliency_out.mkdir(parents=True, exist_ok=True)
        for s in report.saliency:
            np.save(saliency_out / f"{s.sop_instance_uid}_{s.finding}.npy", s.heatmap)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    typer.echo(f"{report.algorithm_name} {report.algorithm_version}: " + "; ".join(report.notices))
    ood = report.distribution
    if ood is not None and ood.images_outside:
        typer.echo(
            f"{'not scored' if not ood.scored else 'partly scored'}: {ood.images_outside} of "
            f"{len(ood.distances)} images out of distribution for model "
            f"{report.algorithm_name} version {report.algorithm_version} "
            f"({ood.method} distance {ood.distance:.2f}, threshold {ood.threshold:.2f})"
        )
    typer.echo(
        f"priority: {report.priority}"
        + (f" (triggered by {', '.join(report.triggered_by)})" if report.triggered_by else "")
    )
    for f in report.findings:
        typer.echo(f"  {f.display:<28} {f.probability:6.3f}  {f.decision}")
