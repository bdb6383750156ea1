"""R-CNN box head and RoI head: init, losses on hand-made cases (ISR-P, CARL, ISR-N weights), empty
images, torchvision parity (box head outputs, losses, post-processing) and the mask branch."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.mask_head import MaskHead
from pisa.models.retina_head import CARLSettings, ISRPSettings
from pisa.models.roi_align import MultiScaleRoIAlign
from pisa.models.roi_heads import BBoxHead, RCNNTestSettings, RoIHead, RoITargets, boxes_to_rois
from pisa.models.samplers import RandomSampler, ScoreHLRSampler

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


def make_head(num_classes: int = 2, *, channels: int = 8, fc: int = 16, isr_p=None, carl=None,
              bbox_loss: str = "smooth_l1", bbox_beta: float = 1.0, sampler=None, mask: bool = False,
              seed: int = 0) -> RoIHead:
    torch.manual_seed(seed)
    coder = DeltaXYWHCoder(stds=RCNN_STDS)
    mask_pool = MultiScaleRoIAlign(14) if mask else None
    mask_head = MaskHead(channels, 8, 2, num_classes) if mask else None
    return RoIHead(MultiScaleRoIAlign(7), BBoxHead(channels, num_classes, 7, fc), coder,
                   MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=mask),
                   sampler or RandomSampler(32, 0.25), num_classes=num_classes, bbox_loss=bbox_loss,
                   bbox_beta=bbox_beta, isr_p=isr_p, carl=carl, mask_roi_pool=mask_pool, mask_head=mask_head)


def features(batch: int = 2, channels: int = 8, size: int = 64, seed: int = 1) -> list[torch.Tensor]:
    """P2..P6 for ``size`` x ``size`` inputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=g) for s in (4, 8, 16, 32, 64)]


def target(boxes, labels, size: int = 64, masks: bool = False) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    t = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "img_shape": (size, size),
         "ori_shape": (size, size), "scale_factor": (1.0, 1.0), "image_id": 0, "flip": False}
    if masks:
        m = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            m[i, y1:y2, x1:x2] = 1
        t["masks"] = m
    return t


def jittered_proposals(gt: list[list[float]], count: int, seed: int) -> torch.Tensor:
    """Proposals around the GTs (some positive, some not) plus random boxes."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.tensor(gt, dtype=torch.float32).repeat(count, 1) if gt else torch.zeros(0, 4)
    near = centre + torch.randn(centre.shape, generator=g) * 4
    xy = torch.rand(count, 2, generator=g) * 40
    wh = torch.rand(count, 2, generator=g) * 20 + 4
    boxes = torch.cat([near, torch.cat([xy, xy + wh], dim=1)])
    x1y1 = torch.minimum(boxes[:, :2], boxes[:, 2:] - 1)
    return torch.cat([x1y1, boxes[:, 2:]], dim=1).clamp(0, 64)


# ---- BBoxHead ------------------------------------------------------------------------------------

def test_bbox_head_shapes_and_reference_init():
    torch.manual_seed(0)
    head = BBoxHead(in_channels=32, num_classes=80, roi_size=7, fc_channels=256)
    logits, deltas = head(torch.randn(5, 32, 7, 7))
    assert logits.shape == (5, 81) and deltas.shape == (5, 320)
    assert abs(head.fc_cls.weight.std().item() - 0.01) < 1e-3
    assert abs(head.fc_reg.weight.std().item() - 0.001) < 1e-4
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (32*49 + 256)) = 0.057354
    assert head.shared_fcs[0].weight.abs().max().item() <= math.sqrt(6 / (32 * 49 + 256)) + 1e-7
    assert head.shared_fcs[0].weight.abs().max().item() > 0.9 * math.sqrt(6 / (32 * 49 + 256))
    for layer in (*head.shared_fcs, head.fc_cls, head.fc_reg):
        assert layer.bias.abs().max() == 0


def copy_to_torchvision(head: BBoxHead, num_classes: int) -> tuple[TwoMLPHead, FastRCNNPredictor]:
    """torchvision's box head with ``head``'s weights. Its background is class 0 and it has 4 background
    regression rows: our class ``c`` is its class ``c + 1``; its background deltas get random weights
    (they are never used, neither by its loss nor by its post-processing)."""
    fc = head.fc_cls.in_features
    mlp = TwoMLPHead(head.shared_fcs[0].in_features, fc)
    predictor = FastRCNNPredictor(fc, num_classes + 1)
    with torch.no_grad():
        mlp.fc6.weight.copy_(head.shared_fcs[0].weight), mlp.fc6.bias.copy_(head.shared_fcs[0].bias)
        mlp.fc7.weight.copy_(head.shared_fcs[1].weight), mlp.fc7.bias.copy_(head.shared_fcs[1].bias)
        order = torch.cat([torch.tensor([num_classes]), torch.arange(num_classes)])  # bg first
        predictor.cls_score.weight.copy_(head.fc_cls.weight[order])
        predictor.cls_score.bias.copy_(head.fc_cls.bias[order])
        predictor.bbox_pred.weight[4:].copy_(head.fc_reg.weight)
        predictor.bbox_pred.bias[4:].copy_(head.fc_reg.bias)
    return mlp, predictor


def to_torchvision_order(logits: torch.Tensor, deltas: torch.Tensor, num_classes: int):
    order = torch.cat([torch.tensor([num_classes]), torch.arange(num_classes)])
    return logits[:, order], torch.cat([torch.zeros(deltas.shape[0], 4), deltas], dim=1)


def random_head(num_classes: int, seed: int = 0) -> BBoxHead:
    """A box head with random weights of a useful scale (the reference init makes near-constant outputs)."""
    torch.manual_seed(seed)
    head = BBoxHead(8, num_classes, 7, 32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return head


def test_bbox_head_matches_torchvision_two_mlp_head_and_predictor():
    """Same architecture as TwoMLPHead + FastRCNNPredictor; only the class order differs (bg last here)."""
    C = 5
    head = random_head(C)
    mlp, predictor = copy_to_torchvision(head, C)
    x = torch.randn(11, 8, 7, 7)
    logits, deltas = head(x)
    tv_logits, tv_deltas = predictor(mlp(x))
    ours_logits, ours_deltas = to_torchvision_order(logits, deltas, C)
    assert torch.allclose(ours_logits, tv_logits, atol=1e-5)
    assert torch.allclose(ours_deltas[:, 4:], tv_deltas[:, 4:], atol=1e-5)


def hand_targets(labels, weights, gt_inds, boxes, bbox_targets=None) -> RoITargets:
    n = len(labels)
    rois = boxes_to_rois([torch.tensor(boxes, dtype=torch.float32)])
    return RoITargets(rois, torch.tensor(labels), torch.tensor(weights, dtype=torch.float32),
                      torch.zeros(n, 4) if bbox_targets is None else torch.tensor(bbox_targets, dtype=torch.float32),
                      torch.tensor(gt_inds), torch.zeros(n, dtype=torch.int64), [sum(g >= 0 for g in gt_inds)])


def test_losses_match_torchvision_fastrcnn_loss_with_unit_weights():
    """With every label weight 1, loss_cls = mean CE and loss_bbox = SmoothL1 sum / N, torchvision's
    ``fastrcnn_loss`` (its SmoothL1 beta is 1/9, so the head is given that beta here)."""
    C, N = 3, 12
    g = torch.Generator().manual_seed(3)
    logits, deltas = torch.randn(N, C + 1, generator=g), torch.randn(N, 4 * C, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 3, 3, 3, 0, 3, 2, 3, 3])
    bbox_targets = torch.randn(N, 4, generator=g) * (labels < C)[:, None]
    gt_inds = torch.where(labels < C, torch.arange(N) % 2, torch.full_like(labels, -1))
    t = RoITargets(boxes_to_rois([torch.tensor([[0.0, 0, 10, 10]]).repeat(N, 1)]), labels, torch.ones(N),
                   bbox_targets, gt_inds, torch.zeros(N, dtype=torch.int64), [6])
    ours = make_head(C, bbox_beta=1 / 9).box_losses(logits, deltas, t)
    tv_logits, tv_deltas = to_torchvision_order(logits, deltas, C)
    tv_labels = torch.where(labels < C, labels + 1, torch.zeros_like(labels))
    tv_cls, tv_box = fastrcnn_loss(tv_logits, tv_deltas, [tv_labels], [bbox_targets])
    assert torch.allclose(ours["loss_cls"], tv_cls, atol=1e-6)
    assert torch.allclose(ours["loss_bbox"], tv_box, atol=1e-6)


def test_carl_and_bbox_loss_with_softmax_and_class_specific_deltas():
    """Method doc T4 inside the box head: C = 2; logits [ln 3, 0, 0] (label 0), [0, 0, 0] (label 1),
    [1, 2, 3] (background); GT-class delta errors (0.5, 0, 0, 0) and (2.0, 0.2, 0, 0); the other
    class's slice holds 100s, which must not be read. SmoothL1 beta 1, A = N = 3.

    p = (0.6, 1/3), v = 0.2 + 0.8p = (0.68, 0.466667), c = 2v / sum v = (51/43, 35/43),
    R = (0.5 * 0.5^2, (2 - 0.5) + 0.5 * 0.2^2) = (0.125, 1.52): loss_carl = (51/43 * 0.125 +
    35/43 * 1.52) / 3 = 0.461822; loss_bbox = (0.125 + 1.52) / 3 = 0.548333."""
    logits = torch.tensor([[math.log(3), 0, 0], [0, 0, 0], [1, 2, 3]], requires_grad=True)
    deltas = torch.tensor([[0.5, 0, 0, 0, 100, 100, 100, 100],
                           [100, 100, 100, 100, 2.0, 0.2, 0, 0],
                           [100, 100, 100, 100, 100, 100, 100, 100]], requires_grad=True)
    t = hand_targets([0, 1, 2], [1, 1, 1], [0, 1, -1], [[0, 0, 10, 10]] * 3)
    losses = make_head(2, carl=CARLSettings()).box_losses(logits, deltas, t)
    assert losses["loss_carl"].item() == pytest.approx(0.461822, abs=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.548333, abs=1e-5)
    grad_logits, = torch.autograd.grad(losses["loss_carl"], logits)
    # T4: d loss_carl / d logits, row 0 and row 1; background row 2 gets nothing.
    assert torch.allclose(grad_logits[0], torch.tensor([-0.063375, 0.031687, 0.031687]), atol=1e-5)
    assert torch.allclose(grad_logits[1], torch.tensor([-0.042753, 0.085506, -0.042753]), atol=1e-5)
    assert grad_logits[2].abs().max() == 0


def isr_case():
    """Two positives of one GT (class 0 of C = 1) on the RoI [0, 0, 10, 10] = the GT (target deltas 0),
    and one negative. Predicted class-0 deltas: row 0 zero (IoU 1), row 1 dx = 1 -> a 1 px shift with
    stds 0.1 (IoU 9/11). Logits [0, 0] (CE ln 2) and [ln 3, 0] (CE ln 4/3); the negative [0, ln 3]
    (CE -ln 3/4 = 0.287682)."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)]], requires_grad=True)
    deltas = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    return logits, deltas


def test_isr_p_in_box_head_golden_weights_via_gradient():
    """n_max = 2; ranks (0, 1) -> u = (1, 1/2) -> w = u^2 = (1, 1/4); ratio = (ln 2 + ln 4/3) /
    (ln 2 + ln(4/3) / 4) = 1.282016, so weights (1.282016, 0.320504). The positive loss sum is kept:
    loss_cls = (ln 2 + ln 4/3 + 0.287682) / 3 = 0.422837 with and without ISR-P; only the gradient
    moves: d/d logit_fg of row 0 = w0 * (0.5 - 1) / 3 = -0.213669 (baseline -1/6), of row 1 =
    w1 * (0.75 - 1) / 3 = -0.026709 (baseline -1/12)."""
    t = hand_targets([0, 0, 1], [1, 1, 1], [0, 0, -1], [[0, 0, 10, 10]] * 3)
    for isr, g0, g1 in ((ISRPSettings(), -0.213669, -0.026709), (None, -1 / 6, -1 / 12)):
        logits, deltas = isr_case()
        loss = make_head(1, isr_p=isr).box_losses(logits, deltas, t)["loss_cls"]
        assert loss.item() == pytest.approx(0.422837, abs=1e-5)
        grad, = torch.autograd.grad(loss, logits)
        assert grad[0, 0].item() == pytest.approx(g0, abs=1e-5)
        assert grad[1, 0].item() == pytest.approx(g1, abs=1e-5)


def test_negative_weights_reach_loss_cls_and_zero_weights_leave_the_count():
    """ISR-N weights go into the negatives' CE; the denominator counts the non-zero weights.

    Weights (1, 1, 0.5): (ln 2 + ln 4/3 + 0.5 * 0.287682) / 3 = 0.374890.
    Weights (1, 1, 0): (ln 2 + ln 4/3) / 2 = 0.490415."""
    head = make_head(1)
    logits, deltas = isr_case()
    half = hand_targets([0, 0, 1], [1, 1, 0.5], [0, 0, -1], [[0, 0, 10, 10]] * 3)
    zero = hand_targets([0, 0, 1], [1, 1, 0.0], [0, 0, -1], [[0, 0, 10, 10]] * 3)
    assert head.box_losses(logits, deltas, half)["loss_cls"].item() == pytest.approx(0.374890, abs=1e-5)
    assert head.box_losses(logits, deltas, zero)["loss_cls"].item() == pytest.approx(0.490415, abs=1e-5)


# ---- RoIHead training ----------------------------------------------------------------------------

GTS = [[[6, 8, 30, 40], [34, 30, 60, 58]], [[10, 10, 50, 30]]]
LABELS = [[0, 1], [1]]


def batch(empty: bool = False, masks: bool = False):
    gts = [[], []] if empty else GTS
    labels = [[], []] if empty else LABELS
    targets = [target(g, l, masks=masks) for g, l in zip(gts, labels)]
    proposals = [jittered_proposals(GTS[i], 6, seed=i) for i in range(2)]
    return features(), proposals, targets


def test_targets_put_positives_first_with_their_own_gt():
    head = make_head(2, sampler=RandomSampler(16, 0.5))
    feats, proposals, targets = batch()
    candidates, assigns = head.assign(proposals, targets)
    assert [c.shape[0] for c in candidates] == [2 + 2 * 6 + 6, 1 + 6 + 6]  # GTs + jittered + random
    assert torch.equal(candidates[0][:2], targets[0]["boxes"])  # GTs prepended, forced positive
    assert assigns[0].gt_inds[:2].tolist() == [1, 2]
    samples = head.sampler.sample_batch(assigns, candidates)
    t = head.get_targets(candidates, assigns, samples, targets)
    assert t.rois.shape[1] == 5 and t.rois.shape[0] == sum(s.inds.numel() for s in samples)
    start = 0
    for i, s in enumerate(samples):
        n = s.inds.numel()
        labels, gt_inds = t.labels[start:start + n], t.gt_inds[start:start + n]
        assert bool((t.rois[start:start + n, 0] == i).all())
        assert bool((labels[:s.num_pos] < 2).all()) and bool((labels[s.num_pos:] == 2).all())
        assert torch.equal(labels[:s.num_pos], targets[i]["labels"][gt_inds[:s.num_pos]])
        decoded = head.coder.decode(t.rois[start:start + s.num_pos, 1:], t.bbox_targets[start:start + s.num_pos])
        assert torch.allclose(decoded, targets[i]["boxes"][gt_inds[:s.num_pos]], atol=1e-4)
        start += n


def test_score_hlr_sampler_weights_become_negative_label_weights():
    """With the Score-HLR sampler the negatives' label weights are the sampler's, not ones."""
    sampler = ScoreHLRSampler(16, 0.25, num_classes=2, coder=DeltaXYWHCoder(stds=RCNN_STDS))
    head = make_head(2, sampler=sampler)
    feats, proposals, targets = batch()
    candidates, assigns = head.assign(proposals, targets)
    torch.manual_seed(5)
    samples = sampler.sample_batch(assigns, candidates, scorer=lambda boxes: head._score_boxes(feats, boxes))
    t = head.get_targets(candidates, assigns, samples, targets)
    expected = torch.cat([torch.cat([torch.ones(s.num_pos), s.neg_weights]) for s in samples])
    assert torch.equal(t.label_weights, expected)
    assert not torch.allclose(expected, torch.ones_like(expected))  # at init, fg scores ~1/3 > 0.05: ranked


@pytest.mark.parametrize("mask", [False, True])
def test_empty_images_give_attached_zero_box_carl_and_mask_losses(mask):
    head = make_head(2, isr_p=ISRPSettings(), carl=CARLSettings(), mask=mask,
                     sampler=ScoreHLRSampler(16, 0.25, num_classes=2, coder=DeltaXYWHCoder(stds=RCNN_STDS)))
    feats, proposals, targets = batch(empty=True, masks=mask)
    losses = head(feats, proposals, targets)
    zero_keys = ["loss_bbox", "loss_carl"] + (["loss_mask"] if mask else [])
    for key in zero_keys:
        assert losses[key].item() == 0.0 and losses[key].requires_grad, key
    assert losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert head.bbox_head.fc_reg.weight.grad is not None
    assert head.bbox_head.fc_reg.weight.grad.abs().max() == 0  # attached, zero gradient
    if mask:
        assert head.mask_head.conv_logits.weight.grad is not None


def test_mask_branch_trains_on_positives_and_needs_masks():
    head = make_head(2, mask=True)
    feats, proposals, targets = batch(masks=True)
    losses = head(feats, proposals, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_mask"}
    # 28x28 logits near 0 at init: BCE about ln 2 per pixel.
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), abs=0.1)
    del targets[0]["masks"]
    with pytest.raises(ValueError, match="with_masks"):
        head(feats, proposals, targets)


# ---- RoIHead inference ---------------------------------------------------------------------------

def test_postprocess_matches_torchvision_postprocess_detections():
    """Same scores, decode (stds 0.1/0.2 = torchvision's weights 10/5), clipping, score threshold,
    per-class NMS and top-k as torchvision's RoIHeads. Differences by design: torchvision also drops
    boxes under 0.01 px (none here) and its background is class 0 (permuted)."""
    C = 4
    head = make_head(C)
    head.bbox_head = random_head(C, seed=2)
    head.test = RCNNTestSettings(score_thr=0.05, nms_iou=0.5, max_per_img=20)
    proposals = jittered_proposals(GTS[0], 40, seed=4)
    logits, deltas = head.bbox_head(torch.randn(proposals.shape[0], 8, 7, 7))
    meta = {"img_shape": (64, 64), "scale_factor": (1.0, 1.0)}
    ours = head.postprocess_boxes(logits, deltas, proposals, meta)
    tv = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 20)
    tv_logits, tv_deltas = to_torchvision_order(logits, deltas, C)
    tv_boxes, tv_scores, tv_labels = tv.postprocess_detections(tv_logits, tv_deltas, [proposals], [(64, 64)])
    assert ours["boxes"].shape[0] > 5
    assert torch.allclose(ours["scores"], tv_scores[0], atol=1e-6)
    assert torch.equal(ours["labels"], tv_labels[0] - 1)
    assert torch.allclose(ours["boxes"], tv_boxes[0], atol=1e-4)


def test_detect_rescales_to_the_original_image_and_pastes_masks():
    head = make_head(2, mask=True).eval()
    feats, proposals, _ = batch()
    metas = [{"img_shape": (64, 64), "scale_factor": (2.0, 2.0), "ori_shape": (32, 32)},
             {"img_shape": (64, 48), "scale_factor": (2.0, 1.5), "ori_shape": (32, 32)}]
    head.test = RCNNTestSettings(score_thr=0.0, nms_iou=0.5, max_per_img=7)
    dets = head(feats, proposals, metas)
    for det, meta in zip(dets, metas):
        d = det["boxes"].shape[0]
        assert 0 < d <= 7 and det["scores"].shape == (d,) and det["labels"].dtype == torch.int64
        sx, sy = meta["scale_factor"]
        h, w = meta["img_shape"]
        assert bool((det["boxes"][:, 0::2] <= w / sx + 1e-4).all()) and bool((det["boxes"][:, 1::2] <= h / sy + 1e-4).all())
        assert det["masks"].shape == (d, 32, 32) and det["masks"].dtype == torch.bool
    # Without proposals an image gets empty, well-shaped outputs.
    empty = head(feats, [torch.zeros(0, 4), proposals[1]], metas)
    assert empty[0]["boxes"].shape == (0, 4) and empty[0]["masks"].shape == (0, 32, 32)


def test_the_heads_generator_drives_the_random_sampler():
    """Two heads with equal weights and equally seeded generators sample the same RoIs, so their losses
    are equal even though torch's default generator moves on in between; another seed samples others."""
    gt = [[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]]
    props = [jittered_proposals(gt, 40, seed=3), jittered_proposals(gt, 40, seed=4)]
    targets = [target(gt, [0, 1]), target(gt, [1, 0])]
    feats = features()

    def losses(seed: int) -> dict:
        head = make_head(sampler=RandomSampler(16, 0.25))
        head.generator = torch.Generator().manual_seed(seed)
        torch.rand(7)  # moves the default generator: it must not matter
        return head(feats, props, targets)

    first, again, other = losses(5), losses(5), losses(6)
    assert torch.equal(first["loss_cls"], again["loss_cls"]) and torch.equal(first["loss_bbox"], again["loss_bbox"])
    assert not torch.equal(first["loss_cls"], other["loss_cls"])
