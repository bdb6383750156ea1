"""Train a detector: ``python -m pisa.train CONFIG [--set k=v ...] [--resume [PATH]] [--work-dir D]
[--deterministic] [--trust-checkpoint] [--device cpu|cuda]``.

Multi-GPU: ``torchrun --nproc_per_node N -m pisa.train CONFIG``; ``data.batch_size`` is per process
and the lr follows the total batch (linear scaling rule).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from torch import nn

from pisa.cli import reported_errors
from pisa.config import add_config_args, load_config
from pisa.data.classes import ClassInfo, check_same_classes, resolve_num_classes
from pisa.engine import dist
from pisa.engine.checkpoint import describe_mismatches, load_model_weights, shape_mismatches
from pisa.engine.logging import console
from pisa.engine.trainer import Trainer, configure_determinism, seed_everything

# The reference evaluates one image per process; padding a larger batch would shift border features.
EVAL_BATCH_SIZE = 1


@dataclass
class RunParts:
    """What a run trains and evaluates: built from the config by :func:`build_parts`."""

    model: nn.Module
    train_loader: Any
    val_loader: Any = None
    evaluator: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pisa.train", description="Train a pisa detector.")
    parser.add_argument("config", help="experiment YAML file")
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="continue a run: from PATH, or from WORK_DIR/latest.pth when no path is given")
    parser.add_argument("--work-dir", help="output folder (overrides train.work_dir)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels and cuDNN (slower; sets train.deterministic)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (can execute code: trusted files only)")
    add_device_arg(parser)
    return parser


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="compute device (default: cuda when available)")


def resolve_config(args: argparse.Namespace, check_paths: bool | Sequence[str] = True) -> dict:
    """Load and validate ``args.config`` with ``--set`` items and the CLI flags applied.

    A config error prints one line and exits with status 2 (no traceback).
    """
    overrides = list(args.overrides)
    if getattr(args, "work_dir", None):
        overrides.append(f"train.work_dir={json.dumps(args.work_dir)}")  # quoted: any path stays a string
    if getattr(args, "deterministic", False):
        overrides.append("train.deterministic=true")
    with reported_errors():
        return load_config(args.config, overrides, check_paths=check_paths)


def iou_types(cfg: dict) -> list[str]:
    """COCO metrics the model's outputs support: masks add ``segm``."""
    return ["bbox", "segm"] if "mask" in cfg["model"]["type"] else ["bbox"]


def build_val_parts(cfg: dict, info: dist.DistInfo) -> tuple[Any, Any]:
    """Validation loader (each image on exactly one rank) and its COCO evaluator."""
    from pisa.data import build_dataloader, build_dataset
    from pisa.engine.evaluator import CocoEvaluator

    data = cfg["data"]
    val_set = build_dataset(data["val"], data, train=False)
    loader = build_dataloader(val_set, batch_size=EVAL_BATCH_SIZE, workers=data["workers"], train=False,
                              seed=cfg["train"]["seed"], rank=info.rank, world_size=info.world_size,
                              pad_divisor=data["pad_divisor"])
    evaluator = CocoEvaluator(val_set.ann_file, val_set.label_to_cat_id, val_set.class_names, iou_types(cfg))
    return loader, evaluator


def build_parts(cfg: dict, info: dist.DistInfo) -> RunParts:
    """Datasets, loaders, evaluator and model, as the config describes them."""
    from pisa.data import build_dataloader, build_dataset
    from pisa.models import build_model

    data = cfg["data"]
    train_set = build_dataset(data["train"], data, train=True)
    classes = ClassInfo.of_dataset(train_set)
    resolve_num_classes(cfg["model"], classes)  # before the model exists: its heads need the count
    val_loader, evaluator = build_val_parts(cfg, info)
    check_same_classes(classes, ClassInfo.of_dataset(val_loader.dataset), "data.val",
                       "train and evaluate on splits of one dataset (the same categories file)")
    train_loader = build_dataloader(train_set, batch_size=data["batch_size"], workers=data["workers"],
                                    train=True, seed=cfg["train"]["seed"], rank=info.rank,
                                    world_size=info.world_size, aspect_grouping=data["aspect_grouping"],
                                    pad_divisor=data["pad_divisor"])
    meta = {"class_names": list(train_set.class_names), "cat_ids": [int(c) for c in train_set.label_to_cat_id]}
    return RunParts(build_model(cfg), train_loader, val_loader, evaluator, meta)


def load_initial_weights(model: nn.Module, cfg: dict, trust: bool) -> None:
    """``load_from``: start from a pisa or mmdetection checkpoint's weights (non-strict, reported)."""
    path = cfg.get("load_from")
    if not path:
        return
    state = load_model_weights(path, cfg["model"], trust=trust)
    # Fine-tuning to another class count or width: tensors of another shape keep their own init.
    mismatched = shape_mismatches(model, state)
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    console(f"load_from {path}: {len(state)} tensors loaded; missing {len(result.missing_keys)} "
            f"{result.missing_keys[:5]}; unexpected {len(result.unexpected_keys)} {result.unexpected_keys[:5]}; "
            f"skipped for another shape {len(mismatched)} ({describe_mismatches(mismatched)})")


def oom_hint(cfg: dict) -> str:
    """The settings that bound memory, with their current values."""
    data = cfg["data"]
    return (f"lower data.batch_size (now {data['batch_size']}) or the input size "
            f"(data.train_transforms.scales, data.test_transforms.scales), e.g. --set data.batch_size=1")


@contextlib.contextmanager
def cli_session(cfg: dict, device: str | None) -> Iterator[dist.DistInfo]:
    """Join the process group, apply determinism and seed (the same initial weights on every rank);
    report expected failures as one line (:func:`pisa.cli.reported_errors`); always leave the group."""
    with reported_errors(lambda: oom_hint(cfg)):
        info = dist.init_distributed(device)
        try:
            configure_determinism(cfg["train"]["deterministic"])
            seed_everything(cfg["train"]["seed"])
            yield info
        finally:
            dist.cleanup()


def run(cfg: dict, args: argparse.Namespace, info: dist.DistInfo, parts: RunParts) -> dict[str, Any]:
    """Train ``parts`` as ``cfg`` says; returns :meth:`Trainer.train`'s result."""
    load_initial_weights(parts.model, cfg, args.trust_checkpoint)  # a resumed checkpoint overrides these
    trainer = Trainer(cfg, parts.model, parts.train_loader, parts.val_loader, parts.evaluator,
                      work_dir=cfg["train"]["work_dir"], resume=args.resume, dist_info=info,
                      trust_checkpoint=args.trust_checkpoint, meta=parts.meta)
    result = trainer.train()
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, float)}
    console(f"done: {result['iter']} iterations, {result['epoch']} epochs, {result['skipped']} skipped steps; "
            f"final metrics {metrics or 'none (not evaluated)'}; best {result['best']}; "
            f"checkpoints in {result['work_dir']}")
    return result


def main(argv: Sequence[str] | None = None, build: Any = build_parts) -> dict[str, Any]:
    """CLI entry; returns the training result (``epoch``, ``iter``, ``metrics``, ``best``, ...).

    ``build(cfg, dist_info) -> RunParts`` makes the model and data (the config's by default).
    """
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    with cli_session(cfg, args.device) as info:
        return run(cfg, args, info, build(cfg, info))

if __name__ == "__main__":
    main()
