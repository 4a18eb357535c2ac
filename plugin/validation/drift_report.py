"""Per-site drift of the stored image embeddings: catalog rows in, one figure per site out.

Shared by ``pacsclip adapt drift`` and ``GET /api/sites/drift``; the figure is
:func:`plugin.adaptation.drift.site_drift`'s cross-validated AUROC (0.5 = no shift).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from plugin.adaptation.drift import site_drift
from plugin.catalog.embeddings import latest_model_ref, load_embeddings
from plugin.errors import ConfigError

MEANING = (
    "cross-validated AUROC of a logistic regression telling the site's embeddings from the "
    "other sites'; 0.5 = no shift it can see, 1.0 = every image's site is obvious"
)


def drift_document(
    session: Session, model_ref: str | None = None, *, folds: int = 5, max_rows: int = 2000
) -> dict[str, Any]:
    """Drift of every site for ``model_ref`` (default: the newest embeddings' model)."""
    ref = model_ref or latest_model_ref(session)
    if ref is None:
        raise ConfigError("the catalog has no image embeddings yet: analyse studies first")
    stored = load_embeddings(session, ref)
    if not len(stored):
        raise ConfigError(f"the catalog has no image embeddings of {ref}")
    if len(set(stored.sites)) < 2:
        raise ConfigError(f"drift needs embeddings of at least two sites; {ref} has one")
    results = site_drift(stored.vectors, np.array(stored.sites), folds=folds, max_rows=max_rows)
    return {"model_ref": ref, "meaning": MEANING, "sites": [asdict(r) for r in results]}
