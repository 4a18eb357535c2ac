"""Default bundle names and versions for imported models.

A version names one set of files forever, so an imported model's default version is taken from
the SHA-256 of its weights: importing the same weights again gives the same version, and other
weights can never be installed under it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from plugin.models.bundle import sha256_file


def default_name(path: Path) -> str:
    """A valid bundle name from a folder or file name ("BiomedCLIP-ViT" -> "biomedclip-vit")."""
    stem = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name[:64] or "imported-model"


def weights_version(files: Iterable[Path]) -> str:
    """``sha256-`` and the first 12 hex digits of the digest of the weight files' digests."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(sha256_file(path).encode())
    return f"sha256-{digest.hexdigest()[:12]}"
