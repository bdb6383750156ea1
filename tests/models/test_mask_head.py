"""Tests of pisa.models.mask_head: the mask head, its targets and loss, pasting, and segm AP.

RoIAlign facts the hand-derived targets rely on (torchvision ``roi_align``, ``aligned=True``, spatial
scale 1, adaptive sampling): a RoI of width ``w`` split into 28 bins takes ``ceil(w / 28)`` samples per
bin and axis, at pixel coordinates ``x1 - 0.5 + bin_w * (b + (s + 0.5) / n)``, where pixel ``i`` has
its value at coordinate ``i``. For an integer RoI 28 pixels wide (one sample per bin) the samples land
exactly on the pixels ``x1 .. x1 + 27``; for 56 pixels (two per bin) on ``x1 + 2b`` and ``x1 + 2b + 1``,
so a bin is the mean of a 2x2 block of pixels.
"""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from pisa.data.coco import _decode_segmentation
from pisa.engine.evaluator import CocoEvaluator
from pisa.models.mask_head import MaskHead, mask_loss, mask_targets, paste_masks

H, W = 80, 100


def rect(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def targets_of(masks, rois, gt_inds, **kw):
    return mask_targets(torch.tensor(rois, dtype=torch.float32), torch.from_numpy(np.stack(masks)),
                        torch.tensor(gt_inds), **kw)


def block_mean(crop, block):
    """(S*block, S*block) -> (S, S) mean of each block x block cell."""
    s = crop.shape[0] // block
    return crop.reshape(s, block, s, block).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------- MaskHead

# The reference's mask-head keys for 80 classes (mmdet-keys/mask_rcnn_r50_fpn.tsv) without ".conv.".
REFERENCE_KEYS = {**{f"convs.{i}.weight": (256, 256, 3, 3) for i in range(4)},
                  **{f"convs.{i}.bias": (256,) for i in range(4)},
                  "upsample.weight": (256, 256, 2, 2), "upsample.bias": (256,),
                  "conv_logits.weight": (80, 256, 1, 1), "conv_logits.bias": (80,)}


def test_mask_head_keys_and_shapes_are_the_references():
    head = MaskHead(num_classes=80)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == REFERENCE_KEYS
    assert head(torch.randn(3, 256, 14, 14)).shape == (3, 80, 28, 28)


def test_mask_head_init_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    head = MaskHead(num_classes=80)
    # Kaiming normal, ReLU gain, fan_out: std = sqrt(2 / fan_out). conv3x3: fan_out = 256 * 9.
    # Deconvolution weight (in, out, 2, 2): torch's fan_out reads dim 0, so 256 * 4. conv_logits: 80.
    for name, fan_out in [("convs.0", 256 * 9), ("convs.3", 256 * 9), ("upsample", 256 * 4),
                          ("conv_logits", 80)]:
        layer = head.get_submodule(name)
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05), name
        assert layer.weight.mean().abs().item() < 0.1 * math.sqrt(2 / fan_out)
        assert torch.count_nonzero(layer.bias) == 0


def test_mask_head_needs_the_class_count():
    with pytest.raises(ValueError, match="num_classes"):
        MaskHead()


def test_mask_head_relus_follow_every_conv_and_the_deconvolution():
    """Made-up weights whose negative pre-activations must be cut: with all-negative conv biases and
    zero weights, every ReLU output is 0, so the logits equal conv_logits' bias exactly."""
    head = MaskHead(in_channels=4, conv_channels=8, num_convs=2, num_classes=3)
    with torch.no_grad():
        for m in [*head.convs, head.upsample]:
            m.weight.zero_()
            m.bias.fill_(-1.0)
        head.conv_logits.weight.fill_(1.0)
        head.conv_logits.bias.copy_(torch.tensor([0.5, -2.0, 3.0]))
    out = head(torch.randn(2, 4, 7, 7))
    assert out.shape == (2, 3, 14, 14)
    torch.testing.assert_close(out, torch.tensor([0.5, -2.0, 3.0])[None, :, None, None].expand(2, 3, 14, 14))


# ---------------------------------------------------------------------------------------- targets


def test_a_mask_filling_the_roi_gives_all_ones_for_any_box_size():
    # Non-integer widths too: the outermost samples sit within 0.5 px of the edge, so each bin's mean
    # stays above 0.5 (derivation in the module docstring: the first sample of a 40 px RoI is at
    # x1 - 0.14, value 0.86).
    mask = rect(H, W, 10, 20, 50, 44)
    t = targets_of([mask], [[10, 20, 50, 44]], [0])
    assert t.shape == (1, 28, 28) and t.dtype == torch.float32
    assert torch.equal(t, torch.ones(1, 28, 28))


def test_a_left_half_mask_gives_the_left_half():
    # RoI 42 px wide (bins of 1.5 px), object its left 21 px. Bin 13 samples x1+19.375 and x1+20.125,
    # both ~1; bin 14 samples x1+20.875 (0.125 of pixel 20) and x1+21.625 (0): mean 0.06 -> 0.
    mask = rect(H, W, 30, 10, 51, 38)
    t = targets_of([mask], [[30, 10, 72, 38]], [0])[0]
    assert torch.equal(t[:, :14], torch.ones(28, 14)) and torch.equal(t[:, 14:], torch.zeros(28, 14))


def test_a_shifted_roi_sees_the_object_shifted():
    # Object [20, 20, 48, 48]; the 28x28 RoI starts 10 px to its left: one sample per pixel, so the
    # first 10 target columns are background and the other 18 object.
    mask = rect(H, W, 20, 20, 48, 48)
    t = targets_of([mask], [[10, 20, 38, 48]], [0])[0]
    expected = torch.zeros(28, 28)
    expected[:, 10:] = 1
    assert torch.equal(t, expected)


def test_rois_are_clipped_to_the_mask_before_pooling():
    # The reference clips the RoI to the image: [-28, 0, 28, 28] becomes [0, 0, 28, 28], all object.
    # Unclipped, the left half of its samples would fall outside the mask and read 0.
    mask = np.ones((H, W), dtype=np.uint8)
    t = targets_of([mask], [[-28, 0, 28, 28]], [0])
    assert torch.equal(t, torch.ones(1, 28, 28))


def test_pad_shape_pads_the_masks_and_clips_to_the_padded_image():
    # Image 80x100 padded to 96x128. The RoI [90, 0, 118, 28] is clipped to x <= 128 (unchanged), so
    # its first 10 columns lie on the object (pixels 90..99) and the rest on the zero padding; clipped
    # to the unpadded width instead, it would be [90, 0, 100, 28] and all object.
    mask = np.ones((H, W), dtype=np.uint8)
    padded = targets_of([mask], [[90, 0, 118, 28]], [0], pad_shape=(96, 128))[0]
    expected = torch.zeros(28, 28)
    expected[:, :10] = 1
    assert torch.equal(padded, expected)
    assert torch.equal(targets_of([mask], [[90, 0, 118, 28]], [0])[0], torch.ones(28, 28))
    with pytest.raises(ValueError, match="pad_shape"):
        targets_of([mask], [[0, 0, 28, 28]], [0], pad_shape=(64, 128))


POLYGON = [[12.0, 8.0, 60.0, 14.0, 70.0, 50.0, 40.0, 66.0, 15.0, 40.0]]  # a pentagon, COCO [x, y, ...]


def _rle_segmentation():
    """An uncompressed COCO RLE (column-major run lengths, background first) of a ring-like shape."""
    ring = rect(H, W, 30, 10, 86, 66)
    ring[25:50, 45:70] = 0
    compressed = mask_util.encode(np.asfortranarray(ring))
    # Unroll the compressed counts into the uncompressed list form COCO files also use.
    flat = ring.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    assert flat[0] == 0
    assert np.array_equal(mask_util.decode(mask_util.frPyObjects({"counts": counts, "size": [H, W]}, H, W)),
                          mask_util.decode(compressed))
    return {"counts": counts, "size": [H, W]}, ring


def test_polygon_and_rle_targets_match_pycocotools_decoding_cropped_and_resized():
    poly_mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(POLYGON, H, W)))
    rle, ring = _rle_segmentation()
    rle_mask = mask_util.decode(mask_util.frPyObjects(rle, H, W))
    assert np.array_equal(rle_mask, ring) and 0 < poly_mask.sum() < H * W
    # The dataset's decoding of both COCO forms is pycocotools' own.
    gt = [_decode_segmentation(POLYGON, H, W), _decode_segmentation(rle, H, W)]
    assert np.array_equal(gt[0], poly_mask) and np.array_equal(gt[1], rle_mask)
    rois = [[20, 20, 48, 48], [10, 5, 66, 61], [40, 8, 68, 36], [28, 10, 84, 66]]
    t = targets_of(gt, rois, [0, 0, 1, 1])
    # 28 px RoIs: the crop itself; 56 px RoIs: 2x2 block means, >= 0.5 (module docstring).
    expected = [poly_mask[20:48, 20:48], block_mean(poly_mask[5:61, 10:66], 2) >= 0.5,
                rle_mask[8:36, 40:68], block_mean(rle_mask[10:66, 28:84], 2) >= 0.5]
    for i, e in enumerate(expected):
        assert np.array_equal(t[i].numpy(), e.astype(np.float32)), i
    assert 0 < t.sum() < t.numel()  # the cases hold both object and background


def test_no_positive_rois_give_no_targets():
    t = mask_targets(torch.zeros(0, 4), torch.zeros(2, H, W, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    assert t.shape == (0, 28, 28) and t.dtype == torch.float32


# ---------------------------------------------------------------------------------------- loss


def test_mask_loss_golden_value_on_the_labels_channel_only():
    # RoI 0, label 1: channel 1 holds logit 0 everywhere, BCE = log 2 per pixel whatever the target.
    # RoI 1, label 0: channel 0 holds logit log 3 (p = 3/4); its target is 1 on the left half,
    # BCE = -log(3/4) = log(4/3), and 0 on the right half, BCE = -log(1/4) = log 4.
    # Every other channel holds 50 (BCE ~50 against target 0) and must not count.
    # Mean over 2 * 28 * 28 pixels = (784 log 2 + 392 log(4/3) + 392 log 4) / 1568
    #                              = 0.5 log 2 + 0.25 log(16/3) = 0.76503...
    logits = torch.full((2, 3, 28, 28), 50.0, requires_grad=True)
    with torch.no_grad():
        logits[0, 1] = 0.0
        logits[1, 0] = math.log(3.0)
    targets = torch.zeros(2, 28, 28)
    targets[1, :, :14] = 1
    loss = mask_loss(logits, targets, torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(16 / 3), rel=1e-6)
    loss.backward()
    # d mean / d logit = (p - t) / 1568 on the selected channels, 0 elsewhere.
    assert logits.grad[0, 1, 0, 0].item() == pytest.approx(0.5 / 1568)
    assert logits.grad[1, 0, 0, 0].item() == pytest.approx(-0.25 / 1568)
    assert logits.grad[1, 0, 0, 20].item() == pytest.approx(0.75 / 1568)
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[:, 2].abs().sum() == 0


def test_mask_loss_without_positives_is_an_exact_zero_attached_to_the_graph():
    head = MaskHead(in_channels=4, conv_channels=4, num_convs=1, num_classes=2)
    logits = head(torch.randn(0, 4, 14, 14))
    loss = mask_loss(logits, torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in head.parameters())


def test_mask_loss_is_fp32_under_autocast():
    logits = torch.randn(2, 3, 28, 28).bfloat16()
    loss = mask_loss(logits, torch.ones(2, 28, 28), torch.tensor([0, 2]))
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------- paste


def test_an_all_ones_map_covers_exactly_the_boxs_pixels():
    # Pixel centres x + 0.5 of columns 10..29 lie inside [10, 30]; grid_sample reads them at 0.5 px or
    # more inside the map's outer edge, where the value is >= 1/2.
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (50, 60))
    expected = torch.zeros(1, 50, 60, dtype=torch.bool)
    expected[0, 20:40, 10:30] = True
    assert out.dtype == torch.bool and torch.equal(out, expected)


def test_the_threshold_is_inclusive():
    # A 32x32 map on a 32 px box: pixel column 2 + j reads mask column j exactly (next test), with
    # dyadic grid coordinates that float32 holds exactly, so a map of 0.5 pastes exactly 0.5 on every
    # pixel of the box, and ">= 0.5" keeps them all.
    out = paste_masks(torch.full((1, 32, 32), 0.5), torch.tensor([[2.0, 3.0, 34.0, 35.0]]), (40, 40))
    expected = torch.zeros(1, 40, 40, dtype=torch.bool)
    expected[0, 3:35, 2:34] = True
    assert torch.equal(out, expected)


def test_a_left_half_map_covers_the_left_half_of_the_box():
    # Box 28 px wide: pixel column 10 + j has its centre on mask column j exactly
    # (((j + 0.5) / 28 * 2 - 1 + 1) * 28 - 1) / 2 = j, so columns 10..23 are in and 24..37 out.
    probs = torch.zeros(1, 28, 28)
    probs[0, :, :14] = 1
    out = paste_masks(probs, torch.tensor([[10.0, 4.0, 38.0, 32.0]]), (40, 50))
    expected = torch.zeros(1, 40, 50, dtype=torch.bool)
    expected[0, 4:32, 10:24] = True
    assert torch.equal(out, expected)


def test_boxes_partly_outside_the_image_are_clipped():
    boxes = torch.tensor([[-10.0, -5.0, 20.0, 15.0], [30.0, 20.0, 50.0, 45.0], [60.0, 0.0, 70.0, 5.0],
                          [-30.0, 2.0, -8.0, 9.0]])
    out = paste_masks(torch.ones(4, 28, 28), boxes, (30, 40))
    expected = torch.zeros(4, 30, 40, dtype=torch.bool)
    expected[0, 0:15, 0:20] = True
    expected[1, 20:30, 30:40] = True  # the last two boxes lie wholly outside: empty
    assert torch.equal(out, expected)


def test_degenerate_boxes_and_no_detections_give_empty_masks():
    out = paste_masks(torch.ones(2, 28, 28), torch.tensor([[5.0, 5.0, 5.0, 20.0], [3.0, 9.0, 12.0, 9.0]]), (30, 30))
    assert out.shape == (2, 30, 30) and not out.any()
    assert paste_masks(torch.ones(0, 28, 28), torch.zeros(0, 4), (30, 40)).shape == (0, 30, 40)


def paste_over_whole_image(probs, boxes, height, width, threshold):
    """The whole-image form of the reference's paste (its GPU path): every pixel of every detection."""
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    gx = (xs[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1
    gy = (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    n = len(boxes)
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], 3)
    values = torch.nn.functional.grid_sample(probs[:, None], grid, align_corners=False)[:, 0]
    return values >= threshold


def test_batched_windowed_paste_equals_whole_image_paste_whatever_the_chunking():
    g = torch.Generator().manual_seed(0)
    n, height, width = 40, 70, 90
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - 10
    wh = 1 + torch.rand(n, 2, generator=g) * 55
    boxes = torch.cat([xy, xy + wh], 1)
    probs = torch.rand(n, 28, 28, generator=g)
    # Past the box edge the pasted value falls from half the edge cell's to 0 over box_w / 56 px: at
    # most 1 px for these boxes (<= 56 px), so the 1 px margin of the windows keeps every nonzero
    # value and even a low threshold gives the whole-image result.
    for threshold in (0.5, 0.2):
        expected = paste_over_whole_image(probs, boxes, height, width, threshold)
        assert expected.any()
        for budget in (256 * 2 ** 20, 20_000, 1):  # one batch, a few, one detection per batch
            out = paste_masks(probs, boxes, (height, width), threshold, max_chunk_bytes=budget)
            assert torch.equal(out, expected), (threshold, budget)


def blob(h, w):
    """A smooth non-convex shape: an ellipse with a bite out of its right side."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    m = ((xx - 50) / 30) ** 2 + ((yy - 40) / 22) ** 2 <= 1
    m &= ((xx - 78) / 14) ** 2 + ((yy - 40) / 10) ** 2 > 1
    return m.astype(np.uint8)


def test_mask_to_targets_to_paste_round_trip_keeps_the_shape():
    mask = blob(H, W)
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    t = mask_targets(box, torch.from_numpy(mask)[None], torch.tensor([0]))
    pasted = paste_masks(t, box, (H, W))[0].numpy()
    iou = (pasted & (mask > 0)).sum() / (pasted | (mask > 0)).sum()
    assert iou > 0.9


# ---------------------------------------------------------------------------------------- segm AP


def test_mask_rcnn_shaped_detections_of_the_gt_itself_score_segm_ap_one(tmp_path):
    # GT in both COCO forms (polygon, RLE) and two classes; image 2 has no objects and no detections.
    rle, ring = _rle_segmentation()
    poly_mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(POLYGON, H, W)))
    anns = []
    for i, (segm, mask, cat) in enumerate([(POLYGON, poly_mask, 5), (rle, ring, 9)]):
        ys, xs = np.nonzero(mask)
        anns.append({"id": i + 1, "image_id": 1, "category_id": cat, "iscrowd": 0, "segmentation": segm,
                     "area": float(mask.sum()),
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                              float(ys.max() + 1 - ys.min())]})
    gt = {"images": [{"id": 1, "height": H, "width": W, "file_name": "1.jpg"},
                     {"id": 2, "height": 30, "width": 40, "file_name": "2.jpg"}],
          "annotations": anns, "categories": [{"id": 5, "name": "pentagon"}, {"id": 9, "name": "ring"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns])
    det = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1]),
           "masks": torch.from_numpy(np.stack([poly_mask, ring])).bool()}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 30, 40, dtype=torch.bool)}
    evaluator = CocoEvaluator(str(path), [5, 9], ["pentagon", "ring"], iou_types=("bbox", "segm"))
    evaluator.add([1, 2], [det, empty])
    metrics = evaluator.evaluate()
    assert metrics["segm_AP"] == pytest.approx(1.0) and metrics["bbox_AP"] == pytest.approx(1.0)
    assert metrics["per_class"]["segm"] == {"pentagon": pytest.approx(1.0), "ring": pytest.approx(1.0)}
    # The ring's mask swapped for its filled box: the hole (25 x 25 of 56 x 56) drops its mask IoU to
    # 2511 / 3136 = 0.80, matched at IoU thresholds .50 .. .80 only: ring segm AP 7/10.
    filled = torch.from_numpy(rect(H, W, 30, 10, 86, 66)).bool()
    evaluator.reset()
    evaluator.add([1, 2], [{**det, "masks": torch.stack([det["masks"][0], filled])}, empty])
    metrics = evaluator.evaluate()
    assert metrics["per_class"]["segm"]["ring"] == pytest.approx(0.7)
    assert metrics["per_class"]["segm"]["pentagon"] == pytest.approx(1.0)
