"""build_dataset: the config entry point and its one name -> builder dict."""

from __future__ import annotations

import pytest

from pisa.data import (DATASETS, CocoDataset, DatasetConfigError, Normalize, RandomHorizontalFlip,
                       build_dataset)

DATA_CFG = {
    "train_transforms": {"scales": [[40, 32]], "flip_prob": 0.5},
    "test_transforms": {"scales": [[40, 32]]},
    "normalize": {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "to_rgb": False},
    "pad_divisor": 32, "batch_size": 2, "workers": 0, "aspect_grouping": True,
}


def test_coco_train_and_val(coco_files):
    ann_file, img_dir = coco_files
    split = {"type": "coco", "ann_file": ann_file, "img_dir": img_dir, "filter_empty": True}
    train = build_dataset(split, DATA_CFG, train=True)
    val = build_dataset(split, DATA_CFG, train=False)
    assert isinstance(train, CocoDataset) and len(train) == 2      # image 13 has no annotations
    assert len(val) == 3                                           # evaluation never drops images
    steps = train.transforms.transforms
    assert isinstance(steps[1], RandomHorizontalFlip) and steps[1].prob == 0.5
    assert not any(isinstance(t, RandomHorizontalFlip) for t in val.transforms.transforms)
    norm = steps[-1]
    assert isinstance(norm, Normalize) and norm.to_rgb is False
    assert norm.mean.flatten().tolist() == [1.0, 2.0, 3.0]
    image, target = val[0]
    assert image.shape == (3, 32, 40) and target["img_shape"] == (32, 40)


def test_synthetic_split(tmp_path):
    ds = build_dataset({"type": "synthetic", "split": "val", "root": str(tmp_path / "demo")},
                       DATA_CFG, train=False)
    assert ds.label_to_cat_id == [1, 3, 7, 9] and len(ds) == 100
    with pytest.raises(DatasetConfigError, match="'train' or 'val'"):
        build_dataset({"type": "synthetic", "split": "test", "root": str(tmp_path / "demo")},
                      DATA_CFG, train=False)


def test_unknown_type_lists_valid_ones():
    assert sorted(DATASETS) == ["coco", "synthetic"]
    with pytest.raises(DatasetConfigError, match=r"unknown dataset type 'voc'.*\['coco', 'synthetic'\]"):
        build_dataset({"type": "voc"}, DATA_CFG, train=True)


def test_unknown_and_missing_keys(coco_files):
    ann_file, img_dir = coco_files
    with pytest.raises(DatasetConfigError, match=r"unknown keys \['img_root'\].*'img_dir'"):
        build_dataset({"type": "coco", "ann_file": ann_file, "img_root": img_dir}, DATA_CFG, True)
    with pytest.raises(DatasetConfigError, match=r"missing keys \['img_dir'\]"):
        build_dataset({"type": "coco", "ann_file": ann_file}, DATA_CFG, True)
