"""R-CNN RoI heads: the shared 2-FC box head and the RoI head that trains and applies it (+ masks).

Training follows method doc §4-§5.2: GTs prepended to each image's proposals, max-IoU assignment, one
batched call of the detection sampler (random, or Score-HLR = ISR-N), the box forward on the sampled
RoIs (per image positives first, then negatives), ISR-N weights in the negatives' label weights, ISR-P
on the positives, then ``loss_cls``, ``loss_bbox`` and optionally ``loss_carl`` and ``loss_mask``.
Labels follow the project convention: ``0..C-1`` foreground, ``C`` background (the last softmax column).
RoIs are ``(R, 5)`` float tensors ``[batch_idx, x1, y1, x2, y2]`` in input-image pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from pisa.losses import carl_loss, isr_p, l1_loss, smooth_l1_loss, softmax_cross_entropy
from pisa.models.mask_head import mask_loss, mask_targets, paste_masks
from pisa.models.postprocess import multiclass_nms
from pisa.models.retina_head import CARLSettings, ISRPSettings
from pisa.models.roi_align import ungroup
from pisa.models.samplers import SampleResult, add_gts_as_proposals, force_gt_matches

__all__ = ["BBoxHead", "RoIHead", "RoITargets", "RCNNTestSettings", "boxes_to_rois"]


class BBoxHead(nn.Module):
    """The reference's shared 2-FC box head: flatten, 2 x (FC + ReLU), then class scores and deltas.

    Args:
        in_channels: channels of the pooled features (the FPN width).
        num_classes: ``C`` foreground classes; ``fc_cls`` has ``C + 1`` outputs, background last.
        roi_size: side of the pooled features (7).
        fc_channels: width of the shared FCs (1024).

    ``forward(x (R, in_channels, roi_size, roi_size))`` returns ``(logits (R, C + 1), deltas (R, 4C))``;
    delta row layout ``class * 4 + coord`` (class-specific regression, no background deltas).
    """

    def __init__(self, in_channels: int, num_classes: int, roi_size: int = 7, fc_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_size * roi_size, fc_channels),
                                         nn.Linear(fc_channels, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: xavier-uniform shared FCs, normal(0, 0.01) classifier, normal(0, 0.001)
        regressor, zero biases."""
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)  # C x 7 x 7 order, as the reference's FC input
        for fc in self.shared_fcs:
            x = torch.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


def _pool_grouped(pool: nn.Module, features: list[Tensor], rois: Tensor) -> tuple[Tensor, Tensor | None]:
    """``pool.forward_grouped`` where the extractor has it (:class:`MultiScaleRoIAlign`), else its plain
    output in RoI order."""
    if hasattr(pool, "forward_grouped"):
        return pool.forward_grouped(features, rois)
    return pool(features, rois), None


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image ``(R_i, 4)`` boxes -> ``(sum R_i, 5)`` RoIs ``[batch_idx, x1, y1, x2, y2]``, image order."""
    columns = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(columns) if columns else torch.zeros(0, 5)


@dataclass(frozen=True)
class RCNNTestSettings:
    """``model.roi_head.test``: detections need ``score > score_thr``; per-class NMS at ``nms_iou``;
    the best ``max_per_img`` are kept; masks are binarised at ``mask_thr``."""

    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5


@dataclass
class RoITargets:
    """Training targets of the ``N`` sampled RoIs of a batch, image by image, positives first.

    rois (N, 5) ``[batch_idx, x1, y1, x2, y2]``; labels (N,) int64 with ``C`` = background;
    label_weights (N,) float32 (1 for positives, the sampler's weights for negatives); bbox_targets
    (N, 4) encoded deltas of the positives (zero rows for negatives); gt_inds (N,) int64 index of the
    assigned GT inside its image (-1 for negatives); img_inds (N,) int64; num_pos (B,) positives per image.
    """

    rois: Tensor
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    gt_inds: Tensor
    img_inds: Tensor
    num_pos: list[int]


class RoIHead(nn.Module):
    """The second stage of Faster / Mask R-CNN, with optional PISA (ISR-N via the sampler, ISR-P, CARL).

    Args:
        bbox_roi_pool: ``pool(features P2..P5, rois (R, 5)) -> (R, C_feat, 7, 7)`` (``MultiScaleRoIAlign``).
        bbox_head: :class:`BBoxHead`.
        coder: the R-CNN ``DeltaXYWHCoder`` (stds 0.1, 0.1, 0.2, 0.2).
        assigner: ``MaxIoUAssigner(0.5, 0.5, 0.5)``, low-quality matching off (Faster) / on (Mask).
        sampler: a detection sampler with ``sample_batch`` (``RandomSampler`` or ``ScoreHLRSampler``).
        num_classes: ``C``.
        add_gt_as_proposals: prepend each image's GT boxes to its proposals (forced positives).
        cls_weight: weight of the softmax CE.
        bbox_loss: ``"l1"`` (v2 baseline) or ``"smooth_l1"`` (PISA configs), with ``bbox_beta``
            (smooth_l1 and CARL) and ``bbox_weight``.
        isr_p, carl: PISA settings, or ``None`` (off).
        test: :class:`RCNNTestSettings`.
        mask_roi_pool, mask_head: the mask branch (Mask R-CNN), or ``None``; ``mask_weight`` scales
            ``loss_mask``; mask targets clip the RoIs to the image's shape padded to ``pad_divisor``.
        generator: the ``torch.Generator`` of the sampler's random draws (random sampling, Score-HLR's
            random fill); torch's default when ``None``.

    ``forward(features, proposals, targets)``: ``features`` P2..P5 ``(B, C_feat, H_l, W_l)``;
    ``proposals`` per image ``(R_i, 4)`` detached boxes in input-image pixels. Train mode returns
    ``{"loss_cls", "loss_bbox"[, "loss_carl"][, "loss_mask"]}``; eval mode one dict per image with
    ``boxes`` ``(D, 4)`` in original-image pixels, ``scores`` ``(D,)``, ``labels`` ``(D,)`` int64
    (+ ``masks`` ``(D, H0, W0)`` bool at the original image size).
    """

    def __init__(self, bbox_roi_pool: nn.Module, bbox_head: BBoxHead, coder, assigner, sampler, *,
                 num_classes: int, add_gt_as_proposals: bool = True, cls_weight: float = 1.0,
                 bbox_loss: str = "l1", bbox_beta: float = 1.0, bbox_weight: float = 1.0,
                 isr_p: ISRPSettings | None = None, carl: CARLSettings | None = None,
                 test: RCNNTestSettings = RCNNTestSettings(), mask_roi_pool: nn.Module | None = None,
                 mask_head: nn.Module | None = None, mask_weight: float = 1.0, pad_divisor: int = 32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if bbox_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"model.roi_head.loss_bbox.type must be 'l1' or 'smooth_l1', got {bbox_loss!r}")
        if (mask_roi_pool is None) != (mask_head is None):
            raise ValueError("RoIHead: give both mask_roi_pool and mask_head (Mask R-CNN) or neither")
        self.bbox_roi_pool, self.bbox_head = bbox_roi_pool, bbox_head
        self.mask_roi_pool, self.mask_head = mask_roi_pool, mask_head
        self.coder, self.assigner, self.sampler = coder, assigner, sampler
        self.num_classes = num_classes
        self.add_gt_as_proposals = add_gt_as_proposals
        self.cls_weight, self.bbox_loss, self.bbox_beta, self.bbox_weight = cls_weight, bbox_loss, bbox_beta, bbox_weight
        self.mask_weight, self.pad_divisor = mask_weight, pad_divisor
        self.isr_p, self.carl, self.test = isr_p, carl, test
        self.generator = generator

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    def forward(self, features: list[Tensor], proposals: list[Tensor],
                targets: list[dict]) -> dict[str, Tensor] | list[dict]:
        if self.training:
            return self.loss(features, proposals, targets)
        return self.detect(features, proposals, targets)

    # ---- box branch ----------------------------------------------------------------------------

    def box_forward(self, features: list[Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """RoIAlign + box head on ``rois (R, 5)``: ``(logits (R, C + 1), deltas (R, 4C))``.

        The head runs on the RoIs grouped by level and its outputs are put back in RoI order, which
        moves ``R x (C + 5)`` numbers instead of the ``R x 256 x 7 x 7`` pooled features.
        """
        pooled, order = _pool_grouped(self.bbox_roi_pool, features, rois)
        logits, deltas = self.bbox_head(pooled)
        return ungroup(logits, order), ungroup(deltas, order)

    def mask_forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """RoIAlign + mask head on ``rois (R, 5)``: mask logits ``(R, C, 2·out, 2·out)`` in RoI order."""
        pooled, order = _pool_grouped(self.mask_roi_pool, features, rois)
        return ungroup(self.mask_head(pooled), order)

    def _score_boxes(self, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The sampler's ``scorer``: the current box branch on per-image boxes, image order."""
        return self.box_forward(features, boxes_to_rois(boxes))

    # ---- training ------------------------------------------------------------------------------

    def assign(self, proposals: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list]:
        """Per image: candidates ``(G + R_i, 4)`` (GTs prepended) and their ``AssignResult``.

        The proposals are assigned alone and the prepended GTs then forced to match themselves, as the
        reference does (with low-quality matching a GT among the priors would take its own rescue).
        """
        candidates, assigns = [], []
        for props, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(props)
            gt_labels = target["labels"].to(props.device)
            result = self.assigner.assign(props, gt_boxes, gt_labels)
            if self.add_gt_as_proposals:
                props = add_gts_as_proposals(props, gt_boxes)
                result = force_gt_matches(result, gt_labels)
            candidates.append(props)
            assigns.append(result)
        return candidates, assigns

    def get_targets(self, candidates: list[Tensor], assigns: list, samples: list[SampleResult],
                    targets: list[dict]) -> RoITargets:
        """Sampled RoIs and their targets (method doc §5.2 steps 3-4), flattened image by image."""
        parts = [self._targets_per_image(c, a, s, t["boxes"].to(c))
                 for c, a, s, t in zip(candidates, assigns, samples, targets)]
        boxes, labels, weights, deltas, gt_inds = (list(x) for x in zip(*parts))
        img_inds = torch.cat([torch.full_like(g, i) for i, g in enumerate(gt_inds)])
        return RoITargets(boxes_to_rois(boxes), torch.cat(labels), torch.cat(weights), torch.cat(deltas),
                          torch.cat(gt_inds), img_inds, [s.num_pos for s in samples])

    def _targets_per_image(self, candidates: Tensor, assign, sample: SampleResult,
                           gt_boxes: Tensor) -> tuple[Tensor, ...]:
        """Boxes (P+Q, 4), labels, label weights, encoded deltas (P+Q, 4), GT index (-1 for negatives)."""
        pos, neg = sample.pos_inds, sample.neg_inds
        pos_gt = assign.gt_inds[pos] - 1
        boxes = candidates[sample.inds]
        labels = torch.cat([assign.labels[pos], pos_gt.new_full((neg.numel(),), self.num_classes)])
        # ISR-N: the sampler's weights become the negatives' classification weights (§4.1 step 11).
        weights = torch.cat([boxes.new_ones(pos.numel()), sample.neg_weights.to(boxes)])
        deltas = boxes.new_zeros(boxes.shape)
        if pos.numel() > 0:
            deltas[: pos.numel()] = self.coder.encode(candidates[pos], gt_boxes[pos_gt])
        gt_inds = torch.cat([pos_gt, pos_gt.new_full((neg.numel(),), -1)])
        return boxes, labels, weights, deltas, gt_inds

    def loss(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Assign, sample (one batched call), box forward on the samples, losses (+ mask loss)."""
        candidates, assigns = self.assign(proposals, targets)
        samples = self.sampler.sample_batch(assigns, candidates, generator=self.generator,
                                            scorer=partial(self._score_boxes, features))
        t = self.get_targets(candidates, assigns, samples, targets)
        logits, deltas = self.box_forward(features, t.rois)
        losses = self.box_losses(logits, deltas, t)
        if self.with_mask:
            losses["loss_mask"] = self.mask_losses(features, candidates, assigns, samples, targets)
        return losses

    def _regression_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.bbox_loss == "smooth_l1":
            return smooth_l1_loss(pred, target, beta=self.bbox_beta)
        return l1_loss(pred, target)

    def box_losses(self, logits: Tensor, deltas: Tensor, t: RoITargets) -> dict[str, Tensor]:
        """``loss_cls``, ``loss_bbox`` (and ``loss_carl``) of the box head on the sampled RoIs.

        ``logits (N, C + 1)``, ``deltas (N, 4C)``; loss math in fp32. ``loss_cls`` = ``Σ lw·CE`` over
        the count of non-zero weights; ``loss_bbox`` and ``loss_carl`` are divided by ``N`` (method
        doc §4.1 step 11, §5.2).
        """
        C = self.num_classes
        logits, deltas = logits.float(), deltas.float()
        label_weights = t.label_weights
        if self.isr_p is not None:
            # ISR-P on the positives (softmax CE, class-specific deltas; priors = the RoIs' boxes).
            label_weights = isr_p(logits, deltas, t.labels, label_weights, t.bbox_targets, t.rois[:, 1:],
                                  t.gt_inds, t.img_inds, num_classes=C, decode=self.coder.decode,
                                  cls_loss="softmax_ce", k=self.isr_p.k, bias=self.isr_p.bias,
                                  loss_weight=self.cls_weight, legacy_gt_offset=self.isr_p.legacy_gt_offset,
                                  legacy_float_keys=self.isr_p.legacy_float_keys)
        ce = softmax_cross_entropy(logits, t.labels)
        num_weighted = (label_weights > 0).sum().clamp(min=1)
        losses = {"loss_cls": self.cls_weight * (label_weights * ce).sum() / num_weighted}
        num_samples = max(t.labels.numel(), 1)
        # Selection by index: with no positive this is an empty sum, a zero attached to the deltas.
        pos = torch.nonzero(t.labels < C).squeeze(1)
        pos_deltas = deltas.view(-1, C, 4)[pos, t.labels[pos]]
        reg = self._regression_loss(pos_deltas, t.bbox_targets[pos])
        losses["loss_bbox"] = self.bbox_weight * reg.sum() / num_samples
        if self.carl is not None:
            losses["loss_carl"] = carl_loss(logits, t.labels, deltas, t.bbox_targets, num_classes=C,
                                            avg_factor=num_samples, sigmoid=False, k=self.carl.k,
                                            bias=self.carl.bias, beta=self.bbox_beta, loss_weight=self.bbox_weight,
                                            loss=self.bbox_loss)
        return losses

    def mask_losses(self, features: list[Tensor], candidates: list[Tensor], assigns: list,
                    samples: list[SampleResult], targets: list[dict]) -> Tensor:
        """``loss_mask`` on the sampled positives only: per-class sigmoid BCE at the mask size."""
        pos_boxes = [c[s.pos_inds] for c, s in zip(candidates, samples)]
        logits = self.mask_forward(features, boxes_to_rois(pos_boxes))
        size = logits.shape[-1]
        mask_t, labels = [], []
        for boxes, assign, sample, target in zip(pos_boxes, assigns, samples, targets):
            if "masks" not in target:
                raise ValueError("Mask R-CNN needs instance masks in the targets: set "
                                 "data.train.with_masks: true in the config")
            gt_inds = assign.gt_inds[sample.pos_inds] - 1
            # The reference pads the masks with the image and clips the RoIs to that padded extent.
            pad_shape = [math.ceil(side / self.pad_divisor) * self.pad_divisor for side in target["img_shape"]]
            mask_t.append(mask_targets(boxes, target["masks"].to(boxes.device), gt_inds, size=size,
                                       pad_shape=pad_shape))
            labels.append(assign.labels[sample.pos_inds])
        return self.mask_weight * mask_loss(logits.float(), torch.cat(mask_t), torch.cat(labels))

    # ---- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict]) -> list[dict]:
        """Softmax scores, class-specific decode clipped to ``img_shape``, rescale to the original
        image, per-class NMS, top ``max_per_img`` (+ masks pasted at the original size)."""
        logits, deltas = self.box_forward(features, boxes_to_rois(proposals))
        counts = [p.shape[0] for p in proposals]
        detections = [self.postprocess_boxes(lg, dl, props, meta) for lg, dl, props, meta
                      in zip(logits.split(counts), deltas.split(counts), proposals, targets)]
        if self.with_mask:
            self.add_masks(features, detections, targets)
        return detections

    def postprocess_boxes(self, logits: Tensor, deltas: Tensor, proposals: Tensor, meta: dict) -> dict:
        """One image: ``logits (R, C + 1)``, ``deltas (R, 4C)``, ``proposals (R, 4)`` -> detections."""
        scores = torch.softmax(logits.float(), dim=1)[:, : self.num_classes]
        per_class = deltas.float().view(-1, self.num_classes, 4)  # explicit shape: R may be 0
        boxes = self.coder.decode(proposals[:, None, :], per_class, max_shape=tuple(meta["img_shape"]))
        sx, sy = meta["scale_factor"]
        boxes = (boxes / boxes.new_tensor([sx, sy, sx, sy])).flatten(1)  # (R, 4C), class-major
        t = self.test
        boxes, scores, labels = multiclass_nms(boxes, scores, t.score_thr, t.nms_iou, t.max_per_img)
        return {"boxes": boxes, "scores": scores, "labels": labels}

    def add_masks(self, features: list[Tensor], detections: list[dict], targets: list[dict]) -> None:
        """Mask logits on the detections (back in input pixels), the label's channel pasted at ``ori_shape``."""
        scaled = []
        for det, meta in zip(detections, targets):
            sx, sy = meta["scale_factor"]
            scaled.append(det["boxes"] * det["boxes"].new_tensor([sx, sy, sx, sy]))
        logits = self.mask_forward(features, boxes_to_rois(scaled))
        counts = [d["boxes"].shape[0] for d in detections]
        for det, mask_logits, meta in zip(detections, logits.split(counts), targets):
            rows = torch.arange(det["labels"].numel(), device=mask_logits.device)
            probs = mask_logits[rows, det["labels"]].float().sigmoid()
            det["masks"] = paste_masks(probs, det["boxes"], tuple(meta["ori_shape"]), threshold=self.test.mask_thr)
