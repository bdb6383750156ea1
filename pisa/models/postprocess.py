"""Test-time post-processing of dense heads: top-k, decode, multi-class NMS, rescale (method spec §7.3).

This is the reference RetinaNet test behaviour: per level keep the top ``nms_pre`` candidates, decode them
clipped to the resized image, concatenate the levels, return to original-image coordinates, drop boxes not
wider and taller than ``min_bbox_size`` (0: zero-size boxes, which clipping produces at the image border;
negative: keep all, as mmdetection v2's RetinaNet did), then per-class NMS on ``score > score_thr`` and keep
the best ``max_per_img``.

Two rules pick the per-level candidates (``topk_rule``):

* ``"v2"`` (default): the ``nms_pre`` anchors with the highest max-class score, all their classes kept.
  mmdetection v2 scored the published checkpoints this way.
* ``"v3"``: the ``nms_pre`` (anchor, class) pairs with the highest scores among those above
  ``score_thr``, as mmdetection 3.x does. It never keeps more candidates than ``"v2"``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from pisa.models.box_coder import DeltaXYWHCoder

TOPK_RULES = ("v2", "v3")


def multiclass_nms(
    boxes: Tensor, scores: Tensor, score_thr: float, iou_thr: float, max_num: int, labels: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class NMS over candidate boxes.

    Args:
        boxes: ``(N, 4)`` class-agnostic xyxy boxes, or ``(N, 4·C)`` class-specific boxes (R-CNN).
        scores: ``(N, C)`` per-class scores with no background column; or ``(N,)`` when ``labels`` is given.
        score_thr: candidates need ``score > score_thr``.
        iou_thr: within a class, a box is suppressed by a higher-scoring one with ``IoU > iou_thr``.
        max_num: keep at most this many detections (all when ``≤ 0``).
        labels: optional int64 ``(N,)``: one class per box, for already flattened candidates.

    Returns:
        ``(D, 4)`` boxes, ``(D,)`` scores and int64 ``(D,)`` labels in ``0..C−1``, by decreasing score.
    """
    boxes, scores, labels = _flatten_candidates(boxes, scores, labels)
    keep_mask = scores > score_thr
    boxes, scores, labels = boxes[keep_mask], scores[keep_mask], labels[keep_mask]
    keep = best_survivors(boxes.float(), scores.float(), labels, iou_thr, max_num)
    return boxes[keep], scores[keep], labels[keep]


def best_survivors(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thr: float, max_num: int) -> Tensor:
    """The first ``max_num`` indices of ``batched_nms(boxes, scores, labels, iou_thr)`` (all when ``≤ 0``).

    Whether a candidate survives per-class NMS depends only on the candidates of its class that score
    at least as high. So NMS over the candidates scoring at least the ``k``-th best score decides those
    candidates exactly as NMS over all of them would, and once ``max_num`` of them survive, no
    lower-scored candidate can reach the result. ``k`` starts at ``4 · max_num`` and grows fourfold
    until that holds or every candidate is in. With many candidates (SSD keeps every anchor above
    ``score_thr``: tens of thousands of pairs) this is several times faster than NMS over all of them
    and gives the same detections. Indices come back by decreasing score, as torchvision orders them.
    """
    count = scores.numel()
    k = 4 * max_num
    # Tracing (ONNX export) cannot follow the data-dependent loop; the export graphs have their own NMS.
    while 0 < k < count and not torch.jit.is_tracing():
        kth_best = scores.topk(k, sorted=False).values.min()
        chunk = torch.nonzero(scores >= kth_best).squeeze(1)  # every tie of the k-th score included
        keep = batched_nms(boxes[chunk], scores[chunk], labels[chunk], iou_thr)
        if keep.numel() >= max_num:
            return chunk[keep[:max_num]]
        k *= 4
    keep = batched_nms(boxes, scores, labels, iou_thr)  # sorted by decreasing score
    return keep[:max_num] if max_num > 0 else keep


def _flatten_candidates(boxes: Tensor, scores: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One row per (box, class) pair, box-major and class-minor as the reference orders them."""
    if labels is not None:
        if scores.dim() != 1 or boxes.shape[-1] != 4:
            raise ValueError(f"multiclass_nms: with labels, give (N, 4) boxes and (N,) scores, "
                             f"got {tuple(boxes.shape)} and {tuple(scores.shape)}")
        return boxes, scores, labels.to(torch.int64)
    num_boxes, num_classes = scores.shape
    if boxes.shape[-1] == 4:
        boxes = boxes[:, None, :].expand(num_boxes, num_classes, 4)
    elif boxes.shape[-1] == 4 * num_classes:
        boxes = boxes.reshape(num_boxes, num_classes, 4)
    else:
        raise ValueError(f"multiclass_nms: boxes must be (N, 4) or (N, 4·C) for C = {num_classes} classes, "
                         f"got {tuple(boxes.shape)}")
    class_ids = torch.arange(num_classes, device=scores.device).expand(num_boxes, num_classes)
    return boxes.reshape(-1, 4), scores.reshape(-1), class_ids.reshape(-1)


def dense_postprocess(
    cls_scores: list[Tensor],
    bbox_preds: list[Tensor],
    anchors: list[Tensor],
    coder: DeltaXYWHCoder,
    img_shape: tuple[int, int],
    scale_factor: tuple[float, float],
    *,
    nms_pre: int,
    score_thr: float,
    nms_iou: float,
    max_per_img: int,
    topk_rule: str = "v2",
    min_bbox_size: float = 0.0,
) -> dict[str, Tensor]:
    """Detections of ONE image from a sigmoid dense head (RetinaNet).

    Args:
        cls_scores: per level ``(H·W·A, C)`` logits (the sigmoid is applied here).
        bbox_preds: per level ``(H·W·A, 4)`` deltas.
        anchors: per level ``(H·W·A, 4)`` anchors.
        coder: the head's delta coder.
        img_shape: ``(h, w)`` of the resized image (before padding); boxes are clipped to it.
        scale_factor: ``(sx, sy)`` with ``resized = original · s``.
        nms_pre: per level, the number of candidates kept (all when ``≤ 0``); see ``topk_rule``.
        score_thr, nms_iou, max_per_img: see :func:`multiclass_nms`.
        topk_rule: ``"v2"``: the top ``nms_pre`` anchors by max-class score; ``"v3"``: the top
            ``nms_pre`` (anchor, class) pairs with ``score > score_thr`` (see the module doc).
        min_bbox_size: keep boxes with width and height ``> min_bbox_size`` in original-image pixels
            (default 0: drop zero-size boxes); negative keeps every box.

    Returns:
        ``{"boxes": (D, 4), "scores": (D,), "labels": (D,) int64}`` in original-image coordinates.
    """
    return dense_postprocess_batch(
        [scores[None] for scores in cls_scores], [preds[None] for preds in bbox_preds], anchors, coder,
        [img_shape], [scale_factor], nms_pre=nms_pre, score_thr=score_thr, nms_iou=nms_iou,
        max_per_img=max_per_img, topk_rule=topk_rule, min_bbox_size=min_bbox_size,
    )[0]


def dense_postprocess_batch(
    cls_scores: list[Tensor],
    bbox_preds: list[Tensor],
    anchors: list[Tensor],
    coder: DeltaXYWHCoder,
    img_shapes: list[tuple[int, int]],
    scale_factors: list[tuple[float, float]],
    *,
    nms_pre: int,
    score_thr: float,
    nms_iou: float,
    max_per_img: int,
    topk_rule: str = "v2",
    min_bbox_size: float = 0.0,
) -> list[dict[str, Tensor]]:
    """:func:`dense_postprocess` for a batch: per level ``(B, H·W·A, C)`` logits and ``(B, H·W·A, 4)``
    deltas, anchors shared by the batch, and one ``img_shape`` / ``scale_factor`` per image.

    With ``topk_rule="v2"`` top-k, decoding and rescaling run batched and NMS per image; with ``"v3"``
    the candidate count differs per image, so everything runs per image. Returns one dict per image.
    """
    if topk_rule not in TOPK_RULES:
        raise ValueError(f"model.test.topk_rule: unknown rule {topk_rule!r}; valid rules: {list(TOPK_RULES)} "
                         "(v2: top nms_pre anchors per level by max class score; v3: top nms_pre "
                         "(anchor, class) pairs per level above score_thr)")
    settings = dict(nms_pre=nms_pre, score_thr=score_thr, nms_iou=nms_iou, max_per_img=max_per_img,
                    min_bbox_size=min_bbox_size)
    if topk_rule == "v3":
        return [_postprocess_pairs_per_image([s[i] for s in cls_scores], [d[i] for d in bbox_preds], anchors, coder,
                                             img_shapes[i], scale_factors[i], **settings)
                for i in range(len(img_shapes))]
    level_boxes, level_scores = [], []
    for logits, deltas, level_anchors in zip(cls_scores, bbox_preds, anchors):
        scores, deltas, level_anchors = _top_candidates(logits.float().sigmoid(), deltas, level_anchors, nms_pre)
        level_boxes.append(coder.decode(level_anchors, deltas))
        level_scores.append(scores)
    boxes, scores = torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1)
    boxes = _clip_per_image(boxes, img_shapes)
    # The reference rescales before NMS; IoU is invariant to per-axis scaling, so the order only
    # matters to rounding, and following it keeps detections identical.
    boxes = boxes / _rescale_divisors(boxes, scale_factors)[:, None, :]
    detections = []
    for image_boxes, image_scores in zip(boxes, scores):
        sized = _large_enough(image_boxes, min_bbox_size)
        kept_boxes, kept_scores, kept_labels = multiclass_nms(image_boxes[sized], image_scores[sized], score_thr,
                                                              nms_iou, max_per_img)
        detections.append({"boxes": kept_boxes, "scores": kept_scores, "labels": kept_labels})
    return detections


def _postprocess_pairs_per_image(
    cls_scores: list[Tensor], bbox_preds: list[Tensor], anchors: list[Tensor], coder: DeltaXYWHCoder,
    img_shape: tuple[int, int], scale_factor: tuple[float, float], *, nms_pre: int, score_thr: float,
    nms_iou: float, max_per_img: int, min_bbox_size: float,
) -> dict[str, Tensor]:
    """The ``"v3"`` rule for ONE image: per level ``(N, C)`` logits, ``(N, 4)`` deltas and anchors."""
    level_boxes, level_scores, level_labels = [], [], []
    for logits, deltas, level_anchors in zip(cls_scores, bbox_preds, anchors):
        rows, labels, scores = _top_pairs(logits.float().sigmoid(), score_thr, nms_pre)
        level_boxes.append(coder.decode(level_anchors[rows], deltas[rows]))
        level_scores.append(scores)
        level_labels.append(labels)
    boxes = _clip_per_image(torch.cat(level_boxes)[None], [img_shape])[0]
    boxes = boxes / _rescale_divisors(boxes, [scale_factor])[0]
    scores, labels = torch.cat(level_scores), torch.cat(level_labels)
    sized = _large_enough(boxes, min_bbox_size)
    kept_boxes, kept_scores, kept_labels = multiclass_nms(boxes[sized], scores[sized], score_thr, nms_iou,
                                                          max_per_img, labels=labels[sized])
    return {"boxes": kept_boxes, "scores": kept_scores, "labels": kept_labels}


def _top_pairs(scores: Tensor, score_thr: float, nms_pre: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``nms_pre`` best (anchor, class) pairs with ``score > score_thr`` of one level.

    ``scores`` ``(N, C)`` → anchor rows ``(k,)``, labels ``(k,)`` int64 and scores ``(k,)``, by
    decreasing score (ties: anchor-major, class-minor order), ``k = min(nms_pre, #above)``.
    """
    above = torch.nonzero(scores > score_thr)  # (M, 2) rows, columns in anchor-major order
    values = scores[above[:, 0], above[:, 1]]
    order = torch.sort(values, descending=True, stable=True).indices
    if nms_pre > 0:
        order = order[:nms_pre]
    return above[order, 0], above[order, 1], values[order]


def _large_enough(boxes: Tensor, min_bbox_size: float) -> Tensor:
    """Bool mask of ``(K, 4)`` boxes wider and taller than ``min_bbox_size`` (all true if it is negative)."""
    if min_bbox_size < 0:
        return torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return (boxes[:, 2] - boxes[:, 0] > min_bbox_size) & (boxes[:, 3] - boxes[:, 1] > min_bbox_size)


def _rescale_divisors(boxes: Tensor, scale_factors: list[tuple[float, float]]) -> Tensor:
    """``(B, 4)`` per-image ``(sx, sy, sx, sy)``: dividing by it returns to original-image coordinates."""
    return boxes.new_tensor([[sx, sy, sx, sy] for sx, sy in scale_factors])


def _top_candidates(scores: Tensor, deltas: Tensor, anchors: Tensor, nms_pre: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each image's ``nms_pre`` rows with the highest max-class score.

    ``scores`` ``(B, N, C)``, ``deltas`` ``(B, N, 4)``, ``anchors`` ``(N, 4)`` → the same with ``N``
    reduced to ``min(N, nms_pre)``; anchors become ``(B, k, 4)`` (or stay ``(N, 4)`` when all are kept).
    """
    if nms_pre <= 0 or scores.shape[1] <= nms_pre:
        return scores, deltas, anchors
    top = scores.max(dim=2).values.topk(nms_pre, dim=1).indices  # (B, k)
    return _gather_rows(scores, top), _gather_rows(deltas, top), anchors[top]


def _gather_rows(values: Tensor, rows: Tensor) -> Tensor:
    """``values`` ``(B, N, D)`` at ``rows`` ``(B, k)`` → ``(B, k, D)``."""
    return values.gather(1, rows[..., None].expand(-1, -1, values.shape[-1]))


def _clip_per_image(boxes: Tensor, img_shapes: list[tuple[int, int]]) -> Tensor:
    """Clamp ``(B, K, 4)`` boxes to each image's ``[0, w] × [0, h]`` (as ``decode(max_shape=...)`` does)."""
    bounds = boxes.new_tensor([[w, h, w, h] for h, w in img_shapes])[:, None, :]
    return torch.minimum(boxes.clamp(min=0), bounds)
