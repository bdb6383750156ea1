"""Classification losses used by the detection heads and by ISR-P's normalisation.

Label convention (shared by every function here): ``C`` foreground classes are ``0..C-1`` and the
label ``C`` means background. Sigmoid heads have ``C`` logit columns; softmax heads have ``C + 1``
with background **last**. All losses are returned unreduced and computed in float32 (float64 inputs
stay float64), also under autocast, because ISR-P and CARL normalise by sums of these values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_tensor

__all__ = ["sigmoid_focal_loss", "softmax_cross_entropy"]


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` as float32, or unchanged if it is already float64.

    Half-precision inputs (fp16/bf16) are upcast so that every loss statistic is computed in fp32.
    The cast is differentiable: gradients flow back into the original low-precision tensor.
    """
    return x if x.dtype == torch.float64 else x.float()


def _check_inputs(fn: str, logits: Tensor, labels: Tensor, columns: str) -> None:
    check_tensor(fn, "logits", logits, ("N", columns), "float")
    check_tensor(fn, "labels", labels, ("N",), "int", {"N": logits.shape[0]})


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (Lin et al., 2017), unreduced.

    Args:
        logits: ``(N, C)`` raw scores of a sigmoid head, any float dtype.
        labels: ``(N,)`` int64 in ``0..C``; ``C`` (background) gives an all-zero one-hot row.
        alpha: weight of the positive term; ``alpha < 0`` disables the alpha weighting
            (same rule as ``torchvision.ops.sigmoid_focal_loss``).
        gamma: focusing exponent.

    Returns:
        ``(N, C)`` float32 loss: ``-alpha (1-p)^gamma log p`` in the label's column and
        ``-(1-alpha) p^gamma log(1-p)`` in every other column.
    """
    _check_inputs("sigmoid_focal_loss", logits, labels, "C")
    x = upcast(logits)
    num_classes = x.shape[1]
    # One-hot by comparison: the background label C matches no column, so its row is all zeros.
    classes = torch.arange(num_classes, device=x.device)
    targets = (labels[:, None] == classes[None, :]).to(x.dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def softmax_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample softmax cross-entropy, unreduced.

    Args:
        logits: ``(N, C + 1)`` scores of a softmax head, background in the last column.
        labels: ``(N,)`` int64 in ``0..C`` (``C`` = background).

    Returns:
        ``(N,)`` float32 loss ``-log softmax(logits)[label]``.
    """
    _check_inputs("softmax_cross_entropy", logits, labels, "C + 1")
    return F.cross_entropy(upcast(logits), labels, reduction="none")
