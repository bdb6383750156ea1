"""Data: COCO-format datasets, transforms, batching and the embedded demo data.

Config entry points: :func:`build_dataset` (one split of the ``data:`` block) and
:func:`build_dataloader`. See docs/data.md.
"""

from __future__ import annotations

from typing import Any, Callable

from pisa.data.batching import (Collate, GroupedBatchSampler, InferenceBatchSampler, WorkerSeeder,
                                build_dataloader, collate, pad_images)
from pisa.data.coco import CocoDataset
from pisa.data.coco_index import CocoIndex, build_coco_index
from pisa.data.errors import (AnnotationError, AnnotationFileError, CategoryError,
                              DatasetConfigError, DatasetError, DuplicateAnnotationIdError,
                              DuplicateImageIdError, ImageDecodeError, ImageLoadError,
                              ImageNotFoundError, ImageRecordError, ImageSizeMismatchError,
                              MalformedBoxError, UnknownCategoryIdError, UnknownImageIdError)
from pisa.data.synthetic import default_demo_root, ensure_demo_dataset
from pisa.data.ssd_transforms import build_ssd_transforms
from pisa.data.transforms import (Compose, Normalize, RandomHorizontalFlip, Resize,
                                  build_transforms, rescale_size)

# Reference defaults (ImageNet statistics in RGB order, 0-255 units).
_DEFAULT_NORMALIZE = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                      "to_rgb": True}
_OPTIONAL_KEYS = {"filter_empty", "with_masks", "on_error"}


def _check_keys(cfg_split: dict, required: set[str], optional: set[str]) -> None:
    kind = cfg_split["type"]
    unknown = set(cfg_split) - required - optional - {"type"}
    missing = required - set(cfg_split)
    if unknown or missing:
        problem = f"unknown keys {sorted(unknown)}" if unknown else f"missing keys {sorted(missing)}"
        raise DatasetConfigError(f"dataset of type '{kind}' has {problem}; its keys are "
                                 f"{sorted(required | optional | {'type'})}")


def _coco_options(cfg_split: dict, train: bool) -> dict[str, Any]:
    # Evaluation never drops images: every image must be scored.
    return {"filter_empty": bool(cfg_split.get("filter_empty", False)) and train,
            "with_masks": bool(cfg_split.get("with_masks", False)),
            "on_error": cfg_split.get("on_error", "raise")}


def _build_coco(cfg_split: dict, transforms: Callable, train: bool) -> CocoDataset:
    _check_keys(cfg_split, {"ann_file", "img_dir"}, _OPTIONAL_KEYS)
    return CocoDataset(cfg_split["ann_file"], cfg_split["img_dir"], transforms,
                       **_coco_options(cfg_split, train))


def _build_synthetic(cfg_split: dict, transforms: Callable, train: bool) -> CocoDataset:
    _check_keys(cfg_split, {"split"}, _OPTIONAL_KEYS | {"root"})
    split = cfg_split["split"]
    if split not in ("train", "val"):
        raise DatasetConfigError(f"synthetic split {split!r} must be 'train' or 'val'")
    paths = ensure_demo_dataset(cfg_split.get("root"))
    return CocoDataset(paths[f"{split}_ann"], paths[f"{split}_img_dir"], transforms,
                       **_coco_options(cfg_split, train))


DATASETS: dict[str, Callable[[dict, Callable, bool], CocoDataset]] = {
    "coco": _build_coco,
    "synthetic": _build_synthetic,
}


def transforms_from_config(data_cfg: dict, train: bool) -> Compose:
    """The pipeline a ``data:`` block describes (``train_transforms`` or ``test_transforms``)."""
    section = data_cfg.get("train_transforms" if train else "test_transforms", {}) or {}
    norm = {**_DEFAULT_NORMALIZE, **(data_cfg.get("normalize") or {})}
    if data_cfg.get("pipeline", "standard") == "ssd":  # SSD augmentation, square resize (data.ssd_transforms)
        ssd = dict(data_cfg.get("ssd_transforms") or {})
        return build_ssd_transforms(ssd.pop("size", 300), norm["mean"], norm["std"], norm["to_rgb"], train, **ssd)
    return build_transforms(section.get("scales", [[1333, 800]]),
                            section.get("flip_prob", 0.5) if train else 0.0,
                            norm["mean"], norm["std"], norm["to_rgb"], train)


def build_dataset(cfg_split: dict, data_cfg: dict, train: bool) -> CocoDataset:
    """Build one split, e.g. ``build_dataset(cfg["data"]["train"], cfg["data"], train=True)``.

    ``cfg_split["type"]`` is a key of :data:`DATASETS`: ``coco`` (``ann_file``, ``img_dir``) or
    ``synthetic`` (``split``: train|val, ``root``: null for the default cache folder); both accept
    ``filter_empty`` (training only), ``with_masks`` and ``on_error`` (raise|skip).
    """
    kind = cfg_split.get("type") if isinstance(cfg_split, dict) else None
    if kind not in DATASETS:
        raise DatasetConfigError(f"unknown dataset type {kind!r}; valid types: {sorted(DATASETS)}")
    return DATASETS[kind](cfg_split, transforms_from_config(data_cfg, train), train)


__all__ = [
    "DATASETS", "build_dataset", "transforms_from_config", "build_dataloader", "collate", "Collate",
    "pad_images", "GroupedBatchSampler", "InferenceBatchSampler", "WorkerSeeder", "CocoDataset",
    "CocoIndex", "build_coco_index", "ensure_demo_dataset", "default_demo_root", "Compose", "Resize",
    "RandomHorizontalFlip", "Normalize", "build_transforms", "rescale_size", "DatasetError",
    "DatasetConfigError", "AnnotationFileError", "CategoryError", "ImageRecordError",
    "DuplicateImageIdError", "AnnotationError", "MalformedBoxError", "UnknownImageIdError",
    "UnknownCategoryIdError", "DuplicateAnnotationIdError", "ImageLoadError", "ImageNotFoundError",
    "ImageDecodeError", "ImageSizeMismatchError",
]
