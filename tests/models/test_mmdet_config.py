"""Reading the config text embedded in mmdetection checkpoints, and comparing it with pisa configs."""

from __future__ import annotations

from pathlib import Path

from pisa.config import load_config
from pisa.models.mmdet_config import config_differences, parse_config_text

REPO = Path(__file__).resolve().parents[2]
PISA_R50 = str(REPO / "configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml")

# Written here in the form mmdetection v2 stores (``Config.pretty_text``), with the published PISA
# RetinaNet R-50 settings (method spec §5.4); test_cfg at the top level as in the v2.0-2.4 files.
EMBEDDED = """
model = dict(
    type='RetinaNet',
    pretrained='torchvision://resnet50',
    backbone=dict(
        type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch'),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1,
              add_extra_convs=True, extra_convs_on_inputs=True, num_outs=5),
    bbox_head=dict(
        type='PISARetinaHead', num_classes=80, in_channels=256, stacked_convs=4, feat_channels=256,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='SmoothL1Loss', beta=0.11, loss_weight=1.0)))
train_cfg = dict(isr=dict(k=2.0, bias=0.0), carl=dict(k=1.0, bias=0.2))
test_cfg = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_thr=0.5),
                max_per_img=100)
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=(1333, 800), flip=False,
         transforms=[dict(type='Resize', keep_ratio=True), dict(type='RandomFlip'),
                     dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                          to_rgb=True),
                     dict(type='Pad', size_divisor=32), dict(type='ImageToTensor', keys=['img']),
                     dict(type='Collect', keys=['img'])])
]
optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001)
"""


def test_parse_reads_nested_dicts_lists_and_tuples():
    mm = parse_config_text(EMBEDDED)
    assert mm["model"]["bbox_head"]["anchor_generator"]["strides"] == [8, 16, 32, 64, 128]
    assert mm["model"]["backbone"]["out_indices"] == (0, 1, 2, 3)
    assert mm["test_cfg"]["nms"] == {"type": "nms", "iou_thr": 0.5}
    assert mm["test_pipeline"][1]["img_scale"] == (1333, 800)
    assert mm["optimizer"]["lr"] == 0.01


def test_parse_executes_nothing_and_skips_what_is_not_a_literal(tmp_path):
    marker = tmp_path / "ran"
    text = (f"a = open({str(marker)!r}, 'w')\n"
            "b = dict(x=1, y=__import__('os').getcwd(), z=-2.5)\n"
            "c = [1, sum([2])]\n"
            "d = dict(**b)\n"
            "e = {'k': (1, -3)}\n")
    mm = parse_config_text(text)
    assert not marker.exists()
    assert mm == {"b": {"x": 1, "z": -2.5}, "d": {}, "e": {"k": (1, -3)}}
    assert parse_config_text("model = dict(") == {}


def test_the_published_settings_match_the_shipped_pisa_config():
    differences, checked = config_differences(EMBEDDED, load_config(PISA_R50, check_paths=False))
    assert differences == []
    assert checked == 16


def test_differences_name_the_key_and_both_values():
    text = EMBEDDED.replace("img_scale=(1333, 800)", "img_scale=(1000, 600)").replace("iou_thr=0.5", "iou_thr=0.6")
    cfg = load_config(PISA_R50, ["model.num_classes=4"], check_paths=False)
    differences, _ = config_differences(text, cfg)
    assert differences == [
        "model.num_classes: checkpoint 80, config 4",
        "model.test.nms_iou: checkpoint 0.6, config 0.5",
        "data.test_transforms.scales: checkpoint [[1000, 600]], config [[1333, 800]]",
    ]


def test_later_layouts_resnext_and_unknown_text():
    # >= v2.5 keeps test_cfg inside model and names the NMS threshold iou_threshold.
    text = ("model = dict(backbone=dict(type='ResNeXt', depth=101, groups=32, base_width=4),\n"
            "             test_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), score_thr=0.05))\n")
    x101 = load_config(str(REPO / "configs/pisa/pisa_retinanet_x101_32x4d_fpn_1x_coco.yaml"), check_paths=False)
    assert config_differences(text, x101) == ([], 3)
    assert config_differences(text, load_config(PISA_R50, check_paths=False))[0] == [
        "model.backbone.type: checkpoint 'resnext101_32x4d', config 'resnet50'"]
    assert config_differences("not python at all (", x101) == ([], 0)
