"""pisa.predict's mask drawing: filled, semi-transparent, in the class colour of the box, score order."""

import pytest
import torch
from PIL import Image

from pisa.predict import MASK_OPACITY, class_colour, draw_detections, draw_masks

NAMES = ["circle", "square", "ring"]


def blend(base, colour, opacity=MASK_OPACITY):
    return tuple(round((1 - opacity) * b + opacity * c) for b, c in zip(base, colour))


def mask_detections(masks, labels, scores, boxes=None, size=(60, 80)):
    h, w = size
    full = torch.zeros(len(masks), h, w, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(masks):
        full[k, y1:y2, x1:x2] = True
    boxes = masks if boxes is None else boxes
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores), "masks": full}


def test_a_mask_is_its_class_colour_blended_over_the_image_and_nothing_else_changes():
    img = Image.new("RGB", (80, 60), (200, 100, 0))
    drawn = draw_masks(img, mask_detections([[10, 10, 30, 40]], [1], [0.9]))
    # opacity 1/2: (200, 100, 0) and PALETTE[1] = (60, 180, 75) give (130, 140, 37.5 -> 38).
    assert drawn.getpixel((20, 20)) == blend((200, 100, 0), class_colour(1)) == (130, 140, 38)
    assert drawn.getpixel((9, 20)) == drawn.getpixel((30, 20)) == (200, 100, 0)  # just outside
    assert drawn.getpixel((29, 39)) == (130, 140, 38)  # the mask's last pixel
    assert img.getpixel((20, 20)) == (200, 100, 0)  # the input is untouched


def test_overlapping_masks_blend_in_score_order_whatever_the_input_order():
    base = (0, 0, 0)
    for scores in ([0.9, 0.3], [0.3, 0.9]):
        img = Image.new("RGB", (80, 60), base)
        drawn = draw_masks(img, mask_detections([[0, 0, 40, 40], [20, 20, 60, 60]], [0, 2], scores))
        high, low = (0, 2) if scores[0] > scores[1] else (2, 0)
        # The lower score is blended first, the higher over it: the higher one's colour weighs 1/2,
        # the lower one's 1/4 (blending runs in float; only the result is rounded).
        expected = tuple(round(0.5 * (0.5 * b + 0.5 * lo) + 0.5 * hi)
                         for b, lo, hi in zip(base, class_colour(low), class_colour(high)))
        assert drawn.getpixel((30, 30)) == expected
        assert drawn.getpixel((10, 10)) == blend(base, class_colour(0))
        assert drawn.getpixel((50, 50)) == blend(base, class_colour(2))


def test_draw_detections_fills_masks_under_the_boxes_and_labels():
    img = Image.new("RGB", (80, 60))
    det = mask_detections([[22, 32, 48, 46]], [1], [0.8], boxes=[[20, 30, 50, 52]])
    drawn = draw_detections(img, det, NAMES)
    assert drawn.getpixel((35, 40)) == blend((0, 0, 0), class_colour(1))  # inside the mask
    assert drawn.getpixel((20, 45)) == class_colour(1)  # the box outline, drawn over it, stays pure
    assert drawn.getpixel((35, 48)) == (0, 0, 0)  # inside the box, outside the mask


def test_no_masks_and_grey_images():
    img = Image.new("L", (80, 60), 7)
    drawn = draw_masks(img, mask_detections([], [], []))
    assert drawn.mode == "RGB" and drawn.getpixel((3, 3)) == (7, 7, 7)
    det = mask_detections([[0, 0, 10, 10]], [0], [0.5])
    assert draw_masks(img, det).getpixel((5, 5)) == blend((7, 7, 7), class_colour(0))


def test_masks_of_another_size_than_the_image_are_an_error_naming_both():
    det = mask_detections([[0, 0, 10, 10]], [0], [0.5], size=(30, 40))
    with pytest.raises(ValueError, match=r"\(1, 30, 40\).*60x80"):
        draw_masks(Image.new("RGB", (80, 60)), det)
