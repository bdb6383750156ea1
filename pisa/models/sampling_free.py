"""Sampling-Free (Chen et al., "Is Sampling Heuristics Necessary in Training Deep Object Detectors?";
method doc §8.2, following the authors' code): no focal loss, no sampler, three changes.

1. **Optimal bias initialisation.** ``π = (#fg / (#fg + #bg)) / C`` over the training set's anchor
   matching (the head's matcher, low-quality matches on, anchors between the thresholds excluded);
   the classifier bias is ``−log((1 − π)/π)``. :func:`foreground_prior` computes ``π`` (printed by
   ``python scripts/sampling_free_bias.py CONFIG``); configs carry the value as ``sampling_free.pi``
   (null: the authors' cached COCO values, 1e-5 for RetinaNet R50/R101 with C = 80, 2e-4 for the RPN
   of Faster / Mask R-CNN with C = 1). The softmax R-CNN head is left at its usual init.
2. **Guided loss scaling** ``L_cls ← L_cls · stopgrad(L_reg / L_cls)`` (:func:`guided_loss_scaling`):
   the classification gradient keeps its direction and takes the regression loss's magnitude, so the
   classification normaliser cancels.

   * RetinaNet (:class:`SamplingFreeRetinaLoss`): plain sigmoid BCE over all anchors × classes,
     anchors between the thresholds counted as negatives, / ``#pos + #images``; SmoothL1 (β 0.11)
     summed over the positives / ``max(1, 4·#pos)``.
   * RPN (:class:`SamplingFreeRPN`): sigmoid BCE over every non-ignored anchor (no 256 sampler);
     SmoothL1 (β 1/9) mean over the positives' coordinates × 0.5.
   * R-CNN (:class:`SamplingFreeRoIHead`): softmax CE over every proposal (no 512 sampler), mean;
     SmoothL1 (β 1) mean over the positives' coordinates; the guided ``loss_cls`` is doubled.
3. **Adaptive test threshold**: RetinaNet score ``> π·(C + 1)`` (8.1e-4 on COCO) and NMS at 0.55;
   R-CNN a fixed score threshold of 1e-4.

Two-stage training also keeps ``sampling_free.rpn_proposals_per_batch`` RPN proposals per device batch
(the authors' 16000 / #GPUs), split evenly over the ``data.batch_size`` images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pisa.config_schema import ConfigError
from pisa.losses import smooth_l1_loss, softmax_cross_entropy
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.retina_head import RetinaNetLoss, flatten_levels, level_anchors
from pisa.models.retinanet import RetinaNetPostProcessor
from pisa.models.roi_heads import RoIHead, RoITargets
from pisa.models.rpn import RPN
from pisa.models.samplers import PseudoSampler

__all__ = ["SamplingFreeRetinaLoss", "SamplingFreeRPN", "SamplingFreeRoIHead", "TwoStageSamplingFree",
           "guided_loss_scaling", "prior_bias", "foreground_prior", "PriorCount", "sampling_free_parts",
           "two_stage_sampling_free", "resolve_pi", "prior_matcher"]

# The authors' regression normaliser: the SmoothL1 sum is divided by 4 (coordinates) per positive.
REG_NORM = 4.0
# The authors' cached COCO priors (used when sampling_free.pi is null).
CACHED_PI = {"retinanet": 1e-5, "faster_rcnn": 2e-4, "mask_rcnn": 2e-4}
# The R-CNN head's guided classification loss is doubled (the authors' box-head loss).
RCNN_CLS_SCALE = 2.0


def resolve_pi(cfg: dict) -> float:
    """``sampling_free.pi``, or the cached value of ``model.type`` when it is null."""
    pi = cfg["sampling_free"].get("pi")
    return CACHED_PI[cfg["model"]["type"]] if pi is None else pi


def prior_bias(pi: float) -> float:
    """Classifier bias whose sigmoid is ``π``: ``−log((1 − π)/π)`` (−11.5129 for 1e-5)."""
    return -math.log((1 - pi) / pi)


def guided_loss_scaling(loss_cls: Tensor, loss_reg: Tensor) -> Tensor:
    """``loss_cls · stopgrad(loss_reg / loss_cls)``: the value of ``loss_reg``, the gradient direction of
    ``loss_cls``. A zero ``loss_cls`` gives 0 (no NaN); no positive (``loss_reg = 0``) gives a
    classification loss of 0, as in the authors' code."""
    with torch.no_grad():
        ratio = torch.where(loss_cls > 0, loss_reg / loss_cls.clamp(min=torch.finfo(loss_cls.dtype).tiny),
                            torch.zeros_like(loss_cls))
    return loss_cls * ratio


class SamplingFreeRetinaLoss(RetinaNetLoss):
    """Sampling-Free criterion of RetinaNet (item 2 of the module doc). Holds no parameters.

    ``assigner`` must count anchors between the thresholds as negatives: give it
    ``neg_iou_thr = pos_iou_thr`` (:func:`sampling_free_parts` does). Returns ``loss_cls`` (guided) and
    ``loss_bbox``, fp32 scalars; invalid (beyond-the-image padding) and crowd-covered anchors have weight 0.
    """

    def __init__(self, num_classes: int, anchor_generator, coder, assigner, *, bbox_beta: float = 0.11,
                 bbox_weight: float = 1.0, pad_divisor: int = 32) -> None:
        super().__init__(num_classes, anchor_generator, coder, assigner, bbox_loss="smooth_l1",
                         bbox_beta=bbox_beta, bbox_weight=bbox_weight, pad_divisor=pad_divisor)

    def plain_losses(self, cls_scores: list[Tensor], bbox_preds: list[Tensor],
                     targets: list[dict]) -> tuple[Tensor, Tensor]:
        """The BCE and SmoothL1 terms before guided scaling (both with their normalisers)."""
        feature_sizes, anchors_per_level = level_anchors(self.anchor_generator, cls_scores)
        t = self.get_targets(anchors_per_level, feature_sizes, targets)
        C = self.num_classes
        logits = flatten_levels(cls_scores, C).reshape(-1, C).float()
        deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4).float()
        onehot = (t.labels[:, None] == torch.arange(C, device=logits.device)[None, :]).float()
        # BCE as softplus(x) - x*t: torch's fused BCE-with-logits rounds log(1 + e^x) to ~1e-6 absolute in
        # float32, a 5% error per negative at the bias of pi = 1e-5, where every negative costs ~pi.
        bce = (F.softplus(logits) - logits * onehot) * t.label_weights[:, None]
        pos = torch.nonzero(t.labels < C).squeeze(1)
        loss_cls = bce.sum() / (pos.numel() + len(targets))
        reg = smooth_l1_loss(deltas[pos], t.bbox_targets[pos], beta=self.bbox_beta)
        loss_reg = self.bbox_weight * reg.sum() / max(1.0, REG_NORM * pos.numel())
        return loss_cls, loss_reg

    def forward(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        loss_cls, loss_reg = self.plain_losses(cls_scores, bbox_preds, targets)
        return {"loss_cls": guided_loss_scaling(loss_cls, loss_reg), "loss_bbox": loss_reg}


def sampling_free_parts(cfg: dict, head: nn.Module, criterion: RetinaNetLoss,
                        postprocessor: RetinaNetPostProcessor) -> tuple[SamplingFreeRetinaLoss, RetinaNetPostProcessor]:
    """The ``sampling_free:`` block applied to a built RetinaNet's parts (called by ``build_retinanet``).

    Sets the classifier bias from ``π`` in place, and returns the Sampling-Free criterion (same anchors,
    coder and matcher thresholds, between-threshold anchors as negatives) and a post-processor with
    score threshold ``π·(C + 1)`` and ``sampling_free.nms_iou``.
    """
    sf, m = cfg["sampling_free"], cfg["model"]
    if cfg.get("pisa"):
        raise ConfigError("config keys 'pisa' and 'sampling_free' cannot both be set on one RetinaNet: both "
                          "change how its samples are weighted; keep one (--set pisa=null or "
                          "--set sampling_free=null)")
    if m["loss_bbox"]["type"] != "smooth_l1":
        raise ConfigError("config key 'sampling_free' needs model.loss_bbox.type: smooth_l1 (beta 0.11, the "
                          f"authors' setting), got {m['loss_bbox']['type']!r}")
    pi = resolve_pi(cfg)
    with torch.no_grad():
        head.cls_logits.bias.fill_(prior_bias(pi))
    a = m["assigner"]
    assigner = MaxIoUAssigner(a["pos_iou_thr"], a["pos_iou_thr"], a["min_pos_iou"], a["match_low_quality"],
                              ignore_iof_thr=a["ignore_iof_thr"])
    loss = SamplingFreeRetinaLoss(criterion.num_classes, criterion.anchor_generator, criterion.coder, assigner,
                                  bbox_beta=m["loss_bbox"]["beta"], bbox_weight=m["loss_bbox"]["weight"],
                                  pad_divisor=criterion.pad_divisor)
    post = copy.copy(postprocessor)  # every other test setting stays as model.test gives it
    post.score_thr, post.nms_iou = pi * (criterion.num_classes + 1), sf["nms_iou"]
    return loss, post


# ---- Faster / Mask R-CNN -------------------------------------------------------------------------

class SamplingFreeRPN(RPN):
    """The RPN trained the Sampling-Free way (module doc item 2); proposals and eval are the RPN's.

    Same arguments as :class:`RPN`, with a :class:`PseudoSampler` (every positive and negative anchor;
    anchors between the assigner's thresholds, beyond the image's padded extent or under a crowd box
    take no part) and ``bbox_loss="smooth_l1"``. ``loss_rpn_bbox`` = ``bbox_weight · Σ SmoothL1(β) /
    max(1, 4·#pos)`` (the authors' 0.5 × mean with ``bbox_weight`` 0.5); ``loss_rpn_cls`` = the BCE
    guided to that value (``cls_weight`` cancels in the scaling and is not used).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, PseudoSampler) or self.bbox_loss != "smooth_l1":
            raise ValueError("SamplingFreeRPN trains every anchor with a SmoothL1 box loss: give it a "
                             "PseudoSampler and bbox_loss='smooth_l1' (two_stage_sampling_free's settings)")

    def plain_losses(self, objectness: list[Tensor], deltas: list[Tensor],
                     targets: list[dict]) -> tuple[Tensor, Tensor]:
        """The BCE (/ ``max(1, #pos)``) and SmoothL1 terms before guided scaling, fp32 scalars."""
        feature_sizes, anchors_per_level = level_anchors(self.anchor_generator, objectness)
        t = self.get_targets(torch.cat(anchors_per_level), feature_sizes, targets)
        logits = flatten_levels(objectness, 1).reshape(-1).float()[t.sample_inds]
        flat_deltas = flatten_levels(deltas, 4).reshape(-1, 4).float()
        num_pos = t.pos_inds.numel()
        # softplus(x) - x*t, as SamplingFreeRetinaLoss: exact for the many negatives near p = pi.
        bce = (F.softplus(logits) - logits * t.objectness).sum() / max(1, num_pos)
        reg = smooth_l1_loss(flat_deltas[t.pos_inds], t.bbox_targets, beta=self.bbox_beta).sum()
        return bce, self.bbox_weight * reg / max(1.0, REG_NORM * num_pos)

    def loss(self, objectness: list[Tensor], deltas: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        loss_cls, loss_reg = self.plain_losses(objectness, deltas, targets)
        return {"loss_rpn_cls": guided_loss_scaling(loss_cls, loss_reg), "loss_rpn_bbox": loss_reg}


class SamplingFreeRoIHead(RoIHead):
    """The R-CNN head trained the Sampling-Free way (module doc item 2); eval is the RoI head's.

    Same arguments as :class:`RoIHead`, with a :class:`PseudoSampler` (every proposal, plus the GTs
    when ``add_gt_as_proposals``) and ``bbox_loss="smooth_l1"``. ``loss_bbox`` = ``bbox_weight ·
    Σ SmoothL1(β) / max(1, 4·#pos)`` on the GT-class deltas; ``loss_cls`` = the mean CE guided to
    ``2 · loss_bbox``. The mask branch trains on every positive.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, PseudoSampler) or self.bbox_loss != "smooth_l1":
            raise ValueError("SamplingFreeRoIHead trains every proposal with a SmoothL1 box loss: give it a "
                             "PseudoSampler and bbox_loss='smooth_l1' (two_stage_sampling_free's settings)")
        if self.isr_p is not None or self.carl is not None:
            raise ValueError("SamplingFreeRoIHead: ISR-P and CARL are PISA's; Sampling-Free uses neither")

    def plain_losses(self, logits: Tensor, deltas: Tensor, t: RoITargets) -> tuple[Tensor, Tensor]:
        """Mean CE over the RoIs and the SmoothL1 term before guided scaling, fp32 scalars."""
        C = self.num_classes
        logits, deltas = logits.float(), deltas.float()
        ce = softmax_cross_entropy(logits, t.labels)
        loss_cls = (t.label_weights * ce).sum() / (t.label_weights > 0).sum().clamp(min=1)
        # Selection by index: with no positive this is an empty sum, a zero attached to the deltas.
        pos = torch.nonzero(t.labels < C).squeeze(1)
        reg = smooth_l1_loss(deltas.view(-1, C, 4)[pos, t.labels[pos]], t.bbox_targets[pos], beta=self.bbox_beta)
        return loss_cls, self.bbox_weight * reg.sum() / max(1.0, REG_NORM * pos.numel())

    def box_losses(self, logits: Tensor, deltas: Tensor, t: RoITargets) -> dict[str, Tensor]:
        loss_cls, loss_reg = self.plain_losses(logits, deltas, t)
        return {"loss_cls": RCNN_CLS_SCALE * guided_loss_scaling(loss_cls, loss_reg), "loss_bbox": loss_reg}


@dataclass(frozen=True)
class TwoStageSamplingFree:
    """The ``sampling_free:`` block as the Faster / Mask R-CNN builders apply it.

    pi: RPN objectness prior (bias ``−log((1 − π)/π)``); rpn_proposals_per_image: training proposals
    kept per image (``rpn_proposals_per_batch // data.batch_size``, at least 1), in place of
    ``model.rpn.train.max_per_img``; rcnn_score_thr: the R-CNN test score threshold, in place of
    ``model.roi_head.test.score_thr``.
    """

    pi: float
    rpn_proposals_per_image: int
    rcnn_score_thr: float


def two_stage_sampling_free(cfg: dict) -> TwoStageSamplingFree | None:
    """The checked ``sampling_free:`` block of a Faster / Mask R-CNN config, or None when it is absent."""
    sf = cfg.get("sampling_free")
    if not sf:
        return None
    m = cfg["model"]
    if cfg.get("pisa"):
        raise ConfigError(f"config keys 'pisa' and 'sampling_free' cannot both be set on one {m['type']}: both "
                          "change how its samples are weighted; keep one (--set pisa=null or "
                          "--set sampling_free=null)")
    for key, beta in (("rpn", "0.1111 = 1/9"), ("roi_head", "1.0")):
        if m[key]["loss_bbox"]["type"] != "smooth_l1":
            raise ConfigError(f"config key 'sampling_free' needs model.{key}.loss_bbox.type: smooth_l1 (beta "
                              f"{beta}, the authors' setting), got {m[key]['loss_bbox']['type']!r}")
    batch_size = cfg.get("data", {}).get("batch_size", 2)
    return TwoStageSamplingFree(resolve_pi(cfg), max(1, sf["rpn_proposals_per_batch"] // batch_size),
                                sf["rcnn_score_thr"])


# ---- the bias initialisation: pi from the training set's anchor matching ----------------------------

@dataclass
class PriorCount:
    """Anchor counts over a dataset: foreground, background (between-threshold and ignored excluded)."""

    foreground: int
    background: int
    num_classes: int
    images: int

    @property
    def pi(self) -> float:
        """``(#fg / (#fg + #bg)) / C``."""
        total = self.foreground + self.background
        return self.foreground / total / self.num_classes if total else 0.0


def feature_sizes(padded_shape: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """``(ceil(H / s), ceil(W / s))`` per stride: the sizes a chain of stride-2 3x3 convs (padding 1)
    produces from a ``(H, W)`` input, i.e. the ResNet + FPN levels."""
    h, w = padded_shape
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def count_anchor_matches(anchor_generator, assigner: MaxIoUAssigner, image_shapes: Sequence[tuple[int, int]],
                         boxes: Sequence[Tensor], ignore_boxes: Sequence[Tensor], num_classes: int,
                         pad_divisor: int = 32) -> PriorCount:
    """Match every image's anchors to its GTs (no network) and count foreground / background anchors.

    Args:
        image_shapes: per image the ``(h, w)`` after the training resize; anchors cover it padded up
            to a multiple of ``pad_divisor``.
        boxes, ignore_boxes: per image ``(G, 4)`` GT and ``(M, 4)`` crowd boxes in resized coordinates.
    """
    fg = bg = 0
    for shape, gt, ignore in zip(image_shapes, boxes, ignore_boxes):
        padded = tuple(math.ceil(v / pad_divisor) * pad_divisor for v in shape)
        anchors = anchor_generator.anchors(feature_sizes(padded, anchor_generator.strides))
        labels = torch.zeros(gt.shape[0], dtype=torch.int64)
        result = assigner.assign(anchors, gt.float(), labels, ignore_boxes=ignore.float())
        fg += int(result.pos_mask.sum())
        bg += int(result.neg_mask.sum())
    return PriorCount(fg, bg, num_classes, len(image_shapes))


def prior_matcher(cfg: dict) -> tuple:
    """``(anchor generator, assigner, C)`` whose matching defines ``π`` for ``cfg``'s model: RetinaNet's
    anchors and ``model.assigner`` with C = K (None: the dataset's class count), or the RPN's anchors and
    ``model.rpn.assigner`` with C = 1 for Faster / Mask R-CNN."""
    from pisa.models.anchors import AnchorGenerator

    m = cfg["model"]
    if m["type"] == "retinanet":
        a = m["anchors"]
        generator = AnchorGenerator(a["strides"], a["ratios"], octave_base_scale=a["octave_base_scale"],
                                    scales_per_octave=a["scales_per_octave"])
        num_classes = m["num_classes"] if isinstance(m["num_classes"], int) else None  # "auto": the dataset's
        return generator, MaxIoUAssigner(**m["assigner"]), num_classes
    if m["type"] in ("faster_rcnn", "mask_rcnn"):
        a = m["rpn"]["anchors"]
        generator = AnchorGenerator(a["strides"], a["ratios"], scales=a["scales"])
        return generator, MaxIoUAssigner(**m["rpn"]["assigner"]), 1
    raise ConfigError(f"model.type is {m['type']!r}; Sampling-Free's prior pi is defined for retinanet, "
                      "faster_rcnn and mask_rcnn")


def foreground_prior(cfg: dict, max_images: int | None = None) -> PriorCount:
    """``π`` of ``cfg``'s model on its training set, from annotations only (no image is decoded).

    Each image is resized as the first ``data.train_transforms.scales`` entry resizes it (no flip); the
    anchors and matcher are :func:`prior_matcher`'s (RetinaNet's, or the RPN's with C = 1), anchors below
    ``neg_iou_thr`` are background and those between the thresholds are left out.
    """
    from pisa.data import build_dataset, rescale_size

    data = cfg["data"]
    generator, assigner, num_classes = prior_matcher(cfg)
    dataset = build_dataset(data["train"], data, train=True)
    scale = data["train_transforms"]["scales"][0]
    shapes, boxes, ignores = [], [], []
    for i in range(len(dataset) if max_images is None else min(max_images, len(dataset))):
        info, ann = dataset.image_info(i), dataset.get_annotations(i)
        new_w, new_h = rescale_size(info["width"], info["height"], scale)
        factor = torch.tensor([new_w / info["width"], new_h / info["height"]] * 2)
        limits = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
        shapes.append((new_h, new_w))
        boxes.append(torch.minimum((torch.as_tensor(ann["boxes"]).reshape(-1, 4) * factor).clamp(min=0), limits))
        ignores.append(torch.minimum((torch.as_tensor(ann["ignore_boxes"]).reshape(-1, 4) * factor).clamp(min=0),
                                     limits))
    num_classes = dataset.num_classes if num_classes is None else num_classes
    return count_anchor_matches(generator, assigner, shapes, boxes, ignores, num_classes, data["pad_divisor"])
