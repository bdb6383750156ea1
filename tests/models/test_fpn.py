"""RetinaNet FPN: output shapes, the top-down pathway, P6 from C5, no ReLU before P7, init."""

from __future__ import annotations

import math

import torch
from torch import nn

from pisa.models.fpn import RetinaFPN


def _feats(channels=(8, 16, 32), sizes=((13, 17), (7, 9), (4, 5))):
    torch.manual_seed(0)
    return [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, sizes)]


def test_shapes_with_odd_sizes():
    # A 100 x 130 input gives C3 13x17, C4 7x9, C5 4x5; P6 = ceil(C5 / 2) = 2x3, P7 = 1x2.
    fpn = RetinaFPN([8, 16, 32], out_channels=6)
    outs = fpn(_feats())
    assert [tuple(o.shape) for o in outs] == [(2, 6, 13, 17), (2, 6, 7, 9), (2, 6, 4, 5), (2, 6, 2, 3), (2, 6, 1, 2)]


def test_p6_reads_c5_and_p7_has_no_relu():
    fpn = RetinaFPN([8, 16, 32], out_channels=6)
    assert fpn.p6_conv.in_channels == 32 and fpn.p6_conv.stride == (2, 2)
    feats = _feats()
    outs = fpn(feats)
    assert torch.equal(outs[3], fpn.p6_conv(feats[2]))
    # P6 takes nothing from C3/C4: changing them leaves P5..P7 untouched but changes P3.
    changed = fpn([feats[0] + 1, feats[1] - 1, feats[2]])
    assert all(torch.equal(a, b) for a, b in zip(outs[2:], changed[2:]))
    assert not torch.allclose(outs[0], changed[0])
    # P7 = conv(P6) on the raw P6, which has negative entries, so a ReLU in between would differ.
    assert (outs[3] < 0).any()
    assert torch.equal(outs[4], fpn.p7_conv(outs[3]))
    assert not torch.allclose(outs[4], fpn.p7_conv(torch.relu(outs[3])))


def test_top_down_nearest_to_exact_size_golden():
    """1-channel FPN with identity convs: P5 = C5, P4 = C4 + up(C5), P3 = C3 + up(P4's lateral sum)."""
    fpn = RetinaFPN([1, 1, 1], out_channels=1)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.fill_(1.0)
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # 3x3 conv that copies its input
    c5 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c4 = torch.zeros(3, 3)
    c3 = torch.full((5, 5), 10.0)
    outs = fpn([c3[None, None], c4[None, None], c5[None, None]])
    # Nearest 2 -> 3 takes source index floor(i * 2 / 3) = 0, 0, 1.
    p4 = torch.tensor([[1.0, 1, 2], [1, 1, 2], [3, 3, 4]])
    # Nearest 3 -> 5 takes floor(i * 3 / 5) = 0, 0, 1, 1, 2.
    idx = torch.tensor([0, 0, 1, 1, 2])
    p3 = 10.0 + p4[idx][:, idx]
    assert torch.equal(outs[2][0, 0], c5)
    assert torch.equal(outs[1][0, 0], p4)
    assert torch.equal(outs[0][0, 0], p3)


def test_xavier_uniform_init():
    torch.manual_seed(0)
    fpn = RetinaFPN([512, 1024, 2048], out_channels=256)
    for conv in fpn.modules():
        if isinstance(conv, nn.Conv2d):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert conv.bias.abs().max() == 0
            assert conv.weight.abs().max() <= bound
            # Uniform on [-b, b]: the std is b / sqrt(3) (not PyTorch's default kaiming-uniform a=sqrt(5)).
            assert abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
