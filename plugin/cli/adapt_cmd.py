"""``pacsclip adapt ...``: site-adapted triage heads and per-site drift (docs/revisit.md).

``triage`` trains a head for one site from labelled images of the other sites and the site's
own unlabelled embeddings (all read from the catalog), and stores it inactive; ``promote``
validates it on labelled images of that site and makes it the site's head only if it is not
worse than what the site uses now; ``drift`` says how separable each site's embeddings are.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from plugin.cli.common import (
    JsonFlag,
    command_settings,
    exit_on_error,
    fail,
    open_sessions,
    print_json,
)
from plugin.errors import ConfigError
from plugin.models.registry import resolve_bundle

if TYPE_CHECKING:
    from plugin.catalog.embeddings import StoredEmbeddings
    from plugin.models.bundle import Bundle
    from plugin.settings import Settings

# The commands import torch (plugin.adaptation), onnxruntime (plugin.inference) and the
# catalog (SQLAlchemy) inside the function: they take seconds to load.

adapt_app = typer.Typer(no_args_is_help=True, help="Site adaptation of triage; site drift.")

BundleOption = Annotated[
    Path | None,
    typer.Option("--bundle", help="Bundle folder (default: the active or built-in one)."),
]
LabelsOption = Annotated[
    Path,
    typer.Option(
        "--labels",
        help="CSV: a sop_instance_uid or study_instance_uid column, then 1/0/empty per finding.",
    ),
]


def _context(ctx: typer.Context, bundle_dir: Path | None) -> tuple[Settings, Bundle]:
    settings = command_settings(ctx)
    with exit_on_error(ValueError):
        return settings, resolve_bundle(settings.data_dir, bundle_dir)


def _embeddings(settings: Settings, model_ref: str) -> StoredEmbeddings:
    from plugin.catalog.embeddings import load_embeddings

    with open_sessions(settings)() as session:
        stored = load_embeddings(session, model_ref)
    if not len(stored):
        raise ConfigError(
            f"the catalog has no image embeddings of {model_ref}: analyse studies with this "
            "bundle first"
        )
    return stored


def _known_site(stored: StoredEmbeddings, site: str) -> None:
    if site not in set(stored.sites):
        raise ConfigError(
            f"no embeddings of site {site!r} in the catalog; its sites are "
            f"{', '.join(sorted(set(stored.sites)))}"
        )


@adapt_app.command("triage")
def adapt_triage(
    ctx: typer.Context,
    target_site: Annotated[str, typer.Option("--target-site", help="Site key to adapt to.")],
    labels: LabelsOption,
    method: Annotated[
        str, typer.Option(help="multi-dann (default), single-dann, source-only, coral-lr...")
    ] = "multi-dann",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs (fixed).")] = 30,
    bundle: BundleOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Train a head adapted to a site; store it as a new version, inactive."""
    from plugin.adaptation import UNSUPERVISED_METHODS, TrainConfig
    from plugin.adaptation.triage_heads import fit_site_head, read_image_labels
    from plugin.triage.site_heads import SiteHeadRegistry

    settings, model = _context(ctx, bundle)
    if method not in UNSUPERVISED_METHODS:
        typer.echo(
            f"error: --method must be one of {', '.join(UNSUPERVISED_METHODS)} (the target "
            "site has no labels here)",
            err=True,
        )
        raise typer.Exit(2)
    with exit_on_error(ValueError):
        stored = _embeddings(settings, model.ref)
        _known_site(stored, target_site)
        image_labels = read_image_labels(labels, [f.name for f in model.findings])
        y = image_labels.align(stored.sop_instance_uids, stored.study_instance_uids)
        sites = np.array(stored.sites)
        is_target = sites == target_site
        labelled = ~np.isnan(y).all(axis=1) & ~is_target
        ignored = int((~np.isnan(y).all(axis=1) & is_target).sum())
        if ignored:
            typer.echo(f"note: labels of {ignored} image(s) of {target_site} ignored", err=True)
        head = fit_site_head(
            stored.vectors,
            sites,
            y,
            image_labels.findings,
            target_site,
            method=method,
            seed=seed,
            config=TrainConfig(epochs=epochs),
        )
        sources = sorted(set(sites[labelled]))
        today = datetime.now(UTC).date().isoformat()
        entry = SiteHeadRegistry.for_data_dir(settings.data_dir, model.ref).add(
            head,
            site=target_site,
            method=method,
            source_sites=sources,
            fitted_on=f"{labels.name} ({int(labelled.sum())} labelled images of "
            f"{len(sources)} sites, {int(is_target.sum())} unlabelled of the target; {today})",
            extra={"seed": seed, "epochs": epochs},
        )
    if as_json:
        typer.echo(json.dumps({"model_ref": model.ref, **entry.__dict__}, indent=2))
        return
    typer.echo(
        f"site head {entry.version} for {target_site} ({method}, {', '.join(entry.findings)}), "
        f"{model.ref}: stored, not active"
    )
    typer.echo(f"  trained on {entry.fitted_on}")
    typer.echo(
        f"  validate and activate: pacsclip adapt promote --site {target_site!r} "
        f"--head {entry.version} --labels LABELS.csv"
    )


@adapt_app.command("promote")
def adapt_promote(
    ctx: typer.Context,
    site: Annotated[str, typer.Option("--site", help="Site key of the head.")],
    head: Annotated[int, typer.Option("--head", help="Site head version.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Validate on this labels CSV (sop_instance_uid or study_instance_uid, then "
            "1/0/empty per finding) instead of the site's report labels and the go-live gate.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Activate although it fails validation (needs --reason).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option(help="Why the gate is overridden; kept in the audit log.")
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(help="With --labels: AUROC a finding may lose and still count as not worse."),
    ] = 0.01,
    bundle: BundleOption = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Make a site head live at its site: by default only through the go-live gate on the
    site's report labels (pacsclip validate's floors); with --labels, on a labels file."""
    from plugin.validation.head_promotion import promote_site_head

    settings, model = _context(ctx, bundle)
    if labels is None:
        _promote_through_gate(settings, model, site, head, force, reason, as_json)
        return
    with exit_on_error(ValueError):
        outcome = promote_site_head(
            settings.data_dir,
            open_sessions(settings),
            model,
            site,
            head,
            labels,
            tolerance=tolerance,
            force=force,
            threads=threads,
        )
    comparison, activate, previous = outcome.comparison, outcome.activated, outcome.previous
    if as_json:
        typer.echo(json.dumps({**comparison.as_dict(), "activated": activate}, indent=2))
    else:
        was = f"site head {previous}" if previous else "the bundle's scores"
        typer.echo(f"validation of site head {head} at {site} against {was}:")
        for f in comparison.findings:
            new_auc = "n/a" if f.candidate_auroc is None else f"{f.candidate_auroc:.3f}"
            old_auc = "n/a" if f.current_auroc is None else f"{f.current_auroc:.3f}"
            typer.echo(
                f"  {f.finding:<20} n={f.n:<5} positives={f.positives:<4} AUROC {new_auc} "
                f"(current {old_auc})"
            )
    if not activate:
        typer.echo(
            f"not activated: worse than the current scores by more than {tolerance} AUROC on a "
            "finding, or a finding lacks positive and negative labels (--force to override)",
            err=True,
        )
        raise typer.Exit(1)
    if not as_json:
        forced = " (forced)" if not comparison.not_worse else ""
        typer.echo(f"site head {head} is now active for {site}{forced}")


def _promote_through_gate(
    settings: Settings,
    model: Bundle,
    site: str,
    head: int,
    force: bool,
    reason: str | None,
    as_json: bool,
) -> None:
    from plugin.validation.head_promotion import gate_site_head

    if force and not (reason and reason.strip()):
        raise fail("--force needs --reason TEXT: the override is kept in the audit log")
    with exit_on_error(ValueError):
        outcome = gate_site_head(
            settings,
            open_sessions(settings),
            model,
            site,
            head,
            forced_reason=reason if force else None,
        )
    decision = outcome.decision
    if as_json:
        print_json(outcome.as_dict())
    else:
        typer.echo(f"go-live gate for {outcome.candidate} at {site} (now: {outcome.current}):")
        for line in decision.passed:
            typer.echo(f"  passed: {line}")
    if not outcome.activated:
        refusals = "\n".join(f"  - {r}" for r in decision.reasons)
        raise fail(
            f"site head {head} may not go live at {site} yet:\n{refusals}\n"
            "The site's scores are unchanged. Override with --force --reason TEXT (audited)."
        )
    if not as_json:
        forced = f" (gate overridden: {reason})" if outcome.forced else ""
        typer.echo(f"site head {head} is now active for {site}{forced}; restart the workers")


@adapt_app.command("drift")
def adapt_drift(
    ctx: typer.Context,
    model_ref: Annotated[
        str | None,
        typer.Option(help="Embeddings of this bundle (name@version); default: the newest."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    max_rows: Annotated[int, typer.Option(help="Rows per side, at most (subsampled).")] = 2000,
    as_json: JsonFlag = False,
) -> None:
    """Per-site drift: cross-validated AUROC of telling a site's embeddings from the rest."""
    from plugin.validation.drift_report import drift_document

    settings = command_settings(ctx)
    with exit_on_error(ValueError), open_sessions(settings)() as session:
        document = drift_document(session, model_ref, folds=folds, max_rows=max_rows)
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    typer.echo(f"site drift of {document['model_ref']} embeddings (AUROC, 0.5 = no shift)")
    for row in document["sites"]:
        typer.echo(f"  {row['site']:<40} {row['auroc']:.3f}  ({row['n_site']} images)")
