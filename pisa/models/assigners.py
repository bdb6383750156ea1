"""Max-IoU assignment of priors (anchors or proposals) to ground-truth boxes (method spec §5.4).

Per-model settings: RetinaNet ``MaxIoUAssigner(0.5, 0.4)`` (low-quality ties → every max prior);
RPN ``(0.7, 0.3, min_pos_iou=0.3)``; R-CNN ``(0.5, 0.5, 0.5, match_low_quality=False)`` for Faster and
``True`` for Mask; SSD ``(0.5, 0.5, gt_max_assign_all=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pisa.models.box_coder import box_iou


@dataclass
class AssignResult:
    """Outcome of assigning ``N`` priors to ``num_gts`` ground truths.

    Attributes:
        gt_inds: int64 ``(N,)``; ``-1`` ignored (weight 0), ``0`` background, ``k > 0`` matched to
            ``gt_boxes[k − 1]``.
        max_overlaps: float32 ``(N,)``, each prior's best IoU over all GTs (not necessarily with its
            assigned GT after low-quality matching); ``-1`` for ignored-by-crowd and invalid priors.
        labels: int64 ``(N,)``, the matched GT's class for positives, ``-1`` otherwise.
        num_gts: number of ground truths.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor
    num_gts: int

    @property
    def pos_mask(self) -> Tensor:
        """bool ``(N,)``: priors matched to a GT."""
        return self.gt_inds > 0

    @property
    def neg_mask(self) -> Tensor:
        """bool ``(N,)``: background priors."""
        return self.gt_inds == 0

    @property
    def ignore_mask(self) -> Tensor:
        """bool ``(N,)``: priors that take no part in the losses."""
        return self.gt_inds < 0


class MaxIoUAssigner:
    """Assigns each prior to the GT it overlaps most, with the reference's thresholds and rescue step.

    For each prior, with ``m`` its max IoU over the GTs:

    1. background if ``0 ≤ m < neg_iou_thr`` (or ``lo ≤ m < hi`` for a tuple), else ignored;
    2. positive, matched to its argmax GT (first on ties), if ``m ≥ pos_iou_thr``;
    3. low-quality rescue (``match_low_quality``): each GT whose best IoU is ``≥ min_pos_iou`` claims its
       best prior(s) — all priors tying that max (``gt_max_assign_all``) or only the first argmax —
       overriding steps 1–2. A prior claimed by several GTs goes to the last of them, as when the GTs
       are visited in order.

    Priors inside crowd regions (``ignore_iof_thr > 0``: intersection over the prior's area with some
    ``ignore_boxes`` box ``> ignore_iof_thr``) and invalid priors (``valid`` False) are ignored: they
    are neither a GT's best prior nor positive nor background. As in the reference, a GT whose best IoU
    is 0 (``min_pos_iou = 0``) claims every prior it does not overlap; well-formed boxes never do this.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float | tuple[float, float],
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
        ignore_iof_thr: float = -1.0,
    ) -> None:
        if isinstance(neg_iou_thr, (tuple, list)):
            if len(neg_iou_thr) != 2:
                raise ValueError(f"MaxIoUAssigner: neg_iou_thr must be a float or a (low, high) pair, "
                                 f"got {neg_iou_thr}")
            self.neg_range = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
        else:
            self.neg_range = (0.0, float(neg_iou_thr))
        self.pos_iou_thr = float(pos_iou_thr)
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = match_low_quality
        self.gt_max_assign_all = gt_max_assign_all
        self.ignore_iof_thr = float(ignore_iof_thr)

    def assign(
        self,
        priors: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        ignore_boxes: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> AssignResult:
        """Assign ``priors`` ``(N, 4)`` to ``gt_boxes`` ``(G, 4)`` with classes ``gt_labels`` ``(G,)``.

        Args:
            ignore_boxes: ``(M, 4)`` crowd regions, used when ``ignore_iof_thr > 0``.
            valid: bool ``(N,)``; False marks priors outside the image's own extent.
        """
        excluded = self._excluded_priors(priors, ignore_boxes, valid)
        num_gts = gt_boxes.shape[0]
        if num_gts == 0 or priors.shape[0] == 0:
            return self._without_gts(priors, excluded, num_gts)
        overlaps = box_iou(gt_boxes, priors)  # (G, N)
        if excluded is not None:
            overlaps.masked_fill_(excluded[None, :], -1.0)
        max_overlaps, argmax_gts = overlaps.max(dim=0)
        gt_inds = self._assign_by_thresholds(max_overlaps, argmax_gts)
        if self.match_low_quality:
            gt_inds = self._rescue_low_quality(overlaps, gt_inds)
        if excluded is not None:
            gt_inds[excluded] = -1
        labels = torch.full_like(gt_inds, -1)
        positive = gt_inds > 0
        labels[positive] = gt_labels.to(labels.device, torch.int64)[gt_inds[positive] - 1]
        return AssignResult(gt_inds, max_overlaps, labels, num_gts)

    def _excluded_priors(self, priors: Tensor, ignore_boxes: Tensor | None, valid: Tensor | None) -> Tensor | None:
        """bool ``(N,)`` of priors that must be ignored (crowd-covered or invalid), or None if none can be."""
        excluded = None
        if self.ignore_iof_thr > 0 and ignore_boxes is not None and ignore_boxes.numel() > 0 and priors.numel() > 0:
            iof = box_iou(priors, ignore_boxes, mode="iof")  # (N, M), over the prior's area
            excluded = iof.max(dim=1).values > self.ignore_iof_thr
        if valid is not None:
            invalid = ~valid.to(device=priors.device, dtype=torch.bool)
            excluded = invalid if excluded is None else excluded | invalid
        return excluded

    def _without_gts(self, priors: Tensor, excluded: Tensor | None, num_gts: int) -> AssignResult:
        """No GT (or no prior): everything is background, except ignored priors."""
        count = priors.shape[0]
        gt_inds = torch.zeros(count, dtype=torch.int64, device=priors.device)
        max_overlaps = torch.zeros(count, dtype=torch.float32, device=priors.device)
        if excluded is not None:
            gt_inds[excluded] = -1
            max_overlaps[excluded] = -1.0
        return AssignResult(gt_inds, max_overlaps, torch.full_like(gt_inds, -1), num_gts)

    def _assign_by_thresholds(self, max_overlaps: Tensor, argmax_gts: Tensor) -> Tensor:
        """Steps 1–2: int64 ``(N,)`` gt indices (-1 / 0 / k) from each prior's best IoU."""
        gt_inds = torch.full_like(argmax_gts, -1)
        low, high = self.neg_range
        gt_inds[(max_overlaps >= low) & (max_overlaps < high)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax_gts[positive] + 1
        return gt_inds

    def _rescue_low_quality(self, overlaps: Tensor, gt_inds: Tensor) -> Tensor:
        """Step 3, vectorised over GTs: each eligible GT claims its best prior(s); the last GT wins."""
        num_gts = overlaps.shape[0]
        gt_max, gt_argmax = overlaps.max(dim=1)  # (G,), argmax = first maximal prior
        eligible = gt_max >= self.min_pos_iou
        if self.gt_max_assign_all:
            claims = (overlaps == gt_max[:, None]) & eligible[:, None]  # (G, N)
            # argmax over GTs returns the first maximum; over the flipped rows that is the last claiming GT.
            last_gt = num_gts - 1 - claims.flip(0).to(torch.uint8).argmax(dim=0)
            return torch.where(claims.any(dim=0), last_gt + 1, gt_inds)
        gt_numbers = torch.arange(1, num_gts + 1, device=gt_inds.device)
        # Several GTs may share an argmax prior: amax keeps the highest GT number, i.e. the last GT.
        claimed = torch.zeros_like(gt_inds).scatter_reduce(
            0, gt_argmax[eligible], gt_numbers[eligible], reduce="amax"
        )
        return torch.where(claimed > 0, claimed, gt_inds)
