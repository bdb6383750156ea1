"""CocoDataset: label mapping, box conventions, crowds, degenerate boxes, modes, masks, storage."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pisa.data import CocoDataset, build_transforms
from pisa.data.coco_index import PackedBytes


def test_category_mapping_round_trip_with_non_contiguous_ids(coco_files):
    ds = CocoDataset(*coco_files)
    # categories are listed as 5, 2: labels follow ascending category id
    assert ds.num_classes == 2
    assert ds.label_to_cat_id == [2, 5]
    assert ds.cat_id_to_label == {2: 0, 5: 1}
    assert ds.class_names == ["two", "five"]
    for label, cat_id in enumerate(ds.label_to_cat_id):
        assert ds.cat_id_to_label[cat_id] == label


def test_boxes_labels_crowd_and_empty_images(coco_files):
    ds = CocoDataset(*coco_files)
    assert len(ds) == 3 and ds.image_ids.tolist() == [11, 12, 13]
    ann = ds.get_annotations(0)
    # [x, y, w, h] -> [x, y, x + w, y + h]: [2, 4, 8, 8] -> [2, 4, 10, 12]; [15, 10, 5, 6] -> [15, 10, 20, 16]
    np.testing.assert_array_equal(ann["boxes"], [[2, 4, 10, 12], [15, 10, 20, 16]])
    np.testing.assert_array_equal(ann["labels"], [1, 0])          # cat 5 -> 1, cat 2 -> 0
    np.testing.assert_array_equal(ann["ignore_boxes"], [[0, 0, 6, 3]])  # the crowd region
    assert ds.get_annotations(2)["boxes"].shape == (0, 4)         # image 13 kept, no objects
    assert ds.get_annotations(2)["ignore_boxes"].shape == (0, 4)


def test_getitem_contract(coco_files):
    image, target = CocoDataset(*coco_files)[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 20)   # no transforms: raw RGB
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["labels"].dtype == torch.int64
    assert target["ignore_boxes"].dtype == torch.float32
    assert target["image_id"] == 11 and target["flip"] is False
    assert target["ori_shape"] == target["img_shape"] == (16, 20)
    assert target["scale_factor"] == (1.0, 1.0)
    assert "masks" not in target


def test_getitem_with_transforms_is_normalised_float(coco_files):
    transforms = build_transforms([(40, 32)], 0.0, [0, 0, 0], [255, 255, 255], True, train=False)
    image, target = CocoDataset(*coco_files, transforms)[0]
    # 20x16 -> s = min(40/20, 32/16) = 2 -> 40x32
    assert image.dtype == torch.float32 and image.shape == (3, 32, 40)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["img_shape"] == (32, 40) and target["ori_shape"] == (16, 20)
    torch.testing.assert_close(target["boxes"][0], torch.tensor([4.0, 8.0, 20.0, 24.0]))


def test_degenerate_boxes_dropped_and_counted(make_coco, base_coco):
    anns = base_coco["annotations"]
    anns += [
        {"id": 10, "image_id": 12, "category_id": 2, "bbox": [3, 3, 0, 5], "area": 1},     # w = 0
        {"id": 11, "image_id": 12, "category_id": 2, "bbox": [3, 3, -4, 5], "area": 1},    # w < 0
        {"id": 12, "image_id": 12, "category_id": 2, "bbox": [3, 3, 0.5, 5], "area": 1},   # w < 1
        {"id": 13, "image_id": 12, "category_id": 2, "bbox": [3, 3, 4, 5], "area": 0},     # area 0
        {"id": 14, "image_id": 12, "category_id": 2, "bbox": [11.5, 3, 4, 5], "area": 20},  # 0.5 px
        {"id": 15, "image_id": 12, "category_id": 2, "bbox": [30, 3, 4, 5], "area": 20},   # outside
        {"id": 16, "image_id": 12, "category_id": 2, "bbox": [-2, 20, 6, 9], "area": 54},  # clipped
    ]
    ds = CocoDataset(*make_coco(base_coco))
    assert ds.index.dropped_degenerate == 6
    # id 16: [-2, 20, 4, 29] clipped to the 12x24 image -> [0, 20, 4, 24] (kept: 4 x 4 px)
    np.testing.assert_array_equal(ds.get_annotations(1)["boxes"], [[1, 2, 11, 22], [0, 20, 4, 24]])
    assert "degenerate boxes dropped: 6" in ds.summary()


def test_filter_empty(make_coco, base_coco):
    # image 14 has only a degenerate annotation: kept, as the reference keeps it
    base_coco["images"].append({"id": 14, "file_name": "d.jpg", "width": 8, "height": 8})
    base_coco["annotations"].append({"id": 9, "image_id": 14, "category_id": 2, "bbox": [1, 1, 0, 0]})
    files = make_coco(base_coco)
    assert CocoDataset(*files).image_ids.tolist() == [11, 12, 13, 14]
    ds = CocoDataset(*files, filter_empty=True)
    assert ds.image_ids.tolist() == [11, 12, 14]
    assert [ds[i][1]["image_id"] for i in range(len(ds))] == [11, 12, 14]
    assert ds.aspect_ratio_flags().tolist() == [1, 0, 1]   # 20x16, 12x24, 8x8 (w >= h)
    assert "1 without annotations removed by filter_empty" in ds.summary()


def test_ignore_flag_and_missing_annotations_key(make_coco, base_coco):
    base_coco["annotations"][0]["ignore"] = 1
    assert len(CocoDataset(*make_coco(base_coco)).get_annotations(0)["boxes"]) == 1
    del base_coco["annotations"]
    ds = CocoDataset(*make_coco(base_coco, name="no_anns"))
    assert len(ds) == 3 and ds.index.boxes.shape == (0, 4)


def test_summary_lists_counts(coco_files):
    summary = CocoDataset(*coco_files).summary()
    assert "images: 3 of 3 in the file; 1 without objects" in summary
    assert "objects: 3 in 2 classes; crowd regions (ignored): 1" in summary
    assert "skipped (on_error='raise'): 0" in summary
    assert "0    2 two                  1" in summary and "1    5 five                 2" in summary
    assert len(summary.splitlines()) <= 25


def test_storage_is_compact(coco_files):
    ds = CocoDataset(*coco_files)
    ix = ds.index
    for name in ("image_ids", "widths", "heights", "boxes", "labels", "box_offsets",
                 "ignore_boxes", "ignore_offsets", "has_annotation"):
        assert isinstance(getattr(ix, name), np.ndarray), name
    assert ix.boxes.dtype == np.float32 and ix.labels.dtype == np.int64
    assert isinstance(ix.file_names, PackedBytes) and ix.segms is None
    assert ix.box_offsets.tolist() == [0, 2, 3, 3]
    assert len(pickle.dumps(ds)) < 4000  # what a spawned worker receives


def test_packed_bytes_round_trip():
    items = [b"a.jpg", b"", "ü/ß.png".encode()]
    packed = PackedBytes(items)
    assert [packed[i] for i in range(len(packed))] == items


@pytest.mark.parametrize("mode, pixel, expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 0), (77, 77, 77)),                   # alpha dropped
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),         # alpha dropped, colour kept
    ("P", 1, (200, 100, 50)),                        # palette entry 1
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),         # no ink -> white
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),         # magenta + yellow -> red
    ("I;16", 0x1234, (0x12, 0x12, 0x12)),            # top 8 bits: 4660 >> 8 = 18
    ("I", 1000, (3, 3, 3)),                          # > 255: 16-bit range, 1000 >> 8 = 3
    ("I", 100, (100, 100, 100)),                     # <= 255: already 8-bit
    ("F", 0.5, (128, 128, 128)),                     # max <= 1: 0.5 * 255 = 127.5 -> 128
    ("F", 200.0, (200, 200, 200)),                   # 0-255 float
])
def test_pil_modes_become_rgb(make_coco, mode, pixel, expected):
    coco = {"images": [{"id": 1, "file_name": "x.tif", "width": 3, "height": 2}],
            "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    ann_file, img_dir = make_coco(coco, write_images=False)
    img = Image.new(mode, (3, 2), pixel)
    if mode == "P":
        img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.save(Path(img_dir) / "x.tif")
    assert Image.open(Path(img_dir) / "x.tif").mode == mode
    ds = CocoDataset(ann_file, img_dir)
    loaded = ds.load_image(0)
    assert loaded.mode == "RGB" and loaded.size == (3, 2)
    assert loaded.getpixel((2, 1)) == expected
    assert ds[0][0].shape == (3, 2, 3)


def _square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_polygon_and_rle_masks(make_coco, base_coco):
    anns = base_coco["annotations"]
    # A leading 2-point part covers nothing and would make pycocotools read the list as boxes: dropped.
    anns[0]["segmentation"] = [[2, 4, 10, 12], _square(2, 4, 10, 12)]
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((2, 3), np.uint8), ((1, 13), (16, 1)))))
    anns[1]["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}  # compressed
    anns[3]["segmentation"] = {"size": [24, 12], "counts": [24 * 3 + 5, 4, 24 * 12 - 81]}  # uncompressed
    ds = CocoDataset(*make_coco(base_coco), with_masks=True)
    assert ds.index.segms is not None and len(ds.index.segms) == 3
    masks = ds.load_masks(0)
    assert masks.dtype == np.uint8 and masks.shape == (2, 16, 20)
    assert masks[0].sum() == 64 and masks[0][4:12, 2:10].all()   # the 8x8 square
    assert masks[1].sum() == 6 and masks[1][1:3, 16:19].all()    # the 2x3 RLE block
    # column-major counts: skip 3 columns and 5 rows, then 4 ones down column 3
    m = ds.load_masks(1)
    assert m.shape == (1, 24, 12) and m.sum() == 4 and m[0, 5:9, 3].all()
    assert ds[0][1]["masks"].shape == (2, 16, 20) and ds[2][1]["masks"].shape == (0, 16, 16)


@pytest.mark.parametrize("orientation", [6, 8])
def test_sideways_stored_camera_image_is_turned_by_its_exif_orientation(make_coco, base_coco, orientation):
    """Image 12 is annotated 12x24 (as displayed) but stored 24x12 with an EXIF rotation: it is
    turned upright. Stored 24x12 without the tag, or with a 180-degree one, it is a size mismatch."""
    from pisa.data import errors as E

    _, img_dir = make_coco(base_coco)
    upright = np.asarray(Image.open(Path(img_dir) / "b.jpg").convert("RGB"))  # 24 rows x 12 columns
    # Stored as a camera would: turned so that applying the tag gives `upright` back; PNG keeps pixels.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90 if orientation == 6
                                                else Image.Transpose.ROTATE_270)
    base_coco["images"][1]["file_name"] = "b.png"
    ann_file, img_dir = make_coco(base_coco, write_images=False)  # same folder, new annotation file
    for tag, turned in ((orientation, True), (None, False), (3, False)):
        exif = Image.Exif()
        if tag:
            exif[0x0112] = tag
        stored.save(Path(img_dir) / "b.png", exif=exif)
        ds = CocoDataset(ann_file, img_dir)
        if turned:
            img = ds.load_image(1)
            assert img.size == (12, 24)
            np.testing.assert_array_equal(np.asarray(img), upright)
        else:
            with pytest.raises(E.ImageSizeMismatchError, match="24x12"):
                ds.load_image(1)
