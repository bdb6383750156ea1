"""PISA's loss-side components: ISR-P reweighting of positives and the CARL loss.

Both are pure functions of flattened per-device batch tensors (method spec §2, §3):

* ``isr_p`` returns new classification label weights (a constant for the loss) that move
  attention to the prime positives, i.e. those ranked high by IoU-HLR;
* ``carl_loss`` returns the extra scalar ``loss_carl`` that couples classification and regression.

Conventions: ``C = num_classes`` foreground labels ``0..C-1``, background ``C``; sigmoid heads have
``C`` logit columns, softmax heads ``C + 1`` with background last. PISA statistics are computed in
float32 even for fp16/bf16 inputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .focal import sigmoid_focal_loss, softmax_cross_entropy, upcast
from .hlr import gt_group_ids, iou_hlr
from .regression import aligned_box_iou, smooth_l1_loss

__all__ = ["isr_p", "carl_loss"]

ClsLoss = Callable[[Tensor, Tensor], Tensor]

# Below this the normalisation Σ w·L / Σ lw·L is numerically meaningless (defect D3).
_MIN_NORMALISER = 1e-12


def _positive_indices(labels: Tensor, num_classes: int) -> Tensor:
    """``(P,)`` int64 flat indices of samples with ``0 <= label < num_classes``, ascending."""
    return torch.nonzero((labels >= 0) & (labels < num_classes), as_tuple=False).squeeze(1)


def _positive_deltas(bbox_pred: Tensor, pos: Tensor, pos_labels: Tensor, num_classes: int, where: str) -> Tensor:
    """Predicted ``(P, 4)`` deltas of the positives; class-specific heads give the GT-class slice."""
    n, width = bbox_pred.shape[0], bbox_pred.shape[-1]
    if bbox_pred.dim() != 2 or width not in (4, 4 * num_classes):
        raise ValueError(f"{where}: bbox_pred must be (N, 4) or (N, 4*num_classes) = (N, {4 * num_classes}), "
                         f"got {tuple(bbox_pred.shape)}")
    if width == 4:
        return bbox_pred[pos]
    return bbox_pred.view(n, num_classes, 4)[pos, pos_labels]


def _check_common(cls_score: Tensor, labels: Tensor, bbox_pred: Tensor, bbox_targets: Tensor, where: str) -> None:
    n = labels.shape[0]
    if labels.dim() != 1:
        raise ValueError(f"{where}: labels must be 1-D (N,), got {tuple(labels.shape)}")
    for name, t in (("cls_score", cls_score), ("bbox_pred", bbox_pred), ("bbox_targets", bbox_targets)):
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(f"{where}: {name} must be 2-D with N = {n} rows, got {tuple(t.shape)}")
    if bbox_targets.shape[1] != 4:
        raise ValueError(f"{where}: bbox_targets must be (N, 4) encoded deltas, got {tuple(bbox_targets.shape)}")


def _classification_loss(logits: Tensor, labels: Tensor, cls_loss: str | ClsLoss, num_classes: int,
                         focal_alpha: float, focal_gamma: float) -> Tensor:
    """Unreduced, unweighted classification loss of the positives, summed to ``(P,)``.

    A ``(P, C)`` element-wise loss (sigmoid focal) is summed over all ``C`` columns: the positive
    anchor's label weight scales its whole row in the head's loss (method spec §2.8).
    """
    if cls_loss == "sigmoid_focal":
        if logits.shape[1] != num_classes:
            raise ValueError(f"isr_p: cls_loss='sigmoid_focal' needs cls_score (N, num_classes) = "
                             f"(N, {num_classes}), got (N, {logits.shape[1]})")
        loss = sigmoid_focal_loss(logits, labels, alpha=focal_alpha, gamma=focal_gamma)
    elif cls_loss == "softmax_ce":
        if logits.shape[1] != num_classes + 1:
            raise ValueError(f"isr_p: cls_loss='softmax_ce' needs cls_score (N, num_classes + 1) = "
                             f"(N, {num_classes + 1}) with background last, got (N, {logits.shape[1]})")
        loss = softmax_cross_entropy(logits, labels)
    elif callable(cls_loss):
        loss = upcast(cls_loss(logits, labels))
    else:
        raise ValueError(f"isr_p: cls_loss must be 'sigmoid_focal', 'softmax_ce' or a callable, got {cls_loss!r}")
    if loss.dim() == 2 and loss.shape[0] == labels.shape[0]:
        loss = loss.sum(dim=1)
    if loss.shape != labels.shape:
        raise ValueError(f"isr_p: the classification loss must return (P,) or (P, C') values, got {tuple(loss.shape)}")
    return loss


@torch.no_grad()
def isr_p(cls_score: Tensor, bbox_pred: Tensor, labels: Tensor, label_weights: Tensor, bbox_targets: Tensor,
          priors: Tensor, gt_inds: Tensor, img_inds: Tensor, *, num_classes: int,
          decode: Callable[[Tensor, Tensor], Tensor], cls_loss: str | ClsLoss = "sigmoid_focal",
          k: float = 2.0, bias: float = 0.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
          loss_weight: float = 1.0, legacy_gt_offset: bool = False, legacy_float_keys: bool = False) -> Tensor:
    """Importance-based sample reweighting of positives (ISR-P; method spec §2).

    Positives are ranked by IoU-HLR of their regressed boxes; rank ``r`` of a class maps to
    ``u = (n_max - r) / n_max`` and ``w = (bias + (1 - bias) lw u)^k``; ``w`` is then rescaled so that
    ``Σ_pos w L = Σ_pos lw L`` (the positives' summed classification loss is unchanged).

    Args:
        cls_score: ``(N, C)`` sigmoid or ``(N, C + 1)`` softmax logits (background last).
        bbox_pred: ``(N, 4)`` class-agnostic or ``(N, 4C)`` class-specific predicted deltas.
        labels: ``(N,)`` int64 in ``0..C`` (``C`` = background; other values are never positive).
        label_weights: ``(N,)`` incoming classification weights; never modified.
        bbox_targets: ``(N, 4)`` encoded target deltas (read for positives only).
        priors: ``(N, 4)`` anchors or RoIs ``(x1, y1, x2, y2)``.
        gt_inds: ``(N,)`` index of the assigned GT inside its image (read for positives only).
        img_inds: ``(N,)`` image index of each sample.
        num_classes: ``C``.
        decode: ``decode(priors (P, 4), deltas (P, 4)) -> boxes (P, 4)`` with the head's coder,
            without clipping to the image.
        cls_loss: ``"sigmoid_focal"``, ``"softmax_ce"`` or a callable ``(logits (P, C'), labels (P,))
            -> (P,) or (P, C')`` returning the unreduced, unweighted loss.
        k, bias: non-linear map exponent and bias (paper ``γ_P``, ``β_P``).
        focal_alpha, focal_gamma: focal loss parameters for ``"sigmoid_focal"``.
        loss_weight: the classification loss module's weight (multiplies ``L``).
        legacy_gt_offset: group GTs with the reference's colliding offsets (defect D1).
        legacy_float_keys: rank with the reference's float32 keys (defect D9).

    Returns:
        New ``(N,)`` label weights, detached, float32 (float64 if ``label_weights`` is float64).
        Only positives differ from ``label_weights``; with no positive it is an unchanged copy.
    """
    _check_common(cls_score, labels, bbox_pred, bbox_targets, "isr_p")
    dtype = torch.promote_types(label_weights.dtype, torch.float32)
    new_weights = label_weights.detach().to(dtype=dtype, copy=True)
    pos = _positive_indices(labels, num_classes)
    if pos.numel() == 0:
        return new_weights
    pos_labels = labels[pos].long()
    pos_weights = new_weights[pos]

    groups = gt_group_ids(img_inds[pos], gt_inds[pos], legacy_gt_offset=legacy_gt_offset)
    pos_priors = upcast(priors.detach()[pos])
    pred_deltas = upcast(_positive_deltas(bbox_pred.detach(), pos, pos_labels, num_classes, "isr_p"))
    target_deltas = upcast(bbox_targets.detach()[pos])
    ious = aligned_box_iou(decode(pos_priors, pred_deltas), decode(pos_priors, target_deltas))

    hlr = iou_hlr(pos_labels, groups, ious, legacy_float_keys=legacy_float_keys)
    n_max = hlr.n_max.to(ious.dtype)
    importance = (n_max - hlr.rank.to(ious.dtype)) / n_max  # Eq. 1
    # The incoming label weight multiplies u before the power, as the reference does.
    weights = (bias + (1 - bias) * pos_weights.to(ious.dtype) * importance).pow(k)  # Eq. 2

    losses = _classification_loss(upcast(cls_score.detach()[pos]), pos_labels, cls_loss, num_classes,
                                  focal_alpha, focal_gamma) * loss_weight
    numerator = (pos_weights.to(losses.dtype) * losses).sum()
    denominator = (weights.to(losses.dtype) * losses).sum()
    usable = torch.isfinite(denominator) & (denominator > _MIN_NORMALISER)
    ratio = torch.where(usable, numerator / denominator, torch.ones_like(denominator))  # Eq. 3, D3 guard
    new_weights[pos] = (weights * ratio).to(dtype)
    return new_weights


def _positive_probability(logits: Tensor, labels: Tensor, num_classes: int, sigmoid: bool) -> Tensor:
    """``(P,)`` GT-class probability, differentiable: sigmoid of one logit or a (C+1)-way softmax."""
    expected = num_classes if sigmoid else num_classes + 1
    if logits.shape[1] != expected:
        kind = "sigmoid: (N, num_classes)" if sigmoid else "softmax: (N, num_classes + 1), background last"
        raise ValueError(f"carl_loss: cls_score must be {kind} = (N, {expected}), got (N, {logits.shape[1]})")
    if sigmoid:
        return torch.sigmoid(logits.gather(1, labels[:, None]).squeeze(1))
    return torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)


def carl_loss(cls_score: Tensor, labels: Tensor, bbox_pred: Tensor, bbox_targets: Tensor, *, num_classes: int,
              avg_factor: float | Tensor, sigmoid: bool = True, k: float = 1.0, bias: float = 0.2,
              beta: float = 1.0, loss_weight: float = 1.0) -> Tensor:
    """Classification-aware regression loss (CARL; method spec §3).

    ``loss_carl = Σ_i c_i Σ_coord SmoothL1_β(d_i - d̂_i) · loss_weight / avg_factor`` with
    ``v_i = (bias + (1 - bias) p_i)^k`` and ``c_i = P v_i / Σ_j v_j``. Gradient flows into the
    classifier through ``p_i`` and through the normaliser ``Σ v`` (neither is detached). It is meant
    to be added next to the usual regression loss, not in place of it.

    Args:
        cls_score: ``(N, C)`` sigmoid logits, or ``(N, C + 1)`` softmax logits if ``sigmoid=False``.
        labels: ``(N,)`` int64 in ``0..C`` (``C`` = background).
        bbox_pred: ``(N, 4)`` or class-specific ``(N, 4C)`` predicted encoded deltas.
        bbox_targets: ``(N, 4)`` encoded target deltas. Box weights are not used.
        num_classes: ``C``.
        avg_factor: normaliser ``A`` (RetinaNet/SSD: ``Σ_img max(#pos_img, 1)``; R-CNN: #sampled RoIs).
        sigmoid: activation of the classification head.
        k, bias: CARL exponent and bias (paper ``k = 1``, ``b = 0.2``).
        beta: SmoothL1 transition (RetinaNet 0.11, R-CNN and SSD 1.0); ``<= 0`` gives L1.
        loss_weight: the regression loss module's weight.

    Returns:
        Scalar float32 loss. Without positives it is an exact zero connected to the graphs of both
        ``cls_score`` and ``bbox_pred`` (sums over empty selections: NaN-safe, zero gradients).
    """
    _check_common(cls_score, labels, bbox_pred, bbox_targets, "carl_loss")
    pos = _positive_indices(labels, num_classes)
    pos_labels = labels[pos].long()
    pred_deltas = upcast(_positive_deltas(bbox_pred, pos, pos_labels, num_classes, "carl_loss"))
    logits = upcast(cls_score[pos])
    if pos.numel() == 0:
        # Both terms are empty sums: exactly 0, finite even if some logit is inf (defect D4).
        return logits.sum() + pred_deltas.sum()
    p = _positive_probability(logits, pos_labels, num_classes, sigmoid)
    v = (bias + (1 - bias) * p).pow(k)
    c = v * pos.numel() / v.sum()  # mean-1 weights; the sum stays in the graph
    reg = smooth_l1_loss(pred_deltas, bbox_targets[pos], beta=beta) * loss_weight  # (P, 4)
    avg = upcast(avg_factor) if torch.is_tensor(avg_factor) else float(avg_factor)
    return (c[:, None] * reg).sum() / avg
