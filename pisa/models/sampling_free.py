"""Sampling-Free for RetinaNet (Chen et al., "Is Sampling Heuristics Necessary in Training Deep Object
Detectors?"; method doc §8.2, following the authors' code): no focal loss, no sampler, three changes.

1. **Optimal bias initialisation.** ``π = (#fg / (#fg + #bg)) / C`` over the training set's anchor
   matching (the head's matcher, low-quality matches on, anchors between the thresholds excluded);
   the classifier bias is ``−log((1 − π)/π)``. :func:`foreground_prior` computes ``π`` (printed by
   ``python scripts/sampling_free_bias.py CONFIG``); configs carry the value as ``sampling_free.pi``
   (default 1e-5, the authors' cached COCO value for RetinaNet R50/R101).
2. **Guided loss scaling** (:class:`SamplingFreeRetinaLoss`): plain sigmoid BCE over all anchors ×
   classes, anchors between the thresholds counted as negatives, summed and divided by
   ``#pos + #images``; SmoothL1 (β 0.11) summed over the positives / ``max(1, 4·#pos)``; then
   ``L_cls ← L_cls · stopgrad(L_reg / L_cls)``: the classification gradient keeps its direction and
   takes the regression loss's magnitude.
3. **Adaptive test threshold**: score ``> π·(C + 1)`` (8.1e-4 on COCO) and NMS at 0.55.

RetinaNet only here; the R-CNN parts of the method are not implemented.
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
from pisa.losses import smooth_l1_loss
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.retina_head import RetinaNetLoss, flatten_levels, level_anchors
from pisa.models.retinanet import RetinaNetPostProcessor

__all__ = ["SamplingFreeRetinaLoss", "guided_loss_scaling", "prior_bias", "foreground_prior", "PriorCount",
           "sampling_free_parts"]

# The authors' regression normaliser: the SmoothL1 sum is divided by 4 (coordinates) per positive.
REG_NORM = 4.0


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
    pi = sf["pi"]
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


def foreground_prior(cfg: dict, max_images: int | None = None) -> PriorCount:
    """``π`` of ``cfg``'s RetinaNet on its training set, from annotations only (no image is decoded).

    Each image is resized as the first ``data.train_transforms.scales`` entry resizes it (no flip); the
    matcher is ``model.assigner``'s, with anchors below ``neg_iou_thr`` as background and those between
    the thresholds left out.
    """
    from pisa.data import build_dataset, rescale_size
    from pisa.models.anchors import AnchorGenerator

    m, data = cfg["model"], cfg["data"]
    dataset = build_dataset(data["train"], data, train=True)
    a = m["anchors"]
    generator = AnchorGenerator(a["strides"], a["ratios"], octave_base_scale=a["octave_base_scale"],
                                scales_per_octave=a["scales_per_octave"])
    assigner = MaxIoUAssigner(**m["assigner"])
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
    num_classes = m["num_classes"] if isinstance(m["num_classes"], int) else dataset.num_classes
    return count_anchor_matches(generator, assigner, shapes, boxes, ignores, num_classes, data["pad_divisor"])
