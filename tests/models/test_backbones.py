"""ResNet/ResNeXt trunks: shapes and strides, frozen stages, frozen BN, loading pretrained files."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from pisa.models.backbones import BACKBONES, ResNet, build_backbone, load_pretrained_backbone

# C3..C5 channels: BasicBlock 128/256/512, Bottleneck (expansion 4) 512/1024/2048.
EXPECTED_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512], "resnet50": [512, 1024, 2048],
                     "resnet101": [512, 1024, 2048], "resnext101_32x4d": [512, 1024, 2048]}


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_output_shapes_and_strides(arch):
    """Every type returns C3..C5 at strides 8/16/32 (shape inference on the meta device: no memory)."""
    with torch.device("meta"):
        backbone = ResNet(arch).eval()
        feats = backbone(torch.empty(2, 3, 96, 160))
    assert backbone.out_channels == EXPECTED_CHANNELS[arch]
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 160 // s)
                                               for c, s in zip(EXPECTED_CHANNELS[arch], (8, 16, 32))]


def test_resnet18_real_forward_with_c2_and_odd_size():
    """A real forward: C2..C5 with odd input sizes follow the conv arithmetic ceil(n / 2) per stride-2 layer."""
    backbone = ResNet("resnet18", out_levels=(2, 3, 4, 5)).eval()
    feats = backbone(torch.randn(1, 3, 65, 97))
    # 65 -> 33 (conv1) -> 17 (maxpool) -> 17, 9, 5, 3; 97 -> 49 -> 25 -> 25, 13, 7, 4.
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 17, 25), (128, 9, 13), (256, 5, 7), (512, 3, 4)]


def test_resnext_grouped_widths():
    """X101-32x4d: mid width 2 * planes with 32 groups, as in method doc §7.4 (meta device)."""
    with torch.device("meta"):
        backbone = ResNet("resnext101_32x4d")
    assert backbone.layer1[0].conv2.weight.shape == (128, 4, 3, 3)
    assert backbone.layer4[0].conv2.weight.shape == (1024, 32, 3, 3)
    assert backbone.layer4[0].conv2.stride == (2, 2) and backbone.layer4[0].conv1.stride == (1, 1)
    assert len(backbone.layer3) == 23


def _bn_layers(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_stages_get_no_gradient_and_bn_stays_eval():
    backbone = ResNet("resnet18", frozen_stages=1, norm_eval=True).train()
    frozen = [backbone.conv1, backbone.bn1, backbone.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert all(not bn.training for bn in _bn_layers(backbone))
    stats_before = backbone.layer3[0].bn1.running_mean.clone()
    sum(f.sum() for f in backbone(torch.randn(2, 3, 32, 32))).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    # BN statistics frozen, BN affine parameters of trained stages still learn.
    assert torch.equal(backbone.layer3[0].bn1.running_mean, stats_before)
    assert backbone.layer2[0].bn1.weight.grad is not None
    assert backbone.layer2[0].conv1.weight.grad.abs().sum() > 0


def test_without_norm_eval_only_frozen_bn_is_eval():
    backbone = ResNet("resnet18", frozen_stages=0, norm_eval=False).train()
    assert not backbone.bn1.training
    assert all(bn.training for bn in _bn_layers(backbone.layer1))
    assert all(p.requires_grad for p in backbone.layer1.parameters())
    backbone.eval()
    assert not any(bn.training for bn in _bn_layers(backbone))


def _random_torchvision_resnet18() -> dict:
    model = torchvision.models.resnet18(weights=None)
    for bn in _bn_layers(model):  # non-default statistics, so a load that skipped them would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.state_dict()


def _assert_loaded(backbone: ResNet, reference: dict) -> None:
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_load_torchvision_layout_file(tmp_path):
    reference = _random_torchvision_resnet18()  # includes fc.*, which the trunk drops
    path = tmp_path / "r18.pth"
    torch.save(reference, path)
    backbone = build_backbone({"type": "resnet18", "frozen_stages": 1, "norm_eval": True, "pretrained": str(path)})
    _assert_loaded(backbone, reference)


def test_load_mmdet_layout_file(tmp_path):
    reference = _random_torchvision_resnet18()
    state = {f"backbone.{k}": v for k, v in reference.items() if not k.startswith("fc.")}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)  # other parts of a detector are skipped
    path = tmp_path / "det.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 12}}, path)
    backbone = ResNet("resnet18")
    load_pretrained_backbone(backbone, str(path))
    _assert_loaded(backbone, reference)


def test_wrong_architecture_file_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_random_torchvision_resnet18(), path)
    with pytest.raises(ValueError, match="does not match backbone 'resnet34'.*missing"):
        load_pretrained_backbone(ResNet("resnet34"), str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained_backbone(ResNet("resnet18"), str(tmp_path / "absent.pth"))


def test_torchvision_weights_from_cache(tmp_path, monkeypatch):
    """'torchvision' reads torchvision's cache; the file name is the one of ResNet18_Weights.IMAGENET1K_V1."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    torch_home = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(torch_home))
    reference = _random_torchvision_resnet18()
    (torch_home / "checkpoints").mkdir(parents=True)
    torch.save(reference, torch_home / "checkpoints" / "resnet18-f37072fd.pth")
    backbone = build_backbone({"type": "resnet18", "pretrained": "torchvision"})
    _assert_loaded(backbone, reference)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_torchvision_weights_not_cached_and_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    with pytest.raises(RuntimeError, match="resnet18-f37072fd.pth is not in the cache .*empty_hub"):
        build_backbone({"type": "resnet18", "pretrained": "torchvision"})


def test_resnext_has_no_torchvision_weights():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="no ImageNet weights .*local .pth"):
            build_backbone({"type": "resnext101_32x4d", "pretrained": "torchvision"})


def test_unknown_type_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*resnet50.*resnext101_32x4d"):
        ResNet("resnet51")
