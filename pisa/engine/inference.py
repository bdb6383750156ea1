"""The evaluation loop: run the model over a loader, collect detections, score them on rank 0.

Works unchanged under torchrun: each rank sees its shard of the validation set (the loader's
sampler guarantees every image exactly once over all ranks), the evaluator gathers the
detections, rank 0 computes the metrics and every rank receives the same metric dict.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from pisa.engine import dist

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# ``--precision`` names -> the autocast setting (``train.amp`` values); fp32 runs without autocast.
PRECISIONS = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


class Evaluator(Protocol):
    """What :func:`evaluate` needs from an evaluator (``pisa.engine.evaluator.CocoEvaluator``)."""

    def reset(self) -> None: ...
    def add(self, image_ids: list[int], detections: list[dict[str, torch.Tensor]]) -> None: ...
    def gather(self) -> None: ...
    def evaluate(self, out_dir: str | os.PathLike | None) -> dict[str, Any]: ...


def amp_autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in {None, "bf16", "fp16"} on ``device``'s type."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp must be null, 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def model_device(module: nn.Module) -> torch.device:
    """Where ``module``'s inputs go: its first parameter's or buffer's device; the CPU for a module
    holding no tensors (e.g. an ONNX Runtime session, ``pisa.engine.onnx_runner.OnnxDetector``)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _detections_to_cpu(detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detections off the device, floats in fp32 (autocast may have produced bf16/fp16 scores)."""
    out = {}
    for key, value in detection.items():
        if torch.is_tensor(value):
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
        out[key] = value
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, evaluator: Evaluator, amp: str | None = None,
             out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics of ``model`` on ``loader``'s images, identical on every rank.

    ``model`` (bare or DDP-wrapped) is run in eval mode as ``model(images, targets)`` and returns
    one dict per image (``boxes`` [D, 4] original-image xyxy, ``scores`` [D], ``labels`` [D]);
    detections are added by ``targets[i]['image_id']``. The evaluator is reset first, so one
    evaluator serves every evaluation of a run. The model's train/eval mode is restored.

    ``amp`` (None, "bf16", "fp16") runs the model under autocast: convolutions and matrix products
    in reduced precision, while the post-processing of pisa's detectors stays float32 by
    construction (logits are cast to float32 before sigmoid/softmax; box decoding and NMS compute
    in float32), so reduced precision touches the network only.
    """
    module = dist.unwrap_model(model)
    was_training = module.training
    module.eval()
    device = model_device(module)
    evaluator.reset()
    try:
        bar = tqdm(loader, desc="eval", dynamic_ncols=True, disable=not (progress and dist.is_main()))
        for images, targets in bar:
            images = images.to(device, non_blocking=True)
            with amp_autocast(device, amp):
                detections = module(images, targets)
            evaluator.add([int(t["image_id"]) for t in targets], [_detections_to_cpu(d) for d in detections])
        evaluator.gather()
        metrics = evaluator.evaluate(out_dir) if dist.is_main() else {}
    finally:
        module.train(was_training)
    return dist.broadcast_object(metrics)
