"""PAA: head, neck, candidate selection, batched assignment against a per-GT loop, losses, score
voting, post-processing and config errors, on a tiny ResNet-18 model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pisa.config import ConfigError, load_config
from pisa.models import MODELS, build_model
from pisa.models.gmm import fit_two_component_gmm, gmm_positive_cut
from pisa.models.paa import PAAFPN, score_voting
from pisa.losses import sigmoid_focal_loss
from pisa.models import paa_head
from pisa.models.paa_head import (PAAHead, PAASettings, aligned_giou, paa_assign, select_candidates,
                                   summed_focal_loss)
from pisa.models.retina_head import flatten_levels, level_anchors

REPO = Path(__file__).resolve().parents[2]
PAA_CFG = REPO / "configs/paa/paa_r50_fpn_1x_coco.yaml"
NUM_CLASSES = 3


def tiny_cfg(*overrides: str) -> dict:
    small = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", f"model.num_classes={NUM_CLASSES}",
             "model.neck.out_channels=32", "model.head.feat_channels=32", "model.head.stacked_convs=2",
             "model.head.norm_groups=8"]
    return load_config(str(PAA_CFG), small + list(overrides), check_paths=False)


def tiny_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*overrides))


def _target(boxes, labels, img_shape, scale_factor=(1.0, 1.0)) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "ignore_boxes": torch.zeros(0, 4),
            "img_shape": img_shape, "scale_factor": scale_factor, "image_id": 0, "flip": False}


def test_registered_and_head_shapes_and_init():
    assert MODELS["paa"].__name__ == "build_paa"
    torch.manual_seed(0)
    head = PAAHead(num_classes=80, in_channels=32, feat_channels=32, stacked_convs=4, num_levels=2, norm_groups=8)
    assert torch.allclose(head.cls_logits.bias, torch.full((80,), -math.log(99.0)))
    assert head.cls_convs[0].conv.bias is None and head.cls_convs[0].gn.num_groups == 8
    assert head.iou_pred.bias.abs().max() == 0 and [s.item() for s in head.scales] == [1.0, 1.0]
    cls, box, iou = head([torch.randn(2, 32, 8, 12), torch.randn(2, 32, 4, 6)])
    assert [tuple(t.shape) for t in cls] == [(2, 80, 8, 12), (2, 80, 4, 6)]
    assert [tuple(t.shape) for t in box] == [(2, 4, 8, 12), (2, 4, 4, 6)]
    assert [tuple(t.shape) for t in iou] == [(2, 1, 8, 12), (2, 1, 4, 6)]
    with torch.no_grad():
        head.scales[1].fill_(2.0)  # the level's scale multiplies its regression output only
    _, box2, _ = head([torch.zeros(1, 32, 8, 12), torch.ones(1, 32, 4, 6)])
    head.scales[1].data.fill_(1.0)
    _, box1, _ = head([torch.zeros(1, 32, 8, 12), torch.ones(1, 32, 4, 6)])
    assert torch.allclose(box2[1], 2 * box1[1])


def test_neck_takes_p6_from_p5():
    torch.manual_seed(0)
    neck = PAAFPN([16, 24, 40], out_channels=8)
    assert neck.p6_conv.in_channels == 8
    feats = [torch.randn(1, 16, 16, 20), torch.randn(1, 24, 8, 10), torch.randn(1, 40, 4, 5)]
    outs = neck(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert torch.allclose(outs[3], neck.p6_conv(outs[2]))


def test_giou_golden():
    """[0,0,10,10] vs [5,0,15,10]: IoU 50/150, enclosing box = union (150) -> GIoU 1/3.
    vs [20,0,30,10]: IoU 0, union 200, enclosing 30 x 10 = 300 -> GIoU -(300 - 200)/300 = -1/3."""
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 0, 30, 10]])
    assert aligned_giou(a, b).tolist() == pytest.approx([1 / 3, -1 / 3], abs=1e-6)


def test_select_candidates_by_hand():
    """Row 0 (one GT): level 0 costs (5, 1, 3), level 1 costs (2, 4); with topk 2 the kept ones are
    level 0 {1, 3} and level 1 {2, 4}, sorted -> 1, 2, 3, 4 (initial-positive indices 1, 3, 2, 4).
    Row 1: a single candidate (cost 0.5, index 5). Row 2: none."""
    costs = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 0.5])
    rows = torch.tensor([0, 0, 0, 0, 0, 1])
    levels = torch.tensor([0, 0, 1, 0, 1, 1])
    cand = select_candidates(costs, rows, levels, num_rows=3, num_levels=2, topk=2)
    assert cand.costs.shape == (3, 4)
    assert cand.costs[0].tolist() == [1.0, 2.0, 3.0, 4.0] and cand.index[0].tolist() == [1, 2, 3, 4]
    assert cand.index[1].tolist() == [5, -1, -1, -1] and cand.mask[1].tolist() == [True, False, False, False]
    assert not cand.mask[2].any() and bool(torch.isinf(cand.costs[2]).all())


def test_summed_focal_loss_equals_the_elementwise_focal_loss_summed():
    """Logits up to +-40 (where 1 - p underflows if taken as 1 - sigmoid(x)), background rows (label C),
    the default alpha / gamma, no alpha weighting (alpha < 0) and gamma 1.5."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 7, generator=gen) * 6
    logits[:10] = torch.linspace(-40, 40, 70).reshape(10, 7)
    labels = torch.randint(0, 8, (300,), generator=gen)
    assert (labels == 7).any()
    for alpha, gamma in ((0.25, 2.0), (-1.0, 2.0), (0.4, 1.5)):
        expected = sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma).sum(1)
        got = summed_focal_loss(logits, labels, alpha=alpha, gamma=gamma)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # One class, label 0, logit 0: p = 1/2, alpha 0.25, gamma 2: 0.25 * 0.25 * ln 2 = 0.0433217.
    assert summed_focal_loss(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)).item() == pytest.approx(0.0433217)


def test_summed_focal_loss_in_cpu_blocks_is_bit_identical(monkeypatch):
    """Blocks of 64 elements (9 rows of 7 classes, the last block shorter) agree with one pass to float32
    rounding (the reduction kernel may vectorise a block's rows differently)."""
    gen = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(300, 7, generator=gen) * 6, torch.randint(0, 8, (300,), generator=gen)
    whole = summed_focal_loss(logits, labels)
    monkeypatch.setattr(paa_head, "_CPU_FOCAL_BLOCK_ELEMENTS", 64)
    blocked = summed_focal_loss(logits, labels)
    assert blocked.shape == (300,)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=0.0)


def _reference_candidates(costs, rows, levels, num_rows, num_levels, topk):
    """Per (row, level): the topk smallest (cost, index) pairs in Python; per row, these level after
    level, sorted stably by cost (equal costs: lower level, then lower index, first)."""
    out = []
    for r in range(num_rows):
        picked = []
        for level in range(num_levels):
            group = sorted((float(costs[i]), i) for i in range(len(costs)) if rows[i] == r and levels[i] == level)
            picked += group[:topk]
        out.append([i for _, i in sorted(picked, key=lambda pair: pair[0])])
    return out


def test_select_candidates_orders_negative_zero_and_infinite_costs_and_ties_by_index():
    """Negative costs order below positive ones (-2 < -1 < 0.0 == -0.0 < 1e-30 < 3 < inf); 0.0 (index
    3) and -0.0 (index 4) are equal costs, so the lower index first, as for the repeated 0.5s (across
    levels: the lower level first); float16 / float32 / float64 costs give the same candidates."""
    costs = [3.0, -1.0, 0.5, 0.0, -0.0, 0.5, -2.0, float("inf"), 1e-30, 0.5, 0.5, -1.0]
    rows = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    levels = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    expected = _reference_candidates(costs, rows, levels, 2, 2, topk=3)
    for dtype in (torch.float64, torch.float32, torch.float16):
        cand = select_candidates(torch.tensor(costs, dtype=dtype), torch.tensor(rows), torch.tensor(levels),
                                 num_rows=2, num_levels=2, topk=3)
        assert [cand.index[r][cand.mask[r]].tolist() for r in range(2)] == expected, dtype
    # Row 0, level 0 keeps -1 (1), 0.0 (3), -0.0 (4) and drops 0.5 (2) and 3 (0); level 1 keeps all.
    assert expected == [[6, 1, 3, 4, 5, 7], [11, 8, 9, 10]]


@pytest.mark.parametrize("unique_keys", [True, False], ids=["unique-keys", "stable-sort"])
def test_select_candidates_on_random_groups_equals_the_python_reference(monkeypatch, unique_keys):
    """Both sort paths: keys made unique by the index (any sort), and torch's stable sort (used when the
    index does not fit beside the key)."""
    if not unique_keys:
        monkeypatch.setattr(paa_head, "_UNIQUE_KEY_BITS", 0)
    gen = torch.Generator().manual_seed(3)
    count, num_rows, num_levels = 400, 12, 3
    rows = torch.randint(0, num_rows - 1, (count,), generator=gen)  # the last row has no sample
    levels = torch.randint(0, num_levels, (count,), generator=gen)
    costs = (torch.randn(count, generator=gen) * 4).round() / 4  # many equal costs
    cand = select_candidates(costs, rows, levels, num_rows, num_levels, topk=4)
    expected = _reference_candidates(costs.tolist(), rows.tolist(), levels.tolist(), num_rows, num_levels, 4)
    assert [cand.index[r][cand.mask[r]].tolist() for r in range(num_rows)] == expected
    assert not cand.mask[-1].any() and cand.costs.shape == (num_rows, num_levels * 4)
    sorted_costs = cand.costs.masked_fill(~cand.mask, math.inf)
    assert bool((sorted_costs[:, 1:] >= sorted_costs[:, :-1]).all())


@pytest.mark.parametrize("unique_keys", [True, False], ids=["unique-keys", "stable-sort"])
def test_sort_order_is_the_stable_sorts_permutation(monkeypatch, unique_keys):
    """Many equal keys (8 groups, 5 costs each) in random order: equal keys keep their index order."""
    if not unique_keys:
        monkeypatch.setattr(paa_head, "_UNIQUE_KEY_BITS", 0)
    gen = torch.Generator().manual_seed(7)
    keys = (torch.randint(0, 8, (3000,), generator=gen) << 32) | torch.randint(0, 5, (3000,), generator=gen)
    order = paa_head._sort_order(keys, 8)
    assert torch.equal(order, torch.sort(keys, stable=True).indices)
    assert order.dtype == torch.int64 and order.device == keys.device


def _loop_assign(costs, rows, levels, num_rows, num_levels, topk=9):
    """The straightforward version: per GT, per level topk, concatenate, sort, fit one mixture, cut."""
    positive = torch.zeros(costs.shape[0], dtype=torch.bool)
    for r in range(num_rows):
        picked = []
        for level in range(num_levels):
            idx = torch.nonzero((rows == r) & (levels == level)).squeeze(1)
            if idx.numel():
                top = costs[idx].topk(min(topk, idx.numel()), largest=False).indices
                picked.append(idx[top])
        if not picked or sum(p.numel() for p in picked) < 2:
            continue
        idx = torch.cat(picked)
        values, order = costs[idx].double().sort(stable=True)
        fit = fit_two_component_gmm(values[None], torch.ones_like(values[None], dtype=torch.bool))
        positive[idx[order][gmm_positive_cut(fit, torch.ones_like(values[None], dtype=torch.bool))[0]]] = True
    return positive


def test_batched_assignment_equals_the_per_gt_loop():
    gen = torch.Generator().manual_seed(0)
    count, num_rows, num_levels = 900, 30, 5
    rows = torch.randint(0, num_rows - 2, (count,), generator=gen)  # the last two GTs have no candidate
    levels = torch.randint(0, num_levels, (count,), generator=gen)
    costs = torch.rand(count, generator=gen) * 2 + (torch.rand(count, generator=gen) < 0.3) * 1.5
    batched = paa_assign(costs, rows, levels, num_rows, num_levels)
    assert torch.equal(batched, _loop_assign(costs, rows, levels, num_rows, num_levels))
    per_row = torch.bincount(rows[batched], minlength=num_rows)
    assert per_row[-2:].tolist() == [0, 0] and bool((per_row[:-2] > 0).all())
    assert batched.sum() < count // 3  # the cut keeps the low-cost part only


def test_batched_assignment_equals_the_per_gt_loop_in_degenerate_cases():
    """Two levels, topk 3. GT 0: six equal costs (0.7) over both levels: the mixture's components
    coincide, every sample ties and only the first in row order (level 0, lowest index: 0) stays.
    GT 1: one candidate: none. GT 2: two candidates (0.3, 1.5): the lower one. GT 3: no candidate.
    GT 4: two equal pairs (0.2, 0.2 | 2.0, 2.0): the first 0.2 (index 11) only, as ties resolve to the
    first. GT 5: random costs over both levels, more than topk per level."""
    gen = torch.Generator().manual_seed(5)
    costs = [0.7] * 6 + [0.4, 0.3, 1.5, 2.0, 2.0, 0.2, 0.2] + (torch.rand(20, generator=gen) * 2).tolist()
    rows = [0] * 6 + [1, 2, 2, 4, 4, 4, 4] + [5] * 20
    levels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1] + torch.randint(0, 2, (20,), generator=gen).tolist()
    costs, rows, levels = torch.tensor(costs), torch.tensor(rows), torch.tensor(levels)
    settings = PAASettings(topk=3)
    batched = paa_assign(costs, rows, levels, num_rows=6, num_levels=2, settings=settings)
    assert torch.equal(batched, _loop_assign(costs, rows, levels, 6, 2, topk=3))
    assert torch.nonzero(batched[:13]).squeeze(1).tolist() == [0, 7, 11]
    assert 0 < int(batched[13:].sum()) <= 6  # at most 3 per level are candidates


def test_assign_of_a_batch_equals_assign_of_each_image_alone():
    """PAALoss.assign on three images (the middle one without GTs, the last smaller than the batch)
    chooses, for every image, the positives that the image alone would get."""
    criterion = tiny_model("model.anchors.octave_base_scale=2").criterion
    targets = _batch()[1]
    targets = [targets[0], _target([], [], (256, 256)), _target([[30, 40, 90, 120], [100, 20, 200, 100]], [2, 0],
                                                                (200, 256))]
    sizes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    gen = torch.Generator().manual_seed(6)
    cls = [torch.randn(3, NUM_CLASSES, h, w, generator=gen) - 2 for h, w in sizes]
    box = [torch.randn(3, 4, h, w, generator=gen) * 0.3 for h, w in sizes]
    feature_sizes, anchors_per_level = level_anchors(criterion.anchor_generator, cls)
    logits = flatten_levels(cls, NUM_CLASSES).reshape(-1, NUM_CLASSES)
    deltas = flatten_levels(box, 4).reshape(-1, 4)
    batch = criterion.assign(logits, deltas, anchors_per_level, feature_sizes, targets)
    per_image = sum(a.shape[0] for a in anchors_per_level)
    for image, target in enumerate(targets):
        part = slice(image * per_image, (image + 1) * per_image)
        alone = criterion.assign(logits[part], deltas[part], anchors_per_level, feature_sizes, [target])
        in_batch = batch.positives[(batch.positives >= part.start) & (batch.positives < part.stop)] - part.start
        assert torch.equal(in_batch, alone.positives), image
        assert torch.equal(batch.labels[part], alone.labels), image
    counts = torch.bincount(batch.positives // per_image, minlength=3).tolist()
    assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0
    # PAA regresses decoded boxes: its targets skip the delta encoding, and the rest is as encoded.
    assert batch.targets.bbox_targets is None
    encoded = criterion.get_targets(anchors_per_level, feature_sizes, targets)
    for name in ("labels", "label_weights", "gt_inds", "img_inds", "priors", "avg_factor"):
        assert torch.equal(getattr(batch.targets, name), getattr(encoded, name)), name
    assert encoded.bbox_targets.shape == encoded.priors.shape


def test_no_objects_golden_loss_and_attached_zero_box_losses():
    """Classifier weights zeroed: every logit is -log 99, p = 0.01 for every anchor and class, and each
    element costs (1 - 0.25) * 0.01^2 * (-ln 0.99) = 7.537752e-7. One anchor per location on a 64 x 96
    batch: 8*12 + 4*6 + 2*3 + 1*2 + 1*1 = 129 per image. No positive: normaliser max(0, #images) = 2,
    so loss_cls = 2 * 129 * 3 * 7.537752e-7 / 2 = 2.917110e-4."""
    model = tiny_model().train()
    with torch.no_grad():
        model.head.cls_logits.weight.zero_()
    losses = model(torch.randn(2, 3, 64, 96), [_target([], [], (64, 96)), _target([], [], (64, 96))])
    assert losses["loss_cls"].item() == pytest.approx(2.917110e-4, rel=1e-4)
    for name in ("loss_bbox", "loss_iou"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    sum(losses.values()).backward()
    assert model.head.bbox_reg.weight.grad is not None and model.head.bbox_reg.weight.grad.abs().max() == 0
    assert model.head.iou_pred.weight.grad is not None and model.head.iou_pred.weight.grad.abs().max() == 0


def _batch():
    """One 256 x 256 image with GTs of 20 to 240 px, so that PAA keeps positives on every level (anchors
    16 * 2^l px for octave_base_scale 2: the 240 px GT matches the 256 px anchor of P7 at IoU 0.88), and
    one image without objects whose own extent (200 x 256) is smaller than the batch."""
    torch.manual_seed(1)
    targets = [_target([[8, 8, 248, 248], [10, 60, 40, 90], [70, 8, 126, 64], [80, 80, 100, 100],
                        [120, 130, 250, 250]], [0, 1, 2, 1, 0], (256, 256)),
               _target([], [], (200, 256))]
    return torch.randn(2, 3, 256, 256), targets


def test_every_parameter_gets_a_gradient_and_losses_are_normalised():
    model = tiny_model("model.anchors.octave_base_scale=2").train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_iou"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    # At init the IoU logits are ~0 -> sigmoid 0.5; the BCE per positive lies in [ln 2 - 0.5 |iou - .5|...]
    # bounded by ln 2 +- 0.5 * max|2 iou - 1| / 2; and loss_iou = 0.5 * mean -> within 0.5 * [0.44, 0.94].
    assert 0.5 * 0.44 < losses["loss_iou"].item() < 0.5 * 0.94
    # GIoU loss in [0, 2], weighted mean times 1.3.
    assert 0 < losses["loss_bbox"].item() < 2 * 1.3


def test_score_voting_on_hand_made_boxes():
    """Detection [0,0,10,10] of class 0. Candidates: itself (score .9, IoU 1, p = .9); [1,0,11,10]
    (.6, IoU 9/11, p = exp(-(2/11)^2/0.025) * .6 = 0.159911); the same box of class 1 (other class),
    a box far away (IoU 0) and one scoring .04 (below the threshold .05) are not used.
    Voted x1 = 0.159911 / 1.059911 = 0.150872, x2 = (9 + 11 * 0.159911) / 1.059911 = 10.150872."""
    det_boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    det_labels = torch.tensor([0, 1])
    cand_boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [100, 100, 110, 110], [0, 0, 12, 10],
                               [50, 50, 60, 60]])
    cand_scores = torch.tensor([[0.9, 0.0], [0.6, 0.3], [0.8, 0.0], [0.04, 0.0], [0.0, 0.7]])
    voted = score_voting(det_boxes, det_labels, cand_boxes, cand_scores, score_thr=0.05)
    # Detection 1 (class 1) sees [1,0,11,10] (class-1 score .3) only at IoU 0 -> itself alone.
    assert voted[0].tolist() == pytest.approx([0.150872, 0.0, 10.150872, 10.0], abs=1e-5)
    assert voted[1].tolist() == pytest.approx([50.0, 50.0, 60.0, 60.0])


def test_postprocess_golden_and_score_voting_switch():
    """One confident anchor: level 0 (stride 8), row 4, column 5, class 2, cls logit 5, IoU logit 3.
    Anchor: centre (40, 32), side 8 * 8 = 64 -> [8, 0, 72, 64] (y clipped at 0); zero deltas keep it;
    scale_factor (0.5, 0.25) -> [16, 0, 144, 256]. Score sqrt(sigmoid(5) * sigmoid(3))."""
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    cls = [torch.full((1, NUM_CLASSES, h, w), -10.0) for h, w in sizes]
    cls[0][0, 2, 4, 5] = 5.0
    iou = [torch.zeros(1, 1, h, w) for h, w in sizes]
    iou[0][0, 0, 4, 5] = 3.0
    box = [torch.zeros(1, 4, h, w) for h, w in sizes]
    box[0][0, 0, 4, 4] = 0.5  # a same-class neighbour below the threshold must not vote
    meta = {"img_shape": (64, 96), "scale_factor": (0.5, 0.25)}
    for voting in (True, False):
        model = tiny_model("model.test.score_thr=0.5", f"model.test.score_voting={str(voting).lower()}").eval()
        assert model.postprocessor.score_voting is voting
        (det,) = model.postprocessor(cls, box, iou, [meta])
        assert det["boxes"].shape == (1, 4) and det["boxes"][0].tolist() == pytest.approx([16.0, 0.0, 144.0, 256.0])
        assert det["labels"].tolist() == [2]
        assert det["scores"].item() == pytest.approx(math.sqrt(1 / (1 + math.exp(-5)) / (1 + math.exp(-3))))


def test_voting_moves_boxes_at_eval():
    model = tiny_model("model.test.score_thr=0.0").eval()
    images = torch.randn(1, 3, 64, 96)
    meta = [{"img_shape": (64, 96), "scale_factor": (1.0, 1.0)}]
    with torch.no_grad():
        (voted,) = model(images, meta)
        model.postprocessor.score_voting = False
        (plain,) = model(images, meta)
    assert torch.equal(voted["scores"], plain["scores"]) and torch.equal(voted["labels"], plain["labels"])
    assert not torch.allclose(voted["boxes"], plain["boxes"])


def test_config_errors():
    with pytest.raises(ConfigError, match="'pisa'.*model.allow_pisa"):
        build_model(tiny_cfg("pisa={isr_p: {k: 2.0, bias: 0.0}}"))
    with pytest.raises(ConfigError, match="pisa.carl"):
        build_model(tiny_cfg("pisa={isr_p: {k: 2.0, bias: 0.0}, carl: {k: 1.0, bias: 0.2}}", "model.allow_pisa=true"))
    with pytest.raises(ConfigError, match="sampling_free"):
        build_model(tiny_cfg("sampling_free={pi: 1.0e-5}"))
    with pytest.raises(ConfigError, match="one anchor per location"):
        build_model(tiny_cfg("model.anchors.ratios=[0.5,1.0,2.0]"))


def test_experimental_isr_p_on_paa_changes_only_the_classification_gradient():
    """With model.allow_pisa, ISR-P reweights PAA's positives: loss_cls keeps its value (ISR-P keeps
    the positives' summed loss) while the classifier's gradient changes; the box terms are unchanged."""
    images, targets = _batch()
    plain = tiny_model("model.anchors.octave_base_scale=2").train()
    isr = tiny_model("model.anchors.octave_base_scale=2", "model.allow_pisa=true",
                     "pisa={isr_p: {k: 2.0, bias: 0.0}}").train()
    isr.load_state_dict(plain.state_dict())
    a, b = plain(images, targets), isr(images, targets)
    assert b["loss_cls"].item() == pytest.approx(a["loss_cls"].item(), rel=1e-5)
    assert b["loss_bbox"].item() == pytest.approx(a["loss_bbox"].item(), rel=1e-6)
    a["loss_cls"].backward()
    b["loss_cls"].backward()
    assert not torch.allclose(plain.head.cls_logits.weight.grad, isr.head.cls_logits.weight.grad, rtol=1e-3)


def _mmdet_paa_r50_state_dict() -> dict[str, torch.Tensor]:
    """An mmdetection PAA R-50 state dict, synthesised: the backbone rows of the shipped RetinaNet R-50 key
    list (same ResNet), plus the neck and head keys written out from the PAA head's structure (no
    reference key list of PAA is available; see pisa/models/convert.py)."""
    state = {}
    for line in (REPO / "tests/data_files/mmdet_keys/retinanet_r50_fpn.tsv").read_text().splitlines():
        if line.startswith("backbone."):
            key, shape, dtype = line.split("\t")
            dims = [] if shape in ("", "()", "scalar") else [int(d) for d in shape.split("x")]
            state[key] = torch.zeros(dims, dtype=getattr(torch, dtype))
    for i, c in enumerate((512, 1024, 2048)):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.zeros(256, c, 1, 1)
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.zeros(256)
    for i in range(5):  # fpn_convs.3 (P6) reads the 256-channel P5 output ("on_output")
        state[f"neck.fpn_convs.{i}.conv.weight"] = torch.zeros(256, 256, 3, 3)
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.zeros(256)
        state[f"bbox_head.scales.{i}.scale"] = torch.tensor(1.0)
    for tower in ("cls", "reg"):
        for i in range(4):
            state[f"bbox_head.{tower}_convs.{i}.conv.weight"] = torch.zeros(256, 256, 3, 3)  # bias-free
            state[f"bbox_head.{tower}_convs.{i}.gn.weight"] = torch.ones(256)
            state[f"bbox_head.{tower}_convs.{i}.gn.bias"] = torch.zeros(256)
    for name, out in (("atss_cls", 80), ("atss_reg", 4), ("atss_centerness", 1)):
        state[f"bbox_head.{name}.weight"] = torch.zeros(out, 256, 3, 3)
        state[f"bbox_head.{name}.bias"] = torch.zeros(out)
    return state


def test_mmdet_paa_checkpoint_keys_map_onto_the_model():
    from pisa.models.convert import convert_mmdet_state_dict, infer_model_cfg, mmdet_model_type

    state = _mmdet_paa_r50_state_dict()
    state["bbox_head.scales.3.scale"] = torch.tensor(1.5)
    assert mmdet_model_type(state) == "paa"
    base = load_config(str(PAA_CFG), check_paths=False)["model"]
    cfg = infer_model_cfg(state, base)
    assert (cfg["backbone"]["type"], cfg["num_classes"], cfg["head"]["stacked_convs"]) == ("resnet50", 80, 4)
    converted = convert_mmdet_state_dict(state, cfg)  # raises on any unmapped / missing / mis-shaped key
    assert len(converted) == len(state)
    assert converted["head.scales.3"].item() == 1.5
    assert converted["head.iou_pred.weight"].shape == (1, 256, 3, 3)
    assert converted["neck.p6_conv.weight"].shape == (256, 256, 3, 3)


def test_losses_are_fp32_under_autocast():
    model = tiny_model("model.anchors.octave_base_scale=2").train()
    images, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
