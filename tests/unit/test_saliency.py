"""Saliency: patch-text similarity maps, occlusion maps, their peak and region."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from plugin.triage import Region, occlusion_map, patch_similarity_map, peak, region, resize_bilinear

Images = npt.NDArray[np.float32]

# The bright square: rows 20..35, columns 28..43 of a 64 x 64 image.
TOP, LEFT, SIDE = 20, 28, 16


def square_image(shape: tuple[int, int] = (64, 64), scale: int = 1) -> Images:
    image = np.full(shape, 0.2, dtype=np.float32)
    image[TOP * scale : (TOP + SIDE) * scale, LEFT * scale : (LEFT + SIDE) * scale] = 1.0
    return image


def square_score(images: Images) -> npt.NDArray[np.float64]:
    """The model stand-in: mean intensity of the bright square."""
    window = images[:, TOP : TOP + SIDE, LEFT : LEFT + SIDE]
    result: npt.NDArray[np.float64] = window.mean(axis=(1, 2), dtype=np.float64)
    return result


def inside_square(row: int, col: int, scale: int = 1) -> bool:
    return TOP * scale <= row < (TOP + SIDE) * scale and LEFT * scale <= col < (LEFT + SIDE) * scale


def test_occlusion_peaks_inside_the_square_that_drives_the_score() -> None:
    heat = occlusion_map(square_image(), square_score, patch=8, stride=4, baseline=0.0, batch=16)

    assert heat.shape == (64, 64)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    row, col, value = peak(heat)
    assert inside_square(row, col) and value == pytest.approx(1.0)
    box = region(heat)
    assert box is not None
    assert box.row_min < TOP + SIDE and box.row_max >= TOP
    assert box.col_min < LEFT + SIDE and box.col_max >= LEFT
    # Nothing outside the square's occluders' reach is marked.
    assert heat[:8, :].max() == 0.0


def test_occlusion_at_lower_resolution_keeps_the_input_shape() -> None:
    image = square_image((128, 128), scale=2)
    calls: list[int] = []

    def score(images: Images) -> npt.NDArray[np.float64]:
        calls.append(len(images))
        # Score the same square in whatever resolution it is given.
        step = 128 // images.shape[1]
        top, left, side = 2 * TOP // step, 2 * LEFT // step, 2 * SIDE // step
        window = images[:, top : top + side, left : left + side]
        result: npt.NDArray[np.float64] = window.mean(axis=(1, 2), dtype=np.float64)
        return result

    heat = occlusion_map(image, score, patch=8, stride=4, baseline=0.0, batch=64, max_side=64)

    assert heat.shape == (128, 128)
    row, col, _ = peak(heat)
    assert inside_square(row, col, scale=2)
    # 1 reference pass + 15 x 15 occluded images at 64 x 64, in batches of at most 64.
    assert sum(calls) == 1 + 15 * 15 and max(calls) <= 64


def test_occlusion_does_not_depend_on_the_batch_size() -> None:
    image = square_image()
    one = occlusion_map(image, square_score, patch=12, stride=6, batch=1)
    many = occlusion_map(image, square_score, patch=12, stride=6, batch=500)
    np.testing.assert_array_equal(one, many)


def test_occlusion_rejects_a_score_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="score must return"):
        occlusion_map(square_image(), lambda images: np.zeros(3), patch=8, stride=8)


def test_patch_map_peaks_at_the_patch_most_similar_to_the_text() -> None:
    rng = np.random.default_rng(0)
    text = rng.normal(size=16)
    patches = rng.normal(size=(4 * 5, 16))
    patches[13] = text + 0.05 * rng.normal(size=16)  # grid row 2, column 3

    heat = patch_similarity_map(patches, text, grid=(4, 5), out_shape=(40, 50))

    assert heat.shape == (40, 50) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    row, col, value = peak(heat)
    assert value > 0.9
    assert 20 <= row < 30 and 30 <= col < 40


def test_patch_map_wants_one_token_per_grid_cell() -> None:
    with pytest.raises(ValueError, match=r"\[20, D\]"):
        patch_similarity_map(np.ones((21, 8)), np.ones(8), grid=(4, 5), out_shape=(8, 8))


def test_region_is_the_peak_blob_only() -> None:
    heat = np.zeros((20, 20))
    heat[2:5, 3:7] = 1.0
    heat[12:18, 10:19] = 0.8
    assert region(heat, level=0.5) == Region(2, 3, 4, 6)
    assert region(np.zeros((4, 4))) is None


def test_region_outline_is_a_closed_polyline_on_pixel_edges() -> None:
    outline = Region(row_min=2, col_min=3, row_max=4, col_max=6).polyline()
    np.testing.assert_array_equal(outline, [[3, 2], [7, 2], [7, 5], [3, 5], [3, 2]])


def test_bilinear_resize_keeps_constants_and_identity() -> None:
    ramp = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_allclose(resize_bilinear(ramp, (3, 4)), ramp)
    np.testing.assert_allclose(resize_bilinear(np.full((3, 3), 0.25), (7, 9)), 0.25)


def test_occlusion_maps_of_several_scores_match_one_map_each() -> None:
    from plugin.triage.saliency import occlusion_maps

    rng = np.random.default_rng(3)
    image = rng.random((40, 56)).astype(np.float32)
    weights = rng.random((2, 40, 56))

    def both(batch: np.ndarray) -> np.ndarray:
        return np.stack([(batch * w).sum(axis=(1, 2)) for w in weights], axis=1)

    together = occlusion_maps(image, both, 2, patch=8, stride=4)
    for column, heat in enumerate(together):
        alone = occlusion_map(image, lambda b, c=column: both(b)[:, c], patch=8, stride=4)
        np.testing.assert_allclose(heat, alone, atol=1e-6)
