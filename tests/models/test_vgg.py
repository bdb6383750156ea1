"""VGG16-SSD trunk: the layout of method doc §7.5, L2Norm, ImageNet weights from a local file."""

import pytest
import torch
import torchvision
from torch import nn

from pisa.models.vgg import SSD_EXTRA_LAYERS, VGG16_CONV_INDICES, L2Norm, SSDVGG, build_vgg, load_pretrained_vgg

# §7.5: conv shapes of the VGG16 part, by index in ``features``.
VGG_SHAPES = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
              14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
              28: (512, 512)}


def _meta_outputs(model_fn, size):
    """Feature map shapes for a ``size`` x ``size`` input, computed on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = model_fn()
        return model, [tuple(f.shape[1:]) for f in model(torch.empty(1, 3, size, size))]


def test_ssd300_layout_and_map_sizes():
    model, shapes = _meta_outputs(lambda: SSDVGG(SSD_EXTRA_LAYERS[300]), 300)
    # 300 -> 150 -> 75 -> 38 (ceil mode; floor would give 37) -> 19; extras 10, 5, 3, 1.
    assert shapes == [(512, 38, 38), (1024, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)]
    state = model.state_dict()
    for j, (out, inp) in VGG_SHAPES.items():
        assert state[f"features.{j}.weight"].shape == (out, inp, 3, 3)
    assert state["features.31.weight"].shape == (1024, 512, 3, 3)
    conv6 = model.features[31]
    assert conv6.dilation == (6, 6) and conv6.padding == (6, 6)
    assert state["features.33.weight"].shape == (1024, 1024, 1, 1)
    pools = {i: m for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)}
    assert sorted(pools) == [4, 9, 16, 23, 30]
    assert all(pools[i].ceil_mode and pools[i].kernel_size == 2 for i in (4, 9, 16, 23))
    assert (pools[30].kernel_size, pools[30].stride, pools[30].padding) == (3, 1, 1)
    assert state["l2_norm.weight"].shape == (512,)
    extra = [tuple(state[f"extra.{i}.weight"].shape) for i in range(8)]
    assert extra == [(256, 1024, 1, 1), (512, 256, 3, 3), (128, 512, 1, 1), (256, 128, 3, 3),
                     (128, 256, 1, 1), (256, 128, 3, 3), (128, 256, 1, 1), (256, 128, 3, 3)]
    assert model.out_channels == [512, 1024, 512, 256, 256, 256]


def test_ssd512_layout_and_map_sizes():
    model, shapes = _meta_outputs(lambda: SSDVGG(SSD_EXTRA_LAYERS[512]), 512)
    assert [s[1] for s in shapes] == [64, 32, 16, 8, 4, 2, 1]
    assert model.state_dict()["extra.9.weight"].shape == (256, 128, 4, 4)
    assert (model.extra[5].stride, model.extra[9].padding) == ((2, 2), (1, 1))
    assert len(model.state_dict()) == 26 + 4 + 1 + 20  # 13 VGG convs, conv6/7, l2 scale, 10 extra convs


def test_l2norm_hand_value():
    # One pixel with channels (3, 4): norm 5, so the output is 20 * (0.6, 0.8) = (12, 16).
    norm = L2Norm(2, scale=20.0)
    out = norm(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(out.view(2), torch.tensor([12.0, 16.0]))
    assert norm(torch.zeros(1, 2, 1, 1)).abs().max() == 0  # eps keeps an all-zero pixel finite


def test_relu_after_every_extra_layer():
    model = SSDVGG(SSD_EXTRA_LAYERS[300], width=0.125)
    with torch.no_grad():
        for conv in model.extra:
            conv.bias.fill_(-100.0)  # every pre-activation negative
        feats = model(torch.rand(1, 3, 300, 300))
    assert all(float(f.abs().max()) == 0 for f in feats[2:])


def test_width_scales_channels():
    model = SSDVGG(SSD_EXTRA_LAYERS[300], width=0.25)
    assert model.out_channels == [128, 256, 128, 64, 64, 64]


def test_torchvision_imagenet_layout_loads(tmp_path):
    # A random vgg16 features stack saved in torchvision's layout (plus a classifier that is dropped).
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build_vgg({"type": "vgg16", "pretrained": str(path)}, 300)
    for j in VGG16_CONV_INDICES:
        torch.testing.assert_close(model.features[j].weight, features[j].weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="width: 1.0"):
        load_pretrained_vgg(SSDVGG(width=0.5), str(path))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        load_pretrained_vgg(SSDVGG(width=0.125), str(tmp_path / "bad.pth"))


def test_bad_extra_layers_and_input_size():
    with pytest.raises(ValueError, match="pairs"):
        SSDVGG([(256, 1, 1, 0)])
    with pytest.raises(ValueError, match="model.input_size"):
        build_vgg({"type": "vgg16"}, 320)
