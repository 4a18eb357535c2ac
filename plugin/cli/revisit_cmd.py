"""``pacsclip revisit ...``: the 7-day ER revisit risk model (docs/revisit.md).

``synth`` writes the synthetic 13-site cohort, ``train`` fits and stores a model for a target
site, ``eval`` runs every adaptation arm side by side with the evaluation protocol and writes
the HTML report, ``score`` scores encounters with the latest (or a chosen) model.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from plugin.cli.common import JsonFlag, command_settings, exit_on_error

if TYPE_CHECKING:
    from plugin.adaptation import Method, Results
    from plugin.concepts.extract import SentenceSplitter

# The commands import the revisit pipeline inside the function: torch (plugin.adaptation, the
# stored models) and the concept lexicons are slow to load.

revisit_app = typer.Typer(no_args_is_help=True, help="7-day ER revisit risk model.")

SYNTHETIC_NOTE = (
    "Synthetic data: invented by a generator (plugin/revisit/cohort.py); nothing computed on "
    "it says anything clinical."
)

EncountersOption = Annotated[
    Path,
    typer.Option(
        "--encounters",
        help="Encounter file: CSV (or Parquet with pyarrow) with encounter_id, site, "
        "note_text, revisit_7d; optional triage_<finding> columns.",
    ),
]
SeedOption = Annotated[int, typer.Option(help="Random seed.")]
KOption = Annotated[int, typer.Option("--k", help="Most frequent concepts kept as features.")]
SplitterOption = Annotated[
    str, typer.Option(help="Sentence splitter of the extractor: punctuation or pyrush.")
]


def _data_dir(ctx: typer.Context) -> Path:
    return command_settings(ctx).data_dir


def _method(name: str) -> Method:
    from plugin.adaptation import METHODS

    if name not in METHODS:
        typer.echo(f"error: unknown method {name!r}; use one of {', '.join(METHODS)}", err=True)
        raise typer.Exit(2)
    return name


def _splitter(name: str) -> SentenceSplitter:
    from plugin.revisit.features import SPLITTERS

    if name not in SPLITTERS:
        typer.echo(f"error: --splitter must be one of {', '.join(SPLITTERS)}", err=True)
        raise typer.Exit(2)
    return name


@revisit_app.command("synth")
def revisit_synth(
    out: Annotated[Path, typer.Option("--out", help="CSV file to write.")],
    seed: SeedOption = 0,
    sites: Annotated[int, typer.Option(help="Number of ERs.")] = 13,
    encounters: Annotated[int, typer.Option(help="Number of encounters.")] = 3210,
) -> None:
    """Write the synthetic multi-site ER cohort (13 sites, 3,210 encounters) as CSV."""
    from plugin.revisit.cohort import synth_cohort, write_cohort_csv

    try:
        rows = synth_cohort(seed, n_sites=sites, n_encounters=encounters)
        count = write_cohort_csv(out, rows)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {count} synthetic encounters from {sites} sites to {out}")
    typer.echo(SYNTHETIC_NOTE)


@revisit_app.command("train")
def revisit_train(
    ctx: typer.Context,
    encounters: EncountersOption,
    target_site: Annotated[str, typer.Option("--target-site", help="Site to adapt to.")],
    method: Annotated[
        str,
        typer.Option(
            help="multi-dann, single-dann, source-only, target-only, mixed "
            "(or standardised-lr, coral-lr)."
        ),
    ] = "multi-dann",
    seed: SeedOption = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs (fixed, no early stopping).")] = 30,
    k: KOption = 1001,
    splitter: SplitterOption = "punctuation",
    as_json: JsonFlag = False,
) -> None:
    """Train a revisit model for a target site and store it as the next version."""
    from plugin.adaptation import TrainConfig
    from plugin.revisit.encounters import read_encounters
    from plugin.revisit.features import FeatureSpec, NoteConcepts, RevisitError
    from plugin.revisit.risk_model import ModelStore, fit_revisit_model

    chosen, split = _method(method), _splitter(splitter)
    store = ModelStore.for_data_dir(_data_dir(ctx))
    with exit_on_error():
        table = read_encounters(encounters, require_labels=True)
        if target_site not in table.site_names():  # before minutes of extraction
            raise RevisitError(
                f"site {target_site!r} is not in {encounters}; its sites are "
                f"{', '.join(table.site_names())}"
            )
        started = time.perf_counter()
        documents = NoteConcepts(split).documents(table.notes)
        extraction_s = time.perf_counter() - started
        features = FeatureSpec.fit(documents, list(table.triage), k=k, splitter=split)
        model = fit_revisit_model(
            table,
            documents,
            target_site,
            chosen,
            features=features,
            seed=seed,
            config=TrainConfig(epochs=epochs),
        )
        stored = store.save(model)
    summary = {
        **stored.identity(),
        "path": str(store.path(stored.version)),
        "encounters": len(table),
        "source_sites": stored.training["source_sites"],
        "features": len(features.names),
        "triage_columns": list(features.triage_columns),
        "extraction_seconds": round(extraction_s, 1),
        "training_seconds": stored.training["seconds"],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"revisit model v{stored.version}: {chosen} adapted to {target_site}, "
        f"{len(table)} encounters from {len(table.site_names())} sites, "
        f"{len(features.names)} features ({len(features.vocabulary)} concepts"
        f"{', linked triage scores' if features.triage_columns else ''}); "
        f"extraction {extraction_s:.1f} s, training {stored.training['seconds']:.1f} s"
    )
    typer.echo(f"stored in {summary['path']}")


@revisit_app.command("eval")
def revisit_eval(
    ctx: typer.Context,
    encounters: EncountersOption,
    methods: Annotated[
        list[str] | None,
        typer.Option(help="Methods to compare (repeat or comma-separate); default all."),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Training seeds per method and site.")] = 2,
    epochs: Annotated[int, typer.Option(help="Training epochs (fixed).")] = 15,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for intervals.")] = 200,
    target_site: Annotated[
        list[str] | None,
        typer.Option("--target-site", help="Evaluate only these target sites (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: in the data dir).")
    ] = None,
    k: KOption = 1001,
    splitter: SplitterOption = "punctuation",
    as_json: JsonFlag = False,
) -> None:
    """Compare adaptation methods, each site the target in turn; write the HTML report."""
    from plugin.adaptation import METHODS, Run, TrainConfig, to_json, write_report
    from plugin.revisit.encounters import read_encounters
    from plugin.revisit.evaluation import evaluate_encounters
    from plugin.revisit.features import FeatureSpec, NoteConcepts

    names = [m.strip() for item in methods or [] for m in item.split(",") if m.strip()]
    chosen = [_method(m) for m in names] or list(METHODS)
    split = _splitter(splitter)
    if seeds < 1:
        typer.echo("error: --seeds must be at least 1", err=True)
        raise typer.Exit(2)
    folder = out or _data_dir(ctx) / "revisit" / "reports" / _timestamp()
    started = time.perf_counter()

    def progress(run: Run) -> None:
        if run.method == chosen[-1] and run.seed == seeds - 1:
            elapsed = time.perf_counter() - started
            typer.echo(f"  target {run.target_site} done, {elapsed:.0f} s", err=True)

    with exit_on_error():
        table = read_encounters(encounters, require_labels=True)
        typer.echo(f"extracting concepts from {len(table)} notes", err=True)
        documents = NoteConcepts(split).documents(table.notes)
        features = FeatureSpec.fit(documents, list(table.triage), k=k, splitter=split)
        typer.echo(
            f"{len(features.names)} features; methods {', '.join(chosen)}; {seeds} seed(s), "
            f"{epochs} epochs",
            err=True,
        )
        results = evaluate_encounters(
            table,
            documents,
            chosen,
            list(range(seeds)),
            features=features,
            target_sites=target_site,
            config=TrainConfig(epochs=epochs),
            n_bootstrap=bootstrap,
            on_run=progress,
        )
    notes = [
        f"Data: {encounters.name}, {len(table)} encounters, {len(table.site_names())} sites; "
        f"{len(features.names)} features ({len(features.vocabulary)} concepts, K = {k}).",
        "Scores are not diagnoses. On synthetic data the figures say nothing clinical.",
    ]
    report = write_report(
        results, folder, title="7-day ER revisit: adaptation methods", notes=notes
    )
    if as_json:
        document = json.loads(to_json(results))
        document["report"] = str(report)
        typer.echo(json.dumps(document, indent=2))
        return
    _print_summary(results)
    typer.echo(f"report: {report}")


def _print_summary(results: Results) -> None:
    typer.echo("AUROC over target sites (per site: mean over seeds)")
    typer.echo(f"{'method':<16} {'median':>7} {'worst':>7} {'(site)':<8} {'AUPRC':>6} {'s/fit':>7}")
    for s in results.summary():
        typer.echo(
            f"{s.method:<16} {s.median_auroc:>7.3f} {s.worst_auroc:>7.3f} {s.worst_site:<8} "
            f"{s.median_auprc:>6.3f} {s.seconds_per_fit:>7.2f}"
        )
    widths = [r.auroc_high - r.auroc_low for r in results.sites]
    typer.echo(
        f"per-site 95% intervals are {statistics.median(widths):.2f} AUROC wide (median): "
        "compare medians over sites, not single sites"
    )


def _timestamp() -> str:
    return "eval-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


@revisit_app.command("score")
def revisit_score(
    ctx: typer.Context,
    encounters: Annotated[
        Path,
        typer.Option(
            "--encounters", help="Encounter file with encounter_id, note_text (site optional)."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model version (e.g. 3) or folder; default: the latest."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Score encounters' 7-day revisit risk with a stored model."""
    from plugin.revisit.encounters import read_encounters
    from plugin.revisit.features import NoteConcepts
    from plugin.revisit.risk_model import (
        ModelStore,
        load_artefact,
        risks_document,
        score_encounters,
    )

    with exit_on_error():
        chosen = (
            load_artefact(Path(model))
            if model is not None and Path(model).is_dir()
            else ModelStore.for_data_dir(_data_dir(ctx)).load(model)
        )
        table = read_encounters(encounters, require_labels=False)
        source = NoteConcepts(
            chosen.features.splitter, negated_features=chosen.features.negated_features
        )
        risks = score_encounters(chosen, table, source.documents(table.notes))
    document: dict[str, Any] = risks_document(chosen, risks)
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    identity = document["algorithm"]
    typer.echo(
        f"{identity['name']} v{identity['version']} ({identity['method']}, adapted to "
        f"{identity['target_site']}): {'; '.join(document['notices'])}"
    )
    for warning in document["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    for risk in risks:
        typer.echo(f"{risk.encounter_id:<24} {risk.site or '-':<10} {risk.risk:.3f}")
