"""Anchor generation, following the mmdetection v2 generator (method spec §7.2).

Conventions shared by every generator here:

* boxes are ``(x1, y1, x2, y2)``, unrounded, with no ``+1`` widths;
* for base size ``s``, scale ``σ`` and ratio ``r = h / w``: ``w = s·σ/√r`` and ``h = s·σ·√r``;
* a level's anchors are ordered ``(h·W + w)·A + a``: rows outer, columns inner, anchors innermost, which
  is the flatten order of the dense heads (§5.1);
* the anchor centre of cell ``(x, y)`` is ``((x + offset)·stride, (y + offset)·stride)``; RetinaNet and the
  RPN use offset 0 (the cell's top-left corner), SSD uses 0.5.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

FeatureSizes = Sequence[tuple[int, int]]

# Multi-scale training sees many input sizes; keep only the most recent grids.
_CACHE_SIZE = 16


def _ratio_scale_anchors(base_size: float, ratios: Tensor, scales: Tensor) -> Tensor:
    """Anchors centred on 0 for every (ratio, scale) pair, ratio-major.

    Args:
        base_size: the level's base size in pixels.
        ratios: float32 ``(R,)`` of ``h / w``.
        scales: float32 ``(S,)``.

    Returns:
        float32 ``(R·S, 4)``, row ``ratio_idx·S + scale_idx``. The arithmetic runs in float32 in the
        reference's order so that anchors agree with it bit for bit.
    """
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


class AnchorGenerator:
    """Dense anchors for a feature pyramid: the same ratios and scales on every level.

    Args:
        strides: stride of each level in input pixels, finest first.
        ratios: aspect ratios ``h / w``.
        scales: anchor scales relative to the base size. Give either ``scales`` or both
            ``octave_base_scale`` and ``scales_per_octave`` (then ``scales[i] = obs · 2^(i/spo)``).
        base_sizes: base size of each level; defaults to ``strides``.
        center_offset: anchor centres sit at ``(x + center_offset)·stride``.

    RetinaNet: ``AnchorGenerator([8, 16, 32, 64, 128], [0.5, 1, 2], octave_base_scale=4,
    scales_per_octave=3)``; RPN: ``AnchorGenerator([4, 8, 16, 32, 64], [0.5, 1, 2], scales=[8])``.
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float],
        *,
        scales: Sequence[float] | None = None,
        octave_base_scale: float | None = None,
        scales_per_octave: int | None = None,
        base_sizes: Sequence[float] | None = None,
        center_offset: float = 0.0,
    ) -> None:
        self.strides = list(strides)
        self.ratios = [float(r) for r in ratios]
        self.scales = _resolve_scales(scales, octave_base_scale, scales_per_octave)
        self.base_sizes = list(base_sizes) if base_sizes is not None else list(self.strides)
        if len(self.base_sizes) != len(self.strides):
            raise ValueError(
                f"AnchorGenerator: {len(self.base_sizes)} base_sizes for {len(self.strides)} strides; "
                "give one base size per level or leave base_sizes unset to use the strides"
            )
        self.center_offset = float(center_offset)
        self._base = self._make_base_anchors()
        self._cache: OrderedDict[tuple, list[Tensor]] = OrderedDict()
        self._valid_cache: OrderedDict[tuple, Tensor] = OrderedDict()

    def _make_base_anchors(self) -> list[Tensor]:
        """Per level float32 ``(A, 4)`` anchors centred on 0; subclasses override this."""
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        scales = torch.tensor(self.scales, dtype=torch.float32)
        return [_ratio_scale_anchors(size, ratios, scales) for size in self.base_sizes]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_anchors_per_level(self) -> list[int]:
        """Anchors per location ``A`` of each level."""
        return [base.shape[0] for base in self._base]

    @property
    def num_anchors(self) -> int:
        """Anchors per location ``A``, the same on every level (the head's output channels / C)."""
        counts = set(self.num_anchors_per_level)
        if len(counts) != 1:
            raise ValueError(f"anchors per location differ by level ({self.num_anchors_per_level}); "
                             "use num_anchors_per_level")
        return counts.pop()

    def base_anchors(self) -> list[Tensor]:
        """Per level float32 ``(A, 4)`` anchors centred on 0, ``a = ratio_idx·n_scales + scale_idx``."""
        return [base.clone() for base in self._base]

    def grid_anchors(
        self, feature_sizes: FeatureSizes, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> list[Tensor]:
        """Anchors of every location, per level ``(H·W·A, 4)`` in ``(h·W + w)·A + a`` order.

        ``feature_sizes`` holds one ``(H, W)`` per level. Results are cached by (sizes, device, dtype)
        and shared between calls: do not modify them in place.
        """
        self._check_levels(feature_sizes)
        key = (tuple((int(h), int(w)) for h, w in feature_sizes), str(torch.device(device or "cpu")), dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            return list(self._cache[key])
        anchors = [
            self._level_grid(base, stride, size, device, dtype)
            for base, stride, size in zip(self._base, self.strides, feature_sizes)
        ]
        self._cache[key] = anchors
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return list(anchors)

    def anchors(
        self, feature_sizes: FeatureSizes, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """All levels concatenated, finest first: ``(Σ H·W·A, 4)``."""
        return torch.cat(self.grid_anchors(feature_sizes, device, dtype), dim=0)

    def _level_grid(self, base: Tensor, stride: float, size: tuple[int, int], device, dtype) -> Tensor:
        height, width = size
        offset = self.center_offset * stride
        shift_x = torch.arange(width, device=device, dtype=dtype) * stride + offset
        shift_y = torch.arange(height, device=device, dtype=dtype) * stride + offset
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # row-major: y outer, x inner
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base.to(device=device, dtype=dtype)[None] + shifts[:, None]).reshape(-1, 4)

    def valid_flags(
        self, feature_sizes: FeatureSizes, valid_shape: tuple[int, int], device: torch.device | str | None = None
    ) -> list[Tensor]:
        """Per level bool ``(H·W·A,)``: whether the location lies inside the image's own padded extent.

        ``valid_shape`` is ``(h, w)`` of the image padded on its own (not to the batch): a location is valid
        iff ``x < min(ceil(w / stride), W)`` and ``y < min(ceil(h / stride), H)``. This matters only when a
        smaller image is zero-padded to the batch size.
        """
        self._check_levels(feature_sizes)
        valid_h, valid_w = valid_shape
        flags = []
        for stride, (height, width), count in zip(self.strides, feature_sizes, self.num_anchors_per_level):
            inside_x = torch.arange(width, device=device) < min(math.ceil(valid_w / stride), width)
            inside_y = torch.arange(height, device=device) < min(math.ceil(valid_h / stride), height)
            inside = (inside_y[:, None] & inside_x[None, :]).reshape(-1)
            flags.append(inside[:, None].expand(-1, count).reshape(-1))
        return flags

    def batch_valid_flags(
        self, feature_sizes: FeatureSizes, valid_shapes: Sequence[tuple[int, int]],
        device: torch.device | str | None = None
    ) -> Tensor:
        """bool ``(B, Σ H·W·A)``: :meth:`valid_flags` of every level, concatenated, for each image's shape.

        Images of a batch mostly share their padded shape, and a run sees few shapes: each distinct
        (sizes, shape, device) is computed once and cached. The result is shared: do not modify it.
        """
        rows = [self._cached_valid_flags(feature_sizes, (int(h), int(w)), device) for h, w in valid_shapes]
        if not rows:
            count = sum(h * w * a for (h, w), a in zip(feature_sizes, self.num_anchors_per_level))
            return torch.zeros(0, count, dtype=torch.bool, device=device)
        return torch.stack(rows)

    def _cached_valid_flags(self, feature_sizes: FeatureSizes, valid_shape: tuple[int, int], device) -> Tensor:
        key = (tuple((int(h), int(w)) for h, w in feature_sizes), valid_shape, str(torch.device(device or "cpu")))
        if key in self._valid_cache:
            self._valid_cache.move_to_end(key)
            return self._valid_cache[key]
        flags = torch.cat(self.valid_flags(feature_sizes, valid_shape, device))
        self._valid_cache[key] = flags
        if len(self._valid_cache) > _CACHE_SIZE:
            self._valid_cache.popitem(last=False)
        return flags

    def _check_levels(self, feature_sizes: FeatureSizes) -> None:
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"got {len(feature_sizes)} feature sizes for an anchor generator with {self.num_levels} levels "
                f"(strides {self.strides}); the neck and the anchor strides must agree"
            )


def _resolve_scales(
    scales: Sequence[float] | None, octave_base_scale: float | None, scales_per_octave: int | None
) -> list[float]:
    """Explicit scales, or the octave scales ``obs · 2^(i/spo)`` for ``i < spo``."""
    octave_given = octave_base_scale is not None or scales_per_octave is not None
    if scales is not None and octave_given:
        raise ValueError("AnchorGenerator: give either scales or octave_base_scale + scales_per_octave, not both")
    if scales is not None:
        return [float(s) for s in scales]
    if octave_base_scale is None or scales_per_octave is None:
        raise ValueError("AnchorGenerator: give scales, or both octave_base_scale and scales_per_octave")
    return [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]


class SSDAnchorGenerator(AnchorGenerator):
    """SSD anchors: per level a min and a max size and extra ratios (method spec §7.2).

    Per location the order is ``(1, r=1), (√(max/min), r=1)``, then ``(1, 1/r), (1, r)`` for each ratio
    ``r`` of the level, with base size ``min``; centres sit at the cell centre (offset 0.5).

    Args:
        strides: per level stride, e.g. ``(8, 16, 32, 64, 100, 300)`` for SSD300.
        ratios_per_level: per level extra ratios, e.g. ``([2], [2, 3], [2, 3], [2, 3], [2], [2])``.
        min_sizes, max_sizes: per level sizes, see :func:`ssd_anchor_sizes`.
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios_per_level: Sequence[Sequence[float]],
        min_sizes: Sequence[float],
        max_sizes: Sequence[float],
        center_offset: float = 0.5,
    ) -> None:
        if not len(strides) == len(ratios_per_level) == len(min_sizes) == len(max_sizes):
            raise ValueError("SSDAnchorGenerator: strides, ratios_per_level, min_sizes and max_sizes "
                             "need one entry per level")
        self.ratios_per_level = [[float(r) for r in ratios] for ratios in ratios_per_level]
        self.max_sizes = list(max_sizes)
        super().__init__(strides, [1.0], scales=[1.0], base_sizes=min_sizes, center_offset=center_offset)

    def _make_base_anchors(self) -> list[Tensor]:
        bases = []
        for min_size, max_size, extra in zip(self.base_sizes, self.max_sizes, self.ratios_per_level):
            ratios = torch.tensor([1.0] + [v for r in extra for v in (1 / r, r)], dtype=torch.float32)
            scales = torch.tensor([1.0, math.sqrt(max_size / min_size)], dtype=torch.float32)
            # Scale-major grid (scale_idx·R + ratio_idx); keep (s0, r=1), (s1, r=1), then s0 with each ratio.
            grid = _ratio_scale_anchors(min_size, ratios, scales).reshape(len(ratios), 2, 4).transpose(0, 1)
            bases.append(torch.cat([grid[0, :1], grid[1, :1], grid[0, 1:]], dim=0))
        return bases


def ssd_anchor_sizes(input_size: int, ratio_range: tuple[float, float], num_levels: int) -> tuple[list, list]:
    """SSD min and max anchor sizes per level, as the reference derives them (§7.2).

    ``ratio_range`` is ``(0.15, 0.9)`` for SSD300 and ``(0.1, 0.9)`` for SSD512 on COCO. A first level is
    prepended, chosen by ``ratio_range[0]``: ``(0.07·S, 0.15·S)`` for 0.15, ``(0.04·S, 0.10·S)`` for 0.1 and
    ``(0.1·S, 0.2·S)`` for 0.2. Returns ``(min_sizes, max_sizes)`` of ints.
    """
    first_level = {0.15: (0.07, 0.15), 0.1: (0.04, 0.10), 0.2: (0.1, 0.2)}
    if ratio_range[0] not in first_level:
        raise ValueError(f"ssd_anchor_sizes: ratio_range[0] must be one of {sorted(first_level)}, "
                         f"got {ratio_range[0]}")
    low, high = int(ratio_range[0] * 100), int(ratio_range[1] * 100)
    step = int((high - low) / (num_levels - 2))
    min_sizes, max_sizes = [], []
    for ratio in range(low, high + 1, step):
        min_sizes.append(int(input_size * ratio / 100))
        max_sizes.append(int(input_size * (ratio + step) / 100))
    first = first_level[ratio_range[0]]
    return [int(input_size * first[0])] + min_sizes, [int(input_size * first[1])] + max_sizes
