"""PAA's anchor assignment: the batched on-device version against a straightforward per-GT loop.

    python scripts/bench_paa.py                    # 2 images x 50 GTs, 1333 x 800, R50 PAA anchors
    python scripts/bench_paa.py --gts 20 --repeats 5 --device cuda

Both start from the same initial positives (max-IoU 0.1 / 0.1, the same for both and not timed) and
their costs (synthetic: ``0.3 + 1.5·(1 − IoU)`` plus noise, as a trained model's focal + GIoU costs
grow as the IoU falls), and end with the PAA positives. The loop is the reference's shape: for every
GT, a top-9 per level, a sort, one scikit-learn-style float64 EM in numpy on the host, the cut. The
batched version is :func:`pisa.models.paa_head.paa_assign`. The script checks that both choose the same
positives and prints the median time of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import box_iou
from pisa.models.paa_head import paa_assign


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


def loop_assign(costs, rows, levels, num_rows, num_levels, topk=9) -> torch.Tensor:
    positive = torch.zeros(costs.shape[0], dtype=torch.bool, device=costs.device)
    for r in range(num_rows):
        picked = []
        for level in range(num_levels):
            idx = torch.nonzero((rows == r) & (levels == level)).squeeze(1)
            if idx.numel():
                picked.append(idx[costs[idx].topk(min(topk, idx.numel()), largest=False).indices])
        idx = torch.cat(picked) if picked else costs.new_zeros(0, dtype=torch.long)
        if idx.numel() < 2:
            continue
        values, order = costs[idx].sort()
        labels, scores = em_numpy(values.double().cpu().numpy())
        fg = np.flatnonzero(labels == 0)
        if fg.size:
            last = fg[np.argmax(scores[fg])]
            positive[idx[order][torch.as_tensor(fg[fg <= last], device=costs.device)]] = True
    return positive


def make_problem(num_images: int, num_gts: int, size: tuple[int, int], device, seed: int = 0):
    """Initial PAA positives of random GTs on R50 PAA anchors: costs, batch-wide GT rows, levels."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    strides = [8, 16, 32, 64, 128]
    generator = AnchorGenerator(strides, [1.0], octave_base_scale=8, scales_per_octave=1)
    sizes = [(-(-h // s), -(-w // s)) for s in strides]
    per_level = generator.grid_anchors(sizes, device=device)
    anchors = torch.cat(per_level)
    level = torch.cat([torch.full((a.shape[0],), i, device=device) for i, a in enumerate(per_level)])
    assigner = MaxIoUAssigner(0.1, 0.1, 0.0)
    costs, rows, levels = [], [], []
    for image in range(num_images):
        xy = torch.rand(num_gts, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(num_gts, 2, generator=gen) ** 2 * torch.tensor([w * 0.5, h * 0.5]) + 8
        gts = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1).to(device)
        result = assigner.assign(anchors, gts, torch.zeros(num_gts, dtype=torch.long, device=device))
        pos = torch.nonzero(result.gt_inds > 0).squeeze(1)
        gt = result.gt_inds[pos] - 1
        iou = box_iou(gts, anchors[pos])[gt, torch.arange(pos.numel(), device=device)]
        noise = torch.rand(pos.numel(), generator=gen).to(device) * 0.3
        costs.append(0.3 + 1.5 * (1 - iou) + noise)
        rows.append(gt + image * num_gts)
        levels.append(level[pos])
    return torch.cat(costs), torch.cat(rows), torch.cat(levels), num_images * num_gts, len(strides)


def timed(fn, repeats: int, device) -> tuple[float, torch.Tensor]:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--gts", type=int, default=50, help="GTs per image")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    problem = make_problem(args.images, args.gts, tuple(args.size), device)
    print(f"{args.images} images x {args.gts} GTs, {args.size[0]} x {args.size[1]}, {device}: "
          f"{problem[0].numel()} initial positives")
    timed(lambda: paa_assign(*problem), 1, device)  # warm-up
    t_batched, batched = timed(lambda: paa_assign(*problem), args.repeats, device)
    t_loop, looped = timed(lambda: loop_assign(*problem), args.repeats, device)
    same = bool(torch.equal(batched, looped))
    print(f"positives: batched {int(batched.sum())}, loop {int(looped.sum())}, identical: {same}")
    print(f"| PAA assignment (candidates, EM, cut), median of {args.repeats} | batched {1000 * t_batched:.1f} ms "
          f"| per-GT loop {1000 * t_loop:.1f} ms | {t_loop / t_batched:.1f}x |")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
