"""RetinaNet head, criterion (baseline and PISA), builder and inference on a tiny ResNet-18 model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from pisa.config import load_config
from pisa.models import MODELS, build_model
from pisa.models.retina_head import RetinaHead, level_anchors

REPO = Path(__file__).resolve().parents[2]
PISA_CFG = REPO / "configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml"
NUM_CLASSES = 3


def tiny_cfg(*overrides: str, config: Path = PISA_CFG) -> dict:
    """The shipped config, shrunk: ResNet-18, 32-channel neck and head, 2 tower convs, 3 classes."""
    small = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", f"model.num_classes={NUM_CLASSES}",
             "model.neck.out_channels=32", "model.head.feat_channels=32", "model.head.stacked_convs=2"]
    return load_config(str(config), small + list(overrides), check_paths=False)


def tiny_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*overrides))


def _target(boxes, labels, img_shape, scale_factor=(1.0, 1.0)) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "ignore_boxes": torch.zeros(0, 4),
            "img_shape": img_shape, "scale_factor": scale_factor, "image_id": 0, "flip": False}


def batch_with_objects():
    """Two 64 x 96 images; several same-class positives per GT, so ISR-P ranks are non-trivial."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    targets = [_target([[8, 6, 48, 44], [40, 10, 90, 60], [2, 30, 30, 62]], [1, 1, 2], (64, 96)),
               _target([[20, 16, 60, 56]], [0], (60, 80))]
    return images, targets


def test_head_shapes_and_init():
    torch.manual_seed(0)
    head = RetinaHead(num_classes=80, in_channels=32, feat_channels=32, stacked_convs=4, num_anchors=9)
    assert torch.allclose(head.cls_logits.bias, torch.full((720,), -math.log(99.0)))  # -4.59512
    assert head.bbox_reg.bias.abs().max() == 0 and head.cls_convs[0].bias.abs().max() == 0
    assert abs(head.cls_convs[1].weight.std().item() - 0.01) < 1e-3
    cls_scores, bbox_preds = head([torch.randn(2, 32, 8, 12), torch.randn(2, 32, 4, 6)])
    assert [tuple(s.shape) for s in cls_scores] == [(2, 720, 8, 12), (2, 720, 4, 6)]
    assert [tuple(b.shape) for b in bbox_preds] == [(2, 36, 8, 12), (2, 36, 4, 6)]


def test_targets_are_consistent_per_image():
    """Positives carry their own image's GT label, index and encoded box; A = sum max(#pos, 1)."""
    model = tiny_model()
    images, targets = batch_with_objects()
    targets[1] = _target([], [], (60, 80))  # second image without objects
    cls_scores, _ = model.head(model.neck(model.backbone(images)))
    sizes, anchors = level_anchors(model.criterion.anchor_generator, cls_scores)
    t = model.criterion.get_targets(anchors, sizes, targets)
    per_image = sum(a.shape[0] for a in anchors)
    pos = torch.nonzero(t.labels < NUM_CLASSES).squeeze(1)
    assert pos.numel() >= 6 and bool((pos < per_image).all())  # every positive is in image 0
    assert t.avg_factor.item() == pos.numel() + 1
    assert torch.equal(t.img_inds, torch.arange(2).repeat_interleave(per_image))
    assert torch.equal(t.labels[pos], targets[0]["labels"][t.gt_inds[pos]])
    decoded = model.criterion.coder.decode(t.priors[pos], t.bbox_targets[pos])
    assert torch.allclose(decoded, targets[0]["boxes"][t.gt_inds[pos]], atol=1e-4)
    assert bool((t.gt_inds[t.labels == NUM_CLASSES] == -1).all())


def test_no_objects_golden_loss_and_attached_zero_box_losses():
    """Classifier weights zeroed: every logit is the prior bias, so p = 0.01 for every anchor and class.

    Each negative element costs (1 - a) p^g (-ln(1 - p)) = 0.75 * 1e-4 * 0.01005034 = 7.537752e-7.
    Batch 64 x 96; image 0 has img_shape 64 x 64, so only its anchors inside 64 x 64 are valid:
      image 0 valid locations 8*8 + 4*4 + 2*2 + 1*1 + 1*1 = 86  -> 774 anchors (A = 9),
      image 1 all locations  8*12 + 4*6 + 2*3 + 1*2 + 1*1 = 129 -> 1161 anchors.
    avg_factor = max(0, 1) + max(0, 1) = 2, so loss_cls = (774 + 1161) * 3 * 7.537752e-7 / 2 = 2.187832e-3.
    """
    model = tiny_model().train()
    with torch.no_grad():
        model.head.cls_logits.weight.zero_()
    images = torch.randn(2, 3, 64, 96)
    losses = model(images, [_target([], [], (64, 64)), _target([], [], (64, 96))])
    assert losses["loss_cls"].item() == pytest.approx(2.187832e-3, rel=1e-4)
    for name in ("loss_bbox", "loss_carl"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    sum(losses.values()).backward()
    # The zero box losses reach the regression branch: its gradient exists and is exactly zero.
    assert model.head.bbox_reg.weight.grad is not None
    assert model.head.bbox_reg.weight.grad.abs().max() == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_trainable_parameter_gets_a_gradient_in_a_pisa_step():
    model = tiny_model().train()
    images, targets = batch_with_objects()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_carl"}
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1.")) for n in frozen)


def test_pisa_adds_no_parameters():
    baseline, pisa = tiny_model("pisa=null"), tiny_model()
    assert {k: v.shape for k, v in baseline.state_dict().items()} == {k: v.shape for k, v in pisa.state_dict().items()}


def test_isr_p_keeps_loss_and_changes_gradient_carl_matches_bbox_at_init():
    """Against the baseline with the same weights (smooth L1 in both):

    * ISR-P rescales positive weights so their summed focal loss is unchanged (method doc §2.7):
      loss_cls is equal, but the gradient into the classifier differs;
    * loss_bbox is untouched; loss_carl is an extra term ~= loss_bbox at init, where every positive has
      p ~= 0.01 and hence CARL weight c ~= 1 (method doc §3, sanity check).
    """
    pisa = tiny_model().train()
    baseline = tiny_model("pisa=null").train()
    baseline.load_state_dict(pisa.state_dict())
    images, targets = batch_with_objects()
    pisa_losses, base_losses = pisa(images, targets), baseline(images, targets)
    assert "loss_carl" not in base_losses
    assert pisa_losses["loss_cls"].item() == pytest.approx(base_losses["loss_cls"].item(), rel=1e-5)
    assert pisa_losses["loss_bbox"].item() == pytest.approx(base_losses["loss_bbox"].item(), rel=1e-6)
    assert pisa_losses["loss_carl"].item() == pytest.approx(pisa_losses["loss_bbox"].item(), rel=1e-2)
    pisa_losses["loss_cls"].backward()
    base_losses["loss_cls"].backward()
    grad_pisa, grad_base = pisa.head.cls_logits.weight.grad, baseline.head.cls_logits.weight.grad
    assert not torch.allclose(grad_pisa, grad_base, rtol=1e-3, atol=0)


def test_l1_baseline_differs_from_smooth_l1():
    """The v2 baseline regresses with L1; smooth L1 (beta 0.11) is smaller for errors below beta."""
    l1 = tiny_model("pisa=null", "model.loss_bbox.type=l1").train()
    smooth = tiny_model("pisa=null").train()
    images, targets = batch_with_objects()
    assert l1(images, targets)["loss_bbox"].item() > smooth(images, targets)["loss_bbox"].item() > 0


def test_losses_are_fp32_under_autocast():
    model = tiny_model().train()
    images, targets = batch_with_objects()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_postprocess_golden_detection_in_original_coordinates():
    """One confident anchor: level 0 (stride 8), row 4, column 5, anchor 3 (ratio 1, scale 4), class 2.

    Anchor: centre (5 * 8, 4 * 8) = (40, 32), side 8 * 4 = 32 -> [24, 16, 56, 48]; zero deltas keep it.
    scale_factor (0.5, 0.25) maps it back to [24 / 0.5, 16 / 0.25, 56 / 0.5, 48 / 0.25] = [48, 64, 112, 192].
    """
    model = tiny_model("model.test.score_thr=0.5").eval()
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    cls_scores = [torch.full((1, 9 * NUM_CLASSES, h, w), -10.0) for h, w in sizes]
    cls_scores[0][0, 3 * NUM_CLASSES + 2, 4, 5] = 5.0
    bbox_preds = [torch.zeros(1, 36, h, w) for h, w in sizes]
    meta = {"img_shape": (64, 96), "scale_factor": (0.5, 0.25)}
    (det,) = model.postprocessor(cls_scores, bbox_preds, [meta])
    assert torch.allclose(det["boxes"], torch.tensor([[48.0, 64.0, 112.0, 192.0]]))
    assert det["labels"].tolist() == [2] and det["labels"].dtype == torch.int64
    assert det["scores"].item() == pytest.approx(1 / (1 + math.exp(-5.0)))


def test_eval_rescales_by_scale_factor():
    """The same image at two scale factors: detections differ exactly by the per-axis factor."""
    model = tiny_model("model.test.score_thr=0.0").eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (at_one,) = model(images, [{"img_shape": (64, 90), "scale_factor": (1.0, 1.0)}])
        (scaled,) = model(images, [{"img_shape": (64, 90), "scale_factor": (0.5, 0.25)}])
    assert at_one["boxes"].shape[0] == 100
    assert torch.allclose(scaled["boxes"], at_one["boxes"] / torch.tensor([0.5, 0.25, 0.5, 0.25]))
    assert torch.equal(scaled["labels"], at_one["labels"])
    # Clipped to img_shape (64 x 90) before rescaling.
    assert at_one["boxes"][:, 0::2].max() <= 90 and at_one["boxes"][:, 1::2].max() <= 64
    assert at_one["boxes"].min() >= 0


def test_unknown_model_type_lists_valid_names():
    valid = sorted(MODELS)
    assert {"retinanet", "faster_rcnn", "mask_rcnn", "ssd", "paa"} <= set(valid)
    with pytest.raises(ValueError, match=re.escape(f"valid names: {valid}")):
        build_model({"model": {"type": "yolo"}})
