"""Faster / Mask R-CNN: builders, state-dict layout, train step, eval forward, gradients, PISA switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pisa.config import load_config
from pisa.models import MODELS, build_model
from pisa.models.samplers import RandomSampler, ScoreHLRSampler
from pisa.models.two_stage import TwoStageDetector

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 3
CONFIGS = {
    ("faster", False): "configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yaml",
    ("faster", True): "configs/pisa/pisa_faster_rcnn_r50_fpn_1x_coco.yaml",
    ("mask", False): "configs/mask_rcnn/mask_rcnn_r50_fpn_1x_coco.yaml",
    ("mask", True): "configs/pisa/pisa_mask_rcnn_r50_fpn_1x_coco.yaml",
}


def tiny_cfg(kind: str = "faster", pisa: bool = True, *overrides: str) -> dict:
    """A shipped config shrunk to ResNet-18, 16-channel FPN/RPN, 32-wide FCs, few proposals and RoIs."""
    small = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", f"model.num_classes={NUM_CLASSES}",
             "model.neck.out_channels=16", "model.rpn.feat_channels=16", "model.roi_head.fc_channels=32",
             "model.roi_head.sampler.num=64", "model.rpn.train={nms_pre: 200, max_per_img: 100}",
             "model.rpn.test={nms_pre: 200, max_per_img: 100}", "model.rpn.anchors.scales=[4.0]"]
    if kind == "mask":
        small += ["model.roi_head.mask.conv_channels=8", "model.roi_head.mask.num_convs=2"]
    return load_config(str(REPO / CONFIGS[(kind, pisa)]), small + list(overrides), check_paths=False)


def tiny_model(kind: str = "faster", pisa: bool = True, seed: int = 0) -> TwoStageDetector:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(kind, pisa))


def _target(boxes, labels, img_shape=(64, 96), masks: bool = False) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    t = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "ignore_boxes": torch.zeros(0, 4),
         "img_shape": img_shape, "ori_shape": img_shape, "scale_factor": (1.0, 1.0), "image_id": 0,
         "flip": False}
    if masks:
        m = torch.zeros(len(boxes), *img_shape, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            m[i, y1:y2, x1:x2] = 1
        t["masks"] = m
    return t


def batch(masks: bool = False, empty: bool = False):
    """Two 64 x 96 images (the second one 60 x 80 inside the padding)."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    if empty:
        return images, [_target([], [], masks=masks), _target([], [], (60, 80), masks=masks)]
    return images, [_target([[8, 6, 48, 44], [40, 10, 90, 60], [2, 30, 30, 62]], [1, 1, 2], masks=masks),
                    _target([[20, 16, 60, 56]], [0], (60, 80), masks=masks)]


def test_builders_are_registered_and_pisa_picks_the_score_hlr_sampler():
    assert {"faster_rcnn", "mask_rcnn"} <= set(MODELS)
    baseline, pisa = tiny_model(pisa=False), tiny_model(pisa=True)
    assert type(baseline.roi_head.sampler) is RandomSampler and type(pisa.roi_head.sampler) is ScoreHLRSampler
    assert baseline.roi_head.isr_p is None and baseline.roi_head.carl is None
    assert pisa.roi_head.isr_p is not None and pisa.roi_head.carl is not None
    assert pisa.roi_head.bbox_loss == "smooth_l1" and baseline.roi_head.bbox_loss == "l1"
    assert not tiny_model("faster").roi_head.with_mask and tiny_model("mask").roi_head.with_mask
    # Mask R-CNN's R-CNN assigner rescues low-quality matches, Faster R-CNN's does not (method doc §5.4).
    assert tiny_model("mask").roi_head.assigner.match_low_quality
    assert not tiny_model("faster").roi_head.assigner.match_low_quality


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_pisa_adds_no_parameters(kind):
    baseline, pisa = tiny_model(kind, pisa=False), tiny_model(kind, pisa=True)
    assert {k: v.shape for k, v in baseline.state_dict().items()} == {k: v.shape for k, v in pisa.state_dict().items()}


def reference_layout(num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Neck and head keys of the reference Mask R-CNN R-50-FPN (method doc §7.4, mmdet-keys
    mask_rcnn_r50_fpn.tsv), renamed as issue 8 fixes: ``.conv.`` dropped, ``rpn_head`` -> ``rpn.head``,
    ``neck.fpn_convs`` -> ``neck.output_convs``."""
    keys = {}
    for i, c in enumerate((256, 512, 1024, 2048)):
        keys[f"neck.lateral_convs.{i}.weight"], keys[f"neck.lateral_convs.{i}.bias"] = (256, c, 1, 1), (256,)
        keys[f"neck.output_convs.{i}.weight"], keys[f"neck.output_convs.{i}.bias"] = (256, 256, 3, 3), (256,)
    keys.update({"rpn.head.rpn_conv.weight": (256, 256, 3, 3), "rpn.head.rpn_conv.bias": (256,),
                 "rpn.head.rpn_cls.weight": (3, 256, 1, 1), "rpn.head.rpn_cls.bias": (3,),
                 "rpn.head.rpn_reg.weight": (12, 256, 1, 1), "rpn.head.rpn_reg.bias": (12,),
                 "roi_head.bbox_head.fc_cls.weight": (num_classes + 1, 1024),
                 "roi_head.bbox_head.fc_cls.bias": (num_classes + 1,),
                 "roi_head.bbox_head.fc_reg.weight": (4 * num_classes, 1024),
                 "roi_head.bbox_head.fc_reg.bias": (4 * num_classes,),
                 "roi_head.bbox_head.shared_fcs.0.weight": (1024, 256 * 7 * 7),
                 "roi_head.bbox_head.shared_fcs.0.bias": (1024,),
                 "roi_head.bbox_head.shared_fcs.1.weight": (1024, 1024),
                 "roi_head.bbox_head.shared_fcs.1.bias": (1024,)})
    for i in range(4):
        keys[f"roi_head.mask_head.convs.{i}.weight"] = (256, 256, 3, 3)
        keys[f"roi_head.mask_head.convs.{i}.bias"] = (256,)
    keys.update({"roi_head.mask_head.upsample.weight": (256, 256, 2, 2), "roi_head.mask_head.upsample.bias": (256,),
                 "roi_head.mask_head.conv_logits.weight": (num_classes, 256, 1, 1),
                 "roi_head.mask_head.conv_logits.bias": (num_classes,)})
    return keys


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_r50_state_dict_is_the_reference_layout(kind):
    """Built on the meta device (no memory); backbone keys are checked by the backbone tests."""
    cfg = load_config(str(REPO / CONFIGS[(kind, True)]), ["model.backbone.pretrained=null", "model.num_classes=80"],
                      check_paths=False)
    with torch.device("meta"):
        model = build_model(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    expected = {k: s for k, s in reference_layout().items() if kind == "mask" or ".mask_head." not in k}
    assert ours == expected


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_train_step_gives_finite_losses_and_every_parameter_a_gradient(kind):
    model = tiny_model(kind, pisa=True).train()
    images, targets = batch(masks=kind == "mask")
    losses = model(images, targets)
    expected = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_carl"}
    assert set(losses) == expected | ({"loss_mask"} if kind == "mask" else set())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_images_without_objects_give_attached_zero_box_losses(kind):
    model = tiny_model(kind, pisa=True).train()
    images, targets = batch(masks=kind == "mask", empty=True)
    losses = model(images, targets)
    zero = ["loss_rpn_bbox", "loss_bbox", "loss_carl"] + (["loss_mask"] if kind == "mask" else [])
    for key in zero:
        assert losses[key].item() == 0.0 and losses[key].requires_grad, key
    assert losses["loss_cls"].item() > 0 and losses["loss_rpn_cls"].item() > 0
    sum(losses.values()).backward()
    assert model.roi_head.bbox_head.fc_reg.weight.grad.abs().max() == 0


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_eval_forward_returns_detections_in_original_image_coordinates(kind):
    model = tiny_model(kind, pisa=True).eval()
    model.roi_head.test = type(model.roi_head.test)(score_thr=0.0, nms_iou=0.5, max_per_img=10)
    images, targets = batch()
    targets[1]["scale_factor"], targets[1]["ori_shape"] = (2.0, 2.0), (30, 40)
    with torch.no_grad():
        detections = model(images, targets)
    assert len(detections) == 2
    for det, (h, w) in zip(detections, [(64, 96), (30, 40)]):
        d = det["boxes"].shape[0]
        assert 0 < d <= 10 and det["scores"].shape == (d,) and det["labels"].dtype == torch.int64
        assert bool((det["boxes"][:, 0::2] <= w + 1e-4).all()) and bool((det["boxes"][:, 1::2] <= h + 1e-4).all())
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        if kind == "mask":
            assert det["masks"].shape == (d, h, w) and det["masks"].dtype == torch.bool
        else:
            assert "masks" not in det
