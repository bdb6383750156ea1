"""Model builders: ``build_model(cfg)`` reads the validated config and returns an ``nn.Module``.

One explicit dict per kind (``MODELS`` here, ``BACKBONES`` in ``backbones.py``); an unknown name is an
error listing the valid names.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.backbones import BACKBONES, build_backbone
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.fpn import RetinaFPN
from pisa.models.retina_head import CARLSettings, ISRPSettings, RetinaHead, RetinaNetLoss
from pisa.models.retinanet import RetinaNet, RetinaNetPostProcessor
from pisa.models.two_stage import build_faster_rcnn, build_mask_rcnn
from pisa.models.paa import build_paa
from pisa.models.sampling_free import sampling_free_parts
from pisa.models.ssd import build_ssd

__all__ = ["build_model", "build_retinanet", "MODELS", "BACKBONES"]


def _pisa_settings(pisa_cfg: dict | None) -> tuple[ISRPSettings | None, CARLSettings | None]:
    """The ``pisa:`` block: each present sub-block enables its feature; absent block = baseline."""
    if not pisa_cfg:
        return None, None
    compat = pisa_cfg.get("compat") or {}
    isr = pisa_cfg.get("isr_p")
    carl = pisa_cfg.get("carl")
    isr_settings = None if isr is None else ISRPSettings(
        k=isr["k"], bias=isr["bias"], legacy_gt_offset=compat.get("legacy_gt_offset", False),
        legacy_float_keys=compat.get("legacy_float_keys", False))
    carl_settings = None if carl is None else CARLSettings(k=carl["k"], bias=carl["bias"])
    return isr_settings, carl_settings


def build_retinanet(cfg: dict) -> RetinaNet:
    """RetinaNet from ``cfg["model"]`` (see configs/_base_/retinanet_r50_fpn_1x_coco.yaml) and ``cfg["pisa"]``."""
    m = cfg["model"]
    num_classes = m["num_classes"]
    backbone = build_backbone(m["backbone"], out_levels=(3, 4, 5))
    neck = RetinaFPN(backbone.out_channels, m["neck"]["out_channels"])
    a = m["anchors"]
    anchor_generator = AnchorGenerator(a["strides"], a["ratios"], octave_base_scale=a["octave_base_scale"],
                                       scales_per_octave=a["scales_per_octave"])
    h = m["head"]
    head = RetinaHead(num_classes, neck.out_channels, feat_channels=h["feat_channels"],
                      stacked_convs=h["stacked_convs"], num_anchors=anchor_generator.num_anchors,
                      prior_prob=h["prior_prob"])
    coder = DeltaXYWHCoder(m["coder"]["means"], m["coder"]["stds"])
    isr_settings, carl_settings = _pisa_settings(cfg.get("pisa"))
    cls_cfg, bbox_cfg = m["loss_cls"], m["loss_bbox"]
    criterion = RetinaNetLoss(
        num_classes, anchor_generator, coder, MaxIoUAssigner(**m["assigner"]),
        focal_alpha=cls_cfg["alpha"], focal_gamma=cls_cfg["gamma"], cls_weight=cls_cfg["weight"],
        bbox_loss=bbox_cfg["type"], bbox_beta=bbox_cfg.get("beta", 0.11), bbox_weight=bbox_cfg["weight"],
        isr_p=isr_settings, carl=carl_settings, pad_divisor=cfg.get("data", {}).get("pad_divisor", 32))
    t = m["test"]
    postprocessor = RetinaNetPostProcessor(anchor_generator, coder, nms_pre=t["nms_pre"], score_thr=t["score_thr"],
                                           nms_iou=t["nms_iou"], max_per_img=t["max_per_img"],
                                           topk_rule=t.get("topk_rule", "v2"),
                                           min_bbox_size=t.get("min_bbox_size", 0.0))
    if cfg.get("sampling_free"):  # replaces the focal criterion and the test thresholds (method doc §8.2)
        criterion, postprocessor = sampling_free_parts(cfg, head, criterion, postprocessor)
    return RetinaNet(backbone, neck, head, criterion, postprocessor)


MODELS: dict[str, Callable[[dict], nn.Module]] = {"retinanet": build_retinanet, "ssd": build_ssd,
                                                  "paa": build_paa,
                                                  "faster_rcnn": build_faster_rcnn, "mask_rcnn": build_mask_rcnn}


def build_model(cfg: dict) -> nn.Module:
    """Build the detector named by ``cfg["model"]["type"]`` from the whole (validated) config."""
    name = cfg["model"]["type"]
    if name not in MODELS:
        raise ValueError(f"model.type: unknown model {name!r}; valid names: {sorted(MODELS)}")
    return MODELS[name](cfg)
