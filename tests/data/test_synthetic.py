"""The embedded demo data: deterministic, valid COCO, atomic, learnable shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pisa.data import CocoDataset, DatasetError, ensure_demo_dataset
from pisa.data import synthetic
from pisa.data.synthetic import default_demo_root, write_split


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path):
    write_split(tmp_path / "a", "val", 12, seed=3)
    write_split(tmp_path / "b", "val", 12, seed=3)
    write_split(tmp_path / "c", "val", 12, seed=4)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 13                       # 12 JPEGs + the JSON, byte for byte
    assert a["annotations/instances_val.json"] != c["annotations/instances_val.json"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_valid_coco_that_pycocotools_loads(tmp_path):
    paths = ensure_demo_dataset(tmp_path / "demo", num_train=30, num_val=10)
    coco = COCO(paths["train_ann"])
    assert sorted(coco.getCatIds()) == [1, 3, 7, 9]     # non-contiguous ids
    assert len(coco.getImgIds()) == 30
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 30
    for ann in anns[:20]:
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        # the polygon rasterises inside its (slightly padded) box, with about its area
        ys, xs = np.nonzero(mask)
        assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
        assert ys.min() >= np.floor(y) - 1 and ys.max() <= np.ceil(y + h) + 1
        assert abs(mask.sum() - ann["area"]) <= 0.15 * ann["area"] + 6
    images = coco.loadImgs(coco.getImgIds())
    assert all(img["file_name"].endswith(".jpg") for img in images)
    assert {(img["width"], img["height"]) for img in images} <= {(160, 160), (192, 144),
                                                                  (144, 192), (176, 160)}


def test_learnable_statistics():
    # counts 0-6 per image, ~8% empty, mostly 12-80 px, all four classes present
    rng = np.random.default_rng(0)
    counts, sizes, classes = [], [], []
    for _ in range(100):
        _, objects = synthetic.render_image(rng)
        counts.append(len(objects))
        for cat_id, polygon in objects:
            extent = polygon.max(axis=0) - polygon.min(axis=0)
            sizes.append(np.sqrt(extent.prod()))
            classes.append(cat_id)
    counts, sizes = np.array(counts), np.array(sizes)
    assert counts.max() <= 6 and 0.02 < (counts == 0).mean() < 0.2
    assert 0.75 < ((sizes >= 10) & (sizes <= 90)).mean() and sizes.min() >= 5
    assert set(classes) == {1, 3, 7, 9}


def test_dataset_over_demo_data_maps_labels_and_decodes_masks(tmp_path):
    paths = ensure_demo_dataset(tmp_path / "demo", num_train=10, num_val=6)
    ds = CocoDataset(paths["val_ann"], paths["val_img_dir"], with_masks=True)
    assert ds.label_to_cat_id == [1, 3, 7, 9]
    assert ds.class_names == ["circle", "square", "triangle", "cross"]
    image, target = ds[0]
    assert image.shape[0] == 3 and target["masks"].shape[0] == len(target["boxes"])


def test_ensure_is_idempotent_and_checks_parameters(tmp_path):
    root = tmp_path / "demo"
    ensure_demo_dataset(root, num_train=4, num_val=2)
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert ensure_demo_dataset(root, num_train=4, num_val=2)["root"] == str(root)
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="generated with"):
        ensure_demo_dataset(root, num_train=5, num_val=2)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="no meta.json"):
        ensure_demo_dataset(stray)


def test_generation_is_atomic(tmp_path, monkeypatch):
    def crash(root, split, num_images, seed=0):
        if split == "val":
            raise RuntimeError("simulated crash")
        write_split(root, split, num_images, seed)
    monkeypatch.setattr(synthetic, "write_split", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_demo_dataset(tmp_path / "demo", num_train=3, num_val=2)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the temporary folder is left


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PISA_DATA_DIR", str(tmp_path))
    assert default_demo_root() == tmp_path / "demo-v1"
    monkeypatch.delenv("PISA_DATA_DIR")
    assert default_demo_root() == Path.home() / ".cache" / "pisa" / "demo-v1"


def test_meta_records_parameters(tmp_path):
    paths = ensure_demo_dataset(tmp_path / "d", num_train=2, num_val=1, seed=5)
    meta = json.loads((Path(paths["root"]) / "meta.json").read_text())
    assert meta == {"name": "demo-v1", "num_train": 2, "num_val": 1, "seed": 5}
