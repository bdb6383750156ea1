"""Compute Sampling-Free's foreground prior pi for a RetinaNet, Faster or Mask R-CNN config's training set
(method doc §8.2).

    python scripts/sampling_free_bias.py configs/demo/sampling_free_retinanet_r18_demo.yaml
    python scripts/sampling_free_bias.py configs/demo/sampling_free_faster_rcnn_r18_demo.yaml
    python scripts/sampling_free_bias.py CONFIG --max-images 5000 --set data.train.ann_file=...

Every training image's anchors are matched to its GTs (low-quality matches on, no network): RetinaNet's
anchors with ``model.assigner`` and C = K classes, or the RPN's anchors with ``model.rpn.assigner`` and
C = 1 (objectness); ``pi = (#fg / (#fg + #bg)) / C`` with the anchors between the thresholds left out.
Only annotations are read (images are not decoded); each image is sized as the first
``data.train_transforms.scales`` entry resizes it. Put the printed value in the config as
``sampling_free.pi``; the classifier (RetinaNet) or objectness (RPN) bias becomes -log((1 - pi) / pi),
and RetinaNet's test score threshold pi * (K + 1). The authors' cached COCO values: RetinaNet R50/R101
pi = 1e-5, the Faster R-CNN RPN pi = 2e-4.
"""

from __future__ import annotations

import argparse
import sys
import time

from pisa.config import ConfigError, add_config_args, load_config
from pisa.models.sampling_free import foreground_prior, prior_bias, prior_matcher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML file (a RetinaNet, Faster or Mask R-CNN)")
    parser.add_argument("--max-images", type=int, default=None, help="count only the first N training images")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        print(f"error: --max-images must be at least 1, got {args.max_images}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides, check_paths=["data.train"])
        prior_matcher(cfg)  # an unsupported model.type fails here, before the dataset is read
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    count = foreground_prior(cfg, args.max_images)
    pi = count.pi
    rpn = cfg["model"]["type"] != "retinanet"
    classes = "C = 1 (RPN objectness)" if rpn else f"K = {count.num_classes} classes"
    print(f"{count.images} images, {count.foreground} foreground and {count.background} background anchors, "
          f"{classes} ({time.perf_counter() - tic:.1f} s)")
    if count.foreground == 0:
        print("error: no anchor matched a GT (empty training set or no boxes?): pi would be 0, an infinite "
              "bias; check data.train", file=sys.stderr)
        return 2
    usage = (f"RPN objectness bias {prior_bias(pi):.4f}" if rpn else
             f"classifier bias {prior_bias(pi):.4f}, test score threshold {pi * (count.num_classes + 1):.6g}")
    print(f"pi = {pi:.6g}  ({usage}); set it with --set sampling_free.pi={pi:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
