"""Detection samplers: which assigned candidates (anchors or RoIs) train a head, and with what weight.

* ``RandomSampler``: up to ``num · pos_fraction`` random positives, the rest random negatives (RPN
  256 / 0.5 over all anchors; baseline R-CNN 512 / 0.25 over the proposals plus GTs).
* ``PseudoSampler``: every positive and every negative, weight 1.
* ``ScoreHLRSampler``: PISA's ISR-N (method spec §4): positives as the random sampler, negatives
  selected and weighted by their Score-HLR rank under the current box head.

Every sampler has ``sample_batch(assigns, candidates, *, generator=None, scorer=None)`` and returns one
``SampleResult`` per image. Indices are into that image's candidates.

RNG contract: every random choice (a positive subset when there are more positives than the quota, a
negative subset, Score-HLR's fillers and its all-invalid fallback) draws from ``generator``, the
caller's ``torch.Generator`` (torch's default generator when ``None``). A generator on another device
than the candidates is fine: draws are made on the generator's device and moved. The same generator
state and inputs give the same samples. Matching the reference's random choices is not a goal.

Two-stage candidates (method spec §4.1 step 1): ``add_gts_as_proposals`` prepends the GTs to the
proposals, and ``force_gt_matches`` turns the assignment of the proposals into the assignment of
those candidates, the prepended GTs being positives of themselves with IoU 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from pisa.losses import score_hlr, softmax_cross_entropy
from pisa.losses.focal import upcast
from pisa.models.assigners import AssignResult
from pisa.models.box_coder import DeltaXYWHCoder

__all__ = [
    "SampleResult",
    "Scorer",
    "RandomSampler",
    "PseudoSampler",
    "ScoreHLRSampler",
    "add_gts_as_proposals",
    "force_gt_matches",
]

Scorer = Callable[[list[Tensor]], tuple[Tensor, Tensor]]
"""``scorer(rois)``: the box branch on per-image boxes ``[(Q_i, 4)]`` in input-image coordinates,
returning ``logits (ΣQ_i, C+1)`` (background last) and ``deltas (ΣQ_i, 4C)`` concatenated in image order."""

# Below this the renormalisation Σ L / Σ w·L is meaningless; keep the weights as they are (cf. D3).
_MIN_NORMALISER = 1e-12


@dataclass
class SampleResult:
    """The samples of one image.

    Attributes:
        pos_inds: int64 ``(P,)`` candidate indices of the sampled positives, in sampler order.
        neg_inds: int64 ``(Q,)`` candidate indices of the sampled negatives, in sampler order.
        neg_weights: float32 ``(Q,)`` classification weights of those negatives (all ones except for
            Score-HLR); positives' weights are the head's business (ISR-P).
    """

    pos_inds: Tensor
    neg_inds: Tensor
    neg_weights: Tensor

    @property
    def inds(self) -> Tensor:
        """int64 ``(P + Q,)``: positives then negatives, the order of the image's sampled RoIs."""
        return torch.cat([self.pos_inds, self.neg_inds])

    @property
    def num_pos(self) -> int:
        return int(self.pos_inds.numel())


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------

def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _random_subset(inds: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` entries of ``inds`` drawn uniformly without replacement, in draw order.

    With at most ``num`` entries, all of them are returned in their given order and nothing is drawn.
    """
    if inds.numel() <= num:
        return inds
    perm = torch.randperm(inds.numel(), generator=generator, device=_draw_device(generator, inds.device))
    return inds[perm[:num].to(inds.device)]


def _nonzero(mask: Tensor) -> Tensor:
    return torch.nonzero(mask, as_tuple=False).squeeze(1)


def _negative_budget(num: int, num_pos: int, neg_pos_ub: float) -> int:
    """Negatives wanted: ``num − num_pos``, at most ``int(neg_pos_ub · max(num_pos, 1))`` if it is ``≥ 0``."""
    budget = num - num_pos
    if neg_pos_ub >= 0:
        budget = min(budget, int(neg_pos_ub * max(num_pos, 1)))
    return max(budget, 0)


def _check_settings(name: str, num: int, pos_fraction: float) -> None:
    if int(num) != num or num < 0:
        raise ValueError(f"{name}: num must be a non-negative integer (samples per image), got {num!r}")
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"{name}: pos_fraction must lie in [0, 1], got {pos_fraction!r}")


def _check_batch(name: str, assigns: Sequence[AssignResult], candidates: Sequence[Tensor]) -> None:
    """One assignment per image, covering exactly that image's candidates."""
    if len(assigns) != len(candidates):
        raise ValueError(f"{name}.sample_batch: got {len(assigns)} assignments for {len(candidates)} images; "
                         "pass one AssignResult and one candidate tensor per image")
    for i, (assign, cand) in enumerate(zip(assigns, candidates)):
        if cand.dim() != 2 or cand.shape[1] != 4:
            raise ValueError(f"{name}.sample_batch: candidates of image {i} must be (M, 4) boxes, "
                             f"got shape {tuple(cand.shape)}")
        if assign.gt_inds.shape[0] != cand.shape[0]:
            raise ValueError(
                f"{name}.sample_batch: the assignment of image {i} covers {assign.gt_inds.shape[0]} priors but "
                f"the image has {cand.shape[0]} candidates. Assign the proposals alone, then call "
                "force_gt_matches(assign, gt_labels) next to add_gts_as_proposals(proposals, gt_boxes).")


def _sample_positives(assign: AssignResult, quota: int, generator: torch.Generator | None) -> Tensor:
    """All positives in ascending candidate order if at most ``quota``, else a random ``quota`` in draw order."""
    return _random_subset(_nonzero(assign.pos_mask), quota, generator)


def _ones(count: int, device: torch.device) -> Tensor:
    return torch.ones(count, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# random and pseudo samplers
# --------------------------------------------------------------------------------------------

class RandomSampler:
    """Uniform random positives and negatives, the reference's standard sampler.

    Per image: up to ``int(num · pos_fraction)`` positives (all of them in ascending order if there are
    no more, else a uniformly random subset in draw order), then ``num − #pos`` negatives the same way,
    capped at ``int(neg_pos_ub · max(#pos, 1))`` when ``neg_pos_ub ≥ 0``. Ignored candidates
    (``gt_inds < 0``) are never sampled. Cost: a ``nonzero`` and at most one ``randperm`` per kind and
    image, so 200k RPN anchors take about a millisecond.

    Args:
        num: samples per image (RPN 256, R-CNN 512).
        pos_fraction: upper bound of the positive share (RPN 0.5, R-CNN 0.25).
        neg_pos_ub: negatives per positive at most; ``-1`` for no bound.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1) -> None:
        _check_settings("RandomSampler", num, pos_fraction)
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub

    def sample_batch(self, assigns: Sequence[AssignResult], candidates: Sequence[Tensor], *,
                     generator: torch.Generator | None = None, scorer: Scorer | None = None) -> list[SampleResult]:
        """Sample every image; ``scorer`` is accepted for a uniform interface and ignored."""
        _check_batch("RandomSampler", assigns, candidates)
        return [self._sample_image(assign, generator) for assign in assigns]

    def _sample_image(self, assign: AssignResult, generator: torch.Generator | None) -> SampleResult:
        pos = _sample_positives(assign, int(self.num * self.pos_fraction), generator)
        budget = _negative_budget(self.num, pos.numel(), self.neg_pos_ub)
        neg = _random_subset(_nonzero(assign.neg_mask), budget, generator)
        return SampleResult(pos, neg, _ones(neg.numel(), neg.device))


class PseudoSampler:
    """Every positive and every negative (ascending candidate order), negatives with weight 1."""

    def sample_batch(self, assigns: Sequence[AssignResult], candidates: Sequence[Tensor], *,
                     generator: torch.Generator | None = None, scorer: Scorer | None = None) -> list[SampleResult]:
        """Sample every image; ``generator`` and ``scorer`` are ignored."""
        _check_batch("PseudoSampler", assigns, candidates)
        results = []
        for assign in assigns:
            neg = _nonzero(assign.neg_mask)
            results.append(SampleResult(_nonzero(assign.pos_mask), neg, _ones(neg.numel(), neg.device)))
        return results


# --------------------------------------------------------------------------------------------
# Score-HLR sampler (ISR-N)
# --------------------------------------------------------------------------------------------

@dataclass
class _NegativeBatch:
    """The negatives of all images that need some, concatenated in image order.

    Attributes:
        rois: ``(M, 4)`` boxes; ``img``: ``(M,)`` int64 image index; ``cand``: ``(M,)`` int64 candidate
        index inside its image; ``budget``: ``(B,)`` int64 negatives to select per image (``n_exp``).
    """

    rois: Tensor
    img: Tensor
    cand: Tensor
    budget: Tensor


class ScoreHLRSampler:
    """PISA's ISR-N sampler (method spec §4.1): negatives chosen and weighted by Score-HLR.

    Per image, with ``n_exp = min(#neg, num − #pos_sampled)`` (and the ``neg_pos_ub`` cap):

    1. positives exactly as ``RandomSampler``;
    2. one no-grad ``scorer`` call on the negatives of all images: ``s_j`` = largest foreground
       softmax probability, ``c_j`` its class, ``L_j`` = ``cls_loss_weight ·`` CE against background;
    3. *valid* negatives have ``s_j > score_thr`` (strict); ``V`` of them, ``n_hlr = min(V, n_exp)``;
    4. valid boxes decoded with ``coder`` from their class-``c_j`` deltas (no clipping), grouped by
       ``nms_match(iou_thr)`` and ranked by Score-HLR (``R``, 0-based, per image);
    5. selection: the top ``n_hlr`` by ``R`` in rank order, then ``n_exp − n_hlr`` fillers drawn
       uniformly from the invalid negatives;
    6. weights: ``U = max(n_exp, V)``; ``(U − R)/U`` for the ranked ones and their minimum for the
       fillers; ``w ← (bias + (1 − bias) w)^k``; ``w ← w · Σ L / Σ w L`` over the image's selection
       (kept as is when ``Σ w L ≤ 1e-12`` or not finite);
    7. ``V = 0``: ``n_exp`` uniformly random negatives, weight 1.

    The heavy work (softmax, CE, decoding, grouping, ranking, weights) runs once over the negatives of
    all images, with per-image block masks in the grouping; only counting is done per image.

    Args:
        num, pos_fraction, neg_pos_ub: as ``RandomSampler`` (PISA configs: 512, 0.25, -1).
        num_classes: ``C``, the number of foreground classes; logits have ``C + 1`` columns.
        coder: the R-CNN box coder (stds 0.1, 0.1, 0.2, 0.2).
        k, bias: the weight's power and bias (``pisa.isr_n``: 0.5, 0).
        score_thr: validity floor on ``s_j`` (0.05).
        iou_thr: ``nms_match`` grouping threshold (0.5, joined on ``≥``).
        cls_loss_weight: the box head's classification ``loss_weight``, part of ``L_j``.
        legacy_float_keys: rank with the reference's float32 key (defect D9, ``pisa.compat``).
    """

    def __init__(self, num: int = 512, pos_fraction: float = 0.25, neg_pos_ub: float = -1, *,
                 num_classes: int, coder: DeltaXYWHCoder, k: float = 0.5, bias: float = 0.0,
                 score_thr: float = 0.05, iou_thr: float = 0.5, cls_loss_weight: float = 1.0,
                 legacy_float_keys: bool = False) -> None:
        _check_settings("ScoreHLRSampler", num, pos_fraction)
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"ScoreHLRSampler: num_classes must be a positive integer (foreground classes), "
                             f"got {num_classes!r}")
        if not 0.0 <= bias <= 1.0:
            raise ValueError(f"ScoreHLRSampler: bias (pisa.isr_n.bias) must lie in [0, 1], got {bias!r}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub
        self.num_classes = int(num_classes)
        self.coder = coder
        self.k = float(k)
        self.bias = float(bias)
        self.score_thr = float(score_thr)
        self.iou_thr = float(iou_thr)
        self.cls_loss_weight = float(cls_loss_weight)
        self.legacy_float_keys = legacy_float_keys

    def sample_batch(self, assigns: Sequence[AssignResult], candidates: Sequence[Tensor], *,
                     generator: torch.Generator | None = None, scorer: Scorer | None = None) -> list[SampleResult]:
        """Sample every image of the per-device batch; ``scorer`` is required (see ``Scorer``).

        The scorer is called at most once, under ``torch.no_grad()``, on the negatives of the images
        that need any (``n_exp > 0``), and not at all when no image does.
        """
        _check_batch("ScoreHLRSampler", assigns, candidates)
        if scorer is None:
            raise ValueError("ScoreHLRSampler.sample_batch needs scorer=: a callable that applies the current box "
                             "branch (RoIAlign, shared FCs, fc_cls / fc_reg) to a list of per-image boxes")
        quota = int(self.num * self.pos_fraction)
        positives = [_sample_positives(assign, quota, generator) for assign in assigns]
        batch = self._gather_negatives(assigns, candidates, positives)
        neg_inds, neg_weights = self._sample_negatives(batch, scorer, generator)
        return [SampleResult(pos, neg, w) for pos, neg, w in zip(positives, neg_inds, neg_weights)]

    # ---- bookkeeping per image ----------------------------------------------------------------

    def _gather_negatives(self, assigns: Sequence[AssignResult], candidates: Sequence[Tensor],
                          positives: list[Tensor]) -> _NegativeBatch:
        """Concatenate the negatives of the images with a non-zero budget ``n_exp``."""
        device = candidates[0].device if len(candidates) else torch.device("cpu")
        rois, imgs, cands, budgets = [], [], [], []
        for i, (assign, cand, pos) in enumerate(zip(assigns, candidates, positives)):
            neg = _nonzero(assign.neg_mask).to(cand.device)
            budget = min(neg.numel(), _negative_budget(self.num, pos.numel(), self.neg_pos_ub))
            budgets.append(budget)
            if budget > 0:
                rois.append(cand[neg].detach())
                imgs.append(torch.full_like(neg, i))
                cands.append(neg)
        budget = torch.tensor(budgets, dtype=torch.long, device=device)
        if not rois:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return _NegativeBatch(torch.zeros(0, 4, device=device), empty, empty.clone(), budget)
        return _NegativeBatch(torch.cat(rois), torch.cat(imgs), torch.cat(cands), budget)

    # ---- the batched heavy part -----------------------------------------------------------------

    def _score(self, scorer: Scorer, batch: _NegativeBatch) -> tuple[Tensor, Tensor, Tensor]:
        """One no-grad scorer call on every image's negatives (an image without any gets ``(0, 4)``).

        Returns ``s (M,)``, the boxes ``(M, 4)`` decoded from the class-``c_j`` deltas, and ``L (M,)``.
        """
        counts = torch.bincount(batch.img, minlength=batch.budget.numel()).tolist()
        rois = list(batch.rois.split(counts))
        with torch.no_grad():
            logits, deltas = scorer(rois)
        logits, deltas = upcast(logits.detach()), upcast(deltas.detach())
        self._check_scorer_output(logits, deltas, batch.rois.shape[0])
        probs = torch.softmax(logits, dim=1)
        scores, classes = probs[:, : self.num_classes].max(dim=1)
        background = torch.full_like(classes, self.num_classes)
        losses = softmax_cross_entropy(logits, background) * self.cls_loss_weight
        if deltas.shape[1] != 4:
            deltas = deltas.view(deltas.shape[0], self.num_classes, 4)
            deltas = deltas[torch.arange(deltas.shape[0], device=deltas.device), classes]
        boxes = self.coder.decode(batch.rois, deltas)
        return scores, boxes, losses

    def _check_scorer_output(self, logits: Tensor, deltas: Tensor, num_rois: int) -> None:
        c = self.num_classes
        if logits.shape != (num_rois, c + 1):
            raise ValueError(f"ScoreHLRSampler: the scorer returned logits of shape {tuple(logits.shape)} for "
                             f"{num_rois} boxes; expected ({num_rois}, {c + 1}) (num_classes + 1, background last)")
        if deltas.dim() != 2 or deltas.shape[0] != num_rois or deltas.shape[1] not in (4, 4 * c):
            raise ValueError(f"ScoreHLRSampler: the scorer returned deltas of shape {tuple(deltas.shape)} for "
                             f"{num_rois} boxes; expected ({num_rois}, {4 * c}) (class-specific) or ({num_rois}, 4)")

    def _sample_negatives(self, batch: _NegativeBatch, scorer: Scorer,
                          generator: torch.Generator | None) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: selected candidate indices in output order and their float32 weights."""
        budgets = batch.budget.tolist()
        if batch.rois.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long, device=batch.budget.device)
            return [empty] * len(budgets), [empty.float()] * len(budgets)
        scores, boxes, losses = self._score(scorer, batch)
        valid = scores > self.score_thr
        num_images = batch.budget.numel()
        num_valid = torch.bincount(batch.img[valid], minlength=num_images)
        n_hlr = torch.minimum(num_valid, batch.budget)
        upper = torch.maximum(num_valid, batch.budget).clamp(min=1).to(torch.float32)

        # Rank the valid negatives (per image), keep the top n_hlr; rank invalid ones by a random key.
        rank = torch.zeros_like(batch.img)
        valid_inds = _nonzero(valid)
        rank[valid_inds] = score_hlr(boxes[valid_inds], scores[valid_inds], self.iou_thr,
                                     batch_ids=batch.img[valid_inds], legacy_float_keys=self.legacy_float_keys)
        invalid_inds = _nonzero(~valid)
        rank[invalid_inds] = self._random_ranks(batch.img[invalid_inds], num_images, generator)
        chosen = torch.where(valid, rank < n_hlr[batch.img], rank < (batch.budget - n_hlr)[batch.img])

        # Output order: image, then ranked before fillers, then rank (fillers: random draw order).
        sel = _nonzero(chosen)
        key = batch.img[sel] * (2 * batch.rois.shape[0]) + (~valid[sel]).long() * batch.rois.shape[0] + rank[sel]
        sel = sel[torch.argsort(key)]
        weights = self._weights(sel, valid, rank, n_hlr, upper, batch.img, losses, num_valid)
        return list(batch.cand[sel].split(budgets)), list(weights.split(budgets))

    def _random_ranks(self, img: Tensor, num_images: int, generator: torch.Generator | None) -> Tensor:
        """0-based position of each entry in a uniformly random order of its image's entries."""
        if img.numel() == 0:
            return img.clone()
        keys = torch.rand(img.numel(), generator=generator, device=_draw_device(generator, img.device))
        order = torch.argsort(keys.to(img.device))
        order = order[torch.argsort(img[order], stable=True)]  # image-major, random inside an image
        counts = torch.bincount(img, minlength=num_images)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(img.numel(), device=img.device) - starts[img[order]]
        return torch.empty_like(position).scatter_(0, order, position)

    def _weights(self, sel: Tensor, valid: Tensor, rank: Tensor, n_hlr: Tensor, upper: Tensor, img: Tensor,
                 losses: Tensor, num_valid: Tensor) -> Tensor:
        """float32 weights of the selected negatives ``sel`` (method spec §4.1 step 10)."""
        sel_img = img[sel]
        u = upper[sel_img]
        ranked = (u - rank[sel].float()) / u
        filler = (u - (n_hlr[sel_img] - 1).clamp(min=0).float()) / u  # the smallest ranked weight
        w = torch.where(valid[sel], ranked, filler)
        w = (self.bias + (1.0 - self.bias) * w).pow(self.k)
        loss = losses[sel]
        num_images = upper.numel()
        plain_sum = torch.zeros(num_images, dtype=loss.dtype, device=loss.device).index_add_(0, sel_img, loss)
        weighted_sum = torch.zeros_like(plain_sum).index_add_(0, sel_img, w * loss)
        usable = torch.isfinite(weighted_sum) & (weighted_sum > _MIN_NORMALISER)
        ratio = torch.where(usable, plain_sum / torch.where(usable, weighted_sum, torch.ones_like(weighted_sum)),
                            torch.ones_like(plain_sum))
        w = w * ratio[sel_img]
        # No valid negative in the image: the random fallback, weight 1 (method spec §4.1 step 5).
        return torch.where(num_valid[sel_img] > 0, w, torch.ones_like(w)).float()


# --------------------------------------------------------------------------------------------
# GTs as proposals
# --------------------------------------------------------------------------------------------

def add_gts_as_proposals(proposals: Tensor, gt_boxes: Tensor) -> Tensor:
    """Candidates of an R-CNN image: its GT boxes prepended to its proposals.

    Args:
        proposals: ``(R, 4)`` boxes (an ``(R, 5)`` tensor with a score column has the column dropped).
        gt_boxes: ``(G, 4)`` GT boxes of the image, in the same (input-image) coordinates.

    Returns:
        ``(G + R, 4)`` detached boxes, GTs first, in the proposals' dtype and device.
    """
    if proposals.dim() != 2 or proposals.shape[1] not in (4, 5):
        raise ValueError(f"add_gts_as_proposals: proposals must be (R, 4) or (R, 5), got {tuple(proposals.shape)}")
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"add_gts_as_proposals: gt_boxes must be (G, 4), got {tuple(gt_boxes.shape)}")
    gts = gt_boxes.to(device=proposals.device, dtype=proposals.dtype)
    return torch.cat([gts, proposals[:, :4]]).detach()


def force_gt_matches(assign: AssignResult, gt_labels: Tensor) -> AssignResult:
    """The assignment of ``add_gts_as_proposals``' candidates, from the assignment of the proposals alone.

    The ``G`` prepended GTs become positives of their own GT (``gt_inds = 1..G``, IoU 1, their labels);
    the proposals' entries follow unchanged. The proposals are assigned without the GTs among the
    priors, as the reference does: with low-quality matching on (Mask R-CNN), a GT among the priors
    would be its own best prior and take the rescue away from a proposal.

    Args:
        assign: assignment of the image's ``R`` proposals to its ``G`` GTs.
        gt_labels: ``(G,)`` int64 classes of the GTs.

    Returns:
        ``AssignResult`` over ``G + R`` candidates.
    """
    num_gts = assign.num_gts
    if gt_labels.shape != (num_gts,):
        raise ValueError(f"force_gt_matches: gt_labels must have shape ({num_gts},) for an assignment to "
                         f"{num_gts} GTs, got {tuple(gt_labels.shape)}")
    device = assign.gt_inds.device
    own = torch.arange(1, num_gts + 1, dtype=assign.gt_inds.dtype, device=device)
    return AssignResult(
        gt_inds=torch.cat([own, assign.gt_inds]),
        max_overlaps=torch.cat([torch.ones(num_gts, dtype=assign.max_overlaps.dtype, device=device),
                                assign.max_overlaps]),
        labels=torch.cat([gt_labels.to(device=device, dtype=assign.labels.dtype), assign.labels]),
        num_gts=num_gts,
    )
