"""The commands as a user meets them when something is wrong: one ``error:`` line naming the file,
image id or config key, a non-zero exit, no traceback; bugs keep theirs; ``PISA_DEBUG=1`` shows it.

Every malformed dataset of the data tests' corpus goes through ``python -m pisa.train`` in a
subprocess, the image errors both in the main process and in a DataLoader worker.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pisa.data import errors as E

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo" / "retinanet_r18_demo.yaml")


def _load(name: str, relative: str):
    """A module of the data tests, by path (their folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


CORPUS = _load("coco_error_corpus", "data/test_coco_errors.py")
_DATA = _load("coco_test_files", "data/conftest.py")
BASE_COCO, write_coco = _DATA.BASE_COCO, _DATA.write_coco

# Tiny and fast: the errors show up while indexing or on the first batch.
TINY = ["data.train_transforms.scales=[[64,64]]", "data.test_transforms.scales=[[64,64]]",
        "data.batch_size=2", "schedule.max_iters=2", "schedule.warmup_iters=1", "train.eval_interval=0",
        "model.neck.out_channels=8", "model.head.feat_channels=8", "model.head.stacked_convs=1",
        "model.num_classes=auto"]


def _dataset_sets(ann_file: str, img_dir: str, split: str = "train", extra: dict | None = None) -> str:
    options = "".join(f", {k}: {json.dumps(v)}" for k, v in (extra or {}).items())
    return f"data.{split}={{type: coco, ann_file: {ann_file}, img_dir: {img_dir}{options}}}"


def run_cli(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k != "PISA_DEBUG"}
    env.update({"OMP_NUM_THREADS": "1", **extra})
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_on(root: Path, case, workers: int) -> subprocess.CompletedProcess:
    coco = copy.deepcopy(BASE_COCO)
    if case.mutate:
        case.mutate(coco)
    ann_file, img_dir = write_coco(root, coco)
    if case.after:
        case.after(root)
    good_ann, good_dir = write_coco(root / "good", copy.deepcopy(BASE_COCO))
    sets = [_dataset_sets(ann_file, img_dir, extra=case.extra), _dataset_sets(good_ann, good_dir, "val"),
            f"data.workers={workers}", f"train.work_dir={root / 'work'}", *TINY]
    return run_cli(["pisa.train", CONFIG, "--set", *sets])


def assert_one_line_error(proc: subprocess.CompletedProcess, fragments: list[str], code: int = 1) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


# One case per error class of pisa.data.errors that a file can cause, plus the ones users met first.
_FIRST_MET = ("bbox of wrong length", "non-finite bbox", "non-JSON file", "missing images key")
# The annotation file's path is a config key: a missing file or a directory is a config error (below).
_PATH_CASES = ("annotation file missing", "annotation file is a directory")
_CONSTRUCT = [c for c in CORPUS.CASES if c.phase == "construct" and c.name not in _PATH_CASES]
_FIRST_OF_CLASS = {c.error: c for c in reversed(_CONSTRUCT)}.values()
TRAIN_CASES = [c for c in _CONSTRUCT if c in _FIRST_OF_CLASS or c.name in _FIRST_MET]
TRAIN_CASES.append(CORPUS.Case("empty annotation file", E.AnnotationFileError, ["ann.json"],
                               after=lambda r: (r / "ann.json").write_text(""), skippable=False))
# Image files fail when a batch is loaded: every kind in a DataLoader worker, two in the main process.
IMAGE_CASES = [c for c in CORPUS.CASES if c.phase == "load" and c.error is not E.AnnotationError]
IMAGE_RUNS = [(c, 1) for c in IMAGE_CASES] + [(c, 0) for c in IMAGE_CASES[:2]]


def test_the_corpus_covers_every_dataset_error_class():
    covered = {c.error for c in TRAIN_CASES + IMAGE_CASES}
    file_errors = {cls for cls in vars(E).values() if isinstance(cls, type) and issubclass(cls, E.DatasetError)}
    # Base classes and the config-side one are raised through their subclasses / the config schema.
    assert file_errors - covered <= {E.DatasetError, E.ImageLoadError, E.DatasetConfigError}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.name for c in TRAIN_CASES])
def test_train_reports_a_broken_annotation_file_in_one_line(tmp_path, case):
    assert_one_line_error(train_on(tmp_path, case, workers=0), case.fragments)


@pytest.mark.parametrize("case, workers", IMAGE_RUNS,
                         ids=[f"{c.name}, {'worker' if w else 'main process'}" for c, w in IMAGE_RUNS])
def test_train_reports_a_broken_image_in_one_line(tmp_path, case, workers):
    line = assert_one_line_error(train_on(tmp_path, case, workers), case.fragments)
    assert ("DataLoader worker" in line) == (workers > 0)


def test_pisa_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    case = next(c for c in CORPUS.CASES if c.name == "unknown category id")
    coco = copy.deepcopy(BASE_COCO)
    case.mutate(coco)
    ann_file, img_dir = write_coco(tmp_path, coco)
    proc = run_cli(["pisa.train", CONFIG, "--set", _dataset_sets(ann_file, img_dir), _dataset_sets(ann_file, img_dir, "val"),
                    f"train.work_dir={tmp_path / 'w'}", *TINY], env={"PISA_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UnknownCategoryIdError" in proc.stderr


def test_an_annotation_path_that_is_missing_or_a_directory_is_a_config_error(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, copy.deepcopy(BASE_COCO))
    good = _dataset_sets(ann_file, img_dir, "val")
    proc = run_cli(["pisa.train", CONFIG, "--set", _dataset_sets(str(tmp_path / "nope.json"), img_dir), good])
    assert_one_line_error(proc, ["data.train.ann_file", "nope.json", "does not exist"], code=2)
    proc = run_cli(["pisa.train", CONFIG, "--set", _dataset_sets(img_dir, img_dir), good])
    assert_one_line_error(proc, ["data.train.ann_file", "is a directory, not a file"], code=2)


def test_config_and_usage_errors_exit_2_in_one_line(tmp_path):
    assert_one_line_error(run_cli(["pisa.train", CONFIG, "--set", "optim.lr=0.1", "optim.lrr=2"]),
                          ["optim.lrr", "optim.lr"], code=2)
    assert_one_line_error(run_cli(["pisa.train", CONFIG, "--set", "optim.lr=0.1", "notakey"]),
                          ["'notakey'", "KEY.PATH=VALUE"], code=2)
    assert_one_line_error(run_cli(["pisa.eval", CONFIG, str(tmp_path / "none.pth"), "--set",
                                   "data.val={type: synthetic, split: val, root: " + str(tmp_path / "d") + "}"]),
                          ["none.pth", "does not exist"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_with_a_broken_image_stops_both_ranks(tmp_path):
    """Two gloo processes launched as torchrun launches them, without torchrun to clean up: the
    process that meets the missing image reports it, the other sees its peer gone and stops too."""
    coco = copy.deepcopy(BASE_COCO)
    ann_file, img_dir = write_coco(tmp_path, coco)
    (Path(img_dir) / "b.jpg").unlink()
    sets = [_dataset_sets(ann_file, img_dir), _dataset_sets(ann_file, img_dir, "val"), "data.workers=1",
            "data.batch_size=1", "data.aspect_grouping=false", f"train.work_dir={tmp_path / 'work'}", *TINY]
    port = str(_free_port())
    start = time.monotonic()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k != "PISA_DEBUG"}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "pisa.train", CONFIG, "--set", *sets,
                                       "--set", "schedule.max_iters=4"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - start
    assert all(p.returncode != 0 for p in procs), outputs
    stderr = "\n".join(err for _, err in outputs)
    assert "Traceback" not in stderr, stderr[-3000:]
    reports = [line for line in stderr.splitlines() if line.startswith("error: [rank ")]
    assert any("b.jpg" in line and "not found" in line for line in reports), stderr[-3000:]
    assert any("another process of this run stopped" in line for line in reports), stderr[-3000:]
    assert elapsed < 60  # seconds of start-up and one step, not the collective timeout


def _eight_class_coco() -> dict:
    """Four 32x32 images, each with two boxes, eight categories (ids 10, 20, ..., 80)."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 32, "height": 32} for i in range(1, 5)]
    annotations = [{"id": 2 * i + k + 1, "image_id": i + 1, "category_id": 10 * (2 * i + k + 1),
                    "bbox": [2 + 14 * k, 3, 12, 12], "area": 144, "iscrowd": 0}
                   for i in range(4) for k in range(2)]
    categories = [{"id": 10 * c, "name": f"c{c}"} for c in range(1, 9)]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_more_categories_than_num_classes_stops_before_training(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, _eight_class_coco())
    proc = run_cli(["pisa.train", CONFIG, "--set", _dataset_sets(ann_file, img_dir),
                    _dataset_sets(ann_file, img_dir, "val"), f"train.work_dir={tmp_path / 'w'}",
                    *TINY[:-1], "model.num_classes=4"])
    assert_one_line_error(proc, ["model.num_classes is 4", "has 8 categories", ann_file,
                                 "--set model.num_classes=8"], code=2)
    assert not (tmp_path / "w" / "latest.pth").exists()


def test_auto_takes_the_class_count_and_the_checkpoint_keeps_the_classes(tmp_path, capsys):
    from pisa import train as pisa_train
    from pisa.engine.checkpoint import load_checkpoint

    ann_file, img_dir = write_coco(tmp_path, _eight_class_coco())
    sets = [_dataset_sets(ann_file, img_dir), _dataset_sets(ann_file, img_dir, "val"), "data.workers=0",
            f"train.work_dir={tmp_path / 'w'}", *TINY]
    pisa_train.main([CONFIG, "--set", *sets, "--device", "cpu"])
    ckpt = load_checkpoint(tmp_path / "w" / "latest.pth")
    assert ckpt["model"]["head.cls_logits.weight"].shape[0] == 9 * 8  # 9 anchors x 8 classes
    assert ckpt["meta"]["class_names"] == [f"c{c}" for c in range(1, 9)]
    assert ckpt["meta"]["cat_ids"] == [10 * c for c in range(1, 9)]
    assert ckpt["config"]["model"]["num_classes"] == 8  # the resolved count is what was saved
    out = capsys.readouterr().out
    assert "model: retinanet (resnet18), 8 classes; PISA off" in out
    assert "train data: 4 images" in out and "16 objects" not in out and "8 objects, 8 classes" in out

    # eval and predict take the classes from the checkpoint, and refuse a val set of other categories
    other = _eight_class_coco()
    other["categories"][2]["name"] = "renamed"
    other_ann, other_dir = write_coco(tmp_path / "other", other)
    proc = run_cli(["pisa.eval", CONFIG, str(tmp_path / "w" / "latest.pth"), "--set", *sets[:1],
                    _dataset_sets(other_ann, other_dir, "val"), *TINY, "--device", "cpu"])
    assert_one_line_error(proc, ["data.val", "30 'c3' vs 'renamed'"], code=2)


def test_val_categories_must_equal_train_categories(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, _eight_class_coco())
    fewer = _eight_class_coco()
    fewer["categories"] = fewer["categories"][:6]
    fewer["annotations"] = [a for a in fewer["annotations"] if a["category_id"] <= 60]
    val_ann, val_dir = write_coco(tmp_path / "val", fewer)
    proc = run_cli(["pisa.train", CONFIG, "--set", _dataset_sets(ann_file, img_dir),
                    _dataset_sets(val_ann, val_dir, "val"), f"train.work_dir={tmp_path / 'w'}", *TINY])
    assert_one_line_error(proc, ["data.val", f"only in {ann_file}: 70 'c7', 80 'c8'"], code=2)


def test_reported_errors_turns_out_of_memory_into_the_setting_to_lower(capsys, monkeypatch):
    import torch

    from pisa.cli import reported_errors

    monkeypatch.delenv("PISA_DEBUG", raising=False)
    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory")):
        with pytest.raises(SystemExit) as info, reported_errors(lambda: "lower data.batch_size (now 8)"):
            raise err
        assert info.value.code == 1
        err_text = capsys.readouterr().err
        assert err_text.startswith("error: out of memory (") and "lower data.batch_size (now 8)" in err_text
        assert err_text.count("\n") == 1


def test_reported_errors_keeps_the_traceback_of_a_bug(monkeypatch):
    from pisa.cli import reported_errors

    monkeypatch.delenv("PISA_DEBUG", raising=False)
    with pytest.raises(KeyError), reported_errors():
        raise KeyError("a bug")
    with pytest.raises(RuntimeError, match="some kernel failed"), reported_errors():
        raise RuntimeError("some kernel failed")  # not a peer failure in a single process


def test_error_line_drops_a_worker_traceback():
    from pisa.cli import error_line

    wrapped = ("Caught ImageNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
               "last):\n  File \"x.py\", line 1, in f\npisa.data.errors.ImageNotFoundError: image b.jpg not found\n")
    err = E.ImageNotFoundError(wrapped)
    assert error_line(err) == "image b.jpg not found (raised in DataLoader worker process 0)"
