"""A run killed with SIGKILL between two checkpoints and resumed with ``--resume`` ends with exactly
the weights of the run that was never interrupted (CPU, deterministic mode)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny

TINY_SCRIPT = str(Path(tiny.__file__).resolve())
REPO = Path(tiny.__file__).resolve().parents[2]
# 12 images / batch 2 = 6 iterations per epoch, 3 epochs = 18. Checkpoints: iterations 4, 8, 16
# (iter_N.pth) and every epoch end (6, 12, 18). Random flips draw from the global torch RNG.
SECTIONS = {"train": {"deterministic": True, "ckpt_iter_interval": 4, "eval_interval": 1}}


def _config(tmp_path: Path, name: str) -> str:
    return tiny.write_config(tmp_path / f"{name}.yaml", tiny.tiny_config(tmp_path / name, **SECTIONS))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    tiny.main([_config(tmp_path, "run"), "--device", "cpu"])
    return tmp_path / "run"


def _weights(work_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(work_dir / "latest.pth", weights_only=True)["model"]


def _train_losses(work_dir: Path) -> dict[int, float]:
    """iteration -> loss; a resumed run's lines replace those the killed run wrote after its checkpoint."""
    lines = [json.loads(x) for x in (work_dir / "log.jsonl").read_text().splitlines()]
    return {x["iter"]: x["loss"] for x in lines if x["mode"] == "train"}


def _assert_same_run(work_dir: Path, reference: Path) -> None:
    ours, theirs = _weights(work_dir), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert _train_losses(work_dir) == _train_losses(reference)
    state, ref_state = (torch.load(d / "latest.pth", weights_only=True) for d in (work_dir, reference))
    assert (state["iter"], state["epoch"], state["best"]) == (ref_state["iter"], ref_state["epoch"], ref_state["best"])


def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    config = _config(tmp_path, "run")
    work_dir, marker = tmp_path / "run", tmp_path / "hanging"
    # The model hangs inside the 11th training forward: checkpoint 8 is written, 12 is not.
    proc = subprocess.Popen([sys.executable, TINY_SCRIPT, config, "--device", "cpu", "--hang-at", "11",
                             "--hang-marker", str(marker)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the training subprocess never reached iteration 11"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    killed = torch.load(work_dir / "latest.pth", weights_only=True)
    assert (killed["iter"], killed["epoch"], killed["meta"]["data"]["iter_in_epoch"]) == (8, 1, 2)
    assert not (work_dir / "epoch_2.pth").exists()

    tiny.main([config, "--device", "cpu", "--resume"])
    _assert_same_run(work_dir, uninterrupted)


def test_resume_from_an_epoch_boundary_matches_uninterrupted(tmp_path, uninterrupted):
    """Stopped by schedule.max_iters at the end of epoch 2, then resumed without the cap."""
    config = _config(tmp_path, "run")
    tiny.main([config, "--device", "cpu", "--set", "schedule.max_iters=12"])
    stopped = torch.load(tmp_path / "run" / "latest.pth", weights_only=True)
    assert (stopped["iter"], stopped["epoch"], stopped["meta"]["data"]["iter_in_epoch"]) == (12, 2, 0)
    tiny.main([config, "--device", "cpu", "--resume", str(tmp_path / "run" / "latest.pth")])
    _assert_same_run(tmp_path / "run", uninterrupted)
