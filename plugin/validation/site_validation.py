"""Per site, per finding, per model: how the scores compare with the labels from the reports.

The live model and every other model that scored the same studies (shadow candidates, earlier
versions) are measured side by side; a candidate is compared with the live model on the studies
both scored, with a paired bootstrap interval of the AUROC difference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from plugin.catalog.report_labels import ScoredStudy, scored_labeled_studies, study_labels
from plugin.validation.report_labeler import ReportLabel
from plugin.validation.statistics import Floors, finding_figures, paired_auroc_difference

DEFAULT_THRESHOLD = 0.5


def validate(
    sessions: sessionmaker[Session],
    labeler_version: str,
    *,
    live_model: str | None,
    site: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    floors: Floors,
) -> dict[str, Any]:
    """The validation report as plain data (for ``--json``, the API and the page)."""
    with sessions() as session:
        scored = scored_labeled_studies(session, labeler_version, site=site, since=since)
        labels = study_labels(session, sorted({s.study_id for s in scored}), labeler_version)
    by_site: dict[str, dict[str, list[ScoredStudy]]] = defaultdict(lambda: defaultdict(list))
    for row in scored:
        by_site[row.site][row.model].append(row)
    sites = []
    for site_key in sorted(by_site):
        models = by_site[site_key]
        wanted = [m for m in models if model is None or m in (model, live_model)]
        sites.append(
            {
                "site": site_key,
                "models": [
                    _model_figures(
                        m, models[m], labels, floors, live_model, models.get(live_model or "")
                    )
                    for m in sorted(wanted, key=lambda m: (m != live_model, m))
                ],
            }
        )
    return {
        "labeler": labeler_version,
        "live_model": live_model,
        "floors": asdict(floors),
        "filters": {"site": site, "model": model, "since": since.isoformat() if since else None},
        "sites": sites,
    }


def compare_at_site(
    site: str,
    live_rows: Sequence[ScoredStudy],
    candidate_rows: Sequence[ScoredStudy],
    labels: dict[int, dict[str, str | None]],
    floors: Floors,
) -> dict[str, Any]:
    """The validation report of one site for scores computed outside the catalog's analyses
    (a site head rescoring the stored embeddings), in :func:`validate`'s shape."""
    live = live_rows[0].model if live_rows else None
    models = [_model_figures(live, live_rows, labels, floors, live, None)] if live else []
    if candidate_rows:
        candidate = candidate_rows[0].model
        models.append(_model_figures(candidate, candidate_rows, labels, floors, live, live_rows))
    return {
        "live_model": live,
        "floors": asdict(floors),
        "sites": [{"site": site, "models": models}],
    }


def _model_figures(
    model: str,
    rows: Sequence[ScoredStudy],
    labels: dict[int, dict[str, str | None]],
    floors: Floors,
    live_model: str | None,
    live_rows: Sequence[ScoredStudy] | None,
) -> dict[str, Any]:
    scored = [r for r in rows if r.scored]
    findings: dict[str, Any] = {}
    names = sorted({name for r in scored for name in r.probabilities})
    for name in names:
        scores, truth, uncertain, unlabeled = _paired_up(scored, labels, name)
        threshold = next(
            (r.thresholds[name] for r in scored if name in r.thresholds), DEFAULT_THRESHOLD
        )
        figures = finding_figures(scores, truth, threshold, floors).as_dict()
        figures.update(uncertain=uncertain, unlabeled=unlabeled)
        findings[name] = figures
    answer: dict[str, Any] = {
        "model": model,
        "role": _role(model, rows, live_model),
        "studies": len(rows),
        "not_scored": len(rows) - len(scored),
        "findings": findings,
    }
    if model != live_model and live_rows:
        answer["versus_live"] = _versus_live(scored, live_rows, labels, names, floors)
    return answer


def _role(model: str, rows: Sequence[ScoredStudy], live_model: str | None) -> str:
    """live: the active model; shadow: a candidate scoring in shadow; earlier: once live."""
    if model == live_model:
        return "live"
    return "shadow" if any(r.role == "shadow" for r in rows) else "earlier"


def _paired_up(
    rows: Sequence[ScoredStudy], labels: dict[int, dict[str, str | None]], name: str
) -> tuple[list[float], list[bool], int, int]:
    scores: list[float] = []
    truth: list[bool] = []
    uncertain = unlabeled = 0
    for row in rows:
        label = labels.get(row.study_id, {}).get(name)
        if name not in row.probabilities:
            continue
        if label == ReportLabel.UNCERTAIN:
            uncertain += 1
        elif label in (ReportLabel.PRESENT, ReportLabel.ABSENT):
            scores.append(row.probabilities[name])
            truth.append(label == ReportLabel.PRESENT)
        else:
            unlabeled += 1
    return scores, truth, uncertain, unlabeled


def _versus_live(
    candidate: Sequence[ScoredStudy],
    live_rows: Sequence[ScoredStudy],
    labels: dict[int, dict[str, str | None]],
    names: Sequence[str],
    floors: Floors,
) -> dict[str, Any]:
    live = {r.study_id: r for r in live_rows if r.scored}
    both = [r for r in candidate if r.study_id in live]
    result: dict[str, Any] = {}
    for name in names:
        cand_scores: list[float] = []
        live_scores: list[float] = []
        truth: list[bool] = []
        for row in both:
            label = labels.get(row.study_id, {}).get(name)
            other = live[row.study_id].probabilities.get(name)
            if label not in (ReportLabel.PRESENT, ReportLabel.ABSENT) or other is None:
                continue
            if name not in row.probabilities:
                continue
            cand_scores.append(row.probabilities[name])
            live_scores.append(other)
            truth.append(label == ReportLabel.PRESENT)
        y = np.asarray(truth, dtype=bool)
        positives, negatives = int(y.sum()), int((~y).sum())
        entry: dict[str, Any] = {
            "studies": len(truth),
            "positives": positives,
            "negatives": negatives,
        }
        if positives < floors.min_positives or negatives < floors.min_negatives:
            entry["enough"] = False
        else:
            diff = paired_auroc_difference(
                cand_scores, live_scores, y, n_resamples=floors.bootstrap, seed=floors.seed
            )
            entry.update(
                enough=True,
                auroc_difference=round(diff.estimate, 4),
                ci95=[round(diff.low, 4), round(diff.high, 4)],
            )
        result[name] = entry
    return result
