"""Sampling-Free Faster / Mask R-CNN: the RPN loss on a hand-countable toy, guided scaling of the RPN and
the R-CNN (value and gradient direction), every proposal in the CE, bias init, test threshold, empty
images, gradients, config errors, the bias script and a two-iteration training run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pisa.config import ConfigError, load_config
from pisa.data.synthetic import ensure_demo_dataset
from pisa.models import build_model
from pisa.models.anchors import AnchorGenerator
from pisa.models.assigners import MaxIoUAssigner
from pisa.models.box_coder import DeltaXYWHCoder
from pisa.models.roi_heads import RoIHead
from pisa.models.rpn import RPN, ProposalSettings, RPNHead
from pisa.models.samplers import PseudoSampler, RandomSampler
from pisa.models.sampling_free import SamplingFreeRoIHead, SamplingFreeRPN, guided_loss_scaling, prior_bias
from test_two_stage import _target, batch  # the shared two-image batch

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 3
CONFIGS = {"faster": "configs/sampling_free/sampling_free_faster_rcnn_r50_fpn_1x_coco.yaml",
           "mask": "configs/sampling_free/sampling_free_mask_rcnn_r50_fpn_1x_coco.yaml"}
DEMO = REPO / "configs/demo/sampling_free_faster_rcnn_r18_demo.yaml"


def tiny_cfg(kind: str = "faster", *overrides: str) -> dict:
    """A shipped Sampling-Free config shrunk to ResNet-18, 16-channel FPN/RPN, 32-wide FCs, few proposals."""
    small = ["model.backbone.type=resnet18", "model.backbone.pretrained=null", f"model.num_classes={NUM_CLASSES}",
             "model.neck.out_channels=16", "model.rpn.feat_channels=16", "model.roi_head.fc_channels=32",
             "model.roi_head.sampler.num=16", "model.rpn.train.nms_pre=200", "model.rpn.test={nms_pre: 200, "
             "max_per_img: 100}", "model.rpn.anchors.scales=[4.0]", "data.batch_size=2",
             "sampling_free.rpn_proposals_per_batch=200"]
    if kind == "mask":
        small += ["model.roi_head.mask.conv_channels=8", "model.roi_head.mask.num_convs=2"]
    return load_config(str(REPO / CONFIGS[kind]), small + list(overrides), check_paths=False)


def tiny_model(kind: str = "faster", *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(kind, *overrides)).train()


# ---- RPN ----------------------------------------------------------------------------------------

def toy_rpn(pi: float) -> SamplingFreeRPN:
    """One 16 px anchor per 16 px cell, the reference RPN matcher (0.7 / 0.3, min_pos 0.3, low quality),
    objectness and delta convs zeroed: every logit is the prior bias, every delta 0."""
    head = RPNHead(4, 4, num_anchors=1)
    with torch.no_grad():
        for conv in (head.rpn_cls, head.rpn_reg):
            conv.weight.zero_()
            conv.bias.zero_()
        head.rpn_cls.bias.fill_(prior_bias(pi))
    proposals = ProposalSettings(nms_pre=10, max_per_img=10)
    return SamplingFreeRPN(head, AnchorGenerator([16], [1.0], scales=[1.0]), DeltaXYWHCoder([0.0] * 4, [1.0] * 4),
                           MaxIoUAssigner(0.7, 0.3, 0.3), PseudoSampler(), train_proposals=proposals,
                           test_proposals=proposals, bbox_loss="smooth_l1", bbox_beta=1 / 9, bbox_weight=0.5,
                           pad_divisor=16)


def test_rpn_loss_on_a_hand_countable_toy():
    """A 32 x 48 image (2 x 3 anchors [16x-8, 16y-8, 16x+8, 16y+8]), GT [10, 8, 40, 24]:
      anchor (2, 1) = [24, 8, 40, 24], IoU 256/480 = 0.533: below 0.7 but the GT's best and >= 0.3 ->
      positive (low-quality match); anchor (1, 1) = [8, 8, 24, 24], IoU 224/512 = 0.4375, between 0.3 and
      0.7 -> left out; the 4 others do not overlap -> background. 5 anchors train, none is sampled away.
    BCE at p = pi = 0.01 (all logits are the bias): positive -ln 0.01 = 4.6051702, each negative
      -ln 0.99 = 0.0100503; plain loss = (4.6051702 + 4 x 0.0100503) / #pos 1 = 4.6453715.
    SmoothL1 beta 1/9 of the positive's deltas (0 predicted): anchor centre (32, 16), 16 x 16; GT centre
      (25, 16), 30 x 16 -> targets (-7/16, 0, ln(30/16), 0) = (-0.4375, 0, 0.6286087, 0); |x| - beta/2 on
      the two non-zero ones: 0.3819444 + 0.5730531 = 0.9549975; x 0.5 / (4 x 1) = 0.1193747.
    """
    rpn = toy_rpn(0.01)
    features = [torch.randn(1, 4, 2, 3)]
    objectness, deltas = rpn.head(features)
    target = _target([[10, 8, 40, 24]], [0], (32, 48))
    sizes, anchors = [(2, 3)], rpn.anchor_generator.anchors([(2, 3)])
    t = rpn.get_targets(anchors, sizes, [target])
    assert sorted(t.sample_inds.tolist()) == [0, 1, 2, 3, 5] and t.pos_inds.tolist() == [5]
    plain_cls, plain_reg = rpn.plain_losses(objectness, deltas, [target])
    assert plain_cls.item() == pytest.approx(4.6453715, rel=1e-6)
    assert plain_reg.item() == pytest.approx(0.1193747, rel=1e-6)
    losses = rpn.loss(objectness, deltas, [target])
    assert losses["loss_rpn_cls"].item() == pytest.approx(0.1193747, rel=1e-6)  # guided: L_reg's value
    assert losses["loss_rpn_bbox"].item() == pytest.approx(0.1193747, rel=1e-6)


def test_rpn_guided_scaling_keeps_the_gradient_direction():
    model = tiny_model()
    images, targets = batch()
    features = model.neck(model.backbone(images))
    objectness, deltas = model.rpn.head(features)
    plain_cls, plain_reg = model.rpn.plain_losses(objectness, deltas, targets)
    guided = model.rpn.loss(objectness, deltas, targets)
    assert guided["loss_rpn_cls"].item() == pytest.approx(plain_reg.item(), rel=1e-6)
    assert guided["loss_rpn_bbox"].item() == pytest.approx(plain_reg.item(), rel=1e-6)
    weight = model.rpn.head.rpn_cls.weight
    (g_plain,) = torch.autograd.grad(plain_cls, weight, retain_graph=True)
    (g_guided,) = torch.autograd.grad(guided["loss_rpn_cls"], weight)
    ratio = (plain_reg / plain_cls).item()
    assert ratio != pytest.approx(1.0)  # the scaling is not the identity here
    assert torch.allclose(g_guided, ratio * g_plain, rtol=1e-4, atol=1e-12)


def test_rpn_bias_proposals_and_test_threshold_from_the_block():
    model = tiny_model()
    assert isinstance(model.rpn, SamplingFreeRPN) and isinstance(model.rpn.sampler, PseudoSampler)
    # The shipped config's pi 2e-4: bias -ln(4999) = -8.516993.
    assert torch.allclose(model.rpn.head.rpn_cls.bias, torch.full((3,), -8.516993), atol=1e-6)
    assert model.rpn.train_proposals.max_per_img == 100  # 200 per device batch / 2 images
    assert model.rpn.test_proposals.max_per_img == 100  # test proposals as model.rpn.test
    assert isinstance(model.roi_head, SamplingFreeRoIHead) and isinstance(model.roi_head.sampler, PseudoSampler)
    assert model.roi_head.test.score_thr == 1e-4 and model.roi_head.test.nms_iou == 0.5
    # The softmax R-CNN head keeps its usual init (zero biases).
    assert torch.equal(model.roi_head.bbox_head.fc_cls.bias, torch.zeros(NUM_CLASSES + 1))
    # pi null: the cached RPN value 2e-4; an explicit value is used as given.
    assert tiny_model("faster", "sampling_free.pi=null").rpn.head.rpn_cls.bias[0].item() == pytest.approx(
        prior_bias(2e-4), abs=1e-6)
    assert tiny_model("faster", "sampling_free.pi=0.01").rpn.head.rpn_cls.bias[0].item() == pytest.approx(
        -math.log(99), abs=1e-6)


def test_absent_block_keeps_the_samplers_and_thresholds():
    model = tiny_model("faster", "sampling_free=null")
    assert type(model.rpn) is RPN and isinstance(model.rpn.sampler, RandomSampler)
    assert type(model.roi_head) is RoIHead and isinstance(model.roi_head.sampler, RandomSampler)
    assert model.roi_head.test.score_thr == 0.05
    assert torch.equal(model.rpn.head.rpn_cls.bias, torch.zeros(3))


# ---- R-CNN --------------------------------------------------------------------------------------

def _rcnn_targets_and_losses(model, images, targets):
    """The RoI head's targets and outputs of one training step (the head's plain_losses is spied on)."""
    seen = {}
    plain = model.roi_head.plain_losses

    def spy(logits, deltas, t):
        seen.update(logits=logits, deltas=deltas, t=t)
        return plain(logits, deltas, t)

    model.roi_head.plain_losses = spy
    features = model.neck(model.backbone(images))
    proposals, _ = model.rpn(features, targets)
    losses = model.roi_head(features, proposals, targets)
    return proposals, seen, losses


def test_every_proposal_reaches_the_cross_entropy():
    """Thresholds 0.5 / 0.5 leave nothing between: each proposal and each prepended GT is trained, far more
    than the 16 RoIs per image model.roi_head.sampler.num would give."""
    model = tiny_model()
    images, targets = batch()
    proposals, seen, _ = _rcnn_targets_and_losses(model, images, targets)
    expected = sum(p.shape[0] + t["boxes"].shape[0] for p, t in zip(proposals, targets))
    assert seen["t"].labels.numel() == seen["logits"].shape[0] == expected
    assert expected > 2 * 16 and bool((seen["t"].label_weights == 1).all())


def test_rcnn_guided_scaling_is_twice_the_regression_loss_and_keeps_the_direction():
    """fc_cls zeroed: every RoI's softmax is uniform over C + 1 = 4 columns, so the plain CE mean is ln 4."""
    model = tiny_model()
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.weight.zero_()
    images, targets = batch()
    _, seen, losses = _rcnn_targets_and_losses(model, images, targets)
    plain_cls, plain_reg = model.roi_head.plain_losses(seen["logits"], seen["deltas"], seen["t"])
    assert plain_cls.item() == pytest.approx(math.log(4), rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(plain_reg.item(), rel=1e-6) and plain_reg.item() > 0
    assert losses["loss_cls"].item() == pytest.approx(2 * plain_reg.item(), rel=1e-6)
    (g_plain,) = torch.autograd.grad(plain_cls, seen["logits"], retain_graph=True)
    (g_guided,) = torch.autograd.grad(losses["loss_cls"], seen["logits"], retain_graph=True)
    assert torch.allclose(g_guided, 2 * (plain_reg / plain_cls).item() * g_plain, rtol=1e-4, atol=1e-12)
    # The same helper as RetinaNet's, times 2.
    assert losses["loss_cls"].item() == pytest.approx(2 * guided_loss_scaling(plain_cls, plain_reg).item(), rel=1e-6)


# ---- whole model ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_every_trainable_parameter_gets_a_gradient(kind):
    model = tiny_model(kind)
    images, targets = batch(masks=kind == "mask")
    losses = model(images, targets)
    expected = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} | ({"loss_mask"} if kind == "mask" else set())
    assert set(losses) == expected
    assert losses["loss_rpn_cls"].item() == pytest.approx(losses["loss_rpn_bbox"].item(), rel=1e-6)
    assert losses["loss_cls"].item() == pytest.approx(2 * losses["loss_bbox"].item(), rel=1e-6)
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_images_without_gts_give_finite_attached_losses(kind):
    """No positive anywhere: L_reg = 0 exactly, so both guided classification losses are 0 (as the authors'
    code, without its 0/0); every loss stays attached to the graph and the gradients are finite."""
    model = tiny_model(kind)
    images, targets = batch(masks=kind == "mask", empty=True)
    losses = model(images, targets)
    for name, value in losses.items():
        assert torch.isfinite(value) and value.requires_grad, name
    assert losses["loss_rpn_bbox"].item() == 0.0 and losses["loss_rpn_cls"].item() == 0.0
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_config_errors():
    with pytest.raises(ConfigError, match="'pisa' and 'sampling_free'.*faster_rcnn"):
        build_model(tiny_cfg("faster", "pisa={isr_p: {k: 2.0, bias: 0.0}}"))
    with pytest.raises(ConfigError, match="'pisa' and 'sampling_free'.*mask_rcnn"):
        build_model(tiny_cfg("mask", "pisa={carl: {k: 1.0, bias: 0.2}}"))
    with pytest.raises(ConfigError, match="model.rpn.loss_bbox.type: smooth_l1"):
        build_model(tiny_cfg("faster", "model.rpn.loss_bbox.type=l1"))
    with pytest.raises(ConfigError, match="model.roi_head.loss_bbox.type: smooth_l1"):
        build_model(tiny_cfg("faster", "model.roi_head.loss_bbox.type=l1"))
    with pytest.raises(ConfigError, match="sampling_free.rpn_proposals_per_batch"):
        tiny_cfg("faster", "sampling_free.rpn_proposals_per_batch=0")
    # Unsupported model types refuse the block: PAA and SSD.
    paa = load_config(str(REPO / "configs/demo/paa_r18_demo.yaml"), ["sampling_free={}"], check_paths=False)
    with pytest.raises(ConfigError, match="sampling_free"):
        build_model(paa)
    ssd = load_config(str(REPO / "configs/demo/ssd_demo.yaml"), ["sampling_free={}"], check_paths=False)
    with pytest.raises(ConfigError, match="'sampling_free' is for model.type retinanet, faster_rcnn and mask_rcnn"):
        build_model(ssd)


# ---- the bias script and a training run ---------------------------------------------------------

def test_bias_script_prints_the_rpn_prior(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts/sampling_free_bias.py"), str(DEMO),
                          "--max-images", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 images" in out.stdout and "C = 1 (RPN objectness)" in out.stdout
    pi = float(out.stdout.split("pi = ")[1].split()[0])
    assert 0 < pi < 1
    bad = subprocess.run([sys.executable, str(REPO / "scripts/sampling_free_bias.py"),
                          str(REPO / "configs/demo/ssd_demo.yaml")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: model.type is 'ssd'; Sampling-Free's prior pi is defined for retinanet, faster_rcnn and mask_rcnn"]


def test_two_iterations_of_python_m_pisa_train(tmp_path):
    paths = ensure_demo_dataset(tmp_path / "demo", num_train=4, num_val=2)
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}}}",
            f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.train_transforms.scales=[[96,96]]", "data.test_transforms.scales=[[96,96]]",
            "data.batch_size=2", "data.workers=0", "schedule.epochs=1", "schedule.max_iters=2",
            "schedule.warmup_iters=1", "train.eval_interval=1", "train.log_interval=1",
            "model.neck.out_channels=16", "model.rpn.feat_channels=16", "model.roi_head.fc_channels=32",
            "sampling_free.rpn_proposals_per_batch=100", f"train.work_dir={tmp_path / 'work'}"]
    proc = subprocess.run([sys.executable, "-m", "pisa.train", str(DEMO), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r.get("mode") == "train"]
    assert len(train_lines) == 2
    last = train_lines[-1]
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} <= set(last)
    assert all(math.isfinite(last[k]) for k in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"))
    assert any("bbox_AP" in r for r in lines)
