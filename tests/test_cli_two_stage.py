"""End-to-end smoke runs of the CLIs with the two-stage demo configs on a tiny generated COCO dataset.

``python -m pisa.train`` (a real subprocess) on PISA Faster R-CNN, then ``pisa.eval`` on its checkpoint
(same AP as the training's final evaluation); Mask R-CNN trains in-process and evaluates bbox and segm.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pisa import eval as pisa_eval
from pisa import train as pisa_train
from pisa.data.synthetic import ensure_demo_dataset
from pisa.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FASTER = str(ROOT / "configs" / "demo" / "pisa_faster_rcnn_r18_demo.yaml")
MASK = str(ROOT / "configs" / "demo" / "pisa_mask_rcnn_r18_demo.yaml")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", num_train=6, num_val=3)


def overrides(paths: dict, work_dir: Path, masks: bool = False) -> list[str]:
    with_masks = ", with_masks: true" if masks else ""
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}"
            f"{with_masks}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.train_transforms.scales=[[96,96]]", "data.test_transforms.scales=[[96,96]]",
            "data.batch_size=2", "data.workers=0", "schedule.epochs=1", "schedule.max_iters=2",
            "schedule.warmup_iters=1", "train.eval_interval=1", "train.log_interval=1",
            "model.neck.out_channels=16", "model.rpn.feat_channels=16", "model.roi_head.fc_channels=32",
            "model.roi_head.sampler.num=32", f"train.work_dir={work_dir}"]
    if masks:
        sets.append("model.roi_head.mask={conv_channels: 8, num_convs: 1}")
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained_faster(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("faster")
    proc = subprocess.run([sys.executable, "-m", "pisa.train", FASTER, *overrides(tiny_data, work)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work


def test_train_cli_writes_checkpoint_and_two_stage_losses(trained_faster):
    ckpt = load_checkpoint(trained_faster / "latest.pth")
    assert ckpt["iter"] == 2
    assert any(k.startswith("roi_head.bbox_head.fc_cls") for k in ckpt["model"])
    lines = [json.loads(line) for line in (trained_faster / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r.get("mode") == "train"]
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_carl"} <= set(train_lines[-1])


def test_eval_cli_reproduces_the_training_evaluation(trained_faster, tiny_data):
    lines = [json.loads(line) for line in (trained_faster / "log.jsonl").read_text().splitlines()]
    final = [r for r in lines if "bbox_AP" in r][-1]
    metrics = pisa_eval.main([FASTER, str(trained_faster / "latest.pth"), *overrides(tiny_data, trained_faster)])
    assert metrics["bbox_AP"] == pytest.approx(final["bbox_AP"], abs=1e-9)


def test_mask_rcnn_trains_and_evaluates_bbox_and_segm(tiny_data, tmp_path):
    result = pisa_train.main([MASK, *overrides(tiny_data, tmp_path, masks=True)])
    assert result["iter"] == 2
    assert {"bbox_AP", "segm_AP"} <= set(result["metrics"])
