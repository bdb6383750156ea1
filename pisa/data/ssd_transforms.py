"""SSD training augmentation (method doc §5.4): photometric distortion -> expand -> min-IoU random crop
-> resize to a fixed square -> normalise -> flip; at test time resize and normalise only.

Same contract as :mod:`pisa.data.transforms`: ``t(image, target, generator=None) -> (image, target)``,
a new target dict every time, every random draw from ``generator``. Boxes, ignore boxes, labels and
masks stay consistent with the image through each step: a box lives in the pixel coordinates of the
image it is returned with. Images leave :class:`PhotoMetricDistortion` and :class:`Expand` as float32
in 0-255 units (not clipped, as in the reference).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import box_iou

from pisa.data.errors import DatasetConfigError
from pisa.data.transforms import (Compose, Normalize, RandomHorizontalFlip, Target, _resize_image, _resize_masks,
                                  _scale_boxes, as_tensor)

__all__ = ["PhotoMetricDistortion", "Expand", "MinIoURandomCrop", "SquareResize", "crop_to_patch",
           "build_ssd_transforms"]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _coin(generator: torch.Generator | None) -> bool:
    """A fair coin (the reference's ``random.randint(2)``)."""
    return bool(torch.randint(2, (1,), generator=generator))


# --- photometric distortion --------------------------------------------------------------------


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float RGB (0-255) -> HSV with H in degrees ``[0, 360)``, S in ``[0, 1]``, V as the input
    (OpenCV's float convention)."""
    r, g, b = img.unbind(0)
    value, _ = img.max(0)
    delta = value - img.min(0).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, 60 * (g - b) / safe,
                      torch.where(value == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    hue = torch.where(hue < 0, hue + 360, hue)
    sat = torch.where(value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    return torch.stack([hue, sat, value])


def hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (sector formula; saturations above 1 extrapolate, as OpenCV's)."""
    hue, sat, value = img.unbind(0)
    h = hue / 60
    sector = torch.floor(h)
    f = h - sector
    sector = sector.long() % 6
    p, q, t = value * (1 - sat), value * (1 - sat * f), value * (1 - sat * (1 - f))
    table = torch.stack([torch.stack(c) for c in ((value, t, p), (q, value, p), (p, value, t),
                                                  (p, q, value), (t, p, value), (value, p, q))])  # [6, 3, H, W]
    return table.gather(0, sector[None, None].expand(1, 3, *sector.shape))[0]


class PhotoMetricDistortion:
    """The reference's SSD colour jitter, each step with probability 0.5, in its order.

    Brightness ``+U(-brightness_delta, brightness_delta)``; contrast ``·U(contrast_range)`` either first
    or last (a coin decides); in HSV: saturation ``·U(saturation_range)``, hue ``+U(-hue_delta,
    hue_delta)`` degrees (wrapped); finally a random permutation of the channels. Boxes are unchanged.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: float = 18) -> None:
        self.brightness_delta, self.hue_delta = float(brightness_delta), float(hue_delta)
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    def _contrast(self, img: torch.Tensor, generator) -> torch.Tensor:
        return img * _uniform(*self.contrast_range, generator) if _coin(generator) else img

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        img = as_tensor(image).float()
        if _coin(generator):
            img = img + _uniform(-self.brightness_delta, self.brightness_delta, generator)
        contrast_first = not _coin(generator)  # the reference's mode 0 puts contrast last
        if contrast_first:
            img = self._contrast(img, generator)
        hsv = rgb_to_hsv(img)
        if _coin(generator):
            hsv[1] *= _uniform(*self.saturation_range, generator)
        if _coin(generator):
            hsv[0] += _uniform(-self.hue_delta, self.hue_delta, generator)
            hsv[0] = torch.where(hsv[0] >= 360, hsv[0] - 360, torch.where(hsv[0] < 0, hsv[0] + 360, hsv[0]))
        img = hsv_to_rgb(hsv)
        if not contrast_first:
            img = self._contrast(img, generator)
        if _coin(generator):
            img = img[torch.randperm(3, generator=generator)]
        return img, dict(target)


# --- expand (zoom out) -------------------------------------------------------------------------


class Expand:
    """With probability ``prob``, place the image on a ``ratio``-times larger canvas filled with ``mean``.

    ``ratio ~ U(ratio_range)``; the canvas is ``(int(h·ratio), int(w·ratio))`` and the image's top-left
    corner is ``(int(U(0, w·ratio − w)), int(U(0, h·ratio − h)))``. Boxes shift with it; masks are
    zero-padded.

    Args:
        mean: the RGB fill value (0-255), the normalisation mean, so the canvas normalises to 0.
    """

    def __init__(self, mean: Sequence[float], ratio_range: Sequence[float] = (1.0, 4.0), prob: float = 0.5) -> None:
        if len(ratio_range) != 2 or not 1.0 <= ratio_range[0] <= ratio_range[1]:
            raise DatasetConfigError(f"data.ssd_transforms.expand_ratio={list(ratio_range)} must be [low, high] "
                                     "with 1 <= low <= high")
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.ratio_range, self.prob = tuple(float(r) for r in ratio_range), float(prob)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        if float(torch.rand((), generator=generator)) >= self.prob:
            return image, target
        img = as_tensor(image)
        _, height, width = img.shape
        ratio = _uniform(*self.ratio_range, generator)
        left = int(_uniform(0, width * ratio - width, generator))
        top = int(_uniform(0, height * ratio - height, generator))
        canvas = self.mean.expand(3, int(height * ratio), int(width * ratio)).clone()
        canvas[:, top:top + height, left:left + width] = img.float()
        out = dict(target)
        shift = torch.tensor([left, top, left, top], dtype=torch.float32)
        out["boxes"] = target["boxes"] + shift
        out["ignore_boxes"] = target["ignore_boxes"] + shift
        if "masks" in target:
            masks = target["masks"]
            padded = masks.new_zeros((masks.shape[0], *canvas.shape[1:]))
            padded[:, top:top + height, left:left + width] = masks
            out["masks"] = padded
        out["img_shape"] = tuple(canvas.shape[1:])
        return canvas, out


# --- min-IoU random crop -----------------------------------------------------------------------


def _centres_inside(boxes: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """bool ``[N]``: the box centre lies strictly inside ``patch = (x1, y1, x2, y2)``."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx > patch[0]) & (cy > patch[1]) & (cx < patch[2]) & (cy < patch[3])


def _crop_boxes(boxes: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Clip ``[N, 4]`` boxes to ``patch`` and move them to its coordinates."""
    x1, y1, x2, y2 = patch
    low = boxes.new_tensor([x1, y1, x1, y1])
    high = boxes.new_tensor([x2, y2, x2, y2])
    return torch.minimum(torch.maximum(boxes, low), high) - low


def crop_to_patch(image, target: Target, patch: Sequence[int]):
    """Crop to the integer ``patch = (x1, y1, x2, y2)`` with the reference's survival rule.

    A box (or ignore box) survives iff its centre lies strictly inside the patch; survivors are clipped
    to the patch, and their labels and masks are kept with them. A patch may remove every box.
    """
    x1, y1, x2, y2 = (int(v) for v in patch)
    img = as_tensor(image)[:, y1:y2, x1:x2]
    out = dict(target)
    keep = _centres_inside(target["boxes"], (x1, y1, x2, y2))
    out["boxes"] = _crop_boxes(target["boxes"][keep], (x1, y1, x2, y2))
    out["labels"] = target["labels"][keep]
    if "masks" in target:
        out["masks"] = target["masks"][keep][:, y1:y2, x1:x2]
    ignore = target["ignore_boxes"]
    out["ignore_boxes"] = _crop_boxes(ignore[_centres_inside(ignore, (x1, y1, x2, y2))], (x1, y1, x2, y2))
    out["img_shape"] = tuple(img.shape[1:])
    return img, out


class MinIoURandomCrop:
    """The reference's SSD crop: a random patch whose IoU with every box is at least a drawn minimum.

    Per image a mode is drawn uniformly from ``(no crop, *min_ious, 0)``. For a minimum ``m``, up to
    ``max_trials`` patches are drawn: sides ``U(min_crop_size·side, side)`` with aspect ``h/w`` in
    ``[0.5, 2]``, a uniform position, corners truncated to integers; a patch is accepted when it is not
    degenerate, every box has IoU ``>= m`` with it, and (when there are boxes) some box centre lies in
    it. Then :func:`crop_to_patch` applies it. When no patch is accepted, a new mode is drawn.
    """

    def __init__(self, min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size: float = 0.3,
                 max_trials: int = 50) -> None:
        self.modes = (None, *[float(v) for v in min_ious], 0.0)  # None: keep the image as it is
        self.min_crop_size, self.max_trials = float(min_crop_size), int(max_trials)

    def _draw_patch(self, width: int, height: int, generator) -> tuple[int, int, int, int] | None:
        new_w = _uniform(self.min_crop_size * width, width, generator)
        new_h = _uniform(self.min_crop_size * height, height, generator)
        if not 0.5 <= new_h / new_w <= 2:
            return None
        left, top = _uniform(0, width - new_w, generator), _uniform(0, height - new_h, generator)
        patch = (int(left), int(top), int(left + new_w), int(top + new_h))
        return None if patch[2] == patch[0] or patch[3] == patch[1] else patch

    def _accepts(self, patch, boxes: torch.Tensor, min_iou: float) -> bool:
        if boxes.shape[0] == 0:
            return True
        overlaps = box_iou(torch.tensor([patch], dtype=torch.float32), boxes.float())[0]
        return bool(overlaps.min() >= min_iou) and bool(_centres_inside(boxes, patch).any())

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        img = as_tensor(image)
        _, height, width = img.shape
        for _ in range(1000):  # the reference loops until it succeeds; "no crop" has probability 1/7
            min_iou = self.modes[int(torch.randint(len(self.modes), (1,), generator=generator))]
            if min_iou is None:
                return img, target
            for _ in range(self.max_trials):
                patch = self._draw_patch(width, height, generator)
                if patch is not None and self._accepts(patch, target["boxes"], min_iou):
                    return crop_to_patch(img, target, patch)
        return img, target


# --- resize to a fixed square ------------------------------------------------------------------


class SquareResize:
    """Resize to ``size x size`` ignoring the aspect ratio: ``scale_factor = (size/W, size/H)``.

    Bilinear for the image, nearest for masks; boxes are scaled per axis and clipped to the image.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise DatasetConfigError(f"data.ssd_transforms.size={size} must be a positive integer")
        self.size = int(size)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        img = as_tensor(image)
        height, width = img.shape[-2:]
        if (height, width) != (self.size, self.size):
            img = _resize_image(img, self.size, self.size)
        sx, sy = self.size / width, self.size / height
        out = dict(target)
        out["boxes"] = _scale_boxes(target["boxes"], sx, sy, self.size, self.size)
        out["ignore_boxes"] = _scale_boxes(target["ignore_boxes"], sx, sy, self.size, self.size)
        if "masks" in target:
            out["masks"] = _resize_masks(target["masks"], self.size, self.size)
        prev_sx, prev_sy = target.get("scale_factor", (1.0, 1.0))
        out["scale_factor"] = (prev_sx * sx, prev_sy * sy)
        out["img_shape"] = (self.size, self.size)
        return img, out


def build_ssd_transforms(size: int, mean: Sequence[float], std: Sequence[float], to_rgb: bool, train: bool, *,
                         flip_prob: float = 0.5, photometric: bool = True,
                         expand_ratio: Sequence[float] = (1.0, 4.0),
                         min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                         min_crop_size: float = 0.3) -> Compose:
    """The SSD pipeline (``data.pipeline: ssd``): train as in the module docstring, test resize + normalise.

    ``mean``/``std``/``to_rgb`` are ``data.normalize`` (SSD: the RGB mean, std 1); the expand canvas is
    filled with ``mean`` in RGB order.
    """
    normalize = Normalize(mean, std, to_rgb)
    if not train:
        return Compose([SquareResize(size), normalize])
    fill = list(mean) if to_rgb else list(mean)[::-1]  # mean is given in the normalised channel order
    steps: list = [PhotoMetricDistortion()] if photometric else []
    if expand_ratio[1] > 1.0:
        steps.append(Expand(fill, expand_ratio))
    if min_ious:
        steps.append(MinIoURandomCrop(min_ious, min_crop_size))
    steps += [SquareResize(size), normalize]
    if flip_prob > 0:
        steps.append(RandomHorizontalFlip(flip_prob))
    return Compose(steps)
