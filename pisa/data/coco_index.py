"""The compact annotation index of a COCO instances file: read, validated and packed into arrays.

:func:`build_coco_index` reads an ``instances_*.json`` once, checks every image, category and
annotation (raising a :class:`~pisa.data.errors.DatasetError` that names the file, image id and what to
do, or counting a skip with ``on_error="skip"``) and keeps only flat numpy arrays with per-image
offsets, so a dataset's memory does not grow in DataLoader workers over an epoch.
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from math import isfinite
from typing import Any

import numpy as np

from pisa.data import errors as E

ON_ERROR_MODES = ("raise", "skip")
SKIP_HINT = "or set the dataset's on_error to 'skip' (--set data.train.on_error=skip, or data.val) to skip it"


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
                f"annotation file {path}: images entry {short_repr(img)} needs an integer 'id', a string "
                f"'file_name' and positive integer 'width' and 'height'. Fix the entry, {SKIP_HINT}.",
                path=path, image_id=image_id))
            continue
        if img["id"] in row_of:
            policy.fail(E.DuplicateImageIdError(
                f"annotation file {path}: image id {img['id']} is used twice (file names "
                f"'{records[row_of[img['id']]][1]}' and '{img['file_name']}'). Image ids must be "
                f"unique; renumber one, {SKIP_HINT} (the first entry is kept).",
                path=path, image_id=img["id"], file_name=img["file_name"]))
            continue
        row_of[img["id"]] = len(records)
        records.append((img["id"], img["file_name"], img["width"], img["height"]))
    return records, row_of


def short_repr(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "...}"


def _bbox_problem(bbox: Any) -> str | None:
    """Why ``bbox`` is not a list of 4 finite numbers, or None."""
    if bbox is None:
        return "has no 'bbox'"
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"has bbox {short_repr(bbox)}, not a list of 4 numbers [x, y, w, h]"
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
        return E.AnnotationError(f"annotation file {path}: annotations entry {short_repr(ann)} is not an "
                                 f"object. Fix the entry, {SKIP_HINT}.", path=path)
    image_id, ann_id = ann.get("image_id"), ann.get("id")
    row = row_of.get(image_id) if _is_int(image_id) else None
    file_name = records[row][1] if row is not None else None
    where = (f"annotation file {path}: annotation id {ann_id} (image id {image_id}"
             + (f", file '{file_name}')" if file_name else ")"))
    kw = dict(path=path, image_id=image_id, file_name=file_name)
    if row is None:
        return E.UnknownImageIdError(f"{where} refers to an image id with no entry in 'images'. Add "
                                     f"the image entry or remove the annotation, {SKIP_HINT}.", **kw)
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in label_of:
        return E.UnknownCategoryIdError(
            f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories' "
            f"(ids {sorted(label_of)[:20]}). Fix the id, {SKIP_HINT}.", **kw)
    problem = _bbox_problem(ann.get("bbox"))
    if problem:
        return E.MalformedBoxError(f"{where} {problem}. Fix the annotation, {SKIP_HINT}.", **kw)
    if not isinstance(ann.get("area", 0.0), (int, float)) or isinstance(ann.get("area"), bool):
        return E.AnnotationError(f"{where} has a non-numeric 'area' {ann.get('area')!r}. Fix it, "
                                 f"{SKIP_HINT}.", **kw)
    if ann_id is not None and not isinstance(ann_id, (int, str)):
        return E.AnnotationError(f"{where} has an id that is neither an integer nor a string. Fix "
                                 f"it, {SKIP_HINT}.", **kw)
    if ann_id is not None and ann_id in seen_ids:
        return E.DuplicateAnnotationIdError(f"{where}: annotation id {ann_id} is used twice. "
                                            f"Annotation ids must be unique; {SKIP_HINT}.", **kw)
    segm = ann.get("segmentation")
    if with_masks and not ann.get("iscrowd") and not isinstance(segm, (list, dict)):
        return E.AnnotationError(f"{where} has no polygon or RLE 'segmentation', needed because "
                                 f"masks are decoded (with_masks=True). Fix it, {SKIP_HINT}.", **kw)
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
