"""Reading stored image embeddings (table ``image_embedding``) with their study and site."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from plugin.catalog.models import ImageEmbedding, Site, Study


@dataclass(frozen=True, eq=False)
class StoredEmbeddings:
    """Rows of one model version, in insertion order; ``vectors`` is [N, D] float32."""

    model_ref: str
    sop_instance_uids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    sites: tuple[str, ...]
    vectors: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.sop_instance_uids)

    def of_site(self, site: str) -> StoredEmbeddings:
        keep = [i for i, s in enumerate(self.sites) if s == site]
        return StoredEmbeddings(
            self.model_ref,
            tuple(self.sop_instance_uids[i] for i in keep),
            tuple(self.study_instance_uids[i] for i in keep),
            tuple(self.sites[i] for i in keep),
            self.vectors[keep],
        )


def latest_model_ref(session: Session) -> str | None:
    """The model version of the newest stored embedding: what the workers produce now."""
    return session.scalar(
        select(ImageEmbedding.model_ref).order_by(ImageEmbedding.id.desc()).limit(1)
    )


def embedding_counts(session: Session) -> dict[str, int]:
    """Stored embeddings per model version."""
    rows = session.execute(
        select(ImageEmbedding.model_ref, func.count()).group_by(ImageEmbedding.model_ref)
    )
    return {str(ref): int(count) for ref, count in rows}


def load_embeddings(session: Session, model_ref: str) -> StoredEmbeddings:
    """Every embedding of ``model_ref`` with its Study Instance UID and site key."""
    rows = session.execute(
        select(
            ImageEmbedding.sop_instance_uid,
            Study.study_instance_uid,
            Site.key,
            ImageEmbedding.dim,
            ImageEmbedding.vector,
        )
        .join(Study, ImageEmbedding.study_id == Study.id)
        .join(Site, ImageEmbedding.site_id == Site.id)
        .where(ImageEmbedding.model_ref == model_ref)
        .order_by(ImageEmbedding.id)
    ).all()
    dims = {int(row.dim) for row in rows}
    if len(dims) > 1:
        raise ValueError(f"embeddings of {model_ref} have several sizes: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    vectors = np.zeros((len(rows), dim), dtype=np.float32)
    for i, row in enumerate(rows):
        vector = np.frombuffer(row.vector, dtype="<f4")
        if vector.shape != (dim,):
            raise ValueError(
                f"embedding {row.sop_instance_uid} has {vector.size} values, not {dim}"
            )
        vectors[i] = vector
    return StoredEmbeddings(
        model_ref,
        tuple(str(row.sop_instance_uid) for row in rows),
        tuple(str(row.study_instance_uid) for row in rows),
        tuple(str(row.key) for row in rows),
        vectors,
    )
