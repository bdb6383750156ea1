"""COCO evaluation with pycocotools' ``COCOeval``: collect detections, gather them across processes, score.

Usage (every process)::

    evaluator = CocoEvaluator(ann_file, label_to_cat_id, class_names)
    for images, targets in loader:
        evaluator.add([t["image_id"] for t in targets], model(images, targets))
    evaluator.gather()                      # under torch.distributed: everything to rank 0
    metrics = evaluator.evaluate(out_dir)   # rank 0: {"bbox_AP": ..., "per_class": {...}}; others: {}
    print(CocoEvaluator.format_summary(metrics))
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import warnings
from math import isfinite
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["CocoEvaluator", "SUMMARY_NAMES", "encode_masks", "usable_ground_truth"]

# Names of the first six entries of COCOeval.stats (AP at IoU .5:.95, .5, .75; small, medium, large).
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def _to_numpy(x: Any, dtype: type) -> np.ndarray:
    """Tensor (any device, bf16 included) or array-like -> numpy array of ``dtype``."""
    if torch.is_tensor(x):
        x = x.detach()
        x = (x.float() if x.is_floating_point() else x).cpu().numpy()
    return np.asarray(x, dtype=dtype)


def encode_masks(masks: Any, num: int) -> list[dict]:
    """Masks ``(D, H, W)`` (bool/uint8 nonzero = in; float >= 0.5 = in) or a list of D RLEs -> D RLEs.

    RLE ``counts`` are returned as str so the records are JSON-ready and cheap to pickle.
    """
    if masks is None:
        raise ValueError("iou_type 'segm' needs 'masks' in every detection dict")
    if isinstance(masks, (list, tuple)) and (not masks or isinstance(masks[0], dict)):
        rles = [dict(r) for r in masks]
    else:
        if torch.is_tensor(masks):
            masks = masks.detach().cpu()
            masks = masks >= 0.5 if masks.is_floating_point() else masks != 0
        arr = np.asarray(masks)
        arr = arr >= 0.5 if np.issubdtype(arr.dtype, np.floating) else arr != 0
        if arr.ndim != 3:
            raise ValueError(f"masks must have shape (D, H, W), got {arr.shape}")
        rles = []
        if len(arr):  # encode wants (H, W, D), Fortran-ordered uint8
            rles = mask_util.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))
    if len(rles) != num:
        raise ValueError(f"got {len(rles)} masks for {num} boxes")
    for rle in rles:
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _finite_box(bbox: Any) -> bool:
    """``bbox`` is a list of 4 finite numbers (booleans excluded)."""
    try:
        return (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and isfinite(v) for v in bbox))
    except OverflowError:  # an integer too large for a float
        return False


def _valid_polygons(segm: list) -> list:
    """The parts of a polygon segmentation that can cover pixels: lists of at least 6 numbers (3 points).

    Shorter parts cover nothing, and a first part of exactly 4 numbers makes pycocotools read the
    whole list as boxes and fail.
    """
    return [part for part in segm if isinstance(part, list) and len(part) >= 6
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part)]


def _empty_rle(height: int, width: int) -> dict:
    rle = mask_util.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def usable_ground_truth(dataset: dict, ann_file: str, iou_types: Sequence[str] = ("bbox",)) -> tuple[dict, list[str]]:
    """The ground truth of ``dataset`` (a parsed COCO instances JSON) as pycocotools can score it.

    A file pycocotools scores as it stands is returned unchanged, so its numbers are exactly
    pycocotools' (and the reference's). What would make ``COCOeval`` crash or score wrongly is fixed
    in a shallow copy, and each kind of fix is described in the returned notes:

    * an annotation without ``iscrowd`` counts as a non-crowd object (``COCOeval`` needs the key);
    * one without a numeric ``area`` gets its box area ``w·h``, the area the dataset uses too;
    * annotation ids that are missing, not positive integers or used twice are renumbered ``1..N`` in
      file order: ``COCOeval`` marks "unmatched" with id 0, so an object with id 0 could never be
      matched, and pycocotools' index keeps one annotation per id;
    * an annotation that is not an object, or whose ``bbox`` is not 4 finite numbers, is left out
      (``on_error='skip'`` datasets skip it too; a ``'raise'`` dataset has stopped before this);
    * for ``segm``: polygon parts of fewer than 6 numbers (3 points) are dropped, and an object left
      with no polygon (or with no ``segmentation`` at all) gets an empty mask, which no detection matches.
    """
    anns = dataset.get("annotations")
    if not isinstance(anns, list):
        return dataset, []
    sizes = {img.get("id"): (img.get("height"), img.get("width"))
             for img in dataset.get("images", []) if isinstance(img, dict)}
    counts = {"dropped": 0, "iscrowd": 0, "area": 0, "segm": 0}
    kept = []
    for ann in anns:
        if not isinstance(ann, dict) or not _finite_box(ann.get("bbox")):
            counts["dropped"] += 1
            continue
        fixed = None
        if "iscrowd" not in ann:
            fixed = dict(ann, iscrowd=0)
            counts["iscrowd"] += 1
        area = ann.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool):
            fixed = dict(fixed or ann, area=float(ann["bbox"][2]) * float(ann["bbox"][3]))
            counts["area"] += 1
        if "segm" in iou_types:
            segm = ann.get("segmentation")
            if isinstance(segm, list):
                polygons = _valid_polygons(segm)
                if not polygons or len(polygons) != len(segm):
                    segm = polygons or None
            if not isinstance(segm, (list, dict)):
                size = sizes.get(ann.get("image_id"))
                segm = _empty_rle(*size) if size and all(isinstance(v, int) for v in size) else None
            if segm is not ann.get("segmentation") and segm is not None:
                fixed = dict(fixed or ann, segmentation=segm)
                counts["segm"] += 1
        kept.append(fixed or ann)
    ids = [ann.get("id") for ann in kept]
    renumber = (not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
                or len(set(ids)) != len(ids))
    if renumber:
        kept = [dict(ann, id=k + 1) for k, ann in enumerate(kept)]
    notes = []
    if counts["dropped"]:
        notes.append(f"{counts['dropped']} annotations that are not objects or have no bbox of 4 finite numbers "
                     f"are left out")
    if counts["iscrowd"]:
        notes.append(f"{counts['iscrowd']} annotations without 'iscrowd' count as non-crowd objects")
    if counts["area"]:
        notes.append(f"{counts['area']} annotations without a numeric 'area' use their box area w*h")
    if renumber:
        notes.append("annotation ids are renumbered 1..N (some were missing, not positive integers or repeated; "
                     "pycocotools cannot match an object with id 0 and keeps one annotation per id)")
    if counts["segm"]:
        notes.append(f"{counts['segm']} segmentations had polygon parts of fewer than 3 points, or nothing usable; "
                     f"those parts are dropped, and an object left with nothing gets an empty mask")
    if not notes:
        return dataset, []
    return dict(dataset, annotations=kept), notes


def _unique_by_image(records: list[dict]) -> list[dict]:
    """Keep the first record of each image id (a distributed sampler pads by repeating images)."""
    seen: set[int] = set()
    unique = []
    for record in records:
        if record["image_id"] not in seen:
            seen.add(record["image_id"])
            unique.append(record)
    return unique


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _write_json(obj: Any, path: str) -> None:
    """Write JSON atomically, so a crash never leaves a half-written results file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class CocoEvaluator:
    """Accumulates detections of a COCO-format dataset and scores them with ``COCOeval``.

    Args:
        ann_file: the ground-truth COCO instances JSON (read only by rank 0, in ``evaluate``).
        label_to_cat_id: ``label_to_cat_id[l]`` is the COCO category id of model label ``l`` (0..K-1).
        class_names: the K class names, in label order (for the per-class table).
        iou_types: any of ``"bbox"``, ``"segm"``.
    """

    def __init__(self, ann_file: str, label_to_cat_id: Sequence[int], class_names: Sequence[str],
                 iou_types: Sequence[str] = ("bbox",)):
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
        if len(label_to_cat_id) != len(class_names):
            raise ValueError(f"{len(label_to_cat_id)} category ids but {len(class_names)} class names")
        self.ann_file = ann_file
        self.cat_ids = np.asarray(label_to_cat_id, dtype=np.int64)
        self.class_names = list(class_names)
        self.iou_types = tuple(iou_types)
        self._records: list[dict] = []
        self._gt: COCO | None = None

    def reset(self) -> None:
        """Forget every detection added so far (the ground truth stays loaded)."""
        self._records = []

    def add(self, image_ids: Sequence[int], detections: Sequence[dict]) -> None:
        """Record the detections of a batch.

        Each detection dict holds ``boxes`` ``(D, 4)`` xyxy in original-image pixels, ``scores`` ``(D,)``,
        ``labels`` ``(D,)`` int in ``0..K-1`` and, for ``segm``, ``masks`` ``(D, H, W)`` at the original
        image size (or D RLEs). Tensors may live on any device. Boxes are stored as COCO xywh floats and
        labels as the original category ids.
        """
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            self._records.append(self._encode(int(image_id), det))

    def _encode(self, image_id: int, det: dict) -> dict:
        boxes = _to_numpy(det["boxes"], np.float64).reshape(-1, 4)
        scores = _to_numpy(det["scores"], np.float64).reshape(-1)
        labels = _to_numpy(det["labels"], np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.cat_ids)):
            raise ValueError(f"image {image_id}: labels must lie in 0..{len(self.cat_ids) - 1}, "
                             f"got {labels.min()}..{labels.max()}")
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]  # no +1: boxes are continuous coordinates
        record = {"image_id": image_id, "boxes": xywh, "scores": scores, "category_ids": self.cat_ids[labels]}
        if "segm" in self.iou_types:
            record["rles"] = encode_masks(det.get("masks"), len(labels))
        return record

    def gather(self) -> None:
        """Collect every process's detections on rank 0, each image once (first copy kept)."""
        rank, world = _rank_and_world()
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, self._records)
            self._records = [r for part in parts for r in part] if rank == 0 else []
        self._records = _unique_by_image(self._records)

    # ------------------------------------------------------------------ scoring (rank 0)

    def _ground_truth(self) -> COCO:
        """pycocotools' index of the annotation file, after :func:`usable_ground_truth` (which warns
        once with what it had to fix)."""
        if self._gt is None:
            with open(self.ann_file, encoding="utf-8") as f:
                dataset = json.load(f)
            dataset, notes = usable_ground_truth(dataset, self.ann_file, self.iou_types)
            if notes:
                warnings.warn(f"evaluating against {self.ann_file}: " + "; ".join(notes), stacklevel=3)
            gt = COCO()
            gt.dataset = dataset
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                gt.createIndex()
            self._gt = gt
        return self._gt

    def _check_against_gt(self, gt: COCO, records: list[dict]) -> None:
        images = gt.imgs
        unknown = sorted({r["image_id"] for r in records} - set(images))
        if unknown:
            raise ValueError(f"detections for image ids not in {self.ann_file}: {unknown[:10]}")
        missing = sorted(set(self.cat_ids.tolist()) - set(gt.getCatIds()))
        if missing:
            raise ValueError(f"label_to_cat_id names category ids not in {self.ann_file}: {missing}")
        for r in records:
            size = [images[r["image_id"]]["height"], images[r["image_id"]]["width"]]
            if any(list(rle["size"]) != size for rle in r.get("rles", ())):
                raise ValueError(f"image {r['image_id']}: masks must have the original size {size}")

    @staticmethod
    def _coco_results(records: list[dict], iou_type: str) -> list[dict]:
        """COCO results format: one dict per detection, original category ids."""
        results = []
        for r in records:
            for i in range(len(r["scores"])):
                det = {"image_id": r["image_id"], "category_id": int(r["category_ids"][i]),
                       "score": float(r["scores"][i])}
                if iou_type == "bbox":
                    det["bbox"] = [float(v) for v in r["boxes"][i]]
                else:  # no "bbox" key: loadRes then takes area and box from the mask
                    det["segmentation"] = r["rles"][i]
                results.append(det)
        return results

    @staticmethod
    def _run_cocoeval(gt: COCO, results: list[dict], iou_type: str) -> COCOeval:
        with contextlib.redirect_stdout(io.StringIO()):
            if results:
                dt = gt.loadRes(results)
            else:  # loadRes cannot take an empty list; no detections scores AP 0 where GT exists
                dt = COCO()
                dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                              "categories": copy.deepcopy(gt.dataset["categories"])}
                dt.createIndex()
            coco_eval = COCOeval(gt, dt, iou_type)
            coco_eval.params.imgIds = sorted(gt.getImgIds())  # every GT image counts, detected or not
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval

    def _per_class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP per class: precision at IoU .5:.95, area "all", 100 detections, mean over valid entries.

        -1 (as pycocotools) for a class without ground truth.
        """
        params = coco_eval.params
        precision = coco_eval.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M maxDets]
        area, max_dets = params.areaRngLbl.index("all"), params.maxDets.index(100)
        table = {}
        for name, cat_id in zip(self.class_names, self.cat_ids.tolist()):
            p = precision[:, :, params.catIds.index(cat_id), area, max_dets]
            valid = p[p > -1]
            table[name] = float(valid.mean()) if valid.size else -1.0
        return table

    def evaluate(self, out_dir: str | None = None) -> dict[str, Any]:
        """Score the gathered detections over every image of the annotation file (rank 0; others get {}).

        Returns ``{"bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl"}`` (and
        ``segm_*``) as floats in [0, 1], -1 where pycocotools has no ground truth, plus ``"per_class"``:
        ``{iou_type: {class_name: AP}}``. With ``out_dir``, writes ``results_<iou_type>.json`` and
        ``metrics.json`` there.
        """
        if _rank_and_world()[0] != 0:
            return {}
        records = _unique_by_image(self._records)
        gt = self._ground_truth()
        self._check_against_gt(gt, records)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        metrics: dict[str, Any] = {}
        per_class = {}
        for iou_type in self.iou_types:
            results = self._coco_results(records, iou_type)
            if out_dir:
                _write_json(results, os.path.join(out_dir, f"results_{iou_type}.json"))
            coco_eval = self._run_cocoeval(gt, results, iou_type)
            for name, value in zip(SUMMARY_NAMES, coco_eval.stats):
                metrics[f"{iou_type}_{name}"] = float(value)
            per_class[iou_type] = self._per_class_ap(coco_eval)
        metrics["per_class"] = per_class
        if out_dir:
            _write_json(metrics, os.path.join(out_dir, "metrics.json"))
        return metrics

    @staticmethod
    def format_summary(metrics: dict[str, Any], columns: int = 3) -> str:
        """Printable summary lines and a per-class AP table (values in percent; "-" = no ground truth)."""
        def pct(v: float) -> str:
            return "-" if v < 0 else f"{100 * v:.1f}"

        lines = []
        for iou_type, table in metrics.get("per_class", {}).items():
            names = [n for n in SUMMARY_NAMES if f"{iou_type}_{n}" in metrics]
            lines.append(f"{iou_type}: " + " | ".join(f"{n} {pct(metrics[f'{iou_type}_{n}'])}"
                                                       for n in names))
            width = max([len(n) for n in table] + [5])
            cells = [f"{name:<{width}} {pct(ap):>5}" for name, ap in table.items()]
            header = "   ".join([f"{'class':<{width}} {'AP':>5}"] * min(columns, max(len(cells), 1)))
            lines += [f"per-class {iou_type} AP:", header]
            lines += ["   ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
        return "\n".join(lines)
