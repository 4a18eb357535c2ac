"""Text cleaning: pacsclip's token ids and text embeddings equal open_clip's on hard texts.

The reference is open_clip itself (``tests/open_clip_tokenizer_reference.py``, run once in a
process of its own): its tokenizers, with their own cleaning, and its eager text towers, on the
OpenAI-layout and BiomedCLIP-layout checkpoints the import tests build. pacsclip imports the same
checkpoints with ``import-open-clip`` and tokenises through the bundle's tokenizer.json after
:func:`plugin.models.runtime.clean_text`, as its text encoder does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from plugin.models.bundle import Bundle, BundleError, TextCleaning, parse_manifest
from plugin.models.importers.hf import text_cleaning as hf_text_cleaning
from plugin.models.importers.open_clip import (
    OpenClipImport,
    build_open_clip_bundle,
    read_config,
    text_cleaning,
)
from plugin.models.importers.tokenizer_files import write_tokenizer_json
from plugin.models.runtime import TextEncoder, clean_text, load_tokenizer
from tests.import_parity import COSINE_MIN, assert_embeddings_match, unit
from tests.open_clip_reference import clip_tokenizer

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ("openai_b16", "biomedclip")
CONTEXT = {"openai_b16": 16, "biomedclip": 24}  # the test models' context_length
LONG_CONTEXT = 77  # the reference's ids_long: whole texts, past the tiny models' context
CLEANING: dict[str, TextCleaning] = {
    "lower": "open_clip_lower",
    "whitespace": "open_clip_whitespace",
    "canonicalize": "open_clip_canonicalize",
}
HARD_TEXTS = [
    "\u201cPleural\u201d effusion \u2013 \u2018mild\u2019",  # curly quotes, en dash
    "effusion &amp; edema",
    "R &amp;amp; L effusion",  # escaped twice
    "&lt;5 mm nodule",
    "Caf\u00e9 na\u00efve \u00b5g 37\u00b0C",  # accents, micro sign, degree sign
    "\u80ba\u708e \u80f8\u6c34 effusion",  # CJK
    "caf\u00c3\u00a9 \u00e2\u20ac\u0153effusion\u00e2\u20ac\x9d",  # UTF-8 read as cp1252
    "  multiple   spaces\n\nand\tnewlines  ",
    "\uff26\uff35\uff2c\uff2c width \ufb01 ligature",  # fullwidth letters, fi ligature
    "Left_lower lobe: consolidation!",
    "No pleural effusion.",
]


@dataclass(frozen=True)
class Reference:
    folder: Path
    arrays: dict[str, npt.NDArray[Any]]
    cleaned: dict[str, list[str]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("open-clip-tokens")
    (root / "texts.json").write_text(json.dumps(HARD_TEXTS), encoding="utf-8")
    script = "tests.open_clip_tokenizer_reference"
    done = subprocess.run(
        [sys.executable, "-m", script, str(root / "out"), str(root / "texts.json")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(root / "out" / "tokens.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    cleaned = json.loads((root / "out" / "cleaned.json").read_text(encoding="utf-8"))
    return Reference(folder=root / "out", arrays=arrays, cleaned=cleaned)


@pytest.fixture(scope="module")
def bundles(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("open-clip-token-bundles")
    return {
        layout: build_open_clip_bundle(
            OpenClipImport(
                path=reference.folder / layout, name=layout.replace("_", "-"), version="1"
            ),
            root / layout,
        )
        for layout in LAYOUTS
    }


def _ids(bundle: Bundle, texts: list[str], length: int, cleaning: TextCleaning) -> npt.NDArray[Any]:
    """Token ids as the text encoder makes them, padded with 0 to ``length`` as open_clip pads
    (the bundle pads with its own pad token, which the attention mask hides)."""
    tokenizer = load_tokenizer(bundle.tokenizer_path or Path(), max_length=length)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    cleaned = [clean_text(t, cleaning) for t in texts]
    for row, encoding in enumerate(tokenizer.encode_batch(cleaned)):
        tokens = sum(encoding.attention_mask)
        ids[row, :tokens] = encoding.ids[:tokens]
    return ids


@pytest.mark.parametrize("clean", list(CLEANING))
def test_clean_text_is_open_clips_clean_function(clean: str, reference: Reference) -> None:
    ours = [clean_text(text, CLEANING[clean]) for text in HARD_TEXTS]
    assert ours == reference.cleaned[clean]
    # The texts are hard: open_clip's cleaning changes most of them.
    assert sum(a != b for a, b in zip(ours, HARD_TEXTS, strict=True)) >= 7


def test_the_manifest_records_the_cleaning_of_each_layout(
    reference: Reference, bundles: dict[str, Bundle]
) -> None:
    # open_clip's SimpleTokenizer lower-cases; its HFTokenizer (BiomedCLIP) keeps the case.
    assert bundles["openai_b16"].manifest.text_encoder.cleaning == "open_clip_lower"
    assert bundles["biomedclip"].manifest.text_encoder.cleaning == "open_clip_whitespace"
    assert bundles["biomedclip"].manifest.image.crop_offset == "round"
    biomed = read_config(reference.folder / "biomedclip" / "open_clip_config.json")
    assert text_cleaning(biomed) == "open_clip_whitespace"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_ids_equal_open_clips(
    layout: str, reference: Reference, bundles: dict[str, Bundle]
) -> None:
    bundle = bundles[layout]
    cleaning = bundle.manifest.text_encoder.cleaning

    for key, length in ((f"{layout}/ids", CONTEXT[layout]), (f"{layout}/ids_long", LONG_CONTEXT)):
        expected = reference.arrays[key]
        np.testing.assert_array_equal(_ids(bundle, HARD_TEXTS, length, cleaning), expected)
        # Without the cleaning the ids differ, which is what this test guards.
        raw = _ids(bundle, HARD_TEXTS, length, "none")
        assert (raw != expected).any(axis=1).sum() >= 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_embeddings_match_open_clip(
    layout: str, reference: Reference, bundles: dict[str, Bundle]
) -> None:
    expected = reference.arrays[f"{layout}/text"]
    ours = TextEncoder(bundles[layout], threads=1).encode(HARD_TEXTS)

    assert_embeddings_match(ours, expected)
    cosine = np.sum(unit(ours) * unit(expected), axis=-1)
    assert cosine.min() >= COSINE_MIN


def test_a_tokenizer_option_pacsclip_cannot_reproduce_is_refused(
    reference: Reference, tmp_path: Path
) -> None:
    source = reference.folder / "biomedclip" / "open_clip_config.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    data["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"strip_sep_token": True}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BundleError, match=r"strip_sep_token.*import-onnx"):
        text_cleaning(read_config(tmp_path / "open_clip_config.json"))
    data["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(data), encoding="utf-8")
    assert text_cleaning(read_config(tmp_path / "open_clip_config.json")) == (
        "open_clip_canonicalize"
    )


def test_hf_clip_needs_no_cleaning_beyond_its_tokenizer_json(tmp_path: Path) -> None:
    """transformers' CLIPTokenizer cleans in its normalizer only; tokenizer.json carries it."""
    folder = tmp_path / "clip"
    folder.mkdir()
    hf = clip_tokenizer(folder)
    path = write_tokenizer_json([folder], tmp_path / "bundle", "")
    tokenizer = load_tokenizer(path, max_length=LONG_CONTEXT)
    cleaning = hf_text_cleaning("clip", folder)

    ours = [e.ids for e in tokenizer.encode_batch([clean_text(t, cleaning) for t in HARD_TEXTS])]
    expected = hf(HARD_TEXTS, truncation=True, max_length=LONG_CONTEXT)["input_ids"]
    assert cleaning == "none"
    assert [row[: len(e)] for row, e in zip(ours, expected, strict=True)] == expected


def test_siglip_cleaning_is_siglip_tokenizers_canonical_text() -> None:
    # transformers' SiglipTokenizer.canonicalize_text (do_lower_case true) removes ASCII
    # punctuation, "_" included, where open_clip's canonicalize turns "_" into a space first.
    assert clean_text("Left_lower  lobe: \u201cR&amp;L\u201d!\n", "siglip") == (
        "leftlower lobe \u201crampl\u201d"
    )
    assert clean_text("Left_lower lobe", "open_clip_canonicalize") == "left lower lobe"


def test_older_bundles_without_the_key_tokenise_raw_text() -> None:
    manifest = {
        "format_version": 1,
        "name": "old",
        "version": "1",
        "embedding_dim": 4,
        "synthetic": False,
        "image": {"size": 32, "channels": 3, "mean": [0.5], "std": [0.5]},
        "files": {"image_tower": {"path": "image_tower.onnx", "sha256": "0" * 64}},
        "model_card": {
            "intended_use": "x",
            "training_data": "x",
            "limitations": "x",
            "not_for_clinical_use": True,
        },
    }
    parsed = parse_manifest(manifest)
    assert parsed.text_encoder.cleaning == "none"
    assert parsed.image.crop_offset == "floor"
    with pytest.raises(BundleError, match=r"cleaning 'open_clip_lower' is for the ONNX text tower"):
        parse_manifest({**manifest, "text_encoder": {"cleaning": "open_clip_lower"}})
