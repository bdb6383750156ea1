"""pisa.predict's drawing: class colours, score order, label placement. The CLI runs in test_cli_e2e."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pisa.predict import PALETTE, class_colour, draw_detections

NAMES = ["circle", "square"]


def detections(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_each_box_has_its_class_colour_and_the_input_is_untouched():
    img = Image.new("RGB", (96, 96))
    drawn = draw_detections(img, detections([[10, 40, 40, 80], [50, 40, 90, 80]], [0, 1], [0.9, 0.8]), NAMES)
    # Left edges, below the labels (which sit above y = 40).
    assert drawn.getpixel((10, 60)) == class_colour(0) == PALETTE[0]
    assert drawn.getpixel((50, 60)) == class_colour(1) == PALETTE[1]
    assert PALETTE[0] != PALETTE[1]
    assert img.getpixel((10, 60)) == (0, 0, 0)


def test_labels_cycle_through_the_palette():
    assert class_colour(len(PALETTE) + 3) == PALETTE[3]


def test_the_higher_score_is_drawn_on_top_whatever_the_input_order():
    img = Image.new("RGB", (96, 96))
    box = [20, 40, 70, 90]
    for scores in ([0.9, 0.4], [0.4, 0.9]):
        drawn = draw_detections(img, detections([box, box], [0, 1], scores), NAMES)
        winner = 0 if scores[0] > scores[1] else 1
        assert drawn.getpixel((20, 70)) == class_colour(winner)


def _share_of_colour(img, y, xs, colour):
    return sum(img.getpixel((x, y)) == colour for x in xs) / len(xs)


def test_label_sits_above_the_box_or_inside_it_at_the_top_edge():
    img = Image.new("RGB", (96, 96))
    colour = class_colour(1)
    inner = range(33, 50)  # right of the 2 px outline, under the label
    # The label's last row is fill only: the text has 1 px of margin above and below it.
    _, top, _, bottom = ImageDraw.Draw(img).textbbox((0, 0), "square 0.50", font=ImageFont.load_default())
    last_row = bottom - top + 1
    above = draw_detections(img, detections([[30, 50, 90, 90]], [1], [0.5]), NAMES)
    # The label ends on the row just above the box ...
    assert _share_of_colour(above, 49, inner, colour) == 1
    assert _share_of_colour(above, 53, inner, colour) == 0  # ... and does not reach into it
    # ... or, with no room above the box, it fills the box's first rows.
    at_top = draw_detections(img, detections([[30, 0, 90, 60]], [1], [0.5]), NAMES)
    assert _share_of_colour(at_top, last_row, inner, colour) == 1
    assert _share_of_colour(at_top, last_row + 3, inner, colour) == 0


def test_no_detections_gives_an_rgb_copy():
    img = Image.new("L", (8, 8), 7)
    drawn = draw_detections(img, detections(torch.zeros((0, 4)).tolist(), [], []), NAMES)
    assert drawn.mode == "RGB" and drawn.getpixel((3, 3)) == (7, 7, 7)


def test_a_label_at_the_right_edge_is_shifted_into_the_image():
    img = Image.new("RGB", (96, 96))
    drawn = draw_detections(img, detections([[86, 50, 95, 90]], [1], [0.5]), NAMES)
    # The label is wider than the 10 px box: it extends to the left of it, and its fill reaches
    # the image's last column.
    assert _share_of_colour(drawn, 49, range(60, 86), class_colour(1)) == 1
    assert drawn.getpixel((95, 49)) == class_colour(1)


def test_to_coco_writes_masks_as_rle_that_decode_to_the_masks():
    from pycocotools import mask as mask_util

    from pisa.predict import to_coco

    masks = torch.zeros((2, 6, 8), dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # 6 pixels
    masks[1, 4:, :] = True     # 16 pixels
    det = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([1, 0]), "masks": masks}
    rows = to_coco(7, Path("img.jpg"), det, [3, 9])
    assert [r["category_id"] for r in rows] == [9, 3]
    for row, mask in zip(rows, masks):
        assert row["segmentation"]["size"] == [6, 8] and isinstance(row["segmentation"]["counts"], str)
        assert (mask_util.decode(row["segmentation"]) == mask.numpy()).all()
    assert "segmentation" not in to_coco(7, Path("img.jpg"), {k: v for k, v in det.items() if k != "masks"},
                                         [3, 9])[0]


def test_a_photo_with_an_exif_rotation_is_read_upright(tmp_path):
    """A viewer shows a 24x12 file tagged orientation 6 as 12 wide and 24 high; predict reads it so."""
    from pisa.predict import load_image

    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (24, 12, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.png", exif=exif)
    image, target = load_image(tmp_path / "photo.png", lambda img, t: (img, t))
    assert image.size == (12, 24) and target["ori_shape"] == (24, 12)
    np.testing.assert_array_equal(np.asarray(image), upright)
