"""Turn a :func:`plugin.demo.train.train_demo` result into a complete, loadable bundle.

``train_demo`` writes the weight files and returns the manifest's fields; this module adds
what a bundle needs on top (format version, a version string, SHA-256 pins, the STAT
threshold, the out-of-distribution reference fitted on fresh phantoms) and writes
``bundle.json`` next to ``train-result.json`` with :mod:`plugin.models.bundle_writer`. It
needs no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from plugin.demo.radiographs import DEMO_OOD_FIT, DEMO_OOD_HELDOUT, fit_demo_ood
from plugin.models.bundle import (
    FORMAT_VERSION,
    Bundle,
    BundleError,
    Manifest,
    TextEncoderSpec,
    validate_model,
)
from plugin.models.bundle_writer import pin_file, write_bundle

TRAIN_RESULT_FILE: Final = "train-result.json"
# A finding in priority.stat_if_any needs a threshold on its calibrated probability;
# these are the built-in bundle's.
STAT_THRESHOLDS: Final[Mapping[str, float]] = {"pneumothorax": 0.8}
_COPIED_KEYS: Final = (
    "name",
    "synthetic",
    "embedding_dim",
    "image",
    "logit_scale",
    "priority",
    "model_card",
)


def demo_manifest(result: Mapping[str, Any], version: str, directory: Path) -> Manifest:
    """The manifest of the files ``train_demo`` wrote into ``directory``, each pinned."""
    files = dict(result["files"])
    projection = files.pop("text_projection", None)
    # train_demo's text_encoder block also documents the pooling rule, which the
    # manifest schema has no key for (docs/demo-model.md describes it).
    text_encoder = {
        key: value
        for key, value in result["text_encoder"].items()
        if key in TextEncoderSpec.model_fields and key != "projection"
    }
    if projection is not None:
        text_encoder["projection"] = pin_file(directory, projection).model_dump()
    stat = set(result["priority"]["stat_if_any"])
    findings = [
        {**finding, "stat_threshold": STAT_THRESHOLDS.get(finding["name"])}
        if finding["name"] in stat
        else dict(finding)
        for finding in result["findings"]
    ]
    data = {
        "format_version": FORMAT_VERSION,
        "version": version,
        **{key: result[key] for key in _COPIED_KEYS},
        "files": {label: pin_file(directory, path).model_dump() for label, path in files.items()},
        "text_encoder": text_encoder,
        "findings": findings,
    }
    return validate_model(Manifest, data, "the trained demo model's manifest is invalid")


def write_demo_bundle(
    directory: Path,
    result: Mapping[str, Any],
    version: str,
    *,
    n_ood: tuple[int, int] = (DEMO_OOD_FIT, DEMO_OOD_HELDOUT),
    threads: int | None = None,
) -> Bundle:
    """Write ``train-result.json`` and ``bundle.json`` into ``directory``, fit the
    out-of-distribution reference on ``n_ood`` (fit, held-out) phantoms; return it loaded."""
    directory = Path(directory)
    missing = [path for path in result["files"].values() if not (directory / path).is_file()]
    if missing:
        raise BundleError(f"{directory} lacks the trained files {missing}: train into it first")
    _write_json(directory / TRAIN_RESULT_FILE, result)
    write_bundle(directory, demo_manifest(result, version, directory))
    seed = int(result.get("training", {}).get("config", {}).get("seed", 0))
    fitted = fit_demo_ood(directory, seed=seed, n_fit=n_ood[0], n_heldout=n_ood[1], threads=threads)
    return Bundle(manifest=fitted.manifest, directory=directory)


def read_train_result(directory: Path) -> dict[str, Any] | None:
    """The ``train-result.json`` of a bundle trained by ``train-demo``; None when absent."""
    path = Path(directory) / TRAIN_RESULT_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    return data


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
