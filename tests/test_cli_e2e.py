"""End-to-end smoke runs of the CLIs on a tiny generated COCO dataset.

train -> checkpoint -> eval (same AP as train's final evaluation) -> predict (JSON + drawings),
through the real config files, data pipeline, RetinaNet with PISA, trainer and evaluator.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pisa import eval as pisa_eval
from pisa import predict as pisa_predict
from pisa import train as pisa_train
from pisa.data.synthetic import ensure_demo_dataset
from pisa.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo" / "pisa_retinanet_r18_demo.yaml")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", num_train=8, num_val=4)


def overrides(paths: dict, work_dir: Path) -> list[str]:
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.train_transforms.scales=[[96,96]]", "data.test_transforms.scales=[[96,96]]",
            "data.batch_size=2", "data.workers=0", "schedule.epochs=1", "schedule.max_iters=3",
            "schedule.warmup_iters=2", "train.eval_interval=1", "train.log_interval=1",
            "model.neck.out_channels=16", "model.head.feat_channels=16", "model.head.stacked_convs=1",
            f"train.work_dir={work_dir}"]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    result = pisa_train.main([CONFIG, *overrides(tiny_data, work)])
    return work, result


def test_train_writes_checkpoint_log_and_config(trained):
    work, result = trained
    assert result["iter"] == 3
    assert {"bbox_AP", "bbox_AP50"} <= set(result["metrics"])
    ckpt = load_checkpoint(work / "latest.pth")  # weights_only
    assert ckpt["iter"] == 3 and ckpt["meta"]["class_names"] == ["circle", "square", "triangle", "cross"]
    assert ckpt["meta"]["cat_ids"] == [1, 3, 7, 9]
    assert not any(k.startswith("module.") for k in ckpt["model"])
    lines = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r.get("mode") == "train"]
    assert train_lines and {"loss_cls", "loss_bbox", "loss_carl", "lr"} <= set(train_lines[-1])
    assert (work / "config.yaml").exists()


def test_eval_reproduces_training_metrics(trained, tiny_data):
    work, result = trained
    metrics = pisa_eval.main([CONFIG, str(work / "latest.pth"), *overrides(tiny_data, work),
                              "--out", str(work / "eval_cli")])
    assert metrics["bbox_AP"] == pytest.approx(result["metrics"]["bbox_AP"], abs=1e-9)
    results = json.loads((work / "eval_cli" / "results_bbox.json").read_text())
    assert all(r["category_id"] in (1, 3, 7, 9) for r in results)


def test_predict_writes_json_and_drawings(trained, tiny_data, tmp_path):
    work, _ = trained
    out = tmp_path / "pred"
    rows = pisa_predict.main([CONFIG, str(work / "latest.pth"), tiny_data["val_img_dir"], "--out", str(out),
                              "--score-thr", "0.0", *overrides(tiny_data, work)])
    saved = json.loads((out / "predictions.json").read_text())
    assert saved == rows
    assert len(list(out.glob("*_pred.jpg"))) == 4
    assert all(len(r["bbox"]) == 4 and r["category_id"] in (1, 3, 7, 9) for r in rows)


def test_predict_missing_input_is_a_clear_error(trained, tiny_data, tmp_path, capsys):
    work, _ = trained
    with pytest.raises(SystemExit) as exc:
        pisa_predict.main([CONFIG, str(work / "latest.pth"), str(tmp_path / "nope.jpg"),
                           *overrides(tiny_data, work)])
    assert exc.value.code == 2
    assert "nope.jpg" in capsys.readouterr().err


def test_config_cli_suggests_misspelled_key():
    proc = subprocess.run([sys.executable, "-m", "pisa.config", CONFIG, "--set", "optim.lr_rate=0.1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "optim.lr_rate" in proc.stderr and "optim.lr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_set_override_reaches_built_model():
    from pisa.config import load_config
    from pisa.models import build_model
    cfg = load_config(CONFIG, ["model.head.stacked_convs=3", "model.neck.out_channels=8",
                               "model.test.max_per_img=7", "pisa=null"])
    model = build_model(cfg)
    assert len(model.head.cls_convs) == 3
    assert model.head.cls_convs[0].in_channels == 8
    assert model.postprocessor.max_per_img == 7
    assert model.criterion.isr_p is None and model.criterion.carl is None


@pytest.mark.parametrize("cli", ["eval", "predict"])
def test_a_checkpoint_of_another_shape_is_a_one_line_error(cli, trained, tiny_data, tmp_path, capsys):
    """A config that does not describe the checkpoint (here: 5 classes instead of 4) names the tensors."""
    work, _ = trained
    args = [CONFIG, str(work / "latest.pth")] + ([tiny_data["val_img_dir"]] if cli == "predict" else [])
    args += [*overrides(tiny_data, work), "--set", "model.num_classes=5", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        (pisa_eval if cli == "eval" else pisa_predict).main(args)
    assert exc.value.code in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "head.cls_logits.weight: checkpoint [36, 16, 3, 3], model [45, 16, 3, 3]" in err
    assert "model.*" in err


def test_load_from_keeps_the_init_of_tensors_of_another_shape(trained, tiny_data, capsys):
    """Fine-tuning to another class count: every tensor that fits is loaded, the classifier is not."""
    import torch

    from pisa.config import load_config
    from pisa.models import build_model

    work, _ = trained
    sets = overrides(tiny_data, work)[1::2] + ["model.num_classes=5", f"load_from={work / 'latest.pth'}"]
    cfg = load_config(CONFIG, sets)
    model = build_model(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    pisa_train.load_initial_weights(model, cfg, trust=False)
    saved = load_checkpoint(work / "latest.pth")["model"]
    state = model.state_dict()
    assert torch.equal(state["head.cls_logits.weight"], initial["head.cls_logits.weight"])
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("head.cls_logits."))
    assert "skipped for another shape 2" in capsys.readouterr().out
