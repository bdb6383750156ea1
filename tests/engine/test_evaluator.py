"""Tests of pisa.engine.evaluator.CocoEvaluator on tiny hand-made COCO files.

Expected APs are derived by hand from COCO's definition: for each IoU threshold t in .50:.05:.95, the
precision/recall curve of the ranked detections is made monotone (precision at recall r = best precision
at any recall >= r) and sampled at the 101 recall points 0, .01, ..., 1; AP is the mean over those points,
then over thresholds and classes. Each hand case is also checked against pycocotools run directly.
"""

import contextlib
import io
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pisa.engine.evaluator import CocoEvaluator, usable_ground_truth

# Two images; category ids are deliberately not 0..K-1 (COCO's own ids have gaps too).
IMAGES = {1: (80, 100), 2: (90, 120), 3: (50, 60)}  # image id -> (height, width); image 3 has no GT
CAT_IDS = [3, 7]
NAMES = ["cat", "dog"]


def rect_mask(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def write_gt(tmp_path, objects):
    """objects: list of (image_id, category_id, xyxy ints). Masks are the filled boxes, stored as RLE."""
    anns = []
    for i, (image_id, cat_id, (x1, y1, x2, y2)) in enumerate(objects):
        h, w = IMAGES[image_id]
        rle = mask_util.encode(np.asfortranarray(rect_mask(h, w, x1, y1, x2, y2).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": i + 1, "image_id": image_id, "category_id": cat_id, "iscrowd": 0,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                     "segmentation": rle})
    images = [{"id": k, "height": h, "width": w, "file_name": f"{k}.jpg"} for k, (h, w) in IMAGES.items()]
    data = {"images": images,
            "annotations": anns, "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, NAMES)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return str(path)


def dets(boxes, scores, labels, masks=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "scores": torch.tensor(scores, dtype=torch.float32),
         "labels": torch.tensor(labels, dtype=torch.int64)}
    if masks is not None:
        d["masks"] = masks
    return d


def pycocotools_stats(gt_path, results, iou_type="bbox"):
    """The six AP numbers straight from pycocotools, for comparison."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


# Medium objects (area 2000 and 8000, between 32^2 and 96^2) and one small (400); no large ones.
OBJECTS = [(1, 3, (10, 10, 30, 30)), (1, 7, (30, 20, 80, 60)), (2, 3, (5, 5, 105, 85))]


def test_ground_truth_as_detections_scores_one(tmp_path):
    ev = CocoEvaluator(write_gt(tmp_path, OBJECTS), CAT_IDS, NAMES)
    ev.add([1, 2], [dets([[10, 10, 30, 30], [30, 20, 80, 60]], [1.0, 1.0], [0, 1]),
                    dets([[5, 5, 105, 85]], [1.0], [0])])
    ev.add([3], [dets([], [], [])])
    m = ev.evaluate(str(tmp_path / "out"))
    # (pycocotools divides by tp + fp + eps, hence approx)
    assert [m[f"bbox_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm")] == pytest.approx([1.0] * 5)
    assert m["bbox_APl"] == -1.0  # no large ground truth: pycocotools' "undefined"
    assert m["per_class"] == {"bbox": {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}}
    with open(tmp_path / "out" / "metrics.json") as f:
        assert json.load(f) == m
    with open(tmp_path / "out" / "results_bbox.json") as f:
        results = json.load(f)
    # xyxy -> xywh, labels -> the original (non-contiguous) category ids.
    assert {(r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results} == {
        (1, 3, (10.0, 10.0, 20.0, 20.0)), (1, 7, (30.0, 20.0, 50.0, 40.0)), (2, 3, (5.0, 5.0, 100.0, 80.0))}


# Hand cases on one class ("cat", id 3) with two small GTs A = (10,10,30,30) and B = (50,40,70,60) in image 1.
A, B = [10, 10, 30, 30], [50, 40, 70, 60]
HAND_CASES = {
    # One perfect detection of A, B missed. Every threshold: recall 0.5 with precision 1, nothing beyond.
    # The recall points 0, .01, ..., .50 (51 of 101) get precision 1, the other 50 get 0:
    # AP = 51/101 at every threshold (not 0.5: COCO samples recall 0 and 0.5 inclusive).
    "hit_and_miss": (([A], [0.9]), dict(AP=51 / 101, AP50=51 / 101, AP75=51 / 101, APs=51 / 101)),
    # A (0.9), a false positive far from both (0.8), B (0.7). Ranked: precision 1, 1/2, 2/3 at recall
    # .5, .5, 1. Monotone: 1, 2/3, 2/3. Points <= .5 (51) -> 1; points in (.5, 1] (50) -> 2/3.
    # AP = (51 + 50 * 2/3) / 101 at every threshold.
    "false_positive_between": (([A, [80, 0, 99, 20], B], [0.9, 0.8, 0.7]),
                               dict(AP=(51 + 100 / 3) / 101, AP50=(51 + 100 / 3) / 101)),
    # A found exactly; B found by (50,40,70,52.4): IoU = (20*12.4)/(20*20) = 0.62, a match at t = .50,
    # .55, .60 only. There AP = 1 (101/101 points); at the 7 higher thresholds it is the hit_and_miss
    # curve, 51/101. AP = (3 * 1 + 7 * 51/101) / 10; AP50 = 1; AP75 = 51/101.
    "loose_box": (([A, [50, 40, 70, 52.4]], [0.9, 0.8]),
                  dict(AP=(3 + 7 * 51 / 101) / 10, AP50=1.0, AP75=51 / 101, APm=-1.0, APl=-1.0)),
}


@pytest.mark.parametrize("case", HAND_CASES, ids=list(HAND_CASES))
def test_hand_derived_ap_matches_pycocotools(tmp_path, case):
    (boxes, scores), expected = HAND_CASES[case]
    gt_path = write_gt(tmp_path, [(1, 3, tuple(A)), (1, 3, tuple(B))])
    ev = CocoEvaluator(gt_path, CAT_IDS, NAMES)
    ev.add([1], [dets(boxes, scores, [0] * len(boxes))])
    m = ev.evaluate(str(tmp_path))
    for name, value in expected.items():
        assert m[f"bbox_{name}"] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert m["per_class"]["bbox"] == {"cat": pytest.approx(expected["AP"], rel=1e-9), "dog": -1.0}
    with open(tmp_path / "results_bbox.json") as f:
        direct = pycocotools_stats(gt_path, json.load(f))
    assert [m[f"bbox_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(direct)


def test_labels_map_to_their_category_ids(tmp_path):
    ev = CocoEvaluator(write_gt(tmp_path, OBJECTS), CAT_IDS, NAMES)
    # Every box right, but the image-1 labels swapped (label 0 -> id 3 "cat", 1 -> id 7 "dog").
    ev.add([1, 2], [dets([[10, 10, 30, 30], [30, 20, 80, 60]], [0.9, 0.9], [1, 0]),
                    dets([[5, 5, 105, 85]], [1.0], [0])])
    per_class = ev.evaluate()["per_class"]["bbox"]
    # dog: its one GT is missed and the "dog" on the cat is a false positive -> 0.
    # cat: ranked image-2 cat (1.0, hit), "cat" on the dog (0.9, miss): precision 1, 1/2 at recall
    # .5, .5 -> 51 of 101 recall points at precision 1 -> 51/101.
    assert per_class == {"cat": pytest.approx(51 / 101), "dog": 0.0}


def test_zero_detections_score_zero_without_crashing(tmp_path):
    gt_path = write_gt(tmp_path, OBJECTS)
    ev = CocoEvaluator(gt_path, CAT_IDS, NAMES, iou_types=("bbox", "segm"))
    ev.add([1], [dets([], [], [], masks=torch.zeros(0, 80, 100, dtype=torch.bool))])
    m = ev.evaluate(str(tmp_path / "out"))
    assert m["bbox_AP"] == 0.0 and m["segm_AP"] == 0.0 and m["bbox_APl"] == -1.0
    assert m["per_class"]["bbox"] == {"cat": 0.0, "dog": 0.0}
    with open(tmp_path / "out" / "results_bbox.json") as f:
        assert json.load(f) == []
    assert "cat" in CocoEvaluator.format_summary(m)
    assert CocoEvaluator(gt_path, CAT_IDS, NAMES).evaluate()["bbox_AP"] == 0.0  # nothing added at all


def test_segm_is_scored_on_masks(tmp_path):
    # Small cat C = (10,10,26,26): 16x16 = 256 px. Detected with the exact box but a mask of its left
    # 10 columns: mask IoU = 160/256 = 0.625 -> matched at t = .50, .55, .60 -> segm AP = 3/10,
    # while the box is exact -> bbox AP = 1.
    gt_path = write_gt(tmp_path, [(1, 3, (10, 10, 26, 26))])
    ev = CocoEvaluator(gt_path, CAT_IDS, NAMES, iou_types=("bbox", "segm"))
    mask = torch.from_numpy(rect_mask(80, 100, 10, 10, 20, 26))[None]
    ev.add([1], [dets([[10, 10, 26, 26]], [0.9], [0], masks=mask)])
    m = ev.evaluate(str(tmp_path))
    assert m["bbox_AP"] == pytest.approx(1.0) and m["segm_AP"] == pytest.approx(0.3)
    assert m["per_class"]["segm"]["cat"] == pytest.approx(0.3)
    with open(tmp_path / "results_segm.json") as f:
        assert pycocotools_stats(gt_path, json.load(f), "segm")[0] == pytest.approx(0.3)
    # The same mask given as an RLE, or as uint8 / float probabilities, gives the same result.
    rle = mask_util.encode(np.asfortranarray(mask[0].numpy().astype(np.uint8)[:, :, None]))
    for masks in (rle, mask.to(torch.uint8), mask.float() * 0.9):
        ev = CocoEvaluator(gt_path, CAT_IDS, NAMES, iou_types=("segm",))
        ev.add([1], [dets([[10, 10, 26, 26]], [0.9], [0], masks=masks)])
        assert ev.evaluate()["segm_AP"] == pytest.approx(0.3)


def test_bad_inputs_are_reported(tmp_path):
    ev = CocoEvaluator(write_gt(tmp_path, OBJECTS), CAT_IDS, NAMES)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        ev.add([1], [dets([[0, 0, 1, 1]], [0.5], [2])])
    with pytest.raises(ValueError, match="needs 'masks'"):
        CocoEvaluator("unused.json", CAT_IDS, NAMES, iou_types=("segm",)).add([1], [dets([], [], [])])
    ev.add([99], [dets([[0, 0, 1, 1]], [0.5], [0])])
    with pytest.raises(ValueError, match=r"image ids not in .*\[99\]"):
        ev.evaluate()
    with pytest.raises(ValueError, match="iou_types"):
        CocoEvaluator("unused.json", CAT_IDS, NAMES, iou_types=("keypoints",))


def write_raw_gt(tmp_path, anns):
    """GT file with the given annotation dicts as they stand (no fields filled in)."""
    images = [{"id": k, "height": h, "width": w, "file_name": f"{k}.jpg"} for k, (h, w) in IMAGES.items()]
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, NAMES)]}
    path = tmp_path / "raw_gt.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_file_pycocotools_can_score_is_used_unchanged(tmp_path):
    with open(write_gt(tmp_path, OBJECTS)) as f:
        data = json.load(f)
    data["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 30], [10, 10, 30, 30, 10, 30, 5]]  # polygons
    for iou_types in (("bbox",), ("bbox", "segm")):
        fixed, notes = usable_ground_truth(data, "gt.json", iou_types)
        assert fixed is data and notes == []


def test_annotation_id_zero_is_matched_after_renumbering(tmp_path):
    # pycocotools records a match by the GT's id and reads 0 as "unmatched": the exact detection of a
    # GT with id 0 counts as a false positive and the GT as missed (AP 0 when scored directly).
    gt_path = write_raw_gt(tmp_path, [{"id": 0, "image_id": 1, "category_id": 3, "iscrowd": 0,
                                       "bbox": [10, 10, 20, 20], "area": 400}])
    ev = CocoEvaluator(gt_path, CAT_IDS, NAMES)
    ev.add([1], [dets([A], [0.9], [0])])
    with pytest.warns(UserWarning, match="renumbered"):
        m = ev.evaluate(str(tmp_path))
    assert m["bbox_AP"] == pytest.approx(1.0)
    with open(tmp_path / "results_bbox.json") as f:
        assert pycocotools_stats(gt_path, json.load(f))[0] == 0.0  # the defect this avoids


def test_repeated_annotation_ids_keep_both_objects(tmp_path):
    # Two cats share id 5. pycocotools' index keeps the last under that id and lists it twice, so
    # scored directly A is not in the ground truth at all. Renumbered, A and B both count: A found,
    # B missed -> 51/101 (the hit_and_miss case).
    ann = {"id": 5, "image_id": 1, "category_id": 3, "iscrowd": 0}
    gt_path = write_raw_gt(tmp_path, [dict(ann, bbox=[10, 10, 20, 20], area=400),
                                      dict(ann, bbox=[50, 40, 20, 20], area=400)])
    ev = CocoEvaluator(gt_path, CAT_IDS, NAMES)
    ev.add([1], [dets([A], [0.9], [0])])
    with pytest.warns(UserWarning, match="renumbered"):
        assert ev.evaluate()["bbox_AP"] == pytest.approx(51 / 101)


def test_missing_area_and_iscrowd_are_filled_and_bad_boxes_left_out(tmp_path):
    # No "area": w*h = 400 (small), so APs is defined and APm is not. No "iscrowd": a normal object.
    # An annotation with a string in its bbox (an on_error='skip' dataset skips it) is left out.
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [50, 40, "20", 20], "area": 1}]
    ev = CocoEvaluator(write_raw_gt(tmp_path, anns), CAT_IDS, NAMES)
    ev.add([1], [dets([A], [0.9], [0])])
    with pytest.warns(UserWarning) as record:
        m = ev.evaluate()
    message = str(record[0].message)
    assert "raw_gt.json" in message and "'iscrowd'" in message and "'area'" in message and "left out" in message
    assert m["bbox_AP"] == pytest.approx(1.0) and m["bbox_APs"] == pytest.approx(1.0) and m["bbox_APm"] == -1.0


def test_unusable_segmentations_become_what_pycocotools_can_rasterise(tmp_path):
    # Cat 1: a 2-point part before a valid square polygon (pycocotools would read the list as boxes,
    # its first part having 4 numbers, and fail): the part is dropped, the square matches its exact mask. Cat 2: an empty polygon list,
    # an object with no mask: no detection can match it. Both detected with exact masks: recall 1/2
    # at precision 1, then a false positive -> segm AP50 51/101, while the boxes score 1.
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [10, 10, 20, 20], "area": 400,
             "segmentation": [[1, 1, 5, 5], square]},
            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [50, 40, 20, 20], "area": 400,
             "segmentation": []}]
    ev = CocoEvaluator(write_raw_gt(tmp_path, anns), CAT_IDS, NAMES, iou_types=("bbox", "segm"))
    masks = torch.from_numpy(np.stack([rect_mask(80, 100, *A), rect_mask(80, 100, *B)]))
    ev.add([1], [dets([A, B], [0.9, 0.8], [0, 0], masks=masks)])
    with pytest.warns(UserWarning, match="2 segmentations"):
        m = ev.evaluate()
    assert m["bbox_AP"] == pytest.approx(1.0)
    assert m["segm_AP50"] == pytest.approx(51 / 101) and m["segm_AP"] > 0.4


def test_duplicate_images_count_once_without_distributed(tmp_path):
    ev = CocoEvaluator(write_gt(tmp_path, OBJECTS), CAT_IDS, NAMES)
    # Image 2 added twice; the second copy is a wrong box scored above the right one. Kept, it would
    # rank first as a false positive: precision 0, 1/2 -> AP(cat) = 1/2 * 51/101. Dropped (first copy
    # wins): one of the two cats found at precision 1 -> 51/101.
    ev.add([2, 2], [dets([[5, 5, 105, 85]], [0.5], [0]), dets([[0, 0, 9, 9]], [1.0], [0])])
    ev.gather()
    assert ev.evaluate()["per_class"]["bbox"]["cat"] == pytest.approx(51 / 101)


def test_format_summary_prints_percent_and_a_per_class_table():
    metrics = {"bbox_AP": 0.365, "bbox_AP50": 0.554, "bbox_AP75": 0.391, "bbox_APs": 0.204,
               "bbox_APm": 0.403, "bbox_APl": -1.0,
               "per_class": {"bbox": {"person": 0.5, "bicycle": 0.25, "car": -1.0, "dog": 0.125}}}
    assert CocoEvaluator.format_summary(metrics, columns=2) == "\n".join([
        "bbox: AP 36.5 | AP50 55.4 | AP75 39.1 | APs 20.4 | APm 40.3 | APl -",
        "per-class bbox AP:",
        "class      AP   class      AP",
        "person   50.0   bicycle  25.0",
        "car         -   dog      12.5",
    ])


# ----------------------------------------------------------------------------- DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PERFECT = {1: dets([[10, 10, 30, 30], [30, 20, 80, 60]], [0.8, 0.9], [0, 1]),
           2: dets([[5, 5, 105, 85]], [1.0], [0]), 3: dets([], [], [])}
SHARDS = [[1, 2], [2, 3]]  # image 2 is on both ranks, as a DistributedSampler's padding does


def _ddp_worker(rank, gt_path, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ev = CocoEvaluator(gt_path, CAT_IDS, NAMES)
        ev.add(SHARDS[rank], [PERFECT[i] for i in SHARDS[rank]])
        ev.gather()
        metrics = ev.evaluate(os.path.join(out_dir, "eval") if rank == 0 else None)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


def test_ddp_gather_counts_every_image_once(tmp_path, monkeypatch):
    gt_path = write_gt(tmp_path, OBJECTS)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    mp.spawn(_ddp_worker, args=(gt_path, str(tmp_path)), nprocs=2, join=True)
    with open(tmp_path / "rank1.json") as f:
        assert json.load(f) == {}  # only rank 0 scores
    with open(tmp_path / "rank0.json") as f:
        metrics = json.load(f)
    # A second copy of image 2's cat (score 1.0) would be a false positive ranked above image 1's cat
    # (0.8): precision 1, 1/2, 2/3 -> AP(cat) = (51 + 50 * 2/3) / 101 < 1.
    assert metrics["per_class"]["bbox"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    with open(tmp_path / "eval" / "results_bbox.json") as f:
        assert sorted(r["image_id"] for r in json.load(f)) == [1, 1, 2]
