"""Side-by-side timings for Faster R-CNN / Mask R-CNN R50-FPN, printed in one run on the same inputs.

1. pisa train step, PISA (ISR-N + ISR-P + CARL) vs the same config without its ``pisa:`` block (the
   cost of PISA alone), and vs the baseline config (which also keeps 1000 instead of 2000 proposals
   and uses L1 instead of SmoothL1 box losses).
2. pisa's baseline vs torchvision's ``FasterRCNN`` (``--model mask``: ``MaskRCNN``) R50-FPN with the
   same weights: train step and inference; for masks also pasting 100 masks into an 800x1333 image.

Models run in turn within every repeat, so that drift of the machine lands on each alike; each row
is a median.

    python scripts/bench_two_stage.py                    # Faster R-CNN, 2 images of 512x512, CPU
    python scripts/bench_two_stage.py --model mask --quick
    python scripts/bench_two_stage.py --size 800 --batch 2 --device cuda

torchvision's model is ``fasterrcnn_resnet50_fpn`` as torchvision builds it around a pretrained
backbone (FrozenBatchNorm, stem and layer1 frozen, as pisa's configs, which however still train the
BatchNorm affine of stages 2-4 as the reference does) but with random weights
(``weights=None, weights_backbone=None`` alone would also unfreeze every layer and train BatchNorm),
and with the reference's proposal counts (train: 2000 per level, 1000 kept; test: 1000 / 1000), 512
RoIs at 1/4 positives, score 0.05, NMS 0.5, 100 detections, and proposals of any size kept (its
``rpn.min_size`` set to 0, as the reference has no size filter). pisa's random weights are copied into it
(class order and the background rows adapted), so both score the same proposals alike. Differences
that stay: torchvision resizes and normalises inside the model (a no-op resize here), rounds its
anchors, pools with ``aligned=False`` and 2 samples per bin (pisa: ``aligned=True``, adaptive, as the
reference), predicts a background mask too, and pastes masks with its own ``paste_masks_in_image``.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_retinanet import timed_interleaved, train_step_fn  # noqa: E402  (same timing helpers)

from pisa.benchmark import calibrate_rpn, two_stage_state_for_torchvision  # noqa: E402
from pisa.config import load_config  # noqa: E402
from pisa.models import build_model  # noqa: E402
from pisa.models.mask_head import paste_masks  # noqa: E402

CONFIGS = {"faster": ("configs/pisa/pisa_faster_rcnn_r50_fpn_1x_coco.yaml",
                      "configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yaml"),
           "mask": ("configs/pisa/pisa_mask_rcnn_r50_fpn_1x_coco.yaml",
                    "configs/mask_rcnn/mask_rcnn_r50_fpn_1x_coco.yaml")}


def random_batch(batch: int, size: int, num_classes: int, num_gts: int, device: torch.device, seed: int = 0):
    """Images ``(B, 3, size, size)`` and targets with ``num_gts`` boxes each, masks = ellipses in the boxes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    targets = []
    for i in range(batch):
        xy = torch.rand(num_gts, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(num_gts, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        masks = (((xx - centre[:, 0, None, None]) / half[:, 0, None, None]) ** 2
                 + ((yy - centre[:, 1, None, None]) / half[:, 1, None, None]) ** 2 <= 1).to(torch.uint8)
        labels = torch.randint(num_classes, (num_gts,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device),
                        "masks": masks.to(device), "ignore_boxes": torch.zeros(0, 4, device=device),
                        "image_id": i, "img_shape": (size, size), "ori_shape": (size, size),
                        "scale_factor": (1.0, 1.0), "flip": False})
    return images.to(device), targets


def pisa_models(kind: str, num_classes: int, overrides: list[str], device: torch.device,
                images: torch.Tensor | None = None):
    """PISA model, the same config without ``pisa:``, and the baseline config; one set of weights (the
    RPN rescaled on ``images`` by :func:`pisa.benchmark.calibrate_rpn` when they are given)."""
    common = ["model.backbone.pretrained=null", f"model.num_classes={num_classes}", *overrides]
    pisa_path, base_path = CONFIGS[kind]
    cfg = load_config(pisa_path, common, check_paths=False)  # no dataset is read here
    no_pisa_cfg = copy.deepcopy(cfg)
    no_pisa_cfg["pisa"] = None
    base_cfg = load_config(base_path, common, check_paths=False)
    torch.manual_seed(0)
    models = {"pisa": build_model(cfg), "no_pisa": build_model(no_pisa_cfg), "base": build_model(base_cfg)}
    if images is not None:
        calibrate_rpn(models["pisa"], images.cpu())  # still on the CPU here
    for name in ("no_pisa", "base"):
        models[name].load_state_dict(models["pisa"].state_dict())
    return {name: m.to(device) for name, m in models.items()}, base_cfg


def torchvision_model(kind: str, num_classes: int, size: int, test_cfg: dict) -> FasterRCNN:
    """torchvision's R50-FPN Faster / Mask R-CNN with pisa's training setup and the reference's counts."""
    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=3)
    cls = MaskRCNN if kind == "mask" else FasterRCNN
    model = cls(backbone, num_classes + 1, min_size=size, max_size=size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
               rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
               rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
               box_batch_size_per_image=512, box_positive_fraction=0.25,
               box_score_thresh=test_cfg["score_thr"], box_nms_thresh=test_cfg["nms_iou"],
               box_detections_per_img=test_cfg["max_per_img"])
    # The reference keeps proposals of any size (min_bbox_size 0); torchvision drops those under 1e-3 px,
    # which with random weights are most of them, so it would pool far fewer RoIs than pisa.
    model.rpn.min_size = 0.0
    return model


def paste_fns(num: int, height: int, width: int, device: torch.device) -> dict:
    """pisa's ``paste_masks`` and torchvision's ``paste_masks_in_image`` (+ the same 0.5 threshold) on
    ``num`` random 28x28 maps in boxes of 20-400 px, in one ``height x width`` image."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([width - 400.0, height - 400.0])
    boxes = torch.cat([xy, xy + 20 + torch.rand(num, 2, generator=g) * 380], 1).to(device)
    probs = torch.rand(num, 28, 28, generator=g).to(device)
    return {"pisa": lambda: paste_masks(probs, boxes, (height, width)),
            "tv": lambda: paste_masks_in_image(probs[:, None], boxes, (height, width)) >= 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="faster")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--gts", type=int, default=8, help="objects per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="256x256 images, 8 classes, 1 warm-up, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.size, args.classes, args.warmup, args.repeat = 256, 8, 1, 3
    device = torch.device(args.device)
    # Random-weight models drift into denormal floats after a few SGD steps, and denormal arithmetic is
    # ~7x slower on CPUs (RoIAlign backward and the FC matmuls went from 2 s to 14 s a step): flush them,
    # so the timings measure the models, not the operands.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    images, targets = random_batch(args.batch, args.size, args.classes, args.gts, device)
    models, base_cfg = pisa_models(args.model, args.classes, [], device, images)
    tv = torchvision_model(args.model, args.classes, args.size, base_cfg["model"]["roi_head"]["test"])
    initial = copy.deepcopy(models["base"].state_dict())  # training steps move each model's weights apart
    tv.load_state_dict(two_stage_state_for_torchvision(initial, tv.state_dict(), args.classes))
    tv = tv.to(device)
    tv_keys = ("boxes", "labels", "masks") if args.model == "mask" else ("boxes", "labels")
    tv_targets = [{k: t[k] for k in tv_keys} for t in targets]
    tv_images = list(images)
    total = lambda losses: sum(v for k, v in losses.items() if k.startswith("loss_"))  # noqa: E731
    print(f"model={args.model}  device={device}  batch={args.batch}x{args.size}x{args.size}  "
          f"classes={args.classes}  objects/image={args.gts}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}")

    steps = timed_interleaved({name: train_step_fn(m, images, targets, total) for name, m in models.items()}
                              | {"tv": train_step_fn(tv, tv_images, tv_targets, lambda d: sum(d.values()))},
                              device, args.warmup, args.repeat)
    rows = [("train step: PISA / same config without pisa:", steps["pisa"], steps["no_pisa"]),
            ("train step: PISA config / baseline config", steps["pisa"], steps["base"]),
            ("train step: pisa baseline / torchvision", steps["base"], steps["tv"])]

    # Inference from the same weights again, so both detect the same (or nearly the same) boxes.
    models["base"].load_state_dict(initial)
    tv.load_state_dict(two_stage_state_for_torchvision(initial, tv.state_dict(), args.classes))
    for m in (*models.values(), tv):
        m.eval()
    with torch.no_grad():
        counts = (len(models["base"](images, targets)[0]["boxes"]), len(tv(tv_images)[0]["boxes"]))
        inference = timed_interleaved({"pisa": lambda: models["base"](images, targets), "tv": lambda: tv(tv_images)},
                                      device, args.warmup, args.repeat)
    rows.append((f"inference: pisa / torchvision ({counts[0]} / {counts[1]} dets)", inference["pisa"],
                 inference["tv"]))
    if args.model == "mask":
        paste = timed_interleaved(paste_fns(100, 800, 1333, device), device, 1, args.repeat)
        rows.append(("paste 100 masks into 800x1333: pisa / torchvision", paste["pisa"], paste["tv"]))

    print(f"\n{'comparison':58s} {'ms (a)':>10s} {'ms (b)':>10s} {'a/b':>7s}")
    for name, a, b in rows:
        print(f"{name:58s} {a:10.1f} {b:10.1f} {a / b:7.3f}")


if __name__ == "__main__":
    main()
