"""Saliency: patch-text similarity maps, occlusion maps, their peak and region."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from plugin.triage import Region, occlusion_map, patch_similarity_map, peak, region, resize_bilinear
from plugin.triage.saliency import outlines

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


def test_outlines_follow_pixel_edges_fill_holes_and_drop_specks() -> None:
    heat = np.zeros((100, 120), dtype=np.float32)
    heat[10:30, 20:50] = 1.0
    heat[15:20, 30:35] = 0.0  # a hole inside the hottest region
    heat[60:90, 60:100] = 0.8  # a second, cooler region
    heat[95, 5] = 0.9  # a one-pixel speck, hotter than the second region

    found = outlines(heat)

    assert [round(o.peak, 2) for o in found] == [1.0, 0.8]
    first, second = found
    assert first.box() == (10, 20, 29, 49)
    assert second.box() == (60, 60, 89, 99)
    assert first.area == 20 * 30  # the hole is filled
    # Closed, and along the region's outer pixel edges (cut diagonally at the corners).
    assert np.array_equal(first.points[0], first.points[-1])
    assert first.points[:, 0].min() == 20.0 and first.points[:, 0].max() == 50.0
    assert first.points[:, 1].min() == 10.0 and first.points[:, 1].max() == 30.0


def test_outlines_keep_at_most_the_hottest_few_and_none_for_an_empty_map() -> None:
    heat = np.zeros((64, 64), dtype=np.float32)
    for k in range(5):
        heat[2 + 12 * k : 10 + 12 * k, 2:10] = 1.0 - 0.1 * k

    assert [round(o.peak, 1) for o in outlines(heat, max_regions=3)] == [1.0, 0.9, 0.8]
    assert outlines(np.zeros((32, 32), dtype=np.float32)) == []


def test_outlines_of_a_large_map_are_traced_on_a_coarse_grid_in_source_pixels() -> None:
    heat = np.zeros((1955, 1841), dtype=np.float32)
    heat[500:900, 300:700] = 1.0

    (found,) = outlines(heat)

    row_min, col_min, row_max, col_max = found.box()
    # Within one grid cell (about 8 source pixels) of the true box.
    assert abs(row_min - 500) <= 8 and abs(row_max - 899) <= 8
    assert abs(col_min - 300) <= 8 and abs(col_max - 699) <= 8
    assert len(found.points) < 50
