"""Feature pyramid networks: RetinaNet's (P3-P7 from C3-C5) and R-CNN's (P2-P6 from C2-C5).

``RetinaFPN`` matches the reference RetinaNet neck: 1x1 laterals, top-down nearest upsampling to the
exact size of the finer map (so odd sizes work), 3x3 output convs, then ``P6 = conv3x3/s2(C5)`` and
``P7 = conv3x3/s2(P6)`` with **no ReLU** between P6 and P7 (torchvision's ``LastLevelP6P7`` applies one;
the reference does not).

Module names (``lateral_convs.i``, ``output_convs.i``, ``p6_conv``, ``p7_conv``) map one-to-one onto the
reference's ``neck.lateral_convs.i.conv``, ``neck.fpn_convs.{0,1,2}.conv``, ``neck.fpn_convs.3.conv`` and
``neck.fpn_convs.4.conv`` (see ``pisa/models/convert.py``).

``RCNNFPN`` is the Faster / Mask R-CNN neck: the same laterals, top-down pathway and output convs on
C2-C5, then ``P6 = max_pool(kernel 1, stride 2)(P5)`` (no parameters). Its ``lateral_convs.i`` and
``output_convs.i`` map onto ``neck.lateral_convs.i.conv`` and ``neck.fpn_convs.i.conv`` for i = 0..3.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RetinaFPN", "RCNNFPN"]


def _xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases on every conv, as the reference initialises its FPNs."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _pyramid(feats: Sequence[Tensor], lateral_convs: nn.ModuleList, output_convs: nn.ModuleList) -> list[Tensor]:
    """Laterals, top-down sums and output convs: one output map per input map, same sizes."""
    laterals = [conv(f) for conv, f in zip(lateral_convs, feats)]
    # Top-down pathway, coarsest first; upsample to the finer map's exact size, not by a factor 2.
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                          mode="nearest")
    return [conv(lat) for conv, lat in zip(output_convs, laterals)]


class RetinaFPN(nn.Module):
    """FPN producing P3-P7 with ``out_channels`` each.

    Args:
        in_channels: channels of C3, C4, C5 (e.g. 512/1024/2048 for ResNet-50, 128/256/512 for ResNet-18).
        out_channels: channels of every output level (256 in the reference).

    ``forward(feats: [C3, C4, C5]) -> [P3, P4, P5, P6, P7]`` with strides 8, 16, 32, 64, 128.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                          for _ in self.in_channels)
        # P6 reads C5 itself (the reference's "on_input" extra convs), hence C5's channel count.
        self.p6_conv = nn.Conv2d(self.in_channels[-1], out_channels, 3, stride=2, padding=1)
        self.p7_conv = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases on every conv, as the reference initialises its FPN."""
        _xavier_init(self)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"RetinaFPN expects {len(self.lateral_convs)} input maps, got {len(feats)}")
        outs = _pyramid(feats, self.lateral_convs, self.output_convs)
        p6 = self.p6_conv(feats[-1])
        p7 = self.p7_conv(p6)  # no ReLU before P7, as in the reference
        return outs + [p6, p7]


class RCNNFPN(nn.Module):
    """FPN producing P2-P6 with ``out_channels`` each, for Faster / Mask R-CNN.

    Args:
        in_channels: channels of C2, C3, C4, C5 (256/512/1024/2048 for ResNet-50, 64/128/256/512 for ResNet-18).
        out_channels: channels of every output level (256 in the reference).

    ``forward(feats: [C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6]`` with strides 4, 8, 16, 32, 64. P6 is
    ``max_pool2d(P5, kernel_size=1, stride=2)``, i.e. every second row and column of P5 (size
    ``ceil(P5 / 2)``); the RPN uses it, the RoI heads pool from P2-P5 only.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                          for _ in self.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases on every conv, as the reference initialises its FPN."""
        _xavier_init(self)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"RCNNFPN expects {len(self.lateral_convs)} input maps (C2..C5), got {len(feats)}")
        outs = _pyramid(feats, self.lateral_convs, self.output_convs)
        return outs + [F.max_pool2d(outs[-1], kernel_size=1, stride=2)]
