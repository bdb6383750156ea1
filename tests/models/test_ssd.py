"""SSD: anchors (method doc §7.2), hard negative mining, the SSD criterion with PISA, inference, building."""

import math

import pytest
import torch
import torch.nn.functional as F

from pisa.config import validate
from pisa.models import build_model
from pisa.models.anchors import SSDAnchorGenerator, ssd_anchor_sizes
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.retina_head import CARLSettings, ISRPSettings
from pisa.models.ssd import SSDPostProcessor, build_ssd_anchor_generator
from pisa.models.ssd_head import SSDHead, SSDLoss, hard_negative_mask

SSD300_SIZES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def ssd_cfg(**model):
    """A validated config with an SSD model (defaults: SSD300, 80 classes)."""
    return validate({"model": {"type": "ssd", "num_classes": 80, **model},
                     "data": {"train": {"type": "synthetic"}, "val": {"type": "synthetic"}},
                     "train": {"work_dir": "unused"}}, check_paths=False)


# ---- anchors -------------------------------------------------------------------------------------


# First location of every SSD300 level, derived by hand. Level l has stride t, min size s, max size S
# (§7.2: 21/45, 45/99, 99/153, 153/207, 207/261, 261/315) and centre c = t/2. Anchors, in order:
# the square s (half side s/2), the square √(sS), then per extra ratio r the wide box (w = s√r,
# h = s/√r) and the tall one. E.g. level 1: c = 8, √(45·99) = 66.7458, 45√2 = 63.6396, 45/√2 = 31.8198,
# 45√3 = 77.9423, 45/√3 = 25.9808, so its ratio-3 wide box is [8 − 38.9711, 8 − 12.9904, ...].
SSD300_FIRST_LOCATION = [
    [[-6.5, -6.5, 14.5, 14.5], [-11.3704, -11.3704, 19.3704, 19.3704],
     [-10.8492, -3.4246, 18.8492, 11.4246], [-3.4246, -10.8492, 11.4246, 18.8492]],
    [[-14.5, -14.5, 30.5, 30.5], [-25.3729, -25.3729, 41.3729, 41.3729],
     [-23.8198, -7.9099, 39.8198, 23.9099], [-7.9099, -23.8198, 23.9099, 39.8198],
     [-30.9711, -4.9904, 46.9711, 20.9904], [-4.9904, -30.9711, 20.9904, 46.9711]],
    [[-33.5, -33.5, 65.5, 65.5], [-45.5366, -45.5366, 77.5366, 77.5366],
     [-54.0036, -19.0018, 86.0036, 51.0018], [-19.0018, -54.0036, 51.0018, 86.0036],
     [-69.7365, -12.5789, 101.7365, 44.5789], [-12.5789, -69.7365, 44.5789, 101.7365]],
    [[-44.5, -44.5, 108.5, 108.5], [-56.9818, -56.9818, 120.9818, 120.9818],
     [-76.1873, -22.0937, 140.1873, 86.0937], [-22.0937, -76.1873, 86.0937, 140.1873],
     [-100.5019, -12.1673, 164.5019, 76.1673], [-12.1673, -100.5019, 76.1673, 164.5019]],
    [[-53.5, -53.5, 153.5, 153.5], [-66.2186, -66.2186, 166.2186, 166.2186],
     [-96.3711, -23.1856, 196.3711, 123.1856], [-23.1856, -96.3711, 123.1856, 196.3711]],
    [[19.5, 19.5, 280.5, 280.5], [6.6342, 6.6342, 293.3658, 293.3658],
     [-34.5549, 57.7226, 334.5549, 242.2774], [57.7226, -34.5549, 242.2774, 334.5549]],
]


def test_ssd300_prior_boxes_hand_computed_per_level():
    generator = build_ssd_anchor_generator(ssd_cfg()["model"])
    levels = generator.grid_anchors(SSD300_SIZES)
    # 38²·4 + 19²·6 + 10²·6 + 5²·6 + 3²·4 + 1·4
    assert [len(a) for a in levels] == [5776, 2166, 600, 150, 36, 4] and sum(map(len, levels)) == 8732
    for level, stride, (_, width), expected in zip(levels, [8, 16, 32, 64, 100, 300], SSD300_SIZES,
                                                    SSD300_FIRST_LOCATION):
        count = len(expected)
        torch.testing.assert_close(level[:count], torch.tensor(expected), atol=1e-3, rtol=0)
        # The next location along x moves every box by one stride; rows follow after W locations.
        if width > 1:
            shift = torch.tensor([stride, 0, stride, 0], dtype=torch.float32)
            torch.testing.assert_close(level[count:2 * count], level[:count] + shift, atol=1e-4, rtol=0)
            torch.testing.assert_close(level[width * count:(width + 1) * count],
                                       level[:count] + shift[[1, 0, 3, 2]], atol=1e-4, rtol=0)


def test_ssd512_sizes():
    assert ssd_anchor_sizes(512, (0.1, 0.9), 7) == ([20, 51, 133, 215, 296, 378, 460],
                                                     [51, 133, 215, 296, 378, 460, 542])
    cfg = ssd_cfg(input_size=512, anchors={"strides": [8, 16, 32, 64, 128, 256, 512], "ratio_range": [0.1, 0.9],
                                           "ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]})
    generator = build_ssd_anchor_generator(cfg["model"])
    assert generator.num_anchors_per_level == [4, 6, 6, 6, 6, 4, 4]
    first = generator.grid_anchors([(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])[0][:3]
    torch.testing.assert_close(first, torch.tensor([[-6.0, -6.0, 14.0, 14.0], [-11.969, -11.969, 19.969, 19.969],
                                                    [-10.142, -3.071, 18.142, 11.071]]), atol=1e-3, rtol=0)


# ---- hard negative mining ------------------------------------------------------------------------


def test_hard_negative_mining_keeps_three_per_positive():
    # Image 0: 2 positives (anchors 0, 5) among 12 anchors; the losses rank the 10 negatives
    # 11 > 10 > 9 > ... so the top 3·2 = 6 negatives are anchors 11, 10, 9, 8, 7, 6... except 5 (a
    # positive, never a negative): the kept negatives are 11, 10, 9, 8, 7, 6.
    # Image 1: 1 positive (anchor 0) and only 2 negatives (anchors 1, 2; the rest ignored): both kept.
    # Image 2: no positive: nothing kept, however large the losses.
    loss = torch.arange(12.0).repeat(3, 1)
    negative = torch.ones(3, 12, dtype=torch.bool)
    negative[0, [0, 5]] = False
    negative[1] = False
    negative[1, [1, 2]] = True
    num_pos = torch.tensor([2, 1, 0])
    kept = hard_negative_mask(loss, negative, num_pos, 3.0)
    assert kept[0].nonzero().squeeze(1).tolist() == [6, 7, 8, 9, 10, 11]
    assert kept[1].nonzero().squeeze(1).tolist() == [1, 2]
    assert not kept[2].any()
    assert not (kept & ~negative).any()  # a positive is never mined as a negative


def test_hard_negative_mining_ties_go_to_the_lower_index():
    kept = hard_negative_mask(torch.zeros(1, 6), torch.ones(1, 6, dtype=torch.bool), torch.tensor([1]), 3.0)
    assert kept[0].tolist() == [True, True, True, False, False, False]


# ---- criterion -----------------------------------------------------------------------------------

NUM_CLASSES = 3


def tiny_criterion(isr=None, carl=None):
    """SSD criterion on one 4x4 level of stride 8 (a 32x32 image), 2 anchors per location (no extra ratios)."""
    generator = SSDAnchorGenerator([8], [[]], [8], [16])
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    return SSDLoss(NUM_CLASSES, generator, coder, MaxIoUAssigner(0.5, 0.5, 0.0, gt_max_assign_all=False),
                   isr_p=isr, carl=carl)


def tiny_batch(seed=0, with_gt=True):
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(2, 2 * (NUM_CLASSES + 1), 4, 4, generator=g, requires_grad=True)]
    reg = [(0.5 * torch.randn(2, 2 * 4, 4, 4, generator=g)).requires_grad_()]
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 9.0], [3.0, 2.0, 15.0, 11.0], [16.0, 16.0, 30.0, 31.0]]),
             torch.tensor([[10.0, 12.0, 19.0, 20.0]])]
    labels = [torch.tensor([0, 0, 2]), torch.tensor([0])]
    if not with_gt:
        boxes, labels = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2
    targets = [{"boxes": b, "labels": lab, "ignore_boxes": torch.zeros(0, 4), "img_shape": (32, 32)}
               for b, lab in zip(boxes, labels)]
    return cls, reg, targets


def test_ssd_loss_equals_mined_cross_entropy_and_smooth_l1():
    criterion = tiny_criterion()
    cls, reg, targets = tiny_batch()
    losses = criterion(cls, reg, targets)
    anchors = criterion.anchor_generator.anchors([(4, 4)])
    t = criterion.get_targets(anchors, targets)
    num_pos = (t.labels < NUM_CLASSES).view(2, -1).sum(1)
    # Image 0: GT 0 overlaps anchors 0 and 1 by >= 0.5 (IoU 0.79, 0.63); GTs 1 and 2 (best IoU 0.39 and
    # 0.38) each claim only their argmax anchor. Image 1: one rescued positive. A = 4 + 1.
    assert num_pos.tolist() == [4, 1] and float(t.avg_factor) == 5.0
    logits = cls[0].permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES + 1)
    ce = F.cross_entropy(logits, t.labels, reduction="none").view(2, -1)
    expected = 0.0
    for img in range(2):
        pos = t.labels.view(2, -1)[img] < NUM_CLASSES
        neg_sorted = ce[img][~pos].sort(descending=True).values
        expected += ce[img][pos].sum() + neg_sorted[: 3 * int(num_pos[img])].sum()
    torch.testing.assert_close(losses["loss_cls"], expected / 5)
    deltas = reg[0].permute(0, 2, 3, 1).reshape(-1, 4)
    pos = t.labels < NUM_CLASSES
    torch.testing.assert_close(losses["loss_bbox"],
                               F.smooth_l1_loss(deltas[pos], t.bbox_targets[pos], beta=1.0, reduction="sum") / 5)
    assert set(losses) == {"loss_cls", "loss_bbox"}


def test_isr_p_keeps_the_positive_loss_sum_and_moves_the_gradient():
    cls, reg, targets = tiny_batch()
    base = tiny_criterion()(cls, reg, targets)
    pisa = tiny_criterion(ISRPSettings(), CARLSettings())(cls, reg, targets)
    # Σ_pos w·CE = Σ_pos CE at the current iterate and negatives (weight 1) are mined as before.
    torch.testing.assert_close(pisa["loss_cls"], base["loss_cls"])
    torch.testing.assert_close(pisa["loss_bbox"], base["loss_bbox"])
    assert set(pisa) == {"loss_cls", "loss_bbox", "loss_carl"}
    grad_base = torch.autograd.grad(base["loss_cls"], cls[0])[0]
    grad_pisa = torch.autograd.grad(pisa["loss_cls"], cls[0])[0]
    assert not torch.allclose(grad_base, grad_pisa)  # the weights did change


def test_carl_matches_the_softmax_carl_loss():
    from pisa.losses import carl_loss

    criterion = tiny_criterion(carl=CARLSettings(k=1.0, bias=0.2))
    cls, reg, targets = tiny_batch(seed=3)
    losses = criterion(cls, reg, targets)
    t = criterion.get_targets(criterion.anchor_generator.anchors([(4, 4)]), targets)
    logits = cls[0].permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES + 1)
    deltas = reg[0].permute(0, 2, 3, 1).reshape(-1, 4)
    expected = carl_loss(logits, t.labels, deltas, t.bbox_targets, num_classes=NUM_CLASSES, avg_factor=5.0,
                         sigmoid=False, k=1.0, bias=0.2, beta=1.0)
    torch.testing.assert_close(losses["loss_carl"], expected)


def test_no_gt_gives_zero_losses_attached_to_the_graph():
    cls, reg, targets = tiny_batch(with_gt=False)
    losses = tiny_criterion(ISRPSettings(), CARLSettings())(cls, reg, targets)
    assert all(float(v.detach()) == 0.0 for v in losses.values())
    total = sum(losses.values())
    total.backward()
    assert cls[0].grad is not None and reg[0].grad is not None
    assert float(cls[0].grad.abs().sum()) == 0.0 and float(reg[0].grad.abs().sum()) == 0.0


def test_legacy_gt_offset_reaches_the_criterion():
    cfg = ssd_cfg(backbone={"width": 0.125})
    cfg["pisa"] = {"isr_p": {"k": 2.0, "bias": 0.0}, "carl": {"k": 1.0, "bias": 0.2},
                   "compat": {"legacy_gt_offset": True, "legacy_float_keys": False}}
    model = build_model(cfg)
    assert model.criterion.isr_p.legacy_gt_offset and not model.criterion.isr_p.legacy_float_keys
    assert model.criterion.carl == CARLSettings(1.0, 0.2)


# ---- inference -----------------------------------------------------------------------------------


def test_postprocessor_softmax_threshold_and_rescale():
    generator = SSDAnchorGenerator([8], [[]], [8], [32])  # squares of side 8 and √(8·32) = 16
    post = SSDPostProcessor(generator, DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2)), score_thr=0.5)
    cls = torch.zeros(1, 2 * (NUM_CLASSES + 1), 2, 2)
    cls[0, 4 + 2, 1, 0] = 10.0  # location (y 1, x 0), anchor 1 (the 16 px square): class 2
    reg = torch.zeros(1, 8, 2, 2)
    out = post([cls], [reg], [{"img_shape": (16, 16), "scale_factor": (0.5, 2.0)}])[0]
    # softmax([0, 0, 10, 0]) = e^10 / (e^10 + 3) = 0.999864 for class 2; every other score is <= 0.25.
    assert out["labels"].tolist() == [2]
    torch.testing.assert_close(out["scores"], torch.tensor([math.exp(10) / (math.exp(10) + 3)]))
    # Anchor centred at (4, 12), side 16: [-4, 4, 12, 20] clipped to 16x16 -> [0, 4, 12, 16]; / (0.5, 2).
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 2.0, 24.0, 8.0]]))


# ---- building ------------------------------------------------------------------------------------


def test_build_ssd300_matches_the_reference_checksum():
    with torch.device("meta"):
        state = build_model(ssd_cfg()).state_dict()
    assert len(state) == 71 and sum(v.numel() for v in state.values()) == 34_305_206  # method doc §7.4


def test_build_ssd512_matches_the_reference_checksum():
    cfg = ssd_cfg(input_size=512, anchors={"strides": [8, 16, 32, 64, 128, 256, 512], "ratio_range": [0.1, 0.9],
                                           "ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]})
    with torch.device("meta"):
        state = build_model(cfg).state_dict()
    assert len(state) == 79 and sum(v.numel() for v in state.values()) == 36_038_196


def test_head_levels_must_match_anchor_levels():
    with pytest.raises(ValueError, match="model.anchors"):
        SSDHead(3, [8, 8], [4])
    with pytest.raises(ValueError, match="ratio lists"):
        build_ssd_anchor_generator(ssd_cfg(anchors={"ratios": [[2]]})["model"])
