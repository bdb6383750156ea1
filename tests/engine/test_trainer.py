"""The training loop end to end on the tiny model: logs, checkpoints, non-finite losses, AMP, CLIs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tiny
from pisa import eval as pisa_eval
from pisa import train as pisa_train
from pisa.engine.dist import DistInfo
from pisa.engine.trainer import NonFiniteLossError, Trainer

CPU = ["--device", "cpu"]


def _trainer(tmp_path: Path, model_kwargs: dict | None = None, ref_batch: int | None = 2, **sections) -> Trainer:
    cfg = tiny.tiny_config(tmp_path / "work", **sections)
    cfg["optim"]["ref_batch"] = ref_batch  # null (no scaling) is accepted by the Trainer, not by the schema
    parts = tiny.tiny_parts(cfg, DistInfo(), **(model_kwargs or {}))
    return Trainer(cfg, parts.model, parts.train_loader, parts.val_loader, parts.evaluator,
                   dist_info=DistInfo())


def _log(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[dict, Path]:
    """18 iterations (3 epochs of 6), evaluation every epoch, iteration checkpoints every 4."""
    tmp_path = tmp_path_factory.mktemp("full")
    cfg = tiny.tiny_config(tmp_path / "work", train={"ckpt_iter_interval": 4})
    result = tiny.main([tiny.write_config(tmp_path / "cfg.yaml", cfg), *CPU])
    return result, tmp_path / "work"


def test_log_jsonl_has_one_valid_line_per_logging_step(full_run):
    _, work_dir = full_run
    lines = _log(work_dir)
    train = [x for x in lines if x["mode"] == "train"]
    assert [x["iter"] for x in train] == list(range(1, 19))
    assert [x["epoch"] for x in train] == [1] * 6 + [2] * 6 + [3] * 6
    for x in train:
        for key in ("lr", "loss_cls", "loss_bbox", "acc", "loss", "grad_norm", "data_time", "step_time",
                    "max_mem_mb"):
            assert isinstance(x[key], float) and math.isfinite(x[key]), key
        assert x["loss"] == pytest.approx(x["loss_cls"] + x["loss_bbox"])  # "acc" is logged, not summed
    # lr of the step: optim.lr 0.02 (ref_batch 2 = batch 2); warmup 3 iterations from 0.1x:
    # 0.02 * (1 - (1 - i/3) * 0.9) for i = 0, 1, 2 -> 0.002, 0.008, 0.014; x0.1 from epoch 3 (iter 13).
    lrs = [x["lr"] for x in train]
    assert lrs == pytest.approx([0.002, 0.008, 0.014] + [0.02] * 9 + [0.002] * 6)
    val = [x for x in lines if x["mode"] == "val"]
    assert [(x["epoch"], x["iter"]) for x in val] == [(1, 6), (2, 12), (3, 18)]


def test_checkpoints_config_and_best(full_run):
    result, work_dir = full_run
    names = sorted(p.name for p in work_dir.glob("*.pth"))
    # iteration 12 ends epoch 2: its checkpoint is the epoch one, taken after evaluation
    assert names == ["best.pth", "epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "iter_16.pth", "iter_4.pth",
                     "iter_8.pth", "latest.pth"]
    assert (work_dir / "config.yaml").is_file()
    val = [x for x in _log(work_dir) if x["mode"] == "val"]
    best = max(val, key=lambda x: x["bbox_AP"])
    saved_best = torch.load(work_dir / "best.pth", weights_only=True)
    assert saved_best["best"] == {"metric": "bbox_AP", "value": best["bbox_AP"], "epoch": best["epoch"],
                                  "iter": best["iter"]}
    assert saved_best["epoch"] == best["epoch"]
    assert result["best"] == saved_best["best"]
    assert result["metrics"]["bbox_AP"] == val[-1]["bbox_AP"]
    iter8 = torch.load(work_dir / "iter_8.pth", weights_only=True)
    assert (iter8["iter"], iter8["epoch"], iter8["meta"]["data"]["iter_in_epoch"]) == (8, 1, 2)


def test_a_run_capped_mid_epoch_is_evaluated_and_checkpointed_at_its_end(tmp_path):
    result = _trainer(tmp_path, schedule={"max_iters": 4}).train()
    assert result["iter"] == 4
    val = [x for x in _log(tmp_path / "work") if x["mode"] == "val"]
    assert [(x["epoch"], x["iter"]) for x in val] == [(1, 4)]
    best = torch.load(tmp_path / "work" / "best.pth", weights_only=True)
    assert (best["iter"], best["epoch"], best["meta"]["data"]["iter_in_epoch"]) == (4, 0, 4)
    assert best["best"]["value"] == val[0]["bbox_AP"] == result["metrics"]["bbox_AP"]


def test_eval_interval_0_never_evaluates(tmp_path):
    result = _trainer(tmp_path, train={"eval_interval": 0}, schedule={"epochs": 1}).train()
    assert (result["iter"], result["metrics"], result["best"]) == (6, {}, None)
    assert not [x for x in _log(tmp_path / "work") if x["mode"] == "val"]
    assert sorted(p.name for p in (tmp_path / "work").glob("*.pth")) == ["epoch_1.pth", "latest.pth"]


def test_nonfinite_loss_stops_naming_the_term_and_iteration(tmp_path):
    trainer = _trainer(tmp_path, {"nonfinite_at": [3]})
    with pytest.raises(NonFiniteLossError, match=r"iteration 3 \(epoch 1\): loss_bbox=nan") as err:
        trainer.train()
    assert "loss_cls=" not in str(err.value).split("(all terms")[0]  # only the bad term is named
    assert "train.nonfinite: skip" in str(err.value)
    assert not list((tmp_path / "work").glob("*.pth"))
    assert _log(tmp_path / "work")[-1]["mode"] == "error"


def test_nonfinite_loss_through_the_cli_is_one_line_and_exit_1(tmp_path, capsys):
    config = tiny.write_config(tmp_path / "cfg.yaml", tiny.tiny_config(tmp_path / "work"))
    with pytest.raises(SystemExit) as exit_info:
        tiny.main([config, *CPU, "--nonfinite-at", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss at iteration 2 (epoch 1): loss_bbox=nan")


def test_skip_mode_skips_and_counts_bad_steps(tmp_path):
    trainer = _trainer(tmp_path, {"nonfinite_at": [2, 5]}, train={"nonfinite": "skip"}, schedule={"epochs": 1})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train()
    assert (result["iter"], result["skipped"]) == (6, 2)
    state = torch.load(tmp_path / "work" / "latest.pth", weights_only=True)
    assert state["meta"]["skipped"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert any(not torch.equal(before[k], v) for k, v in state["model"].items())
    train = {x["iter"]: x for x in _log(tmp_path / "work") if x["mode"] == "train"}
    assert "loss" not in train[2] and "loss" not in train[5]  # nothing to average in those windows
    assert [train[i]["skipped"] for i in range(1, 7)] == [0, 1, 1, 1, 2, 2]


def test_unscaled_lr_warns(tmp_path):
    trainer = _trainer(tmp_path, ref_batch=None, schedule={"max_iters": 1})
    with pytest.warns(UserWarning, match="NOT scaled"):
        trainer.train()


def test_clipping_bounds_the_update_and_logs_the_norm_before_clipping(tmp_path):
    trainer = _trainer(tmp_path, optim={"clip_grad": {"max_norm": 1e-3}, "weight_decay": 0.0, "momentum": 0.0},
                       schedule={"max_iters": 1, "warmup_iters": 0})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    # plain SGD: the update is lr * clipped gradient, whose norm is max_norm (the raw one is larger)
    assert float(step.norm()) == pytest.approx(0.02 * 1e-3, rel=1e-3)
    line = [x for x in _log(tmp_path / "work") if x["mode"] == "train"][0]
    assert line["grad_norm"] > 1e-2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, amp):
    trainer = _trainer(tmp_path, train={"amp": amp, "eval_interval": 0}, schedule={"max_iters": 2})
    result = trainer.train()
    assert result["iter"] == 2
    state = torch.load(tmp_path / "work" / "latest.pth", weights_only=True)
    assert bool(state["scaler"]) == (amp == "fp16")  # a GradScaler only for fp16
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    config = tiny.write_config(tmp_path / "cfg.yaml", tiny.tiny_config(tmp_path / "work"))
    with pytest.raises(SystemExit) as exit_info:
        pisa_train.main([config, "--set", "optim.lrr=0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set optim.lrr=0.1: config key 'optim.lrr' is not known") and err.count("\n") == 1
    assert "Traceback" not in err


def test_load_from_sets_the_initial_weights(tmp_path, full_run):
    _, work_dir = full_run
    cfg = tiny.tiny_config(tmp_path, load_from=str(work_dir / "latest.pth"))
    model = tiny.TinyDetector()
    pisa_train.load_initial_weights(model, cfg, trust=False)
    saved = torch.load(work_dir / "latest.pth", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_eval_cli_scores_a_checkpoint(tmp_path, full_run, capsys):
    _, work_dir = full_run
    config = tiny.write_config(tmp_path / "cfg.yaml", tiny.tiny_config(tmp_path / "work"))
    build = lambda cfg, info: tiny.tiny_parts(cfg, info)  # noqa: E731
    metrics = pisa_eval.main([config, str(work_dir / "latest.pth"), *CPU], build=build)
    assert metrics["image_ids"] == [500, 501, 502, 503, 504]
    final = [x for x in _log(work_dir) if x["mode"] == "val"][-1]
    assert metrics["bbox_AP"] == pytest.approx(final["bbox_AP"])  # the same weights score the same
    assert f"bbox_AP {final['bbox_AP']:.4f}" in capsys.readouterr().out

    torch.save({"model": {"conv.weight": torch.zeros(4, 3, 3, 3)}}, tmp_path / "partial.pth")
    with pytest.raises(SystemExit) as exit_info:
        pisa_eval.main([config, str(tmp_path / "partial.pth"), *CPU], build=build)
    assert exit_info.value.code == 1
    assert "does not fit the configured model: 3 missing" in capsys.readouterr().err
