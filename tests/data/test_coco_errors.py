"""A corpus of malformed datasets: each gives its specific error (naming file, image id and file
name where relevant) with on_error="raise", or a counted skip with on_error="skip"."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from pisa.data import CocoDataset
from pisa.data import errors as E


def _set(path: list, value):
    def mutate(coco):
        node = coco
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path: list):
    def mutate(coco):
        node = coco
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _append(key: str, item: dict):
    return lambda coco: coco[key].append(item)


def _truncate_b(root: Path) -> None:
    path = root / "images" / "b.jpg"
    data = path.read_bytes()
    path.write_bytes(data[:-150])  # keep the header, lose the end of the scan data


def _dir_instead_of_b(root: Path) -> None:
    (root / "images" / "b.jpg").unlink()
    (root / "images" / "b.jpg").mkdir()


def _text_instead_of_b(root: Path) -> None:
    (root / "images" / "b.jpg").write_text("not an image")


def _resize_b(root: Path) -> None:
    from PIL import Image
    Image.new("RGB", (13, 24)).save(root / "images" / "b.jpg")


def _not_json(root: Path) -> None:
    (root / "ann.json").write_text("{'images': [")   # python repr, not JSON


def _ann_dir(root: Path) -> None:
    (root / "ann.json").unlink()
    (root / "ann.json").mkdir()


@dataclass
class Case:
    name: str
    error: type
    fragments: list[str]                       # all must occur in the message
    mutate: Callable | None = None             # edits the JSON dict before writing
    after: Callable | None = None              # edits files after writing
    phase: str = "construct"                   # construct | load
    skippable: bool = True
    extra: dict = field(default_factory=dict)  # CocoDataset kwargs


A1 = ["annotation id 1", "image id 11", "'a.jpg'"]
B_IMG = ["image id 12", "'b.jpg'", "b.jpg"]
CASES = [
    # image files, found at load time
    Case("missing image", E.ImageNotFoundError, B_IMG + ["not found"], phase="load",
         after=lambda r: (r / "images" / "b.jpg").unlink()),
    Case("truncated jpeg", E.ImageDecodeError, B_IMG + ["truncated"], phase="load", after=_truncate_b),
    Case("size mismatch", E.ImageSizeMismatchError, B_IMG + ["13x24", "12x24"], phase="load",
         after=_resize_b),
    Case("directory instead of image", E.ImageDecodeError, B_IMG, phase="load",
         after=_dir_instead_of_b),
    Case("text file instead of image", E.ImageDecodeError, B_IMG, phase="load",
         after=_text_instead_of_b),
    # the annotation file as a whole: never skippable
    Case("non-JSON file", E.AnnotationFileError, ["ann.json", "not valid JSON"], after=_not_json,
         skippable=False),
    Case("annotation file is a directory", E.AnnotationFileError, ["ann.json", "directory"],
         after=_ann_dir, skippable=False),
    Case("annotation file missing", E.AnnotationFileError, ["ann.json", "not found"],
         after=lambda r: (r / "ann.json").unlink(), skippable=False),
    Case("top level is a list", E.AnnotationFileError, ["ann.json", "JSON list"],
         after=lambda r: (r / "ann.json").write_text("[]"), skippable=False),
    Case("missing images key", E.AnnotationFileError, ["ann.json", "has no 'images'"],
         mutate=_delete(["images"]), skippable=False),
    Case("empty categories", E.CategoryError, ["ann.json", "empty 'categories'"],
         mutate=_set(["categories"], []), skippable=False),
    Case("category without name", E.CategoryError, ["ann.json", "'name'"],
         mutate=_delete(["categories", 0, "name"]), skippable=False),
    Case("duplicate category id", E.CategoryError, ["ann.json", "category id 5 appears twice"],
         mutate=_append("categories", {"id": 5, "name": "again"}), skippable=False),
    # one images entry
    Case("duplicate image ids", E.DuplicateImageIdError, ["ann.json", "image id 12", "'b.jpg'",
                                                          "'dup.jpg'"],
         mutate=_append("images", {"id": 12, "file_name": "dup.jpg", "width": 8, "height": 8})),
    Case("image without width", E.ImageRecordError, ["ann.json", "'width'", "c.jpg"],
         mutate=_delete(["images", 2, "width"])),
    # one annotations entry
    Case("unknown category id", E.UnknownCategoryIdError, A1 + ["category_id 3"],
         mutate=_set(["annotations", 0, "category_id"], 3)),
    Case("annotation for a missing image", E.UnknownImageIdError, ["annotation id 1", "image id 99"],
         mutate=_set(["annotations", 0, "image_id"], 99)),
    Case("bbox of wrong length", E.MalformedBoxError, A1 + ["[2, 4, 8]"],
         mutate=_set(["annotations", 0, "bbox"], [2, 4, 8])),
    Case("non-numeric bbox", E.MalformedBoxError, A1 + ["non-numeric", "'4'"],
         mutate=_set(["annotations", 0, "bbox"], [2, "4", 8, 8])),
    Case("boolean in bbox", E.MalformedBoxError, A1 + ["non-numeric"],
         mutate=_set(["annotations", 0, "bbox"], [2, True, 8, 8])),
    Case("non-finite bbox", E.MalformedBoxError, A1 + ["non-finite"],
         mutate=_set(["annotations", 0, "bbox"], [2, 4, float("nan"), 8])),
    Case("non-numeric area", E.AnnotationError, A1 + ["non-numeric 'area' 'big'"],
         mutate=_set(["annotations", 0, "area"], "big")),
    Case("bbox value too large for a float", E.MalformedBoxError, A1 + ["non-finite"],
         mutate=_set(["annotations", 0, "bbox"], [2, 4, 10**400, 8])),
    Case("annotation without bbox", E.MalformedBoxError, A1 + ["has no 'bbox'"],
         mutate=_delete(["annotations", 0, "bbox"])),
    Case("duplicate annotation ids", E.DuplicateAnnotationIdError, ["annotation id 1", "image id 12",
                                                                    "'b.jpg'", "used twice"],
         mutate=_set(["annotations", 3, "id"], 1)),
    Case("annotation is not an object", E.AnnotationError, ["ann.json", "not an object"],
         mutate=_append("annotations", [1, 2, 3])),
    Case("missing segmentation with masks", E.AnnotationError, A1 + ["segmentation"],
         mutate=lambda c: [a.update(segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]])
                           for a in c["annotations"][1:]],
         extra={"with_masks": True}),
    Case("undecodable polygon", E.AnnotationError, ["image id 11", "'a.jpg'", "cannot be decoded"],
         mutate=lambda c: [a.update(segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]]) for a in c["annotations"]]
         + [c["annotations"][0].update(segmentation=[["x", 1, 2]])],
         phase="load", extra={"with_masks": True}),
    Case("polygon of two points", E.AnnotationError, ["image id 11", "no polygon part has 3 or more points"],
         mutate=lambda c: [a.update(segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]]) for a in c["annotations"]]
         + [c["annotations"][0].update(segmentation=[[1, 1, 5, 5]])],
         phase="load", extra={"with_masks": True}),
]


def _build(case: Case, make_coco, coco: dict):
    if case.mutate:
        case.mutate(coco)
    ann_file, img_dir = make_coco(coco)
    if case.after:
        case.after(Path(ann_file).parent)
    return ann_file, img_dir


def _load_all(ds):
    return [ds[i] for i in range(len(ds))]


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_raise_names_the_problem(make_coco, base_coco, case):
    ann_file, img_dir = _build(case, make_coco, base_coco)
    with pytest.raises(case.error) as info:
        ds = CocoDataset(ann_file, img_dir, **case.extra)
        assert case.phase == "load", "a structural problem must be found at construction"
        _load_all(ds)
    message = str(info.value)
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError) and isinstance(info.value, E.DatasetError)
    if case.skippable:
        assert "on_error to 'skip' (--set data.train.on_error=skip" in message  # says what to do


@pytest.mark.parametrize("case", [c for c in CASES if c.skippable], ids=lambda c: c.name)
def test_skip_counts_the_problem(make_coco, base_coco, case):
    ann_file, img_dir = _build(case, make_coco, base_coco)
    ds = CocoDataset(ann_file, img_dir, on_error="skip", **case.extra)
    if case.phase == "load":
        with pytest.warns(UserWarning, match=re.escape(case.fragments[0])):
            samples = _load_all(ds)
        assert len(samples) == len(ds)  # the broken image was replaced by a loadable one
    summary = ds.summary()
    assert "skipped (on_error='skip'): 1 " in summary
    assert f"{case.error.__name__}: 1" in summary


@pytest.mark.parametrize("case", [c for c in CASES if not c.skippable], ids=lambda c: c.name)
def test_file_level_problems_raise_even_when_skipping(make_coco, base_coco, case):
    ann_file, img_dir = _build(case, make_coco, base_coco)
    with pytest.raises(case.error):
        CocoDataset(ann_file, img_dir, on_error="skip")


def test_missing_image_folder_found_at_construction(make_coco):
    ann_file, img_dir = make_coco()
    with pytest.raises(E.ImageNotFoundError, match="image folder .*does not exist"):
        CocoDataset(ann_file, os.path.join(img_dir, "nope"))


def test_unknown_on_error_mode(coco_files):
    with pytest.raises(E.DatasetConfigError, match="'raise'.*'skip'"):
        CocoDataset(*coco_files, on_error="ignore")


def test_worker_error_surfaces_with_the_clear_message(tmp_path, make_coco):
    ann_file, img_dir = make_coco()
    (Path(img_dir) / "b.jpg").unlink()
    ds = CocoDataset(ann_file, img_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(E.ImageNotFoundError) as info:
        list(loader)
    message = str(info.value)
    # The original message comes first, then where it was raised, then the worker traceback.
    assert message.startswith("image file not found:"), message
    assert "image id 12, file 'b.jpg'" in message.splitlines()[0]
    assert "raised in DataLoader worker process 0" in message


def test_load_skips_do_not_repeat(tmp_path, make_coco):
    ann_file, img_dir = make_coco()
    (Path(img_dir) / "b.jpg").unlink()
    ds = CocoDataset(ann_file, img_dir, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [ds[i][1]["image_id"] for i in range(len(ds))]
        second = [ds[i][1]["image_id"] for i in range(len(ds))]
    assert first == second == [11, 13, 13]  # b.jpg (id 12) is replaced by the next image
    assert len(caught) == 1 and ds.load_skips == {"ImageNotFoundError": 1}
