"""SGD, the linear lr scaling rule, warmup + step decay by iteration, and gradient clipping.

The schedule is a pure function of the global iteration, so resuming mid-epoch restores the exact
lr: ``lr(it) = lr_base · gamma^(number of milestones ≤ it) · warmup(it)``, with the reference's
linear warmup ``warmup(it) = 1 − (1 − it / warmup_iters)(1 − warmup_ratio)`` for
``it < warmup_iters`` and 1 afterwards. ``it`` counts optimizer steps from 0: the first step uses
``lr_base · warmup_ratio``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LrScaling:
    """The lr actually used, and how it came from the configured one.

    ``ref_batch`` None means the user disabled the linear scaling rule (``optim.ref_batch: null``).
    """

    lr: float
    config_lr: float
    ref_batch: int | None
    total_batch: int

    @property
    def scaled(self) -> bool:
        return self.ref_batch is not None

    def describe(self) -> str:
        if self.scaled:
            return (f"lr {self.lr:g} = optim.lr {self.config_lr:g} x total batch {self.total_batch} "
                    f"/ optim.ref_batch {self.ref_batch} (linear scaling rule)")
        return (f"lr {self.lr:g} is used as given for total batch {self.total_batch}: it is NOT scaled "
                "linearly (optim.ref_batch is null). Runs whose lr does not follow the total batch are "
                "known to produce NaN losses; set optim.ref_batch to the batch optim.lr was tuned for.")


def scale_lr(optim_cfg: dict, total_batch: int) -> LrScaling:
    """Apply the linear scaling rule ``lr = optim.lr · total_batch / optim.ref_batch``.

    ``total_batch`` is images per optimizer step over all processes (batch_size × world_size).
    """
    if total_batch <= 0:
        raise ValueError(f"total batch must be positive, got {total_batch}")
    config_lr = float(optim_cfg["lr"])
    ref_batch = optim_cfg.get("ref_batch")
    if not ref_batch:
        return LrScaling(config_lr, config_lr, None, total_batch)
    return LrScaling(config_lr * total_batch / int(ref_batch), config_lr, int(ref_batch), total_batch)


def build_optimizer(model: nn.Module, optim_cfg: dict, lr: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every trainable parameter (the reference decays all,
    norms and biases included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (is every stage frozen?)")
    return torch.optim.SGD(params, lr=lr, momentum=float(optim_cfg.get("momentum", 0.9)),
                           weight_decay=float(optim_cfg.get("weight_decay", 0.0)))


def lr_factor(it: int, milestones: list[int], gamma: float, warmup_iters: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr for the step with 0-based index ``it`` (see module docstring).

    ``milestones`` are sorted iteration indices at which the lr is multiplied by ``gamma``.
    """
    factor = gamma ** bisect.bisect_right(milestones, it)
    if it < warmup_iters:
        factor *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return factor


class WarmupStepLR:
    """Sets each param group's lr to ``base_lr · lr_factor(iter)`` before every optimizer step.

    ``step()`` is called once per iteration, after ``optimizer.step()`` (also for skipped steps,
    so the lr stays a function of the iteration).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Iterable[int], gamma: float,
                 warmup_iters: int = 0, warmup_ratio: float = 1.0) -> None:
        self.optimizer = optimizer
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.iter = 0
        self._apply()

    def factor(self, it: int | None = None) -> float:
        it = self.iter if it is None else it
        return lr_factor(it, self.milestones, self.gamma, self.warmup_iters, self.warmup_ratio)

    def _apply(self) -> None:
        factor = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.iter += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"iter": self.iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position in the schedule. Its shape (base lr, milestones, warmup) comes from
        the config, so a resumed run with the same config continues exactly, and one with an edited
        config (``--set optim.lr=...``) follows the edit from here on."""
        self.iter = int(state["iter"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: dict, iters_per_epoch: int) -> WarmupStepLR:
    """Step decay at the epochs in ``schedule.steps``, converted to iterations (epoch ``e`` starts at
    iteration ``e · iters_per_epoch``), after ``schedule.warmup_iters`` of linear warmup."""
    milestones = [int(e) * iters_per_epoch for e in schedule_cfg.get("steps") or []]
    return WarmupStepLR(optimizer, milestones, schedule_cfg.get("gamma", 0.1),
                        schedule_cfg.get("warmup_iters", 0) or 0, schedule_cfg.get("warmup_ratio", 1.0))


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Total ``norm_type`` norm of all gradients as one 0-d fp32 tensor (0 when there are none)."""
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) for g in grads])
    return torch.linalg.vector_norm(norms, norm_type)


def clip_gradients(params: Iterable[torch.Tensor], clip_cfg: dict) -> torch.Tensor:
    """Scale gradients in place so their total norm is at most ``clip_cfg['max_norm']``.

    ``clip_cfg``: ``{max_norm, norm_type (default 2)}``. Returns the norm before clipping (0-d
    tensor), for logging. Gradients must already be unscaled when a GradScaler is in use.
    """
    grads_params = [p for p in params if p.grad is not None]
    if not grads_params:
        return torch.zeros(())
    return nn.utils.clip_grad_norm_(grads_params, max_norm=float(clip_cfg["max_norm"]),
                                    norm_type=float(clip_cfg.get("norm_type", 2.0)))
