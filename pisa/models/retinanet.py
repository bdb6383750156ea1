"""RetinaNet = backbone + FPN + dense head + criterion (training) or post-processor (inference)."""

from __future__ import annotations

from torch import Tensor, nn

from pisa.models.postprocess import TOPK_RULES, dense_postprocess_batch
from pisa.models.retina_head import flatten_levels, level_anchors

__all__ = ["RetinaNet", "RetinaNetPostProcessor"]


class RetinaNetPostProcessor:
    """Turns head outputs into per-image detections in original-image coordinates.

    Per image and level: the top ``nms_pre`` candidates, decoded and clipped to the image's
    ``img_shape``; then rescaling by ``1 / scale_factor``, dropping zero-size boxes and multi-class NMS
    (see ``pisa.models.postprocess.dense_postprocess_batch``). ``topk_rule`` picks the candidates:
    ``"v2"`` (default, the rule the published checkpoints were scored with) the top anchors by max
    sigmoid score, ``"v3"`` the top (anchor, class) pairs above ``score_thr`` (mmdetection 3.x).
    ``min_bbox_size`` (default 0) drops boxes not wider and taller than it; negative keeps all.
    """

    def __init__(self, anchor_generator, coder, *, nms_pre: int = 1000, score_thr: float = 0.05,
                 nms_iou: float = 0.5, max_per_img: int = 100, topk_rule: str = "v2",
                 min_bbox_size: float = 0.0) -> None:
        if topk_rule not in TOPK_RULES:
            raise ValueError(f"model.test.topk_rule: unknown rule {topk_rule!r}; valid rules: {list(TOPK_RULES)}")
        self.anchor_generator, self.coder = anchor_generator, coder
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = nms_pre, score_thr, nms_iou, max_per_img
        self.topk_rule, self.min_bbox_size = topk_rule, min_bbox_size

    def __call__(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], targets: list[dict]) -> list[dict]:
        """``cls_scores``/``bbox_preds``: per level ``(B, A*C, H, W)`` / ``(B, A*4, H, W)``; ``targets``: metas."""
        _, anchors_per_level = level_anchors(self.anchor_generator, cls_scores)
        num_classes = cls_scores[0].shape[1] // self.anchor_generator.num_anchors
        # (B, A*K, H, W) -> (B, H*W*A, K): location-major, anchor inner, matching the anchors.
        scores = [flatten_levels([s], num_classes) for s in cls_scores]
        deltas = [flatten_levels([d], 4) for d in bbox_preds]
        return dense_postprocess_batch(scores, deltas, anchors_per_level, self.coder,
                                       [meta["img_shape"] for meta in targets],
                                       [meta["scale_factor"] for meta in targets], nms_pre=self.nms_pre,
                                       score_thr=self.score_thr, nms_iou=self.nms_iou, max_per_img=self.max_per_img,
                                       topk_rule=self.topk_rule, min_bbox_size=self.min_bbox_size)


class RetinaNet(nn.Module):
    """Single-stage detector of Lin et al. (2017); PISA lives entirely in the criterion.

    ``forward(images (B, 3, H, W), targets: list[dict])``: in train mode the criterion's loss dict
    (``loss_cls``, ``loss_bbox``[, ``loss_carl``]); in eval mode one dict per image with ``boxes``
    ``(D, 4)`` in original-image coordinates, ``scores`` ``(D,)`` and ``labels`` ``(D,)`` int64. Eval
    reads only the metas ``img_shape`` and ``scale_factor`` of each target.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module, criterion: nn.Module,
                 postprocessor: RetinaNetPostProcessor) -> None:
        super().__init__()
        self.backbone, self.neck, self.head, self.criterion = backbone, neck, head, criterion
        self.postprocessor = postprocessor

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor] | list[dict]:
        features = self.neck(self.backbone(images))  # P3..P7
        cls_scores, bbox_preds = self.head(features)
        if self.training:
            return self.criterion(cls_scores, bbox_preds, targets)
        return self.postprocessor(cls_scores, bbox_preds, targets)
