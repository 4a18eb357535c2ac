"""``pacsclip model ...``: model bundles, their registry, import, calibration and evaluation."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import TypeAdapter, ValidationError

from plugin.cli.common import JsonFlag, command_settings, exit_on_error, print_json
from plugin.cli.finetune_cmd import model_finetune, model_promote
from plugin.models.bundle import (
    SYNTHETIC_NOTICE,
    Bundle,
    BundleError,
    BundleVersion,
    ImageSpec,
    Manifest,
    load_bundle,
    read_prompts_file,
    validate_model,
)
from plugin.models.registry import BundleReport, Registry, resolve_bundle

if TYPE_CHECKING:
    # Not imported at run time until needed: they load onnxruntime, which `model list` and
    # every other pacsclip command can do without.
    from plugin.bundle_versions import Change, NewVersion
    from plugin.models.importers.onnx import OnnxImport

# The commands import onnxruntime (runtime, importers, tuning, quantize) and torch (the demo
# model) inside the function: they take seconds to load.

model_app = typer.Typer(no_args_is_help=True, help="Model bundles.")

# OpenAI CLIP's pixel statistics: what most RGB CLIP towers (and their fine-tunes) expect.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _registry(ctx: typer.Context) -> Registry:
    settings = command_settings(ctx)
    return Registry.for_data_dir(settings.data_dir, settings.demo_model)


@model_app.command("list")
def model_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Installed and built-in bundles; the live (active) one is marked with '*', shadows with
    the sites where they run."""
    registry = _registry(ctx)
    with exit_on_error():
        entries = registry.list()
        shadows = registry.shadows()
    shadow_sites = {e.ref: [s.site or "*" for s in shadows if s.ref == e.ref] for e in entries}
    if as_json:
        print_json([{**e.as_dict(), "shadow_sites": shadow_sites[e.ref]} for e in entries])
        return
    if not entries:
        typer.echo(f"no model bundles in {registry.root}; add one with `pacsclip model install`")
        return
    for e in entries:
        flags = [f for f, on in (("built-in", e.builtin), ("synthetic", e.synthetic)) if on]
        if shadow_sites[e.ref]:
            flags.append("shadow@" + ",".join(shadow_sites[e.ref]))
        mark = "*" if e.active else " "
        typer.echo(f"{mark} {e.ref:<40} {' '.join(flags):<20} {e.path}")


@model_app.command("info")
def model_info(
    ctx: typer.Context,
    name: str,
    version: Annotated[
        str | None, typer.Option(help="Default: the active version, else the newest.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Manifest summary, model card, findings and checksums (exit 1 when a checksum fails or
    the prompts were edited after their embeddings were written)."""
    registry = _registry(ctx)
    with exit_on_error():
        report = registry.info(name, version)
    if as_json:
        print_json(_report_json(report))
    else:
        _print_report(report)
    stale = report.manifest.stale_prompt_findings
    if stale:
        typer.echo(
            f"error: the prompts of {', '.join(stale)} were edited after prompt_embeddings.npz "
            "was computed from them, and scoring reads only the embeddings: put them back, or "
            "embed them into a new version with `pacsclip model embed-prompts --bundle "
            f"{report.entry.path}`",
            err=True,
        )
    if not report.checksums_ok or stale:
        raise typer.Exit(1)


def _report_json(report: BundleReport) -> dict[str, Any]:
    return {
        **report.entry.as_dict(),
        "manifest": report.manifest.model_dump(mode="json"),
        "checksums_ok": report.checksums_ok,
        "stale_prompts": report.manifest.stale_prompt_findings,
        "checksums": [
            {
                "file": c.label,
                "path": str(c.path),
                "expected": c.expected,
                "actual": c.actual,
                "ok": c.ok,
            }
            for c in report.checks
        ],
    }


def _print_report(report: BundleReport) -> None:
    m, e = report.manifest, report.entry
    image = m.image
    yes_no = {True: "yes", False: "no"}
    typer.echo(f"{m.ref}  ({'built-in' if e.builtin else 'installed'}, {e.path})")
    typer.echo(f"active: {yes_no[e.active]}")
    typer.echo(f"synthetic: {f'yes, {SYNTHETIC_NOTICE}' if m.synthetic else 'no'}")
    typer.echo(f"embedding_dim: {m.embedding_dim}   logit_scale: {m.logit_scale}")
    typer.echo(
        f"image: {image.channels}x{image.size}x{image.size}, mean {image.mean}, std {image.std}, "
        f"resize {image.resize}, window {image.window}"
    )
    typer.echo(f"text encoder: {m.text_encoder.kind}")
    if m.ood is None:
        typer.echo("out-of-distribution reference: none (every image is scored)")
    else:
        fitted = m.ood.fitted_on
        typer.echo(
            f"out-of-distribution reference: {m.ood.method} on {m.ood.features}, threshold "
            f"{m.ood.threshold:.3f} ({m.ood.quantile:g} quantile of {fitted.heldout_n} held-out "
            f"images; fitted on {fitted.n}: {fitted.description})"
        )
    _print_findings(m)
    if m.lineage is not None:
        lineage = m.lineage
        typer.echo(f"lineage: from {lineage.parent} ({lineage.created}): {lineage.method}")
        typer.echo(f"  data: {lineage.data}")
    card = m.model_card
    typer.echo("model card:")
    typer.echo(f"  intended use: {card.intended_use}")
    typer.echo(f"  training data: {card.training_data}")
    typer.echo(f"  limitations: {card.limitations}")
    typer.echo(f"  not for clinical use: {yes_no[card.not_for_clinical_use]}")
    typer.echo(f"checksums: {'OK' if report.checksums_ok else 'FAILED'}")
    for check in report.checks:
        typer.echo(f"  OK      {check.label}" if check.ok else f"  FAILED  {check.describe()}")


def _print_findings(m: Manifest) -> None:
    typer.echo(f"findings: {len(m.findings) or 'none'}")
    for f in m.findings:
        stat = f", stat >= {f.stat_threshold}" if f.stat_threshold is not None else ""
        typer.echo(
            f"  {f.name} ({f.display}): {len(f.positive_prompts)} positive / "
            f"{len(f.negative_prompts)} negative prompts x {len(f.templates)} templates, "
            f"threshold {f.calibration.threshold}{stat}"
        )
    stat_if_any = ", ".join(m.priority.stat_if_any) or "none"
    typer.echo(f"priority: stat if any of [{stat_if_any}], else {m.priority.default}")
    for head in m.heads:
        typer.echo(f"  head {head.name}-v{head.version} ({head.kind}): {', '.join(head.findings)}")


@model_app.command("install")
def model_install(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="A bundle folder with its bundle.json.")],
    activate: Annotated[bool, typer.Option(help="Make it the active bundle.")] = False,
) -> None:
    """Verify a bundle's checksums and copy it into the registry."""
    registry = _registry(ctx)
    with exit_on_error():
        ref = registry.install(directory, activate=activate)
    typer.echo(f"installed {ref}{' (active)' if activate else ''}")


# Fine-tuning on local pairs and the explicit switch to its result (plugin/cli/finetune_cmd.py).
model_app.command("finetune")(model_finetune)
model_app.command("promote")(model_promote)


@model_app.command("activate")
def model_activate(ctx: typer.Context, name: str, version: str) -> None:
    """Make NAME VERSION the bundle the workers use (checksums are verified first)."""
    registry = _registry(ctx)
    with exit_on_error():
        bundle = registry.activate(name, version)
    typer.echo(f"active model: {bundle.ref}")


@model_app.command("shadow")
def model_shadow(
    ctx: typer.Context,
    name: str,
    version: str,
    site: Annotated[
        str | None, typer.Option(help="Only studies of this site key (default: every site).")
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop running it in shadow.")] = False,
) -> None:
    """Run NAME VERSION beside the live model on every study, in shadow: its scores are kept
    for `pacsclip validate`, and nothing of it (SR, overlay, flag, webhook, HL7) leaves pacsclip.
    Workers read the list when they start."""
    registry = _registry(ctx)
    with exit_on_error():
        registry.set_shadow(name, version, site, on=not off)
    where = "every site" if site is None else f"site {site}"
    state = "no longer in shadow" if off else "in shadow"
    typer.echo(f"{name}@{version} {state} at {where} (restart the workers to apply)")


@model_app.command("import-onnx")
def model_import_onnx(
    ctx: typer.Context,
    image: Annotated[Path, typer.Option("--image", help="Image tower ONNX file.")],
    name: Annotated[str, typer.Option(help="Bundle name (lowercase, digits, . _ -).")],
    version: Annotated[str, typer.Option(help="Bundle version, e.g. 2026.1.0.")],
    embedding_dim: Annotated[int, typer.Option(help="Size D of the embeddings.")],
    text: Annotated[Path | None, typer.Option("--text", help="Text tower ONNX file.")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Folder with the text tower's tokenizer.json.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="JSON file with findings (and priority); needs --text.")
    ] = None,
    size: Annotated[int, typer.Option(help="Input height and width in pixels.")] = 224,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB).")] = 3,
    mean: Annotated[
        str | None, typer.Option(help="Comma-separated per-channel mean; default OpenAI CLIP's.")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Comma-separated per-channel std; default OpenAI CLIP's.")
    ] = None,
    resize: Annotated[str, typer.Option(help="letterbox, stretch or center-crop.")] = "letterbox",
    activate: Annotated[bool, typer.Option(help="Make it the active bundle.")] = False,
) -> None:
    """Check ONNX towers by running them, pin them by SHA-256, write a bundle and install it."""
    from plugin.models.importers.onnx import OnnxImport

    registry = _registry(ctx)
    with exit_on_error():
        spec_image = validate_model(
            ImageSpec,
            {
                "size": size,
                "channels": channels,
                "mean": _floats("--mean", mean, CLIP_MEAN if channels == 3 else (0.5,)),
                "std": _floats("--std", std, CLIP_STD if channels == 3 else (0.5,)),
                "resize": resize,
            },
            "the image options are invalid",
        )
        spec = OnnxImport(
            image_tower=image,
            name=name,
            version=version,
            embedding_dim=embedding_dim,
            image=spec_image,
            text_tower=text,
            tokenizer_dir=tokenizer,
            prompts=read_prompts_file(prompts) if prompts is not None else None,
        )
        ref = _build_and_install(registry, spec, activate)
    typer.echo(f"installed {ref}{' (active)' if activate else ''}")


def _build_and_install(registry: Registry, spec: OnnxImport, activate: bool) -> str:
    from plugin.models.importers.onnx import build_onnx_bundle

    # Staged inside the registry root: same file system as the final copy, and a crash
    # leaves only a dot-folder that no listing reads.
    registry.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=registry.root) as staging:
        bundle = build_onnx_bundle(spec, Path(staging) / "bundle")
        return registry.install(bundle.directory, activate=activate)


ImportName = Annotated[
    str | None, typer.Option(help="Bundle name; default: from the folder or file name.")
]
ImportVersion = Annotated[
    str | None, typer.Option(help="Bundle version; default: sha256- and the weights' digest.")
]
ImportPrompts = Annotated[
    Path | None,
    typer.Option(help="JSON file with findings (and priority); default: six chest findings."),
]
ImportTokenizer = Annotated[
    Path | None, typer.Option(help="Folder with the tokenizer files; default: the model's.")
]
ImportActivate = Annotated[bool, typer.Option(help="Make it the active bundle.")]


@model_app.command("import-hf")
def model_import_hf(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(help="Hugging Face CLIPModel or SiglipModel folder.")
    ],
    name: ImportName = None,
    version: ImportVersion = None,
    prompts: ImportPrompts = None,
    tokenizer: ImportTokenizer = None,
    activate: ImportActivate = False,
) -> None:
    """Export a local Hugging Face CLIP/SigLIP model to ONNX, write a bundle and install it."""
    from plugin.models.importers.hf import HfImport, build_hf_bundle, weight_files
    from plugin.models.importers.naming import default_name, weights_version

    registry = _registry(ctx)
    with exit_on_error():
        spec = HfImport(
            folder=directory,
            name=name or default_name(directory),
            version=version or weights_version(weight_files(directory)),
            prompts=read_prompts_file(prompts) if prompts is not None else None,
            tokenizer_dir=tokenizer,
        )
        ref = _stage_and_install(registry, partial(build_hf_bundle, spec), activate)
    typer.echo(f"installed {ref}{' (active)' if activate else ''}")


@model_app.command("import-open-clip")
def model_import_open_clip(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="Checkpoint folder, or the weights file beside its config.")
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="open_clip model config JSON; default: open_clip_config.json."),
    ] = None,
    name: ImportName = None,
    version: ImportVersion = None,
    prompts: ImportPrompts = None,
    tokenizer: ImportTokenizer = None,
    quick_gelu: Annotated[
        bool | None,
        typer.Option(
            "--quick-gelu/--no-quick-gelu",
            help="Activation of OpenAI-style towers; default: the config's quick_gelu.",
        ),
    ] = None,
    activate: ImportActivate = False,
) -> None:
    """Load an open_clip checkpoint with pacsclip's own code, export it, write a bundle."""
    from plugin.models.importers.naming import default_name, weights_version
    from plugin.models.importers.open_clip import (
        OpenClipImport,
        build_open_clip_bundle,
        find_checkpoint,
    )

    registry = _registry(ctx)
    with exit_on_error():
        checkpoint = find_checkpoint(path)
        spec = OpenClipImport(
            path=checkpoint,
            name=name or default_name(path),
            version=version or weights_version([checkpoint]),
            config=config,
            tokenizer_dir=tokenizer,
            prompts=read_prompts_file(prompts) if prompts is not None else None,
            quick_gelu=quick_gelu,
        )
        ref = _stage_and_install(registry, partial(build_open_clip_bundle, spec), activate)
    typer.echo(f"installed {ref}{' (active)' if activate else ''}")


def _stage_and_install(registry: Registry, build: Callable[[Path], Bundle], activate: bool) -> str:
    """Build a bundle in a staging folder of the registry, then install it from there."""
    registry.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=registry.root) as staging:
        bundle = build(Path(staging) / "bundle")
        return registry.install(bundle.directory, activate=activate)


def _floats(option: str, text: str | None, default: tuple[float, ...]) -> list[float]:
    if text is None:
        return list(default)
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise BundleError(f"{option} must be comma-separated numbers, got {text!r}") from exc


BundleOption = Annotated[
    Path | None,
    typer.Option(
        "--bundle",
        help="Bundle folder to start from (default: the live bundle: the active one, else the "
        "built-in demo); only read.",
    ),
]
LabelsOption = Annotated[
    Path, typer.Option("--labels", help="CSV: a 'path' column and 1/0 per finding column.")
]
NewVersionOption = Annotated[
    str | None,
    typer.Option("--version", help="Version of the new bundle; default: the source's plus +TAGn."),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write the new version to this new or empty folder instead of installing it.",
    ),
]
ThreadsOption = Annotated[int | None, typer.Option(help="onnxruntime threads.")]


def _source_bundle(ctx: typer.Context, bundle: Path | None) -> Bundle:
    """The bundle a new version is made from: ``--bundle DIR``, else the live one (the
    active bundle, else the built-in demo), as the workers run it."""
    if bundle is not None:
        return load_bundle(bundle)
    settings = command_settings(ctx)
    return resolve_bundle(settings.data_dir, settings.model_bundle)


def _new_version(
    ctx: typer.Context,
    bundle: Path | None,
    change: Callable[[Path], Change],
    *,
    tag: str,
    version: str | None,
    out: Path | None,
) -> NewVersion:
    """Copy the source bundle, change the copy, install it inactive (or write it to --out)."""
    from plugin.bundle_versions import derive_version

    with exit_on_error():
        source = _source_bundle(ctx, bundle)
        return derive_version(_registry(ctx), source, change, tag=tag, version=version, out=out)


def _report_new_version(made: NewVersion) -> None:
    m = made.manifest
    if made.installed:
        typer.echo(
            f"installed {m.ref} (not active; pacsclip model promote {m.name} {m.version} "
            "makes it live)"
        )
    else:
        typer.echo(
            f"wrote {m.ref} to {made.path} (not installed; pacsclip model install "
            f"{made.path} adds it)"
        )


@model_app.command("calibrate")
def model_calibrate(
    ctx: typer.Context,
    labels: LabelsOption,
    bundle: BundleOption = None,
    holdout: Annotated[
        float,
        typer.Option(help="Share of the labelled images held out to measure the fit (0-0.5)."),
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seeds the held-out split.")] = 0,
    target_sensitivity: Annotated[
        float | None,
        typer.Option(
            help="Each threshold: the highest reaching this sensitivity on the fitting images "
            "(default: the one maximising Youden's J)."
        ),
    ] = None,
    version: NewVersionOption = None,
    out: OutOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Fit each labelled finding's temperature, bias and threshold on local images, into a
    new version (+calN) installed inactive; the source bundle is not changed."""
    from plugin.bundle_tuning import calibrate
    from plugin.bundle_versions import CALIBRATE_TAG

    def change(directory: Path) -> Change:
        fitted = calibrate(
            directory,
            labels,
            holdout=holdout,
            seed=seed,
            target_sensitivity=target_sensitivity,
            threads=threads,
        )
        return fitted.change

    made = _new_version(ctx, bundle, change, tag=CALIBRATE_TAG, version=version, out=out)
    typer.echo(made.change.evaluation["summary"])
    _report_new_version(made)


@model_app.command("fit-head")
def model_fit_head(
    ctx: typer.Context,
    labels: LabelsOption,
    kind: Annotated[str, typer.Option(help="linear_probe or tip_adapter.")] = "linear_probe",
    bundle: BundleOption = None,
    activate: Annotated[bool, typer.Option(help="Use the head for triage.")] = True,
    version: NewVersionOption = None,
    out: OutOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Fit a few-shot head on embeddings of labelled images, into a new version (+headN)
    installed inactive; the source bundle is not changed."""
    from plugin.bundle_tuning import fit_head
    from plugin.bundle_versions import HEAD_TAG

    def change(directory: Path) -> Change:
        return fit_head(directory, labels, kind=kind, activate=activate, threads=threads).change

    made = _new_version(ctx, bundle, change, tag=HEAD_TAG, version=version, out=out)
    typer.echo(made.change.method)
    _report_new_version(made)


@model_app.command("fit-ood")
def model_fit_ood(
    ctx: typer.Context,
    bundle: Annotated[
        Path | None,
        typer.Argument(
            help="Bundle folder to start from (default: the live bundle: the active one, else "
            "the built-in demo)."
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Folder of DICOM images like those the bundle will score."),
    ] = None,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Phantoms of the demo generator (synthetic bundles only)."),
    ] = False,
    quantile: Annotated[
        float, typer.Option(min=0.5, max=0.9999, help="Held-out quantile of the threshold.")
    ] = 0.995,
    heldout_fraction: Annotated[
        float, typer.Option(help="--images: share held out to set the threshold.")
    ] = 0.5,
    n_fit: Annotated[int, typer.Option(min=20, help="--demo: phantoms to fit on.")] = 2000,
    n_heldout: Annotated[
        int, typer.Option(min=10, help="--demo: other phantoms to set the threshold on.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seeds the split (--images) or phantoms (--demo).")] = 0,
    version: NewVersionOption = None,
    out: OutOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Fit the out-of-distribution reference that decides which studies are not scored, into
    a new version (+oodN) installed inactive; the source bundle is not changed."""
    from plugin.bundle_ood import dicom_images, fit_ood, ood_change, read_images, split_paths
    from plugin.bundle_versions import OOD_TAG
    from plugin.demo.radiographs import fit_demo_ood

    if (images is None) == (not demo):
        typer.echo("error: give exactly one of --images DIR and --demo", err=True)
        raise typer.Exit(2)
    skipped: list[Path] = []

    def change(directory: Path) -> Change:
        parent = load_bundle(directory).manifest
        settings: dict[str, float | int | str | bool] = {"quantile": quantile, "seed": seed}
        if images is not None:
            fit_paths, heldout_paths = split_paths(dicom_images(images), heldout_fraction, seed)
            fitted = fit_ood(
                directory,
                read_images(fit_paths, lambda path, _: skipped.append(path)),
                read_images(heldout_paths, lambda path, _: skipped.append(path)),
                description=f"{images.name}: DICOM images, held-out fraction {heldout_fraction}",
                quantile=quantile,
                threads=threads,
            )
            settings["heldout_fraction"] = heldout_fraction
        else:
            fitted = fit_demo_ood(
                directory,
                seed=seed,
                n_fit=n_fit,
                n_heldout=n_heldout,
                quantile=quantile,
                threads=threads,
            )
            settings["source"] = "demo phantoms"
        return ood_change(fitted, parent, settings)

    made = _new_version(ctx, bundle, change, tag=OOD_TAG, version=version, out=out)
    if skipped:
        typer.echo(f"skipped {len(skipped)} objects without pixel data")
    typer.echo(
        f"{made.ref}: out-of-distribution reference fitted on {made.change.data}; "
        f"{made.change.evaluation['summary']}"
    )
    _report_new_version(made)


@model_app.command("embed-prompts")
def model_embed_prompts(
    ctx: typer.Context,
    bundle: BundleOption = None,
    version: NewVersionOption = None,
    out: OutOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Embed the findings' prompts as bundle.json has them (after editing them) with the
    bundle's text encoder, into a new version (+promptsN) installed inactive."""
    from plugin.bundle_tuning import embed_prompts_into
    from plugin.bundle_versions import PROMPTS_TAG

    def change(directory: Path) -> Change:
        return embed_prompts_into(directory, threads=threads)

    made = _new_version(ctx, bundle, change, tag=PROMPTS_TAG, version=version, out=out)
    typer.echo(f"{made.change.method}: {made.change.data}")
    _report_new_version(made)


@model_app.command("quantize")
def model_quantize(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Argument(help="Bundle folder to quantise.")],
    dest: Annotated[Path, typer.Argument(help="Empty folder for the int8 copy.")],
    install: Annotated[bool, typer.Option(help="Install the int8 copy in the registry.")] = False,
) -> None:
    """Make an int8 (dynamic quantisation) copy of a bundle and report the parity it loses."""
    from plugin.models.quantize import quantize_bundle

    with exit_on_error():
        try:
            quantized, parity = quantize_bundle(bundle, dest)
        except FileExistsError as exc:
            raise BundleError(str(exc)) from exc
        if install:
            _registry(ctx).install(dest)
    typer.echo(
        f"{quantized.ref}: embedding cosine to fp32 mean {parity.mean_cosine:.5f}, "
        f"min {parity.min_cosine:.5f} over {parity.samples} random inputs"
    )


@model_app.command("train-demo")
def model_train_demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="New or empty folder for the bundle.")],
    seed: Annotated[int, typer.Option(help="Seeds the data, the sentence split, the weights.")] = 0,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs; default: the built-in model's run.")
    ] = None,
    n_train: Annotated[
        int | None, typer.Option(min=1, help="Training cases; default: the built-in model's run.")
    ] = None,
    n_eval: Annotated[
        int | None, typer.Option(min=2, help="Held-out cases for the metrics printed at the end.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads and rendering processes (default 2).")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Bundle version; default: the UTC date and time.")
    ] = None,
    n_ood: Annotated[
        int,
        typer.Option(
            min=20,
            help="Phantoms the out-of-distribution reference is fitted on (as many again "
            "set its threshold).",
        ),
    ] = 2000,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Sentence-embedding cache; default $XDG_CACHE_HOME/pacsclip/..."),
    ] = None,
    install: Annotated[bool, typer.Option(help="Install the bundle in the registry.")] = False,
    activate: Annotated[
        bool, typer.Option("--activate", help="Install it and make it the active bundle.")
    ] = False,
) -> None:
    """Train the synthetic demo model on CPU and write a complete bundle (not for clinical use)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        typer.echo(f"error: {out} is not an empty folder: choose a new one", err=True)
        raise typer.Exit(2)
    version = version or datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S")
    # Settings and the version are checked now, not after a long training run.
    registry = _registry(ctx) if install or activate else None
    with exit_on_error():
        _check_version(version)
    # Idle OpenMP threads busy-wait, and on a shared 2-core machine they steal the cores the
    # working threads need; it must be set before torch (and its OpenMP runtime) loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from plugin.demo.packaging import write_demo_bundle
    from plugin.demo.train import DemoConfig, format_metrics, train_demo

    full = DemoConfig()
    with exit_on_error():
        result = train_demo(
            out,
            seed,
            n_train=full.n_train if n_train is None else n_train,
            epochs=full.epochs if epochs is None else epochs,
            threads=full.threads if threads is None else threads,
            n_eval=full.n_eval if n_eval is None else n_eval,
            cache_dir=cache_dir,
            progress=typer.echo,
        )
        bundle = write_demo_bundle(out, result, version, n_ood=(n_ood, n_ood), threads=threads)
        typer.echo(format_metrics(result))
        typer.echo(f"wrote {bundle.ref} to {out}")
        if registry is not None:
            ref = registry.install(out, activate=activate)
            typer.echo(f"installed {ref}{' (active)' if activate else ''}")


def _check_version(version: str) -> None:
    try:
        TypeAdapter(BundleVersion).validate_python(version)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise BundleError(f"--version: {message}") from exc


@model_app.command("eval")
def model_eval(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(help="Bundle name; default: the active bundle, else the built-in demo."),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Default: the active version, else the newest.")
    ] = None,
    n_eval: Annotated[int, typer.Option(min=20, help="Held-out synthetic cases.")] = 1200,
    seed: Annotated[int, typer.Option(help="Seeds the cases, reports and resamples.")] = 0,
    bootstrap: Annotated[int, typer.Option(min=1, help="Bootstrap resamples.")] = 1000,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads.")] = 2,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the figures; default DATA_DIR/model-eval/NAME-VERSION."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Zero-shot AUROC (95% bootstrap CI), calibration and retrieval on held-out phantoms."""
    if version is not None and name is None:
        typer.echo("error: --version needs the bundle NAME", err=True)
        raise typer.Exit(2)
    from plugin.demo.evaluation import evaluate_bundle, format_evaluation, write_figures

    with exit_on_error():
        bundle = _bundle_to_evaluate(ctx, name, version)
        evaluation = evaluate_bundle(
            bundle,
            n_eval=n_eval,
            seed=seed,
            n_bootstrap=bootstrap,
            threads=threads,
            progress=lambda line: typer.echo(line, err=True),
        )
    # Under the data directory, not the current one: run from a checkout, it would leave an
    # untracked folder there.
    data_dir = command_settings(ctx).data_dir
    out_dir = out or data_dir / "model-eval" / f"{bundle.name}-{bundle.version}"
    try:
        figures = write_figures(evaluation, out_dir)
        data = {**evaluation.as_dict(), "figures": [str(path) for path in figures]}
        text = json.dumps(data, indent=2) + "\n"
        (out_dir / "evaluation.json").write_text(text, encoding="utf-8")
    except OSError as exc:
        typer.echo(f"error: cannot write the figures to {out_dir}: {exc}", err=True)
        raise typer.Exit(2) from exc
    # With --json, stdout holds the JSON alone.
    typer.echo(f"evaluation written to {out_dir}", err=as_json)
    if as_json:
        print_json(data)
        return
    typer.echo(format_evaluation(evaluation))
    typer.echo(f"figures: {', '.join(str(path) for path in figures)}")


def _bundle_to_evaluate(ctx: typer.Context, name: str | None, version: str | None) -> Bundle:
    if name is None:
        return resolve_bundle(command_settings(ctx).data_dir)
    return load_bundle(_registry(ctx).info(name, version).entry.path)
