"""ONNX export: the export wrapper against the model's own post-processing, ONNX Runtime against
PyTorch (batch 1 and batch N, images of different sizes padded), ``pisa.eval --onnx`` against the
PyTorch AP of a trained checkpoint, and the CLIs' one-line errors.

Tests that need the ``onnx`` extra (onnx, onnxscript, onnxruntime) skip when it is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pisa.config import load_config
from pisa.export_model import ExportableRetinaNet, unpad_detections
from pisa.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo" / "pisa_retinanet_r18_demo.yaml")
TINY = ["model.neck.out_channels=16", "model.head.feat_channels=16", "model.head.stacked_convs=1"]


def spread_model(*overrides: str) -> torch.nn.Module:
    """A tiny demo RetinaNet with wide head weights: many scores above 0.3, boxes that move visibly,
    and no two detections of equal score (their order would be implementation-defined)."""
    cfg = load_config(CONFIG, [*TINY, "model.test.score_thr=0.3", *overrides], check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.weight.normal_(std=0.1)
        model.head.cls_logits.bias.uniform_(-1.0, 0.5)
        model.head.bbox_reg.weight.normal_(std=0.1)
    return model


def batch_of_two() -> tuple[torch.Tensor, list[dict]]:
    """Two images of different sizes, zero-padded into one 96x128 batch as ``pisa.data`` pads them."""
    torch.manual_seed(1)
    images = torch.zeros(2, 3, 96, 128)
    images[0] = torch.randn(3, 96, 128)
    images[1, :, :70, :100] = torch.randn(3, 70, 100)
    targets = [{"img_shape": (96, 128), "scale_factor": (1.0, 1.0)},
               {"img_shape": (70, 100), "scale_factor": (0.5, 0.7)}]
    return images, targets


def graph_inputs(images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (images, torch.tensor([t["img_shape"] for t in targets], dtype=torch.float32),
            torch.tensor([t["scale_factor"] for t in targets], dtype=torch.float32))


def assert_same_detections(ours: list[dict], reference: list[dict], box_rtol: float = 1e-3,
                           score_atol: float = 1e-4) -> None:
    """Per image the same detections: equal counts, ours by decreasing score, and a one-to-one match
    in which every pair has the same label, scores within ``score_atol`` and boxes within
    ``box_rtol`` relative (1 px floor on the scale of the box). Detections whose scores differ by
    less than ``score_atol`` may come in either order (a barely trained model has many)."""
    assert len(ours) == len(reference)
    for image, (got, want) in enumerate(zip(ours, reference)):
        assert got["boxes"].shape == want["boxes"].shape, f"image {image}"
        assert (got["scores"][:-1] >= got["scores"][1:]).all(), f"image {image}: not by decreasing score"
        scale = want["boxes"].abs().clamp(min=1.0)
        close = ((got["labels"][:, None] == want["labels"][None, :])
                 & ((got["scores"][:, None] - want["scores"][None, :]).abs() <= score_atol)
                 & ((got["boxes"][:, None] - want["boxes"][None, :]).abs() / scale[None]).le(box_rtol).all(-1))
        free = torch.ones(len(want["scores"]), dtype=torch.bool)
        for row in range(close.shape[0]):
            options = torch.nonzero(close[row] & free).reshape(-1)
            assert options.numel() > 0, (f"image {image}: detection {row} (label {int(got['labels'][row])}, score "
                                         f"{float(got['scores'][row]):.6f}) has no counterpart")
            # The nearest score among the candidates, so a tie-group is matched in order.
            best = options[(got["scores"][row] - want["scores"][options]).abs().argmin()]
            free[best] = False


# ---- the export wrapper in PyTorch (no onnx needed) -----------------------------------------------


def test_anchors_built_in_the_graph_equal_the_generator():
    model = spread_model()
    wrapper = ExportableRetinaNet(model)
    generator = model.postprocessor.anchor_generator
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    expected = generator.grid_anchors(sizes)
    for level, size in enumerate(sizes):
        torch.testing.assert_close(wrapper.level_anchors(level, torch.zeros(1, 1, *size)), expected[level],
                                   rtol=0, atol=0)


def test_wrapper_gives_the_models_detections():
    """Batched single-call NMS with per-(image, class) offsets == the model's per-image NMS."""
    model = spread_model()
    images, targets = batch_of_two()
    with torch.no_grad():
        reference = model(images, targets)
        boxes, scores, labels, num_dets = ExportableRetinaNet(model)(*graph_inputs(images, targets))
    assert [len(r["boxes"]) for r in reference] == [100, 100]  # the max_per_img cut binds
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and labels.dtype == torch.int64
    assert num_dets.tolist() == [100, 100]
    assert_same_detections(unpad_detections(boxes, scores, labels, num_dets), reference, box_rtol=1e-6,
                           score_atol=0)


def test_wrapper_pads_short_and_empty_images():
    """Fewer detections than slots: counts per image, zero boxes/scores and label -1 after them."""
    model = spread_model("model.test.score_thr=0.7", "model.test.max_per_img=400")
    images, targets = batch_of_two()
    images[1] = 0  # a blank second image
    with torch.no_grad():
        reference = model(images, targets)
        boxes, scores, labels, num_dets = ExportableRetinaNet(model)(*graph_inputs(images, targets))
    counts = [len(r["boxes"]) for r in reference]
    assert num_dets.tolist() == counts and 0 < counts[0] < 400 and counts[1] == 0
    for i, count in enumerate(counts):
        assert (labels[i, count:] == -1).all() and (scores[i, count:] == 0).all() and (boxes[i, count:] == 0).all()
    assert_same_detections(unpad_detections(boxes, scores, labels, num_dets), reference, box_rtol=1e-6,
                           score_atol=0)


def test_float16_network_keeps_float32_post_processing():
    model = spread_model()
    wrapper = ExportableRetinaNet(model, network_dtype=torch.float16)
    assert next(wrapper.head.parameters()).dtype == torch.float16
    assert next(model.head.parameters()).dtype == torch.float32  # the model itself is untouched
    images, targets = batch_of_two()
    with torch.no_grad():
        boxes, scores, labels, num_dets = wrapper(*graph_inputs(images, targets))
    assert boxes.dtype == scores.dtype == torch.float32 and num_dets.min() > 0


# ---- ONNX Runtime -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def run_graph(ort, path: Path, images: torch.Tensor, targets: list[dict]) -> list[dict]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(("images", "img_shapes", "scale_factors"), (t.numpy() for t in graph_inputs(images, targets))))
    return unpad_detections(*session.run(None, feeds))


def test_onnx_runtime_matches_pytorch_at_batch_n(ort, tmp_path):
    """A static batch-2 graph; the two images have different sizes inside the padded batch."""
    from pisa.export_model import export_onnx

    model = spread_model()
    images, targets = batch_of_two()
    path = tmp_path / "batch2.onnx"
    with torch.no_grad():
        export_onnx(model, path, batch=2, size=(96, 128))
        reference = model(images, targets)
    assert not (tmp_path / "batch2.onnx.data").exists()  # weights inside the one file
    assert_same_detections(run_graph(ort, path, images, targets), reference)



def test_dynamic_graph_matches_pytorch_at_other_batches_and_sizes(ort, tmp_path):
    """One ``--dynamic`` graph, traced at batch 2 of 96x128, run at that batch, at batch 1 of a size
    it never saw (64x96) and at batch 3 of 128x160: each time PyTorch's detections on the same input."""
    from pisa.export_model import export_onnx

    model = spread_model()
    path = tmp_path / "dynamic.onnx"
    images, targets = batch_of_two()
    torch.manual_seed(2)
    small = torch.randn(1, 3, 64, 96)
    large = torch.randn(3, 3, 128, 160)
    large[2, :, 100:] = 0
    large_targets = [{"img_shape": (128, 160), "scale_factor": (1.0, 1.0)}] * 2 + [
        {"img_shape": (100, 160), "scale_factor": (2.0, 2.0)}]
    with torch.no_grad():
        export_onnx(model, path, batch=2, size=(96, 128), dynamic=True)
        cases = [(images, targets), (small, [{"img_shape": (64, 96), "scale_factor": (1.0, 1.0)}]),
                 (large, large_targets)]
        for batch, metas in cases:
            reference = model(batch, metas)
            assert all(len(r["boxes"]) > 0 for r in reference)
            assert_same_detections(run_graph(ort, path, batch, metas), reference)


# ---- CLIs on a trained checkpoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RetinaNet trained for 32 iterations on 16 demo images (96 px): low but non-zero AP,
    every val image with 100 scored detections (score_thr 0), so AP depends on every score's rank."""
    from pisa import train as pisa_train
    from pisa.data.synthetic import ensure_demo_dataset

    paths = ensure_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", num_train=16, num_val=4)
    work = tmp_path_factory.mktemp("run")
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.train_transforms.scales=[[96,96]]", "data.test_transforms.scales=[[96,96]]",
            "data.batch_size=4", "data.workers=0", "schedule.epochs=8", "schedule.steps=[]",
            "schedule.warmup_iters=4", "optim.ref_batch=4", "train.eval_interval=0", "train.ckpt_interval=0",
            "train.log_interval=8", *TINY, "model.test.score_thr=0.0", f"train.work_dir={work}"]
    args = [arg for s in sets for arg in ("--set", s)]
    pisa_train.main([CONFIG, *args])
    return work / "latest.pth", args, paths


def export_args(checkpoint: Path, args: list[str], out: Path) -> list[str]:
    return [CONFIG, str(checkpoint), "--out", str(out), *args]


@pytest.fixture(scope="module")
def exported(ort, trained, tmp_path_factory):
    """The CLI's default export: a static batch-1 graph at the config's test size (96x96)."""
    from pisa import export as pisa_export

    checkpoint, args, _ = trained
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert pisa_export.main(export_args(checkpoint, args, out)) == out
    return out


def test_onnx_detector_matches_pytorch_on_demo_images_at_batch_1(exported, trained):
    """The runner behind pisa.eval --onnx, image by image through the real val loader."""
    from pisa import eval as pisa_eval
    from pisa.engine import dist
    from pisa.engine.onnx_runner import OnnxDetector

    checkpoint, args, _ = trained
    cfg = load_config(CONFIG, args[1::2])
    model = pisa_eval.build_model_for_checkpoint(cfg)
    pisa_eval.load_weights_strict(model, str(checkpoint), cfg, trust=False)
    loader, _ = pisa_eval.build_val_parts(cfg, dist.DistInfo())
    detector = OnnxDetector(exported)
    model.eval()
    compared = 0
    with torch.no_grad():
        for images, targets in loader:
            assert images.shape == (1, 3, 96, 96)
            reference = model(images, targets)
            assert_same_detections(detector(images, targets), reference)
            compared += len(reference[0]["boxes"])
    assert compared == 4 * 100


def test_eval_onnx_reproduces_the_pytorch_ap(exported, trained, tmp_path):
    from pisa import eval as pisa_eval

    checkpoint, args, _ = trained
    torch_metrics = pisa_eval.main([CONFIG, str(checkpoint), *args, "--out", str(tmp_path / "torch")])
    onnx_metrics = pisa_eval.main([CONFIG, "--onnx", str(exported), *args, "--out", str(tmp_path / "onnx")])
    assert torch_metrics["bbox_AP50"] > 0  # detections that hit: the comparison can fail
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-3)  # 0.1 AP point
    assert_same_results(tmp_path / "onnx", tmp_path / "torch")



def test_fp16_graph_keeps_the_pytorch_ap(ort, trained, tmp_path):
    """``pisa.export --fp16`` (float16 network, float32 post-processing) through ``pisa.eval --onnx``:
    AP, AP50 and AP75 within 0.3 point of the float32 PyTorch model's."""
    from pisa import eval as pisa_eval
    from pisa import export as pisa_export

    import onnx

    checkpoint, args, _ = trained
    graph = pisa_export.main(export_args(checkpoint, args, tmp_path / "fp16.onnx") + ["--fp16"])
    weights = onnx.load(str(graph)).graph.initializer
    assert sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights) > len(weights) // 2  # the network is fp16
    torch_metrics = pisa_eval.main([CONFIG, str(checkpoint), *args, "--out", str(tmp_path / "torch")])
    onnx_metrics = pisa_eval.main([CONFIG, "--onnx", str(graph), *args, "--out", str(tmp_path / "onnx")])
    assert torch_metrics["bbox_AP50"] > 0
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=3e-3), key  # 0.3 AP point


def assert_same_results(ours_dir: Path, theirs_dir: Path, iou_type: str = "bbox") -> int:
    """The two evaluations wrote the same detections to ``results_<iou_type>.json`` (the order of
    near-equal scores may differ): image, class and score agree. Returns how many there are."""
    ours = json.loads((ours_dir / f"results_{iou_type}.json").read_text())
    theirs = json.loads((theirs_dir / f"results_{iou_type}.json").read_text())
    key = lambda r: (r["image_id"], r["category_id"], r["score"])  # noqa: E731
    ours, theirs = sorted(map(key, ours)), sorted(map(key, theirs))
    assert len(ours) > 0 and [k[:2] for k in ours] == [k[:2] for k in theirs]
    assert max(abs(a[2] - b[2]) for a, b in zip(ours, theirs)) <= 1e-4
    return len(ours)


def one_line_error(capsys, run) -> str:
    """``run()`` must exit with status 1 after printing one line to stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        run()
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_export_of_a_missing_checkpoint_is_a_one_line_error_by_subprocess(trained, tmp_path):
    _, args, _ = trained
    proc = subprocess.run([sys.executable, "-m", "pisa.export", *export_args(tmp_path / "nope.pth", args,
                                                                              tmp_path / "x.onnx")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "nope.pth" in proc.stderr and "does not exist" in proc.stderr


def test_export_without_onnxscript_names_the_extra(trained, tmp_path, monkeypatch, capsys):
    from pisa import export as pisa_export

    checkpoint, args, _ = trained
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # a None entry makes the import fail as if absent
    err = one_line_error(capsys, lambda: pisa_export.main(export_args(checkpoint, args, tmp_path / "x.onnx")))
    assert "onnxscript" in err and "pisa-det[onnx]" in err


def test_eval_onnx_without_onnxruntime_names_the_extra(trained, tmp_path, monkeypatch, capsys):
    from pisa import eval as pisa_eval

    _, args, _ = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = one_line_error(capsys, lambda: pisa_eval.main([CONFIG, "--onnx", str(tmp_path / "x.onnx"), *args]))
    assert "onnxruntime" in err and "pisa-det[onnx]" in err


def test_eval_onnx_of_a_missing_file_is_a_one_line_error(ort, trained, tmp_path, capsys):
    from pisa import eval as pisa_eval

    _, args, _ = trained
    err = one_line_error(capsys, lambda: pisa_eval.main([CONFIG, "--onnx", str(tmp_path / "x.onnx"), *args]))
    assert "x.onnx does not exist" in err and "pisa.export" in err
