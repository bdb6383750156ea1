"""FPNs: RetinaNet's (shapes, top-down pathway, P6 from C5, no ReLU before P7, init) and R-CNN's
(P2-P6 with P6 = stride-2 subsampling of P5, parity with torchvision's FPN + LastLevelMaxPool)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pisa.models.fpn import RCNNFPN, RetinaFPN


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


def _rcnn_feats(batch=2):
    # A 100 x 130 input gives C2 25x33, C3 13x17, C4 7x9, C5 4x5 (each stage halves, rounding up).
    torch.manual_seed(0)
    sizes = ((25, 33), (13, 17), (7, 9), (4, 5))
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip((4, 8, 16, 32), sizes)]


def test_rcnn_fpn_shapes_and_p6_subsamples_p5():
    fpn = RCNNFPN([4, 8, 16, 32], out_channels=6)
    outs = fpn(_rcnn_feats())
    # P6 = max_pool(kernel 1, stride 2) of the 4x5 P5: ceil -> 2x3.
    assert [tuple(o.shape) for o in outs] == [(2, 6, 25, 33), (2, 6, 13, 17), (2, 6, 7, 9), (2, 6, 4, 5),
                                             (2, 6, 2, 3)]
    # A kernel-1 max-pool is plain subsampling: rows/columns 0, 2, 4, ... of P5, negatives included.
    assert torch.equal(outs[4], outs[3][..., ::2, ::2])
    assert (outs[4] < 0).any()
    assert [name for name, _ in fpn.named_parameters()] == [
        f"{kind}.{i}.{p}" for kind in ("lateral_convs", "output_convs") for i in range(4) for p in ("weight", "bias")]


def test_rcnn_fpn_matches_torchvision_fpn_with_copied_weights():
    """torchvision's FeaturePyramidNetwork + LastLevelMaxPool is the same architecture (nearest upsampling
    to the exact size, 3x3 output convs, P6 = max_pool2d(P5, 1, 2)); only the module names differ."""
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(1)
    ours = RCNNFPN([4, 8, 16, 32], out_channels=6)
    theirs = FeaturePyramidNetwork([4, 8, 16, 32], 6, extra_blocks=LastLevelMaxPool())
    with torch.no_grad():
        for i in range(4):
            for p in ("weight", "bias"):
                getattr(theirs.inner_blocks[i][0], p).copy_(getattr(ours.lateral_convs[i], p).data.normal_())
                getattr(theirs.layer_blocks[i][0], p).copy_(getattr(ours.output_convs[i], p).data.normal_())
    feats = _rcnn_feats()
    expected = list(theirs({str(i): f for i, f in enumerate(feats)}).values())
    outs = ours(feats)
    assert len(outs) == len(expected) == 5
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rcnn_fpn_xavier_init_and_input_count_error():
    torch.manual_seed(0)
    fpn = RCNNFPN([256, 512, 1024, 2048], out_channels=256)
    for conv in fpn.modules():
        if isinstance(conv, nn.Conv2d):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert conv.bias.abs().max() == 0 and conv.weight.abs().max() <= bound
            assert abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    with pytest.raises(ValueError, match="4 input maps"):
        fpn([torch.zeros(1, 512, 4, 4)] * 3)
