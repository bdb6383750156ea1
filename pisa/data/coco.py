"""COCO ``instances_*.json`` detection dataset with compact annotation storage.

Indexing reads the JSON once, validates it (every structural problem raises a specific
:class:`~pisa.data.errors.DatasetError` naming the file, the image and what to do, or is counted and
skipped with ``on_error="skip"``), and keeps only flat numpy arrays: one float32 box array, one int64
label array and per-image offsets. No per-image Python objects survive indexing, so DataLoader
workers (forked or spawned) share or cheaply copy a few arrays and their memory stays flat.

Conventions (the reference's, see docs/data.md): category ids, in ascending order, map to labels
``0..K-1``; ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]`` clipped to the image; a box with
``area <= 0`` or a clipped width or height below 1 px is dropped and counted; crowd annotations become
``ignore_boxes``; annotations flagged ``ignore`` are left out.
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from math import isfinite
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pisa.data import errors as E
from pisa.data.transforms import as_tensor, to_rgb_image

ON_ERROR_MODES = ("raise", "skip")
_SKIP_HINT = "or pass on_error='skip' to skip it"


class PackedBytes:
    """Many byte strings stored as one uint8 buffer plus int64 offsets (no per-item objects)."""

    def __init__(self, items: list[bytes]) -> None:
        lengths = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
        self.offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(items), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes()


@dataclass
class CocoIndex:
    """What the dataset keeps from an annotation file; ``I`` images, ``A`` objects, ``C`` crowds.

    ``boxes[box_offsets[r]:box_offsets[r + 1]]`` are image row ``r``'s objects (xyxy float32, clipped),
    ``labels`` the matching int64 labels, ``ignore_boxes``/``ignore_offsets`` the same for crowd
    regions; ``segms`` (only with masks) holds each object's JSON-encoded segmentation.
    """

    cat_ids: list[int]
    class_names: list[str]
    image_ids: np.ndarray       # int64 [I]
    widths: np.ndarray          # int64 [I]
    heights: np.ndarray         # int64 [I]
    file_names: PackedBytes     # utf-8, [I]
    has_annotation: np.ndarray  # bool [I]: any annotation in the file, crowd or degenerate included
    boxes: np.ndarray           # float32 [A, 4]
    labels: np.ndarray          # int64 [A]
    box_offsets: np.ndarray     # int64 [I + 1]
    ignore_boxes: np.ndarray    # float32 [C, 4]
    ignore_offsets: np.ndarray  # int64 [I + 1]
    segms: PackedBytes | None
    dropped_degenerate: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_messages: list[str] = field(default_factory=list)


class _ErrorPolicy:
    """Raises a DatasetError (``on_error="raise"``) or counts it as a skip (``"skip"``)."""

    def __init__(self, on_error: str, keep_messages: int = 5) -> None:
        if on_error not in ON_ERROR_MODES:
            raise E.DatasetConfigError(
                f"on_error={on_error!r} is not one of {ON_ERROR_MODES}; use 'raise' (stop at the first "
                "problem) or 'skip' (skip the broken entry and report it in summary())")
        self.on_error = on_error
        self.skipped: Counter = Counter()
        self.messages: list[str] = []
        self._keep = keep_messages

    def fail(self, err: E.DatasetError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped[type(err).__name__] += 1
        if len(self.messages) < self._keep:
            self.messages.append(str(err))


# --- reading and validating the JSON -----------------------------------------------------------


def read_annotation_json(path: str) -> dict[str, Any]:
    """Load an annotation file and check its top-level structure; raises AnnotationFileError."""
    todo = "Check the ann_file setting of this dataset split."
    if not os.path.exists(path):
        raise E.AnnotationFileError(f"annotation file not found: {path}. {todo}", path=path)
    if os.path.isdir(path):
        raise E.AnnotationFileError(f"annotation file {path} is a directory, not a JSON file. {todo}",
                                    path=path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise E.AnnotationFileError(
            f"annotation file {path} is not valid JSON ({exc}). A COCO instances_*.json file is "
            "expected; re-download or regenerate it.", path=path) from None
    except OSError as exc:
        raise E.AnnotationFileError(f"cannot read annotation file {path}: {exc}. Check its "
                                    "permissions.", path=path) from None
    if not isinstance(data, dict):
        raise E.AnnotationFileError(
            f"annotation file {path} holds a JSON {type(data).__name__}, not an object with 'images', "
            "'annotations' and 'categories'. Is it a COCO instances file?", path=path)
    for key in ("images", "categories", "annotations"):
        if key == "annotations" and key not in data:
            continue  # image-info files (test-dev) have no annotations: every image is empty
        if not isinstance(data.get(key), list):
            what = "has no" if key not in data else "has a non-list"
            raise E.AnnotationFileError(
                f"annotation file {path} {what} '{key}' key; COCO instances files have a list under "
                f"'images', 'annotations' and 'categories'. Is it a COCO instances file?", path=path)
    return data


def _parse_categories(categories: list, path: str) -> tuple[list[int], list[str]]:
    """Category ids in ascending order (label ``k`` is ``cat_ids[k]``) and their names."""
    if not categories:
        raise E.CategoryError(f"annotation file {path} has an empty 'categories' list; at least one "
                              "category ({'id': int, 'name': str}) is needed.", path=path)
    names: dict[int, str] = {}
    for cat in categories:
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cat_id) or not isinstance(cat.get("name"), str):
            raise E.CategoryError(f"annotation file {path}: category entry {cat!r} needs an integer "
                                  "'id' and a string 'name'. Fix the 'categories' list.", path=path)
        if cat_id in names:
            raise E.CategoryError(f"annotation file {path}: category id {cat_id} appears twice in "
                                  "'categories'. Category ids must be unique.", path=path)
        names[cat_id] = cat["name"]
    cat_ids = sorted(names)
    return cat_ids, [names[c] for c in cat_ids]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_images(images: list, path: str, policy: _ErrorPolicy) -> tuple[list, dict[int, int]]:
    """Valid ``(id, file_name, width, height)`` records and a map image id -> row."""
    records: list[tuple[int, str, int, int]] = []
    row_of: dict[int, int] = {}
    for img in images:
        try:
            ok = (type(img["id"]) is int and type(img["file_name"]) is str
                  and type(img["width"]) is int and img["width"] > 0
                  and type(img["height"]) is int and img["height"] > 0)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            image_id = img.get("id") if isinstance(img, dict) else None
            policy.fail(E.ImageRecordError(
                f"annotation file {path}: images entry {_short(img)} needs an integer 'id', a string "
                f"'file_name' and positive integer 'width' and 'height'. Fix the entry, {_SKIP_HINT}.",
                path=path, image_id=image_id))
            continue
        if img["id"] in row_of:
            policy.fail(E.DuplicateImageIdError(
                f"annotation file {path}: image id {img['id']} is used twice (file names "
                f"'{records[row_of[img['id']]][1]}' and '{img['file_name']}'). Image ids must be "
                f"unique; renumber one, {_SKIP_HINT} (the first entry is kept).",
                path=path, image_id=img["id"], file_name=img["file_name"]))
            continue
        row_of[img["id"]] = len(records)
        records.append((img["id"], img["file_name"], img["width"], img["height"]))
    return records, row_of


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "...}"


def _bbox_problem(bbox: Any) -> str | None:
    """Why ``bbox`` is not a list of 4 finite numbers, or None."""
    if bbox is None:
        return "has no 'bbox'"
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"has bbox {_short(bbox)}, not a list of 4 numbers [x, y, w, h]"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return f"has a non-numeric bbox {bbox!r}"
    try:
        finite = all(isfinite(v) for v in bbox)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        return f"has a non-finite bbox {bbox!r}"
    return None


_NUMBER_TYPES = (int, float)


def _looks_valid(ann: Any, row_of: dict, label_of: dict, seen_ids: set, with_masks: bool) -> bool:
    """Fast check that an annotation is usable; False sends it to :func:`_annotation_problem`.

    Inlined type tests rather than helpers: this runs once per annotation (860k for COCO train).
    """
    try:
        bbox = ann["bbox"]
        return (type(ann["image_id"]) is int and ann["image_id"] in row_of
                and type(ann["category_id"]) is int and ann["category_id"] in label_of
                and type(bbox) is list and len(bbox) == 4
                and type(bbox[0]) in _NUMBER_TYPES and type(bbox[1]) in _NUMBER_TYPES
                and type(bbox[2]) in _NUMBER_TYPES and type(bbox[3]) in _NUMBER_TYPES
                and isfinite(bbox[0]) and isfinite(bbox[1]) and isfinite(bbox[2])
                and isfinite(bbox[3])
                and type(ann.get("area", 0.0)) in _NUMBER_TYPES
                and ann.get("id") not in seen_ids
                and (not with_masks or ann.get("iscrowd") or type(ann.get("segmentation")) in
                     (list, dict)))
    except (KeyError, TypeError, OverflowError):  # not a dict, missing keys, unhashable ids, ...
        return False


def _annotation_problem(ann: Any, path: str, records: list, row_of: dict, label_of: dict,
                        seen_ids: set, with_masks: bool) -> E.AnnotationError | None:
    """The specific error for a malformed or dangling annotation, or None when it is usable."""
    if not isinstance(ann, dict):
        return E.AnnotationError(f"annotation file {path}: annotations entry {_short(ann)} is not an "
                                 f"object. Fix the entry, {_SKIP_HINT}.", path=path)
    image_id, ann_id = ann.get("image_id"), ann.get("id")
    row = row_of.get(image_id) if _is_int(image_id) else None
    file_name = records[row][1] if row is not None else None
    where = (f"annotation file {path}: annotation id {ann_id} (image id {image_id}"
             + (f", file '{file_name}')" if file_name else ")"))
    kw = dict(path=path, image_id=image_id, file_name=file_name)
    if row is None:
        return E.UnknownImageIdError(f"{where} refers to an image id with no entry in 'images'. Add "
                                     f"the image entry or remove the annotation, {_SKIP_HINT}.", **kw)
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in label_of:
        return E.UnknownCategoryIdError(
            f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories' "
            f"(ids {sorted(label_of)[:20]}). Fix the id, {_SKIP_HINT}.", **kw)
    problem = _bbox_problem(ann.get("bbox"))
    if problem:
        return E.MalformedBoxError(f"{where} {problem}. Fix the annotation, {_SKIP_HINT}.", **kw)
    if not isinstance(ann.get("area", 0.0), (int, float)) or isinstance(ann.get("area"), bool):
        return E.AnnotationError(f"{where} has a non-numeric 'area' {ann.get('area')!r}. Fix it, "
                                 f"{_SKIP_HINT}.", **kw)
    if ann_id is not None and not isinstance(ann_id, (int, str)):
        return E.AnnotationError(f"{where} has an id that is neither an integer nor a string. Fix "
                                 f"it, {_SKIP_HINT}.", **kw)
    if ann_id is not None and ann_id in seen_ids:
        return E.DuplicateAnnotationIdError(f"{where}: annotation id {ann_id} is used twice. "
                                            f"Annotation ids must be unique; {_SKIP_HINT}.", **kw)
    segm = ann.get("segmentation")
    if with_masks and not ann.get("iscrowd") and not isinstance(segm, (list, dict)):
        return E.AnnotationError(f"{where} has no polygon or RLE 'segmentation', needed because "
                                 f"masks are decoded (with_masks=True). Fix it, {_SKIP_HINT}.", **kw)
    return None


def build_coco_index(ann_file: str, *, with_masks: bool = False, on_error: str = "raise") -> CocoIndex:
    """Read and validate ``ann_file`` into a :class:`CocoIndex` (see module docstring for the rules)."""
    policy = _ErrorPolicy(on_error)
    with _gc_paused():  # parsing creates millions of acyclic objects; collections only cost time
        data = read_annotation_json(ann_file)
        cat_ids, class_names = _parse_categories(data["categories"], ann_file)
        label_of = {c: k for k, c in enumerate(cat_ids)}
        records, row_of = _parse_images(data["images"], ann_file, policy)
        kept, seen_ids = [], set()
        for ann in data.get("annotations", []):
            if not _looks_valid(ann, row_of, label_of, seen_ids, with_masks):
                err = _annotation_problem(ann, ann_file, records, row_of, label_of, seen_ids,
                                          with_masks)
                if err is not None:
                    policy.fail(err)
                    continue
            if ann.get("id") is not None:
                seen_ids.add(ann["id"])
            kept.append(ann)
        columns = _columns(kept, row_of, label_of, with_masks)
        del data, kept  # the parsed JSON is by far the largest object; nothing below refers to it
    return _pack(records, cat_ids, class_names, columns, policy)


@contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _columns(kept: list[dict], row_of: dict, label_of: dict, with_masks: bool) -> dict[str, Any]:
    """Validated annotations as arrays: ``rows``, ``labels``, xywh ``boxes``, ``areas`` (NaN when
    absent), ``crowd``, ``ignore`` (the reference leaves out annotations flagged so) and ``segms``."""
    n = len(kept)

    def column(values, dtype):
        return np.fromiter(values, dtype=dtype, count=n)

    return {
        "rows": column((row_of[a["image_id"]] for a in kept), np.int64),
        "labels": column((label_of[a["category_id"]] for a in kept), np.int64),
        "boxes": np.fromiter(chain.from_iterable(a["bbox"] for a in kept), dtype=np.float64,
                             count=4 * n).reshape(n, 4),
        "areas": column((a.get("area", np.nan) for a in kept), np.float64),
        "crowd": column((bool(a.get("iscrowd", 0)) for a in kept), bool),
        "ignore": column((bool(a.get("ignore", 0)) for a in kept), bool),
        "segms": [json.dumps(a.get("segmentation"), separators=(",", ":")).encode() for a in kept]
        if with_masks else None,
    }


def _pack(records: list, cat_ids: list[int], class_names: list[str], columns: dict,
          policy: _ErrorPolicy) -> CocoIndex:
    """Convert xywh to clipped xyxy, drop degenerate boxes and group objects by image."""
    widths = np.array([r[2] for r in records], dtype=np.int64)
    heights = np.array([r[3] for r in records], dtype=np.int64)
    rows, xywh = columns["rows"], columns["boxes"]
    limits = np.stack([widths[rows], heights[rows]], axis=1).astype(np.float64)
    boxes = np.clip(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), 0.0,
                    np.tile(limits, 2))
    size = boxes[:, 2:] - boxes[:, :2]
    areas = np.where(np.isnan(columns["areas"]), xywh[:, 2] * xywh[:, 3], columns["areas"])
    degenerate = ~columns["ignore"] & ((areas <= 0) | (size < 1).any(axis=1))
    usable = ~columns["ignore"] & ~degenerate
    obj, ign = usable & ~columns["crowd"], usable & columns["crowd"]
    obj_order = np.flatnonzero(obj)[np.argsort(rows[obj], kind="stable")]
    ign_order = np.flatnonzero(ign)[np.argsort(rows[ign], kind="stable")]
    segms = columns["segms"]
    return CocoIndex(
        cat_ids=cat_ids, class_names=class_names,
        image_ids=np.array([r[0] for r in records], dtype=np.int64),
        widths=widths, heights=heights,
        file_names=PackedBytes([r[1].encode("utf-8") for r in records]),
        has_annotation=np.bincount(rows, minlength=len(records)) > 0,
        boxes=boxes[obj_order].astype(np.float32),
        labels=columns["labels"][obj_order],
        box_offsets=_offsets(rows[obj], len(records)),
        ignore_boxes=boxes[ign_order].astype(np.float32),
        ignore_offsets=_offsets(rows[ign], len(records)),
        segms=None if segms is None else PackedBytes([segms[i] for i in obj_order]),
        dropped_degenerate=int(degenerate.sum()), skipped=policy.skipped,
        skip_messages=policy.messages)


def _offsets(rows: np.ndarray, num_images: int) -> np.ndarray:
    """CSR offsets: objects of image ``r`` are ``[out[r], out[r + 1])`` of a row-sorted array."""
    out = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_images), out=out[1:])
    return out


# --- the dataset -------------------------------------------------------------------------------


class CocoDataset(torch.utils.data.Dataset):
    """COCO-format detection dataset: ``dataset[i] -> (image, target)``.

    Args:
        ann_file: an ``instances_*.json`` file (any categories, any ids).
        img_dir: folder that ``file_name`` entries are relative to.
        transforms: ``t(image, target, generator) -> (image, target)`` (see
            :mod:`pisa.data.transforms`); None returns the uint8 RGB image ``[3, H, W]``.
        filter_empty: drop images that have no annotation at all (training only; an image whose
            only annotations are crowd or degenerate is kept, as in the reference).
        with_masks: decode instance masks into ``target["masks"]`` (uint8 ``[N, h, w]``).
        on_error: ``"raise"`` (default) or ``"skip"``: skip broken entries or images, counted in
            :meth:`summary` (image skips are counted per process; workers warn on stderr).

    ``dataset[i]`` takes an int, or ``(i, seed)`` to draw the sample's augmentation from a
    generator seeded with ``seed`` (what :func:`pisa.data.build_dataloader` passes).

    Target: ``boxes`` float32 ``[N, 4]`` xyxy, ``labels`` int64 ``[N]`` in ``0..K-1``,
    ``ignore_boxes`` float32 ``[M, 4]``, optional ``masks``, and metas ``image_id``, ``img_shape``
    and ``ori_shape`` ``(h, w)``, ``scale_factor`` ``(sx, sy)``, ``flip``.
    """

    supports_sample_seeds = True

    def __init__(self, ann_file: str, img_dir: str, transforms: Callable | None = None, *,
                 filter_empty: bool = False, with_masks: bool = False,
                 on_error: str = "raise") -> None:
        self.ann_file, self.img_dir = os.fspath(ann_file), os.fspath(img_dir)
        if not os.path.isdir(self.img_dir):  # checked first: indexing a large file takes a while
            raise E.ImageNotFoundError(f"image folder {self.img_dir} (for {self.ann_file}) does not "
                                       "exist. Check the img_dir setting.", path=self.img_dir)
        self.index = build_coco_index(self.ann_file, with_masks=with_masks, on_error=on_error)
        self.transforms = transforms
        self.filter_empty, self.with_masks, self.on_error = filter_empty, with_masks, on_error
        rows = np.arange(len(self.index.image_ids))
        self._rows = rows[self.index.has_annotation] if filter_empty else rows
        self.load_skips: Counter = Counter()
        self._bad_rows: set[int] = set()

    # class mapping
    @property
    def num_classes(self) -> int:
        return len(self.index.cat_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)

    @property
    def label_to_cat_id(self) -> list[int]:
        """``label_to_cat_id[k]`` is the COCO category id of label ``k``."""
        return list(self.index.cat_ids)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c: k for k, c in enumerate(self.index.cat_ids)}

    @property
    def image_ids(self) -> np.ndarray:
        """int64 ``[len(self)]``: the COCO image id of each dataset index."""
        return self.index.image_ids[self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def image_info(self, i: int) -> dict[str, Any]:
        """``image_id``, ``file_name``, ``width``, ``height`` of index ``i`` (from the JSON)."""
        row = self._rows[i]
        return {"image_id": int(self.index.image_ids[row]),
                "file_name": self.index.file_names[row].decode("utf-8"),
                "width": int(self.index.widths[row]), "height": int(self.index.heights[row])}

    def aspect_ratio_flags(self) -> np.ndarray:
        """int64 ``[len(self)]``: 1 where width >= height, else 0 (for aspect-ratio grouping)."""
        return (self.index.widths[self._rows] >= self.index.heights[self._rows]).astype(np.int64)

    def get_annotations(self, i: int) -> dict[str, np.ndarray]:
        """Index ``i``'s ``boxes`` (xyxy, original image), ``labels`` and ``ignore_boxes`` (numpy)."""
        row, ix = self._rows[i], self.index
        lo, hi = ix.box_offsets[row], ix.box_offsets[row + 1]
        ilo, ihi = ix.ignore_offsets[row], ix.ignore_offsets[row + 1]
        return {"boxes": ix.boxes[lo:hi].copy(), "labels": ix.labels[lo:hi].copy(),
                "ignore_boxes": ix.ignore_boxes[ilo:ihi].copy()}

    def load_image(self, i: int) -> Image.Image:
        """Decode index ``i``'s image as 8-bit RGB; raises an ImageLoadError subclass."""
        info = self.image_info(i)
        path = os.path.join(self.img_dir, info["file_name"])
        where = f"image id {info['image_id']}, file '{info['file_name']}' of {self.ann_file}"
        kw = dict(path=path, image_id=info["image_id"], file_name=info["file_name"])
        try:
            img = Image.open(path)
        except FileNotFoundError:
            raise E.ImageNotFoundError(f"image file not found: {path} ({where}). Check img_dir "
                                       f"({self.img_dir}), restore the file, {_SKIP_HINT}.",
                                       **kw) from None
        except OSError as exc:  # a directory, no permission, not an image
            raise E.ImageDecodeError(f"cannot open image file {path} ({where}): {exc}. Replace the "
                                     f"file, {_SKIP_HINT}.", **kw) from None
        with img:
            if img.size != (info["width"], info["height"]):
                raise E.ImageSizeMismatchError(
                    f"image file {path} ({where}) is {img.width}x{img.height} (width x height) but the "
                    f"annotation file says {info['width']}x{info['height']}. The image and its "
                    f"annotations disagree: replace the file or fix the entry, {_SKIP_HINT}.", **kw)
            try:
                img.load()
            except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
                raise E.ImageDecodeError(f"image file {path} ({where}) is truncated or corrupt: "
                                         f"{exc}. Replace the file, {_SKIP_HINT}.", **kw) from None
            return to_rgb_image(img)

    def load_masks(self, i: int) -> np.ndarray:
        """uint8 ``[N, h, w]`` instance masks of index ``i`` (needs ``with_masks=True``)."""
        if self.index.segms is None:
            raise E.DatasetConfigError("masks were not indexed; construct the dataset with "
                                       "with_masks=True")
        info, row = self.image_info(i), self._rows[i]
        lo, hi = self.index.box_offsets[row], self.index.box_offsets[row + 1]
        masks = np.zeros((hi - lo, info["height"], info["width"]), dtype=np.uint8)
        for k in range(lo, hi):
            segm = json.loads(self.index.segms[k])
            try:
                masks[k - lo] = _decode_segmentation(segm, info["height"], info["width"])
            except Exception as exc:  # pycocotools raises bare Exceptions on malformed input
                raise E.AnnotationError(
                    f"annotation file {self.ann_file}: a segmentation of image id "
                    f"{info['image_id']} ('{info['file_name']}') cannot be decoded ({exc}): "
                    f"{_short(segm)}. Fix it, {_SKIP_HINT}.", path=self.ann_file,
                    image_id=info["image_id"], file_name=info["file_name"]) from None
        return masks

    def __getitem__(self, index: int | tuple[int, int]):
        i, seed = index if isinstance(index, tuple) else (index, None)
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        image, target = self._load_sample(i % len(self))
        if self.transforms is None:
            return as_tensor(image), target
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        return self.transforms(image, target, generator)

    def _load_sample(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        """Image and untransformed target of ``i``; with ``on_error="skip"`` the next loadable one."""
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            if self._rows[j] in self._bad_rows:
                continue
            try:
                image = self.load_image(j)
                masks = self.load_masks(j) if self.with_masks else None
            except E.DatasetError as err:
                if self.on_error == "raise":
                    raise
                self._record_load_skip(int(self._rows[j]), err)
                continue
            return image, self._target(j, masks)
        raise E.ImageLoadError(f"no image of {self.ann_file} could be loaded (on_error='skip' skipped "
                               f"them all). Check img_dir ({self.img_dir}).", path=self.img_dir)

    def _record_load_skip(self, row: int, err: E.DatasetError) -> None:
        self._bad_rows.add(row)
        self.load_skips[type(err).__name__] += 1
        warnings.warn(f"skipped (on_error='skip'): {err}", stacklevel=3)

    def _target(self, i: int, masks: np.ndarray | None) -> dict[str, Any]:
        ann, info = self.get_annotations(i), self.image_info(i)
        shape = (info["height"], info["width"])
        target = {"boxes": torch.from_numpy(ann["boxes"]), "labels": torch.from_numpy(ann["labels"]),
                  "ignore_boxes": torch.from_numpy(ann["ignore_boxes"]),
                  "image_id": info["image_id"], "ori_shape": shape, "img_shape": shape,
                  "scale_factor": (1.0, 1.0), "flip": False}
        if masks is not None:
            target["masks"] = torch.from_numpy(masks)
        return target

    def summary(self) -> str:
        """A one-screen report: images, objects per class, empty images, crowds, drops, skips."""
        ix, rows = self.index, self._rows
        counts = np.diff(ix.box_offsets)[rows]
        in_use = np.repeat(np.isin(np.arange(len(ix.image_ids)), rows), np.diff(ix.box_offsets))
        per_class = np.bincount(ix.labels[in_use], minlength=self.num_classes)
        skipped = ix.skipped + self.load_skips
        lines = [
            f"COCO dataset {self.ann_file} (images in {self.img_dir})",
            f"  images: {len(rows)} of {len(ix.image_ids)} in the file"
            + (f" ({len(ix.image_ids) - len(rows)} without annotations removed by filter_empty)"
               if self.filter_empty else "")
            + f"; {int((counts == 0).sum())} without objects",
            f"  objects: {int(counts.sum())} in {self.num_classes} classes; crowd regions (ignored): "
            f"{int(np.diff(ix.ignore_offsets)[rows].sum())}; degenerate boxes dropped: "
            f"{ix.dropped_degenerate}",
            f"  skipped (on_error={self.on_error!r}): {sum(skipped.values())}"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")" if skipped else ""),
        ]
        lines += [f"    e.g. {m.splitlines()[0]}" for m in ix.skip_messages[:3]]
        lines.append("  objects per class (label cat_id name: count):")
        cells = [f"{k:>3} {c:>4} {n[:14]:<14} {int(v):>7}"
                 for k, (c, n, v) in enumerate(zip(ix.cat_ids, ix.class_names, per_class))]
        for start in range(0, len(cells), 3):
            lines.append("   " + "   ".join(cells[start:start + 3]))
        return "\n".join(lines)


def _decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> uint8 mask ``[height, width]``."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False notice, not ours to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)
