"""Tests for CARL (method spec §3): T4, T5, the empty case (D4) and invariants."""

import math

import pytest
import torch

from pisa.losses import carl_loss, smooth_l1_loss

ATOL = 1e-5


def t4_inputs():
    # C = 2. Row 0 label 0, row 1 label 1, row 2 background; delta errors (0.5, 0, 0, 0), (2, 0.2, 0, 0).
    logits = torch.tensor([[math.log(3), 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    deltas = torch.tensor([[0.5, 0.0, 0.0, 0.0], [2.0, 0.2, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]], requires_grad=True)
    return logits, torch.tensor([0, 1, 2]), deltas, torch.zeros(3, 4)


def test_t4_softmax_loss_and_gradients():
    logits, labels, deltas, targets = t4_inputs()
    loss = carl_loss(logits, labels, deltas, targets, num_classes=2, avg_factor=3, sigmoid=False, beta=1.0)
    # p = (0.6, 1/3); v = 0.2 + 0.8 p = (0.68, 0.466667); c = 2 v / Σv = (51/43, 35/43);
    # R = (0.125, 1.52); loss = (51/43 * 0.125 + 35/43 * 1.52) / 3 = 0.461822.
    torch.testing.assert_close(loss, torch.tensor(0.461822), atol=ATOL, rtol=0)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([
        [-0.063375, 0.031687, 0.031687], [-0.042753, 0.085506, -0.042753], [0.0, 0.0, 0.0]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(deltas.grad, torch.tensor([
        [0.197674, 0.0, 0.0, 0.0], [0.271318, 0.054264, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=ATOL, rtol=0)
    # dL/dp from the logit gradient: dp_i/dz_(i, y_i) = p_i (1 - p_i) -> (0.24, 2/9).
    dldp = torch.stack([logits.grad[0, 0] / 0.24, logits.grad[1, 1] / (2 / 9)])
    torch.testing.assert_close(dldp, torch.tensor([-0.264062, 0.384776]), atol=ATOL, rtol=0)


def test_t4_detached_normaliser_would_differ():
    # Counter-check: with Σv detached, dL/dp = 0.8 * P / (A S) * R = (0.058140, 0.706977) -- wrong.
    # The test above would catch such an implementation: both entries differ by far more than 1e-5.
    p = torch.tensor([0.6, 1 / 3], requires_grad=True)
    v = 0.2 + 0.8 * p
    c = v * 2 / v.sum().detach()
    (c * torch.tensor([0.125, 1.52])).sum().div(3).backward()
    torch.testing.assert_close(p.grad, torch.tensor([0.058140, 0.706977]), atol=ATOL, rtol=0)
    assert torch.all((p.grad - torch.tensor([-0.264062, 0.384776])).abs() > 0.3)


def test_t5_sigmoid_single_positive():
    logits = torch.tensor([[0.0, -1.0], [0.5, -0.5]], requires_grad=True)
    deltas = torch.tensor([[0.05, 0.2, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    loss = carl_loss(logits, labels, deltas, torch.zeros(2, 4), num_classes=2, avg_factor=1, beta=0.11)
    # c = v / v = 1, so loss = SmoothL1_0.11 = 0.011364 + 0.145 = 0.156364 and no gradient reaches p.
    torch.testing.assert_close(loss, torch.tensor(0.156364), atol=ATOL, rtol=0)
    loss.backward()
    assert torch.all(logits.grad == 0)
    torch.testing.assert_close(deltas.grad[0], torch.tensor([0.05 / 0.11, 1.0, 0.0, 0.0]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("sigmoid", [True, False])
def test_no_positives_zero_connected_to_both_graphs(sigmoid):
    # A negative row holds an inf logit: the reference's 0 * Σ logits would give NaN (D4).
    logits = torch.tensor([[float("inf"), 0.0, 0.0], [1.0, 2.0, 3.0]])
    logits = (logits[:, :2] if sigmoid else logits).requires_grad_()
    deltas = torch.randn(2, 4, requires_grad=True)
    loss = carl_loss(logits, torch.tensor([2, 2]), deltas, torch.zeros(2, 4), num_classes=2, avg_factor=1,
                     sigmoid=sigmoid)
    assert loss.item() == 0.0 and loss.dim() == 0
    loss.backward()
    assert logits.grad is not None and deltas.grad is not None
    assert torch.all(logits.grad == 0) and torch.all(deltas.grad == 0)


def test_class_specific_deltas_use_gt_slice():
    logits, labels, deltas, targets = t4_inputs()
    # Put T4's deltas in each positive's GT-class slot of a (N, 4C) tensor, garbage elsewhere.
    wide = torch.full((3, 8), 9.0)
    wide[0, 0:4] = deltas[0].detach()
    wide[1, 4:8] = deltas[1].detach()
    wide.requires_grad_()
    loss = carl_loss(logits, labels, wide, targets, num_classes=2, avg_factor=3, sigmoid=False)
    torch.testing.assert_close(loss, torch.tensor(0.461822), atol=ATOL, rtol=0)
    loss.backward()
    assert torch.all(wide.grad[0, 4:] == 0) and torch.all(wide.grad[1, :4] == 0)


def test_equal_scores_give_plain_regression_loss():
    # Sanity check of §3: with equal p for every positive, c = 1 and loss_carl = Σ SmoothL1 / A.
    logits = torch.zeros(5, 3)
    labels = torch.tensor([0, 1, 2, 3, 1])
    deltas = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    loss = carl_loss(logits, labels, deltas, torch.zeros(5, 4), num_classes=3, avg_factor=torch.tensor(4.0),
                     beta=0.11, loss_weight=2.0)
    expected = smooth_l1_loss(deltas[[0, 1, 2, 4]], torch.zeros(4, 4), beta=0.11).sum() * 2.0 / 4.0
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=1e-6)


def test_k_and_bias():
    # Two positives p = sigmoid(0) = 0.5 and sigmoid(ln 3) = 0.75; k = 2, bias 0: v = (0.25, 0.5625),
    # c = 2 v / 0.8125 = (0.615385, 1.384615); R = (0.125, 0.5) with beta 1 -> loss = 0.769231.
    logits = torch.tensor([[0.0], [math.log(3)]])
    deltas = torch.tensor([[0.5, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss = carl_loss(logits, torch.tensor([0, 0]), deltas, torch.zeros(2, 4), num_classes=1, avg_factor=1.0,
                     k=2.0, bias=0.0)
    torch.testing.assert_close(loss, torch.tensor(0.769231), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_results(dtype):
    logits, labels, deltas, targets = t4_inputs()
    low_logits, low_deltas = logits.detach().to(dtype), deltas.detach().to(dtype)
    loss = carl_loss(low_logits, labels, low_deltas, targets.to(dtype), num_classes=2, avg_factor=3, sigmoid=False)
    ref = carl_loss(low_logits.float(), labels, low_deltas.float(), targets, num_classes=2, avg_factor=3,
                    sigmoid=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0, rtol=0)


def test_shape_errors():
    logits, labels, deltas, targets = t4_inputs()
    with pytest.raises(ValueError, match="sigmoid"):
        carl_loss(logits, labels, deltas, targets, num_classes=2, avg_factor=3, sigmoid=True)
    with pytest.raises(ValueError, match="bbox_pred"):
        carl_loss(logits, labels, deltas[:, :3], targets, num_classes=2, avg_factor=3, sigmoid=False)


def test_autocast_gives_fp32_results():
    logits, labels, deltas, targets = t4_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = carl_loss(logits, labels, deltas, targets, num_classes=2, avg_factor=3, sigmoid=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(0.461822), atol=ATOL, rtol=0)
