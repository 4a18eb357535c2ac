"""Where the model sees a finding: patch-token similarity maps on the original image's pixels.

A ViT image tower that exports ``patch_embeds`` [P, D] (docs/model-bundle.md) gives one token
per patch of its square input, in the joint space of its text embeddings. For a finding, each
patch is scored the way the whole image is scored zero-shot (plugin/triage/zeroshot.py):
``cos(patch, positive) - cos(patch, negative)``, the patch's share of the present-vs-absent
logit. The positive prompt alone would not do: every chest prompt shares a large "chest
radiograph" component, so its cosine mostly follows anatomy; the difference of the two
prompt sets cancels that and keeps what separates present from absent.

The scores lie on the patch grid of the model input, which is the original image resized and
letterboxed, cropped or stretched (plugin/imaging/preprocess.py ``fit_geometry``). The map is
upsampled to the input, the part of the input that shows the image is cut out (letterbox
padding is no part of the image), min-max normalised there, and mapped back onto the original
pixel grid; with a center crop, what the model never saw stays 0. Pure numpy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from plugin.imaging.preprocess import ImageSpec, fit_geometry
from plugin.triage.saliency import Map, resize_bilinear
from plugin.triage.zeroshot import FindingPrompts, l2_normalise

Grid = tuple[int, int]


def patch_scores(patch_embeds: npt.ArrayLike, prompts: FindingPrompts) -> npt.NDArray[np.float64]:
    """Per patch [P]: cos(patch, positive) - cos(patch, negative) of one finding."""
    patches = np.asarray(patch_embeds, dtype=np.float64)
    if patches.ndim != 2 or patches.shape[1] != prompts.positive.shape[0]:
        raise ValueError(
            f"patch embeddings must be [P, {prompts.positive.shape[0]}], got {patches.shape}"
        )
    scores: npt.NDArray[np.float64] = l2_normalise(patches) @ (prompts.positive - prompts.negative)
    return scores


def finding_map(
    patch_embeds: npt.ArrayLike,
    grid: Grid,
    prompts: FindingPrompts,
    image_shape: tuple[int, int],
    spec: ImageSpec,
) -> Map:
    """The finding's heat map in [0, 1] on the original image's pixel grid ``image_shape``.

    ``patch_embeds`` [P, D] are one image's tokens (class token dropped), row-major on
    ``grid``; ``spec`` is the preprocessing that made the model input from that image.
    """
    rows, cols = grid
    scores = patch_scores(patch_embeds, prompts)
    if scores.shape[0] != rows * cols:
        raise ValueError(f"{scores.shape[0]} patch tokens do not fill a {rows}x{cols} grid")
    return input_map_to_image(
        resize_bilinear(scores.reshape(rows, cols), (spec.size, spec.size)), image_shape, spec
    )


def input_map_to_image(
    on_input: npt.ArrayLike,
    image_shape: tuple[int, int],
    spec: ImageSpec,
    *,
    stretch: bool = True,
) -> Map:
    """A score map over the square model input -> [0, 1] map over the original image.

    Normalisation uses only the input pixels that show the image, so letterbox padding (whose
    tokens score anything) neither sets the range nor appears in the result: min-max for
    scores of any sign, or, with ``stretch=False`` (a map already >= 0 where 0 means "no
    effect", as occlusion's), division by the maximum only, so 0 stays 0.
    """
    height, width = image_shape
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {image_shape}")
    source = np.asarray(on_input, dtype=np.float32)
    if source.shape != (spec.size, spec.size):
        raise ValueError(f"the input map must be [{spec.size}, {spec.size}], got {source.shape}")
    (new_h, new_w), (top, left) = fit_geometry(
        height, width, spec.size, spec.resize, spec.crop_offset
    )
    if spec.resize == "letterbox":
        # The resized image sits inside the input, surrounded by padding.
        return resize_bilinear(
            _normalised(source[top : top + new_h, left : left + new_w], stretch), image_shape
        )
    if spec.resize == "stretch":
        return resize_bilinear(_normalised(source, stretch), image_shape)
    # center-crop: the input is a window of the resized image; the rest was never seen.
    resized = np.zeros((new_h, new_w), dtype=np.float32)
    resized[top : top + spec.size, left : left + spec.size] = _normalised(source, stretch)
    return np.clip(resize_bilinear(resized, image_shape), 0.0, 1.0)


def _normalised(array: npt.NDArray[np.float32], stretch: bool) -> npt.NDArray[np.float32]:
    if stretch:
        return _min_max(array)
    high = float(array.max())
    return (np.clip(array, 0.0, None) / high).astype(np.float32) if high > 0 else array * 0


def _min_max(array: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    low, high = float(array.min()), float(array.max())
    # A flat map points nowhere: zeros, not a division by zero.
    if high - low <= 0:
        return np.zeros_like(array)
    return ((array - low) / (high - low)).astype(np.float32)
