"""Compat mode (``legacy_float_keys=True``) reproduces the reference's order of exact ties.

The reference ranks with ``torch.sort(key, descending=True)``, which is not stable: on CPU equal keys
keep their index order only in tensors of at most 16 elements. Each test sorts more than 16 exact
ties, ranks them with a direct re-implementation of the reference's loops written here (per class and
GT for IoU-HLR, per image for Score-HLR, the same unstable sorts on the same sub-tensors), and checks
that compat mode equals it while the default mode equals the stable rule (ties to the lower index).
"""

import torch
from torchvision.ops import box_iou

from pisa.losses import iou_hlr, isr_p, nms_match, score_hlr


def reference_iou_hlr(labels, gts, ious):
    """IoU-HLR the way the reference computes it: a loop over classes, and over the GTs of a class.

    Per GT, the unstable sort of its positives' IoUs gives local ranks ``loc``; the float32 key
    ``iou + n_max - loc`` is then sorted (unstably) over the positives of the class. Returns
    ``(local_rank, rank)``.
    """
    key = ious.clone().float()
    n_max = torch.bincount(labels).max()
    local_rank, rank = torch.zeros_like(labels), torch.zeros_like(labels)
    for c in torch.unique(labels):
        of_class = torch.nonzero(labels == c).flatten()
        for g in torch.unique(gts[of_class]):
            of_gt = of_class[gts[of_class] == g]
            loc = torch.sort(key[of_gt], descending=True)[1].sort()[1]
            local_rank[of_gt] = loc
            key[of_gt] += n_max - loc.float()
        rank[of_class] = torch.sort(key[of_class], descending=True)[1].sort()[1]
    return local_rank, rank


def stable_iou_hlr_rank(labels, gts, ious):
    """The default rule by definition: ``loc`` by (IoU desc, index); rank by (loc, IoU desc, index)."""
    items = range(len(labels))
    loc = [sum(1 for j in items if labels[j] == labels[i] and gts[j] == gts[i]
               and (ious[j] > ious[i] or (ious[j] == ious[i] and j < i))) for i in items]
    keys = [(loc[i], -ious[i].item(), i) for i in items]
    return [sum(1 for j in items if labels[j] == labels[i] and keys[j] < keys[i]) for i in items]


def tied_positives():
    """47 positives, all with IoU 0.75 (exact ties everywhere), interleaved in flat order:
    class 0: 18 positives of GT 0 (a group of > 16 ties) and 19 singletons (GTs 1..19), so 20 positives
    share local rank 0; class 1: 10 positives of GT 0. n_max = 37."""
    labels = torch.tensor([0] * 37 + [1] * 10)
    gts = torch.tensor([0] * 18 + list(range(1, 20)) + [0] * 10)
    perm = torch.randperm(47, generator=torch.Generator().manual_seed(0))
    return labels[perm], gts[perm], torch.full((47,), 0.75)


def test_iou_hlr_compat_equals_reference_on_ties():
    labels, gts, ious = tied_positives()
    ref_local, ref_rank = reference_iou_hlr(labels, gts, ious)
    compat = iou_hlr(labels, gts, ious, legacy_float_keys=True)
    assert compat.local_rank.tolist() == ref_local.tolist()
    assert compat.rank.tolist() == ref_rank.tolist()
    assert compat.n_max.item() == 37
    # The default stays the stable rule, and here the two orders really differ.
    default = iou_hlr(labels, gts, ious)
    assert default.rank.tolist() == stable_iou_hlr_rank(labels, gts, ious)
    assert default.rank.tolist() != compat.rank.tolist()
    assert default.local_rank.tolist() != compat.local_rank.tolist()


def test_iou_hlr_compat_with_near_ties_and_distinct_values():
    # IoUs on a coarse grid (many exact ties) plus values 1e-7 apart (float32 keys tie near 40),
    # 3 classes and up to 12 GTs: the whole ranking must match the reference's, index for index.
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (120,), generator=g)
    gts = torch.randint(0, 12, (120,), generator=g)
    ious = torch.randint(0, 4, (120,), generator=g).float() / 4 + torch.randint(0, 2, (120,), generator=g) * 1e-7
    ref_local, ref_rank = reference_iou_hlr(labels, gts, ious)
    compat = iou_hlr(labels, gts, ious, legacy_float_keys=True)
    assert compat.local_rank.tolist() == ref_local.tolist()
    assert compat.rank.tolist() == ref_rank.tolist()
    assert iou_hlr(labels, gts, ious).rank.tolist() == stable_iou_hlr_rank(labels, gts, ious)


def test_isr_p_compat_weights_follow_the_reference_ranks():
    # Predictions equal to targets: every IoU is exactly 1, so every key ties. Equal losses L = 1
    # make the normalisation ratio = P / Σ w, with w = ((n_max - r) / n_max)^2 (k = 2, bias 0).
    labels, gts, _ = tied_positives()
    n = labels.shape[0]
    inputs = dict(cls_score=torch.ones(n, 3), bbox_pred=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n),
                  labels=labels, label_weights=torch.ones(n), bbox_targets=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n),
                  priors=torch.zeros(n, 4), gt_inds=gts, img_inds=torch.zeros(n, dtype=torch.long))
    settings = dict(num_classes=2, decode=lambda priors, deltas: deltas, cls_loss=lambda x, y: x[:, 0])

    def expected(rank):
        w = ((37 - rank.double()) / 37) ** 2
        return (w * n / w.sum()).float()

    _, ref_rank = reference_iou_hlr(labels, gts, torch.ones(n))
    compat = isr_p(**inputs, **settings, legacy_float_keys=True)
    torch.testing.assert_close(compat, expected(ref_rank), atol=1e-6, rtol=0)
    default = isr_p(**inputs, **settings)
    stable = torch.tensor(stable_iou_hlr_rank(labels, gts, torch.ones(n)))
    torch.testing.assert_close(default, expected(stable), atol=1e-6, rtol=0)
    assert (default - compat).abs().max() > 0.1  # tied samples really swap weights


def reference_score_hlr_one_image(boxes, scores, iou_thr=0.5):
    """Score-HLR of one image's valid negatives the way the reference computes it.

    Grouping: the CPU op visits boxes in ``torch.sort(scores, descending=True)`` order (unstable) and
    a leader takes every later unsuppressed box with IoU >= thr. Ranking: key ``V - g + s`` in float32,
    sorted unstably. Returns ``(groups as lists, rank)``.
    """
    num = scores.shape[0]
    visit = torch.sort(scores.cpu(), descending=True)[1].tolist()
    iou = box_iou(boxes, boxes)
    taken, groups = set(), []
    for p, a in enumerate(visit):
        if a in taken:
            continue
        members = [a] + [b for b in visit[p + 1:] if b not in taken and iou[a, b] >= iou_thr]
        taken.update(members)
        groups.append(members)
    key = torch.zeros(num)
    for members in groups:
        key[members] = num - torch.arange(len(members)).float() + scores[members]
    return groups, torch.sort(key, descending=True)[1].sort()[1]


def tied_negatives(shift=0.0):
    """38 negatives of one image: 20 disjoint boxes of score 0.5 (20 leaders with equal keys V + 0.5)
    and 18 copies of one box with score 0.3 (one group whose leader and order come from the tie order)."""
    x = torch.arange(20, dtype=torch.float32) * 20 + shift
    isolated = torch.stack([x, torch.zeros(20), x + 10, torch.full((20,), 10.0)], dim=1)
    copies = torch.tensor([[0.0, 100.0, 10.0, 110.0]]).repeat(18, 1)
    boxes = torch.cat([isolated, copies])
    scores = torch.cat([torch.full((20,), 0.5), torch.full((18,), 0.3)])
    perm = torch.randperm(38, generator=torch.Generator().manual_seed(2))
    return boxes[perm], scores[perm]


def test_nms_match_legacy_sort_equals_reference_groups():
    boxes, scores = tied_negatives()
    groups, _ = reference_score_hlr_one_image(boxes, scores)
    group_id, rank_in_group = nms_match(boxes, scores, 0.5, legacy_sort=True)
    for members in groups:
        assert len(set(group_id[members].tolist())) == 1
        assert rank_in_group[members].tolist() == list(range(len(members)))
    # Default: the shared box's group is led by its lowest index, members in index order.
    _, stable_rank = nms_match(boxes, scores, 0.5)
    copy_members = sorted(groups[-1])
    assert stable_rank[copy_members].tolist() == list(range(18))
    assert rank_in_group[copy_members].tolist() != list(range(18))


def test_score_hlr_compat_equals_reference_on_tied_keys():
    boxes, scores = tied_negatives()
    _, ref_rank = reference_score_hlr_one_image(boxes, scores)
    compat = score_hlr(boxes, scores, 0.5, legacy_float_keys=True)
    assert compat.tolist() == ref_rank.tolist()
    # Default: (g, -s, index): the 20 leaders of score .5 by index, then the copies' leader (lowest
    # index), then its 17 members by index.
    default = score_hlr(boxes, scores, 0.5)
    half = (scores == 0.5).nonzero().flatten().tolist()
    copies = (scores == 0.3).nonzero().flatten().tolist()
    expected = torch.empty(38, dtype=torch.long)
    expected[half + copies] = torch.arange(38)
    assert default.tolist() == expected.tolist()
    assert default.tolist() != compat.tolist()


def test_score_hlr_compat_per_image_layout():
    # Two images interleaved through batch_ids: each image is ranked on its own negatives in
    # ascending index order, as the reference's per-image sampler sees them.
    boxes_a, scores_a = tied_negatives()
    boxes_b, scores_b = tied_negatives(shift=3.0)
    batch = torch.tensor([0, 1] * 38)
    boxes = torch.stack([boxes_a, boxes_b], dim=1).reshape(-1, 4)
    scores = torch.stack([scores_a, scores_b], dim=1).reshape(-1)
    compat = score_hlr(boxes, scores, 0.5, batch_ids=batch, legacy_float_keys=True)
    for image in (0, 1):
        mine = batch == image
        assert compat[mine].tolist() == reference_score_hlr_one_image(boxes[mine], scores[mine])[1].tolist()
