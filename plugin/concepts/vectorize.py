"""Document concept sets to fixed-width feature vectors over the K most frequent concepts.

Ji et al. (ICHI 2023) used the 1001 most frequent concepts as features; K is configurable. The
vocabulary is fitted on training documents only and saved beside the model, so that a model
trained at one site reads another site's documents in the same column order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from plugin.errors import PacsclipError

DEFAULT_K = 1001
FILE_FORMAT = "pacsclip.concept-vocabulary"
FILE_VERSION = 1


class VocabularyFileError(PacsclipError):
    """A saved vocabulary file is missing, unreadable or not in the expected format."""


class ConceptVocabulary:
    """An ordered list of concept codes; column ``i`` of a feature matrix is ``codes[i]``.

    Order is by document frequency, most frequent first, ties broken by code, so the same
    training documents always give the same columns. The width is ``min(k, distinct codes)``.
    """

    def __init__(
        self, codes: Sequence[str], document_frequency: Sequence[int], n_documents: int, k: int
    ) -> None:
        if len(codes) != len(document_frequency):
            raise ValueError("codes and document_frequency differ in length")
        if len(set(codes)) != len(codes):
            raise ValueError("duplicate codes in vocabulary")
        self.codes: tuple[str, ...] = tuple(codes)
        self.document_frequency: tuple[int, ...] = tuple(int(f) for f in document_frequency)
        self.n_documents = n_documents
        self.k = k
        self._index: Mapping[str, int] = {code: i for i, code in enumerate(self.codes)}

    @classmethod
    def fit(
        cls, documents_concepts: Iterable[Iterable[str]], k: int = DEFAULT_K
    ) -> ConceptVocabulary:
        """Keep the ``k`` codes present in the most documents (a repeat in one document counts
        once)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        frequency: Counter[str] = Counter()
        n_documents = 0
        for concepts in documents_concepts:
            frequency.update(set(concepts))
            n_documents += 1
        ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))[:k]
        return cls([c for c, _ in ranked], [f for _, f in ranked], n_documents, k)

    def __len__(self) -> int:
        return len(self.codes)

    def __contains__(self, code: object) -> bool:
        return code in self._index

    def index(self, code: str) -> int:
        return self._index[code]

    def transform(
        self, documents_concepts: Sequence[Iterable[str]], *, counts: bool = False
    ) -> npt.NDArray[np.float32]:
        """Matrix [N, len(self)]: 1.0 where a document has the concept (or the number of times,
        with ``counts``); codes outside the vocabulary are ignored."""
        matrix = np.zeros((len(documents_concepts), len(self.codes)), dtype=np.float32)
        for row, concepts in enumerate(documents_concepts):
            for code in concepts:
                column = self._index.get(code)
                if column is None:
                    continue
                matrix[row, column] = matrix[row, column] + 1.0 if counts else 1.0
        return matrix

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "k": self.k,
            "n_documents": self.n_documents,
            "codes": list(self.codes),
            "document_frequency": list(self.document_frequency),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConceptVocabulary:
        if data.get("format") != FILE_FORMAT or data.get("version") != FILE_VERSION:
            raise VocabularyFileError(
                f"not a {FILE_FORMAT} v{FILE_VERSION} file "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        try:
            return cls(
                [str(c) for c in data["codes"]],
                [int(f) for f in data["document_frequency"]],
                int(data["n_documents"]),
                int(data["k"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VocabularyFileError(f"malformed vocabulary file: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write JSON atomically (temporary file, fsync, rename): never a half-written file."""
        path = Path(path)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_json(), handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ConceptVocabulary:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise VocabularyFileError(f"cannot read vocabulary {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise VocabularyFileError(f"vocabulary {path} is not a JSON object")
        return cls.from_json(data)
