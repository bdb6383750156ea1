"""PAA's assignment per training step: the batched version against a straightforward per-image, per-GT loop.

    python scripts/bench_paa.py                    # 2 images x 50 GTs, 800 x 1333, 80 classes, P3-P7
    python scripts/bench_paa.py --gts 20 --repeats 5 --device cuda

The problem: random GTs and labels on each image, random head outputs (class logits around -4, small
deltas) on PAA's R-50 anchors (one per location, 8 x stride, P3-P7 of the padded 800 x 1344 input:
22,400 per image). Two rows are timed, both ending with the PAA positives of every image:

* the whole assignment, from the head outputs: max-IoU 0.1 / 0.1 initial positives, their costs
  (focal summed over classes + 1.3 (1 - GIoU) of the decoded prediction), the candidates, the EM,
  the cut. Batched: :meth:`pisa.models.paa_head.PAALoss.assign`. Loop, the reference's structure:
  per image the max-IoU assignment and the costs of its positives (the same assigner and cost
  function), then per GT the 9 lowest costs on each level, a sort, one scikit-learn-style float64
  EM in numpy on the host, the cut;
* the part that the per-GT loop replaces, from the same costs: candidates, EM, cut.
  Batched: :func:`pisa.models.paa_head.paa_assign`; loop: the per-GT part of the loop above.

The script checks that both choose the same positives (exit status 1 otherwise) and prints the
median time of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.paa_head import PAALoss, paa_assign
from pisa.models.retina_head import flatten_levels, level_anchors

STRIDES = (8, 16, 32, 64, 128)


def em_numpy(x: np.ndarray, tol=1e-3, max_iter=100, reg_covar=1e-6):
    """One two-component mixture (scikit-learn's steps): component labels and log-likelihoods."""
    w, mu, var = np.array([0.5, 0.5]), np.array([x.min(), x.max()]), np.array([1.0, 1.0])
    bound = -np.inf

    def weighted(w, mu, var):
        return -0.5 * (np.log(2 * np.pi) + (x[:, None] - mu) ** 2 / var) - 0.5 * np.log(var) + np.log(w)

    for _ in range(max_iter):
        lp = weighted(w, mu, var)
        norm = np.logaddexp(lp[:, 0], lp[:, 1])
        resp = np.exp(lp - norm[:, None])
        nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
        mu = resp.T @ x / nk
        var = (resp * (x[:, None] - mu) ** 2).sum(0) / nk + reg_covar
        w = nk / x.size
        prev, bound = bound, norm.mean()
        if abs(bound - prev) < tol:
            break
    lp = weighted(w, mu, var)
    return (lp[:, 1] > lp[:, 0]).astype(np.int64), np.logaddexp(lp[:, 0], lp[:, 1])


def loop_assign_gts(costs, rows, levels, num_rows, num_levels, topk=9) -> torch.Tensor:
    """bool ``(P,)`` PAA positives among the initial positives, one GT after the other."""
    positive = torch.zeros(costs.shape[0], dtype=torch.bool, device=costs.device)
    for r in range(num_rows):
        picked = []
        for level in range(num_levels):
            idx = torch.nonzero((rows == r) & (levels == level)).squeeze(1)
            if idx.numel():
                # topk of the lowest, equal costs in index order (as the batched selection keeps them)
                picked.append(idx[costs[idx].sort(stable=True).indices[:topk]])
        idx = torch.cat(picked) if picked else costs.new_zeros(0, dtype=torch.long)
        if idx.numel() < 2:
            continue
        values, order = costs[idx].sort(stable=True)
        labels, scores = em_numpy(values.double().cpu().numpy())
        fg = np.flatnonzero(labels == 0)
        if fg.size:
            last = fg[np.argmax(scores[fg])]
            positive[idx[order][torch.as_tensor(fg[fg <= last], device=costs.device)]] = True
    return positive


def loop_assign(loss: PAALoss, logits, deltas, anchors_per_level, feature_sizes, targets) -> list[torch.Tensor]:
    """Per image: max-IoU, the costs of its positives, then the per-GT loop; its PAA positives' anchor indices."""
    anchors = torch.cat(anchors_per_level)
    level_of_anchor = torch.cat([torch.full((a.shape[0],), i, device=anchors.device)
                                 for i, a in enumerate(anchors_per_level)])
    num = anchors.shape[0]
    positives = []
    for image, target in enumerate(targets):
        valid = loss.anchor_generator.batch_valid_flags(feature_sizes, [loss._valid_shape(target["img_shape"])],
                                                        device=anchors.device)[0]
        result = loss.assigner.assign(anchors, target["boxes"], target["labels"], valid=valid)
        pos = torch.nonzero(result.gt_inds > 0).squeeze(1)
        gt = result.gt_inds[pos] - 1
        gt_boxes = target["boxes"][gt]
        image_logits, image_deltas = logits[image * num:(image + 1) * num], deltas[image * num:(image + 1) * num]
        boxes = loss.coder.decode(anchors[pos], image_deltas[pos])
        costs = loss.anchor_costs(image_logits[pos], result.labels[pos], boxes, gt_boxes)
        keep = loop_assign_gts(costs, gt, level_of_anchor[pos], target["boxes"].shape[0], len(anchors_per_level),
                               loss.paa.topk)
        positives.append(pos[keep] + image * num)
    return positives


def make_problem(num_images: int, num_gts: int, size: tuple[int, int], num_classes: int, device, seed: int = 0):
    """PAA's criterion, flattened random head outputs and random targets on a padded batch."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    generator = AnchorGenerator(list(STRIDES), [1.0], octave_base_scale=8, scales_per_octave=1)
    loss = PAALoss(num_classes, generator, DeltaXYWHCoder((0, 0, 0, 0), (0.1, 0.1, 0.2, 0.2)),
                   MaxIoUAssigner(0.1, 0.1, 0.0))
    padded = (-(-h // 32) * 32, -(-w // 32) * 32)
    maps = [torch.empty(num_images, 1, -(-padded[0] // s), -(-padded[1] // s), device=device) for s in STRIDES]
    feature_sizes, anchors_per_level = level_anchors(generator, maps)
    cls = [torch.randn(num_images, num_classes, *m.shape[2:], generator=gen) - 4 for m in maps]
    box = [torch.randn(num_images, 4, *m.shape[2:], generator=gen) * 0.5 for m in maps]
    logits = flatten_levels(cls, num_classes).reshape(-1, num_classes).to(device)
    deltas = flatten_levels(box, 4).reshape(-1, 4).to(device)
    targets = []
    for _ in range(num_images):
        xy = torch.rand(num_gts, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(num_gts, 2, generator=gen) ** 2 * torch.tensor([w * 0.5, h * 0.5]) + 8
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, num_classes, (num_gts,), generator=gen)
                        .to(device), "img_shape": (h, w)})
    return loss, (logits, deltas, anchors_per_level, feature_sizes, targets)


def timed(fn, repeats: int, device) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), out


def costs_problem(loss: PAALoss, logits, deltas, anchors_per_level, feature_sizes, targets):
    """The batched path's initial positives and costs: (initial, costs, batch-wide GT rows, levels, #GT, #levels)."""
    t = loss.get_targets(anchors_per_level, feature_sizes, targets)
    initial = torch.nonzero(t.labels < loss.num_classes).squeeze(1)
    gt_boxes, rows = loss._matched_gt_boxes(targets, t.gt_inds[initial], t.img_inds[initial])
    boxes = loss.coder.decode(t.priors[initial], deltas[initial])
    costs = loss.anchor_costs(logits[initial], t.labels[initial], boxes, gt_boxes)
    level_of_anchor = torch.cat([torch.full((a.shape[0],), i, device=logits.device)
                                 for i, a in enumerate(anchors_per_level)]).repeat(len(targets))
    return initial, (costs, rows, level_of_anchor[initial], sum(x["boxes"].shape[0] for x in targets),
                     len(anchors_per_level))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--gts", type=int, default=50, help="GTs per image")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if min(args.images, args.gts, args.classes, args.repeats, *args.size) < 1:
        parser.error("--images, --gts, --classes, --repeats and --size must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available; use --device cpu")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    loss, problem = make_problem(args.images, args.gts, tuple(args.size), args.classes, device)
    initial, from_costs = costs_problem(loss, *problem)
    print(f"{args.images} images x {args.gts} GTs, {args.size[0]} x {args.size[1]}, {args.classes} classes, "
          f"{device}: {problem[0].shape[0] // args.images} anchors per image, {initial.numel()} initial positives")

    with torch.no_grad():
        timed(lambda: loss.assign(*problem), 1, device)  # warm-up
        t_batched, batched = timed(lambda: loss.assign(*problem), args.repeats, device)
        t_loop, looped = timed(lambda: loop_assign(loss, *problem), args.repeats, device)
        t_batched_em, batched_em = timed(lambda: paa_assign(*from_costs, loss.paa), args.repeats, device)
        t_loop_em, looped_em = timed(lambda: loop_assign_gts(*from_costs, loss.paa.topk), args.repeats, device)
    same = torch.equal(batched.positives, torch.cat(looped)) and torch.equal(batched_em, looped_em)
    same = same and torch.equal(initial[batched_em], batched.positives)
    print(f"positives: batched {batched.positives.numel()}, loop {sum(p.numel() for p in looped)}, "
          f"identical: {same}")
    rows = (("PAA assignment per step (max-IoU, costs, candidates, EM, cut)", t_batched, t_loop),
            ("of which the per-GT part (candidates, EM, cut) from the same costs", t_batched_em, t_loop_em))
    for name, fast, slow in rows:
        print(f"| {name}, median of {args.repeats} | batched {1000 * fast:.1f} ms | per-image / per-GT loop "
              f"{1000 * slow:.1f} ms | {slow / fast:.1f}x |")
    if not same:
        print("error: the batched and the looped assignment chose different positives", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
