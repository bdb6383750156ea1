"""Tests for pisa.losses.regression: smooth L1, L1 and aligned IoU (incl. the IoU parts of T3)."""

import math

import pytest
import torch

from pisa.losses import aligned_box_iou, l1_loss, smooth_l1_loss

ATOL = 1e-5
CLAMP = abs(math.log(16 / 1000))


def _decode(prior: torch.Tensor, delta: torch.Tensor, stds=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Minimal delta decoder (method spec §7.3) used only to build T3's boxes."""
    d = delta * torch.tensor(stds)  # de-normalise (means are 0)
    px, py = (prior[:, 0] + prior[:, 2]) / 2, (prior[:, 1] + prior[:, 3]) / 2
    pw, ph = prior[:, 2] - prior[:, 0], prior[:, 3] - prior[:, 1]
    dw, dh = d[:, 2].clamp(-CLAMP, CLAMP), d[:, 3].clamp(-CLAMP, CLAMP)
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    return torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], dim=1)


PRIOR = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def test_t3_iou_of_decoded_boxes():
    target = _decode(PRIOR, torch.zeros(1, 4))
    torch.testing.assert_close(target, PRIOR)
    # (0.1, 0, 0, 0) with stds 1 -> [1, 0, 11, 10]: inter 90, union 110 -> 9/11.
    shifted = _decode(PRIOR, torch.tensor([[0.1, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(shifted, torch.tensor([[1.0, 0.0, 11.0, 10.0]]))
    torch.testing.assert_close(aligned_box_iou(shifted, target), torch.tensor([9 / 11]), atol=ATOL, rtol=0)
    # Same box from (1, 0, 0, 0) with R-CNN stds (0.1, 0.1, 0.2, 0.2).
    rcnn = _decode(PRIOR, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), stds=(0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(aligned_box_iou(rcnn, target), torch.tensor([0.818182]), atol=ATOL, rtol=0)
    # (0, 0, ln 2, 0) -> [-5, 0, 15, 10]: inter 100, union 200 -> 0.5.
    wide = _decode(PRIOR, torch.tensor([[0.0, 0.0, math.log(2), 0.0]]))
    torch.testing.assert_close(wide, torch.tensor([[-5.0, 0.0, 15.0, 10.0]]))
    torch.testing.assert_close(aligned_box_iou(wide, target), torch.tensor([0.5]), atol=ATOL, rtol=0)
    # dw = 10 clamps to 4.1352 -> width 10 * 62.5 = 625 -> [-307.5, 0, 317.5, 10]; IoU 100/(625 * 10) = 0.016.
    clamped = _decode(PRIOR, torch.tensor([[0.0, 0.0, 10.0, 0.0]]))
    torch.testing.assert_close(clamped, torch.tensor([[-307.5, 0.0, 317.5, 10.0]]), atol=1e-3, rtol=0)
    torch.testing.assert_close(aligned_box_iou(clamped, target), torch.tensor([0.016]), atol=ATOL, rtol=0)


def test_iou_disjoint_degenerate_and_symmetric():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [3.0, 3.0, 3.0, 3.0]])
    # 1 / (4 + 4 - 1) = 1/7; disjoint -> 0; two empty boxes -> 0/eps = 0 (not NaN).
    expected = torch.tensor([1 / 7, 0.0, 0.0])
    torch.testing.assert_close(aligned_box_iou(a, b), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(aligned_box_iou(b, a), expected, atol=ATOL, rtol=0)


def test_iou_shape_errors():
    with pytest.raises(ValueError, match="aligned_box_iou"):
        aligned_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))


def test_smooth_l1_golden():
    # beta 1: |x| < 1 -> 0.5 x^2, else |x| - 0.5. T4's errors: (0.5, 0, 0, 0) -> 0.125; (2, 0.2) -> 1.5 + 0.02.
    pred = torch.tensor([[0.5, 0.0, 0.0, 0.0], [2.0, 0.2, 0.0, 0.0]])
    loss = smooth_l1_loss(pred, torch.zeros(2, 4), beta=1.0)
    torch.testing.assert_close(loss.sum(1), torch.tensor([0.125, 1.52]), atol=ATOL, rtol=0)
    # beta 0.11 (RetinaNet), T5: 0.5 * 0.05^2 / 0.11 + (0.2 - 0.055) = 0.011364 + 0.145 = 0.156364
    t5 = smooth_l1_loss(torch.tensor([0.05, 0.2, 0.0, 0.0]), torch.zeros(4), beta=0.11)
    torch.testing.assert_close(t5.sum(), torch.tensor(0.156364), atol=ATOL, rtol=0)


def test_smooth_l1_continuous_at_beta_and_l1_limit():
    x = torch.tensor([0.3 - 1e-6, 0.3, 0.3 + 1e-6, -2.0])
    loss = smooth_l1_loss(x, torch.zeros(4), beta=0.3)
    assert torch.all((loss[:3] - 0.15).abs() < 1e-5)  # 0.5 * 0.3 = 0.3 - 0.15
    torch.testing.assert_close(smooth_l1_loss(x, torch.zeros(4), beta=0.0), x.abs())
    torch.testing.assert_close(l1_loss(x, torch.ones(4)), (x - 1).abs())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 7.5, 9.0]]).to(dtype)
    b = torch.tensor([[1.0, 0.0, 11.0, 10.0], [2.5, 3.0, 8.0, 8.5]]).to(dtype)
    assert aligned_box_iou(a, b).dtype == torch.float32
    torch.testing.assert_close(aligned_box_iou(a, b), aligned_box_iou(a.float(), b.float()), atol=0, rtol=0)
    out = smooth_l1_loss(a, b, beta=0.11)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, smooth_l1_loss(a.float(), b.float(), beta=0.11), atol=0, rtol=0)
