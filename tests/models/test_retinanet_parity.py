"""Parity with torchvision's RetinaNet where the architectures coincide.

Both detectors get the same random weights (ResNet-18 trunk, FPN, 4-conv towers) and the same normalised
input, bypassing torchvision's ``GeneralizedRCNNTransform``. Inherent differences, and how the test
neutralises them:

* torchvision's ``LastLevelP6P7`` applies a ReLU to P6 before the P7 conv; the reference (and pisa)
  does not. The P6 input matches: torchvision reads C5 when its channels differ from the FPN width, as
  here (512 != 32). The test swaps in a ReLU-free P6/P7 block for the full comparison and checks that,
  with torchvision's own block, only P7 differs.
* torchvision rounds (and truncates) its anchor sizes; both post-processors are fed pisa's anchors.
* torchvision keeps the top-k (anchor, class) pairs per level after the score threshold, pisa (like the
  reference) the top ``nms_pre`` anchors by max-class score before it. With both limits far above the
  candidate count neither binds, and the candidate sets coincide.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead as TVRetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pisa.config import load_config
from pisa.models import build_model
from pisa.models.retina_head import flatten_levels, level_anchors

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES, WIDTH = 3, 32
SCORE_THR = 0.5


class P6P7WithoutReLU(LastLevelP6P7):
    """torchvision's extra block with the reference's convention: P7 = conv(P6), no ReLU in between."""

    def forward(self, p, c, names):
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        return p + [p6, self.p7(p6)], names + ["p6", "p7"]


def pisa_to_torchvision_name(name: str) -> str:
    """pisa state-dict key -> torchvision RetinaNet key (conv wrappers of torchvision add a ``.0``)."""
    rules = [("backbone.", "backbone.body."),
             ("neck.lateral_convs.", "backbone.fpn.inner_blocks."),
             ("neck.output_convs.", "backbone.fpn.layer_blocks."),
             ("neck.p6_conv.", "backbone.fpn.extra_blocks.p6."),
             ("neck.p7_conv.", "backbone.fpn.extra_blocks.p7."),
             ("head.cls_convs.", "head.classification_head.conv."),
             ("head.reg_convs.", "head.regression_head.conv."),
             ("head.cls_logits.", "head.classification_head.cls_logits."),
             ("head.bbox_reg.", "head.regression_head.bbox_reg.")]
    for src, dst in rules:
        if name.startswith(src):
            rest = name[len(src):]
            if src.endswith("_convs.") and "." in rest:  # "i.weight" -> "i.0.weight"
                index, param = rest.split(".", 1)
                rest = f"{index}.0.{param}"
            return dst + rest
    raise KeyError(name)


def build_pair(extra_block=P6P7WithoutReLU):
    cfg = load_config(str(REPO / "configs/retinanet/retinanet_r50_fpn_1x_coco.yaml"), [
        "model.backbone.type=resnet18", "model.backbone.pretrained=null", f"model.num_classes={NUM_CLASSES}",
        f"model.neck.out_channels={WIDTH}", f"model.head.feat_channels={WIDTH}", "model.head.stacked_convs=4",
        f"model.test.score_thr={SCORE_THR}", "model.test.nms_pre=1000000",
        # torchvision keeps boxes clipped to zero size (so did mmdetection v2); pisa drops them by default
        "model.test.min_bbox_size=-1"], check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics and classifier biases (some scores above 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        # Wider head weights than the 0.01 init: scores and deltas spread out, so no two detections
        # tie in score (their order would be implementation-defined) and boxes move visibly.
        for conv in [*model.head.cls_convs, *model.head.reg_convs, model.head.cls_logits, model.head.bbox_reg]:
            conv.weight.normal_(std=0.05)
        model.head.cls_logits.bias.uniform_(-1.0, 0.5)
    fpn_backbone = BackboneWithFPN(torchvision.models.resnet18(weights=None),
                                   {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], WIDTH,
                                   extra_blocks=extra_block(512, WIDTH))
    tv = TVRetinaNet(fpn_backbone, NUM_CLASSES, head=TVRetinaNetHead(WIDTH, 9, NUM_CLASSES),
                     score_thresh=SCORE_THR, nms_thresh=0.5, detections_per_img=100, topk_candidates=1000000).eval()
    state = {pisa_to_torchvision_name(k): v for k, v in model.state_dict().items()}
    tv.load_state_dict(state, strict=True)
    return model, tv


def test_name_mapping_covers_both_models():
    model, tv = build_pair()
    assert {pisa_to_torchvision_name(k) for k in model.state_dict()} == set(tv.state_dict())


def test_features_and_head_outputs_match_torchvision():
    model, tv = build_pair()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        feats = model.neck(model.backbone(images))
        tv_feats = list(tv.backbone(images).values())
        cls_scores, bbox_preds = model.head(feats)
        tv_out = tv.head(tv_feats)
    for ours, theirs in zip(feats, tv_feats):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(flatten_levels(cls_scores, NUM_CLASSES), tv_out["cls_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(flatten_levels(bbox_preds, 4), tv_out["bbox_regression"], rtol=0, atol=1e-5)


def test_torchvision_default_extra_block_differs_only_at_p7():
    """With torchvision's own LastLevelP6P7 (ReLU before P7), P3-P6 agree and P7 does not."""
    model, tv = build_pair(extra_block=LastLevelP6P7)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = model.neck(model.backbone(images))
        tv_feats = list(tv.backbone(images).values())
    for ours, theirs in zip(feats[:4], tv_feats[:4]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(feats[4], tv_feats[4], atol=1e-3)
    torch.testing.assert_close(tv_feats[4], model.neck.p7_conv(F.relu(feats[3])), rtol=0, atol=1e-5)


def test_detections_match_torchvision_with_the_same_anchors():
    model, tv = build_pair()
    torch.manual_seed(2)
    images = torch.randn(1, 3, 96, 128)
    img_shape = (90, 120)  # clip inside the padded tensor, as for a real resized image
    with torch.no_grad():
        feats = model.neck(model.backbone(images))
        cls_scores, bbox_preds = model.head(feats)
        (ours,) = model.postprocessor(cls_scores, bbox_preds, [{"img_shape": img_shape, "scale_factor": (1.0, 1.0)}])
        _, anchors = level_anchors(model.postprocessor.anchor_generator, cls_scores)
        sizes = [a.shape[0] for a in anchors]
        head_out = {"cls_logits": list(flatten_levels(cls_scores, NUM_CLASSES).split(sizes, dim=1)),
                    "bbox_regression": list(flatten_levels(bbox_preds, 4).split(sizes, dim=1))}
        (theirs,) = tv.postprocess_detections(head_out, [anchors], [img_shape])
    assert ours["boxes"].shape[0] == 100  # enough detections for the comparison to mean something
    assert ours["scores"].unique().numel() == 100  # no ties, so the order is well defined
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(ours["labels"], theirs["labels"])
