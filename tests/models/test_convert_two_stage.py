"""mmdetection Faster / Mask R-CNN checkpoints: complete key mapping (R50, X101), checksums, inferred
architecture, the eval load path, and the embedded-config check of the two-stage test settings."""

from __future__ import annotations

import collections
import copy
import re
from pathlib import Path

import pytest
import torch

from pisa.config import load_config
from pisa.eval import load_weights_strict
from pisa.models import build_model
from pisa.models.convert import (convert_mmdet_state_dict, infer_model_cfg, is_mmdet_checkpoint,
                                 mmdet_model_type)
from pisa.models.mmdet_config import config_differences
from test_convert import element_count, read_layout, synthesise, x101_layout  # shared layout helpers

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "tests/data_files/mmdet_keys"  # copies of the reference layouts
FASTER_TSV, MASK_TSV = KEYS / "faster_rcnn_r50_fpn.tsv", KEYS / "mask_rcnn_r50_fpn.tsv"
CONFIGS = {
    ("faster_rcnn", "r50"): "configs/pisa/pisa_faster_rcnn_r50_fpn_1x_coco.yaml",
    ("faster_rcnn", "x101"): "configs/pisa/pisa_faster_rcnn_x101_32x4d_fpn_1x_coco.yaml",
    ("mask_rcnn", "r50"): "configs/pisa/pisa_mask_rcnn_r50_fpn_1x_coco.yaml",
    ("mask_rcnn", "x101"): "configs/pisa/pisa_mask_rcnn_x101_32x4d_fpn_1x_coco.yaml",
}
# Method doc §7.4 converter checksums: keys (with num_batches_tracked) and elements (without).
CHECKSUMS = {
    ("faster_rcnn", "r50"): (348, 41_806_176),
    ("mask_rcnn", "r50"): (360, 44_449_456),
    ("faster_rcnn", "x101"): (654, 60_511_584),
    ("mask_rcnn", "x101"): (666, 63_154_864),
}


def model_cfg(model_type: str, backbone: str = "r50", overrides=()) -> dict:
    return load_config(str(REPO / CONFIGS[(model_type, backbone)]), ["model.backbone.pretrained=null", *overrides],
                       check_paths=False)["model"]


def layout(model_type: str, backbone: str = "r50"):
    rows = read_layout(FASTER_TSV if model_type == "faster_rcnn" else MASK_TSV)
    return x101_layout(rows) if backbone == "x101" else rows


@pytest.mark.parametrize("model_type,backbone", list(CHECKSUMS))
def test_layout_converts_completely_with_the_checksums(model_type, backbone):
    """Every key maps, none is missing or unexpected, every shape fits; checked on meta tensors."""
    state = synthesise(layout(model_type, backbone), device="meta")
    keys, elements = CHECKSUMS[(model_type, backbone)]
    assert len(state) == keys and element_count(state) == elements
    assert is_mmdet_checkpoint({"state_dict": state, "meta": {}})
    assert mmdet_model_type(state) == model_type
    cfg = model_cfg(model_type, backbone)
    converted = convert_mmdet_state_dict(state, cfg)
    assert len(converted) == keys and element_count(converted) == elements
    # The architecture read off the weights is the shipped config's (from the R50 config as the base).
    assert infer_model_cfg(state, model_cfg(model_type)) == cfg


def test_mask_r50_loads_strictly_and_every_family_lands_in_place():
    rows = layout("mask_rcnn")
    state = synthesise(rows)  # each tensor filled with its row number
    cfg = model_cfg("mask_rcnn")
    torch.manual_seed(0)
    model = build_model({"model": cfg})
    model.load_state_dict(convert_mmdet_state_dict(state, cfg), strict=True)
    loaded = model.state_dict()
    index = {key: i for i, (key, _, _) in enumerate(rows)}
    for mm_key, pisa_key in [("backbone.layer4.2.bn3.running_var", "backbone.layer4.2.bn3.running_var"),
                             ("neck.lateral_convs.0.conv.weight", "neck.lateral_convs.0.weight"),
                             ("neck.fpn_convs.3.conv.bias", "neck.output_convs.3.bias"),
                             ("rpn_head.rpn_conv.weight", "rpn.head.rpn_conv.weight"),
                             ("rpn_head.rpn_cls.bias", "rpn.head.rpn_cls.bias"),
                             ("rpn_head.rpn_reg.weight", "rpn.head.rpn_reg.weight"),
                             ("roi_head.bbox_head.shared_fcs.1.weight", "roi_head.bbox_head.shared_fcs.1.weight"),
                             ("roi_head.bbox_head.fc_cls.bias", "roi_head.bbox_head.fc_cls.bias"),
                             ("roi_head.bbox_head.fc_reg.weight", "roi_head.bbox_head.fc_reg.weight"),
                             ("roi_head.mask_head.convs.2.conv.weight", "roi_head.mask_head.convs.2.weight"),
                             ("roi_head.mask_head.upsample.weight", "roi_head.mask_head.upsample.weight"),
                             ("roi_head.mask_head.conv_logits.bias", "roi_head.mask_head.conv_logits.bias")]:
        assert bool((loaded[pisa_key] == index[mm_key]).all()), (mm_key, pisa_key)


def test_model_type_mismatches_are_listed():
    mask_state = synthesise(layout("mask_rcnn"), device="meta")
    with pytest.raises(ValueError) as info:
        convert_mmdet_state_dict(mask_state, model_cfg("faster_rcnn"))
    assert "unmapped (12)" in str(info.value) and "roi_head.mask_head.conv_logits.weight" in str(info.value)
    faster_state = synthesise(layout("faster_rcnn"), device="meta")
    with pytest.raises(ValueError, match=r"missing \(12\).*roi_head\.mask_head\.upsample\.bias"):
        convert_mmdet_state_dict(faster_state, model_cfg("mask_rcnn"))
    with pytest.raises(ValueError, match="use a faster_rcnn config"):
        infer_model_cfg(faster_state, model_cfg("mask_rcnn"))
    with pytest.raises(ValueError, match="unrecognised mmdetection checkpoint"):
        mmdet_model_type({"backbone.conv1.weight": torch.zeros(1)})


def test_infer_reads_classes_widths_and_depths():
    state = synthesise(layout("mask_rcnn"), device="meta")
    small = copy.copy(state)
    # 3 classes: fc_cls has 3 + 1 rows (background last), fc_reg 4 · 3, conv_logits 3; 2 mask convs of 64.
    small["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(4, 1024, device="meta")
    small["roi_head.bbox_head.shared_fcs.0.weight"] = torch.zeros(1024, 256 * 5 * 5, device="meta")
    small["roi_head.mask_head.conv_logits.weight"] = torch.zeros(3, 64, 1, 1, device="meta")
    for key in [k for k in small if re.match(r"roi_head\.mask_head\.convs\.[23]\.", k)]:
        del small[key]
    cfg = infer_model_cfg(small, model_cfg("mask_rcnn"))
    assert cfg["num_classes"] == 3 and cfg["roi_head"]["roi_size"] == 5
    assert cfg["roi_head"]["mask"]["num_convs"] == 2 and cfg["roi_head"]["mask"]["conv_channels"] == 64
    assert cfg["backbone"]["type"] == "resnet50" and cfg["rpn"]["feat_channels"] == 256


# ---- the eval load path, on a small model -----------------------------------------------------

_SMALL = ["model.backbone.type=resnet18", "model.num_classes=3", "model.neck.out_channels=16",
          "model.rpn.feat_channels=16", "model.roi_head.fc_channels=32", "model.roi_head.mask.conv_channels=8",
          "model.roi_head.mask.num_convs=2"]


def _to_mmdet_name(key: str) -> str:
    """pisa -> mmdetection names (the inverse of the converter's rules), written independently here."""
    key = key.replace("neck.output_convs.", "neck.fpn_convs.").replace("rpn.head.", "rpn_head.")
    conv_module = r"^(neck\.(lateral|fpn)_convs\.\d+|roi_head\.mask_head\.convs\.\d+)\.(weight|bias)$"
    return re.sub(conv_module, r"\1.conv.\3", key)  # mmdetection wraps these convs in a ConvModule


# The published files' form (early v2: test_cfg at the top level, RPN nms_post / nms_thr, RoIAlign
# out_size / sample_num, nms iou_thr), with the PISA two-stage test settings except two changes.
EMBEDDED = """
model = dict(
    type='MaskRCNN',
    backbone=dict(type='ResNet', depth=18, num_stages=4, frozen_stages=1, norm_eval=True, style='pytorch'),
    rpn_head=dict(type='RPNHead', in_channels=16, feat_channels=16,
                  anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                        strides=[4, 8, 16, 32, 64]),
                  bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                                  target_stds=[1.0, 1.0, 1.0, 1.0])),
    roi_head=dict(
        type='PISARoIHead',
        bbox_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', out_size=7, sample_num=0),
                                out_channels=16, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(type='Shared2FCBBoxHead', num_classes=3,
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                                       target_stds=[0.1, 0.1, 0.2, 0.2])),
        mask_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', out_size=14,
                                sample_num=0), out_channels=16, featmap_strides=[4, 8, 16, 32])))
test_cfg = dict(
    rpn=dict(nms_across_levels=False, nms_pre=2000, nms_post=1000, max_num=2000, nms_thr=0.7, min_bbox_size=0),
    rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_thr=0.5), max_per_img=100, mask_thr_binary=0.4))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
"""


def test_published_layout_loads_through_eval_and_warns_on_two_stage_settings(tmp_path):
    cfg = load_config(str(REPO / CONFIGS[("mask_rcnn", "r50")]), ["model.backbone.pretrained=null", *_SMALL],
                      check_paths=False)
    torch.manual_seed(0)
    original = build_model(cfg).state_dict()
    path = tmp_path / "published.pth"
    mm_state = collections.OrderedDict((_to_mmdet_name(k), v) for k, v in original.items())
    torch.save({"state_dict": mm_state, "meta": {"config": EMBEDDED, "CLASSES": ("a", "b", "c")}}, path)
    torch.manual_seed(1)
    model = build_model(cfg)
    warnings = load_weights_strict(model, str(path), cfg, trust=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    # nms_post (the early-v2 count kept after RPN NMS) 1000 vs 2000, and the mask threshold 0.4 vs 0.5.
    assert len(warnings) == 2, warnings
    assert "model.rpn.test.max_per_img: checkpoint 1000, config 2000" in warnings[0]
    assert "model.roi_head.test.mask_thr: checkpoint 0.4, config 0.5" in warnings[1]
    assert infer_model_cfg(mm_state, model_cfg("mask_rcnn")) == cfg["model"]


def test_embedded_config_check_covers_the_two_stage_test_settings():
    cfg = load_config(str(REPO / CONFIGS[("mask_rcnn", "r50")]), ["model.backbone.pretrained=null", *_SMALL],
                      check_paths=False)
    agreeing = EMBEDDED.replace("nms_post=1000", "nms_post=2000").replace("mask_thr_binary=0.4", "mask_thr_binary=0.5")
    differences, checked = config_differences(agreeing, cfg)
    assert differences == []
    # backbone, classes, 3 RPN anchor keys, 2 coders, RPN nms_pre / count / IoU, RoI size / sampling / mask size,
    # R-CNN score / NMS / count / mask threshold, mean / std / to_rgb.
    assert checked == 20
    # The later v2 spelling: RPN max_per_img and nms=dict(iou_threshold), RoIAlign output_size / sampling_ratio.
    later = agreeing.replace("nms_pre=2000, nms_post=2000, max_num=2000, nms_thr=0.7",
                             "nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.6)")
    later = later.replace("out_size=7, sample_num=0", "output_size=5, sampling_ratio=2")
    later = later.replace("iou_thr=0.5", "iou_threshold=0.3")
    differences, _ = config_differences(later, cfg)
    assert differences == ["model.rpn.test.nms_pre: checkpoint 1000, config 2000",
                           "model.rpn.test.max_per_img: checkpoint 1000, config 2000",
                           "model.rpn.test.nms_iou: checkpoint 0.6, config 0.7",
                           "model.roi_head.roi_size: checkpoint 5, config 7",
                           "model.roi_head.sampling_ratio: checkpoint 2, config 0",
                           "model.roi_head.test.nms_iou: checkpoint 0.3, config 0.5"]


def test_load_from_takes_the_converted_weights(tmp_path, capsys):
    """``load_from`` with an mmdetection Faster R-CNN file: converted on load, every tensor taken."""
    from pisa import train as pisa_train

    cfg = load_config(str(REPO / CONFIGS[("faster_rcnn", "r50")]),
                      ["model.backbone.pretrained=null", *[o for o in _SMALL if ".mask." not in o]], check_paths=False)
    torch.manual_seed(0)
    original = build_model(cfg).state_dict()
    path = tmp_path / "faster.pth"
    torch.save({"state_dict": collections.OrderedDict((_to_mmdet_name(k), v) for k, v in original.items()),
                "meta": {}}, path)
    torch.manual_seed(1)
    model = build_model(cfg)
    pisa_train.load_initial_weights(model, dict(cfg, load_from=str(path)), trust=False)
    assert f"{len(original)} tensors loaded; missing 0" in capsys.readouterr().out
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
