"""ONNX export of SSD: the export wrapper against the model's own ``SSDPostProcessor``, ONNX Runtime
against PyTorch (batch 1 and batch N with a smaller image padded), ``pisa.eval --onnx`` against the
PyTorch AP of a trained checkpoint.

Tests that need the ``onnx`` extra (onnx, onnxscript, onnxruntime) skip when it is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pisa.config import load_config
from pisa.export_model import ExportableSSD, unpad_detections
from pisa.models import build_model
from test_export import assert_same_detections, assert_same_results, graph_inputs, run_graph

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo" / "ssd_demo.yaml")
# A 64 px SSD (levels of 8, 4, 2 and 1 cells) at a sixteenth of VGG16's width: an export takes seconds.
TINY = ["model.backbone.width=0.0625", "model.input_size=64", "data.ssd_transforms.size=64"]


def spread_model(*overrides: str) -> torch.nn.Module:
    """A tiny SSD with wide head weights: many foreground scores above 0.3 and boxes that move
    visibly, no two detections of equal score."""
    cfg = load_config(CONFIG, [*TINY, "model.test.score_thr=0.3", *overrides], check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for conv in (*model.head.cls_convs, *model.head.reg_convs):
            conv.weight.normal_(std=0.01)
    return model


def batch_of_two() -> tuple[torch.Tensor, list[dict]]:
    """A full 64x64 image and a 40x50 one zero-padded into the same batch (its boxes clip to 40x50)."""
    torch.manual_seed(1)
    images = torch.zeros(2, 3, 64, 64)
    images[0] = torch.randn(3, 64, 64)
    images[1, :, :40, :50] = torch.randn(3, 40, 50)
    targets = [{"img_shape": (64, 64), "scale_factor": (1.0, 1.0)},
               {"img_shape": (40, 50), "scale_factor": (0.5, 0.8)}]
    return images, targets


def test_wrapper_gives_the_models_detections():
    model = spread_model()
    images, targets = batch_of_two()
    with torch.no_grad():
        reference = model(images, targets)
        outputs = ExportableSSD(model)(*graph_inputs(images, targets))
    counts = [len(r["boxes"]) for r in reference]
    assert 20 < counts[0] < 200 and 20 < counts[1] < 200  # scores spread over the threshold, no cut
    assert outputs[3].tolist() == counts
    assert reference[1]["boxes"][:, 2].max() <= 50 / 0.5 and reference[1]["boxes"][:, 3].max() <= 40 / 0.8
    assert_same_detections(unpad_detections(*outputs), reference, box_rtol=1e-6, score_atol=0)


def test_wrapper_keeps_the_top_nms_pre_anchors_per_level():
    """nms_pre = 5: per level the 5 anchors of highest max foreground score, as the model keeps them."""
    model = spread_model("model.test.nms_pre=5", "model.test.score_thr=0.1")
    images, targets = batch_of_two()
    with torch.no_grad():
        reference = model(images, targets)
        outputs = ExportableSSD(model)(*graph_inputs(images, targets))
    # 4 levels x 5 anchors = 20 boxes at most before NMS; every class of each may survive.
    assert all(0 < len(r["boxes"]) <= 20 * 4 for r in reference)
    assert_same_detections(unpad_detections(*outputs), reference, box_rtol=1e-6, score_atol=0)


# ---- ONNX Runtime -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def test_onnx_runtime_matches_pytorch_at_batch_1_and_n(ort, tmp_path):
    from pisa.export_model import export_onnx

    model = spread_model()
    images, targets = batch_of_two()
    with torch.no_grad():
        export_onnx(model, tmp_path / "b2.onnx", batch=2, size=(64, 64))
        export_onnx(model, tmp_path / "b1.onnx", batch=1, size=(64, 64))
        reference = model(images, targets)
    assert_same_detections(run_graph(ort, tmp_path / "b2.onnx", images, targets), reference)
    for i in range(2):
        assert_same_detections(run_graph(ort, tmp_path / "b1.onnx", images[i:i + 1], targets[i:i + 1]),
                               reference[i:i + 1])



def test_dynamic_batch_graph_matches_pytorch_at_batch_1_and_3(ort, tmp_path):
    """SSD's ``--dynamic`` graph has a dynamic batch (its layers fix the input size)."""
    from pisa.export_model import export_onnx

    model = spread_model()
    images, targets = batch_of_two()
    three = torch.cat([images, images[:1].flip(-1)])
    with torch.no_grad():
        export_onnx(model, tmp_path / "dynamic.onnx", batch=1, size=(64, 64), dynamic=True)
        for batch, metas in ((images[1:], targets[1:]), (three, [*targets, targets[0]])):
            assert_same_detections(run_graph(ort, tmp_path / "dynamic.onnx", batch, metas), model(batch, metas))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SSD trained for 24 iterations on 16 demo images (64 px), scored with 200 detections per
    val image (score_thr 0)."""
    from pisa import train as pisa_train
    from pisa.data.synthetic import ensure_demo_dataset

    paths = ensure_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", num_train=16, num_val=4)
    work = tmp_path_factory.mktemp("run")
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.batch_size=4", "data.workers=0", "schedule.epochs=6", "schedule.steps=[]",
            "schedule.warmup_iters=4", "optim.ref_batch=4", "optim.lr=0.01", "train.eval_interval=0",
            "train.ckpt_interval=0", "train.log_interval=8", *TINY, "model.test.score_thr=0.0",
            f"train.work_dir={work}"]
    args = [arg for s in sets for arg in ("--set", s)]
    pisa_train.main([CONFIG, *args])
    return work / "latest.pth", args


def test_eval_onnx_reproduces_the_pytorch_ap(ort, trained, tmp_path):
    from pisa import eval as pisa_eval
    from pisa import export as pisa_export

    checkpoint, args = trained
    graph = pisa_export.main([CONFIG, str(checkpoint), "--out", str(tmp_path / "ssd.onnx"), *args])
    torch_metrics = pisa_eval.main([CONFIG, str(checkpoint), *args, "--out", str(tmp_path / "torch")])
    onnx_metrics = pisa_eval.main([CONFIG, "--onnx", str(graph), *args, "--out", str(tmp_path / "onnx")])
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-3)  # 0.1 AP point
    # So briefly trained, this SSD's AP is 0; the detections themselves must agree.
    assert assert_same_results(tmp_path / "onnx", tmp_path / "torch") == 4 * 200
