"""Tests for ISR-P (method spec §2): T1, T2, T6 golden weights and the invariants."""

import math

import pytest
import torch

from pisa.losses import isr_p, sigmoid_focal_loss, softmax_cross_entropy

ATOL = 1e-5


def identity_decode(priors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Test coder: the 'deltas' already are boxes, so IoUs can be set directly."""
    return deltas


def delta_decode(priors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Minimal delta coder with stds 1 and the dw/dh clamp (method spec §7.3)."""
    clamp = abs(math.log(16 / 1000))
    px, py = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
    gx, gy = px + pw * deltas[:, 0], py + ph * deltas[:, 1]
    gw, gh = pw * deltas[:, 2].clamp(-clamp, clamp).exp(), ph * deltas[:, 3].clamp(-clamp, clamp).exp()
    return torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], dim=1)


def loss_from_column0(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Test classification loss: column 0 of the logits holds the desired per-positive loss."""
    return logits[:, 0]


def make_inputs(labels, ious, losses, gt_inds, img_inds, num_classes):
    """Flattened inputs in which positive i has IoU ious[i] (pred [0,0,iou,1] vs target [0,0,1,1])
    and classification loss losses[i] (via ``loss_from_column0``)."""
    n = len(labels)
    pred = torch.tensor([[0.0, 0.0, iou, 1.0] for iou in ious])
    cls_score = torch.zeros(n, num_classes + 1)
    cls_score[:, 0] = torch.tensor(losses)
    return dict(cls_score=cls_score, bbox_pred=pred, labels=torch.tensor(labels),
                label_weights=torch.ones(n), bbox_targets=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n),
                priors=torch.zeros(n, 4), gt_inds=torch.tensor(gt_inds), img_inds=torch.tensor(img_inds))


# T1 (C = 2): positives p0..p6 as (label, group, IoU, L); negatives (label 2) interleaved at flat 1, 4, 8.
T1 = make_inputs(
    labels=[0, 2, 0, 0, 2, 0, 1, 0, 2, 0],
    ious=[.90, .3, .60, .75, .3, .85, .55, .70, .3, .80],
    losses=[.2, 9.0, 1.0, .5, 9.0, .3, .4, .6, 9.0, .5],
    gt_inds=[0, 0, 0, 1, 0, 1, 2, 3, 0, 0],
    img_inds=[0] * 10, num_classes=2)
T1_POS = [0, 2, 3, 5, 6, 7, 9]
# u * 6 = [6, 1, 2, 5, 6, 4, 3]; w = u^2; Σ L = 3.5, Σ w L = 46.2 / 36 -> ratio 30/11.
T1_WEIGHTS = [2.727273, 0.075758, 0.303030, 1.893939, 2.727273, 1.212121, 0.681818]


@pytest.mark.parametrize("legacy_float_keys", [False, True])
def test_t1_weights(legacy_float_keys):
    out = isr_p(**T1, num_classes=2, decode=identity_decode, cls_loss=loss_from_column0, k=2.0, bias=0.0,
                legacy_float_keys=legacy_float_keys)
    torch.testing.assert_close(out[T1_POS], torch.tensor(T1_WEIGHTS), atol=ATOL, rtol=0)
    losses = T1["cls_score"][T1_POS, 0]
    torch.testing.assert_close((out[T1_POS] * losses).sum(), torch.tensor(3.5), atol=ATOL, rtol=0)
    assert out[[1, 4, 8]].tolist() == [1.0, 1.0, 1.0]  # negatives untouched


# T2: six class-0 positives with equal losses; image A GTs {0,1,2} IoU (.5,.9,.6), B {0} (.7), C {0,1} (.8,.4).
T2_WEIGHTS = [0.263736, 2.373626, 0.593407, 1.054945, 1.648352, 0.065934]  # u*6 = [2, 6, 3, 4, 5, 1]
T2_LEGACY = [0.593407, 2.373626, 1.054945, 1.648352, 0.263736, 0.065934]  # u*6 = [3, 6, 4, 5, 2, 1]


@pytest.mark.parametrize("legacy,expected", [(False, T2_WEIGHTS), (True, T2_LEGACY)])
@pytest.mark.parametrize("empty_image_between", [False, True])
def test_t2_grouping_across_images(legacy, expected, empty_image_between):
    # Optionally put an image with negatives only between B and C: nothing may change, and with the
    # legacy offset image C keeps B's offset (the reference skips images without positives).
    img_c = 3 if empty_image_between else 2
    inputs = make_inputs(labels=[0, 0, 0, 0, 1, 0, 0], ious=[.5, .9, .6, .7, .3, .8, .4], losses=[1.0] * 7,
                         gt_inds=[0, 1, 2, 0, 0, 0, 1], img_inds=[0, 0, 0, 1, 2, img_c, img_c], num_classes=1)
    out = isr_p(**inputs, num_classes=1, decode=identity_decode, cls_loss=loss_from_column0,
                legacy_gt_offset=legacy)
    torch.testing.assert_close(out[[0, 1, 2, 3, 5, 6]], torch.tensor(expected), atol=ATOL, rtol=0)
    assert out[4].item() == 1.0


def test_t6_focal_normalisation():
    # Two label-0 positives of one GT, IoU .9 and .6 -> w = (1, 1/4). Focal rows over BOTH classes:
    # 0.130416 and 0.173287 -> ratio 0.303703 / (0.130416 + 0.043322) = 1.748054.
    inputs = make_inputs(labels=[0, 0, 2], ious=[.9, .6, .1], losses=[0.0] * 3, gt_inds=[0, 0, 0],
                         img_inds=[0, 0, 0], num_classes=2)
    inputs["cls_score"] = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    out = isr_p(**inputs, num_classes=2, decode=identity_decode)
    torch.testing.assert_close(out, torch.tensor([1.748054, 0.437013, 1.0]), atol=ATOL, rtol=0)
    # Counter-check: normalising with only the GT-class term would give ratio 3.880096.
    assert abs(out[0].item() - 3.880096) > 1.0


def test_label_weight_multiplies_u_before_power():
    # One group, IoU .9 / .6 -> u = (1, 1/2); lw = (0.5, 1): w = (0.5^2, 0.5^2) = (0.25, 0.25);
    # ratio = (0.5 * 1 + 1 * 1) / (0.25 + 0.25) = 3 -> (0.75, 0.75).
    inputs = make_inputs(labels=[0, 0], ious=[.9, .6], losses=[1.0, 1.0], gt_inds=[0, 0], img_inds=[0, 0],
                         num_classes=1)
    inputs["label_weights"] = torch.tensor([0.5, 1.0])
    out = isr_p(**inputs, num_classes=1, decode=identity_decode, cls_loss=loss_from_column0)
    torch.testing.assert_close(out, torch.tensor([0.75, 0.75]), atol=ATOL, rtol=0)


def test_bias_and_exponent():
    # u = (1, 1/2), bias 0.5, k 1: w = (1, 0.75); L = (1, 2): ratio = 3 / 2.5 = 1.2 -> (1.2, 0.9).
    inputs = make_inputs(labels=[0, 0], ious=[.9, .6], losses=[1.0, 2.0], gt_inds=[0, 0], img_inds=[0, 0],
                         num_classes=1)
    out = isr_p(**inputs, num_classes=1, decode=identity_decode, cls_loss=loss_from_column0, k=1.0, bias=0.5)
    torch.testing.assert_close(out, torch.tensor([1.2, 0.9]), atol=ATOL, rtol=0)


def test_zero_loss_guard_d3():
    # Every positive loss is 0: no normalisation (ratio 1) instead of 0/0 = NaN; weights are u^2.
    inputs = make_inputs(labels=[0, 0], ious=[.9, .6], losses=[0.0, 0.0], gt_inds=[0, 0], img_inds=[0, 0],
                         num_classes=1)
    out = isr_p(**inputs, num_classes=1, decode=identity_decode, cls_loss=loss_from_column0)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.25]), atol=ATOL, rtol=0)


def test_no_positive_returns_unchanged_copy():
    inputs = make_inputs(labels=[3, 3, 3], ious=[.9, .6, .5], losses=[1.0] * 3, gt_inds=[0, 0, 0],
                         img_inds=[0, 1, 1], num_classes=3)
    inputs["label_weights"] = torch.tensor([1.0, 0.0, 1.0])
    out = isr_p(**inputs, num_classes=3, decode=identity_decode, cls_loss=loss_from_column0)
    assert torch.equal(out, inputs["label_weights"])
    assert out.data_ptr() != inputs["label_weights"].data_ptr()


def random_batch(seed, num_classes, n=90, num_images=3, class_specific=False, sigmoid=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes + 1, (n,), generator=g)
    labels[n // 3: 2 * n // 3] = num_classes  # the middle image has no positives
    xy = torch.rand(n, 2, generator=g) * 50
    priors = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 20], dim=1)
    width = 4 * num_classes if class_specific else 4
    return dict(
        cls_score=torch.randn(n, num_classes + (0 if sigmoid else 1), generator=g) * 2,
        bbox_pred=torch.randn(n, width, generator=g) * 0.3,
        labels=labels,
        label_weights=(torch.rand(n, generator=g) > 0.1).float(),
        bbox_targets=torch.randn(n, 4, generator=g) * 0.3,
        priors=priors,
        gt_inds=torch.randint(0, 4, (n,), generator=g),
        img_inds=torch.arange(num_images).repeat_interleave(n // num_images),
    )


@pytest.mark.parametrize("num_classes", [1, 2, 7])
def test_invariants_sigmoid_focal(num_classes):
    inputs = random_batch(0, num_classes)
    before = {k: v.clone() for k, v in inputs.items()}
    out = isr_p(**inputs, num_classes=num_classes, decode=delta_decode)
    for key, value in inputs.items():
        assert torch.equal(value, before[key]), f"isr_p modified its input {key}"
    pos = inputs["labels"] < num_classes
    assert pos.any() and not out.requires_grad and out.dtype == torch.float32
    assert torch.equal(out[~pos], inputs["label_weights"][~pos])
    rows = sigmoid_focal_loss(inputs["cls_score"][pos], inputs["labels"][pos]).sum(1)
    lw = inputs["label_weights"][pos]
    torch.testing.assert_close((out[pos] * rows).sum(), (lw * rows).sum(), atol=ATOL, rtol=1e-6)
    assert not torch.equal(out[pos], lw)  # the weights were actually redistributed
    assert torch.all(out[pos][lw == 0] == 0)  # a zero incoming weight stays zero (w = 0^k)


def test_invariants_softmax_class_specific():
    num_classes = 4
    inputs = random_batch(1, num_classes, class_specific=True, sigmoid=False)
    out = isr_p(**inputs, num_classes=num_classes, decode=delta_decode, cls_loss="softmax_ce")
    pos = inputs["labels"] < num_classes
    ce = softmax_cross_entropy(inputs["cls_score"][pos], inputs["labels"][pos])
    lw = inputs["label_weights"][pos]
    torch.testing.assert_close((out[pos] * ce).sum(), (lw * ce).sum(), atol=ATOL, rtol=1e-6)
    # Class-specific deltas: only the GT-class slice matters. Same result from the gathered slice.
    slices = inputs["bbox_pred"].view(-1, num_classes, 4)[torch.arange(90), inputs["labels"].clamp(max=3)]
    agnostic = dict(inputs, bbox_pred=slices)
    torch.testing.assert_close(out, isr_p(**agnostic, num_classes=num_classes, decode=delta_decode,
                                          cls_loss="softmax_ce"), atol=0, rtol=0)


def test_callable_loss_and_loss_weight():
    inputs = random_batch(2, 3)
    ref = isr_p(**inputs, num_classes=3, decode=delta_decode)
    # A callable returning the same (P, C) focal loss gives the same weights; a loss_weight cancels.
    same = isr_p(**inputs, num_classes=3, decode=delta_decode, cls_loss=sigmoid_focal_loss, loss_weight=2.5)
    torch.testing.assert_close(same, ref, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_results(dtype):
    inputs = random_batch(3, 3)
    low = {k: (v.to(dtype) if v.is_floating_point() and k != "label_weights" else v) for k, v in inputs.items()}
    ref = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    out = isr_p(**low, num_classes=3, decode=delta_decode)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, isr_p(**ref, num_classes=3, decode=delta_decode), atol=0, rtol=0)


def test_bad_inputs_raise():
    inputs = random_batch(4, 3)
    with pytest.raises(ValueError, match="softmax_ce"):
        isr_p(**inputs, num_classes=3, decode=delta_decode, cls_loss="softmax_ce")
    with pytest.raises(ValueError, match="bbox_pred"):
        isr_p(**dict(inputs, bbox_pred=torch.zeros(90, 8)), num_classes=3, decode=delta_decode)
    with pytest.raises(ValueError, match="cls_loss"):
        isr_p(**inputs, num_classes=3, decode=delta_decode, cls_loss="focal")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    inputs = random_batch(5, 3)
    cpu = isr_p(**inputs, num_classes=3, decode=delta_decode)
    gpu = isr_p(**{k: v.cuda() for k, v in inputs.items()}, num_classes=3, decode=delta_decode)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=ATOL, rtol=1e-6)


def test_autocast_gives_fp32_results():
    inputs = random_batch(6, 3)
    ref = isr_p(**inputs, num_classes=3, decode=delta_decode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = isr_p(**inputs, num_classes=3, decode=delta_decode)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-6)
