"""Read mmdetection v2/3.x checkpoints safely and rename their state dicts to pisa's module names.

Key mapping for RetinaNet (method doc §7.4; pisa names on the right):

====================================================  ============================================
``backbone.*``                                        ``backbone.*`` (torchvision names, unchanged)
``neck.lateral_convs.{i}.conv.{weight,bias}``         ``neck.lateral_convs.{i}.{weight,bias}``
``neck.fpn_convs.{0,1,2}.conv.*``                     ``neck.output_convs.{0,1,2}.*``
``neck.fpn_convs.3.conv.*`` / ``neck.fpn_convs.4.conv.*``  ``neck.p6_conv.*`` / ``neck.p7_conv.*``
``bbox_head.{cls,reg}_convs.{i}.conv.*``              ``head.{cls,reg}_convs.{i}.*``
``bbox_head.retina_cls.*`` / ``bbox_head.retina_reg.*``   ``head.cls_logits.*`` / ``head.bbox_reg.*``
====================================================  ============================================

Faster / Mask R-CNN (``faster_rcnn``, ``mask_rcnn``):

====================================================  ============================================
``neck.lateral_convs.{i}.conv.*`` (i = 0..3)          ``neck.lateral_convs.{i}.*``
``neck.fpn_convs.{i}.conv.*`` (i = 0..3)              ``neck.output_convs.{i}.*`` (P6 is a max-pool)
``rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*``             ``rpn.head.{rpn_conv,rpn_cls,rpn_reg}.*``
``roi_head.bbox_head.{shared_fcs.{0,1},fc_cls,fc_reg}.*``  unchanged
``roi_head.mask_head.convs.{i}.conv.*``               ``roi_head.mask_head.convs.{i}.*``
``roi_head.mask_head.{upsample,conv_logits}.*``       unchanged
====================================================  ============================================

BatchNorm ``num_batches_tracked`` buffers are kept (pisa's BatchNorm layers have them too).
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["is_mmdet_checkpoint", "read_mmdet_checkpoint", "convert_mmdet_state_dict", "mmdet_class_names",
           "convert_mmdet_checkpoint", "infer_model_cfg", "mmdet_model_type", "RENAME_RULES"]

MMDET_PREFIXES = ("backbone.", "neck.", "bbox_head.", "rpn_head.", "roi_head.")

# Faster R-CNN; Mask R-CNN adds the mask head. A key of the other model type finds no rule (unmapped).
_TWO_STAGE_RULES: list[tuple[str, str]] = [
    (r"^backbone\.", "backbone."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"neck.lateral_convs.\1."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"neck.output_convs.\1."),
    (r"^rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.", r"rpn.head.\1."),
    (r"^roi_head\.bbox_head\.(shared_fcs\.\d+|fc_cls|fc_reg)\.", r"roi_head.bbox_head.\1."),
]
_MASK_RULES: list[tuple[str, str]] = [
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_head.mask_head.convs.\1."),
    (r"^roi_head\.mask_head\.(upsample|conv_logits)\.", r"roi_head.mask_head.\1."),
]

# PAA (mmdetection's PAAHead, an ATSS-style head). No reference key list is shipped with pisa: these rules
# follow the head's structure (mmcv ConvModule towers ``{cls,reg}_convs.i.{conv,gn}``, ``atss_cls``,
# ``atss_reg``, ``atss_centerness`` = the IoU branch, ``scales.i.scale``). The neck keys are RetinaNet's;
# only ``fpn_convs.3`` (P6) reads the P5 output, so its input width is the FPN's.
_PAA_RULES: list[tuple[str, str]] = [
    (r"^backbone\.", "backbone."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"neck.lateral_convs.\1."),
    (r"^neck\.fpn_convs\.([012])\.conv\.", r"neck.output_convs.\1."),
    (r"^neck\.fpn_convs\.3\.conv\.", "neck.p6_conv."),
    (r"^neck\.fpn_convs\.4\.conv\.", "neck.p7_conv."),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.", r"head.\1_convs.\2.\3."),
    (r"^bbox_head\.atss_cls\.", "head.cls_logits."),
    (r"^bbox_head\.atss_reg\.", "head.bbox_reg."),
    (r"^bbox_head\.atss_centerness\.", "head.iou_pred."),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1"),
]

# SSD: both the pre-v2.14 layout of the published PISA SSD files (method doc §7.5: backbone.extra.{i},
# backbone.l2_norm, bbox_head.{cls,reg}_convs.{l}) and the current one (neck.extra_layers.{i//2}.{i%2}.conv,
# neck.l2_norm, bbox_head.{cls,reg}_convs.{l}.0) map onto pisa's names, which are the older layout's.
_SSD_RULES: list[tuple[str, str]] = [
    (r"^backbone\.(features|extra)\.", r"backbone.\1."),
    (r"^(?:backbone|neck)\.l2_norm\.", "backbone.l2_norm."),
    *[(rf"^neck\.extra_layers\.{k}\.{j}\.conv\.", f"backbone.extra.{2 * k + j}.") for k in range(5) for j in (0, 1)],
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(?:0\.)?(weight|bias)$", r"head.\1_convs.\2.\3"),
]

# (pattern, replacement) per model type; the first matching rule renames a key, no match = unexpected.
RENAME_RULES: dict[str, list[tuple[str, str]]] = {
    "retinanet": [
        (r"^backbone\.", "backbone."),
        (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"neck.lateral_convs.\1."),
        (r"^neck\.fpn_convs\.([012])\.conv\.", r"neck.output_convs.\1."),
        (r"^neck\.fpn_convs\.3\.conv\.", "neck.p6_conv."),
        (r"^neck\.fpn_convs\.4\.conv\.", "neck.p7_conv."),
        (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.", r"head.\1_convs.\2."),
        (r"^bbox_head\.retina_cls\.", "head.cls_logits."),
        (r"^bbox_head\.retina_reg\.", "head.bbox_reg."),
    ],
    "faster_rcnn": _TWO_STAGE_RULES,
    "mask_rcnn": _TWO_STAGE_RULES + _MASK_RULES,
    "ssd": _SSD_RULES,
    "paa": _PAA_RULES,
}


def is_mmdet_checkpoint(obj: Any) -> bool:
    """True for a dict holding a ``state_dict`` whose keys are in mmdetection layout (``backbone.``, ...)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return False
    keys = list(obj["state_dict"])
    return bool(keys) and all(isinstance(k, str) and k.startswith(MMDET_PREFIXES) for k in keys)


def _metadata_globals() -> list:
    """The plain metadata types mmdetection files carry in ``meta``: numpy scalars, dtypes, arrays.

    Both numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) module paths are accepted.
    """
    from numpy._core import multiarray

    dtype_classes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                  np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                                  np.float64)]
    return [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct,
            (multiarray.scalar, "numpy.core.multiarray.scalar"),
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), *dtype_classes]


def read_mmdet_checkpoint(path: str, trust: bool = False) -> dict:
    """Load a checkpoint file onto the CPU without executing code from it.

    Only tensors, containers and the numpy metadata types of ``_metadata_globals`` are unpickled.
    ``trust=True`` allows full unpickling, which can run arbitrary code: use it only for files from a
    source you trust. Raises ``ValueError`` naming the file when it contains anything else.
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_metadata_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to unpickle objects other than tensors and plain metadata "
            f"({_unsafe_globals(path, err)}). If you trust where this file comes from, rerun with "
            "--trust-checkpoint (full unpickling can execute code stored in the file)") from err


def _unsafe_globals(path: str, err: Exception) -> str:
    """Name the offending globals for the error message (zip-format files), else torch's own reason."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: fall back to the unpickler's message
        names = []
    if names:
        return "found " + ", ".join(names)
    lines = [ln.strip() for ln in str(err).splitlines() if "global" in ln.lower()]
    return lines[0] if lines else type(err).__name__


def mmdet_class_names(checkpoint: dict) -> list[str] | None:
    """Class names stored in ``meta`` (v2: ``CLASSES``; 3.x: ``dataset_meta.classes``), or ``None``."""
    meta = checkpoint.get("meta") or {}
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    return None if names is None else [str(n) for n in names]


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return None


def expected_state_shapes(model_cfg: dict) -> dict[str, torch.Size]:
    """Key -> shape of a pisa model built from ``model_cfg`` on the meta device (no memory, no weights)."""
    from pisa.models import build_model  # deferred: pisa.models imports this module's siblings

    cfg = copy.deepcopy(model_cfg)
    cfg["backbone"]["pretrained"] = None
    with torch.device("meta"):
        model = build_model({"model": cfg})
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_mmdet_state_dict(state_dict: dict[str, Tensor], model_cfg: dict) -> dict[str, Tensor]:
    """Rename every key of an mmdetection state dict to the pisa model described by ``model_cfg``.

    ``model_cfg`` is the ``model:`` section of a pisa config. Raises ``ValueError`` listing every key
    that has no rename rule, is missing, is unexpected or has the wrong shape; nothing loads partially.
    """
    model_type = model_cfg["type"]
    if model_type not in RENAME_RULES:
        raise ValueError(f"no mmdetection key mapping for model type {model_type!r}; "
                         f"valid names: {sorted(RENAME_RULES)}")
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        new_key = _rename(key, RENAME_RULES[model_type])
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = value
    expected = expected_state_shapes(model_cfg)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(f"{k}: {tuple(converted[k].shape)} != {tuple(expected[k])}"
                   for k in set(expected) & set(converted) if converted[k].shape != expected[k])
    if unmapped or missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {keys}" for name, keys in
                 (("unmapped", unmapped), ("missing", missing), ("unexpected", unexpected),
                  ("wrong shape", wrong)) if keys]
        raise ValueError(f"checkpoint does not match a pisa {model_type} with backbone "
                         f"{model_cfg['backbone']['type']!r}: " + "; ".join(parts))
    return converted


def mmdet_model_type(state_dict: dict[str, Tensor]) -> str:
    """The pisa ``model.type`` an mmdetection state dict holds: ``retinanet``, ``faster_rcnn`` or ``mask_rcnn``.

    Recognised by the classifier's key (``bbox_head.retina_cls`` / ``roi_head.bbox_head.fc_cls``) and, for
    R-CNN, a mask head's ``roi_head.mask_head.conv_logits``. Raises ``ValueError`` for anything else.
    """
    if "bbox_head.retina_cls.weight" in state_dict:
        return "retinanet"
    if "bbox_head.atss_centerness.weight" in state_dict:  # PAA (pisa has no ATSS, whose layout is the same)
        return "paa"
    if "roi_head.bbox_head.fc_cls.weight" in state_dict:
        return "mask_rcnn" if "roi_head.mask_head.conv_logits.weight" in state_dict else "faster_rcnn"
    if "backbone.features.0.weight" in state_dict:  # VGG16 trunk: SSD300 / SSD512, either layout
        return "ssd"
    raise ValueError("unrecognised mmdetection checkpoint: expected RetinaNet (bbox_head.retina_cls.*) or "
                     "Faster / Mask R-CNN (roi_head.bbox_head.fc_cls.*) weights")


def _backbone_type(state_dict: dict[str, Tensor]) -> str:
    """pisa backbone name from the block counts per stage and the grouping of the 3x3 convs."""
    blocks = {s: len({k.split(".")[2] for k in state_dict if k.startswith(f"backbone.layer{s}.")})
              for s in (1, 2, 3, 4)}
    counts = tuple(blocks.values())
    if "backbone.layer1.0.conv3.weight" in state_dict:  # Bottleneck blocks
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(counts)
    else:
        depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}.get(counts)
    if depth is None:
        raise ValueError(f"unsupported ResNet block counts {counts} per stage")
    conv2 = state_dict["backbone.layer1.0.conv2.weight"]
    grouped = conv2.shape[1] != conv2.shape[0]  # ResNeXt: [m, m / groups, 3, 3]
    return "resnext101_32x4d" if grouped else f"resnet{depth}"


def _count(state_dict: dict[str, Tensor], pattern: str) -> int:
    return sum(1 for k in state_dict if re.match(pattern, k))


def infer_model_cfg(state_dict: dict[str, Tensor], base_model_cfg: dict) -> dict:
    """Adapt ``base_model_cfg`` (a ``model:`` section of the checkpoint's model type) to a state dict's sizes.

    Infers the backbone type from the block counts and conv groups, ``num_classes`` from the classifier
    (R-CNN: ``fc_cls`` rows minus the background), and the neck and head widths and depths. Raises
    ``ValueError`` when the base section is for another model type than the weights.
    """
    model_type = mmdet_model_type(state_dict)
    if base_model_cfg.get("type") != model_type:
        raise ValueError(f"the checkpoint holds {model_type} weights but the base model section is "
                         f"model.type {base_model_cfg.get('type')!r}; use a {model_type} config")
    cfg = copy.deepcopy(base_model_cfg)
    if model_type == "ssd":  # VGG16 trunk, no neck
        return _infer_ssd(state_dict, cfg)
    cfg["backbone"]["type"] = _backbone_type(state_dict)
    cfg["neck"]["out_channels"] = state_dict["neck.lateral_convs.0.conv.weight"].shape[0]
    if model_type == "retinanet":
        _infer_retinanet(state_dict, cfg)
    elif model_type == "paa":
        _infer_paa(state_dict, cfg)
    else:
        _infer_two_stage(state_dict, cfg)
    return cfg


def _infer_retinanet(state_dict: dict[str, Tensor], cfg: dict) -> None:
    cls_w = state_dict["bbox_head.retina_cls.weight"]
    num_anchors = state_dict["bbox_head.retina_reg.weight"].shape[0] // 4
    cfg["num_classes"] = cls_w.shape[0] // num_anchors
    cfg["head"]["feat_channels"] = cls_w.shape[1]
    cfg["head"]["stacked_convs"] = _count(state_dict, r"bbox_head\.cls_convs\.\d+\.conv\.weight$")


def _infer_paa(state_dict: dict[str, Tensor], cfg: dict) -> None:
    cls_w = state_dict["bbox_head.atss_cls.weight"]
    cfg["num_classes"] = cls_w.shape[0]  # one anchor per location
    cfg["head"]["feat_channels"] = cls_w.shape[1]
    cfg["head"]["stacked_convs"] = _count(state_dict, r"bbox_head\.cls_convs\.\d+\.conv\.weight$")


def _infer_two_stage(state_dict: dict[str, Tensor], cfg: dict) -> None:
    cfg["num_classes"] = state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0] - 1  # background last
    cfg["rpn"]["feat_channels"] = state_dict["rpn_head.rpn_conv.weight"].shape[0]
    fc0 = state_dict["roi_head.bbox_head.shared_fcs.0.weight"]  # [fc, C·roi·roi]
    roi_head = cfg["roi_head"]
    roi_head["fc_channels"] = fc0.shape[0]
    roi_head["roi_size"] = round(math.sqrt(fc0.shape[1] / cfg["neck"]["out_channels"]))
    if "mask" in roi_head and "roi_head.mask_head.conv_logits.weight" in state_dict:
        roi_head["mask"]["num_convs"] = _count(state_dict, r"roi_head\.mask_head\.convs\.\d+\.conv\.weight$")
        roi_head["mask"]["conv_channels"] = state_dict["roi_head.mask_head.conv_logits.weight"].shape[1]


# The reference anchors of each SSD input size (method doc §7.2), keyed by its number of extra convs.
_SSD_LAYOUTS = {
    8: (300, {"strides": [8, 16, 32, 64, 100, 300], "ratio_range": [0.15, 0.9],
              "ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]]}),
    10: (512, {"strides": [8, 16, 32, 64, 128, 256, 512], "ratio_range": [0.1, 0.9],
               "ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]}),
}


def _infer_ssd(state_dict: dict[str, Tensor], cfg: dict) -> dict:
    """SSD300 or SSD512 (from the number of extra convs, in either layout), width and ``num_classes``."""
    extra = _count(state_dict, r"backbone\.extra\.\d+\.weight$") or \
        _count(state_dict, r"neck\.extra_layers\.\d+\.\d\.conv\.weight$")
    if extra not in _SSD_LAYOUTS:
        raise ValueError(f"unsupported SSD checkpoint: {extra} extra convs (SSD300 has 8, SSD512 10)")
    input_size, anchors = _SSD_LAYOUTS[extra]
    if cfg.get("input_size") != input_size:
        cfg["input_size"], cfg["anchors"] = input_size, copy.deepcopy(anchors)
    cfg["backbone"]["width"] = state_dict["backbone.features.0.weight"].shape[0] / 64
    cfg["backbone"]["extra_layers"] = None
    cls = next(v for k, v in state_dict.items() if re.match(r"bbox_head\.cls_convs\.0\.(0\.)?weight$", k))
    reg = next(v for k, v in state_dict.items() if re.match(r"bbox_head\.reg_convs\.0\.(0\.)?weight$", k))
    cfg["num_classes"] = cls.shape[0] // (reg.shape[0] // 4) - 1  # A·(C+1) channels, background last
    return cfg


def convert_mmdet_checkpoint(checkpoint: dict, model_cfg: dict, source: str = "") -> dict:
    """An mmdetection checkpoint dict -> a pisa checkpoint ``{"model", "meta", "config": None}``."""
    if not is_mmdet_checkpoint(checkpoint):
        raise ValueError(f"{source or 'checkpoint'}: not an mmdetection checkpoint "
                         "(expected a 'state_dict' with backbone./neck./bbox_head. keys)")
    state = convert_mmdet_state_dict(checkpoint["state_dict"], model_cfg)
    mm_meta = checkpoint.get("meta") or {}
    meta = {"source": "mmdetection", "converted_from": source, "model_type": model_cfg["type"],
            "backbone": model_cfg["backbone"]["type"], "num_classes": model_cfg["num_classes"]}
    classes = mmdet_class_names(checkpoint)
    if classes is not None:
        meta["class_names"] = classes
    for key in ("mmdet_version", "epoch", "iter"):
        if isinstance(mm_meta.get(key), (str, int)):
            meta[key] = mm_meta[key]
    if isinstance(mm_meta.get("config"), str):
        meta["mmdet_config"] = mm_meta["config"]  # authoritative settings of the published files (§5.4)
    return {"model": {k: v.contiguous() for k, v in state.items()}, "meta": meta, "config": None}
