"""Smoke test of examples/torchvision_retinanet_pisa.py: PISA losses in a torchvision RetinaNet step."""

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchvision_retinanet_pisa.py"


def load_example():
    spec = importlib.util.spec_from_file_location("torchvision_retinanet_pisa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_pisa_training_steps_on_tiny_images():
    model, history = load_example().main(steps=2, image_size=64, batch_size=2)
    assert len(history) == 2
    for losses in history:
        assert set(losses) == {"loss_cls", "loss_bbox", "loss_carl"}
        assert all(math.isfinite(v) for v in losses.values())
        assert losses["loss_bbox"] > 0 and losses["loss_carl"] > 0
    for name, param in model.head.named_parameters():
        assert param.grad is not None, f"head parameter {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"head parameter {name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"head parameter {name} has an all-zero gradient"
