"""SSD augmentation: every step keeps boxes, labels and masks consistent with the image.

Consistency is checked on pixels: each object is drawn as a filled rectangle of its own colour (and
as its mask); after a transform, the pixels inside every returned box must still have that object's
colour, and its mask must still cover exactly the box.
"""

import math

import pytest
import torch

from pisa.data import transforms_from_config
from pisa.data.ssd_transforms import (Expand, MinIoURandomCrop, PhotoMetricDistortion, SquareResize,
                                      build_ssd_transforms, crop_to_patch, hsv_to_rgb, rgb_to_hsv)

COLOURS = torch.tensor([[250.0, 10.0, 10.0], [10.0, 250.0, 10.0], [10.0, 10.0, 250.0]])
BACKGROUND = 100.0


def scene():
    """A 60x80 (h x w) image with three disjoint filled boxes, their masks, labels and one ignore box."""
    boxes = torch.tensor([[5.0, 5.0, 25.0, 20.0], [40.0, 10.0, 70.0, 50.0], [10.0, 35.0, 30.0, 55.0]])
    img = torch.full((3, 60, 80), BACKGROUND)
    masks = torch.zeros(3, 60, 80, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        img[:, y1:y2, x1:x2] = COLOURS[i][:, None, None]
        masks[i, y1:y2, x1:x2] = 1
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "ignore_boxes": torch.tensor([[60.0, 52.0, 78.0, 58.0]]),
              "masks": masks, "img_shape": (60, 80), "ori_shape": (60, 80), "scale_factor": (1.0, 1.0), "flip": False}
    return img, target


def assert_consistent(img, target, margin=0, atol=0.0):
    """Inside every box (shrunk by ``margin`` px) the image has its label's colour; masks fill the box."""
    _, height, width = img.shape
    assert tuple(target["img_shape"]) == (height, width)
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.shape[0] == labels.shape[0] == target["masks"].shape[0]
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
    for box, label, mask in zip(boxes, labels, target["masks"]):
        x1, y1 = math.ceil(box[0] - 1e-4) + margin, math.ceil(box[1] - 1e-4) + margin
        x2, y2 = math.floor(box[2] + 1e-4) - margin, math.floor(box[3] + 1e-4) - margin
        assert x2 > x1 and y2 > y1, f"box {box.tolist()} too small to check"
        inside = img[:, y1:y2, x1:x2]
        torch.testing.assert_close(inside, COLOURS[label][:, None, None].expand_as(inside), atol=atol, rtol=0)
        assert bool(mask[y1:y2, x1:x2].all())
        ys, xs = mask.nonzero(as_tuple=True)  # the mask's extent equals the box (up to the margin)
        extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(extent, box, atol=margin + 1.0, rtol=0)


def test_scene_is_consistent_to_begin_with():
    assert_consistent(*scene())


# ---- expand --------------------------------------------------------------------------------------


def test_expand_shifts_boxes_and_fills_the_mean():
    mean = [123.675, 116.28, 103.53]
    img, target = scene()
    out_img, out = Expand(mean, (1.0, 4.0), prob=1.0)(img, target, torch.Generator().manual_seed(3))
    _, h, w = out_img.shape
    assert 60 <= h <= 240 and 80 <= w <= 320 and (h, w) != (60, 80)
    assert_consistent(out_img, out)
    shift = out["boxes"][0, :2] - target["boxes"][0, :2]
    left, top = int(shift[0]), int(shift[1])
    torch.testing.assert_close(out_img[:, top:top + 60, left:left + 80], img)  # the image, unchanged
    torch.testing.assert_close(out["ignore_boxes"], target["ignore_boxes"] + torch.tensor([left, top, left, top]))
    canvas = out_img.clone()
    canvas[:, top:top + 60, left:left + 80] = torch.tensor(mean)[:, None, None]
    assert torch.allclose(canvas, torch.tensor(mean)[:, None, None].expand_as(canvas))


def test_expand_prob_skips_half_the_time():
    img, target = scene()
    g = torch.Generator().manual_seed(0)
    expanded = sum(Expand([0, 0, 0])(img, target, g)[0].shape != img.shape for _ in range(200))
    assert 70 < expanded < 130


# ---- crop ----------------------------------------------------------------------------------------


def test_crop_that_cuts_a_box_clips_it_and_drops_boxes_whose_centre_is_outside():
    img, target = scene()
    # Patch x 15..60, y 8..45: box 0 (centre 15, 12.5) has its centre on the edge (not strictly
    # inside) -> removed; box 1 (centre 55, 30) is cut at x = 60 and y = 45; box 2 (centre 20, 45) is
    # on the edge -> removed. The ignore box (centre 69, 55) is outside -> removed.
    out_img, out = crop_to_patch(img, target, (15, 8, 60, 45))
    assert out_img.shape == (3, 37, 45)
    assert out["labels"].tolist() == [1]
    torch.testing.assert_close(out["boxes"], torch.tensor([[25.0, 2.0, 45.0, 37.0]]))  # [40-15, 10-8, 60-15, 45-8]
    assert out["ignore_boxes"].shape == (0, 4)
    assert_consistent(out_img, out)


def test_crop_that_removes_every_box():
    img, target = scene()
    out_img, out = crop_to_patch(img, target, (30, 0, 38, 8))  # background only
    assert out_img.shape == (3, 8, 8) and bool((out_img == BACKGROUND).all())
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["masks"].shape == (0, 8, 8)
    assert out["img_shape"] == (8, 8)


def test_min_iou_crop_keeps_boxes_consistent_and_never_returns_an_empty_crop():
    img, target = scene()
    crop = MinIoURandomCrop()
    cropped = cut = 0
    for seed in range(60):
        out_img, out = crop(img, target, torch.Generator().manual_seed(seed))
        assert_consistent(out_img, out)
        if out_img.shape != img.shape:
            cropped += 1
            assert out["boxes"].shape[0] >= 1  # the reference rejects patches that keep no box centre
        sizes = out["boxes"][:, 2:] - out["boxes"][:, :2]
        original = (target["boxes"][:, 2:] - target["boxes"][:, :2])[out["labels"]]
        cut += int((sizes < original - 1e-4).any())
    assert cropped > 30 and cut > 5  # both happen often enough to have been checked


def test_min_iou_crop_without_boxes_crops_freely():
    img, target = scene()
    empty = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 60, 80, dtype=torch.uint8)}
    shapes = {MinIoURandomCrop()(img, empty, torch.Generator().manual_seed(s))[0].shape for s in range(20)}
    assert len(shapes) > 5


# ---- resize, photometric -------------------------------------------------------------------------


def test_square_resize_ignores_the_aspect_ratio():
    img, target = scene()
    out_img, out = SquareResize(120)(img, target)
    assert out_img.shape == (3, 120, 120) and out["img_shape"] == (120, 120)
    assert out["scale_factor"] == (120 / 80, 120 / 60)
    torch.testing.assert_close(out["boxes"][1], torch.tensor([40 * 1.5, 10 * 2.0, 70 * 1.5, 50 * 2.0]))
    assert_consistent(out_img, out, margin=1, atol=1e-3)


def test_hsv_round_trip_and_a_hue_shift():
    img = torch.rand(3, 8, 8) * 255
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(img)), img, atol=1e-3, rtol=0)
    red = torch.tensor([200.0, 0.0, 0.0]).view(3, 1, 1)
    hsv = rgb_to_hsv(red)
    assert hsv.view(3).tolist() == [0.0, 1.0, 200.0]
    hsv[0] += 120  # red -> green
    torch.testing.assert_close(hsv_to_rgb(hsv).view(3), torch.tensor([0.0, 200.0, 0.0]), atol=1e-4, rtol=0)


def test_photometric_distortion_changes_colours_not_boxes():
    img, target = scene()
    out = [PhotoMetricDistortion()(img, target, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(torch.equal(t["boxes"], target["boxes"]) for _, t in out)
    assert sum(not torch.allclose(o, img) for o, _ in out) >= 6
    again = PhotoMetricDistortion()(img, target, torch.Generator().manual_seed(5))[0]
    assert torch.equal(again, out[5][0])


# ---- the pipeline --------------------------------------------------------------------------------


def test_train_pipeline_is_deterministic_per_seed_and_square():
    img, target = scene()
    pipeline = build_ssd_transforms(64, [123.675, 116.28, 103.53], [1.0, 1.0, 1.0], True, train=True)
    a_img, a = pipeline(img, target, torch.Generator().manual_seed(11))
    b_img, b = pipeline(img, target, torch.Generator().manual_seed(11))
    assert a_img.shape == (3, 64, 64) and a_img.dtype == torch.float32
    assert torch.equal(a_img, b_img) and torch.equal(a["boxes"], b["boxes"])
    assert bool((a["boxes"] >= 0).all() and (a["boxes"] <= 64).all())
    assert a["masks"].shape[0] == a["boxes"].shape[0] == a["labels"].shape[0]


def test_geometric_pipeline_keeps_pixels_and_boxes_together():
    # Photometric off and a normalisation that is the identity: what the model sees is checkable.
    img, target = scene()
    pipeline = build_ssd_transforms(160, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], True, train=True, photometric=False)
    for seed in range(10):
        out_img, out = pipeline(img, target, torch.Generator().manual_seed(seed))
        # Bilinear upscaling blurs an edge over about one source pixel, i.e. scale_factor output pixels.
        margin = math.ceil(max(out["scale_factor"])) + 1
        keep = ((out["boxes"][:, 2:] - out["boxes"][:, :2]) > 2 * margin + 1).all(1)  # big enough to look inside
        sub = {**out, "boxes": out["boxes"][keep], "labels": out["labels"][keep], "masks": out["masks"][keep]}
        assert_consistent(out_img, sub, margin=margin, atol=1e-3)


def test_config_hook_and_test_pipeline():
    data_cfg = {"pipeline": "ssd", "ssd_transforms": {"size": 96, "flip_prob": 0.5, "photometric": True,
                                                      "expand_ratio": [1.0, 4.0], "min_ious": [0.1, 0.3],
                                                      "min_crop_size": 0.3},
                "normalize": {"mean": [123.675, 116.28, 103.53], "std": [1.0, 1.0, 1.0], "to_rgb": True}}
    train = transforms_from_config(data_cfg, train=True)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["PhotoMetricDistortion", "Expand", "MinIoURandomCrop", "SquareResize", "Normalize",
                     "RandomHorizontalFlip"]
    test = transforms_from_config(data_cfg, train=False)
    assert [type(t).__name__ for t in test.transforms] == ["SquareResize", "Normalize"]
    img, target = scene()
    out_img, out = test(img.to(torch.uint8), target)
    assert out_img.shape == (3, 96, 96) and out["scale_factor"] == (96 / 80, 96 / 60)
    # RGB mean subtraction, std 1: the background (100) becomes 100 - mean.
    torch.testing.assert_close(out_img[:, 0, 0], torch.tensor([100 - 123.675, 100 - 116.28, 100 - 103.53]))


def test_bad_expand_ratio_is_a_config_error():
    from pisa.data.errors import DatasetConfigError

    with pytest.raises(DatasetConfigError, match="expand_ratio"):
        Expand([0, 0, 0], (0.5, 2.0))
