"""Detectors as exportable graphs: network plus post-processing with fixed-size, padded outputs.

Each wrapper runs a built pisa detector's own modules (backbone, neck, heads, box coder) and then its
test-time post-processing, written with operators that ``torch.onnx.export`` translates and ONNX
Runtime runs:

* :class:`ExportableRetinaNet`: per level sigmoid, the top ``nms_pre`` anchors by max-class score,
  delta decoding; clipping to ``img_shape``, rescaling by ``1 / scale_factor``, boxes not larger than
  ``min_bbox_size`` dropped, per-class NMS on ``score > score_thr`` (method spec §7.3);
* :class:`ExportableSSD`: softmax over ``C + 1`` columns with the background dropped, optionally the
  top ``nms_pre`` anchors per level, decoding, clipping, rescaling, per-class NMS (no size filter, as
  the model's ``SSDPostProcessor``);
* :class:`ExportableTwoStage` (Faster / Mask R-CNN): RPN proposals with NMS per image and level,
  RoIAlign by level, the box head, class-specific decoding, per-class NMS; for Mask R-CNN the mask
  head on the detections and each detection's mask probabilities (pasting stays outside the graph).

Every wrapper ends the same way (:func:`batched_multiclass_nms`, :func:`first_per_image`): per-class
NMS for the whole batch in ONE ``torchvision.ops.nms`` call, every (image, class) pair moved to its
own region of the plane (class along x, image along y), so no two groups overlap and a single NMS
equals one NMS per image and class; then the best ``max_per_img`` of each image, scattered into
padded ``(B, max_per_img)`` slots.

Anchors are computed inside the graph from the feature-map shapes, so a graph exported with dynamic
height and width stays correct for every input size. Scores, decoding and NMS run in float32 even
when the network runs in float16 (``network_dtype``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align

from pisa.models.retina_head import flatten_levels
from pisa.models.roi_align import MultiScaleRoIAlign, map_roi_levels, ungroup

__all__ = ["ExportableRetinaNet", "ExportableSSD", "ExportableTwoStage", "EXPORT_INPUTS", "EXPORT_OUTPUTS", "MASK_THRESHOLD_KEY", "OPSET", "Detections",
           "build_exportable", "export_onnx", "example_inputs", "unpad_detections"]

EXPORT_INPUTS = ("images", "img_shapes", "scale_factors")
EXPORT_OUTPUTS = ("boxes", "scores", "labels", "num_dets")
# Opset 18: the first with every operator the exporter emits here in its current form (ReduceMax
# with axes as an input); ONNX Runtime runs it on CPU and CUDA.
OPSET = 18
# Metadata of a Mask R-CNN graph: the threshold that binarises the pasted masks (model.roi_head.test.mask_thr).
MASK_THRESHOLD_KEY = "pisa.mask_thr"


# ---- post-processing pieces shared by the wrappers -------------------------------------------------


@dataclass
class Detections:
    """Flat detections of a batch: float32 ``boxes (D, 4)``, ``scores (D,)``, int64 ``labels (D,)``
    in ``0..C−1`` and int64 ``images (D,)``, the batch index of each."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    images: Tensor

    def select(self, index: Tensor) -> "Detections":
        return Detections(self.boxes[index], self.scores[index], self.labels[index], self.images[index])


def grid_anchors(base: Tensor, stride: float, center_offset: float, feature: Tensor) -> Tensor:
    """float32 ``(H·W·A, 4)`` anchors for ``feature``'s ``(H, W)`` (possibly symbolic) from the ``(A, 4)``
    ``base`` anchors, in the anchor generator's ``(h·W + w)·A + a`` order and with its arithmetic
    (``x·stride + center_offset·stride``), so the values are the generator's bit for bit."""
    height, width = feature.shape[-2:]
    offset = center_offset * stride
    shift_x = torch.arange(width, device=feature.device, dtype=torch.float32) * stride + offset
    shift_y = torch.arange(height, device=feature.device, dtype=torch.float32) * stride + offset
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)
    return (base[None] + shifts[:, None]).reshape(-1, 4)


def top_candidates(scores: Tensor, deltas: Tensor, anchors: Tensor, nms_pre: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's ``nms_pre`` anchors with the highest max-class score (all when ``nms_pre ≤ 0``).

    ``scores (B, N, C)``, ``deltas (B, N, 4)``, ``anchors (N, 4)`` → ``(B, k, C)``, ``(B, k, 4)`` and
    ``(B, k, 4)`` with ``k = min(nms_pre, N)``. When every anchor is kept the set is the model's; only
    the order differs, which nothing downstream depends on.
    """
    k = min(nms_pre, scores.shape[1]) if nms_pre > 0 else scores.shape[1]
    top = scores.max(dim=2).values.topk(k, dim=1).indices  # (B, k)
    gather = lambda values: values.gather(1, top[..., None].expand(-1, -1, values.shape[-1]))  # noqa: E731
    return gather(scores), gather(deltas), anchors[top]


def clip_to_images(boxes: Tensor, img_shapes: Tensor) -> Tensor:
    """``(N, K, 4)`` boxes of ``N`` rows clipped to ``[0, w] × [0, h]`` of each row's image
    (``img_shapes (N, 2)`` as ``(h, w)``), as ``decode(max_shape=...)`` clips them."""
    return torch.minimum(boxes.clamp(min=0), img_shapes[:, [1, 0, 1, 0]][:, None, :])


def clip_and_rescale(boxes: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> Tensor:
    """:func:`clip_to_images`, then division by each row's ``(sx, sy)`` (``scale_factors (N, 2)``):
    original-image pixels, as the models rescale."""
    return clip_to_images(boxes, img_shapes) / scale_factors[:, [0, 1, 0, 1]][:, None, :]


def dense_candidates(boxes: Tensor, scores: Tensor, score_thr: float, min_size: float | None) -> Detections:
    """``(B, K, 4)`` class-agnostic boxes and ``(B, K, C)`` scores → every (box, class) pair with
    ``score > score_thr``, box-major and class-minor as the model flattens them. With ``min_size ≥ 0``
    only boxes wider and taller than it are candidates (RetinaNet's ``min_bbox_size``; 0 drops the
    zero-size boxes clipping makes); ``None`` or negative keeps every box (SSD)."""
    batch, num_boxes, num_classes = scores.shape
    above = scores > score_thr
    if min_size is not None and min_size >= 0:
        sized = (boxes[..., 2] - boxes[..., 0] > min_size) & (boxes[..., 3] - boxes[..., 1] > min_size)
        above = above & sized[..., None]
    candidates = torch.nonzero(above.reshape(-1)).reshape(-1)
    box_index = torch.div(candidates, num_classes, rounding_mode="floor")  # into (B·K)
    return Detections(boxes.reshape(-1, 4)[box_index], scores.reshape(-1)[candidates],
                      candidates - box_index * num_classes, torch.div(box_index, num_boxes, rounding_mode="floor"))


def batched_multiclass_nms(candidates: Detections, iou_thr: float, span: Tensor) -> Detections:
    """NMS within every (image, class) group in one call; the survivors by decreasing score.

    ``span`` (a scalar larger than every coordinate, which are all ``≥ 0``) shifts each group to its
    own region: class ``c`` of image ``b`` by ``(c·span, b·span)``, so boxes of different groups
    never overlap.
    """
    return candidates.select(nms_by_group(candidates.boxes, candidates.scores, candidates.labels,
                                          candidates.images, iou_thr, span))


def nms_by_group(boxes: Tensor, scores: Tensor, group_x: Tensor, group_y: Tensor, iou_thr: float,
                 span: Tensor) -> Tensor:
    """Indices kept by NMS within the groups ``(group_x, group_y)`` (int64 ``(N,)`` each), by
    decreasing score. Boxes ``(N, 4)`` have coordinates in ``[0, span)``."""
    offsets = torch.stack([group_x, group_y, group_x, group_y], dim=1).to(boxes.dtype) * span
    keep = torchvision.ops.nms(boxes + offsets, scores, iou_thr)
    return keep[scores[keep].argsort(descending=True)]  # by decreasing score, whatever the backend


def rank_in_image(images: Tensor, batch: int) -> Tensor:
    """int64 ``(D,)``: each row's position among the rows of its image (``images (D,)``), in row order."""
    member = (images[:, None] == torch.arange(batch, device=images.device)[None, :]).to(torch.int64)  # (D, B)
    return (member.cumsum(0) * member).sum(1) - 1


def first_per_image(detections: Detections, batch: int, max_per_img: int) -> tuple[Detections, Tensor, Tensor]:
    """Detections by decreasing score → the first ``max_per_img`` of each image, their slot
    ``image · max_per_img + rank`` (int64 ``(D',)``) and the int64 ``(B,)`` count per image."""
    rank = rank_in_image(detections.images, batch)
    kept = torch.nonzero(rank < max_per_img).reshape(-1)
    slots = detections.images[kept] * max_per_img + rank[kept]
    num_dets = (detections.images[kept][:, None] == torch.arange(batch, device=kept.device)[None, :]).sum(0)
    return detections.select(kept), slots, num_dets


def to_slots(values: Tensor, slots: Tensor, batch: int, max_per_img: int, fill: float) -> Tensor:
    """Rows ``values (D, ...)`` at their unique ``slots`` of a ``(B, max_per_img, ...)`` tensor filled with ``fill``."""
    rest = values.shape[1:]
    out = torch.full((batch * max_per_img, *rest), fill, dtype=values.dtype, device=values.device)
    return out.index_put((slots,), values).reshape(batch, max_per_img, *rest)


def padded_outputs(detections: Detections, batch: int, max_per_img: int) -> tuple[tuple[Tensor, ...], Detections, Tensor]:
    """Detections by decreasing score → ``(boxes, scores, labels, num_dets)`` padded per image, plus
    the kept flat detections and their slots (for outputs computed from them, e.g. masks)."""
    kept, slots, num_dets = first_per_image(detections, batch, max_per_img)
    outputs = (to_slots(kept.boxes, slots, batch, max_per_img, 0.0), to_slots(kept.scores, slots, batch, max_per_img, 0.0),
               to_slots(kept.labels.to(torch.int64), slots, batch, max_per_img, -1), num_dets)
    return outputs, kept, slots


def _network(modules: list[nn.Module], network_dtype: torch.dtype) -> list[nn.Module]:
    """The modules as they run in the graph: float32 as given, float16 as a converted copy."""
    if network_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"network_dtype must be torch.float32 or torch.float16, got {network_dtype}")
    if network_dtype == torch.float32:
        return modules
    return list(copy.deepcopy(nn.ModuleList(modules)).to(network_dtype))


# ---- dense detectors -------------------------------------------------------------------------------


class ExportableRetinaNet(nn.Module):
    """A RetinaNet whose ``forward`` is the whole test-time computation, in tensors only.

    Args:
        model: a built ``RetinaNet`` (its weights and test settings are used; it is not modified:
            a float16 network is a converted copy).
        network_dtype: dtype of backbone, neck and head (``torch.float32`` or ``torch.float16``);
            the post-processing always runs in float32.

    ``forward(images, img_shapes, scale_factors)``:

    * ``images``: float32 ``(B, 3, H, W)`` normalised and zero-padded batch (as ``pisa.data`` makes it);
    * ``img_shapes``: float32 ``(B, 2)``, each image's resized ``(h, w)`` before padding;
    * ``scale_factors``: float32 ``(B, 2)``, each image's ``(sx, sy)`` with ``resized = original · s``.

    Returns ``(boxes, scores, labels, num_dets)``: float32 ``(B, M, 4)`` xyxy boxes in original-image
    coordinates, float32 ``(B, M)`` scores by decreasing score, int64 ``(B, M)`` labels in ``0..C−1``
    and int64 ``(B,)`` counts, with ``M = max_per_img``. Slots past ``num_dets[b]`` hold zero boxes and
    scores and label ``-1``.
    """

    output_names = EXPORT_OUTPUTS

    def __init__(self, model: nn.Module, network_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = _network([model.backbone, model.neck, model.head], network_dtype)
        self.network_dtype = network_dtype
        post = model.postprocessor
        rule = getattr(post, "topk_rule", "v2")
        if rule != "v2":
            raise ValueError(f"model.test.topk_rule {rule!r}: the export supports the 'v2' rule (top nms_pre "
                             "anchors per level) so far; export with --set model.test.topk_rule=v2")
        generator = post.anchor_generator
        self.coder, self.num_classes = post.coder, model.head.num_classes
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = (post.nms_pre, post.score_thr,
                                                                         post.nms_iou, post.max_per_img)
        self.min_bbox_size = getattr(post, "min_bbox_size", 0.0)
        self.strides = [float(s) for s in generator.strides]
        self.center_offset = generator.center_offset
        for level, base in enumerate(generator.base_anchors()):
            self.register_buffer(f"base_anchors_{level}", base, persistent=False)

    def forward(self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, ...]:
        features = self.neck(self.backbone(images.to(self.network_dtype)))
        cls_scores, bbox_preds = self.head(features)
        return self.postprocess([s.float() for s in cls_scores], [d.float() for d in bbox_preds],
                                img_shapes.float(), scale_factors.float())

    def postprocess(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], img_shapes: Tensor,
                    scale_factors: Tensor) -> tuple[Tensor, ...]:
        """Head outputs (per level ``(B, A·C, H, W)`` / ``(B, A·4, H, W)``) → the padded detections."""
        level_boxes, level_scores = [], []
        for level, (logits, deltas) in enumerate(zip(cls_scores, bbox_preds)):
            anchors = self.level_anchors(level, logits)
            scores, deltas, anchors = top_candidates(flatten_levels([logits], self.num_classes).sigmoid(),
                                                     flatten_levels([deltas], 4), anchors, self.nms_pre)
            level_boxes.append(self.coder.decode(anchors, deltas))
            level_scores.append(scores)
        boxes = clip_and_rescale(torch.cat(level_boxes, dim=1), img_shapes, scale_factors)
        candidates = dense_candidates(boxes, torch.cat(level_scores, dim=1), self.score_thr, self.min_bbox_size)
        kept = batched_multiclass_nms(candidates, self.nms_iou, boxes.max() + 1)
        return padded_outputs(kept, boxes.shape[0], self.max_per_img)[0]

    def level_anchors(self, level: int, feature: Tensor) -> Tensor:
        """float32 ``(H·W·A, 4)`` anchors of ``level`` for ``feature``'s ``(H, W)`` (see :func:`grid_anchors`)."""
        return grid_anchors(getattr(self, f"base_anchors_{level}"), self.strides[level], self.center_offset, feature)


class ExportableSSD(nn.Module):
    """An SSD whose ``forward`` is the whole test-time computation (the model's ``SSDPostProcessor``).

    Args and the ``forward`` contract as :class:`ExportableRetinaNet` (the network is the VGG trunk
    with its extra layers and the SSD head). Post-processing: softmax over the ``C + 1`` columns with
    the background (last) dropped; per level the top ``nms_pre`` anchors by max foreground score when
    ``nms_pre > 0``; decoding clipped to ``img_shapes``; division by ``scale_factors``; per-class NMS
    on ``score > score_thr``; the best ``max_per_img`` per image. No box is dropped for its size.
    """

    output_names = EXPORT_OUTPUTS

    def __init__(self, model: nn.Module, network_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone, self.head = _network([model.backbone, model.head], network_dtype)
        self.network_dtype = network_dtype
        post = model.postprocessor
        generator = post.anchor_generator
        self.coder, self.num_classes = post.coder, model.head.num_classes
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = (post.nms_pre, post.score_thr,
                                                                         post.nms_iou, post.max_per_img)
        self.strides = [float(s) for s in generator.strides]
        self.center_offset = generator.center_offset
        for level, base in enumerate(generator.base_anchors()):
            self.register_buffer(f"base_anchors_{level}", base, persistent=False)

    def forward(self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, ...]:
        cls_scores, bbox_preds = self.head(self.backbone(images.to(self.network_dtype)))
        level_boxes, level_scores = [], []
        for level, (logits, deltas) in enumerate(zip(cls_scores, bbox_preds)):
            anchors = grid_anchors(getattr(self, f"base_anchors_{level}"), self.strides[level], self.center_offset,
                                   logits)
            # Softmax over all C + 1 columns, then drop the background (last) column.
            probs = flatten_levels([logits.float()], self.num_classes + 1).softmax(-1)[..., :-1]
            probs, deltas, anchors = top_candidates(probs, flatten_levels([deltas.float()], 4), anchors, self.nms_pre)
            level_boxes.append(self.coder.decode(anchors, deltas))
            level_scores.append(probs)
        boxes = clip_and_rescale(torch.cat(level_boxes, dim=1), img_shapes.float(), scale_factors.float())
        candidates = dense_candidates(boxes, torch.cat(level_scores, dim=1), self.score_thr, None)
        kept = batched_multiclass_nms(candidates, self.nms_iou, boxes.max() + 1)
        return padded_outputs(kept, boxes.shape[0], self.max_per_img)[0]


# ---- two-stage detectors ---------------------------------------------------------------------------


def pool_by_level(pool: nn.Module, features: list[Tensor], rois: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A :class:`~pisa.models.roi_align.MultiScaleRoIAlign`'s pooling, with its settings, in graph ops.

    ``rois (R, 5)`` float32 ``[batch_idx, x1, y1, x2, y2]`` → ``(pooled (R, C, S, S)`` in ``dtype``,
    grouped by level, and ``order (R,)``: row ``i`` is RoI ``order[i]``), as ``forward_grouped``
    returns them. Every level runs, also with no RoI (an empty ``RoiAlign``), since the graph cannot
    branch on a count. RoIAlign (``aligned=True``, the pool's ``sampling_ratio``, 0 = adaptive)
    becomes ONNX ``RoiAlign`` with ``coordinate_transformation_mode="half_pixel"``; it runs in
    float32 whatever the network's dtype, as the model never rounds boxes to half precision.
    """
    levels = map_roi_levels(rois[:, 1:], len(pool.strides), pool.finest_scale)
    pooled, order = [], []
    for level, stride in enumerate(pool.strides):
        inds = torch.nonzero(levels == level).reshape(-1)
        pooled.append(roi_align(features[level].float(), rois[inds], pool.output_size, spatial_scale=1.0 / stride,
                                sampling_ratio=pool.sampling_ratio, aligned=True))
        order.append(inds)
    return torch.cat(pooled).to(dtype), torch.cat(order)


class ExportableTwoStage(nn.Module):
    """A Faster / Mask R-CNN whose ``forward`` is the whole test-time computation, in tensors only.

    Args and the ``forward`` contract as :class:`ExportableRetinaNet`; ``M = model.roi_head.test
    .max_per_img``. With a mask branch a fifth output ``masks`` float32 ``(B, M, S, S)`` holds each
    detection's mask probabilities (sigmoid of its label's channel, ``S = 28``; zeros in empty
    slots); pasting them into the image (``pisa.models.mask_head.paste_masks``) stays outside the graph.

    The steps are the model's eval mode (``RPN.proposals``, ``RoIHead.detect``):

    1. RPN: per level the top ``nms_pre`` anchors by sigmoid objectness, decoded and clipped to
       ``img_shapes``; NMS within each (image, level); each image's ``max_per_img`` best proposals;
    2. RoIAlign by level (:func:`pool_by_level`) and the box head;
    3. softmax without the background column, class-specific decoding clipped to ``img_shapes``,
       division by ``scale_factors``, per-class NMS on ``score > score_thr``, the best ``M`` per image;
    4. masks: the detections' boxes back in input pixels, RoIAlign by level, the mask head.
    """

    def __init__(self, model: nn.Module, network_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        rpn, roi_head = model.rpn, model.roi_head
        self.with_mask = roi_head.with_mask
        pools = [roi_head.bbox_roi_pool] + ([roi_head.mask_roi_pool] if self.with_mask else [])
        for pool in pools:
            if not isinstance(pool, MultiScaleRoIAlign):
                raise ValueError(f"the export pools RoIs as MultiScaleRoIAlign does, not as {type(pool).__name__}")
        heads = [model.backbone, model.neck, rpn.head, roi_head.bbox_head] + ([roi_head.mask_head] if self.with_mask
                                                                             else [])
        network = _network(heads, network_dtype)
        self.backbone, self.neck, self.rpn_head, self.bbox_head = network[:4]
        self.mask_head = network[4] if self.with_mask else None
        self.network_dtype = network_dtype
        self.output_names = EXPORT_OUTPUTS + (("masks",) if self.with_mask else ())
        generator = rpn.anchor_generator
        self.rpn_coder, self.proposal_settings = rpn.coder, rpn.test_proposals
        self.strides = [float(s) for s in generator.strides]
        self.center_offset = generator.center_offset
        for level, base in enumerate(generator.base_anchors()):
            self.register_buffer(f"base_anchors_{level}", base, persistent=False)
        self.coder, self.num_classes, self.test = roi_head.coder, roi_head.num_classes, roi_head.test
        self.bbox_pool, self.mask_pool = pools[0], (pools[1] if self.with_mask else None)

    def forward(self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, ...]:
        img_shapes, scale_factors = img_shapes.float(), scale_factors.float()
        features = self.neck(self.backbone(images.to(self.network_dtype)))  # P2..P6
        objectness, deltas = self.rpn_head(features)
        rois = self.proposals([o.float() for o in objectness], [d.float() for d in deltas], img_shapes)
        detections = self.detect(features, rois, img_shapes, scale_factors)
        batch, m = images.shape[0], self.test.max_per_img
        outputs, kept, slots = padded_outputs(detections, batch, m)
        if not self.with_mask:
            return outputs
        return (*outputs, to_slots(self.mask_probs(features, kept, scale_factors), slots, batch, m, 0.0))

    def proposals(self, objectness: list[Tensor], deltas: list[Tensor], img_shapes: Tensor) -> Tensor:
        """RPN maps (per level ``(B, A, H, W)`` logits, ``(B, 4A, H, W)`` deltas) → float32 RoIs
        ``(R, 5)`` ``[batch_idx, x1, y1, x2, y2]`` in input pixels, every image's proposals."""
        settings = self.proposal_settings
        level_boxes, level_scores, level_ids = [], [], []
        for level, (logits, level_deltas) in enumerate(zip(objectness, deltas)):
            anchors = grid_anchors(getattr(self, f"base_anchors_{level}"), self.strides[level], self.center_offset,
                                   logits)
            scores = flatten_levels([logits], 1).squeeze(2).sigmoid()  # (B, N)
            k = min(settings.nms_pre, scores.shape[1]) if settings.nms_pre > 0 else scores.shape[1]
            scores, top = scores.topk(k, dim=1)
            level_deltas = flatten_levels([level_deltas], 4).gather(1, top[..., None].expand(-1, -1, 4))
            level_boxes.append(self.rpn_coder.decode(anchors[top], level_deltas))
            level_scores.append(scores)
            level_ids.append(torch.full_like(top, level))
        boxes = clip_to_images(torch.cat(level_boxes, dim=1), img_shapes).reshape(-1, 4)
        scores, levels = torch.cat(level_scores, dim=1), torch.cat(level_ids, dim=1)
        batch, count = scores.shape
        images = torch.arange(batch, device=scores.device)[:, None].expand(batch, count).reshape(-1)
        # Levels never suppress each other (the level is the group along x), nor do images (along y).
        keep = nms_by_group(boxes, scores.reshape(-1), levels.reshape(-1), images, settings.nms_iou, boxes.max() + 1)
        if settings.max_per_img > 0:
            keep = keep[torch.nonzero(rank_in_image(images[keep], batch) < settings.max_per_img).reshape(-1)]
        # A bound on the proposal count for torch.export: without it, the bound of the later
        # nonzero over (proposal, class) pairs overflows int64 in the graph's runtime checks.
        torch._check(keep.shape[0] <= boxes.shape[0])
        return torch.cat([images[keep].to(boxes.dtype)[:, None], boxes[keep]], dim=1)

    def detect(self, features: list[Tensor], rois: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> Detections:
        """Box head on the RoIs → per-class NMS survivors of the batch, by decreasing score."""
        pooled, order = pool_by_level(self.bbox_pool, features, rois, self.network_dtype)
        logits, deltas = self.bbox_head(pooled)
        logits, deltas = ungroup(logits.float(), order), ungroup(deltas.float(), order)
        num_classes = self.num_classes
        scores = torch.softmax(logits, dim=1)[:, :num_classes]  # (R, C)
        images = rois[:, 0].to(torch.int64)
        boxes = self.coder.decode(rois[:, None, 1:], deltas.reshape(-1, num_classes, 4))  # (R, C, 4)
        boxes = clip_and_rescale(boxes, img_shapes[images], scale_factors[images])
        above = torch.nonzero((scores > self.test.score_thr).reshape(-1)).reshape(-1)  # RoI-major, class-minor
        row = torch.div(above, num_classes, rounding_mode="floor")
        candidates = Detections(boxes.reshape(-1, 4)[above], scores.reshape(-1)[above], above - row * num_classes,
                                images[row])
        return batched_multiclass_nms(candidates, self.test.nms_iou, boxes.max() + 1)

    def mask_probs(self, features: list[Tensor], detections: Detections, scale_factors: Tensor) -> Tensor:
        """float32 ``(D, S, S)`` mask probabilities of the detections' labels (``RoIHead.add_masks``
        before pasting): boxes back in input pixels, pooled by level, the mask head."""
        scale = scale_factors[detections.images][:, [0, 1, 0, 1]]
        rois = torch.cat([detections.images.to(torch.float32)[:, None], detections.boxes * scale], dim=1)
        pooled, order = pool_by_level(self.mask_pool, features, rois, self.network_dtype)
        logits = self.mask_head(pooled)  # (D, C, S, S), grouped by level
        rows = torch.arange(logits.shape[0], device=logits.device)
        return ungroup(logits[rows, detections.labels[order]].float().sigmoid(), order)


# ---- building and writing the graph ----------------------------------------------------------------


def build_exportable(model: nn.Module, network_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The export wrapper of a built pisa detector (RetinaNet, SSD, Faster / Mask R-CNN); a
    ``ValueError`` for other types."""
    from pisa.models.retinanet import RetinaNet
    from pisa.models.ssd import SSD
    from pisa.models.two_stage import TwoStageDetector

    if isinstance(model, RetinaNet):
        return ExportableRetinaNet(model, network_dtype)
    if isinstance(model, SSD):
        return ExportableSSD(model, network_dtype)
    if isinstance(model, TwoStageDetector):
        return ExportableTwoStage(model, network_dtype)
    raise ValueError(f"ONNX export supports RetinaNet, SSD and Faster / Mask R-CNN, not {type(model).__name__}")


def unpad_detections(boxes: Tensor, scores: Tensor, labels: Tensor, num_dets: Tensor,
                     masks: Tensor | None = None) -> list[dict[str, Tensor]]:
    """Padded ``(B, M, ·)`` outputs → one ``{"boxes", "scores", "labels"}`` dict per image (the model's
    eval-mode format), plus ``"mask_probs"`` ``(D, S, S)`` when a graph's ``masks`` are given (to be
    pasted with ``pisa.models.mask_head.paste_masks``). Accepts tensors or numpy arrays."""
    as_tensor = torch.as_tensor
    boxes, scores, labels, num_dets = (as_tensor(x) for x in (boxes, scores, labels, num_dets))
    detections = [{"boxes": boxes[i, :n].float(), "scores": scores[i, :n].float(), "labels": labels[i, :n].long()}
                  for i, n in enumerate(num_dets.tolist())]
    if masks is not None:
        masks = as_tensor(masks)
        for i, det in enumerate(detections):
            det["mask_probs"] = masks[i, :len(det["labels"])].float()
    return detections


def example_inputs(batch: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Graph inputs for a batch of ``batch`` full-size ``(H, W)`` images."""
    height, width = size
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    img_shapes = torch.tensor([[float(height), float(width)]] * batch)
    return images, img_shapes, torch.ones(batch, 2)


def _dynamic_shapes(pad_divisor: int, max_side: int, spatial: bool = True) -> dict[str, Any]:
    """Batch dynamic, and with ``spatial`` height and width too (multiples of ``pad_divisor``, as batches are)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    image_dims: dict[int, Any] = {0: batch}
    if spatial:
        image_dims[2] = pad_divisor * Dim("height_blocks", min=1, max=max_side // pad_divisor)
        image_dims[3] = pad_divisor * Dim("width_blocks", min=1, max=max_side // pad_divisor)
    return {"images": image_dims, "img_shapes": {0: batch}, "scale_factors": {0: batch}}


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch: int = 1, size: tuple[int, int] = (800, 1344),
                fp16: bool = False, dynamic: bool = False, pad_divisor: int = 32,
                opset: int = OPSET) -> nn.Module:
    """Write ``model`` (a built, loaded RetinaNet, SSD or Faster / Mask R-CNN) and its post-processing
    as one ONNX file.

    Uses ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript; torchvision's NMS
    becomes ONNX ``NonMaxSuppression``). Static by default: batch ``batch`` of ``size = (H, W)``
    images. ``dynamic``: batch, height and width become graph dimensions (height and width multiples
    of ``pad_divisor``, up to 4096); the example traced then has batch 2 and at least two cells on the
    coarsest level, since ``torch.export`` specialises dimensions of size 1. SSD, whose layers fix the
    input size, gets a dynamic batch only. ``fp16``: float16 network, float32 post-processing. Weights
    are stored inside the file (no external data). Returns the wrapper that was exported (for checks
    against the graph).
    """
    wrapper = build_exportable(model.eval(), torch.float16 if fp16 else torch.float32).eval()
    dynamic_shapes = None
    if dynamic:
        spatial = not isinstance(wrapper, ExportableSSD)
        if spatial:
            coarsest = 2 * int(max(wrapper.strides))
            round_up = lambda v: -(-max(v, coarsest) // pad_divisor) * pad_divisor  # noqa: E731
            size = (round_up(size[0]), round_up(size[1]))
        batch = max(batch, 2)
        dynamic_shapes = _dynamic_shapes(pad_divisor, 4096, spatial)
    with _quiet_exporter():
        program = torch.onnx.export(wrapper, example_inputs(batch, size), dynamo=True, opset_version=opset,
                                    input_names=list(EXPORT_INPUTS), output_names=list(wrapper.output_names),
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    if isinstance(wrapper, ExportableTwoStage) and wrapper.with_mask:
        # The runner pastes the mask probabilities outside the graph, binarised as the model does.
        program.model.metadata_props[MASK_THRESHOLD_KEY] = repr(float(wrapper.test.mask_thr))
    program.save(str(path), external_data=False)
    return wrapper


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that ask nothing of a pisa user: torchvision's NMS meta kernel
    calls an API torch marks deprecated, onnx_ir notes the empty attribute lists it defaults, and a
    dynamic export's equal dimension names are merged."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_unbacked_symint.*", category=FutureWarning)
            # A dynamic export names the batch dimension of all three inputs "batch"; the exporter
            # notes that it keeps one of the equal names.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)
