"""SSD head (one 3x3 conv per level for classes and one for deltas) and its training criterion:
softmax cross-entropy with 3:1 hard negative mining and smooth L1, with optional PISA (ISR-P, CARL).

Dense tensors are flattened image -> level (finest first) -> row -> column -> anchor, with the class or
coordinate channel innermost (method doc §5.1), the order of :class:`~pisa.models.anchors.SSDAnchorGenerator`.
Labels: ``0..C-1`` foreground, ``C`` background; the softmax has ``C + 1`` columns, background last.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from pisa.losses import carl_loss, isr_p, smooth_l1_loss, softmax_cross_entropy
from pisa.models.retina_head import CARLSettings, DenseTargets, ISRPSettings, flatten_levels, level_anchors

__all__ = ["SSDHead", "SSDLoss", "hard_negative_mask"]


class SSDHead(nn.Module):
    """Per level a 3x3 classification conv (``A_l·(C+1)`` channels) and a 3x3 regression conv (``A_l·4``).

    Args:
        num_classes: ``C`` foreground classes; the head predicts ``C + 1`` scores, background last.
        in_channels: channels of each feature level.
        num_anchors: ``A_l`` anchors per location of each level.

    ``forward(feats: list of (B, in_channels[l], H_l, W_l))`` returns ``(cls_scores, bbox_preds)``: per
    level ``(B, A_l·(C+1), H_l, W_l)`` logits (channel ``a·(C+1) + c``) and ``(B, A_l·4, H_l, W_l)``
    deltas (channel ``a·4 + coord``). Weights are Xavier-uniform, biases 0 (the reference's init).
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], num_anchors: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ValueError(f"SSDHead: {len(in_channels)} feature levels but anchors for {len(num_anchors)}; "
                             "model.anchors.strides and ratios need one entry per backbone level")
        self.num_classes = num_classes
        self.num_anchors = list(num_anchors)
        self.cls_convs = nn.ModuleList(nn.Conv2d(c, a * (num_classes + 1), 3, padding=1)
                                       for c, a in zip(in_channels, num_anchors))
        self.reg_convs = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(in_channels, num_anchors))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if len(feats) != len(self.cls_convs):
            raise ValueError(f"SSDHead got {len(feats)} feature maps for {len(self.cls_convs)} levels")
        cls_scores = [conv(f) for conv, f in zip(self.cls_convs, feats)]
        bbox_preds = [conv(f) for conv, f in zip(self.reg_convs, feats)]
        return cls_scores, bbox_preds


def hard_negative_mask(neg_loss: Tensor, negative: Tensor, num_pos: Tensor, neg_pos_ratio: float) -> Tensor:
    """Hard negative mining per image: the ``min(ratio·#pos, #neg)`` negatives with the highest loss.

    Args:
        neg_loss: ``(B, M)`` classification loss of every anchor (only negatives are read).
        negative: bool ``(B, M)``, the anchors eligible as negatives (label = background).
        num_pos: int64 ``(B,)`` positives per image; an image without positives keeps no negative.
        neg_pos_ratio: negatives kept per positive (3 in SSD).

    Returns:
        bool ``(B, M)`` of the kept negatives. Ties go to the lower anchor index (a stable sort).
    """
    values = torch.where(negative, neg_loss.detach(), neg_loss.new_tensor(-1.0))  # CE >= 0 > -1
    order = values.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    quota = torch.minimum((num_pos * neg_pos_ratio).floor().long(), negative.sum(1))
    return negative & (rank < quota[:, None])


class SSDLoss(nn.Module):
    """SSD's criterion (method doc §5.2 "SSD"), with optional ISR-P and CARL. Holds no parameters.

    Args:
        num_classes: ``C``.
        anchor_generator, coder, assigner: built ``SSDAnchorGenerator``, ``DeltaXYWHCoder`` (stds
            0.1/0.1/0.2/0.2) and ``MaxIoUAssigner`` (0.5/0.5, min_pos 0, argmax anchor only).
        neg_pos_ratio: hard negatives per positive and image.
        bbox_beta, bbox_weight: smooth L1 transition (1.0) and loss weight; CARL uses the same.
        isr_p, carl: settings, or ``None`` for the baseline.

    ``forward(cls_scores, bbox_preds, targets)`` returns ``{"loss_cls", "loss_bbox"[, "loss_carl"]}``,
    fp32 scalars, each divided by the batch-wide ``A = Σ_img max(#pos_img, 1)``:

    1. targets over all anchors (every anchor valid); label weights 1 except crowd-ignored anchors;
    2. ISR-P (if on) reweights the positives with the plain softmax CE;
    3. per image: ``CE·label_weight`` of all positives plus the top ``min(ratio·#pos, #neg)``
       negatives by that value (negatives keep weight 1, so ISR-P never changes which are mined);
    4. smooth L1 on the positives' deltas; CARL (if on) with the softmax and the same β.
    """

    def __init__(self, num_classes: int, anchor_generator, coder, assigner, *, neg_pos_ratio: float = 3.0,
                 bbox_beta: float = 1.0, bbox_weight: float = 1.0, isr_p: ISRPSettings | None = None,
                 carl: CARLSettings | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor_generator, self.coder, self.assigner = anchor_generator, coder, assigner
        self.neg_pos_ratio, self.bbox_beta, self.bbox_weight = neg_pos_ratio, bbox_beta, bbox_weight
        self.isr_p, self.carl = isr_p, carl

    # ---- targets -------------------------------------------------------------------------------

    def _targets_per_image(self, anchors: Tensor, target: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image's labels (M,), label weights (M,), matched GT boxes (M, 4) and GT index (M,)."""
        gt_boxes = target["boxes"].to(anchors)
        ignore = target.get("ignore_boxes")
        result = self.assigner.assign(anchors, gt_boxes, target["labels"],
                                      ignore_boxes=None if ignore is None else ignore.to(anchors))
        pos = result.gt_inds > 0
        labels = torch.where(pos, result.labels, torch.full_like(result.labels, self.num_classes))
        weights = (result.gt_inds >= 0).float()
        gt_index = torch.where(pos, result.gt_inds - 1, torch.full_like(result.gt_inds, -1))
        matched = gt_boxes[gt_index.clamp(min=0)] if gt_boxes.shape[0] else anchors.new_zeros(anchors.shape)
        return labels, weights, matched, gt_index

    def get_targets(self, anchors: Tensor, targets: list[dict]) -> DenseTargets:
        """Assign each image's ``M`` anchors (a loop over images only); encode the positives in one batch."""
        labels, label_weights, matched, gt_inds = (torch.cat(t) for t in
                                                   zip(*(self._targets_per_image(anchors, t) for t in targets)))
        batch, num_anchors = len(targets), anchors.shape[0]
        priors = anchors.repeat(batch, 1)
        pos = labels < self.num_classes
        bbox_targets = torch.zeros_like(priors)
        bbox_targets[pos] = self.coder.encode(priors[pos], matched[pos])
        img_inds = torch.arange(batch, device=anchors.device).repeat_interleave(num_anchors)
        avg_factor = pos.view(batch, num_anchors).sum(1).clamp(min=1).sum().float()
        return DenseTargets(labels, label_weights, bbox_targets, gt_inds, img_inds, priors, avg_factor)

    # ---- losses --------------------------------------------------------------------------------

    def forward(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        _, anchors_per_level = level_anchors(self.anchor_generator, cls_scores)
        t = self.get_targets(torch.cat(anchors_per_level), targets)
        C, batch = self.num_classes, len(targets)
        logits = flatten_levels(cls_scores, C + 1).reshape(-1, C + 1).float()  # fp32 also under autocast
        deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4).float()
        label_weights = t.label_weights
        if self.isr_p is not None:
            label_weights = isr_p(logits, deltas, t.labels, label_weights, t.bbox_targets, t.priors, t.gt_inds,
                                  t.img_inds, num_classes=C, decode=self.coder.decode, cls_loss="softmax_ce",
                                  k=self.isr_p.k, bias=self.isr_p.bias,
                                  legacy_gt_offset=self.isr_p.legacy_gt_offset,
                                  legacy_float_keys=self.isr_p.legacy_float_keys)
        ce = (softmax_cross_entropy(logits, t.labels) * label_weights).view(batch, -1)
        positive = (t.labels < C).view(batch, -1)
        mined = hard_negative_mask(ce, (t.labels == C).view(batch, -1), positive.sum(1), self.neg_pos_ratio)
        losses = {"loss_cls": torch.where(positive | mined, ce, ce.new_zeros(())).sum() / t.avg_factor}
        # Positives by index: with no GT an empty selection, an exact zero attached to the regression branch.
        pos = torch.nonzero(t.labels < C).squeeze(1)
        reg = smooth_l1_loss(deltas[pos], t.bbox_targets[pos], beta=self.bbox_beta)
        losses["loss_bbox"] = self.bbox_weight * reg.sum() / t.avg_factor
        if self.carl is not None:
            losses["loss_carl"] = carl_loss(logits, t.labels, deltas, t.bbox_targets, num_classes=C,
                                            avg_factor=t.avg_factor, sigmoid=False, k=self.carl.k,
                                            bias=self.carl.bias, beta=self.bbox_beta, loss_weight=self.bbox_weight)
        return losses
