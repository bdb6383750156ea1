"""Export a detector with its post-processing to ONNX: ``python -m pisa.export CONFIG CHECKPOINT --out
model.onnx [--fp16] [--batch N] [--dynamic] [--size H W] [--set k=v ...] [--trust-checkpoint]``.

The graph takes ``images`` ``(B, 3, H, W)`` (normalised and padded, as ``pisa.data`` makes them),
``img_shapes`` ``(B, 2)`` and ``scale_factors`` ``(B, 2)``, and returns ``boxes`` ``(B, M, 4)``,
``scores`` ``(B, M)``, ``labels`` ``(B, M)`` and ``num_dets`` ``(B,)`` (``M`` = the test ``max_per_img``),
and for Mask R-CNN ``masks`` ``(B, M, 28, 28)`` probabilities (see ``pisa.export_model``). Evaluate it with ``python -m pisa.eval CONFIG --onnx model.onnx``.
Needs the ``onnx`` extra: ``pip install "pisa-det[onnx]"``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

import torch

from pisa.config import add_config_args
from pisa.config_schema import ConfigError
from pisa.data.classes import checkpoint_classes
from pisa.engine.checkpoint import CheckpointError, read_checkpoint_meta
from pisa.train import resolve_config

EXPORTER_MODULES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports


class ExportError(Exception):
    """An export that cannot run as asked; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pisa.export",
                                     description="Export a detector and its post-processing to ONNX.")
    parser.add_argument("config", help="experiment YAML file (model and data.test_transforms are used)")
    parser.add_argument("checkpoint", help="pisa or mmdetection checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--fp16", action="store_true", help="float16 network (post-processing stays float32)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of a static graph (default 1)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (SSD: batch only)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the test scale, landscape, padded)")
    add_config_args(parser)
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (can execute code: trusted files only)")
    return parser


def default_size(cfg: dict) -> tuple[int, int]:
    """``(H, W)`` of a landscape image at the first test scale, padded to ``data.pad_divisor``; for the
    SSD pipeline the square ``data.ssd_transforms.size``."""
    if cfg["data"].get("pipeline", "standard") == "ssd":
        side = cfg["data"]["ssd_transforms"]["size"]
        return side, side
    long_side, short_side = max(cfg["data"]["test_transforms"]["scales"][0]), min(cfg["data"]["test_transforms"]["scales"][0])
    divisor = cfg["data"]["pad_divisor"]
    return -(-short_side // divisor) * divisor, -(-long_side // divisor) * divisor


def check_exporter_installed() -> None:
    missing = []
    for name in EXPORTER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)} (not installed): "
                          "pip install \"pisa-det[onnx]\" (or pip install onnx onnxscript onnxruntime)")


def check_sizes(args: argparse.Namespace, size: tuple[int, int], divisor: int) -> None:
    if args.batch < 1:
        raise ExportError(f"--batch {args.batch}: give a batch size of at least 1")
    if any(side < divisor or side % divisor for side in size):
        raise ExportError(f"--size {size[0]} {size[1]}: height and width must be positive multiples of "
                          f"data.pad_divisor ({divisor}), as the data pipeline pads them")


EXPORTABLE_TYPES = ("retinanet", "ssd", "faster_rcnn", "mask_rcnn")


def check_exportable(model_cfg: dict) -> None:
    """What ``pisa.export_model`` implements: the model types of ``EXPORTABLE_TYPES``, RetinaNet with
    the v2 top-k rule."""
    if model_cfg["type"] not in EXPORTABLE_TYPES:
        raise ExportError(f"model.type {model_cfg['type']!r}: ONNX export supports "
                          f"{', '.join(repr(t) for t in EXPORTABLE_TYPES)} so far")
    rule = model_cfg.get("test", {}).get("topk_rule", "v2")
    if model_cfg["type"] == "retinanet" and rule != "v2":
        raise ExportError(f"model.test.topk_rule {rule!r}: the export implements the 'v2' rule so far; "
                          "add --set model.test.topk_rule=v2")


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI entry; returns the path written."""
    from pisa.eval import build_model_for_checkpoint, load_weights_strict
    from pisa.export_model import export_onnx

    args = build_parser().parse_args(argv)
    cfg = resolve_config(args, check_paths=False)  # no data is read
    size = tuple(args.size) if args.size else default_size(cfg)
    try:
        check_sizes(args, size, cfg["data"]["pad_divisor"])
        check_exporter_installed()
        check_exportable(cfg["model"])
        # model.num_classes: auto takes the count from the checkpoint's class names.
        checkpoint_classes(read_checkpoint_meta(args.checkpoint, args.trust_checkpoint), args.checkpoint, cfg["model"])
        model = build_model_for_checkpoint(cfg)
        for line in load_weights_strict(model, args.checkpoint, cfg, args.trust_checkpoint):
            print(line, file=sys.stderr)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            export_onnx(model, out, batch=args.batch, size=size, fp16=args.fp16, dynamic=args.dynamic,
                        pad_divisor=cfg["data"]["pad_divisor"])
    except (ExportError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    spatial = "H x W" if cfg["model"]["type"] != "ssd" else f"{size[0]} x {size[1]}"
    shape = f"dynamic batch x 3 x {spatial}" if args.dynamic else f"{args.batch} x 3 x {size[0]} x {size[1]}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; input {shape}; "
          f"{'float16' if args.fp16 else 'float32'} network, float32 post-processing)")
    return out


if __name__ == "__main__":
    main()
