"""docs/models.md, "From downloaded files to a live model": every marked block runs as written.

A tiny random Hugging Face CLIP folder stands for the download, and synthetic studies of the
demo generator for the site: images with their labels (for the out-of-distribution reference
and the calibration), then studies that arrive with their reports. Each block marked
``<!-- walkthrough -->`` runs in order with ``bash -euo pipefail`` in a working folder of its
own, with ``pacsclip`` from this virtualenv on PATH; after each, the state is what the page says.

No node runs: before the reports come in, the arriving studies are put in the catalog as the
node records them and scored by the worker's own code (live model and shadow).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from plugin.catalog.db import open_catalog
from plugin.catalog.repository import audit_events
from plugin.demo.phantom import FINDINGS
from plugin.demo.studies import write_demo_studies
from plugin.models.bundle import Bundle, load_bundle
from plugin.models.registry import Registry
from plugin.settings import Settings
from tests.catalog_fixtures import arrive
from tests.open_clip_reference import clip_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("medspacy", reason="the report labeler runs on medspacy (scripts/bootstrap)")

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
SECTION = "## From downloaded files to a live model"
MARKER = "<!-- walkthrough -->"
NAME = "site-clip"
BASE, OOD, CANDIDATE = "2026.1.0", "2026.1.0+ood1", "2026.1.0+ood1+cal1"
SITE_IMAGES = 60
ARRIVING = 16
CALLING_AE = "STORESCU"  # storescu's default calling AE title
IMAGE_SIZE = 32

# Each block is known by the first of these it contains; the page runs them in this order.
STEPS = (
    "import-hf",
    "fit-ood",
    "calibrate",
    "model shadow",
    "report import",
    "validate",
    "promote",
    "--force",
    "monitor",
)


def walkthrough_blocks(text: str) -> list[str]:
    """The bash blocks of the section, each right after a marker line."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    lines = text[start : None if end < 0 else end].splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert lines[i + 1] == "```bash", (
            f"the marker before {lines[i + 1]!r} is not on a bash block"
        )
        body = []
        for code in lines[i + 2 :]:
            if code == "```":
                break
            body.append(code)
        blocks.append("\n".join(body) + "\n")
    return blocks


def step_of(block: str) -> str:
    # "--force" before "promote": both promote blocks name promote.
    return next(s for s in ("--force", *STEPS) if s in block)


@dataclass
class Walk:
    work: Path
    data_dir: Path
    env: dict[str, str]
    arriving: Path


def hf_download(folder: Path) -> Path:
    """A CLIPModel folder as `hf download` leaves it, random weights (as in test_import_hf.py)."""
    folder.mkdir(parents=True)
    tokenizer = clip_tokenizer(folder)
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    config = transformers.CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer.get_vocab()),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=24,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(str(folder))
    return folder


def labels_csv(site: Path) -> Path:
    """``path`` + 1/0 per finding, from the demo generator's truth, paths relative to the CSV."""
    with (site / "truth.csv").open(newline="") as handle:
        truth = list(csv.DictReader(handle))
    path = site / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *FINDINGS])
        for row in truth:
            image = next((site / "studies" / row["study_uid"]).glob("*.dcm"))
            writer.writerow([image.relative_to(site).as_posix(), *(row[f] for f in FINDINGS)])
    return path


@pytest.fixture
def walk(tmp_path: Path) -> Walk:
    work, data_dir = tmp_path / "work", tmp_path / "data"
    hf_download(work / "clip-download")
    write_demo_studies(work / "site", count=SITE_IMAGES, seed=1)
    write_demo_studies(work / "arriving", count=ARRIVING, seed=2)
    labels_csv(work / "site")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    env |= {
        "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "PACSCLIP_DATA_DIR": str(data_dir),
        "MODEL_DIR": "clip-download",
        "SITE_IMAGES": "site/studies",
        "LABELS": "site/labels.csv",
        "REPORTS": "arriving/reports.csv",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return Walk(work=work, data_dir=data_dir, env=env, arriving=work / "arriving" / "studies")


def run_block(block: str, walk: Walk) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=walk.work,
        env=walk.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_walkthrough_runs_as_written(walk: Walk) -> None:
    text = DOC.read_text(encoding="utf-8")
    blocks = walkthrough_blocks(text)
    # The page tells how much data the test runs on.
    assert f"{SITE_IMAGES} site images" in text and f"{ARRIVING} studies that" in text
    assert [step_of(b) for b in blocks] == list(STEPS)
    # Only relative paths and the variables set here: no absolute path in any block.
    assert not [b for b in blocks if re.search(r"(^|[\s=\"'])/", b)]
    settings = Settings(data_dir=walk.data_dir)
    registry = Registry.for_data_dir(walk.data_dir)
    catalog = open_catalog(settings.effective_database_url)

    def installed(version: str) -> Bundle:
        entry = next(e for e in registry.list() if e.ref == f"{NAME}@{version}")
        # The page names the installed folders so: DATA_DIR/models/NAME/VERSION.
        assert entry.path == walk.data_dir / "models" / NAME / version
        assert not entry.active
        return load_bundle(entry.path)

    for block in blocks:
        step = step_of(block)
        if step == "report import":
            context = arrive(settings, walk.arriving)
            assert [s.shadow.ref for s in context.shadows] == [f"{NAME}@{CANDIDATE}"]
        done = run_block(block, walk)
        out = done.stdout
        assert done.returncode == 0, f"{block}\nstdout:\n{out}\nstderr:\n{done.stderr}"

        if step == "import-hf":
            assert f"installed {NAME}@{BASE}\n" in out
            assert installed(BASE).manifest.ood is None
            assert registry.active() is None  # nothing goes live on import
        elif step in ("fit-ood", "calibrate"):
            new = OOD if step == "fit-ood" else CANDIDATE
            parent = BASE if step == "fit-ood" else OOD
            bundle = installed(new)
            assert bundle.manifest.ood is not None
            assert bundle.manifest.lineage is not None
            assert bundle.manifest.lineage.parent == f"{NAME}@{parent}"
            assert registry.active() is None
        elif step == "model shadow":
            assert [s.ref for s in registry.shadows()] == [f"{NAME}@{CANDIDATE}"]
            assert f"{NAME}@{CANDIDATE}" in out and "shadow@*" in out
        elif step == "report import":
            assert f"{ARRIVING} linked" in out
        elif step == "validate":
            assert f"{NAME}@{CANDIDATE} (shadow): {ARRIVING} studies" in out
            assert "(live)" in out and "too few labels" in out
        elif step == "promote":
            # The page says: refused (too few labels), exit 2, the live model stays.
            assert "gate refused: exit 2" in out
            assert "may not go live yet" in done.stderr and "too few labels" in done.stderr
            assert registry.active() is None
        elif step == "--force":
            active = registry.active()
            assert active is not None and active.ref == f"{NAME}@{CANDIDATE}"
            assert registry.shadows() == []
            with catalog.sessions() as session:
                events = [e.event for e in audit_events(session) if e.event.startswith("golive")]
                forced = audit_events(session, event="golive_forced")
            assert events == ["golive_refused", "golive_forced"]
            assert "random weights" in (forced[0].detail or "")
        elif step == "monitor":
            assert f"* {NAME}@{CANDIDATE}" in out
            latest = json.loads((walk.data_dir / "monitoring" / "latest.json").read_text())
            assert f"{NAME}@{CANDIDATE}" in json.dumps(latest)
