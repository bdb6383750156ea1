"""Parity with torchvision's ``ssd300_vgg16`` where the architectures coincide.

Both models get the same random weights and the same input, bypassing torchvision's
``GeneralizedRCNNTransform``. Where they differ by design, and how the test handles it:

* **Background column.** torchvision's softmax puts background at index 0, the reference (and pisa)
  last; the classifier's output channels are permuted when copying (``a·(C+1) + c``, per anchor).
* **Module layout.** torchvision splits the trunk into ``features`` (up to conv4_3), ``extra[0]``
  (pool4, conv5_x, pool5, conv6, conv7) and four extra blocks; pisa keeps the reference's flat
  ``features`` / ``extra`` indices. Every conv maps one to one.
* **Pools.** torchvision sets ``ceil_mode`` on pool3 only, the reference on every 2x2 pool. At 300x300
  only pool3 sees an odd size (75), so the maps agree.
* **L2 norm.** torchvision divides by ``max(‖x‖, 1e-12)``, the reference by ``‖x‖ + 1e-10``: equal to
  float32 precision on real features.
* **Anchors.** torchvision's ``DefaultBoxGenerator`` clamps anchor widths and heights to the image
  (its ``clip=True``), the reference does not; its sizes come from scales 0.07, 0.15, 0.33, ... which
  give the same 21, 45, 99, 153, 207, 261, 315 px at 300, and its order within a location is the
  same. Anchors agree exactly where no side exceeds 300 px.
* **Loss.** Both divide by the number of positives (the reference by ``Σ_img max(#pos_img, 1)``, equal
  when every image has a positive); the loss is compared with torchvision's ``compute_loss`` fed pisa's
  anchors and matches.
* **Post-processing** differs (torchvision: per-class top-400 after a 0.01 threshold; the reference:
  0.02, no top-k) and is not compared.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD as TVSSD
from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
from torchvision.models.detection.ssd import SSDHead as TVSSDHead
from torchvision.models.vgg import cfgs, make_layers

from pisa.config import validate
from pisa.models import build_model
from pisa.models.box_coder import box_iou
from pisa.models.retina_head import flatten_levels

pytestmark = pytest.mark.slow  # two full-size VGG16s at 300x300: a few seconds

NUM_CLASSES = 4  # foreground classes; both heads predict 5 scores per anchor


def _class_permutation(num_anchors: int) -> torch.Tensor:
    """pisa channel ``a·(C+1) + c`` (background last) <- torchvision channel ``a·(C+1) + (c+1) mod (C+1)``."""
    k = NUM_CLASSES + 1
    per_anchor = torch.tensor([(c + 1) % k for c in range(k)])
    return torch.cat([a * k + per_anchor for a in range(num_anchors)])


def copy_torchvision_weights(tv, model) -> None:
    """Load torchvision's random weights into the pisa SSD300 (every tensor is overwritten)."""
    tvb, tvs = tv.backbone, tv.state_dict()
    ours = {}
    for j, layer in enumerate(tvb.features):
        if isinstance(layer, torch.nn.Conv2d):
            ours[f"backbone.features.{j}"] = layer
    block0 = tvb.extra[0]
    for k in (1, 3, 5):  # conv5_1..conv5_3 after pool4 (index 23)
        ours[f"backbone.features.{23 + k}"] = block0[k]
    ours["backbone.features.31"], ours["backbone.features.33"] = block0[7][1], block0[7][3]
    for n in range(1, 5):
        ours[f"backbone.extra.{2 * (n - 1)}"] = tvb.extra[n][0]
        ours[f"backbone.extra.{2 * (n - 1) + 1}"] = tvb.extra[n][2]
    state = {}
    for name, conv in ours.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = conv.weight.detach(), conv.bias.detach()
    state["backbone.l2_norm.weight"] = tvb.scale_weight.detach()
    for level, a in enumerate([4, 6, 6, 6, 4, 4]):
        perm = _class_permutation(a)
        state[f"head.cls_convs.{level}.weight"] = tvs[f"head.classification_head.module_list.{level}.weight"][perm]
        state[f"head.cls_convs.{level}.bias"] = tvs[f"head.classification_head.module_list.{level}.bias"][perm]
        state[f"head.reg_convs.{level}.weight"] = tvs[f"head.regression_head.module_list.{level}.weight"]
        state[f"head.reg_convs.{level}.bias"] = tvs[f"head.regression_head.module_list.{level}.bias"]
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    # What ssd300_vgg16(weights=None, weights_backbone=None) builds, without the VGG classifier it drops.
    trunk = SSDFeatureExtractorVGG(make_layers(cfgs["D"]), highres=False)
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                  scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    head = TVSSDHead([512, 1024, 512, 256, 256, 256], anchors.num_anchors_per_location(), NUM_CLASSES + 1)
    tv = TVSSD(trunk, anchors, (300, 300), NUM_CLASSES + 1, head=head).eval()
    cfg = validate({"model": {"type": "ssd", "num_classes": NUM_CLASSES},
                    "data": {"train": {"type": "synthetic"}, "val": {"type": "synthetic"}},
                    "train": {"work_dir": "unused"}}, check_paths=False)
    model = build_model(cfg).eval()
    copy_torchvision_weights(tv, model)
    return tv, model


@pytest.fixture(scope="module")
def outputs(models):
    tv, model = models
    image = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        tv_feats = list(tv.backbone(image).values())
        tv_head = tv.head(tv_feats)
        feats = model.backbone(image)
        cls, reg = model.head(feats)
    return tv_feats, tv_head, feats, cls, reg


def test_feature_maps_match(outputs):
    tv_feats, _, feats, _, _ = outputs
    assert [tuple(f.shape) for f in feats] == [tuple(f.shape) for f in tv_feats]
    for ours, theirs in zip(feats, tv_feats):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_head_outputs_match_with_background_moved_last(outputs):
    _, tv_head, _, cls, reg = outputs
    logits = flatten_levels(cls, NUM_CLASSES + 1)
    deltas = flatten_levels(reg, 4)
    tv_logits = tv_head["cls_logits"]
    tv_logits = torch.cat([tv_logits[..., 1:], tv_logits[..., :1]], dim=-1)
    scale = float(tv_logits.abs().max())
    torch.testing.assert_close(logits, tv_logits, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(deltas, tv_head["bbox_regression"], rtol=1e-4,
                               atol=1e-4 * float(deltas.abs().max()))


def test_anchors_match_where_torchvision_does_not_clamp(models):
    _, model = models
    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    ours = model.criterion.anchor_generator.anchors(sizes)
    generator = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                    steps=[8, 16, 32, 64, 100, 300])
    wh = generator._wh_pairs  # per level (A, 2) relative sizes, clamped to [0, 1]
    boxes = generator._grid_default_boxes(sizes, [300, 300])
    # (cx, cy, w, h) relative -> xyxy pixels
    theirs = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1) * 300
    assert ours.shape == theirs.shape == (8732, 4) and len(wh) == 6
    unclamped = ((ours[:, 2:] - ours[:, :2]) <= 300).all(dim=1)
    assert float((theirs[~unclamped, 2:] - theirs[~unclamped, :2]).max()) == pytest.approx(300.0)
    assert int((~unclamped).sum()) == 2  # the 1x1 level's ratio-2 boxes: 261·√2 = 369 px long
    torch.testing.assert_close(ours[unclamped], theirs[unclamped], rtol=0, atol=1e-3)


def test_loss_matches_torchvision_compute_loss(models, outputs):
    tv, model = models
    _, tv_head, _, cls, reg = outputs
    target = {"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 60.0, 290.0, 280.0], [5.0, 5.0, 40.0, 30.0]]),
              "labels": torch.tensor([0, 3, 1])}
    anchors = model.criterion.anchor_generator.anchors([tuple(c.shape[-2:]) for c in cls])
    matched = tv.proposal_matcher(box_iou(target["boxes"], anchors))
    t = model.criterion.get_targets(anchors, [{**target, "ignore_boxes": torch.zeros(0, 4)}])
    assert torch.equal(t.gt_inds, matched.clamp(min=-1))  # the same positives, matched to the same GTs
    tv_losses = tv.compute_loss([{"boxes": target["boxes"], "labels": target["labels"] + 1}], tv_head, [anchors],
                                [matched])
    losses = model.criterion(cls, reg, [{**target, "ignore_boxes": torch.zeros(0, 4)}])
    torch.testing.assert_close(losses["loss_cls"], tv_losses["classification"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss_bbox"], tv_losses["bbox_regression"], rtol=1e-4, atol=1e-5)
