"""VGG16 trunk of SSD300 / SSD512 (Liu et al., 2016) with the reference's layer layout (method doc §7.5).

Module names follow the published PISA SSD checkpoints (the reference's layout before v2.14), so their
backbone keys load without renaming and a torchvision ``vgg16`` ImageNet file maps index for index:

* ``features``: torchvision's ``vgg16().features`` indices for the 13 conv layers (0, 2, 5, ..., 28),
  each followed by a ReLU; 2x2/2 max-pools with ``ceil_mode`` at 4, 9, 16 and 23 (no pool5), then
  ``pool(3, 1, 1)`` at 30, conv6 (3x3, dilation 6, padding 6) at 31, conv7 (1x1) at 33, ReLUs at 32, 34;
* ``l2_norm``: the learned per-channel scale on the conv4_3 tap (after the ReLU at index 22);
* ``extra``: the extra convs, alternately 1x1 and 3x3, with a ReLU after every one; odd ones are taps.

``forward`` returns the SSD feature maps: L2-normalised conv4_3, conv7, then the extra taps. For a
300x300 input their sizes are 38, 19, 10, 5, 3, 1; for 512x512 they are 64, 32, 16, 8, 4, 2, 1.
"""

from __future__ import annotations

import os
import urllib.error
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SSDVGG", "L2Norm", "SSD_EXTRA_LAYERS", "VGG16_CONV_INDICES", "load_pretrained_vgg", "build_vgg"]

# (out_channels, kernel, stride, padding) of each conv after conv7, per input size (method doc §7.5).
SSD_EXTRA_LAYERS: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    300: ((256, 1, 1, 0), (512, 3, 2, 1), (128, 1, 1, 0), (256, 3, 2, 1),
          (128, 1, 1, 0), (256, 3, 1, 0), (128, 1, 1, 0), (256, 3, 1, 0)),
    512: ((256, 1, 1, 0), (512, 3, 2, 1), (128, 1, 1, 0), (256, 3, 2, 1),
          (128, 1, 1, 0), (256, 3, 2, 1), (128, 1, 1, 0), (256, 3, 2, 1),
          (128, 1, 1, 0), (256, 4, 1, 1)),
}

# VGG16 configuration: conv widths per block; "M" is a 2x2/2 ceil-mode max-pool (none after block 5).
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Indices in ``features`` of the 13 VGG16 convs: the same as in torchvision's ``vgg16().features``.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CONV4_3_RELU = 22  # the first tap, before pool4
_CONV6, _CONV7 = 31, 33


class L2Norm(nn.Module):
    """``x / (‖x‖₂ over channels + eps) · weight``, computed in fp32 (the reference's L2Norm).

    Args:
        channels: number of channels ``C``; ``weight`` is ``(C,)``.
        scale: initial value of every ``weight`` entry (SSD: 20).
        eps: added to the norm.

    ``forward((B, C, H, W)) -> (B, C, H, W)`` in the input's dtype.
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps
        self.scale = float(scale)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        norm = x32.pow(2).sum(1, keepdim=True).sqrt() + self.eps
        return (self.weight.float()[None, :, None, None] * x32 / norm).to(x.dtype)


def _scaled(channels: int, width: float) -> int:
    """Channels of a layer in a ``width``-scaled VGG (at least 8)."""
    return max(8, int(round(channels * width)))


def _vgg16_features(width: float) -> tuple[nn.Sequential, int, int]:
    """The ``features`` sequence (35 modules) and the channels of its two taps (conv4_3, conv7)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for block_idx, block in enumerate(_VGG16_BLOCKS):
        for out in block:
            out = _scaled(out, width)
            layers += [nn.Conv2d(in_ch, out, 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = out
        if block_idx < len(_VGG16_BLOCKS) - 1:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    conv4_3 = _scaled(512, width)
    fc = _scaled(1024, width)
    layers += [nn.MaxPool2d(3, 1, 1),
               nn.Conv2d(in_ch, fc, 3, padding=6, dilation=6), nn.ReLU(inplace=True),
               nn.Conv2d(fc, fc, 1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers), conv4_3, fc


class SSDVGG(nn.Module):
    """VGG16 + extra layers of SSD; returns the feature maps the SSD head predicts on.

    Args:
        extra_layers: ``(out_channels, kernel, stride, padding)`` of each conv after conv7, in pairs
            whose second conv is a tap; :data:`SSD_EXTRA_LAYERS` holds the reference's SSD300 and
            SSD512 layouts.
        width: channel multiplier of every layer (1.0 = the reference VGG16; smaller values give the
            small CPU-sized models of the demo configs; ImageNet weights need 1.0).
        l2_norm_scale: initial scale of the conv4_3 L2 normalisation (20).

    ``forward(x: (B, 3, H, W))`` returns a list of ``(B, out_channels[l], H_l, W_l)`` maps; SSD300 and
    SSD512 give ``out_channels = [512, 1024, 512, 256, 256, 256(, 256)]`` (times ``width``).
    """

    def __init__(self, extra_layers: Sequence[Sequence[int]] = SSD_EXTRA_LAYERS[300], width: float = 1.0,
                 l2_norm_scale: float = 20.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"model.backbone.width must be > 0, got {width}")
        if len(extra_layers) % 2 or any(len(spec) != 4 for spec in extra_layers):
            raise ValueError("model.backbone.extra_layers must hold pairs of [out_channels, kernel, stride, "
                             f"padding] entries (1x1 then 3x3, one tap per pair), got {extra_layers}")
        self.width = float(width)
        self.features, conv4_3_channels, in_ch = _vgg16_features(width)
        self.l2_norm = L2Norm(conv4_3_channels, l2_norm_scale)
        self.extra = nn.ModuleList()
        self.out_channels = [conv4_3_channels, in_ch]
        for i, (out, kernel, stride, padding) in enumerate(extra_layers):
            out = _scaled(out, width)
            self.extra.append(nn.Conv2d(in_ch, out, kernel, stride=stride, padding=padding))
            if i % 2 == 1:
                self.out_channels.append(out)
            in_ch = out
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: Kaiming-normal (fan_out, ReLU) VGG convs, Xavier-uniform extra convs,
        zero biases, L2 scale 20."""
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in self.extra:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        self.l2_norm.reset_parameters()

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == _CONV4_3_RELU:
                outs.append(self.l2_norm(x))
        outs.append(x)  # conv7 after its ReLU
        for i, conv in enumerate(self.extra):
            x = torch.relu(conv(x))
            if i % 2 == 1:
                outs.append(x)
        return outs


# --------------------------------------------------------------------------------------------
# ImageNet weights
# --------------------------------------------------------------------------------------------

def _torchvision_vgg16_state() -> dict[str, Tensor]:
    """torchvision's ``vgg16`` ``IMAGENET1K_V1`` weights, from its cache (downloaded only if missing)."""
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not load torchvision's vgg16 ImageNet weights: {os.path.basename(weights.url)} is not in "
            f"the cache {cache_dir} and downloading {weights.url} failed ({err}). Copy the file there, or set "
            "model.backbone.pretrained to a local .pth path (or null for random init)") from err


def _vgg_conv_part(state: dict, source: str) -> dict[str, Tensor]:
    """The 13 VGG16 conv layers of a torchvision (``features.{j}``) or mmdetection / pisa
    (``backbone.features.{j}``, optionally under ``state_dict`` / ``model``) state dict."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    prefixed = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = prefixed or dict(state)
    wanted = {f"features.{j}.{p}" for j in VGG16_CONV_INDICES for p in ("weight", "bias")}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{source} is not a VGG16 state dict: missing {missing[:6]}"
                         f"{'...' if len(missing) > 6 else ''} (expected torchvision's vgg16 layout "
                         "features.{j}.weight for j in " + ", ".join(map(str, VGG16_CONV_INDICES)) + ")")
    return {k: state[k] for k in sorted(wanted)}


def load_pretrained_vgg(backbone: SSDVGG, pretrained: str) -> None:
    """Initialise the 13 VGG16 convs of ``backbone`` from ``"torchvision"`` or a local ``.pth`` file.

    conv6, conv7, the extra layers and the L2 scale keep their init, as in the reference (its ImageNet
    file has no conv6/conv7). Shapes must match exactly, so ``width`` must be 1.0.
    """
    if pretrained == "torchvision":
        state, source = _torchvision_vgg16_state(), "torchvision vgg16"
    else:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model.backbone.pretrained: no such file {pretrained!r}")
        state, source = torch.load(pretrained, map_location="cpu", weights_only=True), pretrained
    convs = _vgg_conv_part(state, source)
    own = backbone.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in convs.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source} does not fit the VGG16 of width {backbone.width}: {wrong[:3]}; "
                         "ImageNet weights need model.backbone.width: 1.0")
    backbone.load_state_dict(convs, strict=False)


def build_vgg(cfg: dict, input_size: int) -> SSDVGG:
    """``SSDVGG`` from ``model.backbone`` (``type: vgg16``, ``width``, ``extra_layers``, ``l2_norm_scale``,
    ``pretrained``); ``extra_layers: null`` takes the reference layout of ``input_size`` (300 or 512)."""
    if cfg.get("type", "vgg16") != "vgg16":
        raise ValueError(f"model.backbone.type: SSD supports 'vgg16', got {cfg['type']!r}")
    extra = cfg.get("extra_layers")
    if extra is None:
        if input_size not in SSD_EXTRA_LAYERS:
            raise ValueError(f"model.input_size {input_size} has no reference extra layers (only "
                             f"{sorted(SSD_EXTRA_LAYERS)}); give model.backbone.extra_layers explicitly")
        extra = SSD_EXTRA_LAYERS[input_size]
    backbone = SSDVGG(extra, cfg.get("width", 1.0), cfg.get("l2_norm_scale", 20.0))
    if cfg.get("pretrained"):
        load_pretrained_vgg(backbone, cfg["pretrained"])
    return backbone
