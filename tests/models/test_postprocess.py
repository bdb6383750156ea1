import math

import torch
from torchvision.ops import nms

from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.postprocess import dense_postprocess, dense_postprocess_batch, multiclass_nms


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
