"""ResNet / ResNeXt backbones built from torchvision's blocks, with frozen stages and frozen BatchNorm.

The layout is pytorch style (stride on the 3x3 conv of the first block of a stage), exactly as
torchvision builds it, so the parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
...) and both torchvision ImageNet files and the ``backbone.*`` part of mmdetection checkpoints load
without renaming.

Feature levels: ``C2..C5`` are the outputs of ``layer1..layer4`` at strides 4, 8, 16, 32.
"""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

__all__ = ["ResNet", "BACKBONES", "build_backbone", "load_pretrained_backbone", "torchvision_state_dict"]


@dataclass(frozen=True)
class ResNetSpec:
    """Block type, blocks per stage, and the ResNeXt grouping of one architecture."""

    block: type
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    torchvision_weights: str | None = None  # name of the torchvision weights enum, if any


# One explicit table; the config's ``model.backbone.type`` picks a row.
BACKBONES: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(tv_resnet.BasicBlock, (2, 2, 2, 2), torchvision_weights="ResNet18_Weights"),
    "resnet34": ResNetSpec(tv_resnet.BasicBlock, (3, 4, 6, 3), torchvision_weights="ResNet34_Weights"),
    "resnet50": ResNetSpec(tv_resnet.Bottleneck, (3, 4, 6, 3), torchvision_weights="ResNet50_Weights"),
    "resnet101": ResNetSpec(tv_resnet.Bottleneck, (3, 4, 23, 3), torchvision_weights="ResNet101_Weights"),
    # Mid width 32 groups x 4 = 128 at stage 1 (2x the ResNet mid width); torchvision ships no weights.
    "resnext101_32x4d": ResNetSpec(tv_resnet.Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=4),
}


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk returning the requested feature levels.

    Args:
        arch: a key of ``BACKBONES``.
        out_levels: which of ``C2..C5`` (2, 3, 4, 5) ``forward`` returns, in increasing order.
        frozen_stages: -1 freezes nothing; 0 the stem (conv1 + bn1); ``s`` the stem and ``layer1..layer{s}``.
            Frozen parts get ``requires_grad=False`` and stay in eval mode.
        norm_eval: keep every BatchNorm in eval mode while training (running statistics frozen);
            the affine parameters of non-frozen stages still train.

    ``forward(x: (B, 3, H, W) float) -> list[Tensor]``: one ``(B, out_channels[i], H/s, W/s)`` map per
    requested level, with ``s = 2**level``.
    """

    def __init__(self, arch: str, out_levels: Sequence[int] = (3, 4, 5), frozen_stages: int = -1,
                 norm_eval: bool = True) -> None:
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"unknown backbone type {arch!r}; valid names: {sorted(BACKBONES)}")
        if not set(out_levels) <= {2, 3, 4, 5} or list(out_levels) != sorted(set(out_levels)):
            raise ValueError(f"out_levels must be increasing values in 2..5, got {list(out_levels)}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        spec = BACKBONES[arch]
        trunk = tv_resnet.ResNet(spec.block, list(spec.layers), groups=spec.groups,
                                 width_per_group=spec.width_per_group)
        # Keep torchvision's attribute names so state dicts load without renaming; drop the classifier.
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.arch = arch
        self.out_levels = tuple(out_levels)
        expansion = spec.block.expansion
        self.out_channels = [64 * 2 ** (level - 2) * expansion for level in self.out_levels]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze_stages()

    def _stages(self) -> list[nn.Module]:
        """Stage 0 is the stem; stage ``s`` is ``layer{s}``."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def _freeze_stages(self) -> None:
        for stage in self._stages()[: self.frozen_stages + 1]:
            stage.eval()
            for p in stage.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        """Switch mode, then put frozen stages (and every BN when ``norm_eval``) back in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for level, layer in zip((2, 3, 4, 5), (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if level in self.out_levels:
                outs.append(x)
            if level == self.out_levels[-1]:
                break  # deeper stages are not needed
        return outs


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------

def torchvision_state_dict(arch: str) -> dict[str, Tensor]:
    """ImageNet weights of ``arch`` from torchvision (``IMAGENET1K_V1``, the file the reference used).

    Read from torchvision's cache (``$TORCH_HOME/hub/checkpoints``); downloaded only when missing.
    Raises ``ValueError`` for architectures without torchvision weights and ``RuntimeError`` when the
    file is neither cached nor downloadable.
    """
    spec = BACKBONES[arch]
    if spec.torchvision_weights is None:
        raise ValueError(f"torchvision has no ImageNet weights for backbone {arch!r}: set "
                         "model.backbone.pretrained to a local .pth file (torchvision or mmdetection layout)")
    weights = getattr(tv_resnet, spec.torchvision_weights).IMAGENET1K_V1
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not load torchvision ImageNet weights for {arch!r}: {os.path.basename(weights.url)} is not "
            f"in the cache {cache_dir} and downloading {weights.url} failed ({err}). Copy the file into "
            "that directory, or set model.backbone.pretrained to a local .pth path (or null for random init)"
        ) from err


def _backbone_part(state: dict, source: str) -> dict[str, Tensor]:
    """Strip the wrappers of mmdetection / pisa / torchvision files down to the trunk's own keys."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    prefixed = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = prefixed or dict(state)
    # torchvision classification files also carry the classifier, which the trunk does not have.
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_pretrained_backbone(backbone: ResNet, pretrained: str) -> None:
    """Initialise ``backbone`` in place from ``"torchvision"`` or a local ``.pth`` file.

    Local files may be in torchvision layout (``conv1.weight``, ``layer1.0...``) or mmdetection layout
    (``backbone.`` prefix, optionally under ``state_dict``). Every trunk key must be present; extra keys
    are an error too, so a wrong file never loads silently.
    """
    if pretrained == "torchvision":
        state, source = torchvision_state_dict(backbone.arch), f"torchvision {backbone.arch}"
    else:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model.backbone.pretrained: no such file {pretrained!r}")
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        source = pretrained
    state = _backbone_part(state, source)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not match backbone {backbone.arch!r}: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def build_backbone(cfg: dict, out_levels: Sequence[int] = (3, 4, 5)) -> ResNet:
    """Build the trunk from ``model.backbone`` (``type``, ``frozen_stages``, ``norm_eval``, ``pretrained``)."""
    backbone = ResNet(cfg["type"], out_levels, cfg.get("frozen_stages", -1), cfg.get("norm_eval", True))
    if cfg.get("pretrained"):
        load_pretrained_backbone(backbone, cfg["pretrained"])
    return backbone
