"""Score-HLR sampler (ISR-N): the batched ``ScoreHLRSampler`` against a per-group Python loop.

The loop computes the same samples and weights the way the reference lays the work out: one image at
a time, one scoring call per image, grouping by a greedy pass that opens one group per leader, a
Python loop over the groups to write each member's float importance key ``V - rank_in_group + s``,
then sorts. The batched sampler makes one scoring call for the batch and groups and ranks all images'
negatives together with block masks (``pisa.losses.score_hlr``).

Inputs are realistic in size: per image ~2000 proposals (most jittered around the GTs, the rest
anywhere), 50 GTs in a 1333x800 image, 80 classes, 512 samples at 0.25 positives. The scores come
from a fixed random-feature model of the RoI geometry (overlapping RoIs score alike), evaluated once
up front and then looked up, so that the timings compare the samplers and not a stand-in head (a real
box head costs the same per RoI on both sides); ``--bg-logit`` sets how many negatives clear the 0.05
floor. Before timing, the two implementations are checked to rank the same negatives with the same
relative weights (the fillers are random on both sides, and through them the renormalisation).

    python scripts/bench_samplers.py
    python scripts/bench_samplers.py --images 2 --proposals 2000 --gts 50 --repeat 20 --device cuda

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from pisa.losses import score_hlr
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder, box_iou
from pisa.models.samplers import ScoreHLRSampler, add_gts_as_proposals, force_gt_matches

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_retinanet import timed_interleaved  # noqa: E402  (the shared timing helper)

IMAGE_H, IMAGE_W = 800, 1333


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def random_boxes(n: int, g: torch.Generator, min_size: float = 16, max_size: float = 400) -> torch.Tensor:
    """``(n, 4)`` boxes with log-uniform sizes, aspect ratios in [1/2, 2], inside the image."""
    size = torch.exp(math.log(min_size) + torch.rand(n, generator=g) * math.log(max_size / min_size))
    ratio = torch.exp((torch.rand(n, generator=g) - 0.5) * 2 * math.log(2))
    w, h = size / ratio.sqrt(), size * ratio.sqrt()
    cx = w / 2 + torch.rand(n, generator=g) * (IMAGE_W - w).clamp(min=1)
    cy = h / 2 + torch.rand(n, generator=g) * (IMAGE_H - h).clamp(min=1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def jittered(gts: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` proposals around random GTs: centre shifts up to ±50 % of the size, scale 0.5-2."""
    base = gts[torch.randint(gts.shape[0], (n,), generator=g)]
    w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    cx = (base[:, 0] + base[:, 2]) / 2 + (torch.rand(n, generator=g) - 0.5) * w
    cy = (base[:, 1] + base[:, 3]) / 2 + (torch.rand(n, generator=g) - 0.5) * h
    w = w * torch.exp((torch.rand(n, generator=g) - 0.5) * 2 * math.log(2))
    h = h * torch.exp((torch.rand(n, generator=g) - 0.5) * 2 * math.log(2))
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    return torch.stack([boxes[:, 0].clamp(0, IMAGE_W), boxes[:, 1].clamp(0, IMAGE_H),
                        boxes[:, 2].clamp(0, IMAGE_W), boxes[:, 3].clamp(0, IMAGE_H)], dim=1)


def make_batch(args, g: torch.Generator):
    """Per image: candidates (GTs prepended) and their assignment (R-CNN 0.5/0.5/0.5, Faster R-CNN)."""
    assigner = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False)
    candidates, assigns = [], []
    for _ in range(args.images):
        gts = random_boxes(args.gts, g)
        labels = torch.randint(args.classes, (args.gts,), generator=g)
        num_jittered = int(args.proposals * 0.5)
        proposals = torch.cat([jittered(gts, num_jittered, g), random_boxes(args.proposals - num_jittered, g)])
        assign = assigner.assign(proposals, gts, labels)
        candidates.append(add_gts_as_proposals(proposals, gts).to(args.device))
        assign = force_gt_matches(assign, labels)
        for field in ("gt_inds", "max_overlaps", "labels"):
            setattr(assign, field, getattr(assign, field).to(args.device))
        assigns.append(assign)
    return candidates, assigns


class GeometryScorer:
    """A fixed stand-in for the box branch: logits and class-specific deltas from random Fourier
    features of each RoI's centre and log size. Overlapping RoIs get similar scores, as they do from
    a real head. Counts its calls."""

    def __init__(self, num_classes: int, bg_logit: float, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.freq = (torch.randn(4, 64, generator=g) * 3).to(device)
        self.w_cls = (torch.randn(128, num_classes + 1, generator=g) * 0.15).to(device)
        self.w_reg = (torch.randn(128, 4 * num_classes, generator=g) * 0.05).to(device)
        self.bg_logit = bg_logit
        self.calls = 0

    def __call__(self, rois: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        boxes = torch.cat(rois)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / (2 * IMAGE_W), (boxes[:, 1] + boxes[:, 3]) / (2 * IMAGE_H)
        geometry = torch.stack([cx, cy, w.clamp(min=1).log() / 6, h.clamp(min=1).log() / 6], dim=1)
        phase = geometry @ self.freq
        features = torch.cat([phase.sin(), phase.cos()], dim=1)
        logits = features @ self.w_cls
        logits[:, -1] += self.bg_logit
        return logits, features @ self.w_reg


class CachedScorer:
    """``GeometryScorer``'s outputs for each image's negatives, computed once; a call looks each given
    box tensor up among them (it must be one image's negatives, in ascending candidate order)."""

    def __init__(self, scorer: GeometryScorer, negatives: list[torch.Tensor]):
        self.entries = []
        with torch.no_grad():
            for boxes in negatives:
                self.entries.append((boxes, *scorer([boxes])))
        self.calls = 0

    def __call__(self, rois: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        logits, deltas = [], []
        for boxes in rois:
            if boxes.shape[0] == 0:
                continue
            match = [e for e in self.entries if e[0].shape == boxes.shape and torch.equal(e[0], boxes)]
            if not match:
                raise RuntimeError("CachedScorer: the boxes are not one image's negatives")
            logits.append(match[0][1])
            deltas.append(match[0][2])
        return torch.cat(logits), torch.cat(deltas)


# --------------------------------------------------------------------------------------------
# the per-group loop
# --------------------------------------------------------------------------------------------

def greedy_groups(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float) -> list[torch.Tensor]:
    """NMS clusters, one loop iteration per group: the best unsuppressed box leads, every unsuppressed
    box with IoU >= thr joins (members in score order)."""
    order = torch.argsort(scores, descending=True, stable=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    groups = []
    for leader in order.tolist():
        if suppressed[leader]:
            continue
        members = ~suppressed & (box_iou(boxes[leader:leader + 1], boxes, eps=0.0)[0] >= iou_thr)
        members[leader] = True
        groups.append(order[members[order]])
        suppressed |= members
    return groups


def loop_positives(sampler: ScoreHLRSampler, assigns, generator) -> list[torch.Tensor]:
    """Positives per image, drawn image after image before any negative (the batched sampler's order
    of draws, so that both sides pick the same positives from the same generator state)."""
    quota, positives = int(sampler.num * sampler.pos_fraction), []
    for assign in assigns:
        pos = torch.nonzero(assign.gt_inds > 0).squeeze(1)
        if pos.numel() > quota:
            pos = pos[torch.randperm(pos.numel(), generator=generator, device=generator.device)[:quota].to(pos.device)]
        positives.append(pos)
    return positives


def loop_sample(sampler: ScoreHLRSampler, assigns, candidates, scorer, generator):
    """The same samples as ``sampler.sample_batch``, image by image and group by group.

    Returns per image ``(pos_inds, neg_inds, neg_weights, n_hlr)``. The fillers are drawn with a
    ``randperm`` per image, so they are other random invalid negatives than the batched sampler's.
    """
    num_classes, results = sampler.num_classes, []
    for assign, cand, pos in zip(assigns, candidates, loop_positives(sampler, assigns, generator)):
        neg = torch.nonzero(assign.gt_inds == 0).squeeze(1)
        n_exp = min(neg.numel(), sampler.num - pos.numel())
        with torch.no_grad():
            logits, deltas = scorer([cand[neg]])
        loss = F.cross_entropy(logits, torch.full_like(neg, num_classes), reduction="none") * sampler.cls_loss_weight
        scores, classes = logits.softmax(dim=1)[:, :num_classes].max(dim=1)
        valid = torch.nonzero(scores > sampler.score_thr).squeeze(1)
        invalid = torch.nonzero(scores <= sampler.score_thr).squeeze(1)
        num_valid = valid.numel()
        n_hlr = min(num_valid, n_exp)
        if num_valid == 0:
            pick = torch.randperm(neg.numel(), generator=generator, device=generator.device)[:n_exp].to(neg.device)
            results.append((pos, neg[pick], torch.ones(n_exp, device=neg.device), 0))
            continue
        class_deltas = deltas[valid].view(num_valid, num_classes, 4)[torch.arange(num_valid), classes[valid]]
        boxes = sampler.coder.decode(cand[neg][valid], class_deltas)
        importance = torch.zeros(num_valid, device=neg.device)
        for group in greedy_groups(boxes, scores[valid], sampler.iou_thr):
            in_group = torch.arange(group.numel(), device=neg.device).float()
            importance[group] = num_valid - in_group + scores[valid][group]
        order = importance.sort(descending=True).indices
        rank = order.sort().indices
        selected = valid[order[:n_hlr]]
        if n_exp > n_hlr:
            fill = torch.randperm(invalid.numel(), generator=generator, device=generator.device)[: n_exp - n_hlr]
            selected = torch.cat([selected, invalid[fill.to(neg.device)]])
        upper = max(n_exp, num_valid)
        weights = torch.ones(n_exp, device=neg.device)
        weights[:n_hlr] = (upper - rank[order[:n_hlr]].float()) / upper
        weights[n_hlr:] = weights[:n_hlr].min()
        weights = (sampler.bias + (1 - sampler.bias) * weights).pow(sampler.k)
        selected_loss = loss[selected]
        weights = weights * selected_loss.sum() / (selected_loss * weights).sum()
        results.append((pos, neg[selected], weights, n_hlr))
    return results


def check_agreement(batched, looped) -> tuple[int, float]:
    """(ranked negatives whose index differs, largest difference of the weights relative to the
    image's first weight) between the two implementations. Fillers are random on both sides: only
    their (common) weight is compared, and relative weights do not depend on the renormalisation,
    which the fillers' losses enter."""
    differing, max_diff = 0, 0.0
    for b, (pos, neg, w, n_hlr) in zip(batched, looped):
        if b.pos_inds.tolist() != pos.tolist() or b.neg_inds.numel() != neg.numel():
            raise SystemExit("bench_samplers: the loop and the batched sampler disagree on the sample counts or "
                             "positives; the comparison below would be meaningless")
        differing += int((b.neg_inds[:n_hlr] != neg[:n_hlr]).sum())
        if neg.numel():
            relative = (b.neg_weights / b.neg_weights[0] - w.float() / w[0]).abs().max()
            max_diff = max(max_diff, float(relative))
    return differing, max_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--proposals", type=int, default=2000)
    parser.add_argument("--gts", type=int, default=50)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--bg-logit", type=float, default=4.5,
                        help="added to the background logit; larger means fewer negatives above the floor")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    candidates, assigns = make_batch(args, torch.Generator().manual_seed(args.seed))
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    negs = [c[a.gt_inds == 0] for c, a in zip(candidates, assigns)]
    geometry = GeometryScorer(args.classes, args.bg_logit, args.device)
    scorer = CachedScorer(geometry, negs)
    exact = ScoreHLRSampler(args.num, 0.25, num_classes=args.classes, coder=coder)
    legacy = ScoreHLRSampler(args.num, 0.25, num_classes=args.classes, coder=coder, legacy_float_keys=True)

    def generator():
        return torch.Generator(device=args.device).manual_seed(args.seed)

    looped = loop_sample(exact, assigns, candidates, scorer, generator())
    scorer.calls = 0
    batched = exact.sample_batch(assigns, candidates, scorer=scorer, generator=generator())
    assert scorer.calls == 1, "the batched sampler must score the whole batch in one call"
    diff_exact = check_agreement(batched, looped)
    diff_legacy = check_agreement(legacy.sample_batch(assigns, candidates, scorer=scorer, generator=generator()),
                                  looped)

    # Problem size as the sampler sees it.
    with torch.no_grad():
        logits, _ = geometry(negs)
    scores = logits.softmax(dim=1)[:, :-1].max(dim=1).values
    valid_per_image = [int(s.gt(0.05).sum()) for s in scores.split([n.shape[0] for n in negs])]
    print(f"device {args.device}, threads {torch.get_num_threads()}, {args.images} images x "
          f"{args.proposals} proposals + {args.gts} GTs, {args.classes} classes, {args.num} samples")
    for i, (a, v) in enumerate(zip(assigns, valid_per_image)):
        print(f"  image {i}: {int(a.pos_mask.sum())} positives, {int(a.neg_mask.sum())} negatives, "
              f"{v} above the 0.05 floor")
    print(f"agreement with the loop: exact keys {diff_exact[0]} differing ranked negatives (near-ties of the "
          f"float key), max |dw/w0| {diff_exact[1]:.2e}; legacy float keys {diff_legacy[0]} differing, "
          f"max |dw/w0| {diff_legacy[1]:.2e}")

    fns = {
        "batched": lambda: exact.sample_batch(assigns, candidates, scorer=scorer, generator=generator()),
        "loop": lambda: loop_sample(exact, assigns, candidates, scorer, generator()),
    }
    medians = timed_interleaved(fns, args.device, args.warmup, args.repeat)
    print(f"Score-HLR sampler, median of {args.repeat}: batched {medians['batched']:.1f} ms, "
          f"per-group loop {medians['loop']:.1f} ms, loop / batched = {medians['loop'] / medians['batched']:.2f}x")

    # Where the time goes: the shared grouping + ranking against the loop's grouping.
    valid_boxes, valid_scores, valid_img = [], [], []
    for i, (n, s) in enumerate(zip(negs, scores.split([n.shape[0] for n in negs]))):
        keep = s > 0.05
        valid_boxes.append(n[keep])
        valid_scores.append(s[keep])
        valid_img.append(torch.full((int(keep.sum()),), i, dtype=torch.long, device=args.device))
    boxes, score, img = torch.cat(valid_boxes), torch.cat(valid_scores), torch.cat(valid_img)
    parts = timed_interleaved({
        "score_hlr": lambda: score_hlr(boxes, score, 0.5, batch_ids=img),
        "greedy_groups": lambda: [greedy_groups(b, s, 0.5) for b, s in zip(valid_boxes, valid_scores)],
    }, args.device, args.warmup, args.repeat)
    print(f"  of which grouping + ranking (all images): batched score_hlr {parts['score_hlr']:.1f} ms; "
          f"the loop's greedy grouping alone {parts['greedy_groups']:.1f} ms")


if __name__ == "__main__":
    main()
