"""mmdetection SSD checkpoints: the pre-v2.14 layout of the published PISA SSD files (method doc §7.5) and
the current layout both convert with nothing missing or unexpected; checksums of §7.4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pisa.config import validate
from pisa.engine.checkpoint import load_model_weights
from pisa.models import build_model
from pisa.models.convert import convert_mmdet_state_dict, infer_model_cfg, mmdet_model_type

REPO = Path(__file__).resolve().parents[2]
CURRENT_TSV = REPO / "tests/data_files/mmdet_keys/ssd300_current_layout.tsv"  # copy of the reference layout

SSD512_ANCHORS = {"strides": [8, 16, 32, 64, 128, 256, 512], "ratio_range": [0.1, 0.9],
                  "ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]}


def ssd_model_cfg(**model) -> dict:
    return validate({"model": {"type": "ssd", "num_classes": 80, **model},
                     "data": {"train": {"type": "synthetic"}, "val": {"type": "synthetic"}},
                     "train": {"work_dir": "unused"}}, check_paths=False)["model"]


def legacy_layout(input_size: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the pre-v2.14 SSD layout, written out from the method doc §7.5 table (80 classes)."""
    vgg = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
           17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
    shapes = {}
    for j, (out, inp) in vgg.items():
        shapes[f"backbone.features.{j}.weight"], shapes[f"backbone.features.{j}.bias"] = (out, inp, 3, 3), (out,)
    shapes.update({"backbone.features.31.weight": (1024, 512, 3, 3), "backbone.features.31.bias": (1024,),
                   "backbone.features.33.weight": (1024, 1024, 1, 1), "backbone.features.33.bias": (1024,),
                   "backbone.l2_norm.weight": (512,)})
    extra = [(256, 1024, 1), (512, 256, 3), (128, 512, 1), (256, 128, 3), (128, 256, 1), (256, 128, 3),
             (128, 256, 1), (256, 128, 3)]
    if input_size == 512:
        extra += [(128, 256, 1), (256, 128, 4)]
    for i, (out, inp, k) in enumerate(extra):
        shapes[f"backbone.extra.{i}.weight"], shapes[f"backbone.extra.{i}.bias"] = (out, inp, k, k), (out,)
    channels = [512, 1024, 512, 256, 256, 256] + ([256] if input_size == 512 else [])
    anchors = [4, 6, 6, 6, 4, 4] if input_size == 300 else [4, 6, 6, 6, 6, 4, 4]
    for level, (c, a) in enumerate(zip(channels, anchors)):
        shapes[f"bbox_head.cls_convs.{level}.weight"], shapes[f"bbox_head.cls_convs.{level}.bias"] = \
            (a * 81, c, 3, 3), (a * 81,)
        shapes[f"bbox_head.reg_convs.{level}.weight"], shapes[f"bbox_head.reg_convs.{level}.bias"] = \
            (a * 4, c, 3, 3), (a * 4,)
    return shapes


def current_layout() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in CURRENT_TSV.read_text().splitlines() if line and not line.startswith("#")]
    return {key: tuple(int(s) for s in shape.split("x")) for key, shape, _ in rows}


def meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of the right shapes on the meta device: the converter checks names and shapes only."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def checksum(state: dict) -> tuple[int, int]:
    return len(state), sum(v.numel() for v in state.values())


def test_published_pisa_ssd300_layout_converts_completely():
    state = meta_state(legacy_layout(300))
    assert checksum(state) == (71, 34_305_206)  # method doc §7.4
    converted = convert_mmdet_state_dict(state, ssd_model_cfg())  # raises on anything unmapped/missing
    assert checksum(converted) == (71, 34_305_206)
    assert converted["backbone.extra.5.weight"].shape == (256, 128, 3, 3)
    assert converted["head.cls_convs.0.weight"].shape == (324, 512, 3, 3)


def test_published_pisa_ssd512_layout_converts_completely():
    state = meta_state(legacy_layout(512))
    assert checksum(state) == (79, 36_038_196)
    cfg = ssd_model_cfg(input_size=512, anchors=SSD512_ANCHORS)
    assert checksum(convert_mmdet_state_dict(state, cfg)) == (79, 36_038_196)


def test_current_layout_converts_completely():
    state = meta_state(current_layout())
    assert checksum(state) == (71, 34_305_206)
    converted = convert_mmdet_state_dict(state, ssd_model_cfg())
    # neck.extra_layers.{k}.{j}.conv -> backbone.extra.{2k + j}; the head's ".0." is dropped.
    assert set(converted) == {k.replace("bbox_head.", "head.") for k in legacy_layout(300)}


def test_both_layouts_give_the_same_tensors():
    """The §7.5 rename maps each current-layout key onto the tensor its legacy key holds."""
    legacy = legacy_layout(300)
    current = {}
    for key in legacy:
        name = key.replace("backbone.l2_norm", "neck.l2_norm")
        if key.startswith("backbone.extra."):
            i, p = int(key.split(".")[2]), key.split(".")[3]
            name = f"neck.extra_layers.{i // 2}.{i % 2}.conv.{p}"
        elif key.startswith("bbox_head."):
            parts = key.split(".")
            name = ".".join(parts[:3] + ["0", parts[3]])
        current[name] = key
    assert set(current) == set(current_layout())
    state = {k: torch.full(legacy[v], float(n)) for n, (k, v) in enumerate(current.items())}
    converted = convert_mmdet_state_dict(state, ssd_model_cfg())
    model = build_model({"model": ssd_model_cfg()})
    assert not model.load_state_dict(converted, strict=True).missing_keys
    for n, (name, key) in enumerate(current.items()):
        assert float(converted[key.replace("bbox_head.", "head.")].flatten()[0]) == n


def test_infer_model_cfg_reads_the_input_size_and_classes():
    for input_size, layout in ((300, meta_state(legacy_layout(300))), (300, meta_state(current_layout())),
                               (512, meta_state(legacy_layout(512)))):
        assert mmdet_model_type(layout) == "ssd"
        cfg = infer_model_cfg(layout, ssd_model_cfg(num_classes=4))
        assert cfg["input_size"] == input_size and cfg["num_classes"] == 80 and cfg["backbone"]["width"] == 1.0
        assert len(cfg["anchors"]["strides"]) == (6 if input_size == 300 else 7)
        convert_mmdet_state_dict(layout, cfg)


def test_missing_and_unexpected_keys_are_named():
    state = meta_state(legacy_layout(300))
    del state["backbone.l2_norm.weight"]
    state["bbox_head.extra_thing.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"unmapped \(1\).*extra_thing.*missing \(1\).*l2_norm"):
        convert_mmdet_state_dict(state, ssd_model_cfg())


def _to_legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("bbox_head." + k[len("head."):]) if k.startswith("head.") else k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_mmdetection_file_loads_through_load_model_weights(tmp_path, layout):
    """A small SSD saved as an mmdetection file (state_dict + meta) loads exactly, as eval / predict /
    load_from read it."""
    cfg = ssd_model_cfg(num_classes=4, input_size=128, backbone={"width": 0.125, "extra_layers": [
        [256, 1, 1, 0], [512, 3, 2, 1], [128, 1, 1, 0], [256, 3, 2, 1]]},
        anchors={"strides": [8, 16, 32, 64], "ratios": [[2], [2, 3], [2, 3], [2]], "ratio_range": [0.15, 0.9]})
    torch.manual_seed(0)
    own = build_model({"model": cfg}).state_dict()
    mm = _to_legacy_names(own)
    if layout == "current":
        mm = {k.replace("backbone.l2_norm", "neck.l2_norm"): v for k, v in mm.items()}
        mm = {(f"neck.extra_layers.{int(k.split('.')[2]) // 2}.{int(k.split('.')[2]) % 2}.conv.{k.split('.')[3]}"
               if k.startswith("backbone.extra.") else
               ".".join(k.split(".")[:3] + ["0", k.split(".")[3]]) if k.startswith("bbox_head.") else k): v
              for k, v in mm.items()}
    path = tmp_path / "ssd_mmdet.pth"
    torch.save({"state_dict": mm, "meta": {"CLASSES": ["a", "b", "c", "d"], "mmdet_version": "2.0.0"}}, path)
    loaded = load_model_weights(path, cfg)
    assert set(loaded) == set(own)
    assert all(torch.equal(loaded[k], own[k]) for k in own)
