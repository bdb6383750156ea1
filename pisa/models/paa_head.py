"""PAA head (GN towers, IoU branch, per-level scales) and its criterion with the probabilistic
anchor assignment (Kim & Lee, ECCV 2020; method doc §8.1, following the mmdetection v2 head).

Dense tensors are flattened image -> level -> row -> column (one anchor per location), class or
coordinate channel innermost, as everywhere in pisa (method doc §5.1). Labels: ``0..C-1`` foreground,
``C`` background.

Assignment (:meth:`PAALoss.assign`), batched over every image and GT of the batch, no loop over either:

1. max-IoU with pos 0.1 / neg 0.1 / min_pos 0 gives the initial positives;
2. their cost, without gradient: ``cls_weight · Σ_classes focal + giou_weight · (1 − GIoU)`` of the
   decoded prediction and its GT;
3. each GT keeps up to ``topk`` (9) lowest-cost initial positives per level; their sorted costs form one
   row of a padded ``(#GT, levels · topk)`` tensor on which a two-component GMM is fitted by batched EM
   (:mod:`pisa.models.gmm`); the positives are the cut of :func:`pisa.models.gmm.gmm_positive_cut`;
4. every other initial positive becomes background (label weight 1, no box loss); there is no ignore.

Where the original PAA code and the method doc differ, the doc is followed: a GT with fewer than 2
candidates gets no positive (the original code keeps a single one), and a GT whose mixture has no
foreground gets no positive (the original code makes all its candidates positive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pisa.losses import aligned_box_iou, isr_p, sigmoid_focal_loss
from pisa.models.gmm import fit_two_component_gmm, gmm_positive_cut
from pisa.models.retina_head import DenseTargets, RetinaNetLoss, flatten_levels, level_anchors

__all__ = ["PAAHead", "PAALoss", "PAAAssignment", "PAASettings", "aligned_giou", "select_candidates", "paa_assign",
           "summed_focal_loss"]


class ConvGNReLU(nn.Module):
    """conv3x3 (no bias) + GroupNorm + ReLU; attribute names ``conv`` / ``gn`` as in the reference."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        if out_channels % num_groups:
            raise ValueError(f"model.head.norm_groups ({num_groups}) must divide model.head.feat_channels "
                             f"({out_channels})")
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.gn(self.conv(x)))


class PAAHead(nn.Module):
    """Two GN towers shared across levels; one anchor per location.

    Args:
        num_classes: ``C`` (sigmoid, no background column).
        in_channels: channels of every FPN level.
        feat_channels, stacked_convs, norm_groups: tower width, depth and GroupNorm groups (256, 4, 32).
        num_levels: FPN levels, one learnable regression scale (init 1) each.
        prior_prob: classifier bias ``−log((1 − p)/p)``.

    ``forward(feats)`` returns per level ``(B, C, H, W)`` class logits, ``(B, 4, H, W)`` deltas
    (already multiplied by the level's scale) and ``(B, 1, H, W)`` IoU logits (from the regression tower).
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 num_levels: int = 5, norm_groups: int = 32, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        widths = [in_channels] + [feat_channels] * stacked_convs
        pairs = list(zip(widths[:-1], widths[1:]))
        self.cls_convs = nn.ModuleList(ConvGNReLU(i, o, norm_groups) for i, o in pairs)
        self.reg_convs = nn.ModuleList(ConvGNReLU(i, o, norm_groups) for i, o in pairs)
        self.cls_logits = nn.Conv2d(widths[-1], num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(widths[-1], 4, 3, padding=1)
        self.iou_pred = nn.Conv2d(widths[-1], 1, 3, padding=1)
        self.scales = nn.ParameterList(nn.Parameter(torch.tensor(1.0)) for _ in range(num_levels))
        self.reset_parameters(prior_prob)

    def reset_parameters(self, prior_prob: float) -> None:
        """Normal(0, 0.01) conv weights, zero biases, classifier bias from the prior (reference init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if len(feats) != len(self.scales):
            raise ValueError(f"PAAHead has {len(self.scales)} level scales but got {len(feats)} feature maps")
        cls_scores, bbox_preds, iou_preds = [], [], []
        for feat, scale in zip(feats, self.scales):
            cls_feat, reg_feat = feat, feat
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_scores.append(self.cls_logits(cls_feat))
            bbox_preds.append(scale * self.bbox_reg(reg_feat))
            iou_preds.append(self.iou_pred(reg_feat))
        return cls_scores, bbox_preds, iou_preds


def aligned_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of row-aligned ``(P, 4)`` xyxy pairs, ``(P,)`` float32 in ``[−1, 1]``.

    ``GIoU = IoU − (E − U) / E`` with ``U`` the union and ``E`` the smallest enclosing box's area; both
    clamped to ``eps`` as the reference does.
    """
    a, b = a.float(), b.float()
    inter_wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = (area_a + area_b - inter).clamp(min=eps)
    enclose_wh = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return inter / union - (enclose - union) / enclose


# Elements per block of the CPU path of summed_focal_loss (a few hundred KiB per temporary).
_CPU_FOCAL_BLOCK_ELEMENTS = 1 << 17


def _summed_negative_focal(x: Tensor, gamma: float) -> Tensor:
    """``(N,)``: ``Σ_c p^γ · log(1 − p)`` over the columns of ``x`` (no weight, no sign)."""
    one_minus_p = torch.sigmoid(x.neg())
    log_one_minus_p = torch.log(one_minus_p)
    return torch.linalg.vecdot(torch.rsub(one_minus_p, 1).pow_(gamma), log_one_minus_p)


def summed_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``(N,)`` float32: ``sigmoid_focal_loss(logits, labels, alpha, gamma).sum(1)``, without gradient.

    The classification part of PAA's anchor cost in about a third of the time (four passes over the
    ``(N, C)`` logits instead of a dozen): every column is first summed as a negative,
    ``(1 − α) p^γ · (−log(1 − p))`` with ``1 − p = σ(−x)`` computed directly (exact for large logits),
    then the label's column (``labels < C``) is swapped for its positive term ``α (1 − p)^γ · (−log p)``.
    Agrees with the element-wise loss to float32 rounding (about 1e-7 relative).

    On CPU the rows go through in blocks of ``_CPU_FOCAL_BLOCK_ELEMENTS`` elements: at PAA's ~20k
    initial positives × 80 classes a whole-size temporary is megabytes of freshly mapped memory, and
    its page faults cost about three times the arithmetic. Rows are independent, so the result is the
    same up to float32 rounding of the row sums.
    """
    x = logits.detach().float()
    num_classes = x.shape[1]
    weight_pos, weight_neg = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
    if x.device.type == "cpu" and x.numel() > _CPU_FOCAL_BLOCK_ELEMENTS:
        rows = max(1, _CPU_FOCAL_BLOCK_ELEMENTS // num_classes)
        negatives = torch.cat([_summed_negative_focal(block, gamma) for block in x.split(rows)])
    else:
        negatives = _summed_negative_focal(x, gamma)
    negatives = negatives.mul_(-weight_neg)
    foreground = labels < num_classes
    x_label = x.gather(1, labels.clamp(max=num_classes - 1)[:, None])[:, 0]
    p_label = torch.sigmoid(x_label)
    positive = weight_pos * torch.sigmoid(-x_label).pow(gamma) * F.softplus(-x_label)
    as_negative = weight_neg * p_label.pow(gamma) * F.softplus(x_label)
    return negatives + torch.where(foreground, positive - as_negative, 0.0)


@dataclass
class Candidates:
    """Each GT's PAA candidates, sorted by ascending cost: ``(R, K)`` rows, ``K = levels · topk``.

    Equal costs: the lower level first, then the lower initial-positive index (what a stable sort of
    the per-level picks, concatenated level after level, gives).

    costs: float64 (``inf`` at padding); index: int64 position into the initial positives (``−1`` at
    padding); mask: bool, True where a candidate is.
    """

    costs: Tensor
    index: Tensor
    mask: Tensor


def _cost_order_key(costs: Tensor) -> Tensor:
    """int64 ``(P,)`` keys in ``[0, 2³²)`` that order as ``costs`` do, ties kept in index order by a
    stable sort on them.

    float32 (and narrower, widened exactly): the float's bits. For IEEE-754 numbers of one sign the
    bit pattern orders as the value; flipping the 31 magnitude bits of the negative ones makes the
    signed 32-bit integers order as the floats (``+ 0.0`` first turns ``−0.0`` into ``+0.0``, equal
    costs). float64 does not fit: its keys are the ranks of one stable sort.
    """
    if costs.dtype == torch.float64:
        order = torch.argsort(costs, stable=True)
        return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=costs.device))
    bits = (costs.float() + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() + 2 ** 31


# Bits of a non-negative int64 available to a group, a 32-bit cost key and a sample index.
_UNIQUE_KEY_BITS = 63


def _sort_order(keys: Tensor, num_groups: int) -> Tensor:
    """The permutation of a stable ascending sort of int64 ``keys`` in ``[0, num_groups · 2³²)``.

    When the sample's index fits beside the key in 63 bits (up to ``2³¹ / num_groups`` samples; PAA's
    2 images × 50 GTs × 5 levels leave room for 4 million), the keys are made unique by appending it,
    and any sort gives the stable order: on CPU numpy's introsort, about 3.5× faster than torch's
    stable sort of 20k keys. Otherwise torch's stable sort.
    """
    count = keys.numel()
    index_bits = max(count - 1, 1).bit_length()
    if max(num_groups - 1, 1).bit_length() + 32 + index_bits > _UNIQUE_KEY_BITS:
        return torch.sort(keys, stable=True).indices
    unique = (keys << index_bits) | torch.arange(count, device=keys.device)
    if unique.device.type == "cpu":
        return torch.from_numpy(unique.numpy().argsort(kind="quicksort"))
    return torch.sort(unique).indices


def select_candidates(costs: Tensor, rows: Tensor, levels: Tensor, num_rows: int, num_levels: int,
                      topk: int = 9) -> Candidates:
    """Up to ``topk`` lowest-cost samples per (row, level), gathered into sorted padded rows.

    Args:
        costs: floating ``(P,)`` cost of each initial positive.
        rows: int64 ``(P,)`` its GT's row in ``0..num_rows-1`` (GTs of all images numbered together).
        levels: int64 ``(P,)`` its FPN level in ``0..num_levels-1``.

    One sort of the 64-bit keys ``(row·levels + level) · 2³² + cost key`` ranks the samples inside
    each (row, level) group; no loop over GTs or levels. Equal costs keep the lower index first.
    """
    count = costs.shape[0]
    group = rows * num_levels + levels
    order = _sort_order((group << 32) | _cost_order_key(costs), num_rows * num_levels)
    sizes = torch.bincount(group, minlength=num_rows * num_levels)
    group_start = torch.cumsum(sizes, 0) - sizes  # where each group begins in the sorted order
    # index_select / masked_select: on CPU several times faster than tensor indexing at these sizes.
    rank = torch.arange(count, device=costs.device) - group_start.index_select(0, group.index_select(0, order))
    top = rank < topk
    chosen = order.masked_select(top)
    width = num_levels * topk
    flat = rows.index_select(0, chosen) * width + levels.index_select(0, chosen) * topk + rank.masked_select(top)
    values = costs.new_full((num_rows * width,), math.inf, dtype=torch.float64)
    values = values.scatter_(0, flat, costs.index_select(0, chosen).double()).view(num_rows, width)
    index = torch.full((num_rows * width,), -1, dtype=torch.int64, device=costs.device)
    index = index.scatter_(0, flat, chosen).view(num_rows, width)
    values, perm = values.sort(dim=1, stable=True)
    index = index.gather(1, perm)
    return Candidates(values, index, index >= 0)


@dataclass(frozen=True)
class PAASettings:
    """``model.paa``: candidates per level and the EM settings (scikit-learn's defaults)."""

    topk: int = 9
    tol: float = 1e-3
    max_iter: int = 100
    reg_covar: float = 1e-6


def paa_assign(costs: Tensor, rows: Tensor, levels: Tensor, num_rows: int, num_levels: int,
               settings: PAASettings = PAASettings()) -> Tensor:
    """bool ``(P,)``: which initial positives stay positive after PAA (steps 3 of the module doc)."""
    cand = select_candidates(costs, rows, levels, num_rows, num_levels, settings.topk)
    fit = fit_two_component_gmm(cand.costs, cand.mask, tol=settings.tol, max_iter=settings.max_iter,
                                reg_covar=settings.reg_covar)
    keep = gmm_positive_cut(fit, cand.mask)
    positive = torch.zeros(costs.shape[0], dtype=torch.bool, device=costs.device)
    positive[cand.index[keep]] = True
    return positive


@dataclass
class PAAAssignment:
    """PAA's targets of a batch over its ``N = B·M`` anchors (:meth:`PAALoss.assign`).

    targets: the max-IoU targets (their positives are the initial positives). labels: int64 ``(N,)``
    after PAA, ``C`` = background. positives: int64 ``(Q,)`` anchor indices of the PAA positives, in
    anchor order; gt_boxes ``(Q, 4)`` their GTs; boxes ``(Q, 4)`` their decoded predictions (carrying
    the deltas' gradient).
    """

    targets: DenseTargets
    labels: Tensor
    positives: Tensor
    gt_boxes: Tensor
    boxes: Tensor


class PAALoss(RetinaNetLoss):
    """PAA's criterion: focal + GIoU + IoU-branch BCE over the PAA positives. Holds no parameters.

    Args:
        num_classes, anchor_generator, coder, assigner: as :class:`RetinaNetLoss`; PAA's assigner is
            ``MaxIoUAssigner(0.1, 0.1, 0.0)`` and its coder has stds ``(0.1, 0.1, 0.2, 0.2)``.
        focal_alpha, focal_gamma, cls_weight: focal loss (0.25, 2, 1).
        giou_weight: weight of the GIoU loss, also used in the cost (1.3).
        iou_weight: weight of the IoU-branch BCE (0.5).
        paa: candidate and EM settings.
        isr_p: experimental only (``model.allow_pisa``): ISR-P reweights the PAA positives' focal
            weights, as in PISA RetinaNet. Not a published combination.

    ``forward(cls_scores, bbox_preds, iou_preds, targets)`` returns ``loss_cls`` (focal over all valid
    anchors × classes / ``max(#pos, #images)``), ``loss_bbox`` (``giou_weight · Σ IoU_i (1 − GIoU_i) /
    Σ IoU_i`` with ``IoU_i`` the detached decoded prediction's IoU with its GT, clamped ≥ 1e-12) and
    ``loss_iou`` (``iou_weight · Σ BCE(iou_logit_i, IoU_i) / #pos``). Without positives both box terms are
    exact zeros attached to the regression branch.
    """

    def __init__(self, num_classes: int, anchor_generator, coder, assigner, *, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, cls_weight: float = 1.0, giou_weight: float = 1.3,
                 iou_weight: float = 0.5, paa: PAASettings = PAASettings(), isr_p=None,
                 pad_divisor: int = 32) -> None:
        super().__init__(num_classes, anchor_generator, coder, assigner, focal_alpha=focal_alpha,
                         focal_gamma=focal_gamma, cls_weight=cls_weight, isr_p=isr_p, pad_divisor=pad_divisor)
        self.giou_weight, self.iou_weight, self.paa = giou_weight, iou_weight, paa

    def _matched_gt_boxes(self, targets: list[dict], gt_inds: Tensor, img_inds: Tensor) -> tuple[Tensor, Tensor]:
        """GT boxes ``(P, 4)`` and batch-wide GT rows ``(P,)`` of positives given by image + local index."""
        counts = torch.tensor([t["boxes"].shape[0] for t in targets], device=gt_inds.device)
        offsets = torch.cumsum(counts, 0) - counts
        rows = offsets[img_inds] + gt_inds
        boxes = torch.cat([t["boxes"].to(device=gt_inds.device, dtype=torch.float32) for t in targets])
        return boxes.reshape(-1, 4)[rows], rows

    @torch.no_grad()
    def anchor_costs(self, logits: Tensor, labels: Tensor, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """``(P,)`` cost of positives: weighted focal summed over classes + weighted GIoU loss."""
        focal = summed_focal_loss(logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma)
        return self.cls_weight * focal + self.giou_weight * (1 - aligned_giou(boxes, gt_boxes))

    def assign(self, logits: Tensor, deltas: Tensor, anchors_per_level: list[Tensor],
               feature_sizes: list[tuple[int, int]], targets: list[dict]) -> PAAAssignment:
        """PAA's assignment of a batch (steps 1–4 of the module doc), every image and GT at once.

        Args:
            logits: ``(B·M, C)`` float32 class logits; deltas: ``(B·M, 4)`` box deltas (may carry
                gradient: the positives' decoded boxes keep it), flattened as the head's outputs.
            anchors_per_level, feature_sizes: the levels' anchors and map sizes (``level_anchors``).
        """
        # Box deltas are only read by the experimental ISR-P; PAA regresses decoded boxes.
        t = self.get_targets(anchors_per_level, feature_sizes, targets, encode_boxes=self.isr_p is not None)
        C = self.num_classes
        initial = torch.nonzero(t.labels < C).squeeze(1)
        gt_boxes, rows = self._matched_gt_boxes(targets, t.gt_inds[initial], t.img_inds[initial])
        boxes = self.coder.decode(t.priors[initial], deltas[initial])
        costs = self.anchor_costs(logits[initial], t.labels[initial], boxes.detach(), gt_boxes)
        level_of_anchor = torch.cat([torch.full((a.shape[0],), i, device=logits.device)
                                     for i, a in enumerate(anchors_per_level)]).repeat(len(targets))
        keep = paa_assign(costs, rows, level_of_anchor[initial], sum(int(x["boxes"].shape[0]) for x in targets),
                          len(anchors_per_level), self.paa)
        labels = t.labels.clone()
        labels[initial[~keep]] = C
        return PAAAssignment(t, labels, initial[keep], gt_boxes[keep], boxes[keep])

    def forward(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], iou_preds: list[Tensor],
                targets: list[dict]) -> dict[str, Tensor]:
        feature_sizes, anchors_per_level = level_anchors(self.anchor_generator, cls_scores)
        C = self.num_classes
        logits = flatten_levels(cls_scores, C).reshape(-1, C).float()
        deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4).float()
        iou_logits = flatten_levels(iou_preds, 1).reshape(-1).float()
        assigned = self.assign(logits, deltas, anchors_per_level, feature_sizes, targets)
        t, labels, pos = assigned.targets, assigned.labels, assigned.positives
        gt_boxes, boxes = assigned.gt_boxes, assigned.boxes
        label_weights = t.label_weights
        if self.isr_p is not None:
            label_weights = self._isr_p_weights(logits, deltas, labels, label_weights, t)
        num_pos = pos.numel()
        focal = sigmoid_focal_loss(logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma)
        losses = {"loss_cls": self.cls_weight * (focal * label_weights[:, None]).sum() / max(num_pos, len(targets))}
        iou_target = aligned_box_iou(boxes.detach(), gt_boxes)
        giou_loss = (1 - aligned_giou(boxes, gt_boxes)) * iou_target.clamp(min=1e-12)
        losses["loss_bbox"] = self.giou_weight * giou_loss.sum() / iou_target.sum().clamp(min=1e-12)
        bce = F.binary_cross_entropy_with_logits(iou_logits[pos], iou_target, reduction="none")
        losses["loss_iou"] = self.iou_weight * bce.sum() / max(num_pos, 1)
        return losses

    def _isr_p_weights(self, logits: Tensor, deltas: Tensor, labels: Tensor, label_weights: Tensor, t) -> Tensor:
        """Experimental: ISR-P over the PAA positives (same call as PISA RetinaNet's)."""
        return isr_p(logits, deltas, labels, label_weights, t.bbox_targets, t.priors, t.gt_inds, t.img_inds,
                     num_classes=self.num_classes, decode=self.coder.decode, cls_loss="sigmoid_focal",
                     k=self.isr_p.k, bias=self.isr_p.bias, focal_alpha=self.focal_alpha,
                     focal_gamma=self.focal_gamma, loss_weight=self.cls_weight,
                     legacy_gt_offset=self.isr_p.legacy_gt_offset, legacy_float_keys=self.isr_p.legacy_float_keys)
