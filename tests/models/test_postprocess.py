import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import batched_nms, nms

from pisa.config import load_config
from pisa.config_schema import ConfigError
from pisa.models import build_model
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.postprocess import best_survivors, dense_postprocess, dense_postprocess_batch, multiclass_nms


def random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * 60
    return torch.cat([xy, xy + torch.rand(count, 2, generator=generator) * 30 + 2], dim=1)


def loop_multiclass_nms(boxes, scores, score_thr, iou_thr, max_num):
    """Plain per-class loop: threshold, NMS per class, then the best ``max_num`` over all classes."""
    kept = []
    for c in range(scores.shape[1]):
        candidates = (scores[:, c] > score_thr).nonzero().flatten()
        for i in candidates[nms(boxes[candidates], scores[candidates, c], iou_thr)].tolist():
            kept.append((scores[i, c].item(), i, c))
    kept.sort(key=lambda item: -item[0])
    return kept[:max_num]


def test_multiclass_nms_matches_a_per_class_loop():
    generator = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(120, generator), torch.rand(120, 4, generator=generator)
    out_boxes, out_scores, out_labels = multiclass_nms(boxes, scores, 0.3, 0.5, 40)
    expected = loop_multiclass_nms(boxes, scores, 0.3, 0.5, 40)
    assert len(expected) == 40 and out_labels.dtype == torch.int64
    assert out_labels.tolist() == [c for _, _, c in expected]
    torch.testing.assert_close(out_scores, torch.tensor([s for s, _, _ in expected]))
    torch.testing.assert_close(out_boxes, boxes[[i for _, i, _ in expected]])
    # Without a cap every survivor is returned, and more than 40 survive here.
    everything = multiclass_nms(boxes, scores, 0.3, 0.5, -1)[2]
    assert len(everything) == len(loop_multiclass_nms(boxes, scores, 0.3, 0.5, 10**6)) > 40


@pytest.mark.parametrize("max_num", [1, 7, 100, 900, 10**6])
def test_nms_over_the_best_candidates_equals_nms_over_all(max_num):
    # 6000 candidates in 5 classes crowd a small canvas, so NMS suppresses most of them and the
    # chunk has to grow before max_num survive (216 survive in all, so 900 and more need every candidate).
    generator = torch.Generator().manual_seed(3)
    xy = torch.rand(6000, 2, generator=generator) * 40
    boxes = torch.cat([xy, xy + 20 + torch.rand(6000, 2, generator=generator) * 20], dim=1)
    scores, labels = torch.rand(6000, generator=generator), torch.randint(0, 5, (6000,), generator=generator)
    expected = batched_nms(boxes, scores, labels, 0.5)
    assert 100 < len(expected) < 900
    assert best_survivors(boxes, scores, labels, 0.5, max_num).tolist() == expected[:max_num].tolist()
    assert best_survivors(boxes, scores, labels, 0.5, -1).tolist() == expected.tolist()


def test_thresholds_are_strict():
    # IoU([0,0,10,10], [0,0,10,20]) = 100/200 = 0.5: not suppressed at 0.5 (suppression needs IoU > thr).
    # IoU([0,0,10,10], [0,0,10,19]) = 100/190 = 0.526: suppressed. A score equal to score_thr is dropped.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 19], [50, 50, 60, 60]])
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.25]])
    out_boxes, out_scores, _ = multiclass_nms(boxes, scores, 0.25, 0.5, 100)
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.8]))
    torch.testing.assert_close(out_boxes, boxes[:2])


def test_classes_do_not_suppress_each_other():
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    scores = torch.tensor([[0.9, 0.6, 0.01]])
    out_boxes, out_scores, out_labels = multiclass_nms(boxes, scores, 0.05, 0.5, 100)
    assert out_labels.tolist() == [0, 1] and out_boxes.shape == (2, 4)


def test_class_specific_boxes_and_given_labels():
    generator = torch.Generator().manual_seed(1)
    boxes = torch.stack([random_boxes(30, generator) for _ in range(3)], dim=1)  # (30, 3, 4)
    scores = torch.rand(30, 3, generator=generator)
    out_boxes, out_scores, out_labels = multiclass_nms(boxes.reshape(30, 12), scores, 0.2, 0.5, 100)
    for c in range(3):
        expected = loop_multiclass_nms(boxes[:, c], scores[:, c:c + 1], 0.2, 0.5, 100)
        mine = out_labels == c
        torch.testing.assert_close(out_scores[mine], torch.tensor([s for s, _, _ in expected]))
        torch.testing.assert_close(out_boxes[mine], boxes[[i for _, i, _ in expected], c])
    # Flattened candidates with explicit labels give the same detections.
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
    flat_labels = torch.arange(3).repeat(30)
    again = multiclass_nms(flat_boxes, flat_scores, 0.2, 0.5, 100, labels=flat_labels)
    for ours, theirs in zip(again, (out_boxes, out_scores, out_labels)):
        torch.testing.assert_close(ours, theirs)


def test_no_candidates_gives_empty_outputs():
    boxes, scores, labels = multiclass_nms(torch.zeros(3, 4), torch.full((3, 2), 0.01), 0.05, 0.5, 100)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)
    assert labels.dtype == torch.int64


def hand_made_level():
    """One level, 4 anchors, 2 classes. sigmoid(ln 9) = 0.9, sigmoid(ln 3) = 0.75, sigmoid(ln 4) = 0.8."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 40, 40], [50, 50, 60, 60]])
    logits = torch.tensor([[math.log(9), -10.0], [math.log(3), math.log(3)], [-10.0, math.log(4)], [0.0, -10.0]])
    deltas = torch.zeros(4, 4)
    deltas[2, 0] = 1.5  # centre x 30 + 1.5·20 = 60 → [50, 20, 70, 40], clipped at w = 65 → [50, 20, 65, 40]
    return logits, deltas, anchors


def test_dense_postprocess_hand_made_level():
    logits, deltas, anchors = hand_made_level()
    settings = dict(score_thr=0.05, nms_iou=0.5, max_per_img=100)
    # nms_pre = 3 drops anchor 3 (max score 0.5). Class 0: a0 (0.9) suppresses a1 (0.75, IoU 9/11);
    # class 1: a2 (0.8) and a1 (0.75) do not overlap. Boxes are divided by (sx, sy, sx, sy) = (2, .5, 2, .5).
    out = dense_postprocess([logits], [deltas], [anchors], DeltaXYWHCoder(), (70, 65), (2.0, 0.5), nms_pre=3,
                            **settings)
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8, 0.75]))
    assert out["labels"].tolist() == [0, 1, 1]
    expected = torch.tensor([[0.0, 0, 5, 20], [25, 40, 32.5, 80], [0.5, 0, 5.5, 20]])
    torch.testing.assert_close(out["boxes"], expected)
    # Without the pre-NMS cut anchor 3 (class 0, 0.5) survives too; max_per_img caps the count.
    everything = dense_postprocess([logits], [deltas], [anchors], DeltaXYWHCoder(), (70, 65), (2.0, 0.5),
                                   nms_pre=0, **settings)
    torch.testing.assert_close(everything["scores"], torch.tensor([0.9, 0.8, 0.75, 0.5]))
    torch.testing.assert_close(everything["boxes"][3], torch.tensor([25.0, 100, 30, 120]))
    settings["max_per_img"] = 2
    capped = dense_postprocess([logits], [deltas], [anchors], DeltaXYWHCoder(), (70, 65), (2.0, 0.5), nms_pre=0,
                               **settings)
    assert capped["labels"].tolist() == [0, 1]


def test_batched_postprocess_equals_per_image():
    generator = torch.Generator().manual_seed(2)
    anchors = [random_boxes(60, generator), random_boxes(15, generator)]
    cls_scores = [torch.randn(2, 60, 3, generator=generator), torch.randn(2, 15, 3, generator=generator)]
    bbox_preds = [torch.randn(2, 60, 4, generator=generator) * 0.2, torch.randn(2, 15, 4, generator=generator) * 0.2]
    shapes, factors = [(50, 70), (80, 40)], [(1.5, 1.25), (0.5, 0.75)]
    settings = dict(nms_pre=20, score_thr=0.3, nms_iou=0.5, max_per_img=30)
    batched = dense_postprocess_batch(cls_scores, bbox_preds, anchors, DeltaXYWHCoder(), shapes, factors, **settings)
    for i in range(2):
        single = dense_postprocess([s[i] for s in cls_scores], [p[i] for p in bbox_preds], anchors,
                                   DeltaXYWHCoder(), shapes[i], factors[i], **settings)
        assert len(single["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(batched[i][key], single[key])
        # Clipped to the resized image, then rescaled: within (w / sx, h / sy).
        height, width = shapes[i]
        assert (single["boxes"][:, 0::2] <= width / factors[i][0] + 1e-4).all()
        assert (single["boxes"][:, 1::2] <= height / factors[i][1] + 1e-4).all()


# ---- the per-level candidate rule (model.test.topk_rule) ------------------------------------------

SIGMOID_LOGIT = {0.9: math.log(9), 0.8: math.log(4), 0.75: math.log(3), 0.5: 0.0}


def disjoint_level(scores):
    """One level of anchors 20 px apart (never overlapping, so NMS keeps everything), zero deltas,
    and logits whose sigmoids are the given (anchor, class) scores (-10 for 'none')."""
    n = len(scores)
    x = torch.arange(n, dtype=torch.float32) * 20
    anchors = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    logits = torch.tensor([[SIGMOID_LOGIT.get(s, -10.0) for s in row] for row in scores])
    return logits, torch.zeros(n, 4), anchors


def run_rule(levels, rule, nms_pre, img_shape=(100, 400), scale_factor=(1.0, 1.0), score_thr=0.05, **options):
    logits, deltas, anchors = zip(*levels)
    return dense_postprocess(list(logits), list(deltas), list(anchors), DeltaXYWHCoder(), img_shape, scale_factor,
                             nms_pre=nms_pre, score_thr=score_thr, nms_iou=0.5, max_per_img=100, topk_rule=rule,
                             **options)


def test_v2_keeps_anchors_v3_keeps_pairs():
    # Anchors (scores of class 0, 1): a0 (.9, .8), a1 (.75, none), a2 (.5, none); nms_pre = 2.
    # v2: the 2 anchors with the best max score, a0 and a1, with all their classes above 0.05:
    #     a0/c0 .9, a0/c1 .8, a1/c0 .75.  v3: the 2 best (anchor, class) pairs: a0/c0 .9, a0/c1 .8.
    level = disjoint_level([[0.9, 0.8], [0.75, None], [0.5, None]])
    v2, v3 = run_rule([level], "v2", 2), run_rule([level], "v3", 2)
    torch.testing.assert_close(v2["scores"], torch.tensor([0.9, 0.8, 0.75]))
    assert v2["labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(v2["boxes"], level[2][[0, 0, 1]])
    torch.testing.assert_close(v3["scores"], torch.tensor([0.9, 0.8]))
    assert v3["labels"].tolist() == [0, 1]
    torch.testing.assert_close(v3["boxes"], level[2][[0, 0]])
    # The default rule is v2.
    default = dense_postprocess([level[0]], [level[1]], [level[2]], DeltaXYWHCoder(), (100, 400), (1.0, 1.0),
                                nms_pre=2, score_thr=0.05, nms_iou=0.5, max_per_img=100)
    assert torch.equal(default["scores"], v2["scores"])


def test_rules_count_per_level_and_v3_thresholds_first():
    # Level 0 as above; level 1: b0 (.8, .75), b1 (.5, .5). nms_pre = 1 per level.
    # v2: a0 (.9, .8) and b0 (.8, .75) -> .9, .8, .8, .75. v3: a0/c0 .9 and b0/c0 .8.
    # With score_thr 0.85 v3 takes its pair among those above the threshold: level 0 a0/c0, level 1
    # nothing; v2 keeps a0 and b0 and thresholds afterwards, which also leaves a0/c0.
    level0 = disjoint_level([[0.9, 0.8], [0.75, None]])
    level1 = disjoint_level([[0.8, 0.75], [0.5, 0.5]])
    level1 = (level1[0], level1[1], level1[2] + torch.tensor([0.0, 50.0, 0.0, 50.0]))
    torch.testing.assert_close(run_rule([level0, level1], "v2", 1)["scores"], torch.tensor([0.9, 0.8, 0.8, 0.75]))
    v3 = run_rule([level0, level1], "v3", 1)
    torch.testing.assert_close(v3["scores"], torch.tensor([0.9, 0.8]))
    torch.testing.assert_close(v3["boxes"], torch.stack([level0[2][0], level1[2][0]]))
    for rule in ("v2", "v3"):
        high = run_rule([level0, level1], rule, 1, score_thr=0.85)
        torch.testing.assert_close(high["scores"], torch.tensor([0.9]))
    # A level with nothing above the threshold gives no candidates (and no error) under v3.
    empty = run_rule([disjoint_level([[0.5, None]])], "v3", 5, score_thr=0.6)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_zero_size_boxes_are_dropped_under_both_rules():
    # a1 (score .9) lies right of the image (w = 65): clipped to [65, 0, 65, 10], zero width.
    # a0 (.8) is inside. Only a0 may come out; without the size filter NMS would keep both.
    logits = torch.tensor([[math.log(4)], [math.log(9)]])
    anchors = torch.tensor([[0.0, 0, 10, 10], [70, 0, 80, 10]])
    level = (logits, torch.zeros(2, 4), anchors)
    for rule in ("v2", "v3"):
        out = run_rule([level], rule, 10, img_shape=(50, 65))
        torch.testing.assert_close(out["scores"], torch.tensor([0.8]))
        torch.testing.assert_close(out["boxes"], anchors[:1])
    clipped = torch.tensor([[0.0, 0, 10, 10], [65, 0, 65, 10]])
    assert len(multiclass_nms(clipped, torch.tensor([[0.8], [0.9]]), 0.05, 0.5, 100)[1]) == 2
    # A negative min_bbox_size keeps every box (mmdetection v2's RetinaNet had no size filter).
    for rule in ("v2", "v3"):
        kept = run_rule([level], rule, 10, img_shape=(50, 65), min_bbox_size=-1)
        torch.testing.assert_close(kept["scores"], torch.tensor([0.9, 0.8]))
        torch.testing.assert_close(kept["boxes"], clipped[[1, 0]])


def test_min_bbox_size_is_measured_in_original_pixels():
    # Resized widths 10 and 4; scale_factor (2, 1) makes them 5 and 2 in the original image. With
    # min_bbox_size = 3 the second box goes (2 <= 3) although its resized width 4 exceeds 3.
    logits = torch.tensor([[math.log(4)], [math.log(9)]])
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 0, 24, 10]])
    out = run_rule([(logits, torch.zeros(2, 4), anchors)], "v2", 10, scale_factor=(2.0, 1.0), min_bbox_size=3)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0, 5, 10]]))


def test_rules_agree_when_nothing_is_cut_and_v3_batched_equals_per_image():
    generator = torch.Generator().manual_seed(3)
    anchors = [random_boxes(40, generator), random_boxes(10, generator)]
    cls_scores = [torch.randn(2, 40, 3, generator=generator), torch.randn(2, 10, 3, generator=generator)]
    bbox_preds = [torch.randn(2, 40, 4, generator=generator) * 0.2, torch.randn(2, 10, 4, generator=generator) * 0.2]
    shapes, factors = [(50, 70), (80, 40)], [(1.5, 1.25), (0.5, 0.75)]
    settings = dict(score_thr=0.3, nms_iou=0.5, max_per_img=30)
    # nms_pre >= 3 * 40 pairs: neither rule cuts anything, so the detections are the same.
    v2 = dense_postprocess_batch(cls_scores, bbox_preds, anchors, DeltaXYWHCoder(), shapes, factors, nms_pre=120,
                                 **settings)
    v3 = dense_postprocess_batch(cls_scores, bbox_preds, anchors, DeltaXYWHCoder(), shapes, factors, nms_pre=120,
                                 topk_rule="v3", **settings)
    cut = dense_postprocess_batch(cls_scores, bbox_preds, anchors, DeltaXYWHCoder(), shapes, factors, nms_pre=8,
                                  topk_rule="v3", **settings)
    for i in range(2):
        assert len(v2[i]["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(v3[i][key], v2[i][key])
        single = dense_postprocess([s[i] for s in cls_scores], [p[i] for p in bbox_preds], anchors, DeltaXYWHCoder(),
                                   shapes[i], factors[i], nms_pre=8, topk_rule="v3", **settings)
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(cut[i][key], single[key])
        assert len(cut[i]["scores"]) <= 16  # at most nms_pre pairs per level survive


def test_unknown_rule_names_the_config_key():
    level = disjoint_level([[0.9]])
    with pytest.raises(ValueError, match=r"model.test.topk_rule: unknown rule 'v4'; valid rules: \['v2', 'v3'\]"):
        run_rule([level], "v4", 1)


def test_config_key_selects_the_rule():
    config = str(Path(__file__).resolve().parents[2] / "configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml")
    small = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", "model.num_classes=2",
             "model.neck.out_channels=8", "model.head.feat_channels=8", "model.head.stacked_convs=1"]
    assert build_model(load_config(config, small, check_paths=False)).postprocessor.topk_rule == "v2"
    v3 = build_model(load_config(config, small + ["model.test.topk_rule=v3"], check_paths=False))
    assert v3.postprocessor.topk_rule == "v3"
    with pytest.raises(ConfigError, match="topk_rule"):
        load_config(config, small + ["model.test.topk_rule=v4"], check_paths=False)
    kept = build_model(load_config(config, small + ["model.test.min_bbox_size=-1"], check_paths=False))
    assert kept.postprocessor.min_bbox_size == -1.0 and v3.postprocessor.min_bbox_size == 0.0
