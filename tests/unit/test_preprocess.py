from __future__ import annotations

import random
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian

from plugin.errors import ConfigError
from plugin.imaging import (
    ImageSpec,
    UnsupportedImage,
    batch_inputs,
    dataset_input,
    display_array,
    model_input,
    pool_scores,
    sample_indices,
    sample_slices,
    select_images,
)
from plugin.imaging.preprocess import _resize_area
from tests.peers.data import rg1

SPEC = ImageSpec(size=224, channels=3, mean=(0.5,), std=(0.25,))


def _grey_dataset(values: NDArray[Any], photometric: str = "MONOCHROME2", **attrs: Any) -> Dataset:
    """A small uncompressed 12-bit unsigned image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    frames = values.shape[0] if values.ndim == 3 else 1
    ds.Rows, ds.Columns = values.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = values.astype("<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _item(**attrs: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


def _ct_small() -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str), "pydicom's CT_small.dcm is missing"
    return pydicom.dcmread(path)


# --- RG1, the real chest radiograph ----------------------------------------------------------


@pytest.fixture(scope="module")
def rg1_pair() -> dict[str, Dataset]:
    return {encoding: pydicom.dcmread(rg1(encoding)) for encoding in ("uncompressed", "j2k")}


def test_rg1_jpeg2000_lossless_renders_exactly_like_uncompressed(
    rg1_pair: dict[str, Dataset],
) -> None:
    plain, j2k = rg1_pair["uncompressed"], rg1_pair["j2k"]
    assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"

    display_plain, display_j2k = display_array(plain), display_array(j2k)

    assert display_plain.shape == (1955, 1841)
    assert display_plain.dtype == np.float32
    assert 0.0 <= display_plain.min() < display_plain.max() <= 1.0
    np.testing.assert_array_equal(display_plain, display_j2k)
    input_plain, input_j2k = dataset_input(plain, SPEC), dataset_input(j2k, SPEC)
    assert input_plain.shape == (3, 224, 224)
    np.testing.assert_array_equal(input_plain, input_j2k)


def test_rg1_monochrome1_is_inverted_for_display(rg1_pair: dict[str, Dataset]) -> None:
    ds = rg1_pair["uncompressed"]
    assert ds.PhotometricInterpretation == "MONOCHROME1"

    shown = display_array(ds)
    raw = display_array(ds, invert_monochrome1=False)

    np.testing.assert_allclose(shown, 1.0 - raw, atol=1e-6)
    # The lowest stored value is the densest tissue (bone): it must be the brightest pixel.
    densest = np.unravel_index(np.argmin(ds.pixel_array), ds.pixel_array.shape)
    assert shown[densest] == shown.max()


# --- rendering -------------------------------------------------------------------------------


def test_monochrome1_renders_like_its_inverted_monochrome2_twin() -> None:
    values = np.random.default_rng(7).integers(0, 4096, size=(12, 10))
    mono1 = _grey_dataset(values, "MONOCHROME1")
    mono2 = _grey_dataset(4095 - values, "MONOCHROME2")

    shown1, shown2 = display_array(mono1), display_array(mono2)

    np.testing.assert_allclose(shown1, shown2, atol=1e-6)
    assert shown1[np.unravel_index(np.argmin(values), values.shape)] == 1.0


def test_ct_rescale_then_window_clips_outside_the_window() -> None:
    ds = _ct_small()
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft tissue: -160 .. 240 HU
    hu = ds.pixel_array.astype(np.float64) * 1.0 - 1024.0  # slope 1, intercept -1024
    assert (hu < -160).any() and (hu > 240).any()

    shown = display_array(ds)

    # PS3.3 C.11.2.1.2.1, LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5) on [0, 1]
    expected = np.clip((hu - 39.5) / 399.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert (shown[hu < -160] == 0.0).all() and (shown[hu > 240] == 1.0).all()


def test_without_a_window_a_robust_min_max_is_used() -> None:
    ds = _ct_small()
    assert "WindowCenter" not in ds

    shown = display_array(ds)

    assert shown.min() == 0.0 and shown.max() == 1.0
    # 0.5th-99.5th percentile: about 0.5 % of the pixels saturate at each end, not more.
    assert 0.002 < (shown == 1.0).mean() < 0.01
    ds.WindowCenter, ds.WindowWidth = 40, 400
    np.testing.assert_array_equal(display_array(ds, window="minmax"), shown)


def test_enhanced_multiframe_uses_the_frames_functional_groups() -> None:
    frames = np.stack([np.full((4, 4), 1000), np.arange(16).reshape(4, 4) * 100 + 500])
    ds = _grey_dataset(frames)
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _item(
                PixelValueTransformationSequence=Sequence(
                    [_item(RescaleSlope=1, RescaleIntercept=-1000, RescaleType="HU")]
                )
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            _item(FrameVOILUTSequence=Sequence([_item(WindowCenter=0, WindowWidth=100)])),
            _item(FrameVOILUTSequence=Sequence([_item(WindowCenter=500, WindowWidth=1001)])),
        ]
    )

    shown = display_array(ds, frame=1)

    hu = frames[1] - 1000.0
    np.testing.assert_allclose(shown, np.clip((hu - 499.5) / 1000.0 + 0.5, 0, 1), atol=1e-6)
    np.testing.assert_allclose(display_array(ds, frame=0), (0.0 + 0.5) / 99.0 + 0.5, atol=1e-6)
    with pytest.raises(IndexError, match="2 frame"):
        display_array(ds, frame=2)


def test_rgb_is_converted_to_luminance() -> None:
    ds = _grey_dataset(np.zeros((1, 2)), "RGB")
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes([255, 255, 255, 255, 0, 0])  # white, red

    shown = display_array(ds)

    np.testing.assert_allclose(shown, [[1.0, 0.299]], atol=1e-6)


def test_palette_colour_is_scaled_by_its_brightest_entry() -> None:
    ds = _grey_dataset(np.array([[0, 128, 255]]), "PALETTE COLOR")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes([0, 128, 255, 0])  # padded to even length
    for colour in ("Red", "Green", "Blue"):
        # A 16-bit descriptor with 8-bit entries, as some ultrasound vendors write it.
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.arange(256, dtype="<u2").tobytes())

    np.testing.assert_allclose(display_array(ds), [[0.0, 128 / 255, 1.0]], atol=1e-6)


def test_dataset_without_pixel_data_is_unsupported() -> None:
    ds = _grey_dataset(np.zeros((2, 2)))
    del ds.PixelData

    with pytest.raises(UnsupportedImage, match="no pixel data"):
        display_array(ds)


def test_pixel_data_without_a_decoder_is_unsupported_and_names_the_syntax() -> None:
    ds = _grey_dataset(np.zeros((2, 2)))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML

    with pytest.raises(UnsupportedImage, match="transfer syntax MPEG2 Main Profile"):
        display_array(ds)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(UnsupportedImage, match="no Transfer Syntax UID"):
        display_array(ds)


# --- model input -----------------------------------------------------------------------------


def _bright_extent(plane: NDArray[np.float32], spec: ImageSpec) -> tuple[int, int]:
    bright = plane * spec.std[0] + spec.mean[0] > 0.5
    return int(bright.any(axis=1).sum()), int(bright.any(axis=0).sum())


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_black() -> None:
    spec = ImageSpec(size=64, channels=1, mean=(0.5,), std=(0.25,), resize="letterbox")
    tall = np.ones((100, 50), dtype=np.float32)

    plane = model_input(tall, spec)[0]

    assert _bright_extent(plane, spec) == (64, 32)
    assert (plane[:, :16] == (0.0 - 0.5) / 0.25).all() and (plane[:, 48:] == -2.0).all()
    stretched = ImageSpec(size=64, channels=1, mean=(0.5,), std=(0.25,), resize="stretch")
    assert _bright_extent(model_input(tall, stretched)[0], stretched) == (64, 64)


def test_center_crop_fills_the_square() -> None:
    spec = ImageSpec(size=32, channels=1, mean=(0.0,), std=(1.0,), resize="center-crop")
    image = np.zeros((100, 50), dtype=np.float32)
    image[:, 10:40] = 1.0

    plane = model_input(image, spec)[0]

    assert plane.shape == (32, 32)
    assert plane[:, 0].max() < 0.05 and plane[:, 16].min() > 0.95  # kept the 50-wide width


def test_channels_are_replicated_and_normalised_per_channel() -> None:
    spec = ImageSpec(size=8, channels=3, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))

    batch = batch_inputs([np.full((8, 8), 0.5), np.zeros((16, 16))], spec)

    assert batch.shape == (2, 3, 8, 8) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [0.4, 0.15, 0.05], atol=1e-6)
    assert batch_inputs([], spec).shape == (0, 3, 8, 8)


def test_numpy_area_fallback_is_close_to_pillow() -> None:
    y, x = np.mgrid[0:300, 0:200]
    smooth = (0.5 + 0.5 * np.sin(x / 23.0) * np.cos(y / 31.0)).astype(np.float32)
    spec = ImageSpec(size=60, channels=1, mean=(0.0,), std=(1.0,), resize="stretch")

    by_pillow = model_input(smooth, spec)[0]
    by_area = _resize_area(smooth, 60, 60)

    assert np.abs(by_pillow - by_area).max() < 0.02


def test_image_spec_from_manifest_and_its_errors() -> None:
    block = {"size": 224, "channels": 1, "mean": [0.5], "std": [0.25], "resize": "letterbox"}

    spec = ImageSpec.from_manifest({"format_version": 1, "image": block})

    assert spec == ImageSpec.from_manifest(block)
    assert (spec.size, spec.mean, spec.window, spec.invert_monochrome1) == (
        224,
        (0.5,),
        "voi_lut_or_minmax",
        True,
    )
    with pytest.raises(ConfigError, match="std needs 1 or 3 values"):
        ImageSpec.from_manifest({**block, "channels": 3, "std": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="sise"):
        ImageSpec.from_manifest({**block, "sise": 3})
    with pytest.raises(ConfigError, match="resize"):
        ImageSpec.from_manifest({**block, "resize": "crop"})


# --- slices and pooling ----------------------------------------------------------------------


def _slice(z: float, number: int, modality: str = "CT") -> Dataset:
    return _item(
        Modality=modality,
        ImagePositionPatient=[-100.0, -100.0, z],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        InstanceNumber=number,
    )


def test_sample_slices_sorts_along_the_normal_and_keeps_the_middle() -> None:
    # InstanceNumber runs against the geometry to prove the position wins.
    series = [_slice(z=2.5 * i, number=40 - i) for i in range(40)]
    random.Random(3).shuffle(series)

    sampled = sample_slices(series, max_slices=16)

    z = [float(ds.ImagePositionPatient[2]) for ds in sampled]
    assert len(sampled) == 16
    assert z == sorted(z) and 2.5 * 19 in z  # middle slice: index (40 - 1) // 2
    assert [float(ds.ImagePositionPatient[2]) for ds in sample_slices(series, 50)] == [
        2.5 * i for i in range(40)
    ]


def test_sample_slices_falls_back_to_instance_number() -> None:
    series = [_item(Modality="MR", InstanceNumber=n) for n in (5, 2, 9, 1, 7)]

    assert [ds.InstanceNumber for ds in sample_slices(series, 3)] == [1, 5, 9]


def test_oblique_series_is_ordered_along_its_normal() -> None:
    # Sagittal: rows along +y, columns along -z; the normal is -x.
    series = [
        _item(ImagePositionPatient=[x, 0, 0], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
        for x in (10.0, -5.0, 0.0, 5.0)
    ]

    assert [float(ds.ImagePositionPatient[0]) for ds in sample_slices(series)] == [
        10.0,
        5.0,
        0.0,
        -5.0,
    ]


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 40, 100, 333])
@pytest.mark.parametrize("max_slices", [1, 2, 5, 16])
def test_sample_indices_are_evenly_spaced_and_include_the_middle(
    count: int, max_slices: int
) -> None:
    indices = sample_indices(count, max_slices)

    assert len(indices) == min(count, max_slices)
    assert (count - 1) // 2 in indices
    assert indices[0] >= 0 and indices[-1] < count
    gaps = np.diff(indices)
    assert len(gaps) == 0 or (gaps.min() > 0 and gaps.max() - gaps.min() <= 2)


def test_projection_radiographs_are_all_kept_and_localizers_left_out() -> None:
    views = [_item(Modality="CR", InstanceNumber=n) for n in range(3)]
    scout = _slice(z=0.0, number=0)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ct = [scout, *(_slice(z=float(i), number=i + 1) for i in range(30))]

    assert select_images(views, max_slices=1) == views
    chosen = select_images(ct, max_slices=8)
    assert len(chosen) == 8 and scout not in chosen


def test_pool_scores() -> None:
    scores = np.array([[0.1, 0.9], [0.7, 0.2], [0.4, 0.3], [0.8, 0.1]])

    np.testing.assert_allclose(pool_scores(scores), [0.8, 0.9])  # default: max
    np.testing.assert_allclose(pool_scores(scores, "mean"), [0.5, 0.375])
    top3 = [(0.7 + 0.4 + 0.8) / 3, (0.9 + 0.3 + 0.2) / 3]
    np.testing.assert_allclose(pool_scores(scores, "top3-mean"), top3)
    assert pool_scores(np.array([0.2, 0.6]), "top3-mean") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no slice scores"):
        pool_scores(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_scores(scores, "median")  # type: ignore[arg-type]
