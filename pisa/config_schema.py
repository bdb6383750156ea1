"""The config schema: every key an experiment may set, with its type, default, range and doc.

Plain data built from three node kinds: :class:`Key` (a value), :class:`Section` (a mapping of named
nodes) and :class:`Variants` (a mapping whose ``type`` picks one of several sections, e.g. the model).
:mod:`pisa.config` validates configs against :data:`SCHEMA` and fills in its defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

class ConfigError(ValueError):
    """A config that cannot be used; the message names the key or file and what to do."""


REQUIRED = "<required>"  # sentinel default: the key must be given


@dataclasses.dataclass(frozen=True)
class Key:
    """One value. ``types`` from: null, bool, int, float (ints accepted and converted), str, list.

    ``min``/``max`` bound numbers (strictly if ``exclusive``); ``choices`` restricts strings;
    ``items``/``length``/``min_len`` describe lists; ``path`` ("file" or "dir") requires a string value to
    name an existing path unless it is one of ``keywords``.
    """

    types: tuple[str, ...]
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    exclusive: bool = False
    items: "Key | None" = None
    length: int | None = None
    min_len: int = 1
    path: str | None = None
    keywords: tuple = ()


@dataclasses.dataclass(frozen=True)
class Section:
    """A mapping with fixed keys. ``optional``: may be null, and is null when absent (feature off)."""

    keys: dict
    doc: str = ""
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Variants:
    """A mapping whose ``type`` key picks one of several sections (one per registered builder)."""

    options: dict
    doc: str = ""


Spec = Union[Key, Section, Variants]


def _num(default, doc, **kw) -> Key:
    return Key(("float",), default, doc, **kw)


def _int(default, doc, **kw) -> Key:
    return Key(("int",), default, doc, **kw)


def _flag(default, doc) -> Key:
    return Key(("bool",), default, doc)


def _choice(default, choices, doc, nullable=False) -> Key:
    return Key(("null", "str") if nullable else ("str",), default, doc, choices=tuple(choices))


def _list(item: Key, default, doc, length=None, min_len=1) -> Key:
    return Key(("list",), default, doc, items=item, length=length, min_len=min_len)


_PROB = dict(min=0.0, max=1.0)
_SCALE = Key(("list",), items=Key(("int",), min=1), length=2, doc="[long side, short side]")

# Every detector's class count: a number, or "auto" (the default) for the training set's category count.
NUM_CLASSES = Key(("int", "str"), "auto", "number of object classes K (no background), or auto: the "
                  "training set's category count", choices=("auto",), min=1)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x4d")

RETINANET = Section({
    "num_classes": NUM_CLASSES,
    "backbone": Section({
        "type": _choice("resnet50", BACKBONES, "backbone architecture"),
        "frozen_stages": _int(1, "stages frozen from the stem: -1 none, 0 stem, 1 stem + stage 1, ...",
                              min=-1, max=4),
        "norm_eval": _flag(True, "keep BatchNorm statistics frozen while training"),
        "pretrained": Key(("null", "str"), None, 'ImageNet weights: null, "torchvision", or a .pth path',
                          path="file", keywords=("torchvision",)),
    }, "ResNet / ResNeXt feature extractor"),
    "neck": Section({"out_channels": _int(256, "FPN channels", min=1)}, "FPN P3-P7"),
    "head": Section({
        "feat_channels": _int(256, "channels of the conv towers", min=1),
        "stacked_convs": _int(4, "convs per tower", min=0),
        "prior_prob": _num(0.01, "initial foreground probability of the classifier", min=0.0, max=1.0,
                           exclusive=True),
    }, "classification and box towers"),
    "anchors": Section({
        "strides": _list(Key(("int",), min=1), [8, 16, 32, 64, 128], "stride of each FPN level"),
        "octave_base_scale": _num(4.0, "anchor size at a level = stride * this * octave scale", min=0.0,
                                  exclusive=True),
        "scales_per_octave": _int(3, "octave scales per location", min=1),
        "ratios": _list(Key(("float",), min=0.0, exclusive=True), [0.5, 1.0, 2.0], "aspect ratios h/w"),
    }, "anchor generator"),
    "coder": Section({
        "means": _list(Key(("float",)), [0.0] * 4, "delta means (dx, dy, dw, dh)", length=4),
        "stds": _list(Key(("float",), min=0.0, exclusive=True), [1.0] * 4, "delta stds", length=4),
    }, "box delta coder"),
    "assigner": Section({
        "pos_iou_thr": _num(0.5, "IoU at or above which an anchor is positive", **_PROB),
        "neg_iou_thr": _num(0.4, "IoU below which an anchor is negative", **_PROB),
        "min_pos_iou": _num(0.0, "least IoU for a low-quality match", **_PROB),
        "match_low_quality": _flag(True, "give each GT its best anchors even below pos_iou_thr"),
        "ignore_iof_thr": _num(-1.0, ">0: ignore anchors covered by a crowd box beyond this IoF"),
    }, "max-IoU anchor assignment"),
    "loss_cls": Section({
        "alpha": _num(0.25, "focal loss alpha", **_PROB),
        "gamma": _num(2.0, "focal loss gamma", min=0.0),
        "weight": _num(1.0, "loss weight", min=0.0),
    }, "sigmoid focal loss"),
    "loss_bbox": Section({
        "type": _choice("l1", ("l1", "smooth_l1"), "box regression loss"),
        "beta": _num(0.11, "smooth_l1 only: transition point", min=0.0, exclusive=True),
        "weight": _num(1.0, "loss weight", min=0.0),
    }, "box regression loss"),
    "test": Section({
        "nms_pre": _int(1000, "top anchors per level kept before NMS", min=1),
        "score_thr": _num(0.05, "least score of a detection", **_PROB),
        "nms_iou": _num(0.5, "NMS IoU threshold", **_PROB),
        "max_per_img": _int(100, "detections kept per image", min=1),
        "topk_rule": _choice("v2", ("v2", "v3"), "per-level candidates: v2 = top nms_pre anchors by max class "
                             "score (the published checkpoints' rule); v3 = top nms_pre (anchor, class) pairs "
                             "above score_thr (mmdetection 3.x)"),
        "min_bbox_size": _num(0.0, "keep boxes wider and taller than this (original-image pixels); 0 drops "
                              "zero-size boxes, negative keeps all (mmdetection v2's RetinaNet)"),
    }, "inference post-processing"),
}, "RetinaNet")

# ---- two-stage detectors (Faster / Mask R-CNN) ---------------------------------------------------


def _proposals(nms_pre: int, max_per_img: int, doc: str) -> Section:
    return Section({
        "nms_pre": _int(nms_pre, "top anchors per level kept before NMS", min=1),
        "max_per_img": _int(max_per_img, "proposals kept per image after NMS", min=1),
        "nms_iou": _num(0.7, "NMS IoU threshold (levels never suppress each other)", **_PROB),
    }, doc)


def _rcnn_assigner(match_low_quality: bool) -> Section:
    return Section({
        "pos_iou_thr": _num(0.5, "IoU at or above which a proposal is positive", **_PROB),
        "neg_iou_thr": _num(0.5, "IoU below which a proposal is negative", **_PROB),
        "min_pos_iou": _num(0.5, "least IoU for a low-quality match", **_PROB),
        "match_low_quality": _flag(match_low_quality, "give each GT its best proposals even below pos_iou_thr"),
    }, "max-IoU proposal assignment")


_RCNN_BBOX_LOSS = Section({
    "type": _choice("l1", ("l1", "smooth_l1"), "box regression loss (PISA configs: smooth_l1)"),
    "beta": _num(1.0, "smooth_l1 (and CARL) only: transition point", min=0.0, exclusive=True),
    "weight": _num(1.0, "loss weight", min=0.0),
}, "box regression loss on the positives' GT-class deltas")

RPN = Section({
    "feat_channels": _int(256, "channels of the shared 3x3 conv", min=1),
    "anchors": Section({
        "strides": _list(Key(("int",), min=1), [4, 8, 16, 32, 64], "stride of each FPN level P2-P6"),
        "scales": _list(Key(("float",), min=0.0, exclusive=True), [8.0], "anchor size = stride * scale"),
        "ratios": _list(Key(("float",), min=0.0, exclusive=True), [0.5, 1.0, 2.0], "aspect ratios h/w"),
    }, "anchor generator"),
    "coder": RETINANET.keys["coder"],
    "assigner": Section({
        "pos_iou_thr": _num(0.7, "IoU at or above which an anchor is positive", **_PROB),
        "neg_iou_thr": _num(0.3, "IoU below which an anchor is negative", **_PROB),
        "min_pos_iou": _num(0.3, "least IoU for a low-quality match", **_PROB),
        "match_low_quality": _flag(True, "give each GT its best anchors even below pos_iou_thr"),
    }, "max-IoU anchor assignment"),
    "sampler": Section({
        "num": _int(256, "anchors sampled per image", min=1),
        "pos_fraction": _num(0.5, "largest fraction of positives", **_PROB),
    }, "random anchor sampler"),
    "loss_cls": Section({"weight": _num(1.0, "loss weight", min=0.0)}, "sigmoid BCE objectness loss"),
    "loss_bbox": Section({
        "type": _choice("l1", ("l1", "smooth_l1"), "box regression loss"),
        "beta": _num(1.0, "smooth_l1 only: transition point", min=0.0, exclusive=True),
        "weight": _num(1.0, "loss weight", min=0.0),
    }, "box regression loss"),
    "train": _proposals(2000, 1000, "proposals while training (PISA configs: 2000 / 2000)"),
    "test": _proposals(1000, 1000, "proposals at test time (PISA configs: 2000 / 2000)"),
}, "region proposal network on P2-P6")


def _roi_head(mask: bool) -> Section:
    keys = {
        "roi_size": _int(7, "RoIAlign output side of the box branch", min=1),
        "sampling_ratio": _int(0, "RoIAlign samples per bin side (0: adaptive)", min=0),
        "finest_scale": _num(56.0, "RoI level = floor(log2(sqrt(area) / finest_scale)), clamped to P2-P5",
                             min=0.0, exclusive=True),
        "fc_channels": _int(1024, "width of the two shared FCs", min=1),
        "coder": Section({
            "means": _list(Key(("float",)), [0.0] * 4, "delta means (dx, dy, dw, dh)", length=4),
            "stds": _list(Key(("float",), min=0.0, exclusive=True), [0.1, 0.1, 0.2, 0.2], "delta stds",
                          length=4),
        }, "box delta coder"),
        "assigner": _rcnn_assigner(match_low_quality=mask),
        "sampler": Section({
            "num": _int(512, "RoIs sampled per image", min=1),
            "pos_fraction": _num(0.25, "largest fraction of positives", **_PROB),
            "neg_pos_ub": _int(-1, "at most this many negatives per positive (-1: no bound)", min=-1),
            "add_gt": _flag(True, "prepend the GT boxes to the proposals (forced positives)"),
        }, "RoI sampler: random, or Score-HLR when pisa.isr_n is set"),
        "loss_cls": Section({"weight": _num(1.0, "loss weight", min=0.0)}, "softmax cross-entropy"),
        "loss_bbox": _RCNN_BBOX_LOSS,
        "test": Section({
            "score_thr": _num(0.05, "least score of a detection", **_PROB),
            "nms_iou": _num(0.5, "per-class NMS IoU threshold", **_PROB),
            "max_per_img": _int(100, "detections kept per image", min=1),
            **({"mask_thr": _num(0.5, "mask probability at or above which a pixel is in", **_PROB)}
               if mask else {}),
        }, "inference post-processing"),
    }
    if mask:
        keys["mask"] = Section({
            "roi_size": _int(14, "RoIAlign output side of the mask branch (masks are twice this)", min=1),
            "num_convs": _int(4, "3x3 convs before the deconvolution", min=0),
            "conv_channels": _int(256, "channels of the mask convs", min=1),
            "loss_weight": _num(1.0, "weight of loss_mask", min=0.0),
        }, "mask branch")
    return Section(keys, "second stage: RoIAlign, box head" + (", mask head" if mask else ""))


def _two_stage(mask: bool) -> Section:
    return Section({
        "num_classes": RETINANET.keys["num_classes"],
        "backbone": RETINANET.keys["backbone"],
        "neck": Section({"out_channels": _int(256, "FPN channels", min=1)}, "FPN P2-P6"),
        "rpn": RPN,
        "roi_head": _roi_head(mask),
    }, "Mask R-CNN" if mask else "Faster R-CNN")


FASTER_RCNN = _two_stage(mask=False)
MASK_RCNN = _two_stage(mask=True)

# ---- SSD (VGG16) ------------------------------------------------------------------------------------

SSD = Section({
    "num_classes": RETINANET.keys["num_classes"],
    "input_size": _int(300, "square input side the anchors are laid out for (SSD300: 300, SSD512: 512); "
                       "data.ssd_transforms.size should match", min=1),
    "backbone": Section({
        "type": _choice("vgg16", ("vgg16",), "backbone architecture"),
        "width": _num(1.0, "channel multiplier of every layer (1: VGG16; smaller: CPU-sized demo models)",
                      min=0.0, exclusive=True),
        "extra_layers": Key(("null", "list"), None, "[out_channels, kernel, stride, padding] of each conv after "
                            "conv7, in (1x1, 3x3 tap) pairs; null: the reference layout of input_size",
                            items=Key(("list",), items=Key(("int",), min=0), length=4)),
        "l2_norm_scale": _num(20.0, "initial scale of the L2-normalised conv4_3 map", min=0.0, exclusive=True),
        "pretrained": Key(("null", "str"), None, 'ImageNet weights of the 13 VGG16 convs: null, "torchvision", '
                          "or a .pth path (torchvision vgg16 layout)", path="file", keywords=("torchvision",)),
    }, "VGG16 with ceil-mode pools, dilated conv6, conv7, L2-normalised conv4_3 and extra layers"),
    "anchors": Section({
        "strides": _list(Key(("int",), min=1), [8, 16, 32, 64, 100, 300],
                         "stride of each feature level (anchor centres at (i + 0.5) * stride)"),
        "ratios": _list(_list(Key(("float",), min=0.0, exclusive=True), None, "ratios", min_len=0),
                        [[2], [2, 3], [2, 3], [2, 3], [2], [2]], "extra aspect ratios r of each level "
                        "(anchors h/w = 1/r and r besides the two squares)"),
        "ratio_range": _list(Key(("float",), min=0.0), [0.15, 0.9], "min and max anchor size over input_size "
                             "(SSD300 0.15-0.9, SSD512 0.1-0.9), plus the smaller first level", length=2),
    }, "SSD anchor generator"),
    "coder": Section({
        "means": _list(Key(("float",)), [0.0] * 4, "delta means (dx, dy, dw, dh)", length=4),
        "stds": _list(Key(("float",), min=0.0, exclusive=True), [0.1, 0.1, 0.2, 0.2], "delta stds", length=4),
    }, "box delta coder"),
    "assigner": Section({
        "pos_iou_thr": _num(0.5, "IoU at or above which an anchor is positive", **_PROB),
        "neg_iou_thr": _num(0.5, "IoU below which an anchor is negative", **_PROB),
        "min_pos_iou": _num(0.0, "least IoU for a low-quality match", **_PROB),
        "match_low_quality": _flag(True, "give each GT its best anchor even below pos_iou_thr"),
        "gt_max_assign_all": _flag(False, "low-quality match: every anchor tying a GT's best IoU (false: "
                                   "only the first, as SSD)"),
        "ignore_iof_thr": _num(-1.0, ">0: ignore anchors covered by a crowd box beyond this IoF"),
    }, "max-IoU anchor assignment"),
    "loss_cls": Section({
        "neg_pos_ratio": _num(3.0, "hard negatives kept per positive in each image", min=0.0),
    }, "softmax cross-entropy with hard negative mining"),
    "loss_bbox": Section({
        "beta": _num(1.0, "smooth L1 (and CARL) transition point", min=0.0, exclusive=True),
        "weight": _num(1.0, "loss weight", min=0.0),
    }, "smooth L1 box regression loss"),
    "test": Section({
        "nms_pre": _int(0, "top anchors per level kept before NMS (0: all, as the v2.0 reference; "
                        "later releases 1000)", min=0),
        "score_thr": _num(0.02, "least score of a detection", **_PROB),
        "nms_iou": _num(0.45, "per-class NMS IoU threshold", **_PROB),
        "max_per_img": _int(200, "detections kept per image", min=1),
    }, "inference post-processing"),
}, "SSD300 / SSD512")

SSD_TRANSFORMS = Section({
    "size": _int(300, "side of the square every image is resized to (aspect ratio not kept)", min=1),
    "flip_prob": _num(0.5, "horizontal flip probability", **_PROB),
    "photometric": _flag(True, "random brightness, contrast, saturation, hue and channel order"),
    "expand_ratio": _list(Key(("float",), min=1.0), [1.0, 4.0], "zoom-out canvas size range (mean-filled); "
                          "applied with probability 0.5", length=2),
    "min_ious": _list(Key(("float",), **_PROB), [0.1, 0.3, 0.5, 0.7, 0.9], "random crop: the least IoU of the "
                      "crop with every box, one drawn per image (or no crop, or any crop)", min_len=0),
    "min_crop_size": _num(0.3, "random crop: least side as a fraction of the image side", **_PROB),
}, "data.pipeline: ssd only: the SSD training augmentation (test: resize and normalise)")

_DATASET_OPTIONS = {
    "filter_empty": _flag(False, "training only: drop images without usable annotations"),
    "with_masks": _flag(False, "decode instance masks"),
    "on_error": _choice("raise", ("raise", "skip"), "on an unreadable image or a bad annotation"),
}
_DATASETS = {
    "coco": Section({
        "ann_file": Key(("str",), REQUIRED, "COCO instances JSON", path="file"),
        "img_dir": Key(("str",), REQUIRED, "directory of the images", path="dir"),
        **_DATASET_OPTIONS,
    }, "COCO-format dataset"),
    "synthetic": Section({
        "split": _choice("train", ("train", "val"), "which split of the embedded demo data"),
        "root": Key(("null", "str"), None, "folder the demo data is written to (null: default cache)"),
        **_DATASET_OPTIONS,
    }, "embedded demo data (generated once, COCO format)"),
}

# PAA (method doc §8.1): the mmdetection v2 head's settings are the defaults.
PAA = Section({
    "num_classes": RETINANET.keys["num_classes"],
    "backbone": RETINANET.keys["backbone"],
    "neck": Section({"out_channels": _int(256, "FPN channels", min=1)}, "FPN P3-P7, P6 from the P5 output"),
    "head": Section({
        "feat_channels": _int(256, "channels of the conv towers", min=1),
        "stacked_convs": _int(4, "conv + GroupNorm + ReLU layers per tower", min=0),
        "norm_groups": _int(32, "GroupNorm groups (must divide feat_channels)", min=1),
        "prior_prob": _num(0.01, "initial foreground probability of the classifier", min=0.0, max=1.0,
                           exclusive=True),
    }, "classification and box towers (GN), IoU branch on the box tower"),
    "anchors": Section({
        "strides": _list(Key(("int",), min=1), [8, 16, 32, 64, 128], "stride of each FPN level"),
        "octave_base_scale": _num(8.0, "anchor size at a level = stride * this", min=0.0, exclusive=True),
        "scales_per_octave": _int(1, "scales per location (PAA: 1)", min=1),
        "ratios": _list(Key(("float",), min=0.0, exclusive=True), [1.0], "aspect ratios h/w (PAA: one)"),
    }, "anchor generator: one anchor per location"),
    "coder": Section({
        "means": _list(Key(("float",)), [0.0] * 4, "delta means (dx, dy, dw, dh)", length=4),
        "stds": _list(Key(("float",), min=0.0, exclusive=True), [0.1, 0.1, 0.2, 0.2], "delta stds", length=4),
    }, "box delta coder (predictions are decoded for the GIoU loss)"),
    "assigner": Section({
        "pos_iou_thr": _num(0.1, "IoU at or above which an anchor is an initial positive", **_PROB),
        "neg_iou_thr": _num(0.1, "IoU below which an anchor is negative", **_PROB),
        "min_pos_iou": _num(0.0, "least IoU for a low-quality match", **_PROB),
        "match_low_quality": _flag(True, "give each GT its best anchors even below pos_iou_thr"),
        "ignore_iof_thr": _num(-1.0, ">0: ignore anchors covered by a crowd box beyond this IoF"),
    }, "initial max-IoU assignment (the candidates of the GMM)"),
    "paa": Section({
        "topk": _int(9, "lowest-cost candidates per GT and level", min=1),
        "tol": _num(1e-3, "EM convergence threshold on the mean log-likelihood", min=0.0),
        "max_iter": _int(100, "EM iteration limit", min=1),
        "reg_covar": _num(1e-6, "variance floor of the mixture components", min=0.0),
    }, "probabilistic anchor assignment (two-component GMM per GT)"),
    "loss_cls": RETINANET.keys["loss_cls"],
    "loss_bbox": Section({"weight": _num(1.3, "GIoU loss weight (also in the anchor cost)", min=0.0)},
                         "GIoU loss on decoded boxes, weighted by the IoU target"),
    "loss_iou": Section({"weight": _num(0.5, "IoU-branch BCE weight", min=0.0)},
                        "sigmoid BCE of the IoU branch against the decoded box's IoU"),
    "test": Section({
        "nms_pre": _int(1000, "top anchors per level kept before NMS", min=1),
        "score_thr": _num(0.05, "least score sqrt(cls * iou) of a detection", **_PROB),
        "nms_iou": _num(0.6, "NMS IoU threshold", **_PROB),
        "max_per_img": _int(100, "detections kept per image", min=1),
        "score_voting": _flag(True, "refine each kept box by score voting"),
    }, "inference post-processing"),
    "allow_pisa": _flag(False, "experimental, unpublished: accept a pisa: block (ISR-P on PAA's positives)"),
}, "PAA (Kim & Lee, ECCV 2020)")

# Sampling-Free (method doc §8.2) for RetinaNet, Faster and Mask R-CNN: its presence replaces the focal
# loss (RetinaNet) or the RPN / RoI samplers (two-stage) with guided loss scaling.
SAMPLING_FREE = Section({
    "pi": Key(("null", "float"), None, "foreground prior per class, the bias -log((1-pi)/pi) of RetinaNet's "
              "classifier (null: 1e-5; test score threshold pi * (K + 1)) or of the RPN's objectness conv "
              "(null: 2e-4), the authors' COCO values; compute it with scripts/sampling_free_bias.py",
              min=0.0, max=1.0, exclusive=True),
    "nms_iou": _num(0.55, "RetinaNet only: test NMS IoU threshold", **_PROB),
    "rpn_proposals_per_batch": _int(2000, "Faster / Mask R-CNN only: RPN proposals kept per device batch while "
                                    "training (the authors': 16000 / #GPUs, 2000 on 8 GPUs); each image keeps "
                                    "this // data.batch_size, in place of model.rpn.train.max_per_img", min=1),
    "rcnn_score_thr": _num(1e-4, "Faster / Mask R-CNN only: R-CNN test score threshold, in place of "
                           "model.roi_head.test.score_thr", **_PROB),
}, "Sampling-Free (RetinaNet, Faster / Mask R-CNN): optimal bias init, guided loss scaling, adaptive test "
   "threshold; absent or null = off", optional=True)

SCHEMA = Section({
    "model": Variants({"retinanet": RETINANET, "faster_rcnn": FASTER_RCNN, "mask_rcnn": MASK_RCNN, "ssd": SSD,
                       "paa": PAA},
                      "the detector"),
    "pisa": Section({
        "isr_p": Section({"k": _num(2.0, "exponent of the importance weight", min=0.0),
                          "bias": _num(0.0, "weight floor", **_PROB)},
                         "Importance-based Sample Reweighting of positives", optional=True),
        "carl": Section({"k": _num(1.0, "exponent of the score weight", min=0.0),
                         "bias": _num(0.2, "weight floor", **_PROB)},
                        "Classification-Aware Regression Loss", optional=True),
        "isr_n": Section({"k": _num(0.5, "exponent of the negatives' importance weight", min=0.0),
                          "bias": _num(0.0, "weight floor", **_PROB),
                          "score_thr": _num(0.05, "negatives scoring at most this are not ranked", **_PROB),
                          "iou_thr": _num(0.5, "IoU of the NMS grouping of negatives", **_PROB)},
                         "two-stage only: Score-HLR sampling and reweighting of negatives; "
                         "absent = random sampler", optional=True),
        "compat": Section({
            "legacy_gt_offset": _flag(False, "reproduce the reference's GT-id offset (defect D1)"),
            "legacy_float_keys": _flag(False, "rank by the reference's float keys (defect D9)"),
        }, "reference quirks, off by default"),
    }, "Prime Sample Attention; absent or null = the baseline", optional=True),
    "sampling_free": SAMPLING_FREE,
    "data": Section({
        "train": Variants(_DATASETS, "training set"),
        "val": Variants(_DATASETS, "validation set"),
        "train_transforms": Section({
            "scales": _list(_SCALE, [[1333, 800]], "keep-ratio resize targets; one is drawn per image"),
            "flip_prob": _num(0.5, "horizontal flip probability", **_PROB),
        }, "training augmentation"),
        "test_transforms": Section({"scales": _list(_SCALE, [[1333, 800]], "keep-ratio resize targets")},
                                   "test-time resize"),
        "normalize": Section({
            "mean": _list(Key(("float",)), [123.675, 116.28, 103.53], "per-channel mean (0-255)", length=3),
            "std": _list(Key(("float",), min=0.0, exclusive=True), [58.395, 57.12, 57.375],
                         "per-channel std (0-255)", length=3),
            "to_rgb": _flag(True, "normalise in RGB channel order (false: BGR, for caffe-style weights)"),
        }, "pixel normalisation"),
        "pipeline": _choice("standard", ("standard", "ssd"), "training augmentation: standard (keep-ratio "
                            "resize, flip) or ssd (data.ssd_transforms; set pad_divisor 1)"),
        "ssd_transforms": SSD_TRANSFORMS,
        "pad_divisor": _int(32, "pad batches to a multiple of this", min=1),
        "batch_size": _int(2, "images per process", min=1),
        "workers": _int(2, "data loader workers per process", min=0),
        "aspect_grouping": _flag(True, "batch images of the same orientation together"),
    }, "datasets and input pipeline"),
    "optim": Section({
        "lr": _num(0.01, "learning rate for ref_batch images per step", min=0.0, exclusive=True),
        "momentum": _num(0.9, "SGD momentum", **_PROB),
        "weight_decay": _num(0.0001, "L2 weight decay", min=0.0),
        "ref_batch": _int(16, "total batch the lr was tuned for; lr scales linearly", min=1),
        "clip_grad": Section({
            "max_norm": _num(REQUIRED, "largest gradient norm", min=0.0, exclusive=True),
            "norm_type": _num(2.0, "p of the p-norm", min=0.0, exclusive=True),
        }, "gradient clipping; null = off", optional=True),
    }, "SGD"),
    "schedule": Section({
        "epochs": _int(12, "training epochs", min=1),
        "steps": _list(Key(("int",), min=1), [8, 11], "epochs after which lr *= gamma",
                       min_len=0),
        "gamma": _num(0.1, "lr decay factor", min=0.0),
        "warmup_iters": _int(500, "linear warmup iterations", min=0),
        "warmup_ratio": _num(0.001, "warmup starts at lr * this", **_PROB),
        "max_iters": Key(("null", "int"), None, "stop after this many iterations (null: all epochs)", min=1),
    }, "learning-rate schedule"),
    "train": Section({
        "work_dir": Key(("str",), REQUIRED, "checkpoints, logs and the resolved config go here"),
        "seed": _int(0, "random seed", min=0),
        "deterministic": _flag(False, "use deterministic kernels (slower)"),
        "amp": _choice(None, ("bf16", "fp16"), "mixed precision: null, bf16 or fp16", nullable=True),
        "eval_interval": _int(1, "evaluate every this many epochs (0: never)", min=0),
        "ckpt_interval": _int(1, "checkpoint every this many epochs (0: only the last)", min=0),
        "ckpt_iter_interval": _int(0, "also checkpoint every this many iterations (0: off)", min=0),
        "best_metric": Key(("str",), "bbox_AP", "metric that selects the best checkpoint"),
        "log_interval": _int(50, "log every this many iterations", min=1),
        "nonfinite": _choice("stop", ("stop", "skip"), "on a non-finite loss: stop, or skip the step"),
    }, "training loop"),
    "load_from": Key(("null", "str"), None, "initial weights: a pisa or mmdetection checkpoint",
                     path="file"),
    "base": Key(("null", "str"), None, "one base file, relative to this file (resolved on load)"),
}, "experiment")
