"""SGD building, the linear scaling rule, warmup + step decay by iteration, gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pisa.engine.optim import (WarmupStepLR, build_optimizer, build_scheduler, clip_gradients, grad_norm,
                               lr_factor, scale_lr)

# The reference schedule: warmup 500 iterations from 0.001x, x0.1 after epochs 8 and 11.
REF = {"warmup_iters": 500, "warmup_ratio": 0.001, "gamma": 0.1}


@pytest.mark.parametrize("it, expected", [
    (0, 0.001),                      # 1 - (1 - 0/500)(1 - 0.001)
    (250, 0.5005),                   # 1 - 0.5 * 0.999
    (499, 0.998002),                 # 1 - (1/500) * 0.999
    (500, 1.0),                      # warmup over
    (7999, 1.0),                     # last iteration of epoch 8 (1000 iterations per epoch)
    (8000, 0.1),                     # first iteration of epoch 9
    (10999, 0.1),
    (11000, 0.01),
])
def test_lr_factor_golden_values(it, expected):
    assert lr_factor(it, [8000, 11000], **REF) == pytest.approx(expected, rel=1e-12)


def test_warmup_multiplies_the_decayed_lr():
    # A milestone inside warmup: 0.1 * (1 - (1 - 3/5)(1 - 0.5)) = 0.1 * 0.8 = 0.08
    assert lr_factor(3, [2], gamma=0.1, warmup_iters=5, warmup_ratio=0.5) == pytest.approx(0.08)


def _sgd(lr: float = 0.02) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def test_scheduler_sets_the_lr_of_each_step_and_converts_epochs_to_iterations():
    opt = _sgd(0.02)
    sched = build_scheduler(opt, {"steps": [2, 3], "gamma": 0.1, "warmup_iters": 4, "warmup_ratio": 0.25},
                            iters_per_epoch=5)
    assert sched.milestones == [10, 15]
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup: 0.02 * (1 - (1 - i/4) * 0.75) for i = 0..3 -> 0.005, 0.00875, 0.0125, 0.01625
    expected = [0.005, 0.00875, 0.0125, 0.01625] + [0.02] * 6 + [0.002] * 5 + [0.0002]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_scheduler_state_round_trip_resumes_the_exact_lr():
    opt = _sgd()
    sched = WarmupStepLR(opt, [6], 0.1, warmup_iters=4, warmup_ratio=0.1)
    for _ in range(5):
        sched.step()
    state = sched.state_dict()
    assert state == {"iter": 5}
    opt2 = _sgd()
    sched2 = WarmupStepLR(opt2, [6], 0.1, warmup_iters=4, warmup_ratio=0.1)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.02)
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.002)


@pytest.mark.parametrize("ref_batch, total, lr", [(16, 16, 0.01), (16, 4, 0.0025), (16, 32, 0.02), (2, 4, 0.02)])
def test_linear_scaling_rule(ref_batch, total, lr):
    scaling = scale_lr({"lr": 0.01, "ref_batch": ref_batch}, total)
    assert scaling.lr == pytest.approx(lr)
    assert scaling.scaled
    assert f"total batch {total}" in scaling.describe()


def test_unscaled_lr_is_used_as_given_and_says_so():
    scaling = scale_lr({"lr": 0.02, "ref_batch": None}, 4)
    assert scaling.lr == 0.02
    assert not scaling.scaled
    assert "NOT scaled" in scaling.describe() and "optim.ref_batch" in scaling.describe()


def test_build_optimizer_takes_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, {"momentum": 0.9, "weight_decay": 1e-4}, lr=0.5)
    params = opt.param_groups[0]["params"]
    assert [p.shape for p in params] == [torch.Size([1, 3]), torch.Size([1])]
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.9, 1e-4)
    model[1].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, {}, lr=0.5)


def _params_with_grads(*grads):
    params = [nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=torch.float32)
    return params


def test_clip_returns_the_norm_before_clipping_and_scales_to_max_norm():
    params = _params_with_grads([3.0], [4.0])      # total L2 norm 5
    norm = clip_gradients(params, {"max_norm": 1.0, "norm_type": 2.0})
    assert float(norm) == pytest.approx(5.0)
    # scaled by 1 / (5 + 1e-6): [0.6, 0.8] up to the epsilon
    assert params[0].grad.item() == pytest.approx(0.6, rel=1e-5)
    assert params[1].grad.item() == pytest.approx(0.8, rel=1e-5)


def test_clip_leaves_small_gradients_alone():
    params = _params_with_grads([0.3], [0.4])
    assert float(clip_gradients(params, {"max_norm": 35})) == pytest.approx(0.5)
    assert [p.grad.item() for p in params] == pytest.approx([0.3, 0.4])


def test_grad_norm_matches_the_definition():
    params = _params_with_grads([1.0, -2.0], [2.0]) + [nn.Parameter(torch.ones(1))]  # last: no grad
    assert float(grad_norm(params)) == pytest.approx(3.0)                     # sqrt(1 + 4 + 4)
    assert float(grad_norm(params, norm_type=1.0)) == pytest.approx(5.0)
    assert float(grad_norm(params, norm_type=math.inf)) == pytest.approx(2.0)
    assert float(grad_norm([nn.Parameter(torch.ones(1))])) == 0.0
