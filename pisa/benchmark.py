"""One benchmark over every detector: ``python -m pisa.benchmark [--quick] [--json OUT] [--device cpu|cuda]
[--detectors retinanet,faster_rcnn,...] [--size S] [--batch N] [--warmup W] [--repeat R]``.

For each detector whose ``model.type`` is built by ``pisa.models.MODELS`` (others are skipped with a
note), on the same random inputs in one process:

* a training step (forward, loss, backward, SGD step) of the pisa baseline, pisa with PISA (the same
  weights) and torchvision's model of the same architecture;
* inference at batch 1 and batch N of pisa (PISA changes training only) and torchvision;
* the peak memory of each during its timed runs (CPU: the rise of the process's resident set over
  the run, sampled; CUDA: ``max_memory_allocated``).

RetinaNet's torchvision counterpart is its ``RetinaNet`` class built like ``retinanet_resnet50_fpn``
(frozen-BN ResNet-50, three trainable stages) but with P6 from C5 as the reference, pisa's anchor
sizes, and pisa's weights copied in. Faster / Mask R-CNN's are torchvision's ``FasterRCNN`` /
``MaskRCNN`` on the same frozen-BN ResNet-50-FPN with the reference's proposal and detection counts,
no proposal size filter, and pisa's weights copied in (class order adapted), after the random RPN
is rescaled to give realistic proposals (:func:`calibrate_rpn`). torchvision pools with 2 samples
per bin and ``aligned=False``; pisa pools as the reference (adaptive samples, ``aligned=True``),
which costs more on large RoIs. SSD300's is torchvision's ``ssd300_vgg16`` with pisa's weights and
test thresholds.

Then data loading (pisa's training pipeline at the R-50 configs' 1333x800 scale, generated demo
images) and COCO evaluation (100 detections per image, pycocotools) per image. Every timing is a
median over ``repeat`` runs after ``warmup`` runs, the models timed in turn within each repeat so
that a slow phase of a shared machine lands on all of them alike. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

# The configs live in the repository (run from a clone, as for training).
ROOT = Path(__file__).resolve().parents[1] if (Path(__file__).resolve().parents[1] / "configs").is_dir() else Path.cwd()
NUM_CLASSES = 80


@dataclass(frozen=True)
class DetectorSpec:
    """A benchmark row: pisa configs (relative to the repository) and the torchvision counterpart."""

    name: str
    model_type: str
    baseline_config: str
    pisa_config: str | None
    torchvision: str | None  # key of TORCHVISION_BUILDERS
    pisa_target: float  # PISA / baseline training-step ratio the issue asks for
    fixed_size: int | None = None  # square input of fixed-size detectors (SSD)


DETECTORS = [
    DetectorSpec("retinanet", "retinanet", "configs/retinanet/retinanet_r50_fpn_1x_coco.yaml",
                 "configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml", "retinanet", 1.03),
    DetectorSpec("faster_rcnn", "faster_rcnn", "configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yaml",
                 "configs/pisa/pisa_faster_rcnn_r50_fpn_1x_coco.yaml", "faster_rcnn", 1.08),
    DetectorSpec("mask_rcnn", "mask_rcnn", "configs/mask_rcnn/mask_rcnn_r50_fpn_1x_coco.yaml",
                 "configs/pisa/pisa_mask_rcnn_r50_fpn_1x_coco.yaml", "mask_rcnn", 1.08),
    DetectorSpec("ssd300", "ssd", "configs/ssd/ssd300_coco.yaml", "configs/pisa/pisa_ssd300_coco.yaml",
                 "ssd300", 1.03, fixed_size=300),
    DetectorSpec("paa", "paa", "configs/paa/paa_r50_fpn_1x_coco.yaml", None, None, 1.03),
]


@dataclass
class Settings:
    device: torch.device
    size: int
    batch: int
    warmup: int
    repeat: int


@dataclass
class Row:
    """One timed comparison: medians in ms and peak memory in MiB, by model name."""

    detector: str
    phase: str
    ms: dict[str, float]
    peak_mib: dict[str, float | None] = field(default_factory=dict)
    note: str = ""


# ---- timing and memory ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                      repeat: int) -> tuple[dict[str, float], dict[str, float | None]]:
    """Median wall time (ms) of each ``fns[name]()``, run in turn within every repeat, and the peak
    memory (MiB) seen during its timed runs (see :class:`PeakMemory`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = {name: None for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - start) * 1000)
            if memory.peak_mib is not None:
                peaks[name] = max(peaks[name] or 0.0, memory.peak_mib)
    return {name: statistics.median(t) for name, t in times.items()}, peaks


class PeakMemory:
    """Peak memory of the enclosed code. CUDA: ``max_memory_allocated`` (reset on entry; weights,
    gradients and optimizer state included). CPU: how far the process's resident set rose above its
    size on entry (the run's working memory: activations, gradients, workspace; every model's weights
    are resident before), sampled every 5 ms by a thread, since the kernel's high-water mark cannot be
    reset everywhere. ``peak_mib`` is None where ``/proc/self/statm`` does not exist."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._high = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_mib() is not None:
            self._start = self._high = _rss_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._high = max(self._high, _rss_mib() or 0.0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._high, _rss_mib() or 0.0) - self._start


def _rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def environment(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


# ---- inputs and models ------------------------------------------------------------------------------


def random_batch(batch: int, size: int, device: torch.device, masks: bool, seed: int = 0):
    """``batch`` images of ``size``² with 6 random boxes each: pisa's (images, targets) and torchvision's."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets, tv_targets = [], []
    for i in range(batch):
        xy = torch.rand(6, 2, generator=g) * size * 0.7
        boxes = torch.cat([xy, (xy + 16 + torch.rand(6, 2, generator=g) * size * 0.3).clamp(max=size)], 1)
        labels = torch.randint(NUM_CLASSES, (6,), generator=g)
        target = {"boxes": boxes.to(device), "labels": labels.to(device), "ignore_boxes": torch.zeros(0, 4, device=device),
                  "image_id": i, "img_shape": (size, size), "ori_shape": (size, size), "scale_factor": (1.0, 1.0),
                  "flip": False}
        tv_target = {"boxes": target["boxes"], "labels": target["labels"]}
        if masks:
            mask = torch.zeros(6, size, size, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                mask[j, y1:y2, x1:x2] = 1
            target["masks"] = tv_target["masks"] = mask.to(device)
        targets.append(target)
        tv_targets.append(tv_target)
    return images.to(device), targets, tv_targets


def load_pisa_config(path: str, pisa_block: bool = True) -> dict:
    """A config without ImageNet weights (nothing is read or downloaded) and COCO's 80 classes."""
    from pisa.config import load_config

    cfg = load_config(str(ROOT / path), [f"model.num_classes={NUM_CLASSES}"], check_paths=False)
    backbone = cfg["model"].get("backbone")
    if isinstance(backbone, dict) and "pretrained" in backbone:
        backbone["pretrained"] = None
    if not pisa_block:
        cfg["pisa"] = None
    return cfg


def pisa_models(spec: DetectorSpec, device: torch.device) -> tuple[nn.Module, nn.Module | None, dict]:
    """The baseline and (when the detector has one) the PISA model, with the same weights."""
    from pisa.models import build_model

    base_cfg = load_pisa_config(spec.baseline_config, pisa_block=False)
    torch.manual_seed(0)
    baseline = build_model(base_cfg).to(device)
    with_pisa = None
    if spec.pisa_config and (ROOT / spec.pisa_config).exists():
        with_pisa = build_model(load_pisa_config(spec.pisa_config)).to(device)
        with_pisa.load_state_dict(baseline.state_dict())
    return baseline, with_pisa, base_cfg


def _frozen_bn_resnet50_fpn(extra_blocks=None, returned_layers=None):
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    trunk = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return _resnet_fpn_extractor(trunk, 3, returned_layers=returned_layers, extra_blocks=extra_blocks)


def _tv_transform_args(size: int) -> dict:
    # Square inputs at their own size, already normalised: the transform only batches them.
    return {"min_size": size, "max_size": size, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}


def pisa_to_torchvision_retinanet_key(name: str) -> str | None:
    """pisa RetinaNet state-dict key -> torchvision RetinaNet key (None: no counterpart, e.g. BN counters)."""
    if name.endswith("num_batches_tracked"):
        return None
    rules = [("backbone.", "backbone.body."), ("neck.lateral_convs.", "backbone.fpn.inner_blocks."),
             ("neck.output_convs.", "backbone.fpn.layer_blocks."), ("neck.p6_conv.", "backbone.fpn.extra_blocks.p6."),
             ("neck.p7_conv.", "backbone.fpn.extra_blocks.p7."), ("head.cls_convs.", "head.classification_head.conv."),
             ("head.reg_convs.", "head.regression_head.conv."),
             ("head.cls_logits.", "head.classification_head.cls_logits."),
             ("head.bbox_reg.", "head.regression_head.bbox_reg.")]
    for src, dst in rules:
        if name.startswith(src):
            rest = name[len(src):]
            if src.endswith("_convs.") and "." in rest:  # torchvision wraps each conv: "i.weight" -> "i.0.weight"
                index, param = rest.split(".", 1)
                rest = f"{index}.0.{param}"
            return dst + rest
    raise KeyError(f"no torchvision counterpart for pisa RetinaNet key {name}")


def torchvision_retinanet(cfg: dict, pisa_model: nn.Module, size: int) -> tuple[nn.Module, bool]:
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    m = cfg["model"]
    width = m["neck"]["out_channels"]
    backbone = _frozen_bn_resnet50_fpn(LastLevelP6P7(2048, width), returned_layers=[2, 3, 4])  # P6 from C5
    a = m["anchors"]
    octave = [a["octave_base_scale"] * 2 ** (i / a["scales_per_octave"]) for i in range(a["scales_per_octave"])]
    sizes = tuple(tuple(s * o for o in octave) for s in a["strides"])
    anchors = AnchorGenerator(sizes, (tuple(a["ratios"]),) * len(sizes))
    model = RetinaNet(backbone, NUM_CLASSES, anchor_generator=anchors, detections_per_img=m["test"]["max_per_img"],
                      **_tv_transform_args(size))
    state = {}
    for key, value in pisa_model.state_dict().items():
        tv_key = pisa_to_torchvision_retinanet_key(key)
        if tv_key is not None:
            state[tv_key] = value
    model.load_state_dict(state, strict=True)
    return model, True


def two_stage_state_for_torchvision(pisa_state: dict, tv_state: dict, num_classes: int) -> dict:
    """pisa's Faster / Mask R-CNN state dict in torchvision's names, for ``tv_state``'s model.

    torchvision's background is class 0 and it has background box rows and a background mask channel:
    the classifier rows move from last to first, the extra rows are zero (never used by torchvision's
    losses or post-processing). Raises ``KeyError`` unless every torchvision tensor is covered.
    """
    fixed = {"backbone.": "backbone.body.", "rpn.head.rpn_conv.": "rpn.head.conv.0.0.",
             "rpn.head.rpn_cls.": "rpn.head.cls_logits.", "rpn.head.rpn_reg.": "rpn.head.bbox_pred.",
             "roi_head.bbox_head.shared_fcs.0.": "roi_heads.box_head.fc6.",
             "roi_head.bbox_head.shared_fcs.1.": "roi_heads.box_head.fc7.",
             "roi_head.bbox_head.fc_cls.": "roi_heads.box_predictor.cls_score.",
             "roi_head.bbox_head.fc_reg.": "roi_heads.box_predictor.bbox_pred.",
             "roi_head.mask_head.upsample.": "roi_heads.mask_predictor.conv5_mask.",
             "roi_head.mask_head.conv_logits.": "roi_heads.mask_predictor.mask_fcn_logits."}
    for i in range(4):
        fixed[f"neck.lateral_convs.{i}."] = f"backbone.fpn.inner_blocks.{i}.0."
        fixed[f"neck.output_convs.{i}."] = f"backbone.fpn.layer_blocks.{i}.0."
        fixed[f"roi_head.mask_head.convs.{i}."] = f"roi_heads.mask_head.{i}.0."
    out = {}
    for key, value in pisa_state.items():
        if key.endswith("num_batches_tracked"):  # FrozenBatchNorm2d keeps no counter
            continue
        prefix = max((p for p in fixed if key.startswith(p)), key=len, default=None)
        if prefix is None:
            raise KeyError(f"no torchvision counterpart for pisa two-stage key {key}")
        out[fixed[prefix] + key[len(prefix):]] = value
    c = num_classes
    cls_w, cls_b = "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias"
    out[cls_w], out[cls_b] = torch.cat([out[cls_w][c:], out[cls_w][:c]]), torch.cat([out[cls_b][c:], out[cls_b][:c]])
    for name in ("weight", "bias"):
        key = f"roi_heads.box_predictor.bbox_pred.{name}"
        out[key] = torch.cat([torch.zeros_like(out[key][:4]), out[key]])
        key = f"roi_heads.mask_predictor.mask_fcn_logits.{name}"
        if key in out:
            out[key] = torch.cat([torch.zeros_like(out[key][:1]), out[key]])
    missing, unexpected = set(tv_state) - set(out), set(out) - set(tv_state)
    if missing or unexpected:
        raise KeyError(f"weight copy to torchvision: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return out


@torch.no_grad()
def calibrate_rpn(model: nn.Module, images: torch.Tensor) -> None:
    """Rescale a random two-stage model's RPN output convs: objectness logits of std 1, deltas of std 0.1.

    A randomly initialised ResNet-50 gives features of large magnitude, so untouched random weights
    saturate every objectness score at 1.0 and clamp the deltas at ±4.1: most proposals come out as
    zero-width slivers at the image border, which torchvision's RPN drops and pisa's keeps (the
    reference has no size filter), and which pool nothing. Rescaled, the proposals are perturbed
    anchors of every level, as in a trained model, and both libraries pool the same number of RoIs.
    """
    was_training = model.training
    model.eval()
    hidden = [torch.relu(model.rpn.head.rpn_conv(f)) for f in model.neck(model.backbone(images))]
    for conv, target in ((model.rpn.head.rpn_cls, 1.0), (model.rpn.head.rpn_reg, 0.1)):
        conv.weight.mul_(target / torch.cat([conv(h).flatten() for h in hidden]).std())
    model.train(was_training)


def torchvision_two_stage(mask: bool) -> Callable[[dict, nn.Module, int], tuple[nn.Module, bool]]:
    def build(cfg: dict, pisa_model: nn.Module, size: int) -> tuple[nn.Module, bool]:
        from torchvision.models.detection import FasterRCNN, MaskRCNN

        rpn, roi = cfg["model"]["rpn"], cfg["model"]["roi_head"]
        cls = MaskRCNN if mask else FasterRCNN
        # The reference's counts: train 2000 per level, 1000 kept; test 1000 / 1000; 512 RoIs at 1/4.
        model = cls(_frozen_bn_resnet50_fpn(), NUM_CLASSES + 1, rpn_pre_nms_top_n_train=rpn["train"]["nms_pre"],
                    rpn_post_nms_top_n_train=rpn["train"]["max_per_img"], rpn_pre_nms_top_n_test=rpn["test"]["nms_pre"],
                    rpn_post_nms_top_n_test=rpn["test"]["max_per_img"], box_score_thresh=roi["test"]["score_thr"],
                    box_nms_thresh=roi["test"]["nms_iou"], box_detections_per_img=roi["test"]["max_per_img"],
                    **_tv_transform_args(size))
        model.rpn.min_size = 0.0  # the reference keeps proposals of any size
        model.load_state_dict(two_stage_state_for_torchvision(pisa_model.state_dict(), model.state_dict(),
                                                              NUM_CLASSES))
        return model, True
    return build


def ssd_state_for_torchvision(pisa_state: dict, tv_state: dict, num_classes: int) -> dict:
    """pisa's SSD300 VGG16 state dict in the names of torchvision's ``ssd300_vgg16``.

    conv1_1..conv4_3 keep their indices; conv5_x, conv6 and conv7 sit in torchvision's first extra
    block; the L2 scale is ``backbone.scale_weight``; pisa's extra convs come in (1x1, 3x3) pairs, one
    torchvision block each. The class convs' channels are ``anchor · (C + 1) + class`` in both, with
    the background last in pisa and first in torchvision, so each anchor's block is rotated. Raises
    ``KeyError`` unless every torchvision tensor is covered.
    """
    out = {}
    for key, value in pisa_state.items():
        part, _, rest = key.partition(".")
        if part == "backbone":
            group, _, tail = rest.partition(".")
            if group == "l2_norm":
                out["backbone.scale_weight"] = value
                continue
            index, _, name = tail.partition(".")
            i = int(index)
            if group == "features":
                conv5 = {24: "extra.0.1", 26: "extra.0.3", 28: "extra.0.5", 31: "extra.0.7.1", 33: "extra.0.7.3"}
                out[f"backbone.{conv5.get(i, f'features.{i}')}.{name}"] = value
            elif group == "extra":
                out[f"backbone.extra.{i // 2 + 1}.{2 * (i % 2)}.{name}"] = value
            else:
                raise KeyError(f"no torchvision counterpart for pisa SSD key {key}")
        elif key.startswith("head.cls_convs."):
            level, name = key[len("head.cls_convs."):].split(".")
            blocks = value.reshape(-1, num_classes + 1, *value.shape[1:])
            out[f"head.classification_head.module_list.{level}.{name}"] = torch.cat(
                [blocks[:, num_classes:], blocks[:, :num_classes]], 1).reshape(value.shape)
        elif key.startswith("head.reg_convs."):
            out["head.regression_head.module_list." + key[len("head.reg_convs."):]] = value
        else:
            raise KeyError(f"no torchvision counterpart for pisa SSD key {key}")
    missing, unexpected = set(tv_state) - set(out), set(out) - set(tv_state)
    if missing or unexpected:
        raise KeyError(f"weight copy to torchvision: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return out


def torchvision_ssd300(cfg: dict, pisa_model: nn.Module, size: int) -> tuple[nn.Module, bool]:
    """torchvision's ``ssd300_vgg16`` with pisa's weights and test thresholds. Its default boxes are
    pisa's, in the same order, except that a side longer than the image is cut to the image's; it
    keeps 400 candidates per class before NMS."""
    from torchvision.models.detection import ssd300_vgg16

    test = cfg["model"]["test"]
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
                         image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], score_thresh=test["score_thr"],
                         nms_thresh=test["nms_iou"], detections_per_img=test["max_per_img"])
    model.load_state_dict(ssd_state_for_torchvision(pisa_model.state_dict(), model.state_dict(), NUM_CLASSES))
    return model, True


TORCHVISION_BUILDERS = {"retinanet": torchvision_retinanet, "faster_rcnn": torchvision_two_stage(False),
                        "mask_rcnn": torchvision_two_stage(True), "ssd300": torchvision_ssd300}


def train_step(model: nn.Module, images, targets, every_value_is_a_loss: bool = False) -> Callable[[], None]:
    """One SGD step on a fixed batch (pisa: tensor + targets; torchvision: list of images + targets).

    pisa's loss dicts may carry logged statistics besides the ``loss_*`` terms; torchvision's hold
    losses only, some not named ``loss_*`` (``classification``, ``bbox_regression``)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(v for k, v in losses.items() if every_value_is_a_loss or k.startswith("loss")).backward()
        optimizer.step()
    return step


def inference(model: nn.Module, *args) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(*args)
    return run


# ---- the benchmark ----------------------------------------------------------------------------------


def bench_detector(spec: DetectorSpec, s: Settings) -> list[Row]:
    """Training-step and inference rows of one detector (see the module doc)."""
    size = spec.fixed_size or s.size
    images, targets, tv_targets = random_batch(s.batch, size, s.device, masks=spec.model_type == "mask_rcnn")
    baseline, with_pisa, cfg = pisa_models(spec, s.device)
    if spec.model_type in ("faster_rcnn", "mask_rcnn"):
        calibrate_rpn(baseline, images)
        if with_pisa is not None:
            with_pisa.load_state_dict(baseline.state_dict())
    tv, same_weights = (None, False)
    if spec.torchvision:
        tv, same_weights = TORCHVISION_BUILDERS[spec.torchvision](cfg, baseline, size)
        tv = tv.to(s.device)
    note = "" if tv is None else ("torchvision with pisa's weights" if same_weights
                                  else "torchvision with its own random init (no weight mapping)")
    steps = {"pisa baseline": train_step(baseline, images, targets)}
    if with_pisa is not None:
        steps["pisa PISA"] = train_step(with_pisa, images, targets)
    if tv is not None:
        steps["torchvision"] = train_step(tv, list(images), tv_targets, every_value_is_a_loss=True)
    rows = [_row(spec.name, f"train step, batch {s.batch}", steps, s, note)]
    for batch in sorted({1, s.batch}):
        runs = {"pisa": inference(baseline, images[:batch], targets[:batch])}
        if tv is not None:
            runs["torchvision"] = inference(tv, list(images[:batch]))
        rows.append(_row(spec.name, f"inference, batch {batch}", runs, s, note))
    return rows


def _row(detector: str, phase: str, fns: dict[str, Callable[[], None]], s: Settings, note: str) -> Row:
    ms, peaks = timed_interleaved(fns, s.device, s.warmup, s.repeat)
    row = Row(detector, phase, ms, peaks, note)
    print(format_row(row), flush=True)
    return row


def bench_data_and_eval(s: Settings, num_images: int) -> list[Row]:
    """Per-image time of pisa's training data pipeline and of COCO evaluation, on generated demo data."""
    from pisa.data import build_dataloader, build_dataset
    from pisa.data.synthetic import ensure_demo_dataset
    from pisa.engine.evaluator import CocoEvaluator

    cfg = load_pisa_config(DETECTORS[0].baseline_config)
    with tempfile.TemporaryDirectory() as tmp:
        paths = ensure_demo_dataset(Path(tmp) / "demo", num_train=num_images, num_val=num_images)
        split = {"type": "coco", "ann_file": paths["train_ann"], "img_dir": paths["train_img_dir"]}
        dataset = build_dataset(split, cfg["data"], train=True)
        loader = build_dataloader(dataset, batch_size=2, workers=0, train=True, seed=0)

        def load_all() -> None:
            for _ in loader:
                pass
        load_ms = timed_interleaved({"pisa": load_all}, torch.device("cpu"), 1, s.repeat)[0]["pisa"]
        val = build_dataset({"type": "coco", "ann_file": paths["val_ann"], "img_dir": paths["val_img_dir"]},
                            cfg["data"], train=False)
        evaluator = CocoEvaluator(val.ann_file, val.label_to_cat_id, val.class_names, ["bbox"])
        detections = _fake_detections(val)

        def evaluate_all() -> None:
            evaluator.reset()
            evaluator.add(list(detections), list(detections.values()))
            evaluator.gather()
            evaluator.evaluate(None)
        eval_ms = timed_interleaved({"pisa": evaluate_all}, torch.device("cpu"), 1, s.repeat)[0]["pisa"]
    count = len(loader) * 2
    rows = [Row("all", "data loading per image (1333x800 training pipeline, 0 workers)", {"pisa": load_ms / count}),
            Row("all", "COCO bbox evaluation per image (100 detections)", {"pisa": eval_ms / len(val)})]
    for row in rows:
        print(format_row(row), flush=True)
    return rows


def _fake_detections(dataset) -> dict[int, dict[str, torch.Tensor]]:
    """100 detections per val image: its GT boxes jittered, then random boxes; random scores."""
    import numpy as np

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(dataset.ann_file)
    g = torch.Generator().manual_seed(0)
    out = {}
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        gts = [a["bbox"] for a in coco.imgToAnns[image_id]]
        boxes = torch.tensor(np.array(gts, dtype=np.float32).reshape(-1, 4))
        boxes[:, 2:] += boxes[:, :2]
        xy = torch.rand(100, 2, generator=g) * torch.tensor([info["width"], info["height"]]) * 0.8
        extra = torch.cat([xy, xy + 8 + torch.rand(100, 2, generator=g) * 40], 1)
        boxes = torch.cat([boxes + torch.randn(boxes.shape, generator=g), extra])[:100]
        out[image_id] = {"boxes": boxes, "scores": torch.rand(100, generator=g)[:len(boxes)],
                         "labels": torch.randint(len(dataset.class_names), (len(boxes),), generator=g)}
    return out


# ---- report -----------------------------------------------------------------------------------------


def format_row(row: Row) -> str:
    cells = "  ".join(f"{name} {ms:9.1f} ms" + (f" (+{row.peak_mib[name]:.0f} MiB)" if row.peak_mib.get(name) is not None else "")
                      for name, ms in row.ms.items())
    return f"{row.detector:12s} {row.phase:44s} {cells}"


def ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """pisa / torchvision for every row with both; PISA / baseline for training steps."""
    out = []
    for row in rows:
        pisa_ms = row.ms.get("pisa", row.ms.get("pisa baseline"))
        if "torchvision" in row.ms and pisa_ms is not None:
            out.append({"detector": row.detector, "phase": row.phase, "ratio": "pisa / torchvision",
                        "value": pisa_ms / row.ms["torchvision"], "target": 1.0})
            if "pisa PISA" in row.ms:
                out.append({"detector": row.detector, "phase": row.phase, "ratio": "pisa PISA / torchvision",
                            "value": row.ms["pisa PISA"] / row.ms["torchvision"], "target": 1.0})
        if "pisa PISA" in row.ms:
            target = next(spec.pisa_target for spec in DETECTORS if spec.name == row.detector)
            out.append({"detector": row.detector, "phase": row.phase, "ratio": "PISA / baseline",
                        "value": row.ms["pisa PISA"] / row.ms["pisa baseline"], "target": target})
    return out


def closing_note(measured: list[dict[str, Any]], skipped: list[str]) -> str:
    lines = ["", "ratios (target: at most the given value)"]
    for r in measured:
        verdict = "holds" if r["value"] <= r["target"] else "misses"
        lines.append(f"  {r['detector']:12s} {r['phase']:24s} {r['ratio']:24s} {r['value']:6.3f}  "
                     f"(target <= {r['target']:.2f}: {verdict})")
    lines += [f"  skipped: {note}" for note in skipped]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pisa.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and few repeats (minutes on a CPU)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--detectors", default=",".join(spec.name for spec in DETECTORS),
                        help="comma-separated subset of " + ", ".join(spec.name for spec in DETECTORS))
    parser.add_argument("--size", type=int, help="square input side (default: 192 quick, 512 otherwise; SSD: 300)")
    parser.add_argument("--batch", type=int, default=2, help="training and batch-N inference batch size")
    parser.add_argument("--warmup", type=int, help="untimed runs per model (default: 1 quick, 2 otherwise)")
    parser.add_argument("--repeat", type=int, help="timed runs per model (default: 3 quick, 5 otherwise)")
    parser.add_argument("--data-images", type=int, help="demo images for the data and evaluation rows")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry; returns what ``--json`` writes (environment, settings, rows, ratios, skipped)."""
    from pisa.models import MODELS

    # Random-weight models drift into denormal floats after a few steps; denormal arithmetic is several
    # times slower on CPUs and would be timed instead of the models.
    torch.set_flush_denormal(True)

    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available; use --device cpu")
    s = Settings(torch.device(args.device), args.size or (192 if args.quick else 512), args.batch,
                 args.warmup if args.warmup is not None else (1 if args.quick else 2),
                 args.repeat if args.repeat is not None else (3 if args.quick else 5))
    env = environment(s.device)
    print(" ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    print(f"settings: {s.size}x{s.size} inputs (SSD300: 300x300), batch {s.batch}, {NUM_CLASSES} classes, "
          f"random weights, median of {s.repeat} after {s.warmup} warm-up run(s)\n")
    wanted = args.detectors.split(",")
    rows, skipped = [], []
    for spec in DETECTORS:
        if spec.name not in wanted:
            continue
        reason = _skip_reason(spec, MODELS)
        if reason:
            skipped.append(f"{spec.name}: {reason}")
            print(f"{spec.name:12s} skipped: {reason}", flush=True)
            continue
        rows += bench_detector(spec, s)
        gc.collect()
    rows += bench_data_and_eval(s, args.data_images or (8 if args.quick else 32))
    measured = ratios(rows)
    print(closing_note(measured, skipped))
    result = {"environment": env, "settings": {**asdict(s), "device": str(s.device)},
              "rows": [asdict(r) for r in rows], "ratios": measured, "skipped": skipped}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return result


def _skip_reason(spec: DetectorSpec, models: dict) -> str | None:
    if spec.model_type not in models:
        return f"model.type {spec.model_type!r} is not built by pisa.models.MODELS yet"
    if not (ROOT / spec.baseline_config).exists():
        return f"config {spec.baseline_config} does not exist yet"
    return None


if __name__ == "__main__":
    main()
