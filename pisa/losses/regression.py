"""Box regression losses and aligned IoU.

Boxes are ``(x1, y1, x2, y2)`` floats with width ``x2 - x1`` (no ``+1``). All results are computed in
float32 (float64 inputs stay float64), also under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor
from .focal import upcast

__all__ = ["smooth_l1_loss", "l1_loss", "aligned_box_iou"]


def _check_same_shape(pred: Tensor, target: Tensor, where: str) -> None:
    check_tensor(where, "pred", pred, None, "float")
    check_tensor(where, "target", target, tuple(pred.shape), "float", hint="the shape of pred")


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Element-wise smooth L1: ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta``.

    Args:
        pred, target: tensors of the same shape (typically ``(P, 4)`` encoded deltas).
        beta: transition point; ``beta <= 0`` gives plain L1.

    Returns:
        Unreduced loss of the same shape, float32.
    """
    _check_same_shape(pred, target, "smooth_l1_loss")
    diff = (upcast(pred) - upcast(target)).abs()
    if beta <= 0:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Element-wise ``|pred - target|``, unreduced, float32."""
    _check_same_shape(pred, target, "l1_loss")
    return (upcast(pred) - upcast(target)).abs()


def aligned_box_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of row-aligned box pairs.

    Args:
        a, b: ``(P, 4)`` boxes ``(x1, y1, x2, y2)``; row ``i`` of ``a`` is compared with row ``i`` of ``b``.
        eps: lower clamp of the union, so degenerate pairs give 0 instead of NaN.

    Returns:
        ``(P,)`` float32 IoU, no ``+1`` in widths.
    """
    check_tensor("aligned_box_iou", "a", a, ("P", 4), "float")
    check_tensor("aligned_box_iou", "b", b, ("P", 4), "float", {"P": a.shape[0]})
    a, b = upcast(a), upcast(b)
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = (area_a + area_b - inter).clamp(min=eps)
    return inter / union
