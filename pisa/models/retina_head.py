"""RetinaNet head (two conv towers) and its training criterion, with optional PISA (ISR-P, CARL).

Dense tensors are flattened image -> FPN level (finest first) -> row -> column -> anchor, with the
class or coordinate channel innermost (method doc §5.1), the same order as the anchor generator.
Labels follow the project convention: ``0..C-1`` foreground, ``C`` background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from pisa.losses import carl_loss, isr_p, l1_loss, sigmoid_focal_loss, smooth_l1_loss

__all__ = ["RetinaHead", "RetinaNetLoss", "ISRPSettings", "CARLSettings", "flatten_levels", "level_anchors"]


class RetinaHead(nn.Module):
    """Classification and box-regression towers shared across FPN levels.

    Args:
        num_classes: ``C`` foreground classes (sigmoid, no background column).
        in_channels: channels of every FPN level.
        feat_channels: width of the tower convs.
        stacked_convs: number of conv3x3 + ReLU layers per tower (no norm).
        num_anchors: ``A`` anchors per location.
        prior_prob: initial foreground probability; the classifier bias is ``-log((1-p)/p)``
            (``-log 99`` for 0.01) so focal loss does not explode on the first iteration.

    ``forward(feats: list of (B, in_channels, H_l, W_l))`` returns ``(cls_scores, bbox_preds)``: per level
    ``(B, A*C, H_l, W_l)`` logits (channel ``a*C + c``) and ``(B, A*4, H_l, W_l)`` deltas (channel
    ``a*4 + coord``).
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 num_anchors: int = 9, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        widths = [in_channels] + [feat_channels] * stacked_convs
        self.cls_convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(widths[:-1], widths[1:]))
        self.reg_convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(widths[:-1], widths[1:]))
        self.cls_logits = nn.Conv2d(widths[-1], num_anchors * num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(widths[-1], num_anchors * 4, 3, padding=1)
        self.reset_parameters(prior_prob)

    def reset_parameters(self, prior_prob: float) -> None:
        """Normal(0, 0.01) weights, zero biases, classifier bias from the prior (reference init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _tower(convs: nn.ModuleList, x: Tensor) -> Tensor:
        for conv in convs:
            x = torch.relu(conv(x))
        return x

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_scores = [self.cls_logits(self._tower(self.cls_convs, f)) for f in feats]
        bbox_preds = [self.bbox_reg(self._tower(self.reg_convs, f)) for f in feats]
        return cls_scores, bbox_preds


def flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """``[(B, A*K, H_l, W_l)] -> (B, sum_l H_l*W_l*A, K)`` in (level, h, w, anchor) order."""
    batch = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, channels) for m in maps], dim=1)


def level_anchors(anchor_generator, maps: Sequence[Tensor]) -> tuple[list[tuple[int, int]], list[Tensor]]:
    """Feature sizes and float32 anchors ``(H_l*W_l*A, 4)`` for the given per-level maps."""
    sizes = [tuple(m.shape[-2:]) for m in maps]
    return sizes, anchor_generator.grid_anchors(sizes, device=maps[0].device, dtype=torch.float32)


@dataclass(frozen=True)
class ISRPSettings:
    """``pisa.isr_p``: rank-based reweighting of positives (method doc §2)."""

    k: float = 2.0
    bias: float = 0.0
    legacy_gt_offset: bool = False
    legacy_float_keys: bool = False


@dataclass(frozen=True)
class CARLSettings:
    """``pisa.carl``: classification-aware regression loss (method doc §3)."""

    k: float = 1.0
    bias: float = 0.2


@dataclass
class DenseTargets:
    """Flattened training targets over ``N = B * M`` anchors (``M`` anchors per image).

    labels (N,) int64 with ``C`` = background; label_weights (N,) float32 (0 for ignored / invalid
    anchors); bbox_targets (N, 4) encoded deltas (zero for non-positives; None when not asked for);
    gt_inds (N,) int64 index of the assigned GT inside its image (-1 for non-positives); img_inds (N,)
    int64; priors (N, 4); avg_factor: scalar tensor ``sum_img max(#pos_img, 1)``.
    """

    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor | None
    gt_inds: Tensor
    img_inds: Tensor
    priors: Tensor
    avg_factor: Tensor


class RetinaNetLoss(nn.Module):
    """Focal + box-regression criterion of RetinaNet, with optional ISR-P and CARL. Holds no parameters.

    Args:
        num_classes: ``C``.
        anchor_generator, coder, assigner: built ``AnchorGenerator``, ``DeltaXYWHCoder``, ``MaxIoUAssigner``.
        focal_alpha, focal_gamma, cls_weight: focal loss settings and its ``loss_weight``.
        bbox_loss: ``"l1"`` (v2 baseline) or ``"smooth_l1"`` (PISA configs), with ``bbox_beta``
            (smooth_l1 and CARL) and ``bbox_weight``.
        isr_p, carl: settings, or ``None`` to disable (the baseline).
        pad_divisor: anchors beyond an image's own ``img_shape`` rounded up to this multiple are
            invalid (weight 0). This equals the reference's per-image ``pad_shape``; it only matters
            when batch padding makes the tensor larger than the image.

    ``forward(cls_scores, bbox_preds, targets)`` takes the head outputs and the batch's target dicts and
    returns ``{"loss_cls", "loss_bbox"[, "loss_carl"]}``, all fp32 scalars, each divided by
    ``A = sum_img max(#pos_img, 1)``.
    """

    def __init__(self, num_classes: int, anchor_generator, coder, assigner, *, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, cls_weight: float = 1.0, bbox_loss: str = "l1", bbox_beta: float = 0.11,
                 bbox_weight: float = 1.0, isr_p: ISRPSettings | None = None, carl: CARLSettings | None = None,
                 pad_divisor: int = 32) -> None:
        super().__init__()
        if bbox_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"model.loss_bbox.type must be 'l1' or 'smooth_l1', got {bbox_loss!r}")
        self.num_classes = num_classes
        self.anchor_generator, self.coder, self.assigner = anchor_generator, coder, assigner
        self.focal_alpha, self.focal_gamma, self.cls_weight = focal_alpha, focal_gamma, cls_weight
        self.bbox_loss, self.bbox_beta, self.bbox_weight = bbox_loss, bbox_beta, bbox_weight
        self.isr_p, self.carl = isr_p, carl
        self.pad_divisor = pad_divisor

    # ---- targets -------------------------------------------------------------------------------

    def _valid_shape(self, img_shape: Sequence[int]) -> tuple[int, int]:
        d = self.pad_divisor
        return (math.ceil(img_shape[0] / d) * d, math.ceil(img_shape[1] / d) * d)

    def get_targets(self, anchors_per_level: list[Tensor], feature_sizes: list[tuple[int, int]],
                    targets: list[dict], *, encode_boxes: bool = True) -> DenseTargets:
        """Assign every image in one batched call and encode the positives' deltas in one batch.

        ``encode_boxes=False`` (for a criterion that regresses decoded boxes, like PAA's) skips the
        encoding; ``bbox_targets`` is then None.
        """
        anchors = torch.cat(anchors_per_level)
        device = anchors.device
        batch, num_anchors = len(targets), anchors.shape[0]
        valid = self.anchor_generator.batch_valid_flags(
            feature_sizes, [self._valid_shape(t["img_shape"]) for t in targets], device=device)  # (B, M)
        gt_boxes = [t["boxes"].to(anchors) for t in targets]
        ignores = [None if t.get("ignore_boxes") is None else t["ignore_boxes"].to(anchors) for t in targets]
        result = self.assigner.assign_batch(anchors, gt_boxes, [t["labels"] for t in targets], ignores, valid)
        pos = result.gt_inds > 0  # (B, M)
        labels = torch.where(pos, result.labels, self.num_classes).reshape(-1)
        label_weights = ((result.gt_inds >= 0) & valid).float().reshape(-1)
        gt_inds = torch.where(pos, result.gt_inds - 1, -1).reshape(-1)
        priors = anchors.repeat(batch, 1)
        img_inds = torch.arange(batch, device=device).repeat_interleave(num_anchors)
        bbox_targets = None
        if encode_boxes:
            flat_pos = pos.reshape(-1)
            matched = pad_sequence(gt_boxes, batch_first=True)[img_inds[flat_pos], gt_inds[flat_pos]]
            bbox_targets = torch.zeros_like(priors)
            bbox_targets[flat_pos] = self.coder.encode(priors[flat_pos], matched)
        avg_factor = pos.sum(1).clamp(min=1).sum().float()
        return DenseTargets(labels, label_weights, bbox_targets, gt_inds, img_inds, priors, avg_factor)

    # ---- losses --------------------------------------------------------------------------------

    def _regression_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.bbox_loss == "smooth_l1":
            return smooth_l1_loss(pred, target, beta=self.bbox_beta)
        return l1_loss(pred, target)

    def forward(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        feature_sizes, anchors_per_level = level_anchors(self.anchor_generator, cls_scores)
        t = self.get_targets(anchors_per_level, feature_sizes, targets)
        C = self.num_classes
        # fp32 loss math, also under autocast (the cast is differentiable).
        logits = flatten_levels(cls_scores, C).reshape(-1, C).float()
        deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4).float()
        label_weights = t.label_weights
        if self.isr_p is not None:
            # ISR-P: rank positives by IoU-HLR and reweight them; negatives and avg_factor unchanged.
            label_weights = isr_p(logits, deltas, t.labels, label_weights, t.bbox_targets, t.priors,
                                  t.gt_inds, t.img_inds, num_classes=C, decode=self.coder.decode,
                                  cls_loss="sigmoid_focal", k=self.isr_p.k, bias=self.isr_p.bias,
                                  focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma,
                                  loss_weight=self.cls_weight, legacy_gt_offset=self.isr_p.legacy_gt_offset,
                                  legacy_float_keys=self.isr_p.legacy_float_keys)
        focal = sigmoid_focal_loss(logits, t.labels, alpha=self.focal_alpha, gamma=self.focal_gamma)
        losses = {"loss_cls": self.cls_weight * (focal * label_weights[:, None]).sum() / t.avg_factor}
        # Positives selected by index: with no GT this is a sum over an empty selection, an exact zero
        # that stays attached to the regression branch.
        pos = torch.nonzero(t.labels < C).squeeze(1)
        reg = self._regression_loss(deltas[pos], t.bbox_targets[pos])
        losses["loss_bbox"] = self.bbox_weight * reg.sum() / t.avg_factor
        if self.carl is not None:
            losses["loss_carl"] = carl_loss(logits, t.labels, deltas, t.bbox_targets, num_classes=C,
                                            avg_factor=t.avg_factor, sigmoid=True, k=self.carl.k,
                                            bias=self.carl.bias, beta=self.bbox_beta,
                                            loss_weight=self.bbox_weight)
        return losses
