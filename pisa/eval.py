"""Evaluate a checkpoint on the validation set: ``python -m pisa.eval CONFIG CHECKPOINT [--set k=v ...]
[--out DIR] [--trust-checkpoint] [--device cpu|cuda] [--precision fp32|fp16|bf16]``, or an exported
graph with ONNX Runtime: ``python -m pisa.eval CONFIG --onnx MODEL.onnx [--set k=v ...] [--out DIR]``.

CHECKPOINT is a pisa checkpoint (``model`` key) or an mmdetection one (converted on the fly). Works
under ``torchrun`` too: every process scores its share of the images and rank 0 reports. Writes
``results_bbox.json`` (COCO results format) and ``metrics.json`` into ``--out``, by default the
folder ``eval_<checkpoint name>`` next to the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from pisa.config import add_config_args
from pisa.data.classes import check_val_classes, checkpoint_classes
from pisa.engine import dist
from pisa.engine.checkpoint import (CheckpointError, describe_mismatches, load_model_checkpoint,
                                   read_checkpoint_meta, shape_mismatches)
from pisa.engine.inference import PRECISIONS, evaluate
from pisa.train import RunParts, add_device_arg, build_val_parts, cli_session, resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pisa.eval", description="Evaluate a checkpoint (COCO AP).")
    parser.add_argument("config", help="experiment YAML file (model and data.val are used)")
    parser.add_argument("checkpoint", nargs="?", help="pisa or mmdetection checkpoint (.pth); omit with --onnx")
    add_config_args(parser)
    parser.add_argument("--out", help="folder for results and metrics JSON (default: next to the checkpoint)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (can execute code: trusted files only)")
    add_device_arg(parser)
    parser.add_argument("--onnx", metavar="MODEL.onnx",
                        help="evaluate this graph from python -m pisa.export with ONNX Runtime instead of a checkpoint")
    parser.add_argument("--precision", choices=sorted(PRECISIONS),
                        help="autocast precision of the network (default: train.amp); the post-processing "
                             "stays fp32")
    return parser


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one of CHECKPOINT and --onnx; --precision only for a PyTorch model (usage errors)."""
    if (args.checkpoint is None) == (args.onnx is None):
        parser.error("give a CHECKPOINT or --onnx MODEL.onnx (one of them)")
    if args.onnx and args.precision:
        parser.error("--precision applies to PyTorch checkpoints; an ONNX graph's precision is set at export "
                     "(python -m pisa.export --fp16)")


def onnx_parts(cfg: dict, info: dist.DistInfo, path: str) -> tuple[RunParts, nn.Module]:
    """Val loader and evaluator of the config, and the ONNX Runtime session as the model."""
    from pisa.engine.onnx_runner import OnnxDetector

    val_loader, evaluator = build_val_parts(cfg, info)
    detector = OnnxDetector(path)
    return RunParts(detector, None, val_loader, evaluator), detector


def build_model_for_checkpoint(cfg: dict) -> nn.Module:
    """The configured model without ImageNet initialisation: the checkpoint supplies every weight."""
    from pisa.models import build_model

    model_cfg = copy.deepcopy(cfg)
    model_cfg["model"]["backbone"]["pretrained"] = None
    return build_model(model_cfg)


def build_eval_parts(cfg: dict, info: dist.DistInfo) -> RunParts:
    """Model (see ``build_model_for_checkpoint``), val loader, evaluator."""
    val_loader, evaluator = build_val_parts(cfg, info)
    return RunParts(build_model_for_checkpoint(cfg), None, val_loader, evaluator)


def load_weights_strict(model: nn.Module, path: str, cfg: dict, trust: bool) -> list[str]:
    """Every model tensor must come from the checkpoint, with nothing left over.

    Returns warnings: for a file carrying mmdetection's config text, each test-time setting where
    that config disagrees with ``cfg`` (those change the AP it reaches here).
    """
    state, embedded_config = load_model_checkpoint(path, cfg["model"], trust=trust)
    mismatched = shape_mismatches(model, state)
    if mismatched:
        raise CheckpointError(
            f"{path} does not fit the configured model: {len(mismatched)} tensors differ in shape "
            f"({describe_mismatches(mismatched)}); check that model.* "
            "(backbone, num_classes, neck and head widths) matches the checkpoint")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit the configured model: {len(result.missing_keys)} missing "
            f"{result.missing_keys[:5]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}; "
            "check that model.* (type, backbone, num_classes) matches the checkpoint")
    if embedded_config is None:
        return []
    from pisa.models.mmdet_config import config_differences

    differences, _ = config_differences(embedded_config, cfg)
    return [f"warning: {path}'s embedded mmdetection config differs from this config in {d}; "
            f"set it with --set to reproduce the checkpoint's own results" for d in differences]


def default_out_dir(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return path.parent / f"eval_{path.stem}"


def main(argv: Sequence[str] | None = None, build: Any = build_eval_parts) -> dict[str, Any]:
    """CLI entry; returns the metric dict (``bbox_AP``, ..., ``per_class``) on every rank.

    ``build(cfg, dist_info) -> RunParts`` makes the model, val loader and evaluator.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    cfg = resolve_config(args, check_paths=("data.val",))  # training data need not be present
    with cli_session(cfg, args.device) as info:
        if args.onnx:
            parts, model = onnx_parts(cfg, info, args.onnx)
            warnings = []
        else:
            meta = read_checkpoint_meta(args.checkpoint, args.trust_checkpoint)
            classes = checkpoint_classes(meta, args.checkpoint, cfg["model"])  # resolves num_classes: auto
            parts = build(cfg, info)
            check_val_classes(classes, getattr(parts.val_loader, "dataset", None))
            warnings = load_weights_strict(parts.model, args.checkpoint, cfg, args.trust_checkpoint)
            model = parts.model.to(info.device)
        if info.is_main:
            for line in warnings:
                print(line, file=sys.stderr)
        out_dir = Path(args.out) if args.out else default_out_dir(args.checkpoint or args.onnx)
        amp = PRECISIONS[args.precision] if args.precision else cfg["train"]["amp"]
        metrics = evaluate(model, parts.val_loader, parts.evaluator, amp=None if args.onnx else amp,
                           out_dir=out_dir)
        if info.is_main:
            summary = getattr(parts.evaluator, "format_summary", None)
            print(summary(metrics) if callable(summary) else metrics)
            print(f"results and metrics written to {out_dir}")
        return metrics


if __name__ == "__main__":
    main()
