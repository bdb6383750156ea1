"""Tests for pisa.losses.focal: sigmoid focal loss and softmax cross-entropy."""

import math

import pytest
import torch
import torchvision

from pisa.losses import sigmoid_focal_loss, softmax_cross_entropy

ATOL = 1e-5


def test_focal_golden_rows():
    # T6 rows, C = 2, label 0, alpha 0.25, gamma 2.
    # [2, 0]: 0.25 (1 - s(2))^2 (-ln s(2)) + 0.75 * 0.5^2 * ln 2 = 0.000451 + 0.129965 = 0.130416
    # [0, 0]: 0.25 * 0.5^2 * ln 2 + 0.129965 = 0.043322 + 0.129965 = 0.173287
    loss = sigmoid_focal_loss(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 0]))
    assert loss.shape == (2, 2)
    torch.testing.assert_close(loss.sum(1), torch.tensor([0.130416, 0.173287]), atol=ATOL, rtol=0)
    torch.testing.assert_close(loss[1, 0], torch.tensor(0.25 * 0.25 * math.log(2)), atol=ATOL, rtol=0)


def test_background_row_has_only_negative_terms():
    # Label C (= 2) is background: every column is a negative term -(1 - alpha) p^gamma log(1 - p).
    loss = sigmoid_focal_loss(torch.zeros(1, 2), torch.tensor([2]))
    expected = 0.75 * 0.25 * math.log(2)
    torch.testing.assert_close(loss, torch.full((1, 2), expected), atol=ATOL, rtol=0)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)])
def test_matches_torchvision_elementwise(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    num_classes = 7
    logits = torch.randn(50, num_classes, generator=g) * 4
    labels = torch.randint(0, num_classes + 1, (50,), generator=g)  # includes background (= 7)
    targets = torch.zeros(50, num_classes)
    fg = labels < num_classes
    targets[fg.nonzero().squeeze(1), labels[fg]] = 1.0
    expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, alpha, gamma), expected, atol=ATOL, rtol=1e-6)


def test_gradient_matches_torchvision():
    logits = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3] * 5)
    sigmoid_focal_loss(logits, labels).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    targets = torch.nn.functional.one_hot(labels, 4)[:, :3].float()
    torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="sum").backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    logits = (torch.randn(30, 4, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    labels = torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(3))
    out = sigmoid_focal_loss(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sigmoid_focal_loss(logits.float(), labels), atol=0, rtol=0)
    ce_labels = labels.clamp(max=3)  # 4 softmax columns: 3 classes + background
    ce = softmax_cross_entropy(logits, ce_labels)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, softmax_cross_entropy(logits.float(), ce_labels), atol=0, rtol=0)


def test_softmax_cross_entropy_golden():
    # [ln 3, 0, 0] label 0: -ln(3/5) = 0.510826; [1, 2, 3] label 2: -ln(e^3/(e+e^2+e^3)) = 0.407606
    logits = torch.tensor([[math.log(3), 0.0, 0.0], [1.0, 2.0, 3.0]])
    out = softmax_cross_entropy(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(out, torch.tensor([0.510826, 0.407606]), atol=ATOL, rtol=0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="labels must have shape"):
        sigmoid_focal_loss(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(torch.zeros(3, 3), torch.zeros(3))
