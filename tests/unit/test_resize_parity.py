"""Resize parity: pacsclip's model input equals each source's own preprocessing on odd sizes.

References, by the source a bundle's ``image`` block comes from:
- Hugging Face CLIP and SigLIP: transformers' own ``CLIPImageProcessorPil`` and
  ``SiglipImageProcessorPil``, run on the image as an RGB Pillow image.
- open_clip (``resize_mode`` shortest, longest, squash): open_clip's eval transforms are
  torchvision's ``Resize`` + ``CenterCrop``, open_clip's ``ResizeKeepRatio`` +
  ``CenterCropOrPad``, and ``Resize((size, size))``. torchvision cannot be installed beside the
  pinned torch, so :func:`open_clip_reference` redoes their arithmetic with Pillow, as the
  sources compute it: torchvision's ``_compute_resized_output_size`` (long side
  ``int(size * long / short)``), ``center_crop`` (top ``int(round((h - size) / 2.0))``) and
  Pillow bicubic resize for PIL input; open_clip's ``ResizeKeepRatio.get_params`` (``round(side /
  ratio)``) and ``center_crop_or_pad`` (pad ``(size - side) // 2`` before).

Both sides start from the same 8-bit pixels: pacsclip from a DICOM object whose window maps
them to x / 255 (``dataset_input``, the whole path), the reference from the RGB image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from plugin.imaging.preprocess import (
    Fit,
    ImageSpec,
    dataset_input,
    display_array,
    fit_geometry,
)
from plugin.models.importers import image_preprocessing
from plugin.models.importers.image_preprocessing import OPENAI_MEAN, OPENAI_STD

transformers = pytest.importorskip("transformers")

SIZE = 224
# (width, height): odd margins, a side that truncates, a one-pixel-wide image.
ODD_SIZES = [(320, 260), (259, 641), (225, 224), (1, 300), (513, 512)]
COSINE_MIN = 0.9999
# In normalised units (one grey level is about 0.015): Pillow resamples an 8-bit image in two
# passes, rounding to 8 bits in between, where pacsclip resamples floats. That leaves up to about
# 0.065 here; a crop one pixel off leaves more than 1.
PIXEL_TOLERANCE = 0.1
HF_CONFIG = {
    "do_center_crop": True,
    "size": {"shortest_edge": SIZE},
    "crop_size": {"height": SIZE, "width": SIZE},
}


def _pixels(width: int, height: int) -> npt.NDArray[np.uint8]:
    """Texture at every scale, so that a one-pixel shift changes the input a lot."""
    rng = np.random.default_rng(width * 1000 + height)
    noise = rng.integers(0, 256, size=(height, width)).astype(np.float64)
    rows, columns = np.mgrid[0:height, 0:width]
    ramp = 127.5 * (1 + np.sin(rows / 7.0) * np.cos(columns / 5.0))
    pixels: npt.NDArray[np.uint8] = np.clip(0.5 * noise + 0.5 * ramp, 0, 255).astype(np.uint8)
    return pixels


def _dataset(pixels: npt.NDArray[np.uint8]) -> Dataset:
    """8-bit MONOCHROME2 whose window (center 128, width 256) maps x to exactly x / 255."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = pixels.tobytes()
    return ds


def _rgb(pixels: npt.NDArray[np.uint8]) -> Image.Image:
    return Image.fromarray(pixels, mode="L").convert("RGB")


def _normalise(image: Image.Image) -> npt.NDArray[np.float32]:
    """torchvision's ToTensor + Normalize."""
    unit = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(OPENAI_STD, dtype=np.float32)[:, None, None]
    return np.asarray((unit - mean) / std, dtype=np.float32)


def open_clip_reference(image: Image.Image, resize_mode: str) -> npt.NDArray[np.float32]:
    """open_clip's eval transform (``image_transform``, is_train False, bicubic, fill 0)."""
    width, height = image.size
    if resize_mode == "squash":
        return _normalise(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    if resize_mode == "shortest":
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = SIZE, int(SIZE * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top = round((new_h - SIZE) / 2.0)
        left = round((new_w - SIZE) / 2.0)
        return _normalise(resized.crop((left, top, left + SIZE, top + SIZE)))
    assert resize_mode == "longest"
    ratio = max(height / SIZE, width / SIZE)
    new_h, new_w = (round(side / ratio) for side in (height, width))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    canvas.paste(resized, ((SIZE - new_w) // 2, (SIZE - new_h) // 2))
    return _normalise(canvas)


def hf_reference(image: Image.Image, processor: Any) -> npt.NDArray[np.float32]:
    result = processor(images=image, return_tensors="np")["pixel_values"][0]
    return np.asarray(result, dtype=np.float32)


def _hf_clip() -> Any:
    return transformers.CLIPImageProcessorPil(
        **HF_CONFIG, image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD)
    )


def _hf_siglip() -> Any:
    return transformers.SiglipImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )


def _open_clip_spec(resize_mode: str) -> ImageSpec:
    preprocess = {"resize_mode": resize_mode, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    block = image_preprocessing.from_open_clip(preprocess, SIZE, "open_clip_config.json")
    return ImageSpec.from_manifest(block.model_dump())


def _hf_spec(config: dict[str, Any], default: image_preprocessing.Resize) -> ImageSpec:
    config = {**config, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}
    block = image_preprocessing.from_hf_processor(config, SIZE, default, "preprocessor_config")
    return ImageSpec.from_manifest(block.model_dump())


# name -> (the spec pacsclip's importer writes, the reference preprocessing)
SOURCES: dict[str, tuple[Any, Any]] = {
    "open_clip-shortest": (
        lambda: _open_clip_spec("shortest"),
        lambda image: open_clip_reference(image, "shortest"),
    ),
    "open_clip-longest": (
        lambda: _open_clip_spec("longest"),
        lambda image: open_clip_reference(image, "longest"),
    ),
    "open_clip-squash": (
        lambda: _open_clip_spec("squash"),
        lambda image: open_clip_reference(image, "squash"),
    ),
    "hf-clip": (
        lambda: _hf_spec(HF_CONFIG, "center-crop"),
        lambda image: hf_reference(image, _hf_clip()),
    ),
    "hf-siglip": (
        lambda: _hf_spec({"size": {"height": SIZE, "width": SIZE}}, "stretch"),
        lambda image: hf_reference(image, _hf_siglip()),
    ),
}


@pytest.fixture(scope="module")
def tower() -> Any:
    """A tiny random CLIP vision tower at 224 pixels: patch position matters to it."""
    config = transformers.CLIPVisionConfig(
        image_size=SIZE,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
    )
    torch.manual_seed(0)
    return transformers.CLIPVisionModelWithProjection(config).eval()


def _embed(tower: Any, pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    with torch.no_grad():
        embeds = tower(pixel_values=torch.from_numpy(pixels[None])).image_embeds[0].numpy()
    return np.asarray(embeds / np.linalg.norm(embeds), dtype=np.float64)


def _cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize(("width", "height"), ODD_SIZES)
def test_model_input_matches_the_sources_own_preprocessing(
    source: str, width: int, height: int, tower: Any
) -> None:
    make_spec, reference = SOURCES[source]
    pixels = _pixels(width, height)

    ours = dataset_input(_dataset(pixels), make_spec())
    expected = reference(_rgb(pixels))

    assert ours.shape == expected.shape == (3, SIZE, SIZE)
    assert np.abs(ours - expected).max() <= PIXEL_TOLERANCE
    assert _cosine(ours, expected) >= COSINE_MIN
    assert _cosine(_embed(tower, ours), _embed(tower, expected)) >= COSINE_MIN


def test_the_two_sources_crop_differently_where_the_margin_is_odd() -> None:
    """Why the manifest records crop_offset: one center-crop rule cannot match both."""
    image = _rgb(_pixels(320, 260))  # 275 wide after the resize: a margin of 51
    open_clip, hf = SOURCES["open_clip-shortest"][1](image), SOURCES["hf-clip"][1](image)
    assert _cosine(open_clip, hf) < 0.95
    np.testing.assert_allclose(open_clip[..., :-1], hf[..., 1:], atol=1e-6)


def test_the_test_images_reach_model_input_as_their_8_bit_values() -> None:
    pixels = _pixels(320, 260)
    np.testing.assert_allclose(display_array(_dataset(pixels)), pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    ("width", "height", "floor", "rounded"),
    [
        # 224 * 320 / 260 = 275.7: torchvision and transformers truncate to 275; the odd
        # margin of 51 starts the crop at 25 (floor) or 26 (round(25.5), half to even).
        (320, 260, Fit((224, 275), (0, 25)), Fit((224, 275), (0, 26))),
        (259, 641, Fit((554, 224), (165, 0)), Fit((554, 224), (165, 0))),
        # round(0.5) is 0 in Python, as in torchvision.
        (225, 224, Fit((224, 225), (0, 0)), Fit((224, 225), (0, 0))),
        (1, 300, Fit((67200, 224), (33488, 0)), Fit((67200, 224), (33488, 0))),
        (513, 512, Fit((224, 224), (0, 0)), Fit((224, 224), (0, 0))),
        (260, 321, Fit((276, 224), (26, 0)), Fit((276, 224), (26, 0))),
        (224, 277, Fit((277, 224), (26, 0)), Fit((277, 224), (26, 0))),
        (224, 279, Fit((279, 224), (27, 0)), Fit((279, 224), (28, 0))),
    ],
)
def test_center_crop_sides_and_offsets(width: int, height: int, floor: Fit, rounded: Fit) -> None:
    assert fit_geometry(height, width, SIZE, "center-crop", "floor") == floor
    assert fit_geometry(height, width, SIZE, "center-crop", "round") == rounded


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (320, 260, Fit((182, 224), (21, 0))),
        (259, 641, Fit((224, 91), (0, 66))),
        (225, 224, Fit((223, 224), (0, 0))),
        (1, 300, Fit((224, 1), (0, 111))),
        (513, 512, Fit((224, 224), (0, 0))),
    ],
)
def test_letterbox_sides_and_offsets(width: int, height: int, expected: Fit) -> None:
    assert fit_geometry(height, width, SIZE, "letterbox") == expected
