"""Stored image embeddings (table ``image_embedding``): kept per scored image, read back with
their study and site."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def keep_image_embeddings(
    session: Session,
    *,
    study_id: int,
    site_id: int,
    model_ref: str,
    sop_instance_uids: Sequence[str],
    vectors: npt.NDArray[np.float32],
) -> None:
    """Add each image's embedding under ``model_ref``, once: images the study already has
    an embedding of under that model are skipped."""
    known = set(
        session.scalars(
            select(ImageEmbedding.sop_instance_uid).where(
                ImageEmbedding.study_id == study_id, ImageEmbedding.model_ref == model_ref
            )
        )
    )
    for sop_uid, vector in zip(sop_instance_uids, vectors, strict=True):
        if sop_uid in known:
            continue
        session.add(
            ImageEmbedding(
                sop_instance_uid=sop_uid,
                study_id=study_id,
                site_id=site_id,
                model_ref=model_ref,
                dim=int(vector.shape[0]),
                vector=vector.astype("<f4").tobytes(),
            )
        )


def study_vectors(session: Session, study_id: int, model_ref: str) -> list[bytes]:
    """The stored embeddings (float32, little endian) of a study's images under one model."""
    return list(
        session.scalars(
            select(ImageEmbedding.vector).where(
                ImageEmbedding.study_id == study_id, ImageEmbedding.model_ref == model_ref
            )
        )
    )


def sop_instance_uids_of(session: Session, embedding_ids: Iterable[int]) -> dict[int, str]:
    """Embedding row id -> the SOP Instance UID of the image it embeds."""
    rows = session.execute(
        select(ImageEmbedding.id, ImageEmbedding.sop_instance_uid).where(
            ImageEmbedding.id.in_(list(embedding_ids))
        )
    )
    return {key: sop for key, sop in rows}
