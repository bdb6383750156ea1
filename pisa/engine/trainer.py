"""The training loop: forward → sum of ``loss_*`` → backward → (clip) → step → lr step.

Positions are counted in completed units: ``epoch`` = epochs finished, ``iter`` = optimizer steps
taken (skipped non-finite steps included), ``iter_in_epoch`` = batches of the current epoch done.
A checkpoint taken at any position resumes to exactly the run that was not interrupted: same
weights, optimizer/scheduler/scaler state, RNG states of every rank and next batch.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pisa import __version__
from pisa.config import save as save_config
from pisa.engine import checkpoint as ckpt
from pisa.engine import dist
from pisa.engine.inference import amp_autocast, evaluate
from pisa.engine.logging import JsonlLogger, WindowAverage, console, memory_mb, progress_bar
from pisa.engine.optim import build_optimizer, build_scheduler, clip_gradients, grad_norm, scale_lr


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf and ``train.nonfinite`` is ``stop``."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels where they exist (warn, not fail, where they do not); cuDNN too.

    Call it before the first CUDA matmul: cuBLAS reads its workspace setting once.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required for deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}


@dataclass
class TrainState:
    """Where training stands; everything here goes into the checkpoint."""

    epoch: int = 0
    iter: int = 0
    iter_in_epoch: int = 0
    best: dict[str, Any] | None = None
    skipped: int = 0


class Trainer:
    """Trains ``model`` on ``train_loader`` as configured by ``cfg`` (sections ``train``, ``optim``,
    ``schedule``, ``data``), evaluating on ``val_loader`` with ``evaluator`` when both are given.

    ``resume``: None/False (fresh start), True (``work_dir/latest.pth``, fresh if absent) or a path.
    ``dist_info`` defaults to :func:`pisa.engine.dist.init_distributed`. The model is moved to the
    process's device and DDP-wrapped when there are several processes.
    """

    def __init__(self, cfg: dict, model: nn.Module, train_loader: Any, val_loader: Any = None,
                 evaluator: Any = None, work_dir: str | Path | None = None, resume: bool | str | Path | None = None,
                 dist_info: dist.DistInfo | None = None, trust_checkpoint: bool = False,
                 meta: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.tcfg = cfg["train"]
        self.dist = dist_info or dist.init_distributed()
        self.device = self.dist.device
        self.work_dir = Path(work_dir or self.tcfg["work_dir"])
        self.train_loader, self.val_loader, self.evaluator = train_loader, val_loader, evaluator
        self.meta = dict(meta or {})
        self.trust_checkpoint = trust_checkpoint
        configure_determinism(bool(self.tcfg.get("deterministic")))

        self.model = dist.wrap_model(model.to(self.device), self.dist)
        self.lr_scaling = scale_lr(cfg["optim"], int(cfg["data"]["batch_size"]) * self.dist.world_size)
        self.optimizer = build_optimizer(model, cfg["optim"], self.lr_scaling.lr)
        sampler = getattr(train_loader, "batch_sampler", None)
        # A resumable sampler's len() counts only the batches left after set_epoch's start_iter.
        self.iters_per_epoch = int(getattr(sampler, "batches_per_epoch", len(train_loader)))
        if self.iters_per_epoch == 0:
            raise ValueError("the train loader yields no batches: is the dataset smaller than one batch?")
        self.scheduler = build_scheduler(self.optimizer, cfg["schedule"], self.iters_per_epoch)
        self.amp = self.tcfg.get("amp")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.clip_cfg = cfg["optim"].get("clip_grad")
        max_iters = int(cfg["schedule"]["epochs"]) * self.iters_per_epoch
        cap = cfg["schedule"].get("max_iters")
        self.max_iters = min(max_iters, int(cap)) if cap else max_iters
        self.state = TrainState()
        self.metrics: dict[str, Any] = {}
        self.log = JsonlLogger(self.work_dir / "log.jsonl")
        self._window = WindowAverage()
        self._pending_rng: dict[str, Any] | None = None
        self._saved_at = self._evaluated_at = -1
        self._step_lr = self.optimizer.param_groups[0]["lr"]  # lr of the latest step, for logs
        self._resume_path = self._resolve_resume(resume)

    # ------------------------------------------------------------------------------------------
    # public

    def train(self) -> dict[str, Any]:
        """Run to ``max_iters``; returns ``{epoch, iter, metrics, best, skipped, work_dir}``.

        Evaluates every ``train.eval_interval`` epochs, and at the end if the last iteration was not
        evaluated (unless ``eval_interval`` is 0).
        """
        self._start()
        bar = progress_bar(self.max_iters, self.state.iter)
        try:
            while self.state.iter < self.max_iters:
                self._train_epoch(bar)
                if self.state.iter_in_epoch == self.iters_per_epoch:
                    self._end_epoch()
        finally:
            bar.close()
        improved = False
        if self._evaluated_at != self.state.iter and self._eval_every():
            improved = self._evaluate()  # a run stopped mid-epoch by schedule.max_iters
        if self._saved_at != self.state.iter or improved:
            self._save(best=improved)
        return {"epoch": self.state.epoch, "iter": self.state.iter, "metrics": self.metrics,
                "best": self.state.best, "skipped": self.state.skipped, "work_dir": str(self.work_dir)}

    @property
    def _epoch_of_last_iter(self) -> int:
        """1-based epoch of the latest iteration, for logs (at an epoch end: the epoch just done)."""
        return self.state.epoch + (1 if self.state.iter_in_epoch else 0)

    # ------------------------------------------------------------------------------------------
    # start and resume

    def _resolve_resume(self, resume: bool | str | Path | None) -> Path | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            latest = self.work_dir / "latest.pth"
            if latest.is_file():
                return latest
            console(f"--resume: no {latest} yet; starting from scratch")
            return None
        return Path(resume)

    def _start(self) -> None:
        seed_everything(int(self.tcfg.get("seed", 0)) + self.dist.rank)
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            saved = save_config(self.cfg, str(self.work_dir))
            for line in self._start_summary(saved):
                console(line)
        if not self.lr_scaling.scaled and self.dist.is_main:
            warnings.warn(self.lr_scaling.describe(), stacklevel=2)
        if self._resume_path is not None:
            self._load(self._resume_path)
        dist.barrier()

    def _start_summary(self, saved_config: str) -> list[str]:
        """A few lines instead of the whole resolved config (which is saved to ``saved_config``)."""
        model, pisa_cfg = self.cfg["model"], self.cfg.get("pisa") or {}
        parts = [name for name in ("isr_p", "isr_n", "carl") if pisa_cfg.get(name)]
        backbone = (model.get("backbone") or {}).get("type", "?")
        lines = [f"model: {model['type']} ({backbone}), {model['num_classes']} classes; PISA "
                 + (f"on ({', '.join(parts)})" if parts else "off")]
        for name, loader in (("train", self.train_loader), ("val", self.val_loader)):
            brief = getattr(getattr(loader, "dataset", None), "brief", None)
            if callable(brief):
                lines.append(f"{name} data: {brief()}")
        lines.append(self.lr_scaling.describe())
        lines.append(f"{self.dist.world_size} process(es) on {self.device.type}; {self.iters_per_epoch} "
                     f"iterations per epoch; {self.max_iters} in total; work dir {self.work_dir} "
                     f"(resolved config: {saved_config})")
        return lines

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, trust=self.trust_checkpoint)
        dist.unwrap_model(self.model).load_state_dict(ckpt.strip_module_prefix(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        data = state["meta"]["data"]
        self.state = TrainState(epoch=int(state["epoch"]), iter=int(state["iter"]),
                                iter_in_epoch=int(data["iter_in_epoch"]), best=state.get("best"),
                                skipped=int(state["meta"].get("skipped", 0)))
        if int(data["iters_per_epoch"]) != self.iters_per_epoch:
            self._realign_position(int(data["iters_per_epoch"]), path)
        rng = state["meta"].get("rng") or []
        if len(rng) == self.dist.world_size:
            self._pending_rng = rng[self.dist.rank]
        else:
            console(f"{path} holds RNG states of {len(rng)} process(es), this run has "
                    f"{self.dist.world_size}: random streams restart from the seed")
        self._saved_at = self.state.iter  # that state is on disk already
        console(f"resumed from {path}: epoch {self.state.epoch}, iteration {self.state.iter}")

    def _realign_position(self, old_ipe: int, path: Path) -> None:
        """The batch size or process count changed: continue at the next epoch boundary."""
        if self.state.iter_in_epoch:
            raise ckpt.CheckpointError(
                f"{path} was written mid-epoch with {old_ipe} iterations per epoch; this run has "
                f"{self.iters_per_epoch} (batch size or process count changed). Resume from an "
                "epoch checkpoint (epoch_N.pth), or restore the original batch size and process count")
        self.state.iter = self.state.epoch * self.iters_per_epoch
        self.scheduler.load_state_dict({"iter": self.state.iter})
        console(f"iterations per epoch changed {old_ipe} -> {self.iters_per_epoch}; continuing at epoch "
                f"{self.state.epoch}, iteration {self.state.iter}")

    def _restore_rng_if_pending(self) -> None:
        if self._pending_rng is not None:
            ckpt.restore_rng_state(self._pending_rng)
            self._pending_rng = None

    # ------------------------------------------------------------------------------------------
    # the loop

    def _epoch_batches(self):
        """An iterator over the current epoch's batches, starting after those already done.

        The batch sampler's ``set_epoch(epoch, start_iter)`` selects the epoch's order and skips
        the done batches without loading them. RNG states are restored where they were captured:
        an epoch-boundary checkpoint before the epoch's loader iterator existed, a mid-epoch one after.
        """
        sampler = getattr(self.train_loader, "batch_sampler", None)
        start = self.state.iter_in_epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.state.epoch, start)
        elif start:
            raise RuntimeError("cannot resume mid-epoch: the train loader's batch sampler has no "
                               "set_epoch(epoch, start_iter)")
        if start == 0:
            self._restore_rng_if_pending()
        batches = iter(self.train_loader)
        self._restore_rng_if_pending()
        return batches

    def _train_epoch(self, bar) -> None:
        self.model.train()
        batches = self._epoch_batches()
        while self.state.iter < self.max_iters:
            tic = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            data_time = time.perf_counter() - tic
            log_now = (self.state.iter + 1) % int(self.tcfg.get("log_interval", 50)) == 0 \
                or self.state.iter + 1 == self.max_iters
            record = self._train_step(images, targets, want_norm=log_now)
            self.state.iter += 1
            self.state.iter_in_epoch += 1
            bar.update(1)
            if record is not None:
                self._window.add({**record, "data_time": data_time, "step_time": time.perf_counter() - tic})
            if log_now:
                self._log_train(bar)
            every = int(self.tcfg.get("ckpt_iter_interval") or 0)
            # The last batch of an epoch is covered by the epoch-end checkpoint (taken after evaluation).
            if every and self.state.iter % every == 0 and self.state.iter_in_epoch < self.iters_per_epoch:
                self._save(f"iter_{self.state.iter}.pth")

    def _train_step(self, images: torch.Tensor, targets: list[dict], want_norm: bool) -> dict[str, float] | None:
        """One optimizer step; returns the loss values, or None when the step was skipped."""
        images = images.to(self.device, non_blocking=True)
        targets = [_to_device(t, self.device) for t in targets]
        with amp_autocast(self.device, self.amp):
            outputs = self.model(images, targets)
        terms = {k: v for k, v in outputs.items() if k.startswith("loss_")}
        if not terms:
            raise RuntimeError(f"the model returned no loss_* entries in train mode (keys: {sorted(outputs)})")
        # Other scalar entries (e.g. an accuracy) are logged, not summed. One host sync for all values.
        extras = {k: v for k, v in outputs.items() if k not in terms and torch.is_tensor(v) and v.numel() == 1}
        values = torch.stack([v.detach().float().reshape(()) for v in (*terms.values(), *extras.values())])
        bad_mask = dist.all_reduce_max((~torch.isfinite(values[:len(terms)])).float())
        logged = dict(zip((*terms, *extras), values.tolist()))
        losses = {k: logged[k] for k in terms}
        lr = self.optimizer.param_groups[0]["lr"]
        if bool(bad_mask.any()):
            self._on_nonfinite([k for k, bad in zip(terms, bad_mask.tolist()) if bad], losses)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return None
        total = sum(v.float() for v in terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        norm = self._clip_or_measure(want_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self._step_lr = lr
        record = {**logged, "loss": sum(losses.values())}
        if norm is not None:
            record["grad_norm"] = float(norm)
        return record

    def _clip_or_measure(self, want_norm: bool) -> torch.Tensor | None:
        if not (self.clip_cfg or want_norm):
            return None
        self.scaler.unscale_(self.optimizer)  # clip and report true gradients, not fp16-scaled ones
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return clip_gradients(params, self.clip_cfg) if self.clip_cfg else grad_norm(params)

    def _on_nonfinite(self, bad: list[str], losses: dict[str, float]) -> None:
        it = self.state.iter + 1
        shown = ", ".join(f"{k}={losses[k]}" if not math.isfinite(losses[k]) else f"{k} (non-finite on another process)"
                          for k in bad)
        where = f"iteration {it} (epoch {self.state.epoch + 1})"
        if self.tcfg.get("nonfinite", "stop") == "skip":
            self.state.skipped += 1
            console(f"non-finite loss at {where}: {shown}; step skipped ({self.state.skipped} so far)")
            return
        message = (f"non-finite loss at {where}: {shown} (all terms: {losses}). The weights from before "
                   "this step are intact. Lower optim.lr or check optim.ref_batch, enable optim.clip_grad, "
                   "or set train.nonfinite: skip to skip such steps")
        self.log.write({"mode": "error", "iter": it, "epoch": self.state.epoch + 1, "message": message})
        raise NonFiniteLossError(message)

    def _log_train(self, bar) -> None:
        means = dist.all_reduce_mean(self._window.means(), self.device)
        self._window.reset()
        record = {"mode": "train", "epoch": self._epoch_of_last_iter, "iter": self.state.iter,
                  "lr": self._step_lr, **means,
                  "max_mem_mb": memory_mb(self.device), "skipped": self.state.skipped}
        self.log.write(record)
        if "loss" in means:
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{record['lr']:.2e}")

    # ------------------------------------------------------------------------------------------
    # epoch end: evaluation and checkpoints

    def _eval_every(self) -> int:
        """Epochs between evaluations; 0 when there is no validation data or ``eval_interval`` is 0."""
        if self.val_loader is None or self.evaluator is None:
            return 0
        return int(self.tcfg.get("eval_interval") or 0)

    def _end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.iter_in_epoch = 0
        eval_every = self._eval_every()
        improved = bool(eval_every) and self.state.epoch % eval_every == 0 and self._evaluate()
        ckpt_every = int(self.tcfg.get("ckpt_interval") or 0)
        keep = f"epoch_{self.state.epoch}.pth" if ckpt_every and self.state.epoch % ckpt_every == 0 else None
        self._save(keep, best=improved)

    def _evaluate(self) -> bool:
        """Evaluate, log, and return whether ``train.best_metric`` improved."""
        # Results files of the latest evaluation; per-epoch metrics are kept in log.jsonl.
        self.metrics = evaluate(self.model, self.val_loader, self.evaluator, amp=self.amp,
                                out_dir=self.work_dir / "eval")
        self._evaluated_at = self.state.iter
        scalars = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}
        self.log.write({"mode": "val", "epoch": self._epoch_of_last_iter, "iter": self.state.iter, **scalars})
        summary = getattr(self.evaluator, "format_summary", None)
        console(summary(self.metrics) if callable(summary) else f"eval: {scalars}")
        name = self.tcfg.get("best_metric")
        value = scalars.get(name) if name else None
        if value is None or not math.isfinite(value):
            return False
        if self.state.best is None or value > self.state.best["value"]:
            self.state.best = {"metric": name, "value": float(value), "epoch": self._epoch_of_last_iter,
                               "iter": self.state.iter}
            return True
        return False

    def _checkpoint_state(self) -> dict[str, Any]:
        rng = dist.all_gather_object(ckpt.capture_rng_state())  # every rank's stream, in rank order
        return {
            "model": dist.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "iter": self.state.iter,
            "best": self.state.best,
            "config": self.cfg,
            "meta": {**self.meta, "version": __version__, "rng": rng, "skipped": self.state.skipped,
                     "data": {"epoch": self.state.epoch, "iter_in_epoch": self.state.iter_in_epoch,
                              "iters_per_epoch": self.iters_per_epoch, "world_size": self.dist.world_size}},
        }

    def _save(self, keep_as: str | None = None, best: bool = False) -> None:
        """Write ``latest.pth`` (rank 0), and link it as ``keep_as`` and/or ``best.pth``."""
        state = self._checkpoint_state()
        if self.dist.is_main:
            latest = ckpt.save_checkpoint(state, self.work_dir / "latest.pth")
            if keep_as:
                ckpt.link_checkpoint(latest, self.work_dir / keep_as)
            if best:
                ckpt.link_checkpoint(latest, self.work_dir / "best.pth")
        self._saved_at = self.state.iter
        dist.barrier()
