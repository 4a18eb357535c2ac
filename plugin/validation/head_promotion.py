"""Promote a site-adapted triage head: validate it on labelled images of its site against what
the site uses now, and activate it only if it is not worse (or when forced).

Shared by ``pacsclip adapt promote`` and the dashboard's operations page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from plugin.adaptation.triage_heads import HeadComparison, compare_heads, read_image_labels
from plugin.catalog.embeddings import StoredEmbeddings, load_embeddings
from plugin.catalog.report_labels import ScoredStudy, scored_labeled_studies, study_labels
from plugin.errors import ConfigError
from plugin.inference import TriageModel
from plugin.models.bundle import Bundle
from plugin.settings import Settings
from plugin.triage.site_heads import SiteHeadError, SiteHeadRegistry
from plugin.validation.golive import GateDecision, golive_decision
from plugin.validation.services import floors_of, intake_for, record_decision
from plugin.validation.site_validation import compare_at_site


@dataclass(frozen=True)
class Promotion:
    site: str
    head: int
    comparison: HeadComparison
    activated: bool
    forced: bool
    previous: int | None  # the site head active before, None: the bundle's own scores

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "head": self.head,
            **self.comparison.as_dict(),
            "activated": self.activated,
            "forced": self.forced,
            "previous": self.previous,
        }


def promote_site_head(
    data_dir: Path,
    sessions: sessionmaker[Session],
    model: Bundle,
    site: str,
    head: int,
    labels: Path,
    *,
    tolerance: float = 0.01,
    force: bool = False,
    threads: int | None = None,
) -> Promotion:
    """Validate head ``head`` of ``site`` on ``labels`` (a CSV keyed by SOP or Study Instance
    UID) and activate it if not worse. ConfigError or SiteHeadError say what to fix."""
    registry = SiteHeadRegistry.for_data_dir(data_dir, model.ref)
    entry = registry.entry(head)
    if entry.site != site:
        raise SiteHeadError(f"site head {head} was trained for {entry.site!r}, not {site!r}")
    candidate = registry.load(head)
    with sessions() as session:
        stored = load_embeddings(session, model.ref)
    if not len(stored):
        raise ConfigError(
            f"the catalog has no image embeddings of {model.ref}: analyse studies with this "
            "bundle first"
        )
    if site not in set(stored.sites):
        known = ", ".join(sorted(set(stored.sites))) or "none"
        raise ConfigError(f"no embeddings of site {site!r} in the catalog; its sites are {known}")
    at_site = stored.of_site(site)
    image_labels = read_image_labels(labels, [f.name for f in model.findings])
    aligned = image_labels.align(at_site.sop_instance_uids, at_site.study_instance_uids)
    y = np.column_stack(
        [
            aligned[:, image_labels.findings.index(f)]
            if f in image_labels.findings
            else np.full(len(at_site), np.nan)
            for f in candidate.findings
        ]
    )
    rows = ~np.isnan(y).all(axis=1)
    if not rows.any():
        raise ConfigError(f"{labels.name} labels no image of site {site!r} for {entry.findings}")
    # What the site uses now: the bundle's scores with the site's active head, if any.
    runtime = TriageModel(model, threads=threads, site_heads=registry.active_heads())
    vectors = at_site.vectors[rows]
    current = runtime.scores(vectors, site)
    new = candidate.predict_proba(vectors)
    names = runtime.finding_names
    comparison = compare_heads(
        y[rows],
        {f: new[:, i] for i, f in enumerate(candidate.findings)},
        {f: current[:, names.index(f)] for f in candidate.findings},
        tolerance=tolerance,
    )
    activate = comparison.not_worse or force
    previous = registry.active().get(site)
    if activate:
        registry.activate(
            site,
            head,
            {
                **comparison.as_dict(),
                "labels": labels.name,
                "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "forced": not comparison.not_worse,
                "replaced": previous,
            },
        )
    return Promotion(
        site, head, comparison, activate, activate and not comparison.not_worse, previous
    )


@dataclass(frozen=True)
class HeadGate:
    """The go-live gate's answer for a site head, from the site's own report labels."""

    site: str
    head: int
    candidate: str  # name@version+site-head-vN
    current: str  # what scores the site now
    decision: GateDecision
    validation: dict[str, Any]
    activated: bool
    forced: bool
    previous: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "head": self.head,
            "candidate": self.candidate,
            "current": self.current,
            "gate": self.decision.as_dict(),
            "validation": self.validation,
            "activated": self.activated,
            "forced": self.forced,
            "previous": self.previous,
        }


def gate_site_head(
    settings: Settings,
    sessions: sessionmaker[Session],
    model: Bundle,
    site: str,
    head: int,
    *,
    forced_reason: str | None = None,
) -> HeadGate:
    """Validate head ``head`` of ``site`` against the labels of the site's reports and make it
    the site's head only if the go-live gate allows it (or an operator overrides, audited).

    A head scores the image embeddings the live model stored, so it is measured on every
    labeled study of the site the live model scored, beside the site's current scores: no
    shadow run is needed.
    """
    registry = SiteHeadRegistry.for_data_dir(settings.data_dir, model.ref)
    entry = registry.entry(head)
    if entry.site != site:
        raise SiteHeadError(f"site head {head} was trained for {entry.site!r}, not {site!r}")
    previous = registry.active().get(site)
    candidate_ref = f"{model.ref}+{entry.label}"
    current_ref = model.ref if previous is None else f"{model.ref}+site-head-v{previous}"
    version = intake_for(settings, sessions, embed=False).catch_up()
    with sessions() as session:
        live_rows = [
            r
            for r in scored_labeled_studies(session, version, site=site, since=None)
            if r.model == model.ref and r.scored
        ]
        labels = study_labels(session, [r.study_id for r in live_rows], version)
        stored = load_embeddings(session, model.ref).of_site(site)
    current_model = TriageModel(
        model, threads=settings.inference_threads, site_heads=registry.active_heads()
    )
    candidate_model = TriageModel(
        model, threads=settings.inference_threads, site_heads={site: (head, registry.load(head))}
    )
    current_rows = _rescored(live_rows, stored, current_model, site, current_ref, "live")
    candidate_rows = _rescored(live_rows, stored, candidate_model, site, candidate_ref, "shadow")
    floors = floors_of(settings)
    validation = compare_at_site(site, current_rows, candidate_rows, labels, floors)
    decision = golive_decision(
        validation, candidate_ref, floors=floors, has_ood_reference=model.manifest.ood is not None
    )
    record_decision(sessions, decision, current_ref, forced_reason)
    activated = decision.allowed or forced_reason is not None
    if activated:
        registry.activate(
            site,
            head,
            {
                "gate": decision.as_dict(),
                "labels": f"report labels ({version})",
                "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "forced": not decision.allowed,
                "forced_reason": forced_reason if not decision.allowed else None,
                "replaced": previous,
            },
        )
    return HeadGate(
        site,
        head,
        candidate_ref,
        current_ref,
        decision,
        validation,
        activated,
        activated and not decision.allowed,
        previous,
    )


def _rescored(
    rows: Sequence[ScoredStudy],
    stored: StoredEmbeddings,
    model: TriageModel,
    site: str,
    ref: str,
    role: str,
) -> list[ScoredStudy]:
    """The studies' scores from their stored image embeddings, pooled per study by the
    maximum over its images as the triage does."""
    by_study: dict[str, list[int]] = {}
    for i, uid in enumerate(stored.study_instance_uids):
        by_study.setdefault(uid, []).append(i)
    wanted = [r for r in rows if r.study_instance_uid in by_study]
    if not wanted:
        return []
    probabilities = model.scores(stored.vectors, site)
    names = model.finding_names
    result = []
    for row in wanted:
        pooled = probabilities[by_study[row.study_instance_uid]].max(axis=0)
        scores = {name: float(pooled[i]) for i, name in enumerate(names)}
        result.append(
            replace(
                row,
                model=ref,
                role=role,
                probabilities={n: scores[n] for n in row.probabilities if n in scores},
            )
        )
    return result
