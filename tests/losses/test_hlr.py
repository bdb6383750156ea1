"""Tests for IoU-HLR ranks and GT group ids (T1 and T2 intermediates, D1, D9)."""

import pytest
import torch

from pisa.losses import HLRRank, gt_group_ids, iou_hlr

# T1 positives (label, group, IoU): p0 (0, g0, .90), p1 (0, g0, .60), p2 (0, g1, .75), p3 (0, g1, .85),
# p4 (1, g2, .55), p5 (0, g3, .70), p6 (0, g0, .80).
T1_LABELS = torch.tensor([0, 0, 0, 0, 1, 0, 0])
T1_GROUPS = torch.tensor([0, 0, 1, 1, 2, 3, 0])
T1_IOUS = torch.tensor([0.90, 0.60, 0.75, 0.85, 0.55, 0.70, 0.80])


def test_t1_ranks():
    # g0 by IoU: p0 .90, p6 .80, p1 .60 -> local 0, 1, 2; g1: p3 .85, p2 .75 -> 0, 1; p4, p5 alone -> 0.
    # Class 0 by (local, -IoU): p0 .90, p3 .85, p5 .70 | p6 .80, p2 .75 | p1 -> ranks p0 0, p3 1, p5 2,
    # p6 3, p2 4, p1 5; class 1: p4 -> 0. n_max = 6 (class 0 has six positives).
    hlr = iou_hlr(T1_LABELS, T1_GROUPS, T1_IOUS)
    assert isinstance(hlr, HLRRank)
    assert hlr.local_rank.tolist() == [0, 2, 1, 0, 0, 0, 1]
    assert hlr.rank.tolist() == [0, 5, 4, 1, 0, 2, 3]
    assert hlr.n_max.item() == 6 and hlr.n_max.dtype == torch.int64 and hlr.n_max.dim() == 0


def test_t1_ranks_legacy_float_keys_agree_away_from_ties():
    hlr = iou_hlr(T1_LABELS, T1_GROUPS, T1_IOUS, legacy_float_keys=True)
    assert hlr.rank.tolist() == [0, 5, 4, 1, 0, 2, 3]


def test_near_tie_exact_vs_legacy_float_keys():
    # Two class-0 singletons plus four members of one group so n_max = 6 and the float32 key
    # iou + 6 - loc has a spacing of ~4.8e-7. IoUs 0.5 and 0.5 + 1e-7 differ but their keys tie.
    labels = torch.zeros(6, dtype=torch.long)
    groups = torch.tensor([0, 1, 2, 2, 2, 2])
    ious = torch.tensor([0.5, 0.5 + 1e-7, 0.1, 0.2, 0.3, 0.4])
    assert ious[1] > ious[0]
    exact = iou_hlr(labels, groups, ious)
    legacy = iou_hlr(labels, groups, ious, legacy_float_keys=True)
    # Local rank 0: p1 (.5+), p0 (.5), p5 (.4). Exact: p1 before p0. Float keys tie -> stable -> p0 first.
    assert exact.rank[:2].tolist() == [1, 0]
    assert legacy.rank[:2].tolist() == [0, 1]
    assert exact.rank[2:].tolist() == legacy.rank[2:].tolist() == [5, 4, 3, 2]


def test_ties_go_to_lower_index():
    labels = torch.zeros(4, dtype=torch.long)
    hlr = iou_hlr(labels, torch.tensor([3, 3, 1, 1]), torch.full((4,), 0.7))
    assert hlr.local_rank.tolist() == [0, 1, 0, 1]
    assert hlr.rank.tolist() == [0, 2, 1, 3]


def test_groups_only_matter_within_a_class():
    # Same group id, different classes: each is alone in its (class, group) cell.
    hlr = iou_hlr(torch.tensor([0, 1, 2]), torch.tensor([5, 5, 5]), torch.tensor([0.2, 0.9, 0.5]))
    assert hlr.local_rank.tolist() == [0, 0, 0]
    assert hlr.rank.tolist() == [0, 0, 0]
    assert hlr.n_max.item() == 1


def test_empty():
    e = torch.zeros(0, dtype=torch.long)
    hlr = iou_hlr(e, e, torch.zeros(0))
    assert hlr.rank.numel() == 0 and hlr.local_rank.numel() == 0 and hlr.n_max.item() == 0


def test_random_matches_loop_definition():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (80,), generator=g)
    groups = torch.randint(0, 6, (80,), generator=g)
    ious = torch.randint(0, 10, (80,), generator=g).float() / 10  # many exact ties
    hlr = iou_hlr(labels, groups, ious)
    items = list(range(80))
    loc = {}
    for i in items:  # loop definition: rank inside (class, group) by IoU desc, ties to the lower index
        loc[i] = sum(1 for j in items if labels[j] == labels[i] and groups[j] == groups[i]
                     and (ious[j] > ious[i] or (ious[j] == ious[i] and j < i)))
    rank = {}
    for i in items:
        key_i = (loc[i], -ious[i].item(), i)
        rank[i] = sum(1 for j in items if labels[j] == labels[i] and (loc[j], -ious[j].item(), j) < key_i)
    assert hlr.local_rank.tolist() == [loc[i] for i in items]
    assert hlr.rank.tolist() == [rank[i] for i in items]
    assert hlr.n_max.item() == torch.bincount(labels).max().item()


# T2: image A GTs {0, 1, 2}, B {0}, C {0, 1}; one positive per GT in ascending flat order.
T2_IMG = torch.tensor([0, 0, 0, 1, 2, 2])
T2_GT = torch.tensor([0, 1, 2, 0, 0, 1])


def test_t2_group_ids_per_pair():
    ids = gt_group_ids(T2_IMG, T2_GT)
    assert ids.dtype == torch.int64
    assert len(set(ids.tolist())) == 6  # every (image, GT) pair is its own group


def test_t2_group_ids_legacy_offset_collides():
    # Offsets: A 0; B = max GT of A + 1 = 3; C = max GT of B + 1 = 1 (non-cumulative) -> C {1, 2}.
    ids = gt_group_ids(T2_IMG, T2_GT, legacy_gt_offset=True)
    assert ids.tolist() == [0, 1, 2, 3, 1, 2]


def test_legacy_offset_kept_across_image_without_positives():
    # Image 1 has no positives: image 2 keeps image 1's offset, i.e. 1 + max GT of image 0 = 3.
    ids = gt_group_ids(torch.tensor([0, 0, 2, 2]), torch.tensor([2, 1, 0, 4]), legacy_gt_offset=True)
    assert ids.tolist() == [2, 1, 3, 7]


def test_two_images_legacy_equals_unique_grouping():
    # With 2 images the legacy offsets never collide (harmless at 2 images per device).
    img, gt = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([3, 0, 0, 2, 0])
    legacy = gt_group_ids(img, gt, legacy_gt_offset=True)
    default = gt_group_ids(img, gt)
    same_legacy = legacy[:, None] == legacy[None, :]
    assert torch.equal(same_legacy, default[:, None] == default[None, :])


def test_legacy_requires_image_major_order():
    with pytest.raises(ValueError, match="non-decreasing"):
        gt_group_ids(torch.tensor([1, 0]), torch.tensor([0, 0]), legacy_gt_offset=True)


def test_group_ids_empty():
    e = torch.zeros(0, dtype=torch.long)
    assert gt_group_ids(e, e).numel() == 0 and gt_group_ids(e, e, legacy_gt_offset=True).numel() == 0
