"""Sampling-Free RetinaNet: bias initialisation (hand-countable toy data), guided loss scaling,
between-threshold anchors as negatives, adaptive test thresholds, config errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pisa.config import ConfigError, load_config
from pisa.models import build_model
from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.retina_head import RetinaNetLoss, level_anchors
from pisa.models.sampling_free import (SamplingFreeRetinaLoss, count_anchor_matches, guided_loss_scaling,
                                       prior_bias)

REPO = Path(__file__).resolve().parents[2]
BASE_CFG = REPO / "configs/retinanet/retinanet_r50_fpn_1x_coco.yaml"
NUM_CLASSES = 3
SF = ["model.loss_bbox.type=smooth_l1", "sampling_free={pi: 1.0e-5}"]


def tiny_cfg(*overrides: str) -> dict:
    small = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", f"model.num_classes={NUM_CLASSES}",
             "model.neck.out_channels=32", "model.head.feat_channels=32", "model.head.stacked_convs=2"]
    return load_config(str(BASE_CFG), small + list(overrides), check_paths=False)


def tiny_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*overrides))


def _target(boxes, labels, img_shape) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "ignore_boxes": torch.zeros(0, 4),
            "img_shape": img_shape, "scale_factor": (1.0, 1.0), "image_id": 0, "flip": False}


def _batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 96), [_target([[8, 6, 48, 44], [40, 10, 90, 60], [2, 30, 30, 62]], [1, 1, 2], (64, 96)),
                                       _target([[20, 16, 60, 56]], [0], (60, 80))]


def test_bias_prior_on_a_hand_countable_toy_dataset():
    """One 16 px anchor per 16 px cell, centres at (16x, 16y): anchor (x, y) = [16x-8, 16y-8, 16x+8, 16y+8].

    Image A, 32 x 48 (2 x 3 anchors), GT [10, 8, 40, 24] (30 x 16 = 480 px):
      anchor (2, 1) = [24, 8, 40, 24]: overlap 16 x 16 = 256, union 480 -> IoU 0.533 -> foreground;
      anchor (1, 1) = [8, 8, 24, 24]: overlap 14 x 16 = 224, union 512 -> IoU 0.4375, between 0.4 and
      0.5 -> excluded; the other 4 anchors do not overlap -> background.
    Image B, 32 x 32, no GT: 4 background. Image C, 32 x 32, GT [8, 8, 24, 24]: 1 foreground (IoU 1),
    3 background (they only touch it). Totals fg 2, bg 11; pi = (2 / 13) / C = 1/13 for C = 2.
    """
    generator = AnchorGenerator([16], [1.0], scales=[1.0])
    boxes = [torch.tensor([[10.0, 8, 40, 24]]), torch.zeros(0, 4), torch.tensor([[8.0, 8, 24, 24]])]
    count = count_anchor_matches(generator, MaxIoUAssigner(0.5, 0.4), [(32, 48), (32, 32), (32, 32)], boxes,
                                 [torch.zeros(0, 4)] * 3, num_classes=2, pad_divisor=16)
    assert (count.foreground, count.background, count.images) == (2, 11, 3)
    assert count.pi == pytest.approx(1 / 13)
    assert prior_bias(1e-5) == pytest.approx(-11.512915, abs=1e-6)  # -ln(99999)


def test_bias_script_prints_pi(tmp_path):
    """The explicit step: scripts/sampling_free_bias.py CONFIG prints the counts and pi (demo data, 3 images)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts/sampling_free_bias.py"),
                          str(REPO / "configs/demo/sampling_free_retinanet_r18_demo.yaml"), "--max-images", "3"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pi = " in out.stdout and "3 images" in out.stdout
    pi = float(out.stdout.split("pi = ")[1].split()[0])
    assert 0 < pi < 1


def test_guided_scaling_keeps_the_direction_and_takes_the_regression_magnitude():
    torch.manual_seed(0)
    logits = torch.randn(50, 4, requires_grad=True)
    targets = (torch.rand(50, 4) < 0.1).float()
    loss_cls = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 7
    loss_reg = torch.tensor(0.37)
    (plain_grad,) = torch.autograd.grad(loss_cls, logits, retain_graph=True)
    scaled = guided_loss_scaling(loss_cls, loss_reg)
    (scaled_grad,) = torch.autograd.grad(scaled, logits)
    assert scaled.item() == pytest.approx(0.37)
    ratio = 0.37 / loss_cls.item()
    assert torch.allclose(scaled_grad, ratio * plain_grad, rtol=1e-5, atol=1e-9)
    cosine = torch.nn.functional.cosine_similarity(scaled_grad.flatten(), plain_grad.flatten(), dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)
    # Degenerate inputs give zeros, never NaN.
    assert guided_loss_scaling(torch.tensor(0.0), torch.tensor(1.0)).item() == 0.0


def test_model_losses_bias_and_test_thresholds():
    model = tiny_model(*SF).train()
    assert isinstance(model.criterion, SamplingFreeRetinaLoss)
    assert torch.allclose(model.head.cls_logits.bias, torch.full_like(model.head.cls_logits.bias, prior_bias(1e-5)))
    # Adaptive threshold pi * (K + 1) and NMS 0.55 (COCO: 1e-5 * 81 = 8.1e-4).
    assert model.postprocessor.score_thr == pytest.approx(1e-5 * (NUM_CLASSES + 1))
    assert model.postprocessor.nms_iou == 0.55
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox"}
    assert losses["loss_cls"].item() == pytest.approx(losses["loss_bbox"].item(), rel=1e-6)
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    # The classifier's gradient is the plain BCE gradient times L_reg / L_cls.
    model.zero_grad()
    features = model.neck(model.backbone(images))
    cls_scores, bbox_preds = model.head(features)
    plain_cls, plain_reg = model.criterion.plain_losses(cls_scores, bbox_preds, targets)
    (g_plain,) = torch.autograd.grad(plain_cls, model.head.cls_logits.weight, retain_graph=True)
    (g_guided,) = torch.autograd.grad(guided_loss_scaling(plain_cls, plain_reg), model.head.cls_logits.weight)
    assert torch.allclose(g_guided, g_plain * (plain_reg / plain_cls).item(), rtol=1e-4, atol=1e-12)


def test_plain_bce_normaliser_golden_and_empty_images():
    """Classifier weights zeroed: every element has p = pi = 1e-5 and BCE -ln(1 - 1e-5) = 1.000005e-5.
    Two 64 x 96 images without GT: 2 x 1161 anchors x 3 classes; normaliser #pos + #images = 2:
    plain loss_cls = 6966 x 1.000005e-5 / 2 = 0.0348302. No positive -> L_reg = 0 -> the guided
    loss_cls is 0 (as in the authors' code), both attached to the graph."""
    model = tiny_model(*SF).train()
    with torch.no_grad():
        model.head.cls_logits.weight.zero_()
    images = torch.randn(2, 3, 64, 96)
    targets = [_target([], [], (64, 96)), _target([], [], (64, 96))]
    cls_scores, bbox_preds = model.head(model.neck(model.backbone(images)))
    plain_cls, plain_reg = model.criterion.plain_losses(cls_scores, bbox_preds, targets)
    assert plain_cls.item() == pytest.approx(0.0348302, rel=1e-5) and plain_reg.item() == 0.0
    losses = model(images, targets)
    assert losses["loss_cls"].item() == 0.0 and losses["loss_bbox"].item() == 0.0
    assert losses["loss_cls"].requires_grad and losses["loss_bbox"].requires_grad
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_between_threshold_anchors_are_negatives():
    """The baseline ignores anchors with max IoU in [0.4, 0.5); Sampling-Free trains them as negatives."""
    base, sf = tiny_model(), tiny_model(*SF)
    images, targets = _batch()
    cls_scores, _ = base.head(base.neck(base.backbone(images)))
    sizes, anchors = level_anchors(base.criterion.anchor_generator, cls_scores)
    t_base = base.criterion.get_targets(anchors, sizes, targets)
    t_sf = sf.criterion.get_targets(anchors, sizes, targets)
    ignored = (t_base.label_weights == 0) & (t_sf.label_weights > 0)
    assert ignored.sum() > 0 and bool((t_sf.labels[ignored] == NUM_CLASSES).all())
    assert torch.equal(t_base.labels < NUM_CLASSES, t_sf.labels < NUM_CLASSES)  # same positives
    padded = t_base.label_weights == 0
    assert torch.equal(padded & ~ignored, t_sf.label_weights == 0)  # invalid anchors stay out


def test_absent_block_keeps_the_retinanet_criterion():
    model = tiny_model()
    assert type(model.criterion) is RetinaNetLoss
    assert (model.postprocessor.score_thr, model.postprocessor.nms_iou) == (0.05, 0.5)
    assert model.head.cls_logits.bias[0].item() == pytest.approx(-math.log(99))


def test_config_errors():
    with pytest.raises(ConfigError, match="'pisa' and 'sampling_free'"):
        build_model(tiny_cfg(*SF, "pisa={isr_p: {k: 2.0, bias: 0.0}}"))
    with pytest.raises(ConfigError, match="smooth_l1"):
        build_model(tiny_cfg("sampling_free={pi: 1.0e-5}"))
    with pytest.raises(ConfigError, match="sampling_free.pi"):
        tiny_cfg("model.loss_bbox.type=smooth_l1", "sampling_free={pi: 0}")
