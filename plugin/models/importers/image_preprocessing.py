"""A model's own image preprocessing, mapped onto the bundle's ``image`` block.

pacsclip does the pixel work itself (numpy and Pillow, ``plugin.imaging.preprocess``) from the
display range [0, 1], which is what the source models' 1/255 rescaling produces from 8-bit
images. Only the geometry (resize, crop) and the per-channel mean and std are taken over.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from plugin.models.bundle import BundleError, ImageSpec, validate_model

logger = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics: the default of CLIP image processors and of open_clip.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

Resize = Literal["letterbox", "stretch", "center-crop"]
CropOffset = Literal["floor", "round"]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; the error names the file and what it should be."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing: {what}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object: {what}")
    return data


def image_spec(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: Resize,
    source: str,
    crop_offset: CropOffset = "floor",
) -> ImageSpec:
    block = {"size": size, "channels": 3, "mean": list(mean), "std": list(std), "resize": resize}
    return validate_model(
        ImageSpec,
        {**block, "crop_offset": crop_offset},
        f"the preprocessing in {source} cannot be used",
    )


def from_hf_processor(
    config: Mapping[str, Any], image_size: int, resize_default: Resize, source: str
) -> ImageSpec:
    """A Hugging Face ``preprocessor_config.json`` (CLIPImageProcessor, SiglipImageProcessor).

    transformers' image processors (PIL and torchvision backends alike) start a center crop at
    ``(new - size) // 2``: ``crop_offset`` stays "floor".
    """
    mean = config.get("image_mean", OPENAI_MEAN) if config.get("do_normalize", True) else (0.0,)
    std = config.get("image_std", OPENAI_STD) if config.get("do_normalize", True) else (1.0,)
    resize: Resize
    if not config:
        return image_spec(image_size, mean, std, resize_default, source)
    if config.get("do_center_crop", False):
        crop = _square(config.get("crop_size", image_size), "crop_size", source)
        shortest = _shortest_edge(config.get("size", crop), source)
        if shortest != crop:
            # pacsclip crops the square inscribed in the short side: a model that resizes to
            # 256 and crops 224 sees a little more border than pacsclip gives it.
            logger.warning(
                "%s resizes to %d and crops %d; pacsclip crops at %d", source, shortest, crop, crop
            )
        size, resize = crop, "center-crop"
    else:
        size, resize = _square(config.get("size", image_size), "size", source), "stretch"
    if size != image_size:
        raise BundleError(
            f"{source}: the preprocessing makes {size}x{size} images but the model's "
            f"image_size is {image_size}; fix crop_size/size in preprocessor_config.json"
        )
    return image_spec(size, mean, std, resize, source)


def from_open_clip(preprocess: Mapping[str, Any], image_size: int, source: str) -> ImageSpec:
    """The ``preprocess_cfg`` of an open_clip config (mean, std, resize_mode)."""
    mode = preprocess.get("resize_mode", "shortest")
    resize: Resize
    if mode == "shortest":
        resize = "center-crop"
    elif mode == "squash":
        resize = "stretch"
    elif mode == "longest":
        resize = "letterbox"
    else:
        raise BundleError(
            f"{source}: preprocess_cfg.resize_mode {mode!r} is unknown; use shortest, squash "
            "or longest"
        )
    mean = preprocess.get("mean", OPENAI_MEAN)
    std = preprocess.get("std", OPENAI_STD)
    # open_clip's "shortest" is torchvision's Resize + CenterCrop, which rounds the crop start.
    return image_spec(image_size, mean, std, resize, source, crop_offset="round")


def _square(value: Any, key: str, source: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise BundleError(
                f"{source}: {key} is {value['height']}x{value['width']}; pacsclip models take "
                "square images"
            )
        return int(value["height"])
    if isinstance(value, Mapping) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise BundleError(f"{source}: {key} {value!r} is not a size pacsclip understands")


def _shortest_edge(value: Any, source: str) -> int:
    if isinstance(value, Mapping) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    return _square(value, "size", source)
