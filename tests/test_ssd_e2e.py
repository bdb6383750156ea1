"""End-to-end smoke run of the PISA SSD demo config: ``python -m pisa.train`` in a subprocess for 2
iterations on a tiny generated dataset (SSD augmentation, loader, VGG16-SSD with ISR-P and CARL,
trainer, evaluator), then ``pisa.eval`` and ``pisa.predict`` on its checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pisa import eval as pisa_eval
from pisa import predict as pisa_predict
from pisa.data.synthetic import ensure_demo_dataset
from pisa.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo" / "pisa_ssd_demo.yaml")

pytestmark = pytest.mark.slow  # a training subprocess: a few seconds


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", num_train=6, num_val=3)


def overrides(paths: dict, work_dir: Path) -> list[str]:
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.batch_size=2", "data.workers=0", "schedule.epochs=1", "schedule.max_iters=2",
            "schedule.warmup_iters=1", "train.eval_interval=1", "train.log_interval=1",
            "model.backbone.width=0.125", f"train.work_dir={work_dir}"]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("ssd_run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pisa.train", CONFIG, *overrides(tiny_data, work)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_train_runs_two_iterations_with_pisa_losses(trained):
    ckpt = load_checkpoint(trained / "latest.pth")
    assert ckpt["iter"] == 2 and ckpt["config"]["model"]["type"] == "ssd"
    assert not any(k.startswith("module.") for k in ckpt["model"])
    lines = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r.get("mode") == "train"]
    assert train_lines and {"loss_cls", "loss_bbox", "loss_carl"} <= set(train_lines[-1])
    assert all(v == v and abs(v) < 1e6 for r in train_lines for k, v in r.items() if k.startswith("loss"))


def test_eval_and_predict_read_the_checkpoint(trained, tiny_data, tmp_path):
    metrics = pisa_eval.main([CONFIG, str(trained / "latest.pth"), *overrides(tiny_data, trained),
                              "--out", str(tmp_path / "eval")])
    assert "bbox_AP" in metrics and 0.0 <= metrics["bbox_AP"] <= 1.0
    rows = pisa_predict.main([CONFIG, str(trained / "latest.pth"), tiny_data["val_img_dir"], "--out",
                              str(tmp_path / "pred"), "--score-thr", "0.0", *overrides(tiny_data, trained)])
    assert all(len(r["bbox"]) == 4 and r["category_id"] in (1, 3, 7, 9) for r in rows)
