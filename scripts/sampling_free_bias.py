"""Compute Sampling-Free's foreground prior pi for a RetinaNet config's training set (method doc §8.2).

    python scripts/sampling_free_bias.py configs/demo/sampling_free_retinanet_r18_demo.yaml
    python scripts/sampling_free_bias.py CONFIG --max-images 5000 --set data.train.ann_file=...

Every training image's anchors are matched to its GTs with the config's ``model.assigner`` (low-quality
matches on, no network); ``pi = (#fg / (#fg + #bg)) / K`` with the anchors between the thresholds left
out. Only annotations are read (images are not decoded); each image is sized as the first
``data.train_transforms.scales`` entry resizes it. Put the printed value in the config as
``sampling_free.pi``; the classifier bias becomes -log((1 - pi) / pi) and the test score threshold
pi * (K + 1). The authors' cached COCO value for RetinaNet R50/R101 is pi = 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import time

from pisa.config import ConfigError, add_config_args, load_config
from pisa.models.sampling_free import foreground_prior, prior_bias


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML file (a RetinaNet)")
    parser.add_argument("--max-images", type=int, default=None, help="count only the first N training images")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, check_paths=["data.train"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg["model"]["type"] != "retinanet":
        print(f"error: model.type is {cfg['model']['type']!r}; the bias prior is computed for retinanet",
              file=sys.stderr)
        return 2
    tic = time.perf_counter()
    count = foreground_prior(cfg, args.max_images)
    pi = count.pi
    print(f"{count.images} images, {count.foreground} foreground and {count.background} background anchors, "
          f"K = {count.num_classes} classes ({time.perf_counter() - tic:.1f} s)")
    print(f"pi = {pi:.6g}  (classifier bias {prior_bias(pi):.4f}, test score threshold "
          f"{pi * (count.num_classes + 1):.6g}); set it with --set sampling_free.pi={pi:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
