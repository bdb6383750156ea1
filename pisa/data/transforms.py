"""Detection transforms: callables ``t(image, target, generator=None) -> (image, target)``.

``image`` is a PIL image or a ``[3, H, W]`` tensor (uint8, or float in 0-255 units until
:class:`Normalize`, which returns normalised float32). ``target`` is the dataset's target dict
(``boxes`` float32 ``[N, 4]`` xyxy, ``ignore_boxes`` ``[M, 4]``, optional ``masks`` uint8
``[N, h, w]``, metas ``img_shape``, ``ori_shape``, ``scale_factor``, ``flip``); transforms return a
new dict and never modify the one passed in. Random transforms draw from ``generator`` (a
``torch.Generator``; the global torch RNG when None), so a sample's augmentation is reproducible
from a per-sample seed whatever worker loads it. Padding to a multiple of 32 happens in collate.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pisa.data.errors import DatasetConfigError

Target = dict[str, Any]


# --- images ------------------------------------------------------------------------------------


def to_rgb_image(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha (RGBA, LA, PA) is dropped, as an OpenCV colour read does; palette, grey, bilevel and CMYK
    images use PIL's conversion. 16-bit integer modes (``I;16*``, and ``I`` whose values exceed 255)
    keep their top 8 bits (``v >> 8``); ``F`` is read as 0-1 when its maximum is <= 1, else 0-255.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        grey = _high_depth_to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    return img.convert("RGB")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float grey image [H, W] to uint8 [H, W]."""
    if mode == "F":
        values = values.astype(np.float64)
        finite_max = np.nanmax(values) if values.size else 0.0
        if finite_max <= 1.0:
            values = values * 255.0
        return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    values = values.astype(np.int64)
    if mode.startswith("I;16") or (values.size and values.max() > 255):
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)


def as_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image as a uint8 ``[3, H, W]`` tensor (RGB); tensors pass through unchanged."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.array(to_rgb_image(image))).permute(2, 0, 1)


# --- geometry ----------------------------------------------------------------------------------


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """Keep-ratio size fitting ``scale`` (long, short edge limits, in either order).

    ``s = min(max(scale) / long_side, min(scale) / short_side)``; each new side is
    ``int(side * s + 0.5)``. Returns ``(new_width, new_height)``.
    """
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _scale_boxes(boxes: torch.Tensor, sx: float, sy: float, width: int, height: int) -> torch.Tensor:
    """``[N, 4]`` xyxy boxes scaled per axis and clipped to ``[0, width] x [0, height]``."""
    scaled = boxes * boxes.new_tensor([sx, sy, sx, sy])
    limits = boxes.new_tensor([width, height, width, height])
    return torch.minimum(scaled.clamp(min=0), limits)


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Horizontal flip of ``[N, 4]`` xyxy boxes in an image ``width`` wide: ``x' = W - x``."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _resize_image(img: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear, half-pixel-centre resize of ``[3, H, W]`` without antialiasing (as OpenCV does).

    uint8 stays uint8 (rounded), other dtypes are resized in float32.
    """
    src = img[None] if img.dtype == torch.uint8 else img[None].float()
    return F.interpolate(src, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=False)[0]


def _resize_masks(masks: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Nearest-neighbour (pixel-centre aligned) resize of uint8 masks ``[N, h, w]``."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    return F.interpolate(masks[None], size=(height, width), mode="nearest-exact")[0]


class Resize:
    """Keep-ratio resize to one scale, or to a scale drawn at random from several.

    Args:
        scales: ``(long, short)`` edge limits, e.g. ``[(1333, 800)]``; with several, one is chosen
            uniformly per image (the reference's multi-scale "value" mode).
    """

    def __init__(self, scales: Sequence[Sequence[int]]) -> None:
        self.scales = [tuple(int(v) for v in s) for s in scales]

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        scale = self.scales[0]
        if len(self.scales) > 1:
            scale = self.scales[int(torch.randint(len(self.scales), (1,), generator=generator))]
        img = as_tensor(image)
        height, width = img.shape[-2:]
        new_w, new_h = rescale_size(width, height, scale)
        if (new_w, new_h) != (width, height):
            img = _resize_image(img, new_w, new_h)
        sx, sy = new_w / width, new_h / height
        out = dict(target)
        out["boxes"] = _scale_boxes(target["boxes"], sx, sy, new_w, new_h)
        out["ignore_boxes"] = _scale_boxes(target["ignore_boxes"], sx, sy, new_w, new_h)
        if "masks" in target:
            out["masks"] = _resize_masks(target["masks"], new_w, new_h)
        prev_sx, prev_sy = target.get("scale_factor", (1.0, 1.0))
        out["scale_factor"] = (prev_sx * sx, prev_sy * sy)
        out["img_shape"] = (new_h, new_w)
        return img, out


class RandomHorizontalFlip:
    """Flip image, boxes (``x' = W - x``), ignore boxes and masks with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0.0 <= prob <= 1.0:
            raise DatasetConfigError(f"flip_prob={prob} must lie in [0, 1]")
        self.prob = float(prob)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        if self.prob == 0.0 or float(torch.rand((), generator=generator)) >= self.prob:
            return image, target
        img = as_tensor(image).flip(-1)
        width = img.shape[-1]
        out = dict(target)
        out["boxes"] = _flip_boxes(target["boxes"], width)
        out["ignore_boxes"] = _flip_boxes(target["ignore_boxes"], width)
        if "masks" in target:
            out["masks"] = target["masks"].flip(-1)
        out["flip"] = not target.get("flip", False)
        return img, out


class Normalize:
    """``(image - mean) / std`` per channel in 0-255 units, returning float32 ``[3, H, W]``.

    Images are loaded as RGB. ``to_rgb=True`` keeps RGB; ``to_rgb=False`` gives BGR (for weights
    trained on BGR input). ``mean``/``std`` are in the output channel order.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], to_rgb: bool = True) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DatasetConfigError(f"normalize needs 3 means and 3 positive stds, got mean={mean}, "
                                     f"std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.to_rgb = bool(to_rgb)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        img = as_tensor(image)
        if not self.to_rgb:
            img = img.flip(0)
        return torch.sub(img.float(), self.mean).div_(self.std), target


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        for transform in self.transforms:
            image, target = transform(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({[type(t).__name__ for t in self.transforms]})"


def _check_scales(scales: Any) -> list[tuple[int, int]]:
    """Accept ``[long, short]`` or a list of such pairs; return a list of int pairs."""
    if isinstance(scales, (list, tuple)) and len(scales) == 2 and all(
            isinstance(v, (int, float)) for v in scales):
        scales = [scales]
    ok = isinstance(scales, (list, tuple)) and len(scales) > 0 and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, (int, float)) and v > 0
                                                              for v in s) for s in scales)
    if not ok:
        raise DatasetConfigError(f"scales={scales!r} must be a list of [long, short] pairs of "
                                 "positive numbers, e.g. [[1333, 800]]")
    return [(int(a), int(b)) for a, b in scales]


def build_transforms(scales: Sequence, flip_prob: float, mean: Sequence[float], std: Sequence[float],
                     to_rgb: bool, train: bool) -> Compose:
    """The standard pipeline: resize -> (train: random flip) -> normalise.

    Training draws a scale per image when several are given; evaluation needs exactly one scale and
    never flips.
    """
    scales = _check_scales(scales)
    if not train and len(scales) != 1:
        raise DatasetConfigError(f"test_transforms.scales={scales} has {len(scales)} scales; "
                                 "evaluation resizes to exactly one (multi-scale testing is not "
                                 "supported)")
    steps: list = [Resize(scales)]
    if train and flip_prob > 0:
        steps.append(RandomHorizontalFlip(flip_prob))
    steps.append(Normalize(mean, std, to_rgb))
    return Compose(steps)
