"""Side-by-side timings for RetinaNet, printed in one run on the same inputs.

1. pisa RetinaNet train step: PISA (ISR-P + CARL) vs the baseline (same model, no ``pisa:`` block),
   and the criterion alone (targets + losses + their backward on fixed head outputs), where PISA's
   extra work is not hidden by the noise of a multi-second step. Models run in turn within every
   repeat so that drift of the machine lands on each alike.
2. ``isr_p`` (vectorised) vs a straightforward loop over classes and GTs computing the same weights.
3. pisa RetinaNet vs torchvision's ``RetinaNet`` of the same architecture: train step and inference.

    python scripts/bench_retinanet.py                      # R50-FPN, 2 images of 512x512, CPU
    python scripts/bench_retinanet.py --backbone resnet18 --size 320 --batch 4 --device cuda

Nothing is downloaded: every network starts from random weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pisa.config import load_config
from pisa.losses import isr_p
from pisa.losses.focal import sigmoid_focal_loss
from pisa.losses.hlr import gt_group_ids
from pisa.losses.regression import aligned_box_iou
from pisa.models import build_model
from pisa.models.box_coder import DeltaXYWHCoder


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def timed(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return timed_interleaved({"fn": fn}, device, warmup, repeat)["fn"]


def timed_interleaved(fns: dict, device: torch.device, warmup: int, repeat: int) -> dict[str, float]:
    """Median wall time (ms) of each ``fns[name]()``, run in turn within every repeat, so that a
    slow phase of the machine lands on all of them alike instead of on whichever ran then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def random_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = []
    for i in range(batch):
        n = 6
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(n, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(num_classes, (n,), generator=g).to(device),
                        "ignore_boxes": torch.zeros(0, 4, device=device), "image_id": i,
                        "img_shape": (size, size), "ori_shape": (size, size), "scale_factor": (1.0, 1.0),
                        "flip": False})
    return images.to(device), targets


def train_step_fn(model, images, targets, loss_of):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(images, targets))
        loss.backward()
        opt.step()
    return step


def criterion_step_fn(model, images, targets, loss_of):
    """Targets, losses and their backward into fixed head outputs: the part PISA changes, alone."""
    with torch.no_grad():
        cls_scores, bbox_preds = model.head(model.neck(model.backbone(images)))
    outputs = [t.detach().requires_grad_(True) for t in cls_scores + bbox_preds]
    levels = len(cls_scores)

    def step():
        loss_of(model.criterion(outputs[:levels], outputs[levels:], targets)).backward()
    return step


def pisa_models(config: str, backbone: str, num_classes: int, device: torch.device):
    overrides = [f"model.backbone.type={backbone}", "model.backbone.pretrained=null",
                 f"model.num_classes={num_classes}"]
    cfg = load_config(config, overrides, check_paths=False)  # no dataset is read here
    base_cfg = copy.deepcopy(cfg)
    base_cfg["pisa"] = None
    torch.manual_seed(0)
    pisa_model = build_model(cfg).to(device)
    base_model = build_model(base_cfg).to(device)
    base_model.load_state_dict(pisa_model.state_dict())
    return pisa_model, base_model, cfg


def torchvision_retinanet(backbone: str, num_classes: int, size: int, model_cfg: dict) -> RetinaNet:
    """torchvision's RetinaNet with the reference's architecture: FPN on C3-C5, P6 from C5, same anchors."""
    trunk = getattr(torchvision.models, backbone)(weights=None) if backbone != "resnext101_32x4d" else \
        torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
    c5 = trunk.fc.in_features
    out = model_cfg["neck"]["out_channels"]
    fpn = _resnet_fpn_extractor(trunk, trainable_layers=3, returned_layers=[2, 3, 4],
                                extra_blocks=LastLevelP6P7(c5, out), norm_layer=None)
    anchors = model_cfg["anchors"]
    octave = [anchors["octave_base_scale"] * 2 ** (i / anchors["scales_per_octave"])
              for i in range(anchors["scales_per_octave"])]
    sizes = tuple(tuple(s * o for o in octave) for s in anchors["strides"])
    gen = TVAnchorGenerator(sizes, (tuple(anchors["ratios"]),) * len(sizes))
    return RetinaNet(fpn, num_classes, min_size=size, max_size=size, anchor_generator=gen,
                     image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


def loop_isr_p_weights(labels, ious, group, losses, num_classes, k=2.0):
    """ISR-P weights by plain Python loops over classes and GTs (what the vectorised form replaces)."""
    weights = torch.ones_like(ious)
    n_max = max(int((labels == c).sum()) for c in range(num_classes))
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        if idx.numel() == 0:
            continue
        entries = []  # (local rank, -iou, index)
        for g in group[idx].unique().tolist():
            members = idx[group[idx] == g]
            order = torch.argsort(-ious[members], stable=True)
            entries += [(loc, -float(ious[members[j]]), int(members[j])) for loc, j in enumerate(order.tolist())]
        for rank, (_, _, i) in enumerate(sorted(entries)):
            weights[i] = ((n_max - rank) / n_max) ** k
    ratio = losses.sum() / (weights * losses).sum()
    return weights * ratio


def bench_isr_p(device: torch.device, num_pos: int, num_gts: int, num_classes: int, warmup: int, repeat: int):
    g = torch.Generator().manual_seed(0)
    n = num_pos * 50
    labels = torch.full((n,), num_classes, dtype=torch.long)
    pos = torch.randperm(n, generator=g)[:num_pos]
    gt = torch.randint(num_gts, (n,), generator=g)
    gt_labels = torch.randint(num_classes, (num_gts,), generator=g)
    labels[pos] = gt_labels[gt[pos]]
    priors = torch.rand(n, 2, generator=g) * 400
    priors = torch.cat([priors, priors + 20 + torch.rand(n, 2, generator=g) * 80], 1)
    deltas = torch.randn(n, 4, generator=g) * 0.1
    targets = torch.randn(n, 4, generator=g) * 0.1
    logits = torch.randn(n, num_classes, generator=g)
    img = torch.zeros(n, dtype=torch.long)
    coder = DeltaXYWHCoder()
    args = [t.to(device) for t in (logits, deltas, labels, torch.ones(n), targets, priors, gt, img)]

    def vectorised():
        return isr_p(*args, num_classes=num_classes, decode=coder.decode)

    p = pos.sort().values
    ious = aligned_box_iou(coder.decode(priors[p], deltas[p]), coder.decode(priors[p], targets[p]))
    groups = gt_group_ids(img[p], gt[p])
    losses = sigmoid_focal_loss(logits[p], labels[p]).sum(1)

    def loop():
        return loop_isr_p_weights(labels[p], ious, groups, losses, num_classes)

    ref = loop()
    got = vectorised()[p].cpu()
    assert torch.allclose(ref, got, atol=1e-5), "loop and vectorised ISR-P disagree"
    return timed(vectorised, device, warmup, repeat), timed(loop, torch.device("cpu"), 1, max(1, repeat // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    pisa_model, base_model, cfg = pisa_models(args.config, args.backbone, args.classes, device)
    images, targets = random_batch(args.batch, args.size, args.classes, device)
    total = lambda losses: sum(v for k, v in losses.items() if k.startswith("loss_"))  # noqa: E731
    print(f"device={device}  backbone={args.backbone}  batch={args.batch}x{args.size}x{args.size}  "
          f"classes={args.classes}  torch={torch.__version__}  threads={torch.get_num_threads()}")

    torch.manual_seed(0)
    tv = torchvision_retinanet(args.backbone, args.classes, args.size, cfg["model"]).to(device)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    tv_images = list(images)
    steps = timed_interleaved({"base": train_step_fn(base_model, images, targets, total),
                               "pisa": train_step_fn(pisa_model, images, targets, total),
                               "tv": train_step_fn(tv, tv_images, tv_targets, lambda d: sum(d.values()))},
                              device, args.warmup, args.repeat)
    t_base, t_pisa, t_tv = steps["base"], steps["pisa"], steps["tv"]
    rows = [("train step: PISA / baseline", t_pisa, t_base)]
    crit = timed_interleaved({"base": criterion_step_fn(base_model, images, targets, total),
                              "pisa": criterion_step_fn(pisa_model, images, targets, total)},
                             device, args.warmup, 4 * args.repeat)
    rows.append(("criterion fwd+bwd: PISA / baseline", crit["pisa"], crit["base"]))

    t_vec, t_loop = bench_isr_p(device, num_pos=2000, num_gts=100, num_classes=args.classes,
                                warmup=args.warmup, repeat=args.repeat)
    rows.append(("isr_p (2000 pos, 100 GTs): vectorised / per-GT loop", t_vec, t_loop))
    rows.append(("train step: pisa baseline / torchvision", t_base, t_tv))
    rows.append(("train step: pisa PISA / torchvision", t_pisa, t_tv))

    base_model.eval()
    tv.eval()
    with torch.no_grad():
        inference = timed_interleaved({"pisa": lambda: base_model(images, targets), "tv": lambda: tv(tv_images)},
                                      device, args.warmup, args.repeat)
    t_inf, t_tv_inf = inference["pisa"], inference["tv"]
    rows.append(("inference: pisa / torchvision", t_inf, t_tv_inf))

    print(f"\n{'comparison':58s} {'ms (a)':>10s} {'ms (b)':>10s} {'a/b':>7s}")
    for name, a, b in rows:
        print(f"{name:58s} {a:10.1f} {b:10.1f} {a / b:7.3f}")


if __name__ == "__main__":
    main()
