"""Embedding rows in row-id order, as the vector indexes catch up from them: image embeddings
(table ``image_embedding``) or report embeddings (table ``report_embedding``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from plugin.catalog.models import ImageEmbedding, ReportEmbedding


@dataclass(frozen=True)
class EmbeddingRows:
    """The rows of one embedding table, read ``batch`` rows at a time."""

    table: type[ImageEmbedding] | type[ReportEmbedding]

    def owners(
        self, session: Session, model_ref: str, *, upto: int, batch: int
    ) -> Iterator[tuple[int, int]]:
        """(row id, study id) of every row of ``model_ref`` with an id up to ``upto``."""
        table = self.table
        query = (
            select(table.id, table.study_id)
            .where(table.model_ref == model_ref, table.id <= upto)
            .execution_options(yield_per=batch)
        )
        for key, study in session.execute(query):
            yield int(key), int(study)

    def after(
        self, session: Session, model_ref: str, *, after: int, batch: int
    ) -> Iterator[tuple[int, int, bytes]]:
        """(row id, study id, float32 little-endian vector) of every row of ``model_ref``
        with an id above ``after``, in id order."""
        table = self.table
        query = (
            select(table.id, table.study_id, table.vector)
            .where(table.model_ref == model_ref, table.id > after)
            .order_by(table.id)
            .execution_options(yield_per=batch)
        )
        for key, study, blob in session.execute(query):
            yield int(key), int(study), blob


IMAGE_EMBEDDING_ROWS = EmbeddingRows(ImageEmbedding)
REPORT_EMBEDDING_ROWS = EmbeddingRows(ReportEmbedding)
