"""SSD = VGG16 trunk with extra layers + SSD head + criterion (training) or post-processor (inference).

SSD300 and SSD512 differ only in their extra layers and anchors (method doc §5.4, §7.2, §7.5); PISA
(ISR-P, CARL) lives entirely in the criterion, so a PISA SSD and its baseline share one state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pisa.config_schema import ConfigError
from pisa.models.anchors import SSDAnchorGenerator, ssd_anchor_sizes
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.postprocess import multiclass_nms
from pisa.models.retina_head import flatten_levels, level_anchors
from pisa.models.ssd_head import SSDHead, SSDLoss
from pisa.models.vgg import build_vgg

__all__ = ["SSD", "SSDPostProcessor", "build_ssd", "build_ssd_anchor_generator"]


class SSDPostProcessor:
    """Head outputs -> per-image detections in original-image coordinates (the reference's SSD test).

    Per image: softmax over the ``C + 1`` columns (the background column is then dropped); optionally
    the top ``nms_pre`` anchors per level by max foreground score (the v2.0 reference has none:
    ``nms_pre <= 0``); decode clipped to ``img_shape``; divide by ``scale_factor``; per-class NMS on
    ``score > score_thr`` with IoU ``nms_iou``; the best ``max_per_img``.
    """

    def __init__(self, anchor_generator: SSDAnchorGenerator, coder: DeltaXYWHCoder, *, nms_pre: int = 0,
                 score_thr: float = 0.02, nms_iou: float = 0.45, max_per_img: int = 200) -> None:
        self.anchor_generator, self.coder = anchor_generator, coder
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = nms_pre, score_thr, nms_iou, max_per_img

    def _candidates(self, scores: list[Tensor], deltas: list[Tensor], anchors: list[Tensor]):
        """One image's per-level ``(K, C)`` scores, ``(K, 4)`` deltas and anchors -> concatenated, top-k per level."""
        kept = []
        for level_scores, level_deltas, level_anchors_ in zip(scores, deltas, anchors):
            if 0 < self.nms_pre < level_scores.shape[0]:
                top = level_scores.max(dim=1).values.topk(self.nms_pre).indices
                level_scores, level_deltas, level_anchors_ = level_scores[top], level_deltas[top], level_anchors_[top]
            kept.append((level_scores, level_deltas, level_anchors_))
        return (torch.cat(parts) for parts in zip(*kept))

    def __call__(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], targets: list[dict]) -> list[dict]:
        """``cls_scores``/``bbox_preds``: per level ``(B, A_l·(C+1), H, W)`` / ``(B, A_l·4, H, W)``;
        ``targets``: per image metas (``img_shape``, ``scale_factor``)."""
        _, anchors = level_anchors(self.anchor_generator, cls_scores)
        num_cols = cls_scores[0].shape[1] // self.anchor_generator.num_anchors_per_level[0]
        # Softmax over all C + 1 columns, then drop the background (last) column.
        probs = [flatten_levels([s], num_cols).float().softmax(-1)[..., :-1] for s in cls_scores]
        deltas = [flatten_levels([d], 4).float() for d in bbox_preds]
        detections = []
        for i, meta in enumerate(targets):
            scores, image_deltas, image_anchors = self._candidates([p[i] for p in probs], [d[i] for d in deltas],
                                                                   anchors)
            boxes = self.coder.decode(image_anchors, image_deltas, max_shape=tuple(meta["img_shape"][:2]))
            sx, sy = meta["scale_factor"]
            boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
            kept_boxes, kept_scores, kept_labels = multiclass_nms(boxes, scores, self.score_thr, self.nms_iou,
                                                                  self.max_per_img)
            detections.append({"boxes": kept_boxes, "scores": kept_scores, "labels": kept_labels})
        return detections


class SSD(nn.Module):
    """Single-shot detector of Liu et al. (2016); PISA lives entirely in the criterion.

    ``forward(images (B, 3, H, W), targets: list[dict])``: in train mode the criterion's loss dict
    (``loss_cls``, ``loss_bbox``[, ``loss_carl``]); in eval mode one dict per image with ``boxes``
    ``(D, 4)`` in original-image coordinates, ``scores`` ``(D,)`` and ``labels`` ``(D,)`` int64. Eval
    reads only the metas ``img_shape`` and ``scale_factor`` of each target.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, criterion: nn.Module,
                 postprocessor: SSDPostProcessor) -> None:
        super().__init__()
        self.backbone, self.head, self.criterion = backbone, head, criterion
        self.postprocessor = postprocessor

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor] | list[dict]:
        features = self.backbone(images)  # conv4_3 (L2-normalised), conv7, extra taps
        cls_scores, bbox_preds = self.head(features)
        if self.training:
            return self.criterion(cls_scores, bbox_preds, targets)
        return self.postprocessor(cls_scores, bbox_preds, targets)


def build_ssd_anchor_generator(model_cfg: dict) -> SSDAnchorGenerator:
    """``SSDAnchorGenerator`` from ``model.anchors`` and ``model.input_size`` (sizes as in method doc §7.2)."""
    a = model_cfg["anchors"]
    if len(a["ratios"]) != len(a["strides"]):
        raise ValueError(f"model.anchors: {len(a['strides'])} strides but {len(a['ratios'])} ratio lists; "
                         "give one list of extra ratios per level")
    min_sizes, max_sizes = ssd_anchor_sizes(model_cfg["input_size"], tuple(a["ratio_range"]), len(a["strides"]))
    return SSDAnchorGenerator(a["strides"], a["ratios"], min_sizes, max_sizes)


def build_ssd(cfg: dict) -> SSD:
    """SSD from ``cfg["model"]`` (see configs/ssd/ssd300_coco.yaml) and ``cfg["pisa"]``."""
    from pisa.models import _pisa_settings  # the one reader of the pisa: block (deferred: pisa.models imports us)

    if cfg.get("sampling_free"):
        raise ConfigError("config key 'sampling_free' is for model.type retinanet, faster_rcnn and mask_rcnn; "
                          "remove it for SSD (--set sampling_free=null)")
    m = cfg["model"]
    num_classes = m["num_classes"]
    backbone = build_vgg(m["backbone"], m["input_size"])
    anchor_generator = build_ssd_anchor_generator(m)
    head = SSDHead(num_classes, backbone.out_channels, anchor_generator.num_anchors_per_level)
    coder = DeltaXYWHCoder(m["coder"]["means"], m["coder"]["stds"])
    isr_settings, carl_settings = _pisa_settings(cfg.get("pisa"))
    bbox_cfg = m["loss_bbox"]
    criterion = SSDLoss(num_classes, anchor_generator, coder, MaxIoUAssigner(**m["assigner"]),
                        neg_pos_ratio=m["loss_cls"]["neg_pos_ratio"], bbox_beta=bbox_cfg["beta"],
                        bbox_weight=bbox_cfg["weight"], isr_p=isr_settings, carl=carl_settings)
    t = m["test"]
    postprocessor = SSDPostProcessor(anchor_generator, coder, nms_pre=t["nms_pre"], score_thr=t["score_thr"],
                                     nms_iou=t["nms_iou"], max_per_img=t["max_per_img"])
    return SSD(backbone, head, criterion, postprocessor)
