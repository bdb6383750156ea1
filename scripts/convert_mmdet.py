"""Convert an mmdetection v2/3.x checkpoint (RetinaNet, Faster / Mask R-CNN, SSD, PAA) into a pisa checkpoint.

    python scripts/convert_mmdet.py pisa_retinanet_r50_fpn_1x_coco-76409952.pth pisa_retinanet_r50.pth
    python scripts/convert_mmdet.py IN.pth OUT.pth --config configs/pisa/pisa_retinanet_x101_32x4d_fpn_1x_coco.yaml

Without ``--config`` the model type and architecture (backbone type, class count, widths) are read off
the weights and the remaining settings come from that model type's COCO config (``BASE_CONFIGS``). Every key must map:
a missing, unexpected or mis-shaped tensor is an error and nothing is written. The output holds
``{"model": state_dict, "meta": {...}, "config": None}`` and loads with ``torch.load(weights_only=True)``.

The input is read with ``weights_only=True`` plus the numpy metadata types such files carry; a file
holding anything else is refused unless ``--trust-checkpoint`` is given (full unpickling can run code).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from pisa.config import ConfigError
from pisa.models.convert import (convert_mmdet_checkpoint, infer_model_cfg, is_mmdet_checkpoint,
                                  mmdet_model_type, read_mmdet_checkpoint)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The config whose settings complete what the weights tell, per model type.
BASE_CONFIGS = {"retinanet": CONFIGS / "retinanet" / "retinanet_r50_fpn_1x_coco.yaml",
                "faster_rcnn": CONFIGS / "faster_rcnn" / "faster_rcnn_r50_fpn_1x_coco.yaml",
                "mask_rcnn": CONFIGS / "mask_rcnn" / "mask_rcnn_r50_fpn_1x_coco.yaml",
                "ssd": CONFIGS / "ssd" / "ssd300_coco.yaml",
                "paa": CONFIGS / "paa" / "paa_r50_fpn_1x_coco.yaml"}


def model_cfg_for(checkpoint: dict, config: str | None) -> dict:
    """The ``model:`` section to convert into: from ``--config``, else inferred over the base config."""
    from pisa.config import load_config

    if config is not None:
        return load_config(config, check_paths=False)["model"]
    base = load_config(str(BASE_CONFIGS[mmdet_model_type(checkpoint["state_dict"])]), check_paths=False)["model"]
    return infer_model_cfg(checkpoint["state_dict"], base)


def save_atomically(obj: dict, path: str) -> None:
    """Write to a temporary file in the target directory, then rename, so no half-written file remains."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="mmdetection checkpoint (.pth)")
    parser.add_argument("output", help="pisa checkpoint to write (.pth)")
    parser.add_argument("--config", help="pisa config whose model section the weights are for (default: inferred)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of the input (only for files from a trusted source)")
    args = parser.parse_args(argv)
    try:
        checkpoint = read_mmdet_checkpoint(args.input, trust=args.trust_checkpoint)
        if not is_mmdet_checkpoint(checkpoint):
            raise ValueError(f"{args.input}: not an mmdetection checkpoint "
                             "(expected a 'state_dict' with backbone./neck./bbox_head. keys)")
        model_cfg = model_cfg_for(checkpoint, args.config)
        converted = convert_mmdet_checkpoint(checkpoint, model_cfg, source=os.path.basename(args.input))
    except (ValueError, FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    save_atomically(converted, args.output)
    meta = converted["meta"]
    print(f"wrote {args.output}: {len(converted['model'])} tensors, {meta['model_type']} with backbone "
          f"{meta['backbone']} and {meta['num_classes']} classes"
          + (f" ({meta['class_names'][0]}, ...)" if meta.get("class_names") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
