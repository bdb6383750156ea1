"""Box geometry: the delta (dx, dy, dw, dh) coder and IoU (method spec §7.3).

Boxes are ``(x1, y1, x2, y2)`` with width ``x2 − x1`` (no ``+1``). All arithmetic runs in float32, or in
float64 when an input is float64, so the coder and IoU give the same numbers under autocast.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def _math_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, promoted to float64 when an input is float64 (never half precision)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split ``(..., 4)`` xyxy boxes into centre x, centre y, width, height, each ``(...)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1


class DeltaXYWHCoder:
    """Encodes boxes as normalised deltas from priors and back (the reference's delta coder).

    ``d = ((g_x − p_x)/p_w, (g_y − p_y)/p_h, ln(g_w/p_w), ln(g_h/p_h))``, then ``(d − means) / stds``.

    Args:
        means, stds: per-coordinate normalisation; stds are ``(1, 1, 1, 1)`` for RetinaNet and the RPN and
            ``(0.1, 0.1, 0.2, 0.2)`` for R-CNN and SSD.
        wh_ratio_clip: decoded ``dw, dh`` are clamped to ``±|ln(wh_ratio_clip)|`` (``±4.1352``).
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"DeltaXYWHCoder: means and stds need 4 values each, got {means} and {stds}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.wh_ratio_clip = wh_ratio_clip
        self.max_log_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, priors: Tensor, gts: Tensor) -> Tensor:
        """Deltas that move ``priors`` onto ``gts``.

        Args:
            priors, gts: ``(..., 4)`` xyxy, broadcastable against each other.

        Returns:
            float32 (float64 for float64 inputs) ``(..., 4)`` normalised deltas.
        """
        dtype = _math_dtype(priors, gts)
        px, py, pw, ph = _centre_size(priors.to(dtype))
        gx, gy, gw, gh = _centre_size(gts.to(dtype))
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        means, stds = deltas.new_tensor(self.means), deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, priors: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """Boxes from ``priors`` moved by ``deltas``.

        Args:
            priors: ``(..., 4)`` xyxy.
            deltas: ``(..., 4)`` normalised deltas, broadcastable against ``priors``; or ``(..., 4·K)``
                class-specific deltas against ``(..., 4)`` priors (R-CNN), decoded per class.
            max_shape: ``(H, W)`` of the resized image; when given (test time), x is clamped to
                ``[0, W]`` and y to ``[0, H]``.

        Returns:
            float32 (float64 for float64 inputs) boxes of the deltas' last-dimension size.
        """
        if deltas.shape[-1] != 4:
            return self._decode_class_specific(priors, deltas, max_shape)
        dtype = _math_dtype(priors, deltas)
        means, stds = deltas.new_tensor(self.means, dtype=dtype), deltas.new_tensor(self.stds, dtype=dtype)
        dx, dy, dw, dh = (deltas.to(dtype) * stds + means).unbind(-1)
        dw = dw.clamp(min=-self.max_log_ratio, max=self.max_log_ratio)
        dh = dh.clamp(min=-self.max_log_ratio, max=self.max_log_ratio)
        px, py, pw, ph = _centre_size(priors.to(dtype))
        gx, gy = px + pw * dx, py + ph * dy
        gw, gh = pw * dw.exp(), ph * dh.exp()
        boxes = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)
        if max_shape is not None:
            boxes = clip_boxes(boxes, max_shape)
        return boxes

    def _decode_class_specific(self, priors: Tensor, deltas: Tensor, max_shape) -> Tensor:
        if deltas.shape[-1] % 4 != 0 or priors.shape[-1] != 4:
            raise ValueError(f"DeltaXYWHCoder.decode: deltas must end in 4 or 4·K values and priors in 4, "
                             f"got {tuple(deltas.shape)} and {tuple(priors.shape)}")
        per_class = deltas.reshape(*deltas.shape[:-1], -1, 4)
        boxes = self.decode(priors.unsqueeze(-2), per_class, max_shape)
        return boxes.reshape(*boxes.shape[:-2], -1)


def clip_boxes(boxes: Tensor, max_shape: tuple[int, int]) -> Tensor:
    """Clamp ``(..., 4)`` xyxy boxes to ``x ∈ [0, W]``, ``y ∈ [0, H]`` for ``max_shape = (H, W)``."""
    height, width = max_shape
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1, x2 = x1.clamp(min=0, max=width), x2.clamp(min=0, max=width)
    y1, y2 = y1.clamp(min=0, max=height), y2.clamp(min=0, max=height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes, ``(...)``, no ``+1``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """Pairwise overlaps of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, float32 ``(N, M)``.

    ``mode="iou"``: intersection over union. ``mode="iof"``: intersection over the area of the
    ``boxes1`` box (used to ignore priors inside crowd regions). Denominators are clamped to ``eps``, as
    the reference does, so degenerate boxes give 0 rather than NaN. (Row-aligned IoU is
    ``pisa.losses.regression.aligned_box_iou``.)
    """
    if mode not in ("iou", "iof"):
        raise ValueError(f"box_iou: mode must be 'iou' or 'iof', got {mode!r}")
    dtype = _math_dtype(boxes1, boxes2)
    a, b = boxes1.to(dtype), boxes2.to(dtype)
    # Per-coordinate (N, M) terms rather than (N, M, 2) corner tensors: dense anchors × GTs is large.
    inter_w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    overlap = inter_w * inter_h
    area_a = box_area(a)[:, None]
    denominator = area_a if mode == "iof" else area_a + box_area(b)[None, :] - overlap
    return overlap / denominator.clamp(min=eps)

