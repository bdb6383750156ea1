"""Checkpoint files: atomic writes, weights_only reads, refusals with clear messages, RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import tiny
from pisa.engine import checkpoint as ckpt


def _state(model: nn.Module, **extra) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 16, 16), [tiny.TinyDetectionSet(2)[i][1] for i in range(2)])["loss_cls"].backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {"iter": 1},
            "scaler": {}, "epoch": 0, "iter": 1, "best": None, "config": {"train": {"seed": 0}},
            "meta": {"rng": [ckpt.capture_rng_state()], "data": {"epoch": 0, "iter_in_epoch": 1}}, **extra}


def test_round_trip_is_weights_only_loadable(tmp_path):
    model = tiny.TinyDetector()
    state = _state(model)
    path = ckpt.save_checkpoint(state, tmp_path / "latest.pth")
    loaded = torch.load(path, weights_only=True)  # plain torch, strict: no custom classes inside
    assert loaded.keys() == state.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["model"][name], value)
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == model.conv.weight.shape
    assert ckpt.load_checkpoint(path)["iter"] == 1


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    ckpt.atomic_torch_save({"rng": ckpt.capture_rng_state()}, tmp_path / "rng.pth")
    first = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pth")["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1]) and first[2:] == again[2:]


def test_a_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model = tiny.TinyDetector()
    path = ckpt.save_checkpoint(_state(model), tmp_path / "latest.pth")
    before = path.read_bytes()

    def crash_halfway(obj, f):
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_state(model, iter=2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["iter"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temp file left behind


def test_a_truncated_file_is_reported_as_corrupt(tmp_path):
    path = ckpt.save_checkpoint(_state(tiny.TinyDetector()), tmp_path / "latest.pth")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_a_pickled_custom_class_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": tiny.Unpicklable(7)}, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    message = str(err.value)
    assert "this file would execute code on load" in message
    assert "if you trust it, pass --trust-checkpoint" in message
    assert "Unpicklable" in message and str(path) in message
    assert ckpt.load_checkpoint(path, trust=True)["extra"].value == 7


def test_a_non_finite_model_is_never_written(tmp_path):
    model = tiny.TinyDetector()
    good = ckpt.save_checkpoint(_state(model), tmp_path / "latest.pth").read_bytes()
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
        model.conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ckpt.CheckpointError, match=r"non-finite values in conv\.weight, fc\.bias"):
        ckpt.save_checkpoint({"model": model.state_dict()}, tmp_path / "latest.pth")
    assert (tmp_path / "latest.pth").read_bytes() == good
    with pytest.raises(ckpt.CheckpointError):
        ckpt.save_checkpoint({"model": model.state_dict()}, tmp_path / "other.pth")
    assert not (tmp_path / "other.pth").exists()


def test_ddp_module_prefix_is_stripped_on_save_and_load(tmp_path):
    model = tiny.TinyDetector()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = ckpt.save_checkpoint({"model": prefixed}, tmp_path / "a.pth")
    assert set(torch.load(path, weights_only=True)["model"]) == set(model.state_dict())
    torch.save({"model": prefixed}, tmp_path / "b.pth")  # written by some other tool
    assert set(ckpt.load_model_weights(tmp_path / "b.pth", {})) == set(model.state_dict())
    # Only a prefix on every key is DDP's; a model with a submodule named "module" keeps its names.
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert ckpt.strip_module_prefix(mixed) == mixed


def test_link_checkpoint_keeps_its_content_when_the_source_is_replaced(tmp_path):
    model = tiny.TinyDetector()
    latest = ckpt.save_checkpoint(_state(model), tmp_path / "latest.pth")
    ckpt.link_checkpoint(latest, tmp_path / "epoch_1.pth")
    ckpt.save_checkpoint(_state(model, iter=5), latest)
    assert ckpt.load_checkpoint(tmp_path / "epoch_1.pth")["iter"] == 1
    assert ckpt.load_checkpoint(latest)["iter"] == 5


def test_load_model_weights_rejects_unknown_layouts(tmp_path):
    torch.save({"weights": {"x": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(ckpt.CheckpointError, match="neither a pisa checkpoint"):
        ckpt.load_model_weights(tmp_path / "odd.pth", {})
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")
