import pytest
import torch
from torchvision.models.detection._utils import Matcher

from pisa.models import assigners
from pisa.models.assigners import MaxIoUAssigner, pairwise_iou
from pisa.models.box_coder import box_iou


def strips(*spans: tuple[float, float]) -> torch.Tensor:
    """Boxes ``[x1, 0, x2, 10]``: with a shared y range, IoU is the 1-D IoU of the x intervals."""
    return torch.tensor([[x1, 0.0, x2, 10.0] for x1, x2 in spans])


def retinanet_assigner(**kwargs) -> MaxIoUAssigner:
    return MaxIoUAssigner(0.5, 0.4, **kwargs)


def test_thresholds_positive_negative_in_between():
    gt = strips((0, 10))
    # IoU with [0, 10]: 1, 10/20 = 0.5, 5/15 = 0.333, 10/22 = 0.4545, 10/25 = 0.4, 0.
    priors = strips((0, 10), (0, 20), (5, 15), (0, 22), (0, 25), (100, 110))
    result = retinanet_assigner(match_low_quality=False).assign(priors, gt, torch.tensor([3]))
    # ≥ 0.5 positive (0.5 included); < 0.4 background; [0.4, 0.5) ignored (0.4 included).
    assert result.gt_inds.tolist() == [1, 1, 0, -1, -1, 0]
    assert result.labels.tolist() == [3, 3, -1, -1, -1, -1]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([1.0, 0.5, 1 / 3, 10 / 22, 0.4, 0.0]))
    assert result.pos_mask.tolist() == [True, True, False, False, False, False]
    assert result.neg_mask.tolist() == [False, False, True, False, False, True]
    assert result.num_gts == 1 and result.gt_inds.dtype == torch.int64


def test_negative_range_tuple():
    gt = strips((0, 10))
    priors = strips((0, 10), (5, 15), (100, 110))  # IoU 1, 1/3, 0
    result = MaxIoUAssigner(0.5, (0.1, 0.4), match_low_quality=False).assign(priors, gt, torch.tensor([0]))
    assert result.gt_inds.tolist() == [1, 0, -1]  # IoU 0 is below the range: ignored, not background


def test_low_quality_rescue_with_ties():
    gt = strips((0, 10))
    # IoU 1/3, 1/3 (a tie for the GT's best), 1/4, 0: all below the negative threshold.
    priors = strips((0, 30), (-20, 10), (0, 40), (100, 110))
    labels = torch.tensor([7])
    assert retinanet_assigner(match_low_quality=False).assign(priors, gt, labels).gt_inds.tolist() == [0, 0, 0, 0]
    # RetinaNet: every prior tying the GT's max is rescued.
    assert retinanet_assigner().assign(priors, gt, labels).gt_inds.tolist() == [1, 1, 0, 0]
    # SSD: only the first argmax.
    argmax_only = retinanet_assigner(gt_max_assign_all=False).assign(priors, gt, labels)
    assert argmax_only.gt_inds.tolist() == [1, 0, 0, 0]
    assert argmax_only.labels.tolist() == [7, -1, -1, -1]
    # RPN-style min_pos_iou: a best IoU of 1/3 is rescued at 0.3 but not at 0.4.
    assert retinanet_assigner(min_pos_iou=0.3).assign(priors, gt, labels).gt_inds.tolist() == [1, 1, 0, 0]
    assert retinanet_assigner(min_pos_iou=0.4).assign(priors, gt, labels).gt_inds.tolist() == [0, 0, 0, 0]


def test_later_gt_wins_the_low_quality_step():
    small, large = (0, 10), (0, 40)
    # Prior [0, 12]: IoU 10/12 = 0.833 with the small GT (its argmax), 12/40 = 0.3 with the large GT, for
    # which it is also the best prior. The reference visits GTs in order, so the later GT keeps it.
    priors = strips((0, 12), (100, 110))
    for all_max in (True, False):
        assigner = retinanet_assigner(gt_max_assign_all=all_max)
        result = assigner.assign(priors, strips(small, large), torch.tensor([0, 1]))
        assert result.gt_inds.tolist() == [2, 0]
        assert result.labels.tolist() == [1, -1]
        swapped = assigner.assign(priors, strips(large, small), torch.tensor([1, 0]))
        assert swapped.gt_inds.tolist() == [2, 0]
        assert swapped.labels.tolist() == [0, -1]
        torch.testing.assert_close(swapped.max_overlaps, torch.tensor([10 / 12, 0.0]))


def test_gt_overlapping_no_prior_claims_every_zero_iou_prior():
    # Reference behaviour with min_pos_iou = 0: a GT's best IoU of 0 passes "≥ min_pos_iou", so every
    # prior tying that max (all priors it does not touch) is claimed. Argmax-only claims the first one.
    priors = strips((0, 10), (20, 30))
    gts = strips((0, 10), (200, 210))
    assert retinanet_assigner().assign(priors, gts, torch.tensor([0, 1])).gt_inds.tolist() == [2, 2]
    argmax_only = retinanet_assigner(gt_max_assign_all=False).assign(priors, gts, torch.tensor([0, 1]))
    assert argmax_only.gt_inds.tolist() == [2, 0]


def test_no_gt_gives_background_except_ignored():
    priors = strips((0, 10), (5, 15), (20, 30))
    empty = torch.zeros(0, 4)
    result = retinanet_assigner().assign(priors, empty, torch.zeros(0, dtype=torch.int64))
    assert result.gt_inds.tolist() == [0, 0, 0] and result.labels.tolist() == [-1, -1, -1]
    assert result.num_gts == 0
    valid = torch.tensor([True, False, True])
    assert retinanet_assigner().assign(priors, empty, torch.zeros(0, dtype=torch.int64),
                                       valid=valid).gt_inds.tolist() == [0, -1, 0]
    crowd = strips((18, 40))
    ignored = retinanet_assigner(ignore_iof_thr=0.5).assign(priors, empty, torch.zeros(0, dtype=torch.int64),
                                                            ignore_boxes=crowd)
    assert ignored.gt_inds.tolist() == [0, 0, -1]
    none = retinanet_assigner().assign(torch.zeros(0, 4), strips((0, 10)), torch.tensor([0]))
    assert none.gt_inds.shape == (0,) and none.labels.shape == (0,)


def test_crowd_regions_are_ignored():
    gt = strips((0, 10))
    crowd = strips((100, 200))
    # IoF with the crowd over the prior's area: p0 0, p1 10/20 = 0.5 (not > 0.5), p2 15/20 = 0.75,
    # p3 inside the crowd and far from the GT. p0 is positive, p1..p3 have IoU 0 with the GT.
    priors = strips((0, 10), (90, 110), (95, 115), (150, 160))
    labels = torch.tensor([0])
    result = retinanet_assigner(ignore_iof_thr=0.5).assign(priors, gt, labels, ignore_boxes=crowd)
    assert result.gt_inds.tolist() == [1, 0, -1, -1]
    assert result.max_overlaps[2:].tolist() == [-1.0, -1.0]
    # Disabled by the default threshold.
    assert retinanet_assigner().assign(priors, gt, labels, ignore_boxes=crowd).gt_inds.tolist() == [1, 0, 0, 0]
    # A crowd-covered prior is never positive, and the GT's rescue moves to its best remaining prior.
    priors = strips((0, 10), (0, 14))  # IoU 1 and 10/14
    crowd = strips((-5, 10))  # covers p0 entirely, p1 by 10/14 = 0.71
    result = MaxIoUAssigner(0.9, 0.4, ignore_iof_thr=0.8).assign(priors, gt, labels, ignore_boxes=crowd)
    assert result.gt_inds.tolist() == [-1, 1]


def test_invalid_priors_are_ignored_as_if_absent():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=generator) * 100
    priors = torch.cat([xy, xy + torch.rand(400, 2, generator=generator) * 40 + 4], dim=1)
    gt_xy = torch.rand(6, 2, generator=generator) * 100
    gts = torch.cat([gt_xy, gt_xy + torch.rand(6, 2, generator=generator) * 40 + 4], dim=1)
    labels = torch.arange(6)
    valid = torch.rand(400, generator=generator) > 0.3
    # The GTs' best priors are invalid: their rescue must fall on the best valid prior.
    valid[box_iou(gts, priors).argmax(dim=1)] = False
    for all_max in (True, False):
        assigner = retinanet_assigner(gt_max_assign_all=all_max)
        masked = assigner.assign(priors, gts, labels, valid=valid)
        removed = assigner.assign(priors[valid], gts, labels)
        assert (masked.gt_inds[~valid] == -1).all()
        assert torch.equal(masked.gt_inds[valid], removed.gt_inds)
        assert torch.equal(masked.labels[valid], removed.labels)


def random_scene(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Priors on a coarse grid and GTs in near-duplicate pairs, so some GTs share their best prior."""
    centres = torch.stack(torch.meshgrid(torch.arange(0, 120, 12.0), torch.arange(0, 120, 12.0),
                                         indexing="ij"), dim=-1).reshape(-1, 2)
    sizes = torch.tensor([16.0, 24.0, 32.0])
    priors = torch.cat([torch.cat([centres - s / 2, centres + s / 2], dim=1) for s in sizes])
    gt_xy = torch.rand(8, 2, generator=generator) * 100
    gt_wh = torch.rand(8, 2, generator=generator) * 40 + 4
    gts = torch.cat([gt_xy, gt_xy + gt_wh], dim=1)
    gts = torch.cat([gts, gts + torch.rand(8, 4, generator=generator) * 2]).reshape(2, 8, 4).transpose(0, 1)
    return priors, gts.reshape(-1, 4)


def loop_assign(ious: torch.Tensor, pos: float, neg: float, min_pos: float, all_max: bool) -> torch.Tensor:
    """The reference's rules written plainly, one GT at a time: the ground truth for the vectorised code."""
    max_iou, argmax_gt = ious.max(dim=0)
    gt_inds = torch.full((ious.shape[1],), -1)
    gt_inds[(max_iou >= 0) & (max_iou < neg)] = 0
    gt_inds[max_iou >= pos] = argmax_gt[max_iou >= pos] + 1
    for g in range(ious.shape[0]):
        best = ious[g].max()
        if best >= min_pos:
            if all_max:
                gt_inds[ious[g] == best] = g + 1
            else:
                gt_inds[ious[g].argmax()] = g + 1
    return gt_inds


def test_vectorised_rescue_equals_the_per_gt_loop():
    for seed in range(4):
        priors, gts = random_scene(torch.Generator().manual_seed(seed))
        ious = box_iou(gts, priors)
        for all_max in (True, False):
            for min_pos in (0.0, 0.3):
                assigner = MaxIoUAssigner(0.5, 0.4, min_pos_iou=min_pos, gt_max_assign_all=all_max)
                result = assigner.assign(priors, gts, torch.arange(len(gts)))
                assert torch.equal(result.gt_inds, loop_assign(ious, 0.5, 0.4, min_pos, all_max))


def test_parity_with_torchvision_matcher():
    # torchvision's Matcher(0.5, 0.4, low-quality) uses the same thresholds and the same "each GT's
    # best priors (with ties) are positive" rescue, so the categories agree exactly. It differs in WHICH
    # GT a rescued prior gets: the prior's own argmax GT there, the last GT claiming it here (reference).
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    assigner = retinanet_assigner()
    checked_conflicts = 0
    for seed in range(5):
        priors, gts = random_scene(torch.Generator().manual_seed(seed))
        ious = box_iou(gts, priors)
        ours = assigner.assign(priors, gts, torch.zeros(len(gts), dtype=torch.int64)).gt_inds
        theirs = matcher(ious.clone())
        # Categories: our -1 / 0 / k ↔ torchvision -2 (between) / -1 (below) / k − 1.
        assert torch.equal(ours == -1, theirs == -2)
        assert torch.equal(ours == 0, theirs == -1)
        assert torch.equal(ours > 0, theirs >= 0)
        # Indices: the same unless a GT other than the prior's argmax claims it in the rescue step.
        claims = ious == ious.max(dim=1, keepdim=True).values  # (G, N)
        argmax_gt = ious.argmax(dim=0)
        foreign = claims & (torch.arange(len(gts))[:, None] != argmax_gt[None, :])
        conflict = foreign.any(dim=0)
        agree = (ours > 0) & ~conflict
        assert torch.equal(ours[agree] - 1, theirs[agree])
        last_claimer = torch.tensor([int(claims[:, j].nonzero().max()) if conflict[j] else -1
                                     for j in range(len(priors))])
        assert torch.equal(ours[conflict] - 1, last_claimer[conflict])
        checked_conflicts += int((conflict & (ours - 1 != theirs)).sum())
    assert checked_conflicts > 0, "the scenes must exercise the convention difference"


# ---- batched assignment ------------------------------------------------------------------------------


def reference_assign(assigner: MaxIoUAssigner, priors, gts, labels, crowd=None, valid=None):
    """The assigner's rules for one image written plainly (box_iou, boolean indexing, one GT at a time):
    the ground truth that the batched, blocked, padded code must reproduce bit for bit."""
    count = priors.shape[0]
    excluded = torch.zeros(count, dtype=torch.bool)
    if assigner.ignore_iof_thr > 0 and crowd is not None and crowd.numel() > 0:
        excluded |= box_iou(priors, crowd, mode="iof").max(dim=1).values > assigner.ignore_iof_thr
    if valid is not None:
        excluded |= ~valid
    if gts.shape[0] == 0:
        gt_inds, max_iou = torch.zeros(count, dtype=torch.int64), torch.zeros(count)
        gt_inds[excluded], max_iou[excluded] = -1, -1.0
        return gt_inds, max_iou, torch.full((count,), -1)
    ious = box_iou(gts, priors)
    ious[:, excluded] = -1.0
    max_iou, argmax_gt = ious.max(dim=0)
    gt_inds = torch.full((count,), -1)
    low, high = assigner.neg_range
    gt_inds[(max_iou >= low) & (max_iou < high)] = 0
    positive = max_iou >= assigner.pos_iou_thr
    gt_inds[positive] = argmax_gt[positive] + 1
    if assigner.match_low_quality:
        for g in range(gts.shape[0]):
            best = ious[g].max()
            if best >= assigner.min_pos_iou:
                if assigner.gt_max_assign_all:
                    gt_inds[ious[g] == best] = g + 1
                else:
                    gt_inds[ious[g].argmax()] = g + 1
    gt_inds[excluded] = -1
    out_labels = torch.full((count,), -1)
    out_labels[gt_inds > 0] = labels[gt_inds[gt_inds > 0] - 1]
    return gt_inds, max_iou, out_labels


def random_batch(seed: int):
    """Four images sharing one prior set: 0, 16, 5 and 3 GTs; crowds in two; per-image valid masks.

    A random third of the priors is repeated at the end, so every GT whose best prior is among them has
    an exact tie for its max IoU (all-max claims both copies, argmax-only the first). Image 1's GTs come
    in near-duplicate pairs (GTs sharing a best prior) and repeat one GT exactly (the later one wins);
    image 3 has a GT beyond every prior (best IoU 0: with min_pos_iou 0 it claims every prior it misses).
    """
    generator = torch.Generator().manual_seed(seed)
    priors, pair_gts = random_scene(generator)
    priors = torch.cat([priors, priors[torch.randperm(len(priors), generator=generator)[: len(priors) // 3]]])

    def boxes(n: int, extent: float = 100.0) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=generator) * extent
        return torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * 40 + 4], dim=1)

    gts = [torch.zeros(0, 4), torch.cat([pair_gts[:15], pair_gts[3:4]]), boxes(5),
           torch.cat([boxes(2), torch.tensor([[500.0, 500.0, 520.0, 530.0]])])]
    labels = [torch.randint(0, 80, (len(g),), generator=generator) for g in gts]
    crowds = [None, boxes(2, 60.0), boxes(1, 60.0), torch.zeros(0, 4)]
    valid = torch.rand(len(gts), len(priors), generator=generator) > 0.2
    return priors, gts, labels, crowds, valid


BATCH_SETTINGS = [
    dict(pos_iou_thr=0.5, neg_iou_thr=0.4),  # RetinaNet
    dict(pos_iou_thr=0.5, neg_iou_thr=0.4, gt_max_assign_all=False, ignore_iof_thr=0.5),  # SSD-like, crowds
    dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, ignore_iof_thr=0.5),  # RPN
    dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),  # Faster R-CNN
    dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), ignore_iof_thr=0.3),  # a negative range
]


@pytest.mark.parametrize("settings", BATCH_SETTINGS)
@pytest.mark.parametrize("block_pairs", [None, 37])
def test_batched_assignment_equals_each_image_alone(settings, block_pairs, monkeypatch):
    if block_pairs is not None:  # force many small prior blocks, as the CPU path makes at full size
        monkeypatch.setattr(assigners, "_CPU_BLOCK_PAIRS", block_pairs)
    assigner = MaxIoUAssigner(**settings)
    seen_ties = seen_excluded = 0
    for seed in range(3):
        priors, gts, labels, crowds, valid = random_batch(seed)
        batch = assigner.assign_batch(priors, gts, labels, crowds, valid)
        assert batch.gt_inds.shape == (4, len(priors)) and batch.num_gts == [len(g) for g in gts]
        for image, result in enumerate(batch.per_image()):
            alone = assigner.assign(priors, gts[image], labels[image], crowds[image], valid[image])
            expected = reference_assign(assigner, priors, gts[image], labels[image], crowds[image], valid[image])
            for got in (result, alone):
                assert torch.equal(got.gt_inds, expected[0]), (seed, image)
                assert torch.equal(got.max_overlaps, expected[1]), (seed, image)  # bit for bit
                assert torch.equal(got.labels, expected[2]), (seed, image)
            if len(gts[image]):
                ious = box_iou(gts[image], priors).masked_fill(~valid[image], -1.0)
                seen_ties += int(((ious == ious.max(dim=1, keepdim=True).values).sum(dim=1) > 1).sum())
            seen_excluded += int((result.gt_inds[valid[image]] == -1).sum()) if assigner.ignore_iof_thr > 0 else 0
    assert seen_ties > 0, "the scenes must contain GTs whose max IoU is tied"
    assert seen_excluded > 0 or assigner.ignore_iof_thr <= 0, "the scenes must put valid priors under crowds"


def test_batched_assignment_without_any_gt_or_valid_mask():
    priors, _, _, crowds, _ = random_batch(0)
    empty = [torch.zeros(0, 4)] * 2
    no_labels = [torch.zeros(0, dtype=torch.int64)] * 2
    result = MaxIoUAssigner(0.5, (0.1, 0.4), ignore_iof_thr=0.5).assign_batch(priors, empty, no_labels, crowds[1:3])
    under_crowd = torch.stack([box_iou(priors, c, mode="iof").max(dim=1).values > 0.5 for c in crowds[1:3]])
    assert under_crowd.any()
    # Background everywhere (even below the negative range's low end, as for a single image), -1 under crowds.
    assert torch.equal(result.gt_inds, torch.where(under_crowd, -1, 0))
    assert torch.equal(result.max_overlaps, torch.where(under_crowd, -1.0, 0.0))
    assert (result.labels == -1).all() and result.num_gts == [0, 0]


def test_assign_batch_argument_errors():
    assigner = MaxIoUAssigner(0.5, 0.4)
    priors = strips((0, 10), (5, 15))
    with pytest.raises(ValueError, match="one entry per image"):
        assigner.assign_batch(priors, [strips((0, 10))] * 2, [torch.tensor([0])])
    with pytest.raises(ValueError, match=r"valid must be \(images, priors\) = \(1, 2\)"):
        assigner.assign_batch(priors, [strips((0, 10))], [torch.tensor([0])], valid=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="image 0 has gt_boxes"):
        assigner.assign_batch(priors, [strips((0, 10))], [torch.tensor([0, 1])])
    # An empty box tensor of any shape means no GT, as before.
    assert assigner.assign(priors, torch.zeros(0), torch.zeros(0, dtype=torch.int64)).gt_inds.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_iou_equals_box_iou_bit_for_bit(dtype):
    priors, gts, _, crowds, _ = random_batch(1)
    # Degenerate rows too: a zero-area GT and prior (denominators clamped to eps, IoU 0, not NaN).
    priors = torch.cat([priors, torch.tensor([[3.0, 3.0, 3.0, 9.0]])]).to(dtype)
    boxes = torch.stack([gts[1][:5], gts[2]]).to(dtype)
    boxes[0, 0] = torch.tensor([4.0, 4.0, 4.0, 4.0])
    iou = pairwise_iou(boxes, priors)
    assert iou.dtype == dtype and iou.shape == (2, 5, len(priors))
    for image in range(2):
        assert torch.equal(iou[image], box_iou(boxes[image], priors))
    iof = pairwise_iou(crowds[1][None].to(dtype), priors, mode="iof")
    assert torch.equal(iof[0], box_iou(priors, crowds[1].to(dtype), mode="iof").T)
