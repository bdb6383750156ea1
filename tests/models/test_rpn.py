"""RPN: anchors, head parity with torchvision, proposals on hand-made inputs, losses on a hand-made case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.rpn import RPN, ProposalSettings, RPNHead, generate_proposals
from pisa.models.samplers import RandomSampler

RPN_STRIDES = [4, 8, 16, 32, 64]


def rpn_anchor_generator() -> AnchorGenerator:
    return AnchorGenerator(RPN_STRIDES, [0.5, 1.0, 2.0], scales=[8.0])


def build_rpn(head=None, anchor_generator=None, *, train=(2000, 1000), test=(1000, 1000), pad_divisor=32,
              generator=None) -> RPN:
    anchor_generator = anchor_generator or rpn_anchor_generator()
    head = head or RPNHead(8, 8, anchor_generator.num_anchors)
    return RPN(head, anchor_generator, DeltaXYWHCoder(), MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3),
               RandomSampler(256, 0.5), train_proposals=ProposalSettings(*train),
               test_proposals=ProposalSettings(*test), pad_divisor=pad_divisor, generator=generator)


def pyramid(batch=2, channels=8, size=64, seed=0):
    """Random P2..P6 of a ``size`` x ``size`` batch."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=gen) for s in RPN_STRIDES]


# ---- anchors ------------------------------------------------------------------------------------

def test_rpn_anchors_first_values_method_doc():
    # Method doc §7.2, RPN P2 (stride 4, scale 8 -> size 32): w = 32/sqrt(r), h = 32·sqrt(r) for r = 0.5, 1, 2;
    # 32·sqrt(2)/2 = 22.627, 32/sqrt(2)/2 = 11.314; centred at (0, 0), the next location adds the stride to x.
    expected = torch.tensor([[-22.627417, -11.313708, 22.627417, 11.313708], [-16.0, -16.0, 16.0, 16.0],
                             [-11.313708, -22.627417, 11.313708, 22.627417]])
    by_scales = rpn_anchor_generator()
    by_octave = AnchorGenerator(RPN_STRIDES, [0.5, 1.0, 2.0], octave_base_scale=8, scales_per_octave=1)
    for generator in (by_scales, by_octave):
        p2 = generator.grid_anchors([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])[0]
        torch.testing.assert_close(p2[:3], expected)
        torch.testing.assert_close(p2[3:6], expected + torch.tensor([4.0, 0, 4.0, 0]))
        torch.testing.assert_close(p2[9:12], expected + torch.tensor([0, 4.0, 0, 4.0]))  # row 1 starts at 3·3
    # P6: stride 64, size 512; the square anchor is [-256, -256, 256, 256].
    p6 = by_scales.grid_anchors([(1, 1)] * 5)[4]
    torch.testing.assert_close(p6[1], torch.tensor([-256.0, -256.0, 256.0, 256.0]))


def test_anchors_equal_torchvision_ones_up_to_its_rounding():
    """torchvision rounds its base anchors to integers; ours keep the reference's unrounded sizes."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    tv = TVAnchorGenerator(sizes=tuple((8 * s,) for s in RPN_STRIDES), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    feats = pyramid(batch=1, channels=1)
    tv_anchors = tv(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), feats)[0]
    ours = rpn_anchor_generator()
    sizes = [tuple(f.shape[-2:]) for f in feats]
    rounded = [base.round() for base in ours.base_anchors()]
    ours_rounded = torch.cat([ours._level_grid(base, stride, size, "cpu", torch.float32)
                              for base, stride, size in zip(rounded, RPN_STRIDES, sizes)])
    assert torch.equal(tv_anchors, ours_rounded)
    assert not torch.equal(tv_anchors, ours.anchors(sizes))  # e.g. -22.627 vs -23


# ---- head ----------------------------------------------------------------------------------------

def _torchvision_head_like(head: RPNHead):
    from torchvision.models.detection.rpn import RPNHead as TVRPNHead

    tv = TVRPNHead(head.rpn_conv.in_channels, head.num_anchors)
    with torch.no_grad():
        for ours, theirs in ((head.rpn_conv, tv.conv[0][0]), (head.rpn_cls, tv.cls_logits),
                             (head.rpn_reg, tv.bbox_pred)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return tv


def test_head_shapes_init_and_parity_with_torchvision_rpn_head():
    torch.manual_seed(0)
    head = RPNHead(8, 8, 3)
    for conv in (head.rpn_conv, head.rpn_cls, head.rpn_reg):
        assert conv.bias.abs().max() == 0 and abs(conv.weight.std().item() - 0.01) < 0.004
    with torch.no_grad():  # random weights large enough to give varied outputs
        for p in head.parameters():
            p.normal_(std=0.3)
    feats = pyramid()
    objectness, deltas = head(feats)
    assert [tuple(o.shape) for o in objectness] == [(2, 3, 64 // s, 64 // s) for s in RPN_STRIDES]
    assert [tuple(d.shape) for d in deltas] == [(2, 12, 64 // s, 64 // s) for s in RPN_STRIDES]
    # Same architecture: conv3x3 + ReLU, 1x1 objectness (channel a), 1x1 deltas (channel a·4 + coord).
    tv_objectness, tv_deltas = _torchvision_head_like(head)(feats)
    for a, b in zip(objectness + deltas, tv_objectness + tv_deltas):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_proposals_match_torchvision_rpn_given_the_same_anchors():
    """torchvision's RegionProposalNetwork in eval mode, fed our (unrounded) anchors and copied head weights.

    What differs and is neutralised here: torchvision's anchors are rounded (we hand it ours instead);
    it drops boxes smaller than 1e-3 px after clipping (none occur here; we have no size filter, as the
    reference with min_bbox_size 0); its box coder has weights (1, 1, 1, 1) and the same dw/dh clamp
    log(1000/16), computing the corners in a different order (hence a float tolerance).
    """
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    head = RPNHead(8, 8, 3)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.3)
        # Moderate deltas, so that no clipped box collapses to zero width (torchvision would drop it).
        head.rpn_reg.weight.normal_(std=0.01)
        head.rpn_reg.bias.zero_()
    rpn = build_rpn(head, test=(40, 25)).eval()
    feats = pyramid()
    img_shapes = [(64, 64), (60, 50)]
    sizes = [tuple(f.shape[-2:]) for f in feats]

    class OurAnchors(nn.Module):
        def forward(self, images, features):
            return [rpn.anchor_generator.anchors(sizes)] * len(features[0])

    tv = RegionProposalNetwork(OurAnchors(), _torchvision_head_like(head), 0.7, 0.3, 256, 0.5,
                               pre_nms_top_n={"training": 40, "testing": 40},
                               post_nms_top_n={"training": 25, "testing": 25}, nms_thresh=0.7).eval()
    expected, _ = tv(ImageList(torch.zeros(2, 3, 64, 64), img_shapes), {str(i): f for i, f in enumerate(feats)})
    proposals, losses = rpn(feats, [{"img_shape": s} for s in img_shapes])
    assert losses == {}
    assert [p.shape[0] for p in proposals] == [25, 25]
    for ours, theirs in zip(proposals, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert not torch.equal(proposals[0], proposals[1])  # the images' own clipping and scores


def test_losses_match_torchvision_rpn_when_every_anchor_is_sampled():
    """torchvision's RPN losses on the same anchors, head and GTs.

    The two differ by design in the box loss (torchvision: SmoothL1 β 1/9; the reference: L1), so ours is
    set to torchvision's here, and in the normaliser (torchvision: the number of sampled anchors; the
    reference: Σ_img max(#pos, 1) + max(#neg, 1)), which agree when every image has positives and
    negatives. With 213 anchors per image (a 28 x 28 input) both samplers take every assigned anchor, so no
    random choice is involved. Low-quality matches differ in two ways that this case avoids: torchvision
    has no least IoU (the reference needs min_pos_iou 0.3: each GT here has a best IoU of 0.56 or 0.47),
    and it keeps such an anchor's own argmax GT where the reference gives it to the claiming GT (only
    different with several GTs; there is one per image).
    """
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    head = RPNHead(8, 8, 3)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.3)
    rpn = RPN(head, rpn_anchor_generator(), DeltaXYWHCoder(), MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3),
              RandomSampler(256, 0.5), train_proposals=ProposalSettings(50, 20),
              test_proposals=ProposalSettings(50, 20), bbox_loss="smooth_l1", bbox_beta=1 / 9).train()
    gen = torch.Generator().manual_seed(1)
    sizes = [(7, 7), (4, 4), (2, 2), (1, 1), (1, 1)]
    feats = [torch.randn(2, 8, h, w, generator=gen) for h, w in sizes]
    targets = [{"img_shape": (28, 28), "boxes": torch.tensor([[2.0, 2.0, 26.0, 26.0]]), "labels": torch.tensor([0])},
               {"img_shape": (28, 28), "boxes": torch.tensor([[4.0, 0.0, 28.0, 20.0]]), "labels": torch.tensor([0])}]
    anchors = rpn.anchor_generator.anchors(sizes)
    assert anchors.shape[0] == 213

    class OurAnchors(nn.Module):
        def forward(self, images, features):
            return [anchors] * 2

    tv = RegionProposalNetwork(OurAnchors(), _torchvision_head_like(head), 0.7, 0.3, 256, 0.5,
                               pre_nms_top_n={"training": 50, "testing": 50},
                               post_nms_top_n={"training": 20, "testing": 20}, nms_thresh=0.7).train()
    _, tv_losses = tv(ImageList(torch.zeros(2, 3, 28, 28), [(28, 28)] * 2), {str(i): f for i, f in enumerate(feats)},
                      [{"boxes": t["boxes"]} for t in targets])
    _, losses = rpn(feats, targets)
    t = rpn.get_targets(anchors, sizes, targets)
    # Both images have positives, and some anchors are ignored (IoU between 0.3 and 0.7).
    assert bool((t.pos_inds < 213).any()) and bool((t.pos_inds >= 213).any()) and t.sample_inds.numel() < 2 * 213
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_bbox"], tv_losses["loss_rpn_box_reg"])


# ---- proposals on hand-made inputs -----------------------------------------------------------------

def _apart(count, y=0.0, size=8.0, gap=20.0):
    """``count`` disjoint boxes in a row."""
    return torch.tensor([[gap * i, y, gap * i + size, y + size] for i in range(count)])


def _propose(logits_per_level, anchors_per_level, settings, img_shape=(1000, 1000), deltas=None):
    objectness = [torch.tensor(logits, dtype=torch.float32)[None] for logits in logits_per_level]
    if deltas is None:
        deltas = [torch.zeros(1, a.shape[0], 4) for a in anchors_per_level]
    return generate_proposals(objectness, deltas, anchors_per_level, DeltaXYWHCoder(), [img_shape], settings)[0]


def test_top_k_per_level_before_nms_then_sorted_by_score():
    level0, level1 = _apart(5), _apart(3, y=100.0)
    result = _propose([[0.5, 3.0, -1.0, 2.0, 1.0], [4.0, -2.0, 0.0]], [level0, level1],
                      ProposalSettings(nms_pre=3, max_per_img=100))
    # Level 0 keeps its top 3 (logits 3, 2, 1: anchors 1, 3, 4); level 1 has only 3, all kept; zero deltas
    # decode to the anchors themselves; the merged list is ordered by score across levels.
    expected_boxes = torch.stack([level1[0], level0[1], level0[3], level0[4], level1[2], level1[1]])
    assert torch.equal(result.boxes, expected_boxes)
    torch.testing.assert_close(result.scores, torch.sigmoid(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -2.0])))
    assert result.levels.tolist() == [1, 0, 0, 0, 1, 1]
    # nms_pre <= 0 keeps every anchor.
    everything = _propose([[0.5, 3.0, -1.0, 2.0, 1.0], [4.0, -2.0, 0.0]], [level0, level1],
                          ProposalSettings(nms_pre=0, max_per_img=100))
    assert everything.boxes.shape == (8, 4)


def test_nms_within_a_level_only_and_max_per_img():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    taller = torch.tensor([[0.0, 0.0, 10.0, 11.0]])  # IoU 100/110 = 0.909 > 0.7: suppressed by a
    tall = torch.tensor([[0.0, 0.0, 10.0, 14.0]])  # IoU 100/140 = 0.714 > 0.7: suppressed
    tallest = torch.tensor([[0.0, 0.0, 10.0, 15.0]])  # IoU 100/150 = 0.667: kept
    level0 = torch.cat([a, taller, tall, tallest])
    level1 = a.clone()  # the same box on another level is never suppressed by level 0
    result = _propose([[3.0, 2.0, 1.0, 0.0], [-1.0]], [level0, level1], ProposalSettings(100, 100))
    assert torch.equal(result.boxes, torch.cat([a, tallest, a]))
    assert result.levels.tolist() == [0, 0, 1]
    # The suppressor must outscore: with a last, the 0.909 box leads and suppresses a and the 0.714 box?
    # taller-vs-tall IoU is 110/140 = 0.786, so taller suppresses a (0.909) and tall; tallest vs taller is
    # 110/150 = 0.733 -> suppressed too.
    result = _propose([[-3.0, 2.0, 1.0, 0.0], [-1.0]], [level0, level1], ProposalSettings(100, 100))
    assert torch.equal(result.boxes, torch.cat([taller, a]))
    # max_per_img keeps the best by score.
    result = _propose([[3.0, 2.0, 1.0, 0.0], [-1.0]], [level0, level1], ProposalSettings(100, 2))
    assert torch.equal(result.boxes, torch.cat([a, tallest]))


def test_decoding_clips_to_the_image_and_nms_sees_the_clipped_boxes():
    anchors = torch.tensor([[-5.0, -5.0, 20.0, 30.0], [2.0, 2.0, 6.0, 6.0]])
    # Delta (0.5, 0, 0, 0) on [2, 2, 6, 6] moves it by half its width: [4, 2, 8, 6], clipped to w = 7.
    deltas = [torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]])]
    result = _propose([[1.0, 0.0]], [anchors], ProposalSettings(100, 100), img_shape=(16, 7), deltas=deltas)
    assert torch.equal(result.boxes, torch.tensor([[0.0, 0.0, 7.0, 16.0], [4.0, 2.0, 7.0, 6.0]]))


def test_batched_images_do_not_interact_and_equal_single_image_calls():
    anchors = [_apart(6), _apart(4, y=50.0)]
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(3, 6, generator=gen), torch.randn(3, 4, generator=gen)]
    deltas = [torch.randn(3, 6, 4, generator=gen) * 0.2, torch.randn(3, 4, 4, generator=gen) * 0.2]
    shapes = [(200, 120), (60, 80), (100, 100)]
    settings = ProposalSettings(nms_pre=3, max_per_img=4)
    batched = generate_proposals(logits, deltas, anchors, DeltaXYWHCoder(), shapes, settings)
    for i, result in enumerate(batched):
        alone = generate_proposals([x[i:i + 1] for x in logits], [d[i:i + 1] for d in deltas], anchors,
                                   DeltaXYWHCoder(), [shapes[i]], settings)[0]
        assert torch.equal(result.boxes, alone.boxes) and torch.equal(result.scores, alone.scores)
        assert result.boxes.shape[0] <= 4 and bool((result.scores[:-1] >= result.scores[1:]).all())


def test_proposals_are_detached_and_use_the_mode_settings():
    torch.manual_seed(0)
    rpn = build_rpn(train=(20, 7), test=(20, 5))
    feats = [f.requires_grad_() for f in pyramid()]
    targets = [{"img_shape": (64, 64), "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
                "labels": torch.tensor([0])},
               {"img_shape": (64, 64), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    proposals, losses = rpn.train()(feats, targets)
    assert [p.shape for p in proposals] == [(7, 4), (7, 4)]
    assert not any(p.requires_grad for p in proposals)
    assert sorted(losses) == ["loss_rpn_bbox", "loss_rpn_cls"]
    proposals, losses = rpn.eval()(feats, targets)
    assert [p.shape for p in proposals] == [(5, 4), (5, 4)] and losses == {}


# ---- losses ---------------------------------------------------------------------------------------

def _single_level_rpn(pad_divisor=16):
    """Stride 16, one 16 x 16 anchor per location: on a 2 x 2 map the anchors are
    a0 [-8, -8, 8, 8], a1 [8, -8, 24, 8], a2 [-8, 8, 8, 24], a3 [8, 8, 24, 24]."""
    generator = AnchorGenerator([16], [1.0], scales=[1.0])
    return build_rpn(RPNHead(4, 4, 1), generator, pad_divisor=pad_divisor)


def test_losses_hand_made_case_with_an_empty_and_a_padded_image():
    rpn = _single_level_rpn()
    objectness = [torch.full((2, 1, 2, 2), 1.0, requires_grad=True)]
    deltas_map = torch.zeros(2, 4, 2, 2)
    deltas_map[:, 0] = 0.1
    deltas = [deltas_map.requires_grad_()]
    targets = [
        # GT [8, 8, 24, 26]: IoU with a3 = 256 / 288 = 0.889 >= 0.7 (positive); 0 with a0..a2 (negatives).
        {"img_shape": (32, 32), "boxes": torch.tensor([[8.0, 8.0, 24.0, 26.0]]), "labels": torch.tensor([0])},
        # No GT, image 16 x 16 inside the 32 x 32 batch: only x, y < ceil(16 / 16) = 1 is valid, i.e. a0.
        {"img_shape": (16, 16), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = rpn.loss(objectness, deltas, targets)
    # Samples: image 0 one positive + 3 negatives, image 1 one negative. The reference's normaliser is
    # Σ_img max(#pos, 1) + max(#neg, 1) = (1 + 3) + (1 + 1) = 6.
    # BCE at logit 1: positive softplus(-1) = 0.3132617, negative softplus(1) = 1.3132617;
    # loss_rpn_cls = (0.3132617 + 4 · 1.3132617) / 6 = 0.9277181.
    # a3's target: centre (16, 17) vs (16, 16), size 16 x 18 vs 16 x 16 -> (0, 1/16, 0, ln 1.125 = 0.1177830);
    # L1 against (0.1, 0, 0, 0) = 0.1 + 0.0625 + 0.1177830; / 6 = 0.0467138.
    assert losses["loss_rpn_cls"].item() == pytest.approx(0.9277181, abs=1e-6)
    assert losses["loss_rpn_bbox"].item() == pytest.approx(0.0467138, abs=1e-6)
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    grad = objectness[0].grad
    # Sampled anchors get the BCE gradient (sigmoid(1) - target) / 6; invalid padded anchors get none.
    assert grad[0, 0, 1, 1].item() == pytest.approx((torch.sigmoid(torch.tensor(1.0)).item() - 1) / 6, abs=1e-6)
    assert grad[1, 0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item() / 6, abs=1e-6)
    assert torch.equal(grad[1, 0].flatten()[1:], torch.zeros(3))
    # Deltas: only a3 of image 0, d|x|/dx = sign / 6 (0 where the difference is 0: dw).
    expected = torch.zeros(2, 4, 2, 2)
    expected[0, :, 1, 1] = torch.tensor([1.0, -1.0, 0.0, -1.0]) / 6
    torch.testing.assert_close(deltas[0].grad, expected)


def test_images_without_gts_give_an_attached_zero_box_loss_and_negatives_only():
    rpn = _single_level_rpn()
    objectness = [torch.full((1, 1, 2, 2), -2.0, requires_grad=True)]
    deltas = [torch.randn(1, 4, 2, 2, requires_grad=True)]
    empty = [{"img_shape": (32, 32), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = rpn.loss(objectness, deltas, empty)
    # 4 negatives, normaliser max(0, 1) + 4 = 5: loss = 4 · softplus(-2) / 5.
    assert losses["loss_rpn_cls"].item() == pytest.approx(4 * F.softplus(torch.tensor(-2.0)).item() / 5, abs=1e-6)
    assert losses["loss_rpn_bbox"].item() == 0.0
    losses["loss_rpn_bbox"].backward()
    assert deltas[0].grad is not None and torch.equal(deltas[0].grad, torch.zeros_like(deltas[0]))


def test_sampling_is_256_per_image_at_most_half_positive_and_follows_the_generator():
    rpn = build_rpn(generator=torch.Generator().manual_seed(0))
    feats = pyramid(batch=1, size=128)
    sizes = [tuple(f.shape[-2:]) for f in feats]
    anchors = rpn.anchor_generator.anchors(sizes)
    # 36 GTs of 32 x 32, each equal to a square P2 anchor; the anchors 4 px away overlap them with IoU
    # 896 / 1152 = 0.78, so every GT has several positives and there are more than 128 in all.
    centres = torch.arange(20.0, 110.0, 16.0)
    xy = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), dim=-1).reshape(-1, 2)
    boxes = torch.cat([xy - 16, xy + 16], dim=1)
    target = {"img_shape": (128, 128), "boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)}
    assign = rpn._assign(anchors, sizes, target)
    assert assign.pos_mask.sum() > 128
    t = rpn.get_targets(anchors, sizes, [target])
    assert t.sample_inds.numel() == 256 and t.pos_inds.numel() == 128
    assert t.avg_factor.item() == 256
    rpn.generator.manual_seed(0)
    again = rpn.get_targets(anchors, sizes, [target])
    assert torch.equal(t.sample_inds, again.sample_inds)


def test_every_head_parameter_gets_a_gradient_and_losses_are_fp32():
    torch.manual_seed(0)
    rpn = build_rpn().train()
    targets = [{"img_shape": (64, 64), "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [30.0, 20.0, 60.0, 62.0]]),
                "labels": torch.tensor([0, 1])}] * 2
    _, losses = rpn(pyramid(), targets)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())
    assert losses["loss_rpn_bbox"].item() > 0
    sum(losses.values()).backward()
    for name, p in rpn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match="model.rpn.loss_bbox.type"):
        RPN(RPNHead(4, 4, 3), rpn_anchor_generator(), DeltaXYWHCoder(), MaxIoUAssigner(0.7, 0.3),
            RandomSampler(256, 0.5), train_proposals=ProposalSettings(10, 10),
            test_proposals=ProposalSettings(10, 10), bbox_loss="giou")
    with pytest.raises(ValueError, match="anchors per location"):
        build_rpn(RPNHead(4, 4, 9))


def test_reference_loss_normaliser_is_not_the_sample_count_alone():
    # One image, no GT: 256 negatives sampled, normaliser max(0, 1) + 256 = 257 (not 256): the reference
    # counts at least one positive per image.
    rpn = build_rpn()
    feats = pyramid(batch=1, size=128)
    sizes = [tuple(f.shape[-2:]) for f in feats]
    empty = {"img_shape": (128, 128), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    t = rpn.get_targets(rpn.anchor_generator.anchors(sizes), sizes, [empty])
    assert t.sample_inds.numel() == 256 and t.pos_inds.numel() == 0 and t.avg_factor.item() == 257
    assert math.isclose(t.objectness.sum().item(), 0.0)


def test_autocast_keeps_losses_and_proposals_in_fp32_and_close_to_fp32_values():
    torch.manual_seed(0)
    rpn = build_rpn(generator=torch.Generator().manual_seed(0)).train()
    targets = [{"img_shape": (64, 64), "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
                "labels": torch.tensor([0])}] * 2
    _, reference = rpn(pyramid(), targets)
    rpn.generator.manual_seed(0)  # the same samples
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proposals, losses = rpn(pyramid(), targets)
    assert all(p.dtype == torch.float32 for p in proposals)
    for key, value in losses.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference[key], rtol=0.05, atol=1e-3)
