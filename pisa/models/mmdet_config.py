"""The config text that mmdetection embeds in its checkpoints (``meta["config"]``), read safely and
compared with a pisa config on the settings that decide test-time results.

The published PISA files predate the public configs, so their embedded text is the authoritative
record of how they were trained and tested (method spec §5.4). ``python -m pisa.eval`` prints every
difference it finds before evaluating, because a different test scale, normalisation or NMS setting
silently moves AP away from the published figure.

The text is Python source of literal assignments (``model = dict(type='RetinaNet', ...)``). It is
parsed with :mod:`ast` and only literals, ``dict(...)`` calls with keyword arguments, lists, tuples
and negative numbers are evaluated; anything else is skipped, and nothing is executed.
"""

from __future__ import annotations

import ast
import math
from typing import Any

__all__ = ["parse_config_text", "config_differences"]

_SKIP = object()  # a value this reader does not evaluate


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        return -value if isinstance(value, (int, float)) and not isinstance(value, bool) else _SKIP
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return _SKIP if any(i is _SKIP for i in items) else (items if isinstance(node, ast.List) else tuple(items))
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):  # ``**other`` inside a literal
            return _SKIP
        pairs = [(_literal(k), _literal(v)) for k, v in zip(node.keys, node.values)]
        return {k: v for k, v in pairs if v is not _SKIP and isinstance(k, (str, int, float))}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
            and not node.args):
        values = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        return {k: v for k, v in values.items() if v is not _SKIP}
    return _SKIP


def parse_config_text(text: str) -> dict[str, Any]:
    """Top-level ``name = literal`` assignments of an mmdetection config text, as plain Python.

    Unreadable text gives ``{}``; values this reader does not evaluate are left out (a dict keeps
    its other keys).
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    config: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _literal(stmt.value)
            if value is not _SKIP:
                config[stmt.targets[0].id] = value
    return config


def _get(tree: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _backbone_type(backbone: dict) -> str | None:
    """mmdetection's ResNet/ResNeXt description as a pisa backbone name."""
    depth = backbone.get("depth")
    if backbone.get("type") == "ResNeXt":
        return f"resnext{depth}_{backbone.get('groups')}x{backbone.get('base_width')}d"
    return f"resnet{depth}" if backbone.get("type") == "ResNet" else None


def _test_scales(pipeline: Any) -> list | None:
    """The ``img_scale`` of the test pipeline's ``MultiScaleFlipAug``, as a list of [long, short]."""
    for step in pipeline if isinstance(pipeline, list) else []:
        if isinstance(step, dict) and step.get("type") == "MultiScaleFlipAug" and "img_scale" in step:
            scale = step["img_scale"]
            scales = scale if isinstance(scale, list) else [scale]
            return [sorted(s, reverse=True) for s in scales]
    return None


def _nms_iou(nms: Any) -> Any:
    """The IoU threshold of an mmdetection ``nms=dict(...)`` (``iou_threshold``; ``iou_thr`` before v2.5)."""
    nms = nms if isinstance(nms, dict) else {}
    return nms.get("iou_threshold", nms.get("iou_thr"))


def _roi_layer(roi_head: dict, branch: str, key: str, old_key: str) -> Any:
    """A setting of the ``{branch}_roi_extractor``'s RoIAlign (v2.0 names: ``out_size``, ``sample_num``)."""
    layer = _get(roi_head, f"{branch}_roi_extractor.roi_layer")
    if not isinstance(layer, dict):
        return None
    return layer.get(key, layer.get(old_key))


def _two_stage_settings(model: dict, test_cfg: dict) -> dict[str, Any]:
    """Faster / Mask R-CNN test settings: RPN proposals, R-CNN post-processing, anchors, coders, RoI sizes.

    RPN: early v2 files write ``nms_post`` (the count kept after NMS) and ``nms_thr``, later ones
    ``max_per_img`` and ``nms=dict(iou_threshold=...)``; ``max_num`` only counted with NMS across levels.
    """
    rpn_head = model.get("rpn_head") or {}
    roi_head = model.get("roi_head") or {}
    rpn = test_cfg.get("rpn") or {}
    rcnn = test_cfg.get("rcnn") or {}
    rpn_count = next((rpn[k] for k in ("max_per_img", "nms_post", "max_num") if k in rpn), None)
    rpn_iou = _nms_iou(rpn.get("nms"))
    return {
        "model.rpn.anchors.scales": _get(rpn_head, "anchor_generator.scales"),
        "model.rpn.anchors.ratios": _get(rpn_head, "anchor_generator.ratios"),
        "model.rpn.anchors.strides": _get(rpn_head, "anchor_generator.strides"),
        "model.rpn.coder.stds": _get(rpn_head, "bbox_coder.target_stds"),
        "model.rpn.test.nms_pre": rpn.get("nms_pre"),
        "model.rpn.test.max_per_img": rpn_count,
        "model.rpn.test.nms_iou": rpn_iou if rpn_iou is not None else rpn.get("nms_thr"),
        "model.roi_head.roi_size": _roi_layer(roi_head, "bbox", "output_size", "out_size"),
        "model.roi_head.sampling_ratio": _roi_layer(roi_head, "bbox", "sampling_ratio", "sample_num"),
        "model.roi_head.finest_scale": _get(roi_head, "bbox_roi_extractor.finest_scale"),
        "model.roi_head.coder.stds": _get(roi_head, "bbox_head.bbox_coder.target_stds"),
        "model.roi_head.mask.roi_size": _roi_layer(roi_head, "mask", "output_size", "out_size"),
        "model.roi_head.test.score_thr": rcnn.get("score_thr"),
        "model.roi_head.test.nms_iou": _nms_iou(rcnn.get("nms")),
        "model.roi_head.test.max_per_img": rcnn.get("max_per_img"),
        "model.roi_head.test.mask_thr": rcnn.get("mask_thr_binary"),
    }


def _settings(mm: dict) -> dict[str, Any]:
    """pisa config key -> the embedded config's value, for the settings both describe."""
    model = mm.get("model") or {}
    head = model.get("bbox_head") or _get(model, "roi_head.bbox_head") or {}
    test_cfg = model.get("test_cfg") or mm.get("test_cfg") or {}  # v2.0-2.4 keep it at the top level
    nms = test_cfg.get("nms") or {}
    norm = mm.get("img_norm_cfg") or {}
    backbone = model.get("backbone") or {}
    return {
        **_two_stage_settings(model, test_cfg),
        "model.backbone.type": _backbone_type(backbone) if backbone else None,
        "model.num_classes": head.get("num_classes"),
        "model.anchors.octave_base_scale": _get(head, "anchor_generator.octave_base_scale"),
        "model.anchors.scales_per_octave": _get(head, "anchor_generator.scales_per_octave"),
        "model.anchors.ratios": _get(head, "anchor_generator.ratios"),
        "model.anchors.strides": _get(head, "anchor_generator.strides"),
        "model.coder.means": _get(head, "bbox_coder.target_means"),
        "model.coder.stds": _get(head, "bbox_coder.target_stds"),
        "model.test.nms_pre": test_cfg.get("nms_pre"),
        "model.test.score_thr": test_cfg.get("score_thr"),
        "model.test.nms_iou": nms.get("iou_threshold", nms.get("iou_thr")),
        "model.test.max_per_img": test_cfg.get("max_per_img"),
        "data.normalize.mean": norm.get("mean"),
        "data.normalize.std": norm.get("std"),
        "data.normalize.to_rgb": norm.get("to_rgb"),
        "data.test_transforms.scales": _test_scales(_get(mm, "data.test.pipeline") or mm.get("test_pipeline")),
    }


def config_differences(config_text: str, cfg: dict) -> tuple[list[str], int]:
    """Compare an embedded mmdetection config with the pisa config ``cfg``.

    Returns ``(differences, checked)``: one line per setting that both describe and that differs
    (``"key: checkpoint <value>, config <value>"``), and how many settings were compared.
    """
    differences, checked = [], 0
    for key, theirs in _settings(parse_config_text(config_text)).items():
        ours = _get(cfg, key)
        if theirs is None or ours is None:
            continue
        checked += 1
        if not _same(theirs, ours):
            differences.append(f"{key}: checkpoint {theirs!r}, config {ours!r}")
    return differences, checked
