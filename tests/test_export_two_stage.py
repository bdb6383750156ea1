"""ONNX export of Faster and Mask R-CNN: the export wrapper against the model's eval mode, ONNX
Runtime against PyTorch (batch 1 and batch N with a smaller image padded), ``pisa.eval --onnx``
against the PyTorch AP of trained checkpoints.

Tests that need the ``onnx`` extra (onnx, onnxscript, onnxruntime) skip when it is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pisa.config import load_config
from pisa.export_model import ExportableTwoStage, unpad_detections
from pisa.models import build_model
from pisa.models.mask_head import paste_masks
from pisa.models.roi_align import map_roi_levels
from test_export import assert_same_detections, assert_same_results, graph_inputs

ROOT = Path(__file__).resolve().parents[1]
FASTER = str(ROOT / "configs" / "demo" / "faster_rcnn_r18_demo.yaml")
MASK = str(ROOT / "configs" / "demo" / "mask_rcnn_r18_demo.yaml")
SF_FASTER = str(ROOT / "configs" / "demo" / "sampling_free_faster_rcnn_r18_demo.yaml")
SF_MASK = str(ROOT / "configs" / "demo" / "sampling_free_mask_rcnn_r18_demo.yaml")
# finest_scale 8 instead of 56: on images of ~100 px, RoIs of sqrt(w·h) >= 16 px go to P3, >= 32 to P4, >= 64 to P5.
TINY = ["model.neck.out_channels=16", "model.rpn.feat_channels=16", "model.roi_head.fc_channels=32",
        "model.rpn.test={nms_pre: 200, max_per_img: 60}", "model.roi_head.finest_scale=8"]
TINY_MASK = [*TINY, "model.roi_head.mask={conv_channels: 16, num_convs: 1}"]


def spread_model(config: str, *overrides: str) -> torch.nn.Module:
    """A tiny random two-stage model with wide RPN and box-classifier weights: proposals of every
    size (so RoIs land on several pyramid levels), many class scores above 0.3, boxes that move."""
    tiny = TINY_MASK if config in (MASK, SF_MASK) else TINY
    cfg = load_config(config, [*tiny, "model.roi_head.test.score_thr=0.3", *overrides], check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.rpn.head.rpn_cls.weight.normal_(std=0.5)
        model.rpn.head.rpn_reg.weight.normal_(std=0.2)
        model.roi_head.bbox_head.fc_cls.weight.normal_(std=0.3)
        model.roi_head.bbox_head.fc_reg.weight.normal_(std=0.1)
    return model


def batch_of_two() -> tuple[torch.Tensor, list[dict]]:
    """Two images of different sizes, zero-padded into one 96x128 batch as ``pisa.data`` pads them."""
    torch.manual_seed(1)
    images = torch.zeros(2, 3, 96, 128)
    images[0] = torch.randn(3, 96, 128)
    images[1, :, :70, :100] = torch.randn(3, 70, 100)
    targets = [{"img_shape": (96, 128), "scale_factor": (1.0, 1.0), "ori_shape": (96, 128)},
               {"img_shape": (70, 100), "scale_factor": (0.5, 0.7), "ori_shape": (100, 200)}]
    return images, targets


def pasted(detections: list[dict], targets: list[dict], threshold: float = 0.5) -> list[dict]:
    """The graph's mask probabilities pasted as ``pisa.eval --onnx`` pastes them."""
    for det, meta in zip(detections, targets):
        det["masks"] = paste_masks(det.pop("mask_probs"), det["boxes"], meta["ori_shape"], threshold=threshold)
    return detections


def assert_same_masks(ours: list[dict], reference: list[dict], max_fraction: float = 0.0) -> None:
    """Masks of matched detections (same order after :func:`assert_same_detections` with unique scores)
    differ in at most ``max_fraction`` of their pixels."""
    for got, want in zip(ours, reference):
        order_got, order_want = got["scores"].argsort(descending=True), want["scores"].argsort(descending=True)
        assert got["masks"].shape == want["masks"].shape
        differ = (got["masks"][order_got] != want["masks"][order_want]).float().mean()
        assert differ <= max_fraction, float(differ)


@pytest.mark.parametrize("config", [FASTER, MASK])
def test_wrapper_gives_the_models_detections(config):
    model = spread_model(config, "model.roi_head.test.max_per_img=20")
    images, targets = batch_of_two()
    with torch.no_grad():
        reference = model(images, targets)
        outputs = ExportableTwoStage(model)(*graph_inputs(images, targets))
        proposals, _ = model.rpn(model.neck(model.backbone(images)), targets)
    assert [len(r["boxes"]) for r in reference] == [20, 20] and outputs[3].tolist() == [20, 20]  # the cut binds
    assert len(map_roi_levels(torch.cat(proposals), finest_scale=8).unique()) >= 3  # RoIs are pooled from several levels
    ours = unpad_detections(*outputs)
    assert_same_detections(ours, reference, box_rtol=1e-5, score_atol=1e-6)
    if config == MASK:
        assert outputs[4].shape == (2, 20, 28, 28)
        assert_same_masks(pasted(ours, targets), reference)


# ---- ONNX Runtime -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("config", [FASTER, MASK])
def test_onnx_runtime_matches_pytorch_at_batch_1_and_n(ort, tmp_path, config):
    """Static batch-2 and batch-1 graphs through the runner behind pisa.eval --onnx (masks pasted there)."""
    from pisa.engine.onnx_runner import OnnxDetector
    from pisa.export_model import export_onnx

    model = spread_model(config)
    images, targets = batch_of_two()
    with torch.no_grad():
        export_onnx(model, tmp_path / "b2.onnx", batch=2, size=(96, 128))
        export_onnx(model, tmp_path / "b1.onnx", batch=1, size=(96, 128))
        reference = model(images, targets)
    assert all(len(r["boxes"]) > 10 for r in reference)
    ours = OnnxDetector(tmp_path / "b2.onnx")(images, targets)
    assert_same_detections(ours, reference)
    single = OnnxDetector(tmp_path / "b1.onnx")
    for i in range(2):
        assert_same_detections(single(images[i:i + 1], targets[i:i + 1]), reference[i:i + 1])
    if config == MASK:
        assert_same_masks(ours, reference, max_fraction=1e-3)


@pytest.mark.parametrize("config", [SF_FASTER, SF_MASK])
def test_sampling_free_graph_keeps_its_adaptive_threshold(ort, tmp_path, config):
    """Sampling-Free's R-CNN test threshold (sampling_free.rcnn_score_thr, 1e-4 in place of the 0.3 set
    here) is in the graph: ONNX Runtime gives PyTorch's detections, most of them scored under 0.3."""
    from pisa.engine.onnx_runner import OnnxDetector
    from pisa.export_model import export_onnx

    model = spread_model(config)
    assert model.roi_head.test.score_thr == pytest.approx(1e-4)
    images, targets = batch_of_two()
    with torch.no_grad():
        export_onnx(model, tmp_path / "sf.onnx", batch=2, size=(96, 128))
        reference = model(images, targets)
    low = torch.cat([r["scores"] for r in reference]) < 0.3
    assert low.float().mean() > 0.5
    ours = OnnxDetector(tmp_path / "sf.onnx")(images, targets)
    assert_same_detections(ours, reference)
    if config == SF_MASK:
        assert_same_masks(ours, reference, max_fraction=1e-3)


def test_dynamic_mask_rcnn_graph_matches_pytorch_at_other_batches_and_sizes(ort, tmp_path):
    """One ``--dynamic`` Mask R-CNN graph (the box path is Faster R-CNN's), traced at batch 2 of
    96x128, run at that batch and at batch 1 of a size it never saw (64x160): PyTorch's detections
    and masks on the same input."""
    from pisa.engine.onnx_runner import OnnxDetector
    from pisa.export_model import export_onnx

    model = spread_model(MASK)
    images, targets = batch_of_two()
    torch.manual_seed(2)
    other = torch.randn(1, 3, 64, 160)
    other_targets = [{"img_shape": (64, 160), "scale_factor": (1.0, 1.0), "ori_shape": (64, 160)}]
    with torch.no_grad():
        export_onnx(model, tmp_path / "dynamic.onnx", batch=2, size=(96, 128), dynamic=True)
        detector = OnnxDetector(tmp_path / "dynamic.onnx")
        for batch, metas in ((images, targets), (other, other_targets)):
            reference = model(batch, metas)
            assert all(len(r["boxes"]) > 10 for r in reference)
            ours = detector(batch, metas)
            assert_same_detections(ours, reference)
            assert_same_masks(ours, reference, max_fraction=1e-3)


@pytest.fixture(scope="module")
def trained(tiny_mask_rcnn):
    return tiny_mask_rcnn


def test_eval_onnx_reproduces_the_pytorch_mask_ap(ort, trained, tmp_path):
    from pisa import eval as pisa_eval
    from pisa import export as pisa_export

    checkpoint, args = trained
    graph = pisa_export.main([MASK, str(checkpoint), "--out", str(tmp_path / "mask.onnx"), *args])
    torch_metrics = pisa_eval.main([MASK, str(checkpoint), *args, "--out", str(tmp_path / "torch")])
    onnx_metrics = pisa_eval.main([MASK, "--onnx", str(graph), *args, "--out", str(tmp_path / "onnx")])
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-3), key  # 0.1 AP point
    assert assert_same_results(tmp_path / "onnx", tmp_path / "torch") > 100
    assert torch_metrics["bbox_AP50"] > 0 and torch_metrics["segm_AP50"] > 0


def test_fp16_graph_keeps_the_pytorch_mask_ap(ort, trained, tmp_path):
    """``pisa.export --fp16`` of Mask R-CNN (float16 network, float32 post-processing): box and mask
    AP within 0.3 point of the float32 PyTorch model's."""
    from pisa import eval as pisa_eval
    from pisa import export as pisa_export

    checkpoint, args = trained
    graph = pisa_export.main([MASK, str(checkpoint), "--out", str(tmp_path / "fp16.onnx"), "--fp16", *args])
    torch_metrics = pisa_eval.main([MASK, str(checkpoint), *args, "--out", str(tmp_path / "torch")])
    onnx_metrics = pisa_eval.main([MASK, "--onnx", str(graph), *args, "--out", str(tmp_path / "onnx")])
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=3e-3), key  # 0.3 AP point
