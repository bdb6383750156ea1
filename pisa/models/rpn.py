"""Region proposal network: a small conv head on P2-P6, its training losses, and the proposals (§7.3).

The RPN is never changed by PISA (Sampling-Free trains it on every anchor: ``SamplingFreeRPN`` in
``sampling_free.py`` overrides :meth:`RPN.loss`). It follows the mmdetection v2 RPN:

* head: 3x3 conv + ReLU shared by the levels, then a 1x1 objectness conv (one sigmoid logit per anchor,
  channel ``a``) and a 1x1 delta conv (channel ``a·4 + coord``); weights Normal(0, 0.01), biases 0;
* anchors: base size = stride, scale 8, ratios 0.5 / 1 / 2 on strides 4..64, centres on the cell corners;
* targets: max-IoU assignment 0.7 / 0.3 (min_pos 0.3, low-quality matches on) of the anchors inside each
  image's own padded extent, 256 random samples per image at most half positive;
* losses: sigmoid BCE objectness over the sampled anchors and L1 on the positives' deltas (coder stds 1),
  both divided by ``Σ_img max(#pos_img, 1) + max(#neg_img, 1)``, the reference's sample count;
* proposals, per image: on each level the ``nms_pre`` anchors of highest objectness, decoded and clipped
  to the image, NMS 0.7 with the level as the group (levels never suppress each other), then the
  ``max_per_img`` best by score. No size filter; proposals carry no gradient.

Flatten order of the dense outputs: image → level (finest first) → row → column → anchor, the order of
the anchor generator (§5.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from pisa.losses import l1_loss, smooth_l1_loss
from pisa.models.assigners import AssignResult
from pisa.models.postprocess import _clip_per_image
from pisa.models.retina_head import flatten_levels, level_anchors

__all__ = ["RPNHead", "RPN", "ProposalSettings", "Proposals", "generate_proposals"]


class RPNHead(nn.Module):
    """The RPN's conv head, shared across FPN levels.

    Args:
        in_channels: channels of every FPN level.
        feat_channels: width of the shared 3x3 conv (256 in the reference).
        num_anchors: ``A`` anchors per location (3).

    ``forward(feats: list of (B, in_channels, H_l, W_l))`` returns ``(objectness, deltas)``: per level
    ``(B, A, H_l, W_l)`` logits (channel ``a``) and ``(B, 4A, H_l, W_l)`` deltas (channel ``a·4 + coord``).
    Module names ``rpn_conv``, ``rpn_cls``, ``rpn_reg`` are the reference's ``rpn_head.*``.
    """

    def __init__(self, in_channels: int, feat_channels: int = 256, num_anchors: int = 3) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.01) weights and zero biases on all three convs (reference init)."""
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [torch.relu(self.rpn_conv(f)) for f in feats]
        return [self.rpn_cls(h) for h in hidden], [self.rpn_reg(h) for h in hidden]


@dataclass(frozen=True)
class ProposalSettings:
    """How many proposals survive, per image.

    nms_pre: per level, keep the anchors with the top ``nms_pre`` objectness scores before NMS (all when
        ``≤ 0``); max_per_img: proposals kept after NMS; nms_iou: NMS suppresses ``IoU > nms_iou``.
    Reference: train 2000 / 1000 (PISA configs 2000 / 2000), test 1000 / 1000 (PISA configs 2000 / 2000).
    """

    nms_pre: int
    max_per_img: int
    nms_iou: float = 0.7


@dataclass
class Proposals:
    """One image's proposals by decreasing score: boxes float32 ``(R, 4)`` xyxy in input-image pixels
    (clipped to ``img_shape``), scores float32 ``(R,)`` sigmoid objectness, levels int64 ``(R,)``."""

    boxes: Tensor
    scores: Tensor
    levels: Tensor


def generate_proposals(objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor], coder,
                       img_shapes: Sequence[tuple[int, int]], settings: ProposalSettings) -> list[Proposals]:
    """Proposals of a batch from flattened RPN outputs; runs without gradient.

    Args:
        objectness: per level ``(B, N_l)`` logits.
        deltas: per level ``(B, N_l, 4)`` deltas.
        anchors: per level ``(N_l, 4)`` anchors, shared by the batch.
        coder: the RPN's ``DeltaXYWHCoder`` (stds 1).
        img_shapes: per image ``(h, w)`` of the resized image before padding; boxes are clipped to it.
        settings: top-k, NMS and final count.

    Top-k, decoding and clipping run batched over the images; one ``batched_nms`` call covers the whole
    batch, with group ``image · L + level``. Returns one :class:`Proposals` per image.
    """
    with torch.no_grad():
        boxes, scores, levels = _top_decoded(objectness, deltas, anchors, coder, settings.nms_pre)
        boxes = _clip_per_image(boxes, list(img_shapes))
        return _nms_per_image(boxes, scores, levels, len(objectness), settings)


def _top_decoded(objectness, deltas, anchors, coder, nms_pre: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per level the ``nms_pre`` best anchors by sigmoid score, decoded: ``(B, K, 4)``, ``(B, K)``, ``(K,)``."""
    level_boxes, level_scores, level_ids = [], [], []
    for level, (logits, level_deltas, level_priors) in enumerate(zip(objectness, deltas, anchors)):
        scores = logits.detach().float().sigmoid()
        level_deltas = level_deltas.detach().float()
        priors = level_priors.expand(scores.shape[0], -1, -1)
        if 0 < nms_pre < scores.shape[1]:
            scores, top = scores.topk(nms_pre, dim=1)  # (B, k), sorted by decreasing score
            level_deltas = level_deltas.gather(1, top[..., None].expand(-1, -1, 4))
            priors = level_priors[top]
        level_boxes.append(coder.decode(priors, level_deltas))
        level_scores.append(scores)
        level_ids.append(torch.full((scores.shape[1],), level, dtype=torch.int64, device=scores.device))
    return torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1), torch.cat(level_ids)


def _nms_per_image(boxes: Tensor, scores: Tensor, levels: Tensor, num_levels: int,
                   settings: ProposalSettings) -> list[Proposals]:
    """NMS within (image, level) groups, then the first ``max_per_img`` of each image by score."""
    batch, count = scores.shape
    image_ids = torch.arange(batch, device=scores.device)[:, None]
    groups = (image_ids * num_levels + levels[None, :]).reshape(-1)
    keep = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), groups, settings.nms_iou)  # by score
    keep_image = keep // count
    # A stable sort by image keeps each image's survivors in decreasing score order.
    keep = keep[torch.sort(keep_image, stable=True).indices]
    per_image = torch.bincount(keep_image, minlength=batch).tolist()
    flat_boxes, flat_scores, flat_levels = boxes.reshape(-1, 4), scores.reshape(-1), levels.repeat(batch)
    results = []
    for kept in torch.split(keep, per_image):
        kept = kept[:settings.max_per_img] if settings.max_per_img > 0 else kept
        results.append(Proposals(flat_boxes[kept], flat_scores[kept], flat_levels[kept]))
    return results


@dataclass
class RPNTargets:
    """Sampled training targets of a batch, indexing the flattened ``(B·N)`` anchors.

    sample_inds int64 ``(S,)`` flat indices of the sampled anchors (positives and negatives);
    objectness float32 ``(S,)`` 1 for positives, 0 for negatives; pos_inds int64 ``(P,)`` flat indices of
    the sampled positives; bbox_targets float32 ``(P, 4)`` their encoded deltas; avg_factor float32
    scalar ``Σ_img max(#pos_img, 1) + max(#neg_img, 1)``.
    """

    sample_inds: Tensor
    objectness: Tensor
    pos_inds: Tensor
    bbox_targets: Tensor
    avg_factor: Tensor


class RPN(nn.Module):
    """Region proposal network: head, anchors, training targets and losses, proposals.

    Args:
        head: an :class:`RPNHead`.
        anchor_generator: ``AnchorGenerator([4, 8, 16, 32, 64], [0.5, 1, 2], scales=[8])`` for P2-P6.
        coder: ``DeltaXYWHCoder`` with stds ``(1, 1, 1, 1)``.
        assigner: ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)`` (low-quality matches on).
        sampler: ``RandomSampler(256, 0.5)`` (any sampler with ``sample_batch``).
        train_proposals, test_proposals: :class:`ProposalSettings` for training and eval mode.
        cls_weight: weight of ``loss_rpn_cls``.
        bbox_loss: ``"l1"`` (the reference) or ``"smooth_l1"`` with ``bbox_beta``; ``bbox_weight`` its weight.
        pad_divisor: anchors beyond an image's ``img_shape`` rounded up to this multiple (its own padded
            extent) are never sampled; this only matters when batch padding makes the tensor larger.
        generator: the ``torch.Generator`` of the sampler's random draws (torch's default when ``None``).

    ``forward(features: [P2..P6], targets: list[dict])`` returns ``(proposals, losses)``: per image a
    detached float32 ``(R_i, 4)`` tensor of boxes in input-image pixels by decreasing score, and in
    training ``{"loss_rpn_cls", "loss_rpn_bbox"}`` fp32 scalars (``{}`` in eval mode). Targets need
    ``img_shape`` and, for training, ``boxes`` and ``labels`` (``ignore_boxes`` optional).
    """

    def __init__(self, head: RPNHead, anchor_generator, coder, assigner, sampler, *,
                 train_proposals: ProposalSettings, test_proposals: ProposalSettings, cls_weight: float = 1.0,
                 bbox_loss: str = "l1", bbox_beta: float = 1.0, bbox_weight: float = 1.0, pad_divisor: int = 32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if bbox_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"model.rpn.loss_bbox.type must be 'l1' or 'smooth_l1', got {bbox_loss!r}")
        if head.num_anchors != anchor_generator.num_anchors:
            raise ValueError(f"RPN: the head predicts {head.num_anchors} anchors per location but the anchor "
                             f"generator makes {anchor_generator.num_anchors}; make model.rpn.anchors' "
                             "scales x ratios match the head")
        self.head = head
        self.anchor_generator, self.coder, self.assigner, self.sampler = anchor_generator, coder, assigner, sampler
        self.train_proposals, self.test_proposals = train_proposals, test_proposals
        self.cls_weight, self.bbox_loss, self.bbox_beta, self.bbox_weight = cls_weight, bbox_loss, bbox_beta, bbox_weight
        self.pad_divisor = pad_divisor
        self.generator = generator

    def forward(self, features: Sequence[Tensor], targets: list[dict]) -> tuple[list[Tensor], dict[str, Tensor]]:
        objectness, deltas = self.head(features)
        settings = self.train_proposals if self.training else self.test_proposals
        proposals = self.proposals(objectness, deltas, targets, settings)
        losses = self.loss(objectness, deltas, targets) if self.training else {}
        return [p.boxes for p in proposals], losses

    # ---- proposals -------------------------------------------------------------------------------

    def proposals(self, objectness: list[Tensor], deltas: list[Tensor], targets: list[dict],
                  settings: ProposalSettings) -> list[Proposals]:
        """Proposals (boxes, scores, levels) of every image from the head's per-level maps."""
        _, anchors = level_anchors(self.anchor_generator, objectness)
        flat_objectness = [flatten_levels([o], 1).squeeze(2) for o in objectness]
        flat_deltas = [flatten_levels([d], 4) for d in deltas]
        return generate_proposals(flat_objectness, flat_deltas, anchors, self.coder,
                                  [t["img_shape"] for t in targets], settings)

    # ---- training --------------------------------------------------------------------------------

    def loss(self, objectness: list[Tensor], deltas: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """``loss_rpn_cls`` (BCE) and ``loss_rpn_bbox`` over the sampled anchors, fp32 (also under autocast).

        An image without GTs contributes negatives only; with no positive in the batch ``loss_rpn_bbox``
        is an exact zero that stays attached to the delta branch.
        """
        feature_sizes, anchors_per_level = level_anchors(self.anchor_generator, objectness)
        t = self.get_targets(torch.cat(anchors_per_level), feature_sizes, targets)
        logits = flatten_levels(objectness, 1).reshape(-1).float()
        flat_deltas = flatten_levels(deltas, 4).reshape(-1, 4).float()
        bce = F.binary_cross_entropy_with_logits(logits[t.sample_inds], t.objectness, reduction="sum")
        reg = self._regression_loss(flat_deltas[t.pos_inds], t.bbox_targets).sum()
        return {"loss_rpn_cls": self.cls_weight * bce / t.avg_factor,
                "loss_rpn_bbox": self.bbox_weight * reg / t.avg_factor}

    def _regression_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.bbox_loss == "smooth_l1":
            return smooth_l1_loss(pred, target, beta=self.bbox_beta)
        return l1_loss(pred, target)

    def _valid_shape(self, img_shape: Sequence[int]) -> tuple[int, int]:
        d = self.pad_divisor
        return (math.ceil(img_shape[0] / d) * d, math.ceil(img_shape[1] / d) * d)

    def _assign(self, anchors: Tensor, feature_sizes: list[tuple[int, int]], target: dict) -> AssignResult:
        """One image's assignment of the anchors inside its own padded extent."""
        return self._assign_batch(anchors, feature_sizes, [target])[0]

    def _assign_batch(self, anchors: Tensor, feature_sizes: list[tuple[int, int]],
                      targets: list[dict]) -> list[AssignResult]:
        """``_assign`` of every image in one batched call (the same results, bit for bit)."""
        valid = self.anchor_generator.batch_valid_flags(
            feature_sizes, [self._valid_shape(t["img_shape"]) for t in targets], device=anchors.device)
        ignores = [None if t.get("ignore_boxes") is None else t["ignore_boxes"].to(anchors) for t in targets]
        return self.assigner.assign_batch(anchors, [t["boxes"].to(anchors) for t in targets],
                                          [t["labels"] for t in targets], ignores, valid).per_image()

    def get_targets(self, anchors: Tensor, feature_sizes: list[tuple[int, int]], targets: list[dict]) -> RPNTargets:
        """Assign every image in one batched call, sample per image, then encode the positives in one batch."""
        assigns = self._assign_batch(anchors, feature_sizes, targets)
        samples = self.sampler.sample_batch(assigns, [anchors] * len(targets), generator=self.generator)
        num_anchors = anchors.shape[0]
        pos_inds, neg_inds, matched, avg_factor = [], [], [], 0
        for image, (assign, sample, target) in enumerate(zip(assigns, samples, targets)):
            offset = image * num_anchors
            pos_inds.append(sample.pos_inds + offset)
            neg_inds.append(sample.neg_inds + offset)
            matched.append(target["boxes"].to(anchors)[assign.gt_inds[sample.pos_inds] - 1])
            avg_factor += max(sample.pos_inds.numel(), 1) + max(sample.neg_inds.numel(), 1)
        pos, neg = torch.cat(pos_inds), torch.cat(neg_inds)
        bbox_targets = self.coder.encode(anchors[pos % num_anchors], torch.cat(matched))
        objectness = torch.cat([torch.ones(pos.numel()), torch.zeros(neg.numel())]).to(anchors.device)
        return RPNTargets(torch.cat([pos, neg]), objectness, pos, bbox_targets,
                          torch.tensor(float(avg_factor), device=anchors.device))
