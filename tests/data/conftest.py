"""Tiny COCO-format datasets written into tmp dirs for the data tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Two images, non-contiguous category ids 5 and 2 (listed out of order on purpose), one crowd region.
BASE_COCO = {
    "images": [
        {"id": 11, "file_name": "a.jpg", "width": 20, "height": 16},
        {"id": 12, "file_name": "b.jpg", "width": 12, "height": 24},
        {"id": 13, "file_name": "c.jpg", "width": 16, "height": 16},   # no annotations
    ],
    "annotations": [
        {"id": 1, "image_id": 11, "category_id": 5, "bbox": [2, 4, 8, 8], "area": 64, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 2, "bbox": [15, 10, 5, 6], "area": 30, "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 2, "bbox": [0, 0, 6, 3], "area": 18, "iscrowd": 1},
        {"id": 4, "image_id": 12, "category_id": 5, "bbox": [1, 2, 10, 20], "area": 200, "iscrowd": 0},
    ],
    "categories": [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}],
}


def write_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A random RGB JPEG of the given size."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_coco(root: Path, coco: dict, write_images: bool = True) -> tuple[str, str]:
    """Write ``coco`` as root/ann.json and its images into root/images; return both paths."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if write_images:
        for k, img in enumerate(coco.get("images", [])):
            if isinstance(img, dict) and {"file_name", "width", "height"} <= set(img):
                if isinstance(img["width"], int) and isinstance(img["height"], int):
                    write_image(img_dir / img["file_name"], img["width"], img["height"], seed=k)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(coco))
    return str(ann_file), str(img_dir)


@pytest.fixture
def base_coco() -> dict:
    return copy.deepcopy(BASE_COCO)


@pytest.fixture
def coco_files(tmp_path, base_coco) -> tuple[str, str]:
    return write_coco(tmp_path, base_coco)


@pytest.fixture
def make_coco(tmp_path):
    """``make(coco=None, write_images=True, name="ds") -> (ann_file, img_dir)`` under tmp_path."""
    def make(coco: dict | None = None, write_images: bool = True, name: str = "ds"):
        coco = copy.deepcopy(BASE_COCO) if coco is None else coco
        return write_coco(tmp_path / name, coco, write_images)
    return make
