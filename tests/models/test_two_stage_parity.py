"""End to end against torchvision: its ``FasterRCNN`` (and ``MaskRCNN``) around pisa's own backbone, FPN and (copied) head
weights detects what pisa's Faster R-CNN detects, once the documented differences are handed over.

What differs between the two, each neutralised explicitly here (and nothing else is):

1. anchors: torchvision rounds its base anchors; it is given pisa's (unrounded) anchors;
2. RoI pooling: torchvision's ``MultiScaleRoIAlign`` uses ``aligned=False``, 2 samples per bin and
   levels inferred from the feature sizes; it is given pisa's pooler (``aligned=True``, adaptive);
3. proposal size filter: torchvision drops proposals under 1e-3 px, the reference keeps every size;
   its ``rpn.min_size`` is set to 0;
4. class order: torchvision's background is class 0 and it predicts background deltas; the weights
   are permuted and its background rows are zero (never used);
5. detection size filter: torchvision drops detections under 1e-2 px after decoding; the test checks
   that no detection is that small, so the filter removes nothing.

The input is not resized (``min_size`` / ``max_size`` = the image's sides, mean 0, std 1): its
transform is then the identity.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from pisa.benchmark import calibrate_rpn
from pisa.models.roi_heads import boxes_to_rois

from test_two_stage import tiny_model  # the shared tiny configs

NUM_CLASSES = 3


class _PisaFeatures(nn.Module):
    """pisa's backbone + FPN as a torchvision detection backbone (P2..P6 as an ordered dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_channels = model.rpn.head.rpn_conv.in_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return OrderedDict((str(i), f) for i, f in enumerate(self.model.neck(self.model.backbone(images))))


class _PisaAnchors(nn.Module):
    def __init__(self, generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, images, features: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in features]
        return [self.generator.anchors(sizes, device=features[0].device)] * features[0].shape[0]


class _PisaPool(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, features: OrderedDict, proposals: list[torch.Tensor], image_shapes) -> torch.Tensor:
        return self.pool(list(features.values()), boxes_to_rois(proposals))


def _torchvision_twin(model: nn.Module, height: int, width: int) -> FasterRCNN:
    rpn, roi = model.rpn, model.roi_head
    test = roi.test
    fc = roi.bbox_head.fc_cls.in_features
    box_head = TwoMLPHead(roi.bbox_head.shared_fcs[0].in_features, fc)
    tv = FasterRCNN(_PisaFeatures(model), None, min_size=height, max_size=width,
                    image_mean=[0.0] * 3, image_std=[1.0] * 3,
                    rpn_pre_nms_top_n_test=rpn.test_proposals.nms_pre,
                    rpn_post_nms_top_n_test=rpn.test_proposals.max_per_img,
                    rpn_nms_thresh=rpn.test_proposals.nms_iou, box_score_thresh=test.score_thr,
                    box_nms_thresh=test.nms_iou, box_detections_per_img=test.max_per_img,
                    box_head=box_head, box_predictor=FastRCNNPredictor(fc, NUM_CLASSES + 1))
    tv.rpn.anchor_generator = _PisaAnchors(rpn.anchor_generator)
    tv.rpn.min_size = 0.0
    tv.roi_heads.box_roi_pool = _PisaPool(roi.bbox_roi_pool)
    c = NUM_CLASSES
    order = torch.cat([torch.tensor([c]), torch.arange(c)])  # background first
    with torch.no_grad():
        tv.rpn.head.conv[0][0].load_state_dict(rpn.head.rpn_conv.state_dict())
        tv.rpn.head.cls_logits.load_state_dict(rpn.head.rpn_cls.state_dict())
        tv.rpn.head.bbox_pred.load_state_dict(rpn.head.rpn_reg.state_dict())
        tv.roi_heads.box_head.fc6.load_state_dict(roi.bbox_head.shared_fcs[0].state_dict())
        tv.roi_heads.box_head.fc7.load_state_dict(roi.bbox_head.shared_fcs[1].state_dict())
        tv.roi_heads.box_predictor.cls_score.weight.copy_(roi.bbox_head.fc_cls.weight[order])
        tv.roi_heads.box_predictor.cls_score.bias.copy_(roi.bbox_head.fc_cls.bias[order])
        tv.roi_heads.box_predictor.bbox_pred.weight.zero_()
        tv.roi_heads.box_predictor.bbox_pred.bias.zero_()
        tv.roi_heads.box_predictor.bbox_pred.weight[4:].copy_(roi.bbox_head.fc_reg.weight)
        tv.roi_heads.box_predictor.bbox_pred.bias[4:].copy_(roi.bbox_head.fc_reg.bias)
    return tv.eval()


@pytest.mark.parametrize("pisa", [False, True])
def test_detections_match_torchvision_faster_rcnn_with_the_differences_handed_over(pisa):
    height, width = 64, 96
    model = tiny_model("faster", pisa=pisa, seed=3)
    torch.manual_seed(4)
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        calibrate_rpn(model, images)  # realistic proposals from random weights
        head = model.roi_head.bbox_head
        head.fc_cls.weight.normal_(std=0.5)  # peaked class scores: some pass the 0.05 threshold
        head.fc_cls.bias.copy_(torch.tensor([0.0, 0.5, 1.0, 2.0]))
        head.fc_reg.weight.normal_(std=0.01)
    model.eval()
    tv = _torchvision_twin(model, height, width)
    metas = [{"img_shape": (height, width), "ori_shape": (height, width), "scale_factor": (1.0, 1.0)}] * 2
    with torch.no_grad():
        ours = model(images, metas)
        theirs = tv(list(images))
    for mine, tvs in zip(ours, theirs):
        assert 20 <= mine["boxes"].shape[0] <= 100  # a real test: many detections, not an empty match
        sides = mine["boxes"][:, 2:] - mine["boxes"][:, :2]
        assert sides.min() > 1e-2  # torchvision's detection size filter removes nothing here
        assert torch.equal(mine["labels"], tvs["labels"] - 1)
        torch.testing.assert_close(mine["scores"], tvs["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine["boxes"], tvs["boxes"], rtol=1e-5, atol=1e-4)
    assert not torch.equal(ours[0]["boxes"], ours[1]["boxes"])


def test_mask_rcnn_detections_and_mask_logits_match_torchvision_mask_rcnn():
    """torchvision's ``MaskRCNN`` around the same features, with the box differences handed over as
    above and pisa's 14x14 pooler: same detections, and on them the same mask logits (its background
    channel dropped). Pasting into the image differs on purpose (pisa pastes with ``grid_sample`` as the
    reference, torchvision with its own resize), so pasted masks are not compared."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    height, width = 64, 96
    model = tiny_model("mask", pisa=False, seed=5)
    torch.manual_seed(6)
    images = torch.randn(2, 3, height, width)
    roi = model.roi_head
    with torch.no_grad():
        calibrate_rpn(model, images)
        roi.bbox_head.fc_cls.weight.normal_(std=0.5)
        roi.bbox_head.fc_cls.bias.copy_(torch.tensor([1.0, 0.5, 0.0, -1.0]))  # background last
        for p in roi.mask_head.parameters():
            p.normal_(std=0.1)
    model.eval()
    box_twin = _torchvision_twin(model, height, width)
    mask = roi.mask_head
    channels = mask.convs[0].in_channels
    widths = [c.out_channels for c in mask.convs]
    tv = MaskRCNN(box_twin.backbone, None, min_size=height, max_size=width, image_mean=[0.0] * 3,
                  image_std=[1.0] * 3, box_head=box_twin.roi_heads.box_head,
                  box_predictor=box_twin.roi_heads.box_predictor, mask_head=MaskRCNNHeads(channels, widths, 1),
                  mask_predictor=MaskRCNNPredictor(widths[-1], mask.upsample.out_channels, NUM_CLASSES + 1))
    tv.rpn = box_twin.rpn  # pisa's anchors, no size filter, the copied RPN head
    heads = tv.roi_heads
    heads.box_roi_pool, heads.mask_roi_pool = box_twin.roi_heads.box_roi_pool, _PisaPool(roi.mask_roi_pool)
    heads.score_thresh, heads.nms_thresh = box_twin.roi_heads.score_thresh, box_twin.roi_heads.nms_thresh
    heads.detections_per_img = box_twin.roi_heads.detections_per_img
    with torch.no_grad():
        for i, conv in enumerate(mask.convs):
            tv.roi_heads.mask_head[i][0].load_state_dict(conv.state_dict())
        tv.roi_heads.mask_predictor.conv5_mask.load_state_dict(mask.upsample.state_dict())
        logits = tv.roi_heads.mask_predictor.mask_fcn_logits
        logits.weight.zero_(), logits.bias.zero_()
        logits.weight[1:].copy_(mask.conv_logits.weight)
        logits.bias[1:].copy_(mask.conv_logits.bias)
    tv.eval()
    metas = [{"img_shape": (height, width), "ori_shape": (height, width), "scale_factor": (1.0, 1.0)}] * 2
    with torch.no_grad():
        ours = model(images, metas)
        theirs = tv(list(images))
        features = model.neck(model.backbone(images))
        tv_features = tv.backbone(images)
        for i, (mine, tvs) in enumerate(zip(ours, theirs)):
            assert 20 <= mine["boxes"].shape[0] <= 100
            assert torch.equal(mine["labels"], tvs["labels"] - 1)
            torch.testing.assert_close(mine["scores"], tvs["scores"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine["boxes"], tvs["boxes"], rtol=1e-5, atol=1e-4)
            assert mine["masks"].shape == (mine["boxes"].shape[0], height, width)
            rois = boxes_to_rois([torch.zeros(0, 4)] * i + [mine["boxes"]])
            ours_logits = roi.mask_forward(features, rois)
            tv_logits = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(
                tv.roi_heads.mask_roi_pool(tv_features, [torch.zeros(0, 4)] * i + [tvs["boxes"]], None)))
            torch.testing.assert_close(ours_logits, tv_logits[:, 1:], rtol=1e-4, atol=1e-5)
