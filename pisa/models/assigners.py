"""Max-IoU assignment of priors (anchors or proposals) to ground-truth boxes (method spec §5.4).

One image (``assign``) or a batch sharing one prior set (``assign_batch``, the dense heads' anchors):
the batch runs as one padded ``(B, G_max, N)`` IoU tensor with masks, without host syncs, and gives the
same numbers, bit for bit, as assigning each image alone.

Per-model settings: RetinaNet ``MaxIoUAssigner(0.5, 0.4)`` (low-quality ties → every max prior);
RPN ``(0.7, 0.3, min_pos_iou=0.3)``; R-CNN ``(0.5, 0.5, 0.5, match_low_quality=False)`` for Faster and
``True`` for Mask; SSD ``(0.5, 0.5, gt_max_assign_all=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


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


@dataclass
class BatchAssignResult:
    """Outcome of assigning the same ``N`` priors in each of ``B`` images.

    Attributes:
        gt_inds, max_overlaps, labels: ``(B, N)``, row ``b`` as :class:`AssignResult` of image ``b``.
        num_gts: ground truths per image.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor
    num_gts: list[int]

    def per_image(self) -> list[AssignResult]:
        """One :class:`AssignResult` per image (views into the batch tensors: do not modify in place)."""
        rows = zip(self.gt_inds.unbind(0), self.max_overlaps.unbind(0), self.labels.unbind(0), self.num_gts)
        return [AssignResult(gt_inds, overlaps, labels, count) for gt_inds, overlaps, labels, count in rows]


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
        batch = self.assign_batch(priors, [gt_boxes], [gt_labels],
                                  None if ignore_boxes is None else [ignore_boxes],
                                  None if valid is None else valid[None])
        return batch.per_image()[0]

    def assign_batch(
        self,
        priors: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        ignore_boxes: Sequence[Tensor | None] | None = None,
        valid: Tensor | None = None,
    ) -> BatchAssignResult:
        """Assign the same ``priors`` ``(N, 4)`` in each of ``B`` images at once.

        Args:
            gt_boxes, gt_labels: per image ``(G_b, 4)`` boxes and ``(G_b,)`` classes; ``G_b`` may be 0.
            ignore_boxes: per image ``(M_b, 4)`` crowd regions or None, used when ``ignore_iof_thr > 0``.
            valid: bool ``(B, N)``; False marks priors outside that image's own extent.

        Returns:
            a :class:`BatchAssignResult`; row ``b`` equals ``assign`` on image ``b`` alone, bit for bit:
            GTs are padded to ``G_max`` with empty boxes that never win a prior's max (they come after the
            real GTs, and the first maximum is kept) and never take part in the low-quality step.
        """
        num_gts = self._check_batch(priors, gt_boxes, gt_labels, ignore_boxes, valid)
        excluded = self._excluded_priors(priors, ignore_boxes, valid)
        if max(num_gts, default=0) == 0 or priors.shape[0] == 0:
            return self._without_gts(priors, excluded, num_gts)
        boxes, labels, real = _pad_gts(gt_boxes, gt_labels, priors)
        blocks = _prior_blocks(priors.shape[0], boxes.shape[0] * boxes.shape[1], priors.device)
        overlaps, max_overlaps, argmax_gts = self._overlaps(boxes, priors, excluded, blocks)
        gt_inds = self._assign_by_thresholds(max_overlaps, argmax_gts)
        if self.match_low_quality:
            gt_inds = self._rescue_low_quality(overlaps, gt_inds, real, blocks)
        if min(num_gts) == 0:
            # An image without GTs is background everywhere, with max overlap 0, whatever the thresholds.
            has_gts = real.any(dim=1, keepdim=True)
            gt_inds = torch.where(has_gts, gt_inds, 0)
            max_overlaps = torch.where(has_gts, max_overlaps, 0.0)
        if excluded is not None:
            gt_inds = gt_inds.masked_fill(excluded, -1)
            max_overlaps = max_overlaps.masked_fill(excluded, -1.0)
        positive = gt_inds > 0
        matched_labels = labels.gather(1, (gt_inds - 1).clamp(min=0))
        labels = torch.where(positive, matched_labels, -1)
        return BatchAssignResult(gt_inds, max_overlaps, labels, num_gts)

    @staticmethod
    def _check_batch(priors: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                     ignore_boxes: Sequence[Tensor | None] | None, valid: Tensor | None) -> list[int]:
        """GT counts per image, after checking that every per-image argument has one entry per image."""
        batch = len(gt_boxes)
        if len(gt_labels) != batch or (ignore_boxes is not None and len(ignore_boxes) != batch):
            raise ValueError(f"MaxIoUAssigner.assign_batch: got {batch} gt_boxes, {len(gt_labels)} gt_labels"
                             f"{'' if ignore_boxes is None else f' and {len(ignore_boxes)} ignore_boxes'}; "
                             "give one entry per image")
        if valid is not None and tuple(valid.shape) != (batch, priors.shape[0]):
            raise ValueError(f"MaxIoUAssigner.assign_batch: valid must be (images, priors) = "
                             f"({batch}, {priors.shape[0]}), got {tuple(valid.shape)}")
        counts = [int(boxes.shape[0]) if boxes.numel() > 0 else 0 for boxes in gt_boxes]
        for image, (boxes, labels, count) in enumerate(zip(gt_boxes, gt_labels, counts)):
            if (count > 0 and (boxes.dim() != 2 or boxes.shape[-1] != 4)) or labels.numel() != count:
                raise ValueError(f"MaxIoUAssigner: image {image} has gt_boxes {tuple(boxes.shape)} and gt_labels "
                                 f"{tuple(labels.shape)}; expected (G, 4) boxes and (G,) labels")
        return counts

    def _excluded_priors(self, priors: Tensor, ignore_boxes: Sequence[Tensor | None] | None,
                         valid: Tensor | None) -> Tensor | None:
        """bool ``(B, N)`` of priors that must be ignored (crowd-covered or invalid), or None if none can be."""
        excluded = None
        crowds = [] if ignore_boxes is None else [b for b in ignore_boxes if b is not None and b.numel() > 0]
        if self.ignore_iof_thr > 0 and crowds and priors.numel() > 0:
            # (B, M_max, N) over the prior's area; padding boxes are empty: IoF 0, never above the threshold.
            iof = pairwise_iou(_pad_boxes(ignore_boxes, priors), priors, mode="iof")
            excluded = iof.amax(dim=1) > self.ignore_iof_thr
        if valid is not None:
            invalid = ~valid.to(device=priors.device, dtype=torch.bool)
            excluded = invalid if excluded is None else excluded | invalid
        return excluded

    @staticmethod
    def _without_gts(priors: Tensor, excluded: Tensor | None, num_gts: list[int]) -> BatchAssignResult:
        """No GT in any image (or no prior): everything is background, except ignored priors."""
        shape = (len(num_gts), priors.shape[0])
        gt_inds = torch.zeros(shape, dtype=torch.int64, device=priors.device)
        max_overlaps = torch.zeros(shape, dtype=torch.float32, device=priors.device)
        if excluded is not None:
            gt_inds.masked_fill_(excluded, -1)
            max_overlaps.masked_fill_(excluded, -1.0)
        return BatchAssignResult(gt_inds, max_overlaps, torch.full_like(gt_inds, -1), num_gts)

    def _overlaps(self, boxes: Tensor, priors: Tensor, excluded: Tensor | None,
                  blocks: list[slice]) -> tuple[Tensor | None, Tensor, Tensor]:
        """IoU of the padded GTs ``(B, G, 4)`` with the priors, ``-1`` for excluded priors, block by block.

        Returns the ``(B, G, N)`` overlaps (None when the low-quality step, their only later reader, is
        off) and each prior's best IoU ``(B, N)`` with its first maximal GT ``(B, N)``.
        """
        keep = self.match_low_quality
        overlaps = None
        if keep and len(blocks) > 1:
            dtype = _math_dtype(priors, [boxes])
            overlaps = priors.new_empty((boxes.shape[0], boxes.shape[1], priors.shape[0]), dtype=dtype)
        maxes, argmaxes = [], []
        for block in blocks:
            block_overlaps = pairwise_iou(boxes, priors[block])
            if excluded is not None:
                block_overlaps.masked_fill_(excluded[:, None, block], -1.0)
            block_max, block_argmax = block_overlaps.max(dim=1)
            maxes.append(block_max)
            argmaxes.append(block_argmax)
            if keep and len(blocks) > 1:
                overlaps[:, :, block] = block_overlaps
            elif keep:
                overlaps = block_overlaps
        return overlaps, torch.cat(maxes, dim=1), torch.cat(argmaxes, dim=1)

    def _assign_by_thresholds(self, max_overlaps: Tensor, argmax_gts: Tensor) -> Tensor:
        """Steps 1–2: int64 gt indices (-1 / 0 / k) from each prior's best IoU, any shape."""
        low, high = self.neg_range
        background = (max_overlaps >= low) & (max_overlaps < high)
        gt_inds = torch.where(background, 0, -1)
        return torch.where(max_overlaps >= self.pos_iou_thr, argmax_gts + 1, gt_inds)

    def _rescue_low_quality(self, overlaps: Tensor, gt_inds: Tensor, real: Tensor, blocks: list[slice]) -> Tensor:
        """Step 3 over ``(B, G, N)`` overlaps: each eligible real GT claims its best prior(s); the last GT wins."""
        batch, num_gts, count = overlaps.shape
        gt_max, gt_argmax = overlaps.max(dim=2)  # (B, G), argmax = first maximal prior
        eligible = (gt_max >= self.min_pos_iou) & real
        number_dtype = torch.int16 if num_gts < 2 ** 15 else torch.int64
        gt_numbers = torch.arange(1, num_gts + 1, dtype=number_dtype, device=overlaps.device)
        if self.gt_max_assign_all:
            # NaN equals nothing: ineligible GTs claim no prior. Over the claims, the highest GT number
            # is the last claiming GT (0: no claim), as when the GTs are visited in order.
            target = torch.where(eligible, gt_max, torch.nan)
            claimed = torch.cat([_last_claiming_gt(overlaps[:, :, block], target, gt_numbers)
                                 for block in blocks], dim=1)
        else:
            # Several GTs may share an argmax prior: amax keeps the highest GT number; ineligible GTs add 0.
            numbers = torch.where(eligible, gt_numbers[None, :], 0)
            claimed = torch.zeros(batch, count, dtype=number_dtype, device=overlaps.device).scatter_reduce(
                1, gt_argmax, numbers, reduce="amax")
        return torch.where(claimed > 0, claimed.to(gt_inds.dtype), gt_inds)


def _last_claiming_gt(overlaps: Tensor, target: Tensor, gt_numbers: Tensor) -> Tensor:
    """``(B, n)``: the highest number ``gt_numbers[g]`` with ``overlaps[b, g, j] == target[b, g]``, else 0."""
    return ((overlaps == target[:, :, None]) * gt_numbers[None, :, None]).amax(dim=1)


# On CPU the (B, G, N) work runs over blocks of priors of about this many pairs: each block stays in
# cache and reuses freed memory, where one pass per operation over the whole tensor (~27M pairs for 2
# images x 268k RPN anchors x 50 GTs) is bound by memory traffic and page faults. Measured ~2x faster.
_CPU_BLOCK_PAIRS = 2 ** 17


def _prior_blocks(count: int, rows: int, device: torch.device) -> list[slice]:
    """Slices covering ``count`` priors: one on an accelerator, ~``_CPU_BLOCK_PAIRS / rows`` priors each on CPU."""
    if device.type != "cpu" or count == 0:
        return [slice(0, count)]
    size = max(1, _CPU_BLOCK_PAIRS // max(rows, 1))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def pairwise_iou(boxes: Tensor, priors: Tensor, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """Overlaps of batched ``(B, G, 4)`` boxes with ``(N, 4)`` priors, ``(B, G, N)``, xyxy, no ``+1``.

    The numbers equal ``box_iou(boxes[b], priors)`` (``mode="iou"``) and
    ``box_iou(priors, boxes[b], mode="iof").T`` (``mode="iof"``: over the prior's area) exactly: the same
    float32 (float64 for float64 inputs) operations in the same order, computed in place into three
    ``(B, G, N)`` buffers with the priors' coordinates made contiguous, because at ~250k anchors × 50 GTs
    the allocation and strided reads of a temporary per operation cost more than the arithmetic.
    """
    dtype = torch.promote_types(torch.promote_types(torch.float32, boxes.dtype), priors.dtype)
    gx1, gy1, gx2, gy2 = (c[..., None] for c in boxes.to(dtype).unbind(-1))  # (B, G, 1)
    px1, py1, px2, py2 = priors.to(dtype).t().contiguous()  # (N,) each
    overlap = torch.minimum(gx2, px2)
    scratch = torch.maximum(gx1, px1)
    overlap.sub_(scratch).clamp_(min=0)
    height = torch.minimum(gy2, py2)
    torch.maximum(gy1, py1, out=scratch)
    overlap.mul_(height.sub_(scratch).clamp_(min=0))
    prior_area = (px2 - px1) * (py2 - py1)
    if mode == "iof":
        return overlap.div_(prior_area.clamp(min=eps))
    box_area = ((gx2 - gx1) * (gy2 - gy1))
    torch.add(box_area, prior_area, out=scratch)
    return overlap.div_(scratch.sub_(overlap).clamp_(min=eps))


def _math_dtype(priors: Tensor, boxes: Sequence[Tensor | None]) -> torch.dtype:
    """float32, or float64 when the priors or any box tensor are float64 (as ``box_iou`` promotes)."""
    dtype = torch.promote_types(torch.float32, priors.dtype)
    for b in boxes:
        if b is not None:
            dtype = torch.promote_types(dtype, b.dtype)
    return dtype


def _pad_boxes(boxes: Sequence[Tensor | None], priors: Tensor) -> Tensor:
    """Per-image ``(M_b, 4)`` boxes (None: none) zero-padded to ``(B, M_max, 4)`` on the priors' device."""
    dtype = _math_dtype(priors, boxes)
    empty = priors.new_zeros(0, 4, dtype=dtype)
    return pad_sequence([empty if b is None else b.to(device=priors.device, dtype=dtype).reshape(-1, 4)
                         for b in boxes], batch_first=True)


def _pad_gts(gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], priors: Tensor) -> tuple[Tensor, ...]:
    """GTs padded to the batch's largest count: boxes ``(B, G, 4)`` (zeros), int64 labels ``(B, G)``,
    bool ``(B, G)`` marking the real GTs."""
    labels = pad_sequence([lb.to(device=priors.device, dtype=torch.int64).reshape(-1) for lb in gt_labels],
                          batch_first=True, padding_value=-1)
    real = pad_sequence([torch.ones(lb.numel(), dtype=torch.bool, device=priors.device) for lb in gt_labels],
                        batch_first=True)
    return _pad_boxes(gt_boxes, priors), labels, real
