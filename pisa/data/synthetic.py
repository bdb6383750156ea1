"""Embedded demo data: a seeded generator of a small COCO-format shapes dataset.

Four shape classes with non-contiguous category ids (circle 1, square 3, triangle 7, cross 9) are
drawn on textured, noisy backgrounds; each object has a polygon segmentation, its box is the
polygon's extent, and boxes and masks are amodal (an object partly covered by a later one keeps its
full outline). Colours vary within a class around a class hue; sizes run from tiny to large, mostly
12-80 px; about 8% of images are empty. The dataset is written once into a cache folder, atomically
(built in a temporary folder, then renamed), so a crash never leaves half a dataset.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pisa.data.errors import DatasetError

DEMO_NAME = "demo-v1"
CATEGORIES = [(1, "circle"), (3, "square"), (7, "triangle"), (9, "cross")]
_CLASS_HUES = {1: 0.0, 3: 0.25, 7: 0.5, 9: 0.75}       # colour varies +-0.1 around these
_IMAGE_SIZES = [(160, 160), (192, 144), (144, 192), (176, 160)]  # (width, height)
_SPLIT_CODES = {"train": 1, "val": 2}
_EMPTY_FRACTION = 0.08


def default_demo_root() -> Path:
    """``$PISA_DATA_DIR/demo-v1`` when the variable is set, else ``~/.cache/pisa/demo-v1``."""
    base = os.environ.get("PISA_DATA_DIR")
    return Path(base) / DEMO_NAME if base else Path.home() / ".cache" / "pisa" / DEMO_NAME


def demo_paths(root: str | os.PathLike) -> dict[str, str]:
    """Where the demo dataset under ``root`` keeps its files."""
    root = Path(root)
    return {"root": str(root),
            "train_ann": str(root / "annotations" / "instances_train.json"),
            "train_img_dir": str(root / "train"),
            "val_ann": str(root / "annotations" / "instances_val.json"),
            "val_img_dir": str(root / "val")}


def ensure_demo_dataset(root: str | os.PathLike | None = None, *, num_train: int = 600,
                        num_val: int = 100, seed: int = 0) -> dict[str, str]:
    """Generate the demo dataset under ``root`` unless it is there; return its paths.

    Returns a dict with ``root``, ``train_ann``, ``train_img_dir``, ``val_ann``, ``val_img_dir``.
    A folder generated with other sizes or seed raises DatasetError (pass another root).
    """
    root = Path(root) if root is not None else default_demo_root()
    params = {"name": DEMO_NAME, "num_train": num_train, "num_val": num_val, "seed": seed}
    if not _is_complete(root, params):
        _build_atomically(root, params)
    return demo_paths(root)


def _is_complete(root: Path, params: dict) -> bool:
    meta_file = root / "meta.json"
    if not meta_file.exists():
        if root.exists() and any(root.iterdir()):
            raise DatasetError(f"{root} exists but holds no demo dataset (no meta.json). Remove it or "
                               "choose another root / PISA_DATA_DIR.", path=str(root))
        return False
    meta = json.loads(meta_file.read_text())
    if meta != params:
        raise DatasetError(f"the demo dataset in {root} was generated with {meta}, not {params}. "
                           "Choose another root, or remove the folder to regenerate.", path=str(root))
    return True


def _build_atomically(root: Path, params: dict) -> None:
    """Write everything into a temporary sibling folder, then rename it to ``root``."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write_split(tmp, "train", params["num_train"], params["seed"])
        write_split(tmp, "val", params["num_val"], params["seed"])
        (tmp / "meta.json").write_text(json.dumps(params))
        try:
            os.rename(tmp, root)  # atomic; replaces an empty root folder
        except OSError:
            if not (root / "meta.json").exists():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_split(root: str | os.PathLike, split: str, num_images: int, seed: int = 0) -> None:
    """Write ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], k])
        image_id = _SPLIT_CODES[split] * 100000 + k + 1
        file_name = f"{image_id:06d}.jpg"
        picture, objects = render_image(rng)
        picture.save(root / split / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name,
                       "width": picture.width, "height": picture.height})
        for cat_id, polygon in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, cat_id, polygon))
    coco = {"info": {"description": f"pisa {DEMO_NAME} shapes, {split}", "version": "1"},
            "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in CATEGORIES]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _annotation(ann_id: int, image_id: int, cat_id: int, polygon: np.ndarray) -> dict:
    """COCO annotation of a polygon ``[P, 2]`` (box = its extent, area = shoelace area)."""
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    x, y = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "iscrowd": 0,
            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            "area": round(area, 2),
            "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]]}


def render_image(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """One picture and its objects ``[(category_id, polygon [P, 2] float), ...]``."""
    width, height = _IMAGE_SIZES[rng.integers(len(_IMAGE_SIZES))]
    picture = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(picture)
    num_objects = 0 if rng.random() < _EMPTY_FRACTION else int(rng.integers(1, 7))
    objects: list[tuple[int, np.ndarray]] = []
    boxes: list[np.ndarray] = []
    for _ in range(num_objects):
        placed = _place_object(rng, width, height, boxes)
        if placed is None:
            continue
        cat_id, polygon = placed
        draw.polygon([tuple(p) for p in polygon], fill=_object_colour(rng, cat_id))
        objects.append(placed)
        boxes.append(np.concatenate([polygon.min(axis=0), polygon.max(axis=0)]))
    pixels = np.asarray(picture, dtype=np.float32) + _noise(rng, 5.0, (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), objects


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 ``[H, W, 3]``: a dull base colour, low-frequency blotches, faint lines and noise."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.5)))
    coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(((coarse + 3) * 40).clip(0, 255).astype(np.uint8))
                          .resize((width, height), Image.BICUBIC), dtype=np.float32) - 120
    pixels = (base * 255).astype(np.float32) + 0.25 * blotches + _noise(rng, 6.0, (height, width, 3))
    picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(0, 4))):
        ends = rng.uniform(0, 1, 4) * [width, height, width, height]
        shade = tuple(int(v) for v in np.clip(base * 255 + rng.normal(0, 20, 3), 0, 255))
        draw.line(list(ends), fill=shade, width=1)
    return np.asarray(picture)


def _noise(rng: np.random.Generator, sigma: float, shape: tuple) -> np.ndarray:
    """float32 Gaussian pixel noise."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _object_size(rng: np.random.Generator, limit: float) -> float:
    """Mostly 12-80 px (log-uniform); 5% tiny (7-12 px), 5% large (80-120 px)."""
    u = rng.random()
    low, high = (7, 12) if u < 0.05 else (80, 120) if u > 0.95 else (12, 80)
    return float(min(np.exp(rng.uniform(np.log(low), np.log(high))), limit))


def _place_object(rng: np.random.Generator, width: int, height: int, boxes: list[np.ndarray],
                  max_iou: float = 0.3, tries: int = 20) -> tuple[int, np.ndarray] | None:
    """A random shape fully inside the image, overlapping earlier boxes by IoU <= ``max_iou``."""
    for _ in range(tries):
        cat_id = CATEGORIES[rng.integers(len(CATEGORIES))][0]
        polygon = _shape(rng, cat_id, _object_size(rng, min(width, height) - 4))
        extent = polygon.max(axis=0) - polygon.min(axis=0)
        free = np.array([width, height]) - extent
        if (free < 1).any():
            continue
        polygon = polygon - polygon.min(axis=0) + rng.uniform(0.5, free - 0.5)
        box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
        if all(_iou(box, other) <= max_iou for other in boxes):
            return cat_id, polygon
    return None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
    return float(inter / union)


def _shape(rng: np.random.Generator, cat_id: int, size: float) -> np.ndarray:
    """Polygon ``[P, 2]`` of the class's shape, about ``size`` px across, centred at 0."""
    if cat_id == 1:  # circle (slightly elliptic)
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        points = np.stack([np.cos(t), np.sin(t) * rng.uniform(0.85, 1.15)], axis=1) * size / 2
        angle = rng.uniform(0, np.pi)
    elif cat_id == 3:  # square / near-square rectangle, slightly rotated
        aspect = rng.uniform(0.8, 1.25)
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * size / 2
        points[:, 1] *= aspect
        angle = rng.uniform(-0.2, 0.2)
    elif cat_id == 7:  # triangle, any orientation
        t = np.pi / 2 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.normal(0, 0.1, 3)
        points = np.stack([np.cos(t), np.sin(t)], axis=1) * size / 2
        angle = rng.uniform(0, 2 * np.pi)
    else:  # cross (plus sign), slightly rotated
        a, b = size / 2, size / 2 * rng.uniform(0.28, 0.4)
        points = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                           [-b, b], [-a, b], [-a, -b], [-b, -b]])
        angle = rng.uniform(-0.2, 0.2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def _object_colour(rng: np.random.Generator, cat_id: int) -> tuple[int, int, int]:
    """A saturated, bright colour whose hue varies by +-0.1 around the class hue."""
    hue = (_CLASS_HUES[cat_id] + rng.uniform(-0.1, 0.1)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
    return tuple(int(round(255 * v)) for v in rgb)
