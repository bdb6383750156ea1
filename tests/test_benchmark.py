"""pisa.benchmark: the ratio table and its verdicts, torchvision's RetinaNet with pisa's weights, and
a smoke run of one detector row at a tiny size."""

from __future__ import annotations

import json

import pytest
import torch

from pisa import benchmark
from pisa.benchmark import Row, closing_note, ratios


def test_ratios_and_verdicts():
    rows = [Row("retinanet", "train step, batch 2", {"pisa baseline": 100.0, "pisa PISA": 102.0, "torchvision": 110.0}),
            Row("faster_rcnn", "train step, batch 2", {"pisa baseline": 200.0, "pisa PISA": 220.0,
                                                       "torchvision": 180.0}),
            Row("retinanet", "inference, batch 1", {"pisa": 50.0, "torchvision": 40.0}),
            Row("all", "COCO bbox evaluation per image", {"pisa": 3.0})]
    got = {(r["detector"], r["phase"][:5], r["ratio"]): (round(r["value"], 4), r["target"]) for r in ratios(rows)}
    assert got == {
        ("retinanet", "train", "pisa / torchvision"): (0.9091, 1.0),       # 100 / 110
        ("retinanet", "train", "pisa PISA / torchvision"): (0.9273, 1.0),  # 102 / 110
        ("retinanet", "train", "PISA / baseline"): (1.02, 1.03),           # one-stage target 3 %
        ("faster_rcnn", "train", "pisa / torchvision"): (1.1111, 1.0),     # 200 / 180
        ("faster_rcnn", "train", "pisa PISA / torchvision"): (1.2222, 1.0),
        ("faster_rcnn", "train", "PISA / baseline"): (1.1, 1.08),          # two-stage target 8 %
        ("retinanet", "infer", "pisa / torchvision"): (1.25, 1.0),
    }
    note = closing_note(ratios(rows), ["ssd300: not built yet"])
    assert note.count("holds") == 3 and note.count("misses") == 4 and "skipped: ssd300" in note


def test_torchvision_retinanet_gets_pisas_weights():
    """Every torchvision tensor comes from pisa's model (strict load), so both compute the same head outputs."""
    from pisa.models.retina_head import flatten_levels

    baseline, _, cfg = benchmark.pisa_models(benchmark.DETECTORS[0], torch.device("cpu"))
    tv, same_weights = benchmark.torchvision_retinanet(cfg, baseline, 64)
    assert same_weights
    images = torch.randn(1, 3, 64, 64)
    baseline.eval()
    tv.eval()
    with torch.no_grad():
        features = baseline.neck(baseline.backbone(images))
        tv_features = list(tv.backbone(images).values())
        cls_scores, _ = baseline.head(features)
        tv_out = tv.head(tv_features)
    for ours, theirs in zip(features[:4], tv_features[:4]):  # P7: torchvision applies a ReLU before its conv
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    first_four = sum(s.shape[-2] * s.shape[-1] * 9 for s in cls_scores[:4])  # anchors of P3-P6
    torch.testing.assert_close(flatten_levels(cls_scores[:4], 80), tv_out["cls_logits"][:, :first_four],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_quick_smoke_of_the_retinanet_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = benchmark.main(["--detectors", "retinanet", "--size", "64", "--warmup", "0", "--repeat", "1",
                             "--data-images", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    phases = [(r["detector"], r["phase"]) for r in result["rows"]]
    assert phases[:3] == [("retinanet", "train step, batch 2"), ("retinanet", "inference, batch 1"),
                          ("retinanet", "inference, batch 2")]
    assert set(result["rows"][0]["ms"]) == {"pisa baseline", "pisa PISA", "torchvision"}
    assert all(v > 0 for row in result["rows"] for v in row["ms"].values())
    assert {r["ratio"] for r in result["ratios"]} == {"pisa / torchvision", "pisa PISA / torchvision",
                                                      "PISA / baseline"}
    assert "ratios (target: at most the given value)" in printed and result["environment"]["cpu_count"]


def test_torchvision_faster_rcnn_gets_pisas_weights_and_the_calibrated_rpn():
    """Strict load of every torchvision tensor; same FPN features, RPN outputs and box-head logits
    (class order adapted); the rescaled RPN's objectness logits have std 1 on the calibration input."""
    spec = next(s for s in benchmark.DETECTORS if s.name == "faster_rcnn")
    baseline, _, cfg = benchmark.pisa_models(spec, torch.device("cpu"))
    images = torch.randn(1, 3, 64, 64)
    benchmark.calibrate_rpn(baseline, images)
    tv, same_weights = benchmark.torchvision_two_stage(False)(cfg, baseline, 64)
    assert same_weights and tv.rpn.min_size == 0.0 and tv.rpn._post_nms_top_n["training"] == 1000
    baseline.eval()
    tv.eval()
    with torch.no_grad():
        features = baseline.neck(baseline.backbone(images))
        tv_features = list(tv.backbone(images).values())
        objectness, deltas = baseline.rpn.head(features)
        tv_objectness, tv_deltas = tv.rpn.head(tv_features)
        assert abs(torch.cat([o.flatten() for o in objectness]).std().item() - 1.0) < 1e-3
        pooled = torch.randn(3, 256, 7, 7)
        logits, _ = baseline.roi_head.bbox_head(pooled)
        tv_logits, _ = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
    for ours, theirs in zip(features, tv_features):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(objectness + deltas, tv_objectness + tv_deltas):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[:, :80], tv_logits[:, 1:])  # background: last in pisa, first in torchvision
    torch.testing.assert_close(logits[:, 80], tv_logits[:, 0])


def test_torchvision_ssd300_gets_pisas_weights():
    """Strict load of every torchvision tensor; the same six feature maps, and the same class logits
    (background rotated from last to first in each anchor's block) and deltas on all 8732 anchors."""
    from pisa.models.retina_head import flatten_levels

    spec = next(s for s in benchmark.DETECTORS if s.name == "ssd300")
    baseline, _, cfg = benchmark.pisa_models(spec, torch.device("cpu"))
    with torch.no_grad():  # a non-zero background logit, so that a wrong rotation shows
        for conv in baseline.head.cls_convs:
            conv.bias.normal_()
    tv, same_weights = benchmark.torchvision_ssd300(cfg, baseline, 300)
    assert same_weights and tv.score_thresh == cfg["model"]["test"]["score_thr"]
    baseline.eval()
    tv.eval()
    images = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        features = baseline.backbone(images)
        tv_features = list(tv.backbone(images).values())
        cls_scores, bbox_preds = baseline.head(features)
        tv_out = tv.head(tv_features)
    for ours, theirs in zip(features, tv_features):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    logits = flatten_levels(cls_scores, 81).reshape(-1, 81)
    deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4)
    assert logits.shape == tv_out["cls_logits"][0].shape == (8732, 81)
    torch.testing.assert_close(logits[:, :80], tv_out["cls_logits"][0][:, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[:, 80], tv_out["cls_logits"][0][:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deltas, tv_out["bbox_regression"][0], rtol=1e-4, atol=1e-5)
