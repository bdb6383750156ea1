"""Side-by-side timings for SSD300, printed in one run on the same inputs.

1. pisa SSD300 train step (forward, losses, backward): PISA (ISR-P + CARL) vs the baseline (same model,
   no ``pisa:`` block), and the criterion alone (targets, mining, losses and their backward on fixed head
   outputs), where PISA's extra work is not hidden by the noise of a multi-second step.
2. pisa SSD300 vs torchvision's ``ssd300_vgg16`` (same VGG16 trunk, extra layers and head sizes, random
   weights): train step and inference (torchvision's includes its ``GeneralizedRCNNTransform``).

Models run in turn within every repeat (``timed_interleaved``), so drift of a shared machine lands on
each alike. Nothing is downloaded.

    python scripts/bench_ssd.py                       # 80 classes, 2 images of 300x300, 1 CPU thread
    python scripts/bench_ssd.py --batch 8 --device cuda
    python scripts/bench_ssd.py --nms-pre 0              # inference without a pre-NMS top-k (v2.0 reference)
"""

from __future__ import annotations

import argparse

import torch
from bench_retinanet import timed_interleaved  # the sibling script's interleaved median timer
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD as TVSSD
from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
from torchvision.models.detection.ssd import SSDHead as TVSSDHead
from torchvision.models.vgg import cfgs, make_layers

from pisa.config import load_config
from pisa.models import build_model

CONFIG = "configs/ssd/ssd300_coco.yaml"


def random_targets(batch: int, num_classes: int, per_image: int, size: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        xy = torch.rand(per_image, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(per_image, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(num_classes, (per_image,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device),
                        "ignore_boxes": torch.zeros(0, 4, device=device), "img_shape": (size, size),
                        "scale_factor": (1.0, 1.0)})
    return targets


def torchvision_ssd300(num_classes: int) -> TVSSD:
    """What ``ssd300_vgg16(weights=None, weights_backbone=None)`` builds, without the unused classifier."""
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                  scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    head = TVSSDHead([512, 1024, 512, 256, 256, 256], anchors.num_anchors_per_location(), num_classes + 1)
    return TVSSD(SSDFeatureExtractorVGG(make_layers(cfgs["D"]), highres=False), anchors, (300, 300),
                 num_classes + 1, head=head)


def train_step(model, images, targets):
    def step():
        model.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=6, help="GT boxes per image")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nms-pre", type=int, default=1000,
                        help="pisa's model.test.nms_pre for the inference timing (0: every anchor, as the v2.0 "
                             "reference; with random weights that sends ~175k boxes into NMS)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(CONFIG, check_paths=False)
    num_classes = cfg["model"]["num_classes"]
    torch.manual_seed(0)
    base = build_model(cfg).to(device).train()
    pisa_cfg = {**cfg, "pisa": {"isr_p": {"k": 2.0, "bias": 0.0}, "carl": {"k": 1.0, "bias": 0.2}, "compat": {}}}
    pisa = build_model(pisa_cfg).to(device).train()
    pisa.load_state_dict(base.state_dict())
    images = torch.randn(args.batch, 3, 300, 300, device=device) * 50
    targets = random_targets(args.batch, num_classes, args.boxes, 300, device)

    steps = timed_interleaved({"pisa": train_step(pisa, images, targets), "base": train_step(base, images, targets)},
                              device, args.warmup, args.repeat)
    with torch.no_grad():
        feats = base.backbone(images)
        cls, reg = base.head(feats)
    cls = [c.detach().requires_grad_() for c in cls]
    reg = [r.detach().requires_grad_() for r in reg]

    def criterion(model):
        def run():
            sum(model.criterion(cls, reg, targets).values()).backward()
        return run
    crit = timed_interleaved({"pisa": criterion(pisa), "base": criterion(base)}, device, args.warmup,
                             4 * args.repeat)

    tv = torchvision_ssd300(num_classes).to(device)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    tv_images = list(images)
    tv.train()
    train = timed_interleaved({"pisa": train_step(base, images, targets),
                               "tv": train_step(tv, tv_images, tv_targets)}, device, args.warmup, args.repeat)
    base.eval()
    tv.eval()
    base.postprocessor.nms_pre = args.nms_pre
    with torch.no_grad():
        infer = timed_interleaved({"pisa": lambda: base(images, targets), "tv": lambda: tv(tv_images)}, device,
                                  args.warmup, args.repeat)

    print(f"SSD300, {num_classes} classes, {args.batch} images of 300x300, {args.boxes} GTs each, "
          f"{args.device}, {args.threads} thread(s), median of {args.repeat}; inference with nms_pre {args.nms_pre}")
    print("| comparison | a (ms) | b (ms) | a / b |\n|---|---|---|---|")
    for name, (a, b) in {"train step: PISA / baseline": (steps["pisa"], steps["base"]),
                         f"criterion (median of {4 * args.repeat}): PISA / baseline": (crit["pisa"], crit["base"]),
                         "train step: pisa baseline / torchvision ssd300_vgg16": (train["pisa"], train["tv"]),
                         "inference: pisa / torchvision ssd300_vgg16": (infer["pisa"], infer["tv"])}.items():
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
