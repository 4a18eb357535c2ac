"""One fine-tuning run from request to installed bundle: what ``pacsclip model finetune`` does
locally and the ``training`` queue's task does in a worker.

The request is message-shaped (plain JSON), so the same run can be sent to a worker. The tuned
bundle is installed in the registry but never activated: ``pacsclip model promote`` does that.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydantic import TypeAdapter, ValidationError

from plugin.finetune.adapters import AdapterConfig, train_adapters
from plugin.finetune.child import EVAL_JSON, EVAL_TEXT, write_tuned_bundle
from plugin.finetune.errors import FinetuneError
from plugin.finetune.evaluation import compare, format_comparison, tuned
from plugin.finetune.features import pair_features
from plugin.finetune.pairs import Pair, PairSet, read_pairs_csv
from plugin.models.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleName,
    BundleVersion,
    Lineage,
    load_bundle,
    sha256_file,
)
from plugin.models.registry import Registry, parse_ref
from plugin.models.runtime import PromptEmbeddings
from plugin.settings import Settings
from plugin.triage import FindingPrompts

logger = logging.getLogger(__name__)

METHOD: Final = "low-rank adapters on frozen towers, symmetric InfoNCE"
MIN_PAIRS: Final = 10
MIN_HELDOUT: Final = 2

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class FinetuneRequest:
    """What to tune, on what, into which version; JSON-safe (it travels as a task message)."""

    parent: str  # name@version, a name (its active, else newest version) or a bundle folder
    version: str
    name: str | None = None  # default: the parent's name
    pairs_csv: str | None = None  # None: the catalog's reported studies
    holdout: float = 0.2
    threads: int | None = None
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> FinetuneRequest:
        return cls(**{**message, "adapter": AdapterConfig(**message.get("adapter", {}))})


@dataclass(frozen=True)
class FinetuneOutcome:
    ref: str
    path: str
    evaluation: dict[str, Any]
    summary: str  # the evaluation as a short text table
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_finetune(
    settings: Settings, request: FinetuneRequest, progress: Progress | None = None
) -> FinetuneOutcome:
    """Tune, evaluate against the parent, write and install the new bundle (not active)."""
    started = time.monotonic()
    say = progress or _log_progress
    _check_request(request)
    registry = Registry.for_data_dir(settings.data_dir)
    parent = resolve_parent(registry, request.parent)
    name = request.name or parent.name
    _check_name(name, request.version, registry)
    pairs = _pairs(settings, request, parent)
    train_rows, heldout_rows = split(len(pairs), request.holdout, request.adapter.seed)
    features = pair_features(parent, pairs.pairs, request.threads, say)
    train_set = features.subset(train_rows)
    config = request.adapter

    def on_epoch(epoch: int, _loss: float) -> None:
        say("training", epoch, config.epochs)

    adapters = train_adapters(
        train_set, parent.manifest.logit_scale, config, _anchors(parent), on_epoch
    )
    heldout = features.subset(heldout_rows)
    labels = pairs.labels(pairs.findings)[heldout_rows] if pairs.findings else None
    evaluation = compare(
        heldout,
        tuned(heldout, adapters),
        parent_prompts=_prompts(parent),
        child_prompts=_prompts(parent, adapters.text.apply),
        logit_scale=parent.manifest.logit_scale,
        labels=labels,
        findings=pairs.findings,
    )
    evaluation["training_pairs"] = len(train_rows)
    evaluation["training_loss"] = {
        "first_epoch": adapters.losses[0],
        "last_epoch": adapters.losses[-1],
    }
    lineage = Lineage(
        parent=parent.ref,
        parent_manifest_sha256=sha256_file(parent.directory / MANIFEST_NAME),
        method=METHOD,
        hyperparameters={**config.as_dict(), "holdout": request.holdout},
        pairs=len(pairs),
        data=pairs.description,
        created=datetime.now(UTC).date().isoformat(),
        evaluation=evaluation,
    )
    say("writing", 0, 1)
    # Staged inside the registry root: the same file system as the installed copy, and a crash
    # leaves only a dot-folder that no listing reads.
    registry.root.mkdir(parents=True, exist_ok=True)
    summary = format_comparison(evaluation)
    with tempfile.TemporaryDirectory(prefix=".finetune-", dir=registry.root) as staging:
        child = write_tuned_bundle(
            parent,
            Path(staging) / "bundle",
            name=name,
            version=request.version,
            adapters=adapters,
            lineage=lineage,
        )
        _write_report(child, evaluation, summary)
        ref = registry.install(child.directory, activate=False)
    say("writing", 1, 1)
    installed = registry.info(name, request.version).entry.path
    logger.info("fine-tuned %s from %s on %d pairs (not active)", ref, parent.ref, len(pairs))
    return FinetuneOutcome(ref, str(installed), evaluation, summary, time.monotonic() - started)


def resolve_parent(registry: Registry, parent: str) -> Bundle:
    """``name@version``, a registry name, or a bundle folder."""
    if "@" in parent:
        name, version = parse_ref(parent)
        return load_bundle(registry.info(name, version).entry.path)
    if Path(parent).is_dir():
        return load_bundle(Path(parent))
    return load_bundle(registry.info(parent).entry.path)


def split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled training and held-out rows; the held-out share is at least MIN_HELDOUT rows."""
    if n < MIN_PAIRS:
        raise FinetuneError(
            f"fine-tuning needs at least {MIN_PAIRS} image-report pairs, got {n}: add pairs "
            "(more reported studies, or more rows in the CSV)"
        )
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_heldout = max(MIN_HELDOUT, round(n * holdout))
    return sorted(order[n_heldout:]), sorted(order[:n_heldout])


def _check_request(request: FinetuneRequest) -> None:
    if not 0.0 < request.holdout < 0.9:
        raise FinetuneError(f"--holdout must be between 0 and 0.9, got {request.holdout}")
    config = request.adapter
    if config.rank < 1 or config.image_rank < 0 or config.epochs < 1 or config.batch_size < 2:
        raise FinetuneError(
            "--rank and --epochs must be >= 1, --image-rank >= 0 and the batch size >= 2"
        )


def _check_name(name: str, version: str, registry: Registry) -> None:
    for kind, value in ((BundleName, name), (BundleVersion, version)):
        try:
            TypeAdapter(kind).validate_python(value)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise FinetuneError(
                f"--{'name' if kind is BundleName else 'version'}: {message}"
            ) from exc
    if any(e.name == name and e.version == version for e in registry.list()):
        raise FinetuneError(f"{name}@{version} is already installed: choose a new --version")


def _pairs(settings: Settings, request: FinetuneRequest, parent: Bundle) -> PairSet:
    known = [f.name for f in parent.findings]
    if request.pairs_csv is not None:
        return read_pairs_csv(Path(request.pairs_csv), known)
    return catalog_pairs(settings)


def catalog_pairs(settings: Settings) -> PairSet:
    """Pairs of every reported study in the catalog, images read from the spool."""
    from plugin.catalog.db import open_catalog
    from plugin.catalog.report_pairs import report_image_pairs
    from plugin.retrieval.sr_text import REPORT_SR_CLASSES

    with open_catalog(settings.effective_database_url).sessions() as session:
        rows = report_image_pairs(session, REPORT_SR_CLASSES)
    if not rows:
        raise FinetuneError(
            "the catalog has no studies with an indexed report: add reports (SR, HL7 ORU or "
            "`pacsclip report add`) or pass --pairs CSV"
        )
    pairs = [
        Pair(settings.spool_dir / row.path, row.report, f"catalog study #{row.study_id}")
        for row in rows
    ]
    studies = len({row.study_id for row in rows})
    sources = ", ".join(sorted({s for row in rows for s in row.sources}))
    return PairSet(
        pairs,
        f"{len(pairs)} image-report pairs from {studies} catalog studies (reports: {sources})",
    )


def _anchors(parent: Bundle) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    """The parent's prompt embeddings: what the text adapter should leave where it is."""
    if parent.prompt_embeddings_path is None:
        return None
    prompts = PromptEmbeddings.load(parent)
    return np.concatenate([*prompts.positive.values(), *prompts.negative.values()])


def _prompts(bundle: Bundle, transform: Callable[[Any], Any] | None = None) -> list[FindingPrompts]:
    if bundle.prompt_embeddings_path is None:
        return []
    prompts = PromptEmbeddings.load(bundle)
    move = transform or (lambda x: x)
    return [
        FindingPrompts.from_prompt_sets(
            f.name, move(prompts.positive[f.name]), move(prompts.negative[f.name])
        )
        for f in bundle.findings
    ]


def _write_report(child: Bundle, evaluation: dict[str, Any], summary: str) -> None:
    report = {
        "bundle": child.ref,
        "parent": child.manifest.lineage.parent if child.manifest.lineage else None,
        **evaluation,
    }
    (child.directory / EVAL_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    heading = f"{child.ref} vs its parent on held-out pairs\n"
    (child.directory / EVAL_TEXT).write_text(heading + summary + "\n", encoding="utf-8")


def _log_progress(stage: str, done: int, total: int) -> None:
    logger.info("finetune %s: %d/%d", stage, done, total)
