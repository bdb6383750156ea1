"""Two-stage detectors: Faster R-CNN and Mask R-CNN (backbone, FPN P2-P6, RPN, RoI head), with PISA
or Sampling-Free.

PISA is configuration: the ``pisa:`` block turns on ISR-N (``isr_n``: the Score-HLR sampler replaces the
random RoI sampler), ISR-P (``isr_p``) and CARL (``carl``) in the RoI head; the RPN is never changed.
The ``sampling_free:`` block (method doc §8.2, :mod:`pisa.models.sampling_free`) instead trains the RPN
and the RoI head on every anchor / proposal with guided loss scaling, sets the RPN objectness bias from
``π`` and the R-CNN test threshold to ``sampling_free.rcnn_score_thr``. The two blocks are exclusive.
A PISA or Sampling-Free model and its baseline have the same state dict.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.backbones import build_backbone
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.fpn import RCNNFPN
from pisa.models.mask_head import MaskHead
from pisa.models.retina_head import CARLSettings, ISRPSettings
from pisa.models.roi_align import MultiScaleRoIAlign
from pisa.models.roi_heads import BBoxHead, RCNNTestSettings, RoIHead
from pisa.models.rpn import RPN, ProposalSettings, RPNHead
from pisa.models.samplers import PseudoSampler, RandomSampler, ScoreHLRSampler
from pisa.models.sampling_free import (SamplingFreeRoIHead, SamplingFreeRPN, TwoStageSamplingFree, prior_bias,
                                       two_stage_sampling_free)

__all__ = ["TwoStageDetector", "build_faster_rcnn", "build_mask_rcnn"]


class TwoStageDetector(nn.Module):
    """Faster R-CNN (Ren et al. 2015) with an FPN; Mask R-CNN (He et al. 2017) when the RoI head has masks.

    ``forward(images (B, 3, H, W), targets: list[dict])``: in train mode the dict of losses
    (``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``, ``loss_bbox``[, ``loss_carl``][, ``loss_mask``]);
    in eval mode one dict per image with ``boxes`` ``(D, 4)`` in original-image pixels, ``scores``
    ``(D,)``, ``labels`` ``(D,)`` int64 (+ ``masks`` ``(D, H0, W0)`` bool). Eval reads only the metas
    ``img_shape``, ``scale_factor`` (and ``ori_shape`` for masks) of each target.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, rpn: nn.Module, roi_head: RoIHead) -> None:
        super().__init__()
        self.backbone, self.neck, self.rpn, self.roi_head = backbone, neck, rpn, roi_head

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor] | list[dict]:
        features = self.neck(self.backbone(images))  # P2..P6
        proposals, rpn_losses = self.rpn(features, targets)  # detached boxes per image, by score
        outputs = self.roi_head(features, proposals, targets)  # RoIAlign reads P2..P5
        if self.training:
            return {**rpn_losses, **outputs}
        return outputs


# ---- builders ----------------------------------------------------------------------------------

def _coder(cfg: dict) -> DeltaXYWHCoder:
    return DeltaXYWHCoder(cfg["means"], cfg["stds"])


def _proposal_settings(cfg: dict) -> ProposalSettings:
    return ProposalSettings(nms_pre=cfg["nms_pre"], max_per_img=cfg["max_per_img"], nms_iou=cfg["nms_iou"])


def build_rpn(cfg: dict, in_channels: int, pad_divisor: int = 32,
              sampling_free: TwoStageSamplingFree | None = None) -> RPN:
    """The RPN from ``model.rpn`` (anchors on P2-P6, max-IoU 0.7/0.3, 256 random samples per image).

    With ``sampling_free``: a :class:`SamplingFreeRPN` (every non-ignored anchor, guided scaling), its
    objectness bias ``−log((1 − π)/π)`` and ``rpn_proposals_per_image`` training proposals per image.
    """
    a = cfg["anchors"]
    anchor_generator = AnchorGenerator(a["strides"], a["ratios"], scales=a["scales"])
    head = RPNHead(in_channels, cfg["feat_channels"], anchor_generator.num_anchors)
    assigner = MaxIoUAssigner(**cfg["assigner"])
    rpn_class, sampler = RPN, RandomSampler(cfg["sampler"]["num"], cfg["sampler"]["pos_fraction"])
    train = _proposal_settings(cfg["train"])
    if sampling_free is not None:
        rpn_class, sampler = SamplingFreeRPN, PseudoSampler()
        train = dataclasses.replace(train, max_per_img=sampling_free.rpn_proposals_per_image)
        with torch.no_grad():
            head.rpn_cls.bias.fill_(prior_bias(sampling_free.pi))
    box = cfg["loss_bbox"]
    return rpn_class(head, anchor_generator, _coder(cfg["coder"]), assigner, sampler,
                     train_proposals=train, test_proposals=_proposal_settings(cfg["test"]),
                     cls_weight=cfg["loss_cls"]["weight"], bbox_loss=box["type"], bbox_beta=box["beta"],
                     bbox_weight=box["weight"], pad_divisor=pad_divisor)


def _pisa_parts(pisa_cfg: dict | None) -> tuple[dict | None, ISRPSettings | None, CARLSettings | None]:
    """The ``pisa:`` block: ``isr_n`` settings (or None), ISR-P and CARL settings (or None each)."""
    if not pisa_cfg:
        return None, None, None
    compat = pisa_cfg.get("compat") or {}
    isr, carl = pisa_cfg.get("isr_p"), pisa_cfg.get("carl")
    isr_settings = None if isr is None else ISRPSettings(
        k=isr["k"], bias=isr["bias"], legacy_gt_offset=compat.get("legacy_gt_offset", False),
        legacy_float_keys=compat.get("legacy_float_keys", False))
    carl_settings = None if carl is None else CARLSettings(k=carl["k"], bias=carl["bias"])
    return pisa_cfg.get("isr_n"), isr_settings, carl_settings


def _roi_sampler(cfg: dict, isr_n: dict | None, num_classes: int, coder: DeltaXYWHCoder, compat: dict,
                 sampling_free: bool = False) -> RandomSampler | ScoreHLRSampler | PseudoSampler:
    """``model.roi_head.sampler``: random (baseline), Score-HLR when ``pisa.isr_n`` is given, every
    proposal (pseudo) under Sampling-Free."""
    s = cfg["sampler"]
    if sampling_free:
        return PseudoSampler()
    if isr_n is None:
        return RandomSampler(s["num"], s["pos_fraction"], s["neg_pos_ub"])
    return ScoreHLRSampler(s["num"], s["pos_fraction"], s["neg_pos_ub"], num_classes=num_classes, coder=coder,
                           k=isr_n["k"], bias=isr_n["bias"], score_thr=isr_n["score_thr"],
                           iou_thr=isr_n["iou_thr"], cls_loss_weight=cfg["loss_cls"]["weight"],
                           legacy_float_keys=compat.get("legacy_float_keys", False))


def build_roi_head(cfg: dict, pisa_cfg: dict | None, num_classes: int, in_channels: int,
                   strides: list[int], pad_divisor: int = 32,
                   sampling_free: TwoStageSamplingFree | None = None) -> RoIHead:
    """The RoI head from ``model.roi_head`` (+ ``mask`` for Mask R-CNN) and the ``pisa:`` block.

    With ``sampling_free``: a :class:`SamplingFreeRoIHead` on every proposal (``model.roi_head.sampler``'s
    ``num`` and ``pos_fraction`` unused, ``add_gt`` kept) and test score threshold ``rcnn_score_thr``.
    """
    isr_n, isr_settings, carl_settings = _pisa_parts(pisa_cfg)
    coder = _coder(cfg["coder"])
    pool_strides = strides[:4]  # P2..P5
    bbox_pool = MultiScaleRoIAlign(cfg["roi_size"], pool_strides, cfg["sampling_ratio"], cfg["finest_scale"])
    bbox_head = BBoxHead(in_channels, num_classes, cfg["roi_size"], cfg["fc_channels"])
    sampler = _roi_sampler(cfg, isr_n, num_classes, coder, (pisa_cfg or {}).get("compat") or {},
                           sampling_free is not None)
    box, t = cfg["loss_bbox"], cfg["test"]
    score_thr = t["score_thr"] if sampling_free is None else sampling_free.rcnn_score_thr
    test = RCNNTestSettings(score_thr, t["nms_iou"], t["max_per_img"], t.get("mask_thr", 0.5))
    mask_pool = mask_head = None
    mask_weight = 1.0
    if cfg.get("mask") is not None:
        m = cfg["mask"]
        mask_pool = MultiScaleRoIAlign(m["roi_size"], pool_strides, cfg["sampling_ratio"], cfg["finest_scale"])
        mask_head = MaskHead(in_channels, m["conv_channels"], m["num_convs"], num_classes)
        mask_weight = m["loss_weight"]
    head_class = RoIHead if sampling_free is None else SamplingFreeRoIHead
    return head_class(bbox_pool, bbox_head, coder, MaxIoUAssigner(**cfg["assigner"]), sampler,
                      num_classes=num_classes, add_gt_as_proposals=cfg["sampler"]["add_gt"],
                      cls_weight=cfg["loss_cls"]["weight"], bbox_loss=box["type"], bbox_beta=box["beta"],
                      bbox_weight=box["weight"], isr_p=isr_settings, carl=carl_settings, test=test,
                      mask_roi_pool=mask_pool, mask_head=mask_head, mask_weight=mask_weight,
                      pad_divisor=pad_divisor)


def _build_two_stage(cfg: dict) -> TwoStageDetector:
    m = cfg["model"]
    backbone = build_backbone(m["backbone"], out_levels=(2, 3, 4, 5))
    neck = RCNNFPN(backbone.out_channels, m["neck"]["out_channels"])
    pad_divisor = cfg.get("data", {}).get("pad_divisor", 32)
    sampling_free = two_stage_sampling_free(cfg)  # None without the block; errors on pisa + sampling_free
    rpn = build_rpn(m["rpn"], neck.out_channels, pad_divisor, sampling_free)
    roi_head = build_roi_head(m["roi_head"], cfg.get("pisa"), m["num_classes"], neck.out_channels,
                              m["rpn"]["anchors"]["strides"], pad_divisor, sampling_free)
    return TwoStageDetector(backbone, neck, rpn, roi_head)


def build_faster_rcnn(cfg: dict) -> TwoStageDetector:
    """Faster R-CNN from ``cfg["model"]`` (see configs/_base_/faster_rcnn_r50_fpn_1x_coco.yaml), ``cfg["pisa"]``
    and ``cfg["sampling_free"]``."""
    return _build_two_stage(cfg)


def build_mask_rcnn(cfg: dict) -> TwoStageDetector:
    """Mask R-CNN from ``cfg["model"]`` (see configs/_base_/mask_rcnn_r50_fpn_1x_coco.yaml), ``cfg["pisa"]``
    and ``cfg["sampling_free"]``."""
    return _build_two_stage(cfg)
