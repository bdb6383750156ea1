"""PAA detector: backbone + FPN (extra convs on the P5 output) + PAA head + criterion or post-processor.

Inference (method doc §8.1): score ``√(σ(cls)·σ(iou))``; per level the top ``nms_pre`` anchors by max
score, decoded and clipped; back to original-image coordinates; per-class NMS (0.6) on
``score > score_thr``; the best ``max_per_img``; then optional score voting (``model.test.score_voting``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pisa.config_schema import ConfigError
from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.backbones import build_backbone
from pisa.models.box_coder import DeltaXYWHCoder, box_iou
from pisa.models.fpn import RetinaFPN
from pisa.models.paa_head import PAAHead, PAALoss, PAASettings
from pisa.models.postprocess import multiclass_nms
from pisa.models.retina_head import ISRPSettings, flatten_levels, level_anchors

__all__ = ["PAA", "PAAFPN", "PAAPostProcessor", "score_voting", "build_paa"]


class PAAFPN(RetinaFPN):
    """:class:`RetinaFPN` with ``P6 = conv3x3/s2(P5)`` (the reference's ``add_extra_convs='on_output'``).

    ``P7 = conv3x3/s2(P6)`` with no ReLU between, as in RetinaNet. Module names are RetinaFPN's, so the
    mmdetection key mapping is the same; only ``p6_conv``'s input width (``out_channels``) differs.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__(in_channels, out_channels)
        self.p6_conv = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.reset_parameters()

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"PAAFPN expects {len(self.lateral_convs)} input maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down, upsampled to the finer map's exact size
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(lat) for conv, lat in zip(self.output_convs, laterals)]  # P3..P5
        p6 = self.p6_conv(outs[-1])
        return outs + [p6, self.p7_conv(p6)]


def score_voting(det_boxes: Tensor, det_labels: Tensor, cand_boxes: Tensor, cand_scores: Tensor,
                 score_thr: float, sigma: float = 0.025, iou_thr: float = 0.01) -> Tensor:
    """PAA's score voting: each kept box becomes a weighted mean of same-class candidate boxes.

    Args:
        det_boxes: ``(D, 4)`` boxes kept by NMS; det_labels: int64 ``(D,)``.
        cand_boxes: ``(N, 4)`` pre-NMS boxes (same coordinates as ``det_boxes``).
        cand_scores: ``(N, C)`` their per-class scores; (box, class) pairs with ``score > score_thr``
            are the candidates.
        sigma, iou_thr: candidates need ``IoU > iou_thr``; weight ``p = exp(−(1 − IoU)²/sigma)·score``.

    Returns:
        ``(D, 4)`` voted boxes ``Σ p_i b_i / Σ p_i`` in the detections' order (the reference
        regroups them by class; the scores are unchanged either way). One matrix product, no loop.
    """
    box_ids, classes = torch.nonzero(cand_scores > score_thr, as_tuple=True)
    boxes, scores = cand_boxes[box_ids].float(), cand_scores[box_ids, classes].float()
    ious = box_iou(det_boxes.float(), boxes)  # (D, M)
    near = (det_labels[:, None] == classes[None, :]) & (ious > iou_thr)
    weights = torch.exp(-(1 - ious) ** 2 / sigma) * scores[None, :] * near
    total = weights.sum(1, keepdim=True)
    voted = weights @ boxes / total.clamp(min=1e-12)
    # A detection is its own candidate (IoU 1), so total > 0; keep the box should rounding say otherwise.
    return torch.where(total > 0, voted, det_boxes.float())


class PAAPostProcessor:
    """Head outputs -> per-image detections ``{boxes, scores, labels}`` in original-image coordinates."""

    def __init__(self, anchor_generator, coder, *, nms_pre: int = 1000, score_thr: float = 0.05,
                 nms_iou: float = 0.6, max_per_img: int = 100, score_voting: bool = True) -> None:
        self.anchor_generator, self.coder = anchor_generator, coder
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = nms_pre, score_thr, nms_iou, max_per_img
        self.score_voting = score_voting

    def __call__(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], iou_preds: list[Tensor],
                 targets: list[dict]) -> list[dict]:
        _, anchors_per_level = level_anchors(self.anchor_generator, cls_scores)
        num_classes = cls_scores[0].shape[1]
        level_boxes, level_scores = [], []
        for cls, box, iou, anchors in zip(cls_scores, bbox_preds, iou_preds, anchors_per_level):
            scores = (flatten_levels([cls], num_classes).float().sigmoid()
                      * flatten_levels([iou], 1).float().sigmoid()).sqrt()  # (B, N, C)
            deltas = flatten_levels([box], 4).float()
            scores, deltas, anchors = self._top(scores, deltas, anchors)
            level_boxes.append(self.coder.decode(anchors, deltas))
            level_scores.append(scores)
        boxes, scores = torch.cat(level_boxes, 1), torch.cat(level_scores, 1)
        return [self._per_image(b, s, meta) for b, s, meta in zip(boxes, scores, targets)]

    def _top(self, scores: Tensor, deltas: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep each image's ``nms_pre`` anchors of highest max-class score; anchors become ``(B, k, 4)``."""
        batch, count = scores.shape[:2]
        if self.nms_pre <= 0 or count <= self.nms_pre:
            return scores, deltas, anchors.expand(batch, -1, -1)
        top = scores.max(2).values.topk(self.nms_pre, dim=1).indices
        gather = lambda v: v.gather(1, top[..., None].expand(-1, -1, v.shape[-1]))  # noqa: E731
        return gather(scores), gather(deltas), anchors[top]

    def _per_image(self, boxes: Tensor, scores: Tensor, meta: dict) -> dict[str, Tensor]:
        h, w = meta["img_shape"]
        sx, sy = meta["scale_factor"]
        boxes = torch.minimum(boxes.clamp(min=0), boxes.new_tensor([w, h, w, h]))
        boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
        kept_boxes, kept_scores, kept_labels = multiclass_nms(boxes, scores, self.score_thr, self.nms_iou,
                                                              self.max_per_img)
        if self.score_voting and kept_boxes.shape[0] > 0:
            kept_boxes = score_voting(kept_boxes, kept_labels, boxes, scores, self.score_thr)
        return {"boxes": kept_boxes, "scores": kept_scores, "labels": kept_labels}


class PAA(nn.Module):
    """Probabilistic Anchor Assignment detector (Kim & Lee, 2020).

    ``forward(images (B, 3, H, W), targets)``: train mode returns ``{loss_cls, loss_bbox, loss_iou}``
    (:class:`pisa.models.paa_head.PAALoss`); eval mode one ``{boxes, scores, labels}`` dict per image,
    reading only the metas ``img_shape`` and ``scale_factor``.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module, criterion: nn.Module,
                 postprocessor: PAAPostProcessor) -> None:
        super().__init__()
        self.backbone, self.neck, self.head, self.criterion = backbone, neck, head, criterion
        self.postprocessor = postprocessor

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor] | list[dict]:
        features = self.neck(self.backbone(images))  # P3..P7
        cls_scores, bbox_preds, iou_preds = self.head(features)
        if self.training:
            return self.criterion(cls_scores, bbox_preds, iou_preds, targets)
        return self.postprocessor(cls_scores, bbox_preds, iou_preds, targets)


def _pisa_for_paa(cfg: dict):
    """ISR-P settings for PAA, or None; ``pisa:`` on PAA needs ``model.allow_pisa`` (experimental)."""
    pisa_cfg = cfg.get("pisa")
    if not pisa_cfg or (pisa_cfg.get("isr_p") is None and pisa_cfg.get("carl") is None):
        return None
    if not cfg["model"].get("allow_pisa"):
        raise ConfigError("config keys 'pisa' and 'model.type: paa': PAA with ISR-P/CARL is not a published "
                          "combination; remove the 'pisa' block (--set pisa=null), or set "
                          "'model.allow_pisa: true' to try ISR-P on PAA's positives (experimental)")
    if pisa_cfg.get("carl") is not None:
        raise ConfigError("config key 'pisa.carl' cannot be used with 'model.type: paa': CARL weights a "
                          "delta regression loss and PAA regresses decoded boxes with GIoU (method doc §6, "
                          "D10); remove 'pisa.carl' (--set pisa.carl=null)")
    isr, compat = pisa_cfg["isr_p"], pisa_cfg.get("compat") or {}
    return ISRPSettings(k=isr["k"], bias=isr["bias"], legacy_gt_offset=compat.get("legacy_gt_offset", False),
                        legacy_float_keys=compat.get("legacy_float_keys", False))


def build_paa(cfg: dict) -> PAA:
    """PAA from ``cfg["model"]`` (``type: paa``; see configs/paa/paa_r50_fpn_1x_coco.yaml)."""
    if cfg.get("sampling_free"):
        raise ConfigError("config key 'sampling_free' is for model.type retinanet, faster_rcnn and mask_rcnn; "
                          "remove it for PAA (--set sampling_free=null)")
    m = cfg["model"]
    backbone = build_backbone(m["backbone"], out_levels=(3, 4, 5))
    neck = PAAFPN(backbone.out_channels, m["neck"]["out_channels"])
    a = m["anchors"]
    anchor_generator = AnchorGenerator(a["strides"], a["ratios"], octave_base_scale=a["octave_base_scale"],
                                       scales_per_octave=a["scales_per_octave"])
    if anchor_generator.num_anchors != 1:
        raise ConfigError(f"model.anchors: PAA's head predicts one anchor per location, but ratios "
                          f"{a['ratios']} x scales_per_octave {a['scales_per_octave']} give "
                          f"{anchor_generator.num_anchors}; use one ratio and scales_per_octave: 1")
    h = m["head"]
    head = PAAHead(m["num_classes"], neck.out_channels, feat_channels=h["feat_channels"],
                   stacked_convs=h["stacked_convs"], num_levels=len(a["strides"]), norm_groups=h["norm_groups"],
                   prior_prob=h["prior_prob"])
    coder = DeltaXYWHCoder(m["coder"]["means"], m["coder"]["stds"])
    p = m["paa"]
    criterion = PAALoss(m["num_classes"], anchor_generator, coder, MaxIoUAssigner(**m["assigner"]),
                        focal_alpha=m["loss_cls"]["alpha"], focal_gamma=m["loss_cls"]["gamma"],
                        cls_weight=m["loss_cls"]["weight"], giou_weight=m["loss_bbox"]["weight"],
                        iou_weight=m["loss_iou"]["weight"],
                        paa=PAASettings(p["topk"], p["tol"], p["max_iter"], p["reg_covar"]),
                        isr_p=_pisa_for_paa(cfg), pad_divisor=cfg.get("data", {}).get("pad_divisor", 32))
    t = m["test"]
    postprocessor = PAAPostProcessor(anchor_generator, coder, nms_pre=t["nms_pre"], score_thr=t["score_thr"],
                                     nms_iou=t["nms_iou"], max_per_img=t["max_per_img"],
                                     score_voting=t["score_voting"])
    return PAA(backbone, neck, head, criterion, postprocessor)
