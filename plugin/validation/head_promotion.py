"""Promote a site-adapted triage head: validate it on labelled images of its site against what
the site uses now, and activate it only if it is not worse (or when forced).

Shared by ``pacsclip adapt promote`` and the dashboard's operations page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from plugin.adaptation.triage_heads import HeadComparison, compare_heads, read_image_labels
from plugin.catalog.embeddings import load_embeddings
from plugin.errors import ConfigError
from plugin.inference import TriageModel
from plugin.models.bundle import Bundle
from plugin.triage.site_heads import SiteHeadError, SiteHeadRegistry


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
