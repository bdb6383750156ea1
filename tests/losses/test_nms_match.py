"""Tests for nms_match and Score-HLR (T7), and parity of the vectorised grouping with a plain loop."""

import numpy as np
import pytest
import torch

from pisa.losses import hlr, nms_match, score_hlr

# T7: nine negatives; decoded box = RoI. Valid (score > 0.05) = {0, 1, 2, 3, 4, 6, 7}.
T7_BOXES = torch.tensor([
    [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 1, 10, 11], [52, 50, 62, 60],
    [100, 100, 110, 110], [5, 0, 15, 10], [0, 0, 10, 5], [200, 200, 210, 210]], dtype=torch.float32)
T7_SCORES = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.2, 0.04, 0.6, 0.1, 0.05])
T7_VALID = [0, 1, 2, 3, 4, 6, 7]


def loop_nms_match(boxes: np.ndarray, scores: np.ndarray, thr: float, batch: np.ndarray):
    """Plain greedy definition (method spec §4.2), one box at a time, float32 IoU."""
    boxes, scores = boxes.astype(np.float32), scores.astype(np.float32)
    order = sorted(range(len(scores)), key=lambda i: (batch[i], -scores[i], i))
    group = [-1] * len(scores)
    rank = [-1] * len(scores)
    num_groups = 0
    for p, a in enumerate(order):
        if group[a] >= 0:
            continue
        group[a], rank[a], size = num_groups, 0, 1
        for b in order[p + 1:]:
            if group[b] >= 0 or batch[b] != batch[a]:
                continue
            w = max(np.float32(0), min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0]))
            h = max(np.float32(0), min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1]))
            inter = np.float32(w * h)
            area_a = np.float32((boxes[a, 2] - boxes[a, 0]) * (boxes[a, 3] - boxes[a, 1]))
            area_b = np.float32((boxes[b, 2] - boxes[b, 0]) * (boxes[b, 3] - boxes[b, 1]))
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.float32(inter / np.float32(area_a + area_b - inter))
            if iou >= np.float32(thr):
                group[b], rank[b], size = num_groups, size, size + 1
        num_groups += 1
    return group, rank


def test_t7_groups_and_ranks():
    boxes, scores = T7_BOXES[T7_VALID], T7_SCORES[T7_VALID]
    group, rank = nms_match(boxes, scores, 0.5)
    # Groups [[n0, n1, n3, n7], [n2, n4], [n6]] in leader order; n7 joins at IoU exactly 0.5 (>=).
    assert group.tolist() == [0, 0, 1, 0, 1, 2, 0]
    assert rank.tolist() == [0, 1, 0, 2, 1, 0, 3]


def test_exact_threshold_uses_greater_equal():
    # IoU([0,0,10,10], [0,0,10,5]) = 50 / 100 = 0.5 exactly; just above the threshold they split.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    assert nms_match(boxes, torch.tensor([0.9, 0.1]), 0.5)[0].tolist() == [0, 0]
    assert nms_match(boxes, torch.tensor([0.9, 0.1]), 0.5000001)[0].tolist() == [0, 1]


def test_members_compare_with_leaders_only():
    # b is suppressed by a; c overlaps b (>= .5) but not a, so c leads its own group.
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    group, rank = nms_match(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.4)
    assert group.tolist() == [0, 0, 1] and rank.tolist() == [0, 1, 0]


def test_t7_score_hlr():
    ranks = score_hlr(T7_BOXES[T7_VALID], T7_SCORES[T7_VALID], 0.5)
    # HLR order n0, n2, n6, n1, n4, n3, n7 -> rank of (n0, n1, n2, n3, n4, n6, n7).
    assert ranks.tolist() == [0, 3, 1, 5, 4, 2, 6]
    legacy = score_hlr(T7_BOXES[T7_VALID], T7_SCORES[T7_VALID], 0.5, legacy_float_keys=True)
    assert legacy.tolist() == ranks.tolist()


def test_score_hlr_per_batch_id():
    # T7 twice, as images 1 and 0, interleaved: each image gets the single-image ranks.
    boxes = torch.cat([T7_BOXES[T7_VALID], T7_BOXES[T7_VALID] + 0.25])
    scores = torch.cat([T7_SCORES[T7_VALID], T7_SCORES[T7_VALID]])
    batch = torch.tensor([1] * 7 + [0] * 7)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(0))
    ranks = score_hlr(boxes[perm], scores[perm], 0.5, batch_ids=batch[perm])
    restored = torch.empty_like(ranks).scatter_(0, perm, ranks)
    assert restored.tolist() == [0, 3, 1, 5, 4, 2, 6] * 2
    group, _ = nms_match(boxes[perm], scores[perm], 0.5, batch_ids=batch[perm])
    group = torch.empty_like(group).scatter_(0, perm, group)
    # Groups are numbered by (batch id, leader score): image 0's three groups come first.
    assert group.tolist() == [3, 3, 4, 3, 4, 5, 3] + [0, 0, 1, 0, 1, 2, 0]


def test_score_hlr_near_tie_exact_vs_legacy():
    # Two far-apart leaders whose scores differ by ~3e-8 (one float32 step near 0.3). The reference
    # key V - g + s = 2.3 has a float32 spacing of ~2.4e-7, so the keys tie and the stable sort keeps
    # index order; the exact sort puts the higher score first.
    boxes = torch.tensor([[0.0, 0, 1, 1], [5, 5, 6, 6]])
    scores = torch.tensor([0.3, 0.3 + 3e-8])
    assert scores[1] > scores[0]
    assert score_hlr(boxes, scores).tolist() == [1, 0]
    assert score_hlr(boxes, scores, legacy_float_keys=True).tolist() == [0, 1]


def _random_case(seed: int, num: int, num_batches: int):
    g = torch.Generator().manual_seed(seed)
    # Integer corners on a small grid give many exact IoU ties with 0.5, score ties and a few
    # degenerate (zero-area) boxes.
    xy = torch.randint(0, 12, (num, 2), generator=g).float()
    wh = torch.randint(0, 7, (num, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randint(0, 6, (num,), generator=g).float() / 5
    batch = torch.randint(0, num_batches, (num,), generator=g) * 3 + 2  # sparse, unsorted ids
    return boxes, scores, batch


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.5, 0.3])
def test_vectorised_equals_loop(seed, thr):
    boxes, scores, batch = _random_case(seed, 70, num_batches=3)
    group, rank = nms_match(boxes, scores, thr, batch_ids=batch)
    ref_group, ref_rank = loop_nms_match(boxes.numpy(), scores.numpy(), thr, batch.numpy())
    assert group.tolist() == ref_group
    assert rank.tolist() == ref_rank


def test_vectorised_equals_loop_single_image_random_floats():
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(120, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(120, 2, generator=g) * 20], dim=1)
    scores = torch.rand(120, generator=g)
    group, rank = nms_match(boxes, scores, 0.5)
    ref_group, ref_rank = loop_nms_match(boxes.numpy(), scores.numpy(), 0.5, np.zeros(120, dtype=np.int64))
    assert group.tolist() == ref_group and rank.tolist() == ref_rank


def test_chain_of_overlaps():
    # A sliding chain where every box overlaps the next: leaders alternate (worst case for rounds).
    x = torch.arange(40, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(40), x + 10, torch.full((40,), 10.0)], dim=1)
    scores = torch.linspace(1, 0.1, 40)
    group, rank = nms_match(boxes, scores, 0.5)
    ref_group, ref_rank = loop_nms_match(boxes.numpy(), scores.numpy(), 0.5, np.zeros(40, dtype=np.int64))
    assert group.tolist() == ref_group and rank.tolist() == ref_rank


def test_low_precision_and_empty():
    boxes, scores = T7_BOXES[T7_VALID], T7_SCORES[T7_VALID]
    for dtype in (torch.float16, torch.bfloat16):
        g16, r16 = nms_match(boxes.to(dtype), scores.to(dtype), 0.5)
        g32, r32 = nms_match(boxes.to(dtype).float(), scores.to(dtype).float(), 0.5)
        assert torch.equal(g16, g32) and torch.equal(r16, r32)
    group, rank = nms_match(torch.zeros(0, 4), torch.zeros(0))
    assert group.numel() == 0 and rank.numel() == 0
    assert score_hlr(torch.zeros(0, 4), torch.zeros(0)).numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    boxes, scores, batch = _random_case(11, 300, num_batches=4)
    cpu = nms_match(boxes, scores, 0.5, batch_ids=batch)
    gpu = nms_match(boxes.cuda(), scores.cuda(), 0.5, batch_ids=batch.cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    ranks = score_hlr(boxes.cuda(), scores.cuda(), 0.5, batch_ids=batch.cuda())
    assert torch.equal(ranks.cpu(), score_hlr(boxes, scores, 0.5, batch_ids=batch))


# --------------------------------------------------------------------------------------------
# randomized equivalence with a plain greedy loop
# --------------------------------------------------------------------------------------------

def greedy_loop(boxes: np.ndarray, thr: float, batch: np.ndarray, visit: list[int]):
    """The greedy definition (method spec §4.2) over an explicit visiting order: each box not yet
    taken leads a group and takes every later untaken box of its image with IoU >= thr. The IoUs
    of one leader with all boxes are float32 numpy arithmetic (the same IEEE operations, NaN
    propagating through min/max as in torch)."""
    boxes = boxes.astype(np.float32)
    thr = np.float32(thr)
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    group = np.full(len(boxes), -1)
    rank = np.full(len(boxes), -1)
    num_groups = 0
    for p, a in enumerate(visit):
        if group[a] >= 0:
            continue
        w = np.maximum(np.minimum(x2[a], x2) - np.maximum(x1[a], x1), np.float32(0))
        h = np.maximum(np.minimum(y2[a], y2) - np.maximum(y1[a], y1), np.float32(0))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (area[a] + area - inter)
        group[a], rank[a], size = num_groups, 0, 1
        for b in visit[p + 1:]:
            if group[b] < 0 and batch[b] == batch[a] and iou[b] >= thr:
                group[b], rank[b], size = num_groups, size, size + 1
        num_groups += 1
    return group.tolist(), rank.tolist()


def stable_visit(scores: np.ndarray, batch: np.ndarray) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (batch[i], -scores[i], i))


def _hard_case(seed: int):
    """A mixed case: 1-4 images (sparse, unsorted ids), 20-160 boxes, half on an integer grid (exact
    IoU ties with 0.5, zero-area boxes) and half random floats, exact duplicates of some boxes, and
    scores from a coarse grid (many exact ties) or continuous."""
    g = torch.Generator().manual_seed(1000 + seed)
    num = int(torch.randint(20, 160, (1,), generator=g))
    grid_xy = torch.randint(0, 16, (num, 2), generator=g).float()
    grid = torch.cat([grid_xy, grid_xy + torch.randint(0, 8, (num, 2), generator=g).float()], dim=1)
    xy = torch.rand(num, 2, generator=g) * 60
    floats = torch.cat([xy, xy + torch.rand(num, 2, generator=g) * 30], dim=1)
    boxes = torch.where(torch.rand(num, 1, generator=g) < 0.5, grid, floats)
    dup = torch.randint(0, num, (num // 5,), generator=g)
    boxes[torch.randint(0, num, (num // 5,), generator=g)] = boxes[dup]
    if seed % 2:
        scores = torch.randint(0, 4, (num,), generator=g).float() / 4
    else:
        scores = torch.rand(num, generator=g)
    num_images = 1 + seed % 4
    batch = torch.randint(0, num_images, (num,), generator=g) * 5 + 3
    return boxes, scores, batch


@pytest.mark.parametrize("thr", [0.5, 0.3, 0.7, 1.0])
def test_randomized_equivalence_with_greedy_loop(thr, monkeypatch):
    # 40 seeds per threshold; the dense fallback must not be needed for any of them.
    monkeypatch.setattr(hlr, "_dense_grouping", _no_dense)
    for seed in range(40):
        boxes, scores, batch = _hard_case(seed)
        group, rank = nms_match(boxes, scores, thr, batch_ids=batch)
        b = batch.numpy()
        ref = greedy_loop(boxes.numpy(), thr, b, stable_visit(scores.numpy(), b))
        assert (group.tolist(), rank.tolist()) == ref, f"seed {seed}"


def test_randomized_equivalence_legacy_sort():
    # The compat visiting order (per image, torch.sort on CPU) through the same greedy loop.
    for seed in range(20):
        boxes, scores, batch = _hard_case(seed)
        group, rank = nms_match(boxes, scores, 0.5, batch_ids=batch, legacy_sort=True)
        visit = []
        for image in sorted(set(batch.tolist())):
            members = torch.nonzero(batch == image).squeeze(1)
            visit += members[torch.sort(scores[members], descending=True).indices].tolist()
        assert (group.tolist(), rank.tolist()) == greedy_loop(boxes.numpy(), 0.5, batch.numpy(), visit)


def _no_dense(*args):
    raise AssertionError("the dense fallback ran on inputs the sparse grouping covers")


@pytest.mark.parametrize("thr", [0.0, -0.5, 1e-50])
def test_thresholds_at_or_below_zero_group_disjoint_boxes(thr):
    # IoU 0 >= thr for non-overlapping pairs (1e-50 rounds to 0 in float32): the dense path.
    for seed in range(6):
        boxes, scores, batch = _hard_case(seed)
        b = batch.numpy()
        ref = greedy_loop(boxes.numpy(), thr, b, stable_visit(scores.numpy(), b))
        group, rank = nms_match(boxes, scores, thr, batch_ids=batch)
        assert (group.tolist(), rank.tolist()) == ref
    far = torch.tensor([[0.0, 0, 1, 1], [5, 5, 6, 6]])
    assert nms_match(far, torch.tensor([0.9, 0.8]), thr)[0].tolist() == [0, 0]  # IoU 0 / 1 = 0
    points = torch.tensor([[9.0, 9, 9, 9], [9, 9, 9, 9]])
    assert nms_match(points, torch.tensor([0.9, 0.8]), thr)[0].tolist() == [0, 1]  # 0 / 0 never joins


def test_non_finite_coordinates_take_the_dense_path():
    boxes, scores, batch = _hard_case(3)
    boxes[[0, 5]] = torch.tensor([[float("nan"), 0, 10, 10], [0, 0, float("inf"), 10]])
    b = batch.numpy()
    ref = greedy_loop(boxes.numpy(), 0.5, b, stable_visit(scores.numpy(), b))
    group, rank = nms_match(boxes, scores, 0.5, batch_ids=batch)
    assert (group.tolist(), rank.tolist()) == ref


def test_one_ulp_either_side_of_the_threshold():
    # IoU([0,0,10,10], [0,0,10,y]) = 10y / 100 in float32. Scan y a few ulps around 5 for the three
    # IoUs 0.5 - ulp, 0.5 and 0.5 + ulp: only the last two join at thr = 0.5.
    ys = [torch.tensor(5.0)]
    for direction in (-1.0, 6.0):
        y = torch.tensor(5.0)
        for _ in range(4):
            y = torch.nextafter(y, torch.tensor(direction))
            ys.append(y)
    found = {}
    for y in ys:
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, float(y)]])
        iou = float(hlr._iou(boxes[0], boxes[1]))
        found[iou] = nms_match(boxes, torch.tensor([0.9, 0.1]), 0.5)[0].tolist()
    half = torch.tensor(0.5)
    below = float(torch.nextafter(half, torch.tensor(0.0)))
    above = float(torch.nextafter(half, torch.tensor(1.0)))
    assert {below, 0.5, above} <= set(found)
    assert found[below] == [0, 1] and found[0.5] == [0, 0] and found[above] == [0, 0]


def test_sparse_grouping_equals_dense_grouping():
    # The two private groupings on the same layout: identical keep masks and leaders.
    for seed in range(10):
        boxes, scores, batch = _hard_case(seed)
        order = torch.argsort(batch * 10 - scores, stable=True)
        b = batch[order]
        new = torch.ones_like(b, dtype=torch.bool)
        new[1:] = b[1:] != b[:-1]
        run = torch.cumsum(new.long(), 0) - 1
        sizes = torch.bincount(run).tolist()
        start = torch.tensor([0] + sizes[:-1]).cumsum(0)[run]
        lay = hlr._Layout(boxes[order], run, torch.arange(len(b)) - start, start, sizes)
        sparse, dense = hlr._sparse_grouping(lay, 0.5), hlr._dense_grouping(lay, 0.5)
        assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[1], dense[1])
