"""RetinaNet as one exportable graph: network plus post-processing with fixed-size, padded outputs.

:class:`ExportableRetinaNet` runs a built :class:`pisa.models.retinanet.RetinaNet`'s backbone, neck and
head, then the reference's test-time post-processing (method spec §7.3) written with operators that
``torch.onnx.export`` translates and ONNX Runtime runs:

1. per level: sigmoid, the top ``nms_pre`` anchors by max-class score, delta decoding;
2. clipping to each image's ``img_shape`` and rescaling by ``1 / scale_factor``;
3. per-class NMS on ``score > score_thr`` (boxes of zero width or height dropped) for the whole batch in ONE ``torchvision.ops.nms`` call: every
   (image, class) pair is moved to its own region of the plane (class along x, image along y), so no
   two groups overlap and a single NMS equals one NMS per image and class;
4. the best ``max_per_img`` per image, scattered into padded ``(B, max_per_img)`` slots.

Anchors are computed inside the graph from the feature-map shapes, so a graph exported with dynamic
height and width stays correct for every input size. Scores, decoding and NMS run in float32 even
when the network runs in float16 (``network_dtype``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from pisa.models.retina_head import flatten_levels

__all__ = ["ExportableRetinaNet", "EXPORT_INPUTS", "EXPORT_OUTPUTS", "OPSET", "export_onnx", "example_inputs",
           "unpad_detections"]

EXPORT_INPUTS = ("images", "img_shapes", "scale_factors")
EXPORT_OUTPUTS = ("boxes", "scores", "labels", "num_dets")
# Opset 18: the first with every operator the exporter emits here in its current form (ReduceMax
# with axes as an input); ONNX Runtime runs it on CPU and CUDA.
OPSET = 18


class ExportableRetinaNet(nn.Module):
    """A RetinaNet whose ``forward`` is the whole test-time computation, in tensors only.

    Args:
        model: a built ``RetinaNet`` (its weights and test settings are used; it is not modified:
            a float16 network is a converted copy).
        network_dtype: dtype of backbone, neck and head (``torch.float32`` or ``torch.float16``);
            the post-processing always runs in float32.

    ``forward(images, img_shapes, scale_factors)``:

    * ``images``: float32 ``(B, 3, H, W)`` normalised and zero-padded batch (as ``pisa.data`` makes it);
    * ``img_shapes``: float32 ``(B, 2)``, each image's resized ``(h, w)`` before padding;
    * ``scale_factors``: float32 ``(B, 2)``, each image's ``(sx, sy)`` with ``resized = original · s``.

    Returns ``(boxes, scores, labels, num_dets)``: float32 ``(B, M, 4)`` xyxy boxes in original-image
    coordinates, float32 ``(B, M)`` scores by decreasing score, int64 ``(B, M)`` labels in ``0..C−1``
    and int64 ``(B,)`` counts, with ``M = max_per_img``. Slots past ``num_dets[b]`` hold zero boxes and
    scores and label ``-1``.
    """

    def __init__(self, model: nn.Module, network_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if network_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"network_dtype must be torch.float32 or torch.float16, got {network_dtype}")
        network = nn.ModuleList([model.backbone, model.neck, model.head])
        if network_dtype != torch.float32:
            network = copy.deepcopy(network).to(network_dtype)
        self.backbone, self.neck, self.head = network
        self.network_dtype = network_dtype
        post = model.postprocessor
        rule = getattr(post, "topk_rule", "v2")
        if rule != "v2":
            raise ValueError(f"model.test.topk_rule {rule!r}: the export supports the 'v2' rule (top nms_pre "
                             "anchors per level) so far; export with --set model.test.topk_rule=v2")
        generator = post.anchor_generator
        self.coder, self.num_classes = post.coder, model.head.num_classes
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = (post.nms_pre, post.score_thr,
                                                                         post.nms_iou, post.max_per_img)
        self.strides = [float(s) for s in generator.strides]
        self.center_offset = generator.center_offset
        for level, base in enumerate(generator.base_anchors()):
            self.register_buffer(f"base_anchors_{level}", base, persistent=False)

    def forward(self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, ...]:
        features = self.neck(self.backbone(images.to(self.network_dtype)))
        cls_scores, bbox_preds = self.head(features)
        return self.postprocess([s.float() for s in cls_scores], [d.float() for d in bbox_preds],
                                img_shapes.float(), scale_factors.float())

    def postprocess(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], img_shapes: Tensor,
                    scale_factors: Tensor) -> tuple[Tensor, ...]:
        """Head outputs (per level ``(B, A·C, H, W)`` / ``(B, A·4, H, W)``) → the padded detections."""
        level_boxes, level_scores = [], []
        for level, (logits, deltas) in enumerate(zip(cls_scores, bbox_preds)):
            anchors = self.level_anchors(level, logits)
            scores, deltas, anchors = self._top_candidates(flatten_levels([logits], self.num_classes).sigmoid(),
                                                           flatten_levels([deltas], 4), anchors)
            level_boxes.append(self.coder.decode(anchors, deltas))
            level_scores.append(scores)
        boxes, scores = torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1)
        # Clip to (w, h, w, h) of each image, then return to original-image coordinates (as the model does).
        bounds = img_shapes[:, [1, 0, 1, 0]][:, None, :]
        boxes = torch.minimum(boxes.clamp(min=0), bounds)
        boxes = boxes / scale_factors[:, [0, 1, 0, 1]][:, None, :]
        return self._batched_multiclass_nms(boxes, scores)

    def level_anchors(self, level: int, feature: Tensor) -> Tensor:
        """float32 ``(H·W·A, 4)`` anchors of ``level`` for ``feature``'s ``(H, W)``, in the anchor
        generator's ``(h·W + w)·A + a`` order, built from the (possibly symbolic) shape."""
        base = getattr(self, f"base_anchors_{level}")
        stride = self.strides[level]
        height, width = feature.shape[-2:]
        shift_x = (torch.arange(width, device=feature.device, dtype=torch.float32) + self.center_offset) * stride
        shift_y = (torch.arange(height, device=feature.device, dtype=torch.float32) + self.center_offset) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base[None] + shifts[:, None]).reshape(-1, 4)

    def _top_candidates(self, scores: Tensor, deltas: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each image's ``nms_pre`` anchors with the highest max-class score: ``(B, k, C)``, ``(B, k, 4)``
        and ``(B, k, 4)`` anchors with ``k = min(nms_pre, N)``. When every anchor is kept the set is
        the reference's; only the order differs, which nothing downstream depends on."""
        k = min(self.nms_pre, scores.shape[1]) if self.nms_pre > 0 else scores.shape[1]
        top = scores.max(dim=2).values.topk(k, dim=1).indices  # (B, k)
        gather = lambda values: values.gather(1, top[..., None].expand(-1, -1, values.shape[-1]))  # noqa: E731
        return gather(scores), gather(deltas), anchors[top]

    def _batched_multiclass_nms(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, ...]:
        """``(B, K, 4)`` boxes and ``(B, K, C)`` scores → padded ``(boxes, scores, labels, num_dets)``."""
        batch, num_boxes, num_classes = scores.shape
        # Boxes of zero width or height never become detections (the reference's min_bbox_size = 0).
        sized = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        flat_scores = scores.reshape(-1)
        above = (scores > self.score_thr) & sized[..., None]
        candidates = torch.nonzero(above.reshape(-1)).reshape(-1)  # box-major, class-minor
        box_index = torch.div(candidates, num_classes, rounding_mode="floor")  # into (B·K)
        image = torch.div(box_index, num_boxes, rounding_mode="floor")
        label = candidates - box_index * num_classes
        cand_boxes, cand_scores = boxes.reshape(-1, 4)[box_index], flat_scores[candidates]
        # One region per (image, class): shift by multiples of a span larger than every coordinate.
        span = boxes.max() + 1
        offsets = torch.stack([label, image, label, image], dim=1).to(cand_boxes.dtype) * span
        keep = torchvision.ops.nms(cand_boxes + offsets, cand_scores, self.nms_iou)
        keep = keep[cand_scores[keep].argsort(descending=True)]  # by decreasing score, whatever the backend
        return self._scatter_per_image(cand_boxes[keep], cand_scores[keep], label[keep], image[keep], batch)

    def _scatter_per_image(self, boxes: Tensor, scores: Tensor, labels: Tensor, images: Tensor,
                           batch: int) -> tuple[Tensor, ...]:
        """Detections sorted by decreasing score, each with its image → the first ``max_per_img`` of
        every image in ``(B, M)`` slots. Overflow goes to one spare slot per detection (unique scatter
        indices), which is cut off."""
        m = self.max_per_img
        member = (images[:, None] == torch.arange(batch, device=images.device)[None, :]).to(torch.int64)  # (D, B)
        rank = (member.cumsum(0) * member).sum(1) - 1  # position among its image's detections
        num_dets = member.sum(0).clamp(max=m)
        spare = batch * m + torch.arange(images.shape[0], device=images.device)
        slot = torch.where(rank < m, images * m + rank, spare)
        size = batch * m + images.shape[0]
        out_boxes = boxes.new_zeros(size, 4).index_put((slot,), boxes)[:batch * m].reshape(batch, m, 4)
        out_scores = scores.new_zeros(size).index_put((slot,), scores)[:batch * m].reshape(batch, m)
        out_labels = torch.full((size,), -1, dtype=torch.int64, device=labels.device).index_put(
            (slot,), labels.to(torch.int64))[:batch * m].reshape(batch, m)
        return out_boxes, out_scores, out_labels, num_dets


def unpad_detections(boxes: Tensor, scores: Tensor, labels: Tensor, num_dets: Tensor) -> list[dict[str, Tensor]]:
    """Padded ``(B, M, ·)`` outputs → one ``{"boxes", "scores", "labels"}`` dict per image (the model's
    eval-mode format). Accepts tensors or numpy arrays."""
    as_tensor = torch.as_tensor
    boxes, scores, labels, num_dets = (as_tensor(x) for x in (boxes, scores, labels, num_dets))
    return [{"boxes": boxes[i, :n].float(), "scores": scores[i, :n].float(), "labels": labels[i, :n].long()}
            for i, n in enumerate(num_dets.tolist())]


def example_inputs(batch: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of :class:`ExportableRetinaNet` for a batch of ``batch`` full-size ``(H, W)`` images."""
    height, width = size
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    img_shapes = torch.tensor([[float(height), float(width)]] * batch)
    return images, img_shapes, torch.ones(batch, 2)


def _dynamic_shapes(pad_divisor: int, max_side: int) -> dict[str, Any]:
    """Batch, height and width dynamic; height and width multiples of ``pad_divisor`` (as batches are)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    height = pad_divisor * Dim("height_blocks", min=1, max=max_side // pad_divisor)
    width = pad_divisor * Dim("width_blocks", min=1, max=max_side // pad_divisor)
    return {"images": {0: batch, 2: height, 3: width}, "img_shapes": {0: batch}, "scale_factors": {0: batch}}


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch: int = 1, size: tuple[int, int] = (800, 1344),
                fp16: bool = False, dynamic: bool = False, pad_divisor: int = 32,
                opset: int = OPSET) -> ExportableRetinaNet:
    """Write ``model`` (a built, loaded ``RetinaNet``) and its post-processing as one ONNX file.

    Uses ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript; torchvision's NMS
    becomes ONNX ``NonMaxSuppression``). Static by default: batch ``batch`` of ``size = (H, W)``
    images. ``dynamic``: batch, height and width become graph dimensions (height and width multiples
    of ``pad_divisor``, up to 4096); the example traced then has batch 2 and at least two cells on the
    coarsest level, since ``torch.export`` specialises dimensions of size 1. ``fp16``: float16
    network, float32 post-processing. Weights are stored inside the file (no external data).
    Returns the wrapper that was exported (for checks against the graph).
    """
    wrapper = ExportableRetinaNet(model.eval(), torch.float16 if fp16 else torch.float32).eval()
    dynamic_shapes = None
    if dynamic:
        coarsest = 2 * int(max(wrapper.strides))
        round_up = lambda v: -(-max(v, coarsest) // pad_divisor) * pad_divisor  # noqa: E731
        batch, size = max(batch, 2), (round_up(size[0]), round_up(size[1]))
        dynamic_shapes = _dynamic_shapes(pad_divisor, 4096)
    with _quiet_exporter():
        torch.onnx.export(wrapper, example_inputs(batch, size), str(path), dynamo=True, opset_version=opset,
                          input_names=list(EXPORT_INPUTS), output_names=list(EXPORT_OUTPUTS),
                          dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
    return wrapper


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that ask nothing of a pisa user: torchvision's NMS meta kernel
    calls an API torch marks deprecated, and onnx_ir notes the empty attribute lists it defaults."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_unbacked_symint.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)
