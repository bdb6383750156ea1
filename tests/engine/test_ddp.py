"""Two processes (gloo, launched the way torchrun launches them) against one process with the same
total batch: same losses, same weights, and distributed evaluation sees every image once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import tiny

TINY_SCRIPT = str(Path(tiny.__file__).resolve())
REPO = Path(tiny.__file__).resolve().parents[2]
TINY_FLAGS = ["--device", "cpu", "--flip-prob", "0", "--train-images", "8", "--val-images", "7"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world_size: int, argv: list[str], out_dir: Path) -> None:
    """Run ``world_size`` copies of the tiny script with torchrun's environment variables; each
    writes its result to ``out_dir/result{rank}.json`` and its output to ``out_dir/rank{rank}.out``."""
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        log = open(out_dir / f"rank{rank}.out", "w")
        procs.append((subprocess.Popen([sys.executable, TINY_SCRIPT, *argv, "--result",
                                        str(out_dir / f"result{rank}.json")],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait(timeout=180))
        log.close()
    for rank, code in enumerate(codes):
        assert code == 0, (out_dir / f"rank{rank}.out").read_text()[-3000:]


def _train_lines(work_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (work_dir / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if x["mode"] == "train"]


def test_two_processes_match_one_with_the_same_total_batch(tmp_path):
    sections = {"schedule": {"epochs": 2, "warmup_iters": 2, "steps": [1]}, "train": {"eval_interval": 2}}
    single = tiny.tiny_config(tmp_path / "single", data={"batch_size": 4}, **sections)
    ddp = tiny.tiny_config(tmp_path / "ddp", data={"batch_size": 2}, **sections)
    _launch(2, [tiny.write_config(tmp_path / "ddp.yaml", ddp), *TINY_FLAGS], tmp_path)
    one = tiny.main([tiny.write_config(tmp_path / "single.yaml", single), *TINY_FLAGS])

    # 8 images / total batch 4 = 2 iterations per epoch, 2 epochs; the same lr (total batch 4 in both).
    ddp_lines, one_lines = _train_lines(tmp_path / "ddp"), _train_lines(tmp_path / "single")
    assert [x["iter"] for x in ddp_lines] == [x["iter"] for x in one_lines] == [1, 2, 3, 4]
    for a, b in zip(ddp_lines, one_lines):
        assert a["lr"] == b["lr"]
        for key in ("loss_cls", "loss_bbox", "loss"):
            assert abs(a[key] - b[key]) < 1e-5, (a["iter"], key, a[key], b[key])

    ddp_state = torch.load(tmp_path / "ddp" / "latest.pth", weights_only=True)
    one_state = torch.load(tmp_path / "single" / "latest.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ddp_state["model"])
    assert ddp_state["model"].keys() == one_state["model"].keys()
    for name, value in one_state["model"].items():
        assert torch.allclose(ddp_state["model"][name], value, atol=1e-5, rtol=0), name
    # The weights moved: the comparison above is not between two untouched initialisations.
    torch.manual_seed(0)
    init = tiny.TinyDetector()  # the initial weights: main() seeds train.seed = 0 before building
    assert not torch.allclose(init.fc.weight, one_state["model"]["fc.weight"])
    assert len(ddp_state["meta"]["rng"]) == 2  # one RNG state per rank

    # Distributed evaluation: 7 images over 2 ranks (4 + 3), each exactly once, on both ranks.
    for rank in range(2):
        metrics = json.loads((tmp_path / f"result{rank}.json").read_text())["metrics"]
        assert sorted(metrics["image_ids"]) == list(range(500, 507))
    assert one["metrics"]["image_ids"] == list(range(500, 507))
