"""Transforms: keep-ratio resize, flip and normalisation against hand-derived numbers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pisa.data import DatasetConfigError
from pisa.data.transforms import (Compose, Normalize, RandomHorizontalFlip, Resize, as_tensor,
                                  build_transforms, rescale_size)


def _target(boxes, width, height, ignore=((0.0, 0.0, 1.0, 1.0),), masks=None):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.zeros(len(boxes), dtype=torch.int64),
         "ignore_boxes": torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
         "image_id": 1, "ori_shape": (height, width), "img_shape": (height, width),
         "scale_factor": (1.0, 1.0), "flip": False}
    if masks is not None:
        t["masks"] = masks
    return t


@pytest.mark.parametrize("size, scale, expected", [
    # 640x480 to (1333, 800): s = min(1333/640, 800/480) = 1.6667 -> 1067x800 (1066.67 + 0.5 -> 1067)
    ((640, 480), (1333, 800), (1067, 800)),
    # 500x375 (COCO val, w/h 4/3): s = 800/375 = 2.1333 -> 1067x800
    ((500, 375), (1333, 800), (1067, 800)),
    # 1000x200: long side limits: s = min(1333/1000, 800/200) = 1.333 -> 1333x267 (266.6 + 0.5)
    ((1000, 200), (1333, 800), (1333, 267)),
    # the scale's order does not matter: (800, 1333) is the same limit
    ((1000, 200), (800, 1333), (1333, 267)),
    # 20x16 to (40, 30): s = min(40/20, 30/16) = 1.875 -> 38x30 (37.5 + 0.5 = 38.0; 30.0 + 0.5 -> 30)
    ((20, 16), (40, 30), (38, 30)),
    # downscale 2000x1500 to (1333, 800): s = 0.5333 -> 1067x800
    ((2000, 1500), (1333, 800), (1067, 800)),
])
def test_rescale_size(size, scale, expected):
    assert rescale_size(*size, scale) == expected


def test_resize_golden_boxes_and_metas():
    image = torch.zeros(3, 16, 20, dtype=torch.uint8)
    target = _target([[2, 4, 10, 12], [15, 10, 20, 16]], 20, 16, ignore=[[0, 0, 6, 3]])
    out_img, out = Resize([(40, 30)])(image, target)
    # 20x16 -> 38x30: sx = 38/20 = 1.9, sy = 30/16 = 1.875
    assert out_img.shape == (3, 30, 38) and out_img.dtype == torch.uint8
    assert out["scale_factor"] == pytest.approx((1.9, 1.875))
    assert out["img_shape"] == (30, 38) and out["ori_shape"] == (16, 20)
    # [2, 4, 10, 12] * (1.9, 1.875) = [3.8, 7.5, 19, 22.5]; [15, 10, 20, 16] -> [28.5, 18.75, 38, 30]
    torch.testing.assert_close(out["boxes"], torch.tensor([[3.8, 7.5, 19.0, 22.5],
                                                           [28.5, 18.75, 38.0, 30.0]]))
    torch.testing.assert_close(out["ignore_boxes"], torch.tensor([[0.0, 0.0, 11.4, 5.625]]))
    assert target["boxes"][0, 0] == 2  # the input target is untouched


def test_resize_clips_boxes_to_the_new_image():
    # a box at the border may exceed W after float scaling; it is clipped to [0, W] x [0, H]
    target = _target([[0, 0, 20.5, 16]], 20, 16)
    _, out = Resize([(40, 30)])(torch.zeros(3, 16, 20, dtype=torch.uint8), target)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 38.0, 30.0]]))


def test_resize_bilinear_half_pixel_golden():
    # One row [0, 100] widened from 2 to 4 px: output centres map to source x = (i + 0.5)/2 - 0.5
    # = -0.25, 0.25, 0.75, 1.25 -> clamped 0, 0.25, 0.75, 1 -> 0, 25, 75, 100 (no antialiasing)
    image = torch.tensor([0, 100], dtype=torch.uint8).view(1, 1, 2).expand(3, 2, 2).contiguous()
    out, _ = Resize([(4, 4)])(image, _target([], 2, 2, ignore=()))
    assert out.shape == (3, 4, 4)
    assert out[0, 0].tolist() == [0, 25, 75, 100]
    float_out, _ = Resize([(4, 4)])(image.float(), _target([], 2, 2, ignore=()))
    assert float_out.dtype == torch.float32 and float_out[1, 3].tolist() == [0, 25, 75, 100]


def test_resize_and_flip_masks_golden():
    # 4x2 (w x h) image with masks at pixels (row 0, col 0) and (row 1, col 3); to (8, 4): s = 2
    masks = torch.zeros(2, 2, 4, dtype=torch.uint8)
    masks[0, 0, 0] = 1
    masks[1, 1, 3] = 1
    target = _target([[0, 0, 1, 1], [3, 1, 4, 2]], 4, 2, masks=masks)
    img, out = Resize([(8, 4)])(torch.zeros(3, 2, 4, dtype=torch.uint8), target)
    expected = torch.zeros(2, 4, 8, dtype=torch.uint8)
    expected[0, 0:2, 0:2] = 1           # each source pixel becomes a 2x2 block
    expected[1, 2:4, 6:8] = 1
    assert torch.equal(out["masks"], expected)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0, 2, 2], [6, 2, 8, 4]]))
    flipped_img, flipped = RandomHorizontalFlip(1.0)(img, out)
    # x' = W - x with W = 8: [0, 0, 2, 2] -> [6, 0, 8, 2]; [6, 2, 8, 4] -> [0, 2, 2, 4]
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[6.0, 0, 8, 2], [0, 2, 2, 4]]))
    assert torch.equal(flipped["masks"], expected.flip(-1))
    assert flipped["masks"][0, 0, 7] == 1 and flipped["masks"][1, 3, 0] == 1
    assert flipped["flip"] is True and out["flip"] is False


def test_flip_golden_image_boxes_and_ignore():
    image = torch.arange(6, dtype=torch.uint8).view(1, 1, 6).expand(3, 2, 6)
    target = _target([[1, 0, 4, 2]], 6, 2, ignore=[[0, 0, 2, 1]])
    out_img, out = RandomHorizontalFlip(1.0)(image, target)
    assert out_img[0, 0].tolist() == [5, 4, 3, 2, 1, 0]
    # W = 6: [1, 0, 4, 2] -> [2, 0, 5, 2]; ignore [0, 0, 2, 1] -> [4, 0, 6, 1]
    torch.testing.assert_close(out["boxes"], torch.tensor([[2.0, 0, 5, 2]]))
    torch.testing.assert_close(out["ignore_boxes"], torch.tensor([[4.0, 0, 6, 1]]))
    # flipping twice restores everything
    back_img, back = RandomHorizontalFlip(1.0)(out_img, out)
    assert torch.equal(back_img, image) and torch.equal(back["boxes"], target["boxes"])
    assert back["flip"] is False


def test_flip_probability_uses_the_generator():
    flip = RandomHorizontalFlip(0.5)
    image, target = torch.zeros(3, 2, 2, dtype=torch.uint8), _target([[0, 0, 1, 1]], 2, 2)
    draws = [flip(image, target, torch.Generator().manual_seed(s))[1]["flip"] for s in range(200)]
    again = [flip(image, target, torch.Generator().manual_seed(s))[1]["flip"] for s in range(200)]
    assert draws == again
    assert 70 < sum(draws) < 130            # ~Binomial(200, 0.5)
    assert not RandomHorizontalFlip(0.0)(image, target)[1]["flip"]


def test_random_choice_of_scales():
    resize = Resize([(8, 8), (16, 16)])
    image, target = torch.zeros(3, 4, 4, dtype=torch.uint8), _target([], 4, 4, ignore=())
    sizes = {resize(image, target, torch.Generator().manual_seed(s))[1]["img_shape"]
             for s in range(20)}
    assert sizes == {(8, 8), (16, 16)}


def test_normalize_golden_and_channel_order():
    image = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)
    out, _ = Normalize([5, 10, 15], [5, 2, 3], to_rgb=True)(image, {})
    # (10 - 5) / 5 = 1, (20 - 10) / 2 = 5, (30 - 15) / 3 = 5
    assert out.dtype == torch.float32 and out.flatten().tolist() == [1.0, 5.0, 5.0]
    bgr, _ = Normalize([0, 0, 0], [1, 1, 1], to_rgb=False)(image, {})
    assert bgr.flatten().tolist() == [30.0, 20.0, 10.0]
    with pytest.raises(DatasetConfigError):
        Normalize([0, 0], [1, 1], True)


def test_pil_input_and_compose_with_reference_pipeline():
    pil = Image.new("RGB", (20, 16), (123, 116, 103))
    pipeline = build_transforms([[1333, 800]], 0.5, [123.675, 116.28, 103.53],
                                [58.395, 57.12, 57.375], True, train=True)
    assert [type(t) for t in pipeline.transforms] == [Resize, RandomHorizontalFlip, Normalize]
    img, out = pipeline(pil, _target([[2, 4, 10, 12]], 20, 16), torch.Generator().manual_seed(0))
    # 20x16 -> s = min(1333/20, 800/16) = 50 -> 1000x800
    assert img.shape == (3, 800, 1000) and out["scale_factor"] == (50.0, 50.0)
    # (123 - 123.675) / 58.395 = -0.01156
    assert img[0, 0, 0].item() == pytest.approx(-0.675 / 58.395, abs=1e-6)
    assert as_tensor(pil).shape == (3, 16, 20)


def test_build_transforms_test_mode_and_bad_scales():
    pipeline = build_transforms([1333, 800], 0.5, [0, 0, 0], [1, 1, 1], True, train=False)
    assert isinstance(pipeline, Compose)
    assert [type(t) for t in pipeline.transforms] == [Resize, Normalize]   # never flips
    with pytest.raises(DatasetConfigError, match="exactly one"):
        build_transforms([[1333, 800], [1000, 600]], 0.0, [0, 0, 0], [1, 1, 1], True, train=False)
    with pytest.raises(DatasetConfigError, match="pairs"):
        build_transforms([[1333]], 0.0, [0, 0, 0], [1, 1, 1], True, train=True)
    with pytest.raises(DatasetConfigError, match="flip_prob"):
        build_transforms([[8, 8]], 1.5, [0, 0, 0], [1, 1, 1], True, train=True)
