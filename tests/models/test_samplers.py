import math

import pytest
import torch

from pisa.losses import softmax_cross_entropy
from pisa.models.assigners import AssignResult, MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.samplers import (
    PseudoSampler,
    RandomSampler,
    SampleResult,
    ScoreHLRSampler,
    add_gts_as_proposals,
    force_gt_matches,
)

RCNN_CODER = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))

# Method doc T7: nine negatives, decoded box = RoI (zero deltas), L_j = -ln(1 - s_j).
T7_BOXES = torch.tensor([
    [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 1, 10, 11], [52, 50, 62, 60],
    [100, 100, 110, 110], [5, 0, 15, 10], [0, 0, 10, 5], [200, 200, 210, 210]], dtype=torch.float32)
T7_SCORES = [0.9, 0.8, 0.7, 0.3, 0.2, 0.04, 0.6, 0.1, 0.05]
T7_HLR_ORDER = [0, 2, 6, 1, 4, 3, 7]


def assignment(gt_inds: list[int], num_gts: int = 1) -> AssignResult:
    """Hand-made assignment: ``k > 0`` positive of GT ``k``, 0 background, -1 ignored."""
    gt = torch.tensor(gt_inds, dtype=torch.long)
    labels = torch.where(gt > 0, torch.zeros_like(gt), torch.full_like(gt, -1))
    return AssignResult(gt, torch.zeros(len(gt_inds)), labels, num_gts)


def two_column_logits(fg_scores: torch.Tensor) -> torch.Tensor:
    """``C = 1`` logits ``[ln s, ln(1 - s)]``: softmax gives ``(s, 1 - s)``, so CE vs background is ``-ln(1 - s)``."""
    s = fg_scores.double()
    return torch.stack([s.log(), (1 - s).log()], dim=1).float()


class TableScorer:
    """Scores each RoI by looking its box up in a table ``box -> (logits row, deltas row)``.

    Records every call: number of images, boxes per image, and whether grad mode was on.
    """

    def __init__(self, boxes: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor | None = None):
        self.boxes, self.logits = boxes, logits
        self.deltas = torch.zeros(len(boxes), 4) if deltas is None else deltas
        self.calls = []

    def __call__(self, rois):
        self.calls.append({"sizes": [len(r) for r in rois], "grad": torch.is_grad_enabled()})
        flat = torch.cat(rois)
        # Row of the table with an identical box (every test table has distinct boxes).
        row = (flat[:, None, :] == self.boxes[None, :, :]).all(dim=2).to(torch.uint8).argmax(dim=1)
        return self.logits[row], self.deltas[row]


def t7_scorer(extra_boxes: torch.Tensor | None = None) -> TableScorer:
    boxes = T7_BOXES if extra_boxes is None else torch.cat([T7_BOXES, extra_boxes])
    scores = torch.tensor(T7_SCORES + [0.5] * (len(boxes) - 9))
    return TableScorer(boxes, two_column_logits(scores))


def hlr_sampler(num: int = 512, pos_fraction: float = 0.25, **kwargs) -> ScoreHLRSampler:
    return ScoreHLRSampler(num, pos_fraction, num_classes=kwargs.pop("num_classes", 1), coder=RCNN_CODER, **kwargs)


# ---------------------------------------------------------------------------------------------
# Score-HLR: the method doc's case T7
# ---------------------------------------------------------------------------------------------

def test_t7_scores_sit_exactly_on_the_floor():
    # n8 must be tested at s = 0.05 exactly (in float32), so that the strict floor is what drops it.
    probs = torch.softmax(two_column_logits(torch.tensor(T7_SCORES)), dim=1)[:, 0]
    assert probs[8].item() == torch.tensor(0.05).item()
    assert (probs > 0.05).tolist() == [True, True, True, True, True, False, True, True, False]


@pytest.mark.parametrize("legacy_float_keys", [False, True])
def test_t7_five_expected(legacy_float_keys):
    # num 5, no positives: n_exp = min(9, 5) = 5. V = 7, U = max(5, 7) = 7; selected ranks 0..4 give
    # pre-weights (7 - R)/7 = [1, 6/7, 5/7, 4/7, 3/7], square roots [1, .925820, .845154, .755929, .654654];
    # ratio = Σ L / Σ w L over the selection with L = -ln(1 - s) of n0, n2, n6, n1, n4 = 1.126220.
    sampler = hlr_sampler(num=5, legacy_float_keys=legacy_float_keys)
    (result,) = sampler.sample_batch([assignment([0] * 9)], [T7_BOXES], scorer=t7_scorer())
    assert result.pos_inds.tolist() == [] and result.num_pos == 0
    assert result.neg_inds.tolist() == [0, 2, 6, 1, 4]
    expected = torch.tensor([1.126220, 1.042678, 0.951830, 0.851343, 0.737284])
    torch.testing.assert_close(result.neg_weights, expected, atol=1e-5, rtol=0)
    assert result.neg_weights.dtype == torch.float32 and result.neg_inds.dtype == torch.int64


def test_t7_fewer_negatives_than_requested():
    # n_exp = min(9, 512) = 9: all seven valid ones in HLR order, then the fillers {n5, n8} (random order).
    # U = max(9, 7) = 9: pre-weights (9 - R)/9, the fillers take the smallest ranked one, 3/9.
    (result,) = hlr_sampler().sample_batch([assignment([0] * 9)], [T7_BOXES], scorer=t7_scorer(),
                                           generator=torch.Generator().manual_seed(0))
    assert result.neg_inds[:7].tolist() == T7_HLR_ORDER
    assert sorted(result.neg_inds[7:].tolist()) == [5, 8]
    expected = torch.tensor([1.120363, 1.056289, 0.988067, 0.914773, 0.835069, 0.746909,
                             0.646842, 0.646842, 0.646842])
    torch.testing.assert_close(result.neg_weights, expected, atol=1e-5, rtol=0)


def test_t7_weights_keep_the_selected_background_loss():
    (result,) = hlr_sampler().sample_batch([assignment([0] * 9)], [T7_BOXES], scorer=t7_scorer())
    losses = -torch.log1p(-torch.tensor(T7_SCORES, dtype=torch.float64))[result.neg_inds]
    assert math.isclose(float((result.neg_weights.double() * losses).sum()), float(losses.sum()), rel_tol=1e-6)


def test_t7_with_positives_and_ignored_candidates():
    # Two positives and one ignored candidate around the nine negatives; num 7 at pos_fraction 0.5
    # (quota 3) takes both positives and leaves 7 - 2 = 5 negatives: the n_exp = 5 case, renumbered.
    pos_boxes = torch.tensor([[300.0, 300, 310, 310], [400, 400, 410, 410]])
    ignored = torch.tensor([[500.0, 500, 510, 510]])
    candidates = torch.cat([pos_boxes[:1], T7_BOXES, ignored, pos_boxes[1:]])
    assign = assignment([1] + [0] * 9 + [-1] + [1])
    scorer = t7_scorer(torch.cat([pos_boxes, ignored]))
    (result,) = hlr_sampler(num=7, pos_fraction=0.5).sample_batch([assign], [candidates], scorer=scorer)
    assert result.pos_inds.tolist() == [0, 11]
    assert result.neg_inds.tolist() == [1 + i for i in [0, 2, 6, 1, 4]]
    assert result.inds.tolist() == [0, 11, 1, 3, 7, 2, 5]
    torch.testing.assert_close(result.neg_weights, torch.tensor([1.126220, 1.042678, 0.951830, 0.851343, 0.737284]),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Score-HLR: edge cases
# ---------------------------------------------------------------------------------------------

def test_no_negatives_gives_empty_samples_and_no_scoring():
    boxes = T7_BOXES[:3]
    scorer = t7_scorer()
    (result,) = hlr_sampler().sample_batch([assignment([1, 1, -1])], [boxes], scorer=scorer)
    assert result.pos_inds.tolist() == [0, 1]
    assert result.neg_inds.shape == (0,) and result.neg_weights.shape == (0,)
    assert result.neg_weights.dtype == torch.float32 and result.neg_inds.dtype == torch.int64
    assert scorer.calls == []


def test_no_candidates_at_all():
    empty = AssignResult(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0)
    (result,) = hlr_sampler().sample_batch([empty], [torch.zeros(0, 4)], scorer=t7_scorer())
    assert result.inds.tolist() == [] and result.neg_weights.tolist() == []


def test_all_scores_at_or_below_the_floor_fall_back_to_random_weight_one():
    boxes = torch.stack([torch.tensor([10.0 * i, 0, 10.0 * i + 8, 8]) for i in range(20)])
    scores = torch.full((20,), 0.01)
    scores[3] = 0.05  # exactly at the floor: still invalid
    scorer = TableScorer(boxes, two_column_logits(scores))
    (result,) = hlr_sampler(num=8).sample_batch([assignment([0] * 20)], [boxes], scorer=scorer,
                                                generator=torch.Generator().manual_seed(1))
    assert result.neg_inds.numel() == 8 and result.neg_inds.unique().numel() == 8
    assert result.neg_weights.tolist() == [1.0] * 8
    # A random subset, not the first eight.
    assert result.neg_inds.tolist() != list(range(8))


def test_more_than_128_positives_take_a_random_128_in_draw_order():
    num_pos, num_neg = 200, 50
    boxes = torch.stack([torch.tensor([20.0 * i, 0, 20.0 * i + 10, 10]) for i in range(num_pos + num_neg)])
    gt_inds = [0] * num_neg + [1] * num_pos
    scorer = TableScorer(boxes, two_column_logits(torch.full((len(boxes),), 0.3)))
    (result,) = hlr_sampler().sample_batch([assignment(gt_inds)], [boxes], scorer=scorer,
                                           generator=torch.Generator().manual_seed(7))
    # The positives are candidates 50..249; the sampler's first draw is a randperm of them.
    first_draw = torch.randperm(num_pos, generator=torch.Generator().manual_seed(7))[:128]
    expected = (torch.arange(num_pos) + num_neg)[first_draw]
    assert result.pos_inds.tolist() == expected.tolist()
    # n_exp = min(50, 512 - 128): every negative is taken.
    assert sorted(result.neg_inds.tolist()) == list(range(num_neg))


def random_image(seed: int, num_boxes: int = 60, num_classes: int = 3):
    """Candidates in a 100×100 image (many overlaps), an assignment with ~10 positives and ~3 ignored,
    and a table scorer with random logits (about half of the negatives above the floor) and deltas."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_boxes, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 8 + torch.rand(num_boxes, 2, generator=g) * 20], dim=1)
    kind = torch.rand(num_boxes, generator=g)
    gt_inds = torch.where(kind < 0.15, 1, torch.where(kind < 0.2, -1, 0)).tolist()
    logits = torch.randn(num_boxes, num_classes + 1, generator=g) * 2
    logits[:, -1] += 1.5
    deltas = torch.randn(num_boxes, 4 * num_classes, generator=g) * 0.5
    return boxes, assignment(gt_inds), TableScorer(boxes, logits, deltas)


def test_multi_image_batch_equals_per_image_results():
    # Image 1 repeats image 0's boxes: grouping across images would change both images' ranks.
    images = [random_image(0), random_image(0), random_image(3)]
    sampler = hlr_sampler(num=40, num_classes=3)
    singles = [sampler.sample_batch([a], [b], scorer=s)[0] for b, a, s in images]
    table = TableScorer(torch.cat([b for b, _, _ in images[1:]]), torch.cat([s.logits for _, _, s in images[1:]]),
                        torch.cat([s.deltas for _, _, s in images[1:]]))
    batched = sampler.sample_batch([a for _, a, _ in images], [b for b, _, _ in images], scorer=table)
    for single, together in zip(singles, batched):
        assert single.pos_inds.tolist() == together.pos_inds.tolist()
        assert single.neg_inds.tolist() == together.neg_inds.tolist()
        torch.testing.assert_close(single.neg_weights, together.neg_weights)
    # The case is not trivial: the ranked selection leaves out some valid negatives.
    assert all(r.neg_inds.numel() == 40 - r.num_pos for r in batched)


def test_scorer_called_once_for_the_batch_without_grad():
    images = [random_image(0), random_image(1)]
    boxes = [b for b, _, _ in images]
    assigns = [a for _, a, _ in images]
    # The third image has no negatives; it still gets its (empty) entry so list position = image index.
    boxes.append(torch.tensor([[0.0, 0, 5, 5]]))
    assigns.append(assignment([1]))
    table = TableScorer(torch.cat(boxes), torch.cat([s.logits for _, _, s in images] + [torch.zeros(1, 4)]),
                        torch.cat([s.deltas for _, _, s in images] + [torch.zeros(1, 12)]))
    with torch.enable_grad():
        hlr_sampler(num_classes=3).sample_batch(assigns, boxes, scorer=table)
    neg_counts = [int(a.neg_mask.sum()) for a in assigns]
    assert table.calls == [{"sizes": neg_counts, "grad": False}]
    assert neg_counts[2] == 0


def test_determinism_with_a_seeded_generator():
    boxes, assign, scorer = random_image(5, num_boxes=300)
    sampler = hlr_sampler(num=100, num_classes=3)  # 25 of ~45 positives: a random draw

    def run(seed):
        return sampler.sample_batch([assign], [boxes], scorer=scorer, generator=torch.Generator().manual_seed(seed))[0]

    first, again, other = run(0), run(0), run(1)
    assert first.pos_inds.tolist() == again.pos_inds.tolist()
    assert first.neg_inds.tolist() == again.neg_inds.tolist()
    assert torch.equal(first.neg_weights, again.neg_weights)
    assert first.pos_inds.tolist() != other.pos_inds.tolist()


def test_class_specific_deltas_of_the_argmax_class_decide_the_groups():
    # C = 2. n0 [0,0,10,10] (class 0, s .9); n1 [100,0,110,10] (class 1, s .8) whose class-1 deltas move
    # it onto n0: dx = -100/10 = -10, normalised by std 0.1 -> -100; its class-0 deltas are zero.
    # n2 [50,50,60,60] (class 0, s .7). Grouped: leaders n0, n2; n1 joins n0, so the HLR order is
    # n0, n2, n1. Decoding n1 with the wrong class would leave it a leader: n0, n1, n2.
    boxes = torch.tensor([[0.0, 0, 10, 10], [100, 0, 110, 10], [50, 50, 60, 60]])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.8, 0.15], [0.7, 0.1, 0.2]])
    deltas = torch.zeros(3, 8)
    deltas[1, 4] = -100.0
    scorer = TableScorer(boxes, probs.log(), deltas)
    (result,) = hlr_sampler(num_classes=2).sample_batch([assignment([0, 0, 0])], [boxes], scorer=scorer)
    assert result.neg_inds.tolist() == [0, 2, 1]


def test_weights_follow_the_rank_and_keep_each_images_loss():
    images = [random_image(s, num_boxes=200) for s in (11, 12)]
    table = TableScorer(torch.cat([b for b, _, _ in images]), torch.cat([s.logits for _, _, s in images]),
                        torch.cat([s.deltas for _, _, s in images]))
    sampler = hlr_sampler(num=80, num_classes=3)
    results = sampler.sample_batch([a for _, a, _ in images], [b for b, _, _ in images], scorer=table)
    for (boxes, _, scorer), result in zip(images, results):
        logits = scorer.logits[result.neg_inds]
        loss = softmax_cross_entropy(logits, torch.full((len(logits),), 3))
        torch.testing.assert_close((result.neg_weights * loss).sum(), loss.sum())
        assert bool((result.neg_weights[1:] <= result.neg_weights[:-1] + 1e-7).all())  # non-increasing
        assert bool((result.neg_weights > 0).all())


def test_cls_loss_weight_and_bias_and_power():
    # bias 1 makes every pre-weight 1: renormalisation leaves weight 1 whatever k and the loss weight.
    (result,) = hlr_sampler(num=5, bias=1.0, k=3.0, cls_loss_weight=2.0).sample_batch(
        [assignment([0] * 9)], [T7_BOXES], scorer=t7_scorer())
    torch.testing.assert_close(result.neg_weights, torch.ones(5))
    # k = 1: the n_exp = 5 pre-weights [1, 6/7, 5/7, 4/7, 3/7] times Σ L / Σ w L; the loss weight cancels.
    (linear,) = hlr_sampler(num=5, k=1.0, cls_loss_weight=2.0).sample_batch(
        [assignment([0] * 9)], [T7_BOXES], scorer=t7_scorer())
    pre = torch.tensor([7.0, 6, 5, 4, 3], dtype=torch.float64) / 7
    loss = -torch.log1p(-torch.tensor([0.9, 0.7, 0.6, 0.8, 0.2], dtype=torch.float64))
    torch.testing.assert_close(linear.neg_weights.double(), pre * loss.sum() / (pre * loss).sum(), atol=1e-6, rtol=0)


def test_zero_loss_weight_keeps_the_unnormalised_weights():
    # cls_loss_weight 0 makes every L_j = 0: Σ w·L = 0, so the weights stay the square roots of
    # (7 - R)/7 (T7, n_exp = 5) instead of becoming NaN.
    (result,) = hlr_sampler(num=5, cls_loss_weight=0.0).sample_batch([assignment([0] * 9)], [T7_BOXES],
                                                                     scorer=t7_scorer())
    expected = (torch.tensor([7.0, 6, 5, 4, 3]) / 7).sqrt()
    torch.testing.assert_close(result.neg_weights, expected)


def test_half_precision_scorer_outputs_are_upcast():
    table = t7_scorer()
    half = TableScorer(table.boxes, table.logits.half(), table.deltas.half())
    (result,) = hlr_sampler(num=5).sample_batch([assignment([0] * 9)], [T7_BOXES], scorer=half)
    assert result.neg_weights.dtype == torch.float32 and result.neg_inds.tolist() == [0, 2, 6, 1, 4]
    torch.testing.assert_close(result.neg_weights, torch.tensor([1.126220, 1.042678, 0.951830, 0.851343, 0.737284]),
                               atol=2e-3, rtol=0)


def test_scorer_errors_name_the_expected_shapes():
    sampler = hlr_sampler(num_classes=3)
    with pytest.raises(ValueError, match="needs scorer"):
        sampler.sample_batch([assignment([0])], [T7_BOXES[:1]])
    with pytest.raises(ValueError, match=r"expected \(1, 4\)"):
        sampler.sample_batch([assignment([0])], [T7_BOXES[:1]],
                             scorer=lambda r: (torch.zeros(1, 2), torch.zeros(1, 12)))
    with pytest.raises(ValueError, match=r"expected \(1, 12\)"):
        sampler.sample_batch([assignment([0])], [T7_BOXES[:1]], scorer=lambda r: (torch.zeros(1, 4), torch.zeros(1, 8)))


# ---------------------------------------------------------------------------------------------
# RandomSampler and PseudoSampler
# ---------------------------------------------------------------------------------------------

def dense_assignment(num_pos: int, num_neg: int, num_ignored: int, seed: int = 0) -> AssignResult:
    """Positives, negatives and ignored priors shuffled over ``num_pos + num_neg + num_ignored`` priors."""
    kinds = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignored)]).long()
    kinds = kinds[torch.randperm(len(kinds), generator=torch.Generator().manual_seed(seed))]
    return AssignResult(kinds, torch.zeros(len(kinds)), torch.where(kinds > 0, 0, -1), 1)


def boxes_for(assign: AssignResult) -> torch.Tensor:
    return torch.zeros(assign.gt_inds.numel(), 4)


def test_random_sampler_counts_and_membership():
    assign = dense_assignment(1000, 5000, 300)
    (result,) = RandomSampler(256, 0.5).sample_batch([assign], [boxes_for(assign)],
                                                     generator=torch.Generator().manual_seed(0))
    assert result.num_pos == 128 and result.neg_inds.numel() == 128
    assert bool((assign.gt_inds[result.pos_inds] > 0).all()) and bool((assign.gt_inds[result.neg_inds] == 0).all())
    assert result.inds.unique().numel() == 256
    assert result.neg_weights.tolist() == [1.0] * 128
    # Draw order: the first draw is a randperm of the positives.
    positives = torch.nonzero(assign.gt_inds > 0).squeeze(1)
    expected = positives[torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:128]]
    assert result.pos_inds.tolist() == expected.tolist()


def test_random_sampler_few_positives_fill_with_negatives():
    assign = dense_assignment(10, 5000, 0)
    (result,) = RandomSampler(512, 0.25).sample_batch([assign], [boxes_for(assign)],
                                                      generator=torch.Generator().manual_seed(0))
    positives = torch.nonzero(assign.gt_inds > 0).squeeze(1)
    assert result.pos_inds.tolist() == positives.tolist()  # all of them, ascending
    assert result.neg_inds.numel() == 502 and result.neg_inds.unique().numel() == 502


def test_random_sampler_fewer_negatives_than_wanted_takes_all_in_order():
    assign = dense_assignment(3, 20, 5)
    (result,) = RandomSampler(256, 0.5).sample_batch([assign], [boxes_for(assign)])
    assert result.neg_inds.tolist() == torch.nonzero(assign.gt_inds == 0).squeeze(1).tolist()


@pytest.mark.parametrize("num_pos, ub, expected_neg", [(10, 3, 30), (0, 3, 3), (10, 0, 0), (100, 2.5, 156)])
def test_random_sampler_neg_pos_ub(num_pos, ub, expected_neg):
    # Negatives = min(num - #pos, int(ub · max(#pos, 1))); with 100 positives, 256 - 100 = 156 < 250.
    assign = dense_assignment(num_pos, 1000, 0)
    (result,) = RandomSampler(256, 1.0, neg_pos_ub=ub).sample_batch([assign], [boxes_for(assign)])
    assert result.num_pos == num_pos and result.neg_inds.numel() == expected_neg


def test_random_sampler_positive_fraction_is_uniform():
    # 40 positives, quota 10: over 400 seeded draws each positive is picked 100 times in expectation
    # (binomial sd ≈ 8.7); a biased draw (e.g. always the first ones) fails the ±45 band.
    assign = dense_assignment(40, 100, 0)
    sampler, g = RandomSampler(20, 0.5), torch.Generator().manual_seed(0)
    counts = torch.zeros(assign.gt_inds.numel())
    for _ in range(400):
        counts[sampler.sample_batch([assign], [boxes_for(assign)], generator=g)[0].pos_inds] += 1
    picked = counts[assign.gt_inds > 0]
    assert picked.sum() == 4000 and bool(((picked - 100).abs() < 45).all())


def test_random_sampler_batch_and_settings_errors():
    assign = dense_assignment(3, 5, 0)
    with pytest.raises(ValueError, match="force_gt_matches"):
        RandomSampler(8, 0.5).sample_batch([assign], [torch.zeros(7, 4)])
    with pytest.raises(ValueError, match="one AssignResult"):
        RandomSampler(8, 0.5).sample_batch([assign], [])
    with pytest.raises(ValueError, match="pos_fraction"):
        RandomSampler(8, 1.5)


def test_pseudo_sampler_takes_everything():
    assign = assignment([0, 1, -1, 0, 2], num_gts=2)
    (result,) = PseudoSampler().sample_batch([assign], [boxes_for(assign)])
    assert isinstance(result, SampleResult)
    assert result.pos_inds.tolist() == [1, 4] and result.neg_inds.tolist() == [0, 3]
    assert result.neg_weights.tolist() == [1.0, 1.0] and result.inds.tolist() == [1, 4, 0, 3]


# ---------------------------------------------------------------------------------------------
# GTs as proposals
# ---------------------------------------------------------------------------------------------

def test_gts_prepended_and_forced_to_match_themselves():
    gts = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.5]])
    labels = torch.tensor([4, 7])
    proposals = torch.tensor([[0.0, 0, 10, 11, 0.9], [50, 50, 60, 60, 0.8]])  # (R, 5) with scores
    candidates = add_gts_as_proposals(proposals, gts)
    assert candidates.tolist() == [gts[0].tolist(), gts[1].tolist(), [0, 0, 10, 11], [50, 50, 60, 60]]
    proposal_assign = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False).assign(proposals[:, :4], gts, labels)
    assign = force_gt_matches(proposal_assign, labels)
    # The proposal [0,0,10,11] has IoU 100/110 with GT 0 and 105/110 with GT 1: positive of GT 1 (index 2).
    assert proposal_assign.gt_inds.tolist() == [2, 0]
    assert assign.gt_inds.tolist() == [1, 2] + proposal_assign.gt_inds.tolist()
    assert assign.labels.tolist() == [4, 7] + proposal_assign.labels.tolist()
    assert assign.max_overlaps[:2].tolist() == [1.0, 1.0] and assign.num_gts == 2
    (result,) = RandomSampler(512, 0.25).sample_batch([assign], [candidates])
    assert result.pos_inds.tolist() == [0, 1, 2] and result.neg_inds.tolist() == [3]


def test_duplicate_gts_each_match_themselves():
    # Two identical GTs: an assignment over the candidates would give both to the first (argmax);
    # force_gt_matches keeps each GT its own positive.
    gts = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    labels = torch.tensor([1, 2])
    assign = force_gt_matches(MaxIoUAssigner(0.5, 0.5, 0.5).assign(torch.zeros(0, 4), gts, labels), labels)
    assert assign.gt_inds.tolist() == [1, 2] and assign.labels.tolist() == [1, 2]


def test_gt_helpers_check_shapes():
    with pytest.raises(ValueError, match=r"\(R, 4\) or \(R, 5\)"):
        add_gts_as_proposals(torch.zeros(3, 6), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"gt_labels must have shape \(2,\)"):
        force_gt_matches(assignment([0, 1], num_gts=2), torch.tensor([1]))
