"""Mask R-CNN's mask branch: the FCN mask head, its training targets and loss, and pasting at test time.

Conventions: boxes are xyxy floats with no ``+1``; labels are foreground class indices ``0..C-1`` (the
mask head has no background channel). ``rois`` here are plain ``(R, 4)`` boxes of one image.

* ``MaskHead``: RoI features ``(R, 256, 14, 14)`` -> per-class mask logits ``(R, C, 28, 28)``.
* ``mask_targets``: each positive RoI's GT instance mask, cropped to the RoI and resized to 28x28 with
  RoIAlign, binarised at 0.5 (the reference's ``BitmapMasks.crop_and_resize``).
* ``mask_loss``: sigmoid BCE on the channel of each RoI's label, mean over every pixel of every RoI.
* ``paste_masks``: probability maps back into the original image (the reference's ``_do_paste_mask``
  coordinate convention), binarised at 0.5.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["MaskHead", "mask_targets", "mask_loss", "paste_masks"]


class MaskHead(nn.Module):
    """FCN mask head: ``num_convs`` x (conv3x3 + ReLU), a 2x2 stride-2 deconvolution + ReLU, a 1x1 conv.

    Args:
        in_channels: channels of the pooled RoI features (the FPN width, 256).
        conv_channels: width of the convs and of the deconvolution.
        num_convs: number of conv3x3 + ReLU layers.
        num_classes: ``C`` foreground classes, one sigmoid mask per class (required).

    ``forward(x (R, in_channels, S, S))`` returns logits ``(R, C, 2S, 2S)``: ``(R, C, 28, 28)`` for the
    usual 14x14 RoIAlign. Parameter names are the reference's state-dict keys without its ``.conv.``
    level: ``convs.{i}.*``, ``upsample.*``, ``conv_logits.*``.
    """

    def __init__(self, in_channels: int = 256, conv_channels: int = 256, num_convs: int = 4,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ValueError(f"MaskHead needs num_classes >= 1 (the model's foreground class count), "
                             f"got {num_classes}")
        self.num_classes = num_classes
        widths = [in_channels] + [conv_channels] * num_convs
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(widths[:-1], widths[1:]))
        self.upsample = nn.ConvTranspose2d(widths[-1], conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal (fan_out, ReLU gain) weights and zero biases on every layer (reference init)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.conv_logits(torch.relu(self.upsample(x)))


def mask_targets(rois: Tensor, gt_masks: Tensor, gt_inds: Tensor, size: int = 28, *,
                 pad_shape: Sequence[int] | None = None) -> Tensor:
    """Binary mask targets of one image's positive RoIs.

    Args:
        rois: ``(P, 4)`` float positive RoIs (xyxy, input-image pixels).
        gt_masks: ``(G, H, W)`` uint8 or bool instance masks of the image, nonzero = object, in the same
            (resized, flipped) coordinates as ``rois``; ``target["masks"]`` of the data pipeline.
        gt_inds: ``(P,)`` int64, the GT each RoI is assigned to (index into ``gt_masks``).
        size: side of the square targets.
        pad_shape: ``(H_pad, W_pad)`` the image was padded to, if the reference's exact values are
            wanted: the reference pads the masks with the image (zeros at the bottom and right) and
            clips the RoIs to that padded shape. Default: the masks' own ``(H, W)``.

    Returns ``(P, size, size)`` float32 in ``{0, 1}`` on ``rois.device``: RoIAlign (``aligned=True``,
    adaptive sampling, spatial scale 1) of the float mask inside the RoI clipped to the mask's extent,
    then ``>= 0.5``. All RoIs are pooled in one call; each GT mask is converted to float once, however
    many RoIs use it.
    """
    num = rois.shape[0]
    if num == 0:
        return rois.new_zeros((0, size, size), dtype=torch.float32)
    if gt_inds.shape != (num,):
        raise ValueError(f"gt_inds must have shape ({num},) (one GT index per RoI), got {tuple(gt_inds.shape)}")
    used, batch_idx = torch.unique(gt_inds.to(gt_masks.device), return_inverse=True)
    masks = gt_masks[used].to(rois.device, torch.float32)[:, None]  # (G_used, 1, H, W)
    height, width = masks.shape[-2:]
    if pad_shape is not None:
        if pad_shape[0] < height or pad_shape[1] < width:
            raise ValueError(f"pad_shape {tuple(pad_shape)} is smaller than the masks ({height}, {width}); "
                             "pass the padded image's (H, W)")
        masks = F.pad(masks, (0, int(pad_shape[1]) - width, 0, int(pad_shape[0]) - height))
        height, width = masks.shape[-2:]
    # The reference clips the RoIs to the mask's extent before pooling (mask_target_single).
    boxes = rois.to(torch.float32).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    boxes = torch.cat([batch_idx.to(rois.device, torch.float32)[:, None], boxes], dim=1)
    pooled = roi_align(masks, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (pooled[:, 0] >= 0.5).to(torch.float32)


def mask_loss(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """Per-class sigmoid BCE of Mask R-CNN, on the channel of each RoI's label.

    Args:
        logits: ``(P, C, S, S)`` mask logits of the positive RoIs.
        targets: ``(P, S, S)`` float targets in ``[0, 1]`` (``mask_targets``).
        labels: ``(P,)`` int64 foreground labels in ``0..C-1``.

    Returns a scalar: the mean over all ``P * S * S`` selected pixels (the reference's mask CE with
    ``reduction='mean'``), computed in fp32. With ``P = 0``, an exact zero that is still attached to
    ``logits`` (a sum over an empty selection: no NaN, and every parameter is part of the graph).
    """
    selected = logits[torch.arange(logits.shape[0], device=logits.device), labels]  # (P, S, S)
    if selected.shape[0] == 0:
        return selected.sum().float()
    return F.binary_cross_entropy_with_logits(selected.float(), targets.float(), reduction="mean")


def paste_masks(probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5, *,
                max_chunk_bytes: int = 256 * 2 ** 20) -> Tensor:
    """Paste per-detection mask probabilities into the image and binarise them.

    Args:
        probs: ``(D, M, M)`` probabilities in ``[0, 1]`` (sigmoid of the label's channel), usually 28x28.
        boxes: ``(D, 4)`` detection boxes in original-image pixels (they may extend past the image).
        image_size: ``(H, W)`` of the original image.
        threshold: a pixel is in the mask iff its pasted probability is ``>= threshold``.
        max_chunk_bytes: rough bound on the temporary memory of one batch of detections.

    Returns ``(D, H, W)`` bool on ``probs.device``.

    Coordinate convention (the reference's ``_do_paste_mask``): pixel ``(x, y)`` has centre
    ``(x + 0.5, y + 0.5)``; the box edges ``x1``, ``x2`` map to the outer edges of the ``M`` mask cells
    (``grid_sample`` with ``align_corners=False``, bilinear, zero outside the map). As the reference's
    CPU path, only the pixels within one pixel of the box (``floor(x1) - 1 .. ceil(x2) + 1``, clipped to
    the image) are computed; the rest are False. Outside the box the pasted value is below half the
    edge cell's probability, so at the default threshold this equals pasting over the whole image.
    A box of zero width or height gets an empty mask.

    Detections are sorted by the size of their pixel window and pasted in batches of equal window
    size (the largest in the batch), so the temporary memory stays near ``max_chunk_bytes`` however
    many detections and however large the image.
    """
    height, width = int(image_size[0]), int(image_size[1])
    out = torch.zeros((probs.shape[0], height, width), dtype=torch.bool, device=probs.device)
    if probs.shape[0] == 0 or height == 0 or width == 0:
        return out
    boxes = boxes.to(probs.device, torch.float32)
    windows = _pixel_windows(boxes, height, width)
    areas = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    order = torch.argsort(areas, stable=True)
    for chunk in _chunks_by_area(areas[order].tolist(), max_chunk_bytes):
        idx = order[chunk]
        _paste_chunk(out, probs[idx].float(), boxes[idx], windows[idx], idx, threshold)
    return out


def _pixel_windows(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(D, 4)`` int64 pixel ranges ``[x0, y0, x1, y1)`` within one pixel of each box, in the image."""
    lo = (boxes[:, :2].floor() - 1).clamp(min=0)
    hi = boxes[:, 2:].ceil() + 1
    hi = torch.minimum(hi, hi.new_tensor([width, height])).clamp(min=0)
    lo = torch.minimum(lo, hi)  # a box wholly outside the image gets an empty window
    degenerate = ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[:, None]
    hi = torch.where(degenerate, lo, hi)
    return torch.cat([lo, hi], dim=1).long()


# Temporary bytes per window pixel in ``_paste_chunk``: the sampling grid (2 x fp32), the sampled
# value (fp32), its threshold and the window test (bool each).
_BYTES_PER_WINDOW_PIXEL = 14


def _chunks_by_area(sorted_areas: list[int], max_bytes: int) -> list[slice]:
    """Split detections sorted by window area into runs whose ``count * largest area`` fits the budget."""
    chunks, start = [], 0
    for end, area in enumerate(sorted_areas, start=1):
        # Ascending areas: the newest detection has the largest window of the run [start, end).
        if (end - start) * area * _BYTES_PER_WINDOW_PIXEL > max_bytes and end - 1 > start:
            chunks.append(slice(start, end - 1))
            start = end - 1
    chunks.append(slice(start, len(sorted_areas)))
    return chunks


def _paste_chunk(out: Tensor, probs: Tensor, boxes: Tensor, windows: Tensor, idx: Tensor,
                 threshold: float) -> None:
    """Paste ``probs (n, M, M)`` into ``out[idx]`` over windows of one common size (the largest).

    Every detection's window is grown to the common size and shifted back inside the image where
    needed; pixels outside its own window are masked off afterwards, so the result does not depend on
    which detections share a batch.
    """
    height, width = out.shape[-2:]
    win_w = int((windows[:, 2] - windows[:, 0]).max())
    win_h = int((windows[:, 3] - windows[:, 1]).max())
    if win_w == 0 or win_h == 0:
        return
    x0 = windows[:, 0].clamp(max=width - win_w)
    y0 = windows[:, 1].clamp(max=height - win_h)
    cols = x0[:, None] + torch.arange(win_w, device=out.device)  # (n, win_w) image columns
    rows = y0[:, None] + torch.arange(win_h, device=out.device)  # (n, win_h) image rows
    # Pixel centres in the box's normalised [-1, 1] frame, as grid_sample(align_corners=False) reads it.
    gx = (cols.to(torch.float32) + 0.5 - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1
    gy = (rows.to(torch.float32) + 0.5 - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    n = probs.shape[0]
    grid = torch.stack([gx[:, None, :].expand(n, win_h, win_w), gy[:, :, None].expand(n, win_h, win_w)], dim=3)
    grid = torch.nan_to_num(grid, nan=0.0, posinf=0.0, neginf=0.0)  # degenerate boxes: empty windows anyway
    values = F.grid_sample(probs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    inside_x = (cols >= windows[:, 0:1]) & (cols < windows[:, 2:3])
    inside_y = (rows >= windows[:, 1:2]) & (rows < windows[:, 3:4])
    pasted = (values >= threshold) & inside_y[:, :, None] & inside_x[:, None, :]
    out[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = pasted
