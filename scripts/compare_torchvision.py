"""pisa's demo config vs torchvision's RetinaNet, trained for the same CPU time on the same data.

Both detectors use the same ResNet FPN backbone type trained from scratch, the same anchors, image
size, batches (pisa's data loader, one process, no workers so CPU time is the process's own), SGD
settings and schedule shape. pisa trains its config's full schedule through ``pisa.train`` (no
evaluation during training); torchvision then gets the same CPU time: its step time is measured, its schedule is stretched or shrunk to the
number of steps that fit, and both are scored by the same COCO evaluator on the val split.

    python scripts/compare_torchvision.py                          # a second demo set (seed 1)
    python scripts/compare_torchvision.py --work-dir W --reuse-pisa CPU_S --tv-head-convs 2
                                        # torchvision's towers cut to the config's depth, pisa reused
    python scripts/compare_torchvision.py --ann-train A.json --img-train DIR --ann-val B.json --img-val DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pisa import eval as pisa_eval
from pisa import train as pisa_train
from pisa.config import load_config
from pisa.data import build_dataset, build_dataloader
from pisa.data.synthetic import ensure_demo_dataset
from pisa.engine.evaluator import CocoEvaluator
from pisa.engine.optim import build_optimizer, build_scheduler


class NoResizeTransform(GeneralizedRCNNTransform):
    """Batching only: pisa's loader already resized and normalised the images."""

    def resize(self, image, target=None):
        return image, target


def torchvision_model(model_cfg: dict, head_convs: int = 4) -> RetinaNet:
    trunk = getattr(torchvision.models, model_cfg["backbone"]["type"])(weights=None)
    c5 = trunk.fc.in_features
    out = model_cfg["neck"]["out_channels"]
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c5 // 4, c5 // 2, c5],
                               out, extra_blocks=LastLevelP6P7(c5, out))
    a = model_cfg["anchors"]
    octave = [a["octave_base_scale"] * 2 ** (i / a["scales_per_octave"]) for i in range(a["scales_per_octave"])]
    sizes = tuple(tuple(s * o for o in octave) for s in a["strides"])
    gen = TVAnchorGenerator(sizes, (tuple(a["ratios"]),) * len(sizes))
    model = RetinaNet(backbone, model_cfg["num_classes"], anchor_generator=gen,
                      score_thresh=model_cfg["test"]["score_thr"], nms_thresh=model_cfg["test"]["nms_iou"],
                      detections_per_img=model_cfg["test"]["max_per_img"],
                      topk_candidates=model_cfg["test"]["nms_pre"])
    model.transform = NoResizeTransform(1, 1, [0.0] * 3, [1.0] * 3)
    # torchvision fixes its towers at 4 convs; keeping the first n (same init) matches a shallower config.
    model.head.classification_head.conv = model.head.classification_head.conv[:head_convs]
    model.head.regression_head.conv = model.head.regression_head.conv[:head_convs]
    return model


def unpad(images: torch.Tensor, targets: list[dict]) -> list[torch.Tensor]:
    return [img[:, :t["img_shape"][0], :t["img_shape"][1]] for img, t in zip(images, targets)]


def train_torchvision(cfg: dict, loader, cpu_budget: float, pisa_iters: int,
                      head_convs: int) -> tuple[RetinaNet, int, float]:
    torch.manual_seed(cfg["train"]["seed"])
    model = torchvision_model(cfg["model"], head_convs)
    model.train()
    probe = build_optimizer(model, cfg["optim"], cfg["optim"]["lr"])
    # Measure the step time (after a short warm-up), then size the schedule to the CPU budget.
    steps, warmup, timed_steps = 0, 3, 20
    for images, targets in loader:
        if steps == warmup:
            start = time.process_time()
        losses = model(unpad(images, targets), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        probe.zero_grad()
        sum(losses.values()).backward()
        probe.step()
        steps += 1
        if steps == warmup + timed_steps:
            break
    per_step = (time.process_time() - start) / timed_steps
    iters = max(1, int(cpu_budget / per_step))
    torch.manual_seed(cfg["train"]["seed"])
    model = torchvision_model(cfg["model"], head_convs)
    model.train()
    sched_cfg = dict(cfg["schedule"])
    ipe = len(loader)
    scale = iters / pisa_iters
    sched_cfg["steps"] = [max(1, round(s * scale)) for s in cfg["schedule"]["steps"]]
    optimizer = build_optimizer(model, cfg["optim"], cfg["optim"]["lr"])
    scheduler = build_scheduler(optimizer, sched_cfg, ipe)
    it, epoch, start = 0, 0, time.process_time()
    while it < iters:
        # A new order and new flips every epoch, as pisa's trainer draws them.
        loader.batch_sampler.set_epoch(epoch)
        epoch += 1
        for images, targets in loader:
            losses = model(unpad(images, targets), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            if cfg["optim"]["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["clip_grad"]["max_norm"])
            optimizer.step()
            scheduler.step()
            it += 1
            if it % 50 == 0:
                print(f"  torchvision iter {it}/{iters} loss {float(loss):.4f}", flush=True)
            if it >= iters:
                break
    return model, iters, time.process_time() - start


@torch.no_grad()
def evaluate_torchvision(model: RetinaNet, dataset, loader, out_dir: Path) -> dict:
    model.eval()
    evaluator = CocoEvaluator(dataset.ann_file, dataset.label_to_cat_id, dataset.class_names)
    for images, targets in loader:
        outs = model(unpad(images, targets))
        dets = []
        for out, t in zip(outs, targets):
            sx, sy = t["scale_factor"]
            boxes = out["boxes"] / torch.tensor([sx, sy, sx, sy])
            dets.append({"boxes": boxes, "scores": out["scores"], "labels": out["labels"]})
        evaluator.add([t["image_id"] for t in targets], dets)
    evaluator.gather()
    return evaluator.evaluate(str(out_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo/pisa_retinanet_r18_demo.yaml")
    parser.add_argument("--ann-train"), parser.add_argument("--img-train")
    parser.add_argument("--ann-val"), parser.add_argument("--img-val")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--reuse-pisa", type=float, metavar="CPU_SECONDS", default=None,
                        help="skip pisa's training: reuse WORK_DIR/pisa/latest.pth, which took this CPU time")
    parser.add_argument("--tv-head-convs", type=int, choices=(1, 2, 3, 4), default=4,
                        help="convs per torchvision head tower (its own design is 4; the demo config has 2)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pisa-vs-tv-"))
    if args.ann_train:
        paths = {"train_ann": args.ann_train, "train_img_dir": args.img_train,
                 "val_ann": args.ann_val, "val_img_dir": args.img_val}
    else:
        paths = ensure_demo_dataset(work / "shapes-seed1", seed=1)
    data = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.workers=0", f"train.work_dir={work / 'pisa'}", "train.eval_interval=0"]
    overrides = data + args.overrides
    cfg = load_config(args.config, overrides)

    cli = [a for o in overrides for a in ("--set", o)]
    if args.reuse_pisa is None:
        start = time.process_time()
        pisa_train.main([args.config] + cli)
        pisa_cpu = time.process_time() - start
    else:
        pisa_cpu = args.reuse_pisa
    train_set = build_dataset(cfg["data"]["train"], cfg["data"], train=True)
    loader = build_dataloader(train_set, batch_size=cfg["data"]["batch_size"], workers=0, train=True,
                              seed=cfg["train"]["seed"], aspect_grouping=cfg["data"]["aspect_grouping"])
    pisa_iters = cfg["schedule"]["max_iters"] or cfg["schedule"]["epochs"] * len(loader)
    print(f"\npisa: {pisa_iters} iterations in {pisa_cpu:.0f} s CPU (training only)")
    pisa_metrics = pisa_eval.main([args.config, str(work / "pisa" / "latest.pth"), "--out",
                                   str(work / "pisa" / "eval")] + cli)

    model, tv_iters, tv_cpu = train_torchvision(cfg, loader, pisa_cpu, pisa_iters, args.tv_head_convs)
    tv_dir = work / f"torchvision_{args.tv_head_convs}conv"
    tv_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), tv_dir / "model.pth")
    val_set = build_dataset(cfg["data"]["val"], cfg["data"], train=False)
    val_loader = build_dataloader(val_set, batch_size=1, workers=0, train=False, seed=0)
    tv_metrics = evaluate_torchvision(model, val_set, val_loader, tv_dir)
    rows = {"pisa": {"bbox_AP": pisa_metrics["bbox_AP"], "iters": pisa_iters, "cpu_s": round(pisa_cpu, 1)},
            "torchvision": {"bbox_AP": tv_metrics["bbox_AP"], "iters": tv_iters, "cpu_s": round(tv_cpu, 1)}}
    print(f"\n{'model':14s} {'iters':>7s} {'CPU s':>8s} {'bbox AP':>8s}")
    for name, r in rows.items():
        print(f"{name:14s} {r['iters']:7d} {r['cpu_s']:8.0f} {r['bbox_AP']:8.3f}")
    rows["torchvision"]["head_convs"] = args.tv_head_convs
    out = work / f"comparison_tv{args.tv_head_convs}conv.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
