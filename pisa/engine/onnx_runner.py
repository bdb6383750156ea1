"""An exported ONNX detector behind the PyTorch model's eval interface, for ``pisa.engine.inference.evaluate``.

``OnnxDetector(path)(images, targets)`` returns one ``{"boxes", "scores", "labels"}`` dict per image in
original-image coordinates (+ ``masks`` for Mask R-CNN, pasted here), like a pisa detector in eval mode, so the same data pipeline and
evaluator score both. The graph is one written by ``python -m pisa.export`` (inputs ``images``,
``img_shapes``, ``scale_factors``; see ``pisa.export_model``).

Static graphs accept smaller batches: images are zero-padded at the bottom/right to the graph's
height and width and the batch is filled with blank images whose outputs are dropped. Padding beyond
the data pipeline's own changes the features near the image border (BatchNorm makes padded zeros
non-zero), so detections then differ slightly from the PyTorch model's; a graph of the pipeline's
size, or a ``--dynamic`` one, gives the same detections.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pisa.engine.checkpoint import CheckpointError
from pisa.export_model import EXPORT_INPUTS, EXPORT_OUTPUTS, MASK_THRESHOLD_KEY, unpad_detections
from pisa.models.mask_head import paste_masks

__all__ = ["OnnxDetector", "OnnxModelError", "import_onnxruntime"]


class OnnxModelError(CheckpointError):
    """The ONNX model cannot be used: ONNX Runtime is missing, or the file is not a graph
    ``pisa.export`` wrote. A kind of :class:`CheckpointError` (an unusable model file), so the CLIs
    report it as one line; the message says what to do."""


def import_onnxruntime():
    """The ``onnxruntime`` module, or an :class:`OnnxModelError` naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxModelError("evaluating an ONNX graph needs onnxruntime (not installed): "
                             "pip install \"pisa-det[onnx]\" (or pip install onnxruntime)") from None
    return onnxruntime


class OnnxDetector(nn.Module):
    """An ONNX Runtime session with a detector's eval-mode call (no parameters, runs on the host).

    Args:
        path: ONNX file written by ``pisa.export``.
        providers: ONNX Runtime execution providers, CPU by default (e.g. ``["CUDAExecutionProvider",
            "CPUExecutionProvider"]`` with onnxruntime-gpu).

    ``forward(images (B, 3, H, W) float, targets: list[dict])`` reads each target's ``img_shape`` and
    ``scale_factor`` and returns one dict per image with float32 ``boxes`` ``(D, 4)``, ``scores``
    ``(D,)`` and int64 ``labels`` ``(D,)`` on the CPU. A Mask R-CNN graph's mask probabilities are
    pasted at each target's ``ori_shape`` (``paste_masks``, the graph's ``pisa.mask_thr``) into bool
    ``masks`` ``(D, H0, W0)``, as the PyTorch model does.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        super().__init__()
        ort = import_onnxruntime()
        if not Path(path).is_file():
            raise OnnxModelError(f"ONNX file {path} does not exist; write one with python -m pisa.export")
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise OnnxModelError(f"{path} is not a readable ONNX graph: {str(err).splitlines()[0]}") from None
        inputs = self.session.get_inputs()
        names = tuple(i.name for i in inputs)
        if names != EXPORT_INPUTS:
            raise OnnxModelError(f"{path} has inputs {list(names)}, not {list(EXPORT_INPUTS)}: "
                                 "export the model with python -m pisa.export")
        outputs = tuple(o.name for o in self.session.get_outputs())
        if outputs not in (EXPORT_OUTPUTS, EXPORT_OUTPUTS + ("masks",)):
            raise OnnxModelError(f"{path} has outputs {list(outputs)}, not {list(EXPORT_OUTPUTS)} (+ masks): "
                                 "export the model with python -m pisa.export")
        self.mask_thr = None
        if "masks" in outputs:
            metadata = self.session.get_modelmeta().custom_metadata_map
            if MASK_THRESHOLD_KEY not in metadata:
                raise OnnxModelError(f"{path} has masks but no {MASK_THRESHOLD_KEY} metadata: "
                                     "export the model again with python -m pisa.export")
            self.mask_thr = float(metadata[MASK_THRESHOLD_KEY])
        # Each dimension is an int (static) or a name (dynamic).
        self.batch, _, self.height, self.width = inputs[0].shape
        self.path = str(path)
        self._warned = False

    @property
    def static_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of a static graph, ``None`` when height and width are dynamic."""
        return (self.height, self.width) if isinstance(self.height, int) and isinstance(self.width, int) else None

    def forward(self, images: Tensor, targets: list[dict]) -> list[dict[str, Tensor]]:
        count = images.shape[0]
        images = self._fit_size(images.detach().float().cpu())
        img_shapes = torch.tensor([[float(v) for v in t["img_shape"]] for t in targets], dtype=torch.float32)
        scale_factors = torch.tensor([[float(v) for v in t["scale_factor"]] for t in targets], dtype=torch.float32)
        detections = []
        for start in range(0, count, self._chunk(count)):
            stop = min(start + self._chunk(count), count)
            feeds = self._fill_batch(images[start:stop], img_shapes[start:stop], scale_factors[start:stop])
            detections += unpad_detections(*self.session.run(None, feeds))[:stop - start]
        if self.mask_thr is not None:
            for det, target in zip(detections, targets):
                # The mask probabilities pasted as the PyTorch model pastes them (RoIHead.add_masks).
                det["masks"] = paste_masks(det.pop("mask_probs"), det["boxes"], tuple(target["ori_shape"]),
                                           threshold=self.mask_thr)
        return detections

    def _chunk(self, count: int) -> int:
        return self.batch if isinstance(self.batch, int) else count

    def _fit_size(self, images: Tensor) -> Tensor:
        """Zero-pad to a static graph's height and width; refuse images that do not fit."""
        size = self.static_size
        height, width = images.shape[-2:]
        if size is None or (height, width) == size:
            return images
        if height > size[0] or width > size[1]:
            raise OnnxModelError(f"{self.path} takes images of at most {size[0]}x{size[1]}, got a batch of "
                                 f"{height}x{width}: export with --dynamic or a larger --size")
        if not self._warned:
            print(f"warning: padding {height}x{width} batches to the graph's {size[0]}x{size[1]}; detections near "
                  "image borders can differ slightly from the PyTorch model's (export with --dynamic to avoid this)",
                  file=sys.stderr)
            self._warned = True
        return F.pad(images, (0, size[1] - width, 0, size[0] - height))

    def _fill_batch(self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> dict[str, np.ndarray]:
        """Fill a static batch with blank images (full-size, unit scale); their outputs are dropped."""
        missing = self.batch - images.shape[0] if isinstance(self.batch, int) else 0
        if missing > 0:
            images = torch.cat([images, images.new_zeros(missing, *images.shape[1:])])
            img_shapes = torch.cat([img_shapes, img_shapes[:1].expand(missing, 2)])
            scale_factors = torch.cat([scale_factors, torch.ones(missing, 2)])
        return {"images": images.numpy(), "img_shapes": img_shapes.numpy(), "scale_factors": scale_factors.numpy()}
