"""mmdetection checkpoint conversion: complete key mapping, checksums, safe reading, the CLI script."""

from __future__ import annotations

import collections
import copy
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pisa.config import load_config
from pisa.eval import load_weights_strict
from pisa.models import build_model
from pisa.models.convert import (convert_mmdet_state_dict, infer_model_cfg, is_mmdet_checkpoint,
                                 mmdet_class_names, read_mmdet_checkpoint)

REPO = Path(__file__).resolve().parents[2]
R50_TSV = REPO / "tests/data_files/mmdet_keys/retinanet_r50_fpn.tsv"  # copy of the reference layout
sys.path.insert(0, str(REPO / "scripts"))
import convert_mmdet  # noqa: E402  (the CLI under test)


def read_layout(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """``key<TAB>shape<TAB>dtype`` rows; shape ``64x3x7x7`` or ``scalar``."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x")), dtype))
    return rows


def x101_layout(r50_rows):
    """ResNeXt-101-32x4d layout from the R50 one by the method doc §7.4 rules.

    Stage s has planes p; R50 mid width m = p becomes 2p with 32 groups: conv1 [2p, in], conv2 [2p, 2p/32, 3, 3],
    conv3 [4p, 2p], bn1/bn2 [2p]; layer3 grows from 6 to 23 blocks (blocks 6..22 repeat block 5's shapes).
    """
    def widen(key, shape):
        match = re.match(r"backbone\.layer\d\.\d+\.(conv[123]|bn[12])\.", key)
        if not match or shape == ():
            return shape
        part = match.group(1)
        if part == "conv3":  # [4p, p, 1, 1] -> [4p, 2p, 1, 1]
            return (shape[0], 2 * shape[1], 1, 1)
        m = 2 * shape[0]
        return {"conv1": (m, *shape[1:]), "conv2": (m, m // 32, 3, 3)}.get(part, (m,))  # bn1/bn2: (2p,)

    rows = []
    for key, shape, dtype in r50_rows:
        rows.append((key, widen(key, shape), dtype))
        if key.startswith("backbone.layer3.5.") and key.endswith("bn3.num_batches_tracked"):
            block5 = [r for r in rows if r[0].startswith("backbone.layer3.5.")]
            rows += [(k.replace("layer3.5.", f"layer3.{b}."), s, d) for b in range(6, 23) for k, s, d in block5]
    return rows


def synthesise(rows, device="cpu") -> collections.OrderedDict:
    """A state dict of the layout; each tensor is filled with its row number so the mapping can be traced."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    return collections.OrderedDict((key, torch.full(shape, float(i), dtype=dtypes[dtype], device=device))
                                   for i, (key, shape, dtype) in enumerate(rows))


def shipped_model_cfg(config="configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml") -> dict:
    return load_config(str(REPO / config), ["model.backbone.pretrained=null"], check_paths=False)["model"]


def element_count(state) -> int:
    return sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))


def test_r50_layout_converts_completely_and_loads_strictly():
    rows = read_layout(R50_TSV)
    state = synthesise(rows)
    # Method doc §7.4 checksum: 354 keys, 38,021,812 elements without num_batches_tracked.
    assert len(state) == 354 and element_count(state) == 38_021_812
    model_cfg = shipped_model_cfg()
    assert is_mmdet_checkpoint({"state_dict": state, "meta": {}})
    converted = convert_mmdet_state_dict(state, model_cfg)
    assert len(converted) == 354 and element_count(converted) == 38_021_812
    torch.manual_seed(0)
    model = build_model({"model": model_cfg})
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    # Every tensor arrived at the right place: spot-check the renamed families by their fill values.
    index = {key: i for i, (key, _, _) in enumerate(rows)}
    for mm_key, pisa_key in [("backbone.layer3.5.conv2.weight", "backbone.layer3.5.conv2.weight"),
                             ("neck.lateral_convs.2.conv.bias", "neck.lateral_convs.2.bias"),
                             ("neck.fpn_convs.1.conv.weight", "neck.output_convs.1.weight"),
                             ("neck.fpn_convs.3.conv.weight", "neck.p6_conv.weight"),
                             ("neck.fpn_convs.4.conv.bias", "neck.p7_conv.bias"),
                             ("bbox_head.reg_convs.3.conv.weight", "head.reg_convs.3.weight"),
                             ("bbox_head.retina_cls.bias", "head.cls_logits.bias"),
                             ("bbox_head.retina_reg.weight", "head.bbox_reg.weight")]:
        assert bool((loaded[pisa_key] == index[mm_key]).all()), (mm_key, pisa_key)
    assert infer_model_cfg(state, model_cfg) == model_cfg


def test_x101_layout_converts_completely():
    """Checksum 660 keys / 56,727,220 elements; checked on meta tensors (shapes only, no memory)."""
    state = synthesise(x101_layout(read_layout(R50_TSV)), device="meta")
    assert len(state) == 660 and element_count(state) == 56_727_220
    model_cfg = shipped_model_cfg("configs/pisa/pisa_retinanet_x101_32x4d_fpn_1x_coco.yaml")
    assert infer_model_cfg(state, shipped_model_cfg())["backbone"]["type"] == "resnext101_32x4d"
    converted = convert_mmdet_state_dict(state, model_cfg)
    assert len(converted) == 660 and element_count(converted) == 56_727_220


def test_missing_unexpected_and_misshaped_keys_are_listed():
    state = synthesise(read_layout(R50_TSV), device="meta")
    model_cfg = shipped_model_cfg()
    broken = copy.copy(state)
    del broken["neck.fpn_convs.4.conv.bias"]
    broken["bbox_head.loss_scale"] = torch.zeros(1, device="meta")
    broken["bbox_head.retina_cls.bias"] = torch.zeros(9 * 81, device="meta")
    with pytest.raises(ValueError) as info:
        convert_mmdet_state_dict(broken, model_cfg)
    message = str(info.value)
    assert "unmapped (1): ['bbox_head.loss_scale']" in message
    assert "missing (1): ['neck.p7_conv.bias']" in message
    assert "head.cls_logits.bias: (729,) != (720,)" in message
    # The R50 weights do not fit an X101 model.
    with pytest.raises(ValueError, match="backbone 'resnext101_32x4d'.*wrong shape"):
        convert_mmdet_state_dict(state, shipped_model_cfg("configs/pisa/pisa_retinanet_x101_32x4d_fpn_1x_coco.yaml"))


class NotMetadata:
    """A class outside the allow-list: pickling it makes a file unsafe to load with weights_only."""

    def __init__(self):
        self.payload = "anything"


def _metadata() -> dict:
    """What mmdetection v2 files keep in ``meta``: strings, tuples and numpy scalars/arrays."""
    return {"mmdet_version": "2.2.0", "config": "model = dict(type='RetinaNet')", "epoch": 12, "iter": 87960,
            "CLASSES": ("person", "bicycle"), "time": "Fri Jun 26 10:00:00 2020",
            "hook_msgs": {"best_score": np.float64(0.369), "best_epoch": np.int64(12),
                          "history": np.array([0.1, 0.2], dtype=np.float32)}}


def test_reader_accepts_allow_listed_metadata(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": collections.OrderedDict(w=torch.ones(2)), "meta": _metadata()}, path)
    checkpoint = read_mmdet_checkpoint(str(path))
    assert checkpoint["meta"]["hook_msgs"]["best_score"] == pytest.approx(0.369)
    assert mmdet_class_names(checkpoint) == ["person", "bicycle"]


def test_reader_refuses_other_objects_unless_trusted(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"backbone.w": torch.ones(2)}, "meta": {"obj": NotMetadata()}}, path)
    with pytest.raises(ValueError, match=r"unsafe\.pth: refused.*NotMetadata.*--trust-checkpoint"):
        read_mmdet_checkpoint(str(path))
    assert read_mmdet_checkpoint(str(path), trust=True)["meta"]["obj"].payload == "anything"


def test_mmdet3_class_names():
    assert mmdet_class_names({"meta": {"dataset_meta": {"classes": ("a", "b")}}}) == ["a", "b"]
    assert mmdet_class_names({"state_dict": {}}) is None


# ---- the CLI, end to end on a small model ---------------------------------------------------------

def _to_mmdet_name(key: str) -> str:
    """pisa -> mmdetection names (the inverse of the converter's rules), written independently here."""
    for src, dst in [("neck.output_convs.", "neck.fpn_convs."), ("neck.p6_conv.", "neck.fpn_convs.3.conv."),
                     ("neck.p7_conv.", "neck.fpn_convs.4.conv."), ("head.cls_logits.", "bbox_head.retina_cls."),
                     ("head.bbox_reg.", "bbox_head.retina_reg.")]:
        if key.startswith(src):
            key = dst + key[len(src):]
            break
    key = re.sub(r"^head\.(cls|reg)_convs\.", r"bbox_head.\1_convs.", key)
    conv_module = r"^(neck\.(lateral|fpn)_convs\.\d+|bbox_head\.(cls|reg)_convs\.\d+)\.(weight|bias)$"
    return re.sub(conv_module, r"\1.conv.\4", key)  # mmdetection wraps these convs in a ConvModule


def _small_cfg() -> dict:
    overrides = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", "model.num_classes=3",
                 "model.neck.out_channels=32", "model.head.feat_channels=32", "model.head.stacked_convs=2"]
    return load_config(str(REPO / "configs/retinanet/retinanet_r50_fpn_1x_coco.yaml"), overrides, check_paths=False)


def _save_mmdet(path: Path, state: dict, meta: dict) -> None:
    torch.save({"state_dict": collections.OrderedDict((_to_mmdet_name(k), v) for k, v in state.items()),
                "meta": meta}, path)


def test_script_round_trip(tmp_path, capsys):
    """A small ResNet-18 RetinaNet written in mmdetection layout converts back to identical weights."""
    cfg = _small_cfg()
    torch.manual_seed(0)
    original = build_model(cfg).state_dict()
    mmdet_file, pisa_file = tmp_path / "mmdet.pth", tmp_path / "pisa.pth"
    _save_mmdet(mmdet_file, original, _metadata())
    assert convert_mmdet.main([str(mmdet_file), str(pisa_file)]) == 0  # architecture inferred from the weights
    assert "resnet18 and 3 classes" in capsys.readouterr().out
    written = torch.load(pisa_file, weights_only=True)
    assert written["config"] is None
    assert written["meta"]["class_names"] == ["person", "bicycle"] and written["meta"]["mmdet_version"] == "2.2.0"
    assert written["model"].keys() == original.keys()
    assert all(torch.equal(written["model"][k], v) for k, v in original.items())
    torch.manual_seed(1)
    build_model(cfg).load_state_dict(written["model"], strict=True)


def test_script_reports_refused_file(tmp_path, capsys):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"backbone.w": torch.ones(2)}, "meta": {"obj": NotMetadata()}}, path)
    assert convert_mmdet.main([str(path), str(tmp_path / "out.pth")]) == 1
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_eval_warns_where_the_embedded_config_differs(tmp_path):
    cfg = _small_cfg()
    model = build_model(cfg)
    meta = dict(_metadata(), config="test_cfg = dict(score_thr=0.3, nms=dict(type='nms', iou_thr=0.5))\n"
                                     "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], to_rgb=True)\n")
    path = tmp_path / "published.pth"
    _save_mmdet(path, model.state_dict(), meta)
    warnings = load_weights_strict(build_model(cfg), str(path), cfg, trust=False)
    assert len(warnings) == 1  # score_thr differs; the NMS threshold, mean and to_rgb agree
    assert str(path) in warnings[0] and "model.test.score_thr: checkpoint 0.3, config 0.05" in warnings[0]
    converted = tmp_path / "converted.pth"  # convert_mmdet.py keeps the text as meta.mmdet_config
    assert convert_mmdet.main([str(path), str(converted)]) == 0
    assert load_weights_strict(build_model(cfg), str(converted), cfg, trust=False) == [
        warnings[0].replace(str(path), str(converted))]
    trained_here = tmp_path / "pisa.pth"
    torch.save({"model": model.state_dict(), "meta": {}}, trained_here)
    assert load_weights_strict(build_model(cfg), str(trained_here), cfg, trust=False) == []
