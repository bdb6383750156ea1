"""Multi-scale RoIAlign for the R-CNN heads: pick one FPN level per RoI by its size, pool there (§7.3).

The reference (mmdetection v2's single-level RoI extractor with mmcv RoIAlign) maps an RoI of width
``w`` and height ``h`` to level ``floor(log2(sqrt(w·h) / 56 + 1e-6))``, clamped to P2..P5, and pools it
with ``aligned=True`` (a −0.5 pixel shift of the sampling grid), ``sampling_ratio=0`` (adaptive:
``ceil(roi_size / output_size)`` samples per bin) and average pooling. That pooling is exactly
``torchvision.ops.roi_align(..., aligned=True, sampling_ratio=0)`` with ``spatial_scale = 1 / stride``.

torchvision's own ``MultiScaleRoIAlign`` differs: ``aligned=False``, scales inferred from the feature
and image sizes (rounded to powers of 2) and the ``1e-6`` added after the ``log2``; it is not used here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["map_roi_levels", "MultiScaleRoIAlign", "ungroup", "pool_rois", "roi_align_backward"]


def map_roi_levels(rois: Tensor, num_levels: int = 4, finest_scale: float = 56.0) -> Tensor:
    """The pyramid level each RoI is pooled from.

    Args:
        rois: ``(R, 4)`` xyxy boxes in input-image pixels.
        num_levels: number of pooled levels (4 for P2..P5).
        finest_scale: ``sqrt(w·h)`` at which an RoI moves from level 0 to level 1 is ``2·finest_scale``.

    Returns:
        int64 ``(R,)`` in ``0..num_levels−1``: ``floor(log2(sqrt(w·h) / finest_scale + 1e-6))``, clamped.
        With the defaults, ``sqrt(w·h) < 112`` → 0 (P2), ``[112, 224)`` → 1, ``[224, 448)`` → 2, else 3.
    """
    if rois.dim() != 2 or rois.shape[1] != 4:
        raise ValueError(f"map_roi_levels: rois must be (R, 4) xyxy boxes, got {tuple(rois.shape)}")
    boxes = rois.float()
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def ungroup(grouped: Tensor, order: Tensor | None) -> Tensor:
    """Rows of ``grouped`` back in input order: row ``order[i]`` of the result is ``grouped[i]``.

    ``order`` is the permutation from :meth:`MultiScaleRoIAlign.forward_grouped` (``None``: identity).
    """
    if order is None:
        return grouped
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return grouped.index_select(0, inverse)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over FPN levels, each RoI on the level chosen by :func:`map_roi_levels`. No parameters.

    Args:
        output_size: side of the pooled grid (7 for the box head, 14 for the mask head).
        strides: stride of each pooled level, finest first (P2..P5: 4, 8, 16, 32).
        sampling_ratio: samples per bin side; 0 means adaptive, as the reference.
        finest_scale: see :func:`map_roi_levels`.

    ``forward(features, rois)``: ``features`` holds at least ``len(strides)`` maps ``(B, C, H_l, W_l)``,
    finest first; coarser extra maps (P6, which only the RPN uses) are ignored. ``rois`` is ``(R, 5)``
    float ``[batch_idx, x1, y1, x2, y2]`` in input-image pixels. Returns ``(R, C, out, out)`` in the
    order of ``rois`` (one ``roi_align`` call per level that has RoIs), with the features' dtype.
    """

    def __init__(self, output_size: int, strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 0,
                 finest_scale: float = 56.0) -> None:
        super().__init__()
        self.output_size = int(output_size)
        self.strides = list(strides)
        self.sampling_ratio = int(sampling_ratio)
        self.finest_scale = float(finest_scale)

    def forward(self, features: Sequence[Tensor], rois: Tensor) -> Tensor:
        pooled, order = self.forward_grouped(features, rois)
        return ungroup(pooled, order)

    def forward_grouped(self, features: Sequence[Tensor], rois: Tensor) -> tuple[Tensor, Tensor | None]:
        """The pooled RoIs grouped by level, and where each row came from.

        Returns ``(pooled, order)``: ``pooled (R, C, out, out)`` holds the RoIs of P2 first, then P3, ...,
        each level's in their input order, and row ``i`` is RoI ``order[i]``; ``order`` is ``None`` when
        that is already the input order (all RoIs on one level). A head that treats RoIs independently
        can run on ``pooled`` and :func:`ungroup` its (smaller) outputs instead of the pooled features.
        """
        num_levels = len(self.strides)
        if len(features) < num_levels:
            raise ValueError(f"MultiScaleRoIAlign: {len(features)} feature maps for {num_levels} strides "
                             f"{self.strides}; pass P2..P5 (finest first)")
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"MultiScaleRoIAlign: rois must be (R, 5) [batch_idx, x1, y1, x2, y2], "
                             f"got {tuple(rois.shape)}")
        levels = map_roi_levels(rois[:, 1:], num_levels, self.finest_scale)
        pooled, order = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            inds = torch.nonzero(levels == level).squeeze(1)
            if inds.numel() == 0:
                continue
            # roi_align needs one dtype; never round the boxes to half precision.
            dtype = torch.promote_types(feature.dtype, rois.dtype)
            level_pooled = pool_rois(feature.to(dtype), rois[inds].to(dtype), self.output_size,
                                     spatial_scale=1.0 / stride, sampling_ratio=self.sampling_ratio, aligned=True)
            pooled.append(level_pooled.to(features[0].dtype))
            order.append(inds)
        if not pooled:  # no RoIs at all
            channels = features[0].shape[1]
            return features[0].new_zeros((0, channels, self.output_size, self.output_size)), None
        if len(pooled) == 1:
            return pooled[0], None
        return torch.cat(pooled), torch.cat(order)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, strides={self.strides}, sampling_ratio={self.sampling_ratio}, "
                f"finest_scale={self.finest_scale}")



# --------------------------------------------------------------------------------------------
# RoIAlign on the CPU threads
# --------------------------------------------------------------------------------------------

# torchvision's CPU RoIAlign kernels, forward and backward, run on one thread. Split over the RoIs
# (forward) or over the images (backward), the same kernels give the same numbers on every thread.
_MIN_ROIS_PER_THREAD = 64
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)


def _threads() -> ThreadPoolExecutor:
    """A pool of ``torch.get_num_threads()`` threads, made anew after a fork (whose child has none)."""
    global _pool, _pool_key
    key = (os.getpid(), torch.get_num_threads())
    if _pool is None or _pool_key != key:
        _pool, _pool_key = ThreadPoolExecutor(max_workers=key[1], thread_name_prefix="pisa-roi-align"), key
    return _pool


def _forward_on_threads(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                        sampling_ratio: int, aligned: bool) -> Tensor:
    """torchvision's ``roi_align``, its RoIs split over the intra-op threads: the same output."""
    parts = min(torch.get_num_threads(), rois.shape[0] // _MIN_ROIS_PER_THREAD)
    run = partial(roi_align, features, output_size=output_size, spatial_scale=spatial_scale,
                  sampling_ratio=sampling_ratio, aligned=aligned)
    if parts <= 1:
        return run(rois)
    return torch.cat(list(_threads().map(run, rois.tensor_split(parts))))


def roi_align_backward(grad: Tensor, rois: Tensor, shape: Sequence[int], spatial_scale: float,
                       sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient of ``roi_align`` w.r.t. its ``(B, C, H, W)`` input, from ``grad (R, C, out, out)``.

    torchvision's backward kernel, run on each thread for a block of images (an RoI only touches its
    own image's gradient, so the blocks are written apart, with the numbers of one call); with fewer
    images than threads, on blocks of RoIs whose gradients are then summed.
    """
    num_images, channels, height, width = (int(v) for v in shape)
    out_h, out_w = grad.shape[2], grad.shape[3]
    kernel = torch.ops.torchvision._roi_align_backward

    def run(g: Tensor, r: Tensor, images: int) -> Tensor:
        return kernel(g, r, spatial_scale, out_h, out_w, images, channels, height, width, sampling_ratio, aligned)

    threads = min(torch.get_num_threads(), max(rois.shape[0] // _MIN_ROIS_PER_THREAD, 1))
    if threads <= 1:
        return run(grad, rois, num_images)
    if num_images >= threads:
        bounds = torch.linspace(0, num_images, threads + 1).round().long().tolist()
        image = rois[:, 0].long()
        result = grad.new_zeros(num_images, channels, height, width)

        def block(lo: int, hi: int) -> None:
            inds = torch.nonzero((image >= lo) & (image < hi)).squeeze(1)
            if inds.numel():
                local = rois[inds].clone()
                local[:, 0] -= lo
                result[lo:hi] = run(grad[inds], local, hi - lo)

        list(_threads().map(block, bounds[:-1], bounds[1:]))
        return result
    parts = list(_threads().map(run, grad.tensor_split(threads), rois.tensor_split(threads),
                                [num_images] * threads))
    return torch.stack(parts).sum(0)


class _CpuRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.settings = (tuple(features.shape), spatial_scale, sampling_ratio, aligned)
        return _forward_on_threads(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        shape, spatial_scale, sampling_ratio, aligned = ctx.settings
        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = roi_align_backward(grad.contiguous(), rois, shape, spatial_scale, sampling_ratio, aligned)
        return grad_features, None, None, None, None, None


def _graph_capture() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def pool_rois(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True) -> Tensor:
    """``torchvision.ops.roi_align`` on ``features (B, C, H, W)`` and ``rois (R, 5)``, the same values.

    On the CPU its kernels run on every intra-op thread (:func:`roi_align_backward` for the gradient);
    on other devices, and while a graph is traced, scripted or compiled, it is torchvision's op itself.
    """
    if features.device.type != "cpu" or _graph_capture() or rois.shape[0] == 0:
        return roi_align(features, rois, output_size, spatial_scale=spatial_scale,
                         sampling_ratio=sampling_ratio, aligned=aligned)
    if torch.is_grad_enabled() and features.requires_grad:
        return _CpuRoIAlign.apply(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _forward_on_threads(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
