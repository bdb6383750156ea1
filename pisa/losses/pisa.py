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

import numbers
from typing import Callable

import torch
from torch import Tensor

from ._checks import check_num_classes, check_tensor
from .focal import sigmoid_focal_loss, softmax_cross_entropy, upcast
from .hlr import gt_group_ids, iou_hlr
from .regression import aligned_box_iou, l1_loss, smooth_l1_loss

__all__ = ["isr_p", "carl_loss"]

ClsLoss = Callable[[Tensor, Tensor], Tensor]

# Below this the normalisation Σ w·L / Σ lw·L is numerically meaningless (defect D3).
_MIN_NORMALISER = 1e-12


def _positive_indices(labels: Tensor, num_classes: int) -> Tensor:
    """``(P,)`` int64 flat indices of samples with ``0 <= label < num_classes``, ascending."""
    return torch.nonzero((labels >= 0) & (labels < num_classes), as_tuple=False).squeeze(1)


def _positive_deltas(bbox_pred: Tensor, pos: Tensor, pos_labels: Tensor, num_classes: int) -> Tensor:
    """Predicted ``(P, 4)`` deltas of the positives; class-specific heads give the GT-class slice."""
    if bbox_pred.shape[-1] == 4:
        return bbox_pred[pos]
    return bbox_pred.view(bbox_pred.shape[0], num_classes, 4)[pos, pos_labels]


def _check_head_outputs(fn: str, cls_score: Tensor, labels: Tensor, bbox_pred: Tensor, bbox_targets: Tensor,
                        num_classes: int, score_columns: int | None, score_hint: str) -> dict[str, int]:
    """Checks shared by ``isr_p`` and ``carl_loss``; returns the named sizes ``{"N", "C"}``."""
    check_tensor(fn, "labels", labels, ("N",), "int")
    sizes = {"N": labels.shape[0], "C": num_classes}
    check_tensor(fn, "cls_score", cls_score, ("N", score_columns), "float", sizes, score_hint)
    check_tensor(fn, "bbox_pred", bbox_pred, [("N", 4), ("N", 4 * num_classes)], "float", sizes,
                 "class-agnostic (N, 4) or class-specific (N, 4 * num_classes) deltas")
    check_tensor(fn, "bbox_targets", bbox_targets, ("N", 4), "float", sizes, "encoded target deltas")
    return sizes


_SCORE_COLUMNS = {"sigmoid_focal": 0, "softmax_ce": 1}  # extra columns beyond C, by named loss


def _check_isr_p_inputs(cls_score: Tensor, bbox_pred: Tensor, labels: Tensor, label_weights: Tensor,
                        bbox_targets: Tensor, priors: Tensor, gt_inds: Tensor, img_inds: Tensor,
                        num_classes: int, decode: object, cls_loss: object) -> None:
    check_num_classes("isr_p", num_classes)
    if not (callable(cls_loss) or cls_loss in _SCORE_COLUMNS):
        raise ValueError(f"isr_p: cls_loss must be 'sigmoid_focal', 'softmax_ce' or a callable, got {cls_loss!r}")
    if cls_loss == "sigmoid_focal":
        columns, hint = num_classes, "cls_loss='sigmoid_focal' needs (N, num_classes) sigmoid logits"
    elif cls_loss == "softmax_ce":
        columns, hint = num_classes + 1, "cls_loss='softmax_ce' needs (N, num_classes + 1) logits, background last"
    else:
        columns, hint = None, ""
    sizes = _check_head_outputs("isr_p", cls_score, labels, bbox_pred, bbox_targets, num_classes, columns, hint)
    check_tensor("isr_p", "label_weights", label_weights, ("N",), "float", sizes)
    check_tensor("isr_p", "priors", priors, [("N", 4), ("N", 5)], "float", sizes,
                 "anchors / RoIs (x1, y1, x2, y2), or R-CNN RoIs (batch_index, x1, y1, x2, y2)")
    check_tensor("isr_p", "gt_inds", gt_inds, ("N",), "int", sizes,
                 "per-sample GT index inside its image; flatten_gt_inds builds it from per-image lists")
    check_tensor("isr_p", "img_inds", img_inds, ("N",), "int", sizes, "image index of every sample")
    if not callable(decode):
        raise TypeError(f"isr_p: decode must be a callable decode(priors (P, 4), deltas (P, 4)) -> boxes (P, 4), "
                        f"e.g. your box coder's decode; got {type(decode).__name__}")


def _classification_loss(logits: Tensor, labels: Tensor, cls_loss: str | ClsLoss, num_classes: int,
                         focal_alpha: float, focal_gamma: float) -> Tensor:
    """Unreduced, unweighted classification loss of the positives, summed to ``(P,)``.

    A ``(P, C)`` element-wise loss (sigmoid focal) is summed over all ``C`` columns: the positive
    anchor's label weight scales its whole row in the head's loss (method spec §2.8).
    """
    if cls_loss == "sigmoid_focal":
        loss = sigmoid_focal_loss(logits, labels, alpha=focal_alpha, gamma=focal_gamma)
    elif cls_loss == "softmax_ce":
        loss = softmax_cross_entropy(logits, labels)
    else:
        loss = upcast(cls_loss(logits, labels))
    if loss.dim() == 2 and loss.shape[0] == labels.shape[0]:
        loss = loss.sum(dim=1)
    if loss.shape != labels.shape:
        raise ValueError(f"isr_p: the cls_loss callable must return (P,) or (P, C') unreduced losses for "
                         f"P = {labels.shape[0]} positives, got shape {tuple(loss.shape)}")
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
        cls_score: ``(N, C)`` sigmoid or ``(N, C + 1)`` softmax logits (background last), float.
        bbox_pred: ``(N, 4)`` class-agnostic or ``(N, 4C)`` class-specific predicted deltas, float.
        labels: ``(N,)`` integer, in ``0..C`` (``C`` = background; other values are never positive).
        label_weights: ``(N,)`` float incoming classification weights; never modified.
        bbox_targets: ``(N, 4)`` float encoded target deltas (read for positives only).
        priors: ``(N, 4)`` float anchors or RoIs ``(x1, y1, x2, y2)``; ``(N, 5)`` R-CNN RoIs
            ``(batch_index, x1, y1, x2, y2)`` are accepted too, their first column is dropped.
        gt_inds: ``(N,)`` integer index of the assigned GT inside its image (read for positives only;
            ``flatten_gt_inds`` builds it from per-image lists).
        img_inds: ``(N,)`` integer image index of each sample (read for positives only).
        num_classes: ``C``.
        decode: ``decode(priors (P, 4), deltas (P, 4)) -> boxes (P, 4)`` with the head's coder,
            without clipping to the image.
        cls_loss: ``"sigmoid_focal"``, ``"softmax_ce"`` or a callable ``(logits (P, C'), labels (P,))
            -> (P,) or (P, C')`` returning the unreduced, unweighted loss.
        k, bias: non-linear map exponent and bias (paper ``γ_P``, ``β_P``).
        focal_alpha, focal_gamma: focal loss parameters for ``"sigmoid_focal"``.
        loss_weight: the classification loss module's weight (multiplies ``L``).
        legacy_gt_offset: group GTs with the reference's colliding offsets (defect D1).
        legacy_float_keys: rank exactly as the reference does, ties included (defect D9; see
            ``iou_hlr``).

    Returns:
        New ``(N,)`` label weights, detached, float32 (float64 if ``label_weights`` is float64).
        Only positives differ from ``label_weights``; with no positive it is an unchanged copy.

    Raises:
        ValueError, TypeError: an argument of the wrong shape or dtype, named in the message.
    """
    _check_isr_p_inputs(cls_score, bbox_pred, labels, label_weights, bbox_targets, priors, gt_inds, img_inds,
                        num_classes, decode, cls_loss)
    dtype = torch.promote_types(label_weights.dtype, torch.float32)
    new_weights = label_weights.detach().to(dtype=dtype, copy=True)
    pos = _positive_indices(labels, num_classes)
    if pos.numel() == 0:
        return new_weights
    pos_labels = labels[pos].long()
    pos_weights = new_weights[pos]

    groups = gt_group_ids(img_inds[pos], gt_inds[pos], legacy_gt_offset=legacy_gt_offset)
    pos_priors = upcast(priors.detach()[pos, -4:])  # R-CNN RoIs: drop the batch-index column
    pred_deltas = upcast(_positive_deltas(bbox_pred.detach(), pos, pos_labels, num_classes))
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


def _positive_probability(logits: Tensor, labels: Tensor, sigmoid: bool) -> Tensor:
    """``(P,)`` GT-class probability, differentiable: sigmoid of one logit or a (C+1)-way softmax."""
    if sigmoid:
        return torch.sigmoid(logits.gather(1, labels[:, None]).squeeze(1))
    return torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)


_REGRESSION_LOSSES = ("smooth_l1", "l1")


def _avg_factor(fn: str, avg_factor: float | Tensor | None, num_samples: int) -> float | Tensor:
    """The normaliser ``A``: ``None`` means ``N``, the number of samples, as in the reference."""
    if avg_factor is None:
        return float(num_samples)
    if torch.is_tensor(avg_factor):
        if avg_factor.numel() != 1 or avg_factor.dtype == torch.bool:
            raise ValueError(f"{fn}: avg_factor must be a number, a one-element tensor or None (= N); "
                             f"got a tensor of shape {tuple(avg_factor.shape)}, dtype {avg_factor.dtype}")
        return upcast(avg_factor.reshape(()))
    if isinstance(avg_factor, bool) or not isinstance(avg_factor, numbers.Real) or not avg_factor > 0:
        raise ValueError(f"{fn}: avg_factor must be a positive number, a one-element tensor or None (= N); "
                         f"got {avg_factor!r}")
    return float(avg_factor)


def carl_loss(cls_score: Tensor, labels: Tensor, bbox_pred: Tensor, bbox_targets: Tensor, *, num_classes: int,
              avg_factor: float | Tensor | None = None, sigmoid: bool = True, k: float = 1.0, bias: float = 0.2,
              beta: float = 1.0, loss_weight: float = 1.0, loss: str = "smooth_l1") -> Tensor:
    """Classification-aware regression loss (CARL; method spec §3).

    ``loss_carl = Σ_i c_i Σ_coord R(d_i - d̂_i) · loss_weight / avg_factor`` with
    ``v_i = (bias + (1 - bias) p_i)^k`` and ``c_i = P v_i / Σ_j v_j``, ``R`` the head's regression
    loss (SmoothL1 with ``beta``, or L1). Gradient flows into the classifier through ``p_i`` and
    through the normaliser ``Σ v`` (neither is detached). It is meant to be added next to the usual
    regression loss, not in place of it.

    Args:
        cls_score: ``(N, C)`` float sigmoid logits, or ``(N, C + 1)`` softmax logits (background last)
            if ``sigmoid=False``.
        labels: ``(N,)`` integer, in ``0..C`` (``C`` = background).
        bbox_pred: ``(N, 4)`` or class-specific ``(N, 4C)`` float predicted encoded deltas.
        bbox_targets: ``(N, 4)`` float encoded target deltas. Box weights are not used.
        num_classes: ``C``.
        avg_factor: normaliser ``A`` (RetinaNet/SSD: ``Σ_img max(#pos_img, 1)``; R-CNN: #sampled RoIs).
            ``None`` (the reference's default) means ``N``, the number of samples.
        sigmoid: activation of the classification head.
        k, bias: CARL exponent and bias (paper ``k = 1``, ``b = 0.2``).
        beta: SmoothL1 transition. **Set it to your head's**: RetinaNet 0.11; R-CNN and SSD 1.0 (the
            default). ``beta <= 0`` is plain L1. Ignored with ``loss="l1"``.
        loss_weight: the regression loss module's weight.
        loss: the head's regression loss, ``"smooth_l1"`` (default) or ``"l1"``.

    Returns:
        Scalar float32 loss. Without positives it is an exact zero connected to the graphs of both
        ``cls_score`` and ``bbox_pred`` (sums over empty selections: NaN-safe, zero gradients).

    Raises:
        ValueError, TypeError: an argument of the wrong shape, dtype or value, named in the message.
    """
    check_num_classes("carl_loss", num_classes)
    columns = num_classes if sigmoid else num_classes + 1
    hint = ("sigmoid=True: one logit per class; softmax heads pass sigmoid=False with C + 1 columns"
            if sigmoid else "sigmoid=False: softmax over C + 1 columns, background last")
    _check_head_outputs("carl_loss", cls_score, labels, bbox_pred, bbox_targets, num_classes, columns, hint)
    if loss not in _REGRESSION_LOSSES:
        raise ValueError(f"carl_loss: loss must be one of {_REGRESSION_LOSSES} (the head's regression loss on "
                         f"encoded deltas; IoU-type losses are not supported, defect D10), got {loss!r}")
    avg = _avg_factor("carl_loss", avg_factor, labels.shape[0])
    pos = _positive_indices(labels, num_classes)
    pos_labels = labels[pos].long()
    pred_deltas = upcast(_positive_deltas(bbox_pred, pos, pos_labels, num_classes))
    logits = upcast(cls_score[pos])
    if pos.numel() == 0:
        # Both terms are empty sums: exactly 0, finite even if some logit is inf (defect D4).
        return logits.sum() + pred_deltas.sum()
    p = _positive_probability(logits, pos_labels, sigmoid)
    v = (bias + (1 - bias) * p).pow(k)
    c = v * pos.numel() / v.sum()  # mean-1 weights; the sum stays in the graph
    target_deltas = bbox_targets[pos]
    if loss == "l1":
        reg = l1_loss(pred_deltas, target_deltas)
    else:
        reg = smooth_l1_loss(pred_deltas, target_deltas, beta=beta)
    reg = reg * loss_weight  # (P, 4)
    return (c[:, None] * reg).sum() / avg
