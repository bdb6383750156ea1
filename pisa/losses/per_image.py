"""From the per-image lists a detection head holds to the flat per-sample tensors of ``isr_p``.

A head usually keeps its assignment per image: either every sample's GT index (torchvision's
``Matcher`` output) or only the positives' GT ids (mmdetection's ``pos_assigned_gt_inds``). ``isr_p``
reads flat ``gt_inds (N,)`` and ``img_inds (N,)`` over the per-device batch; ``flatten_gt_inds``
builds them, so nobody writes that scatter by hand.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._checks import check_num_classes, check_tensor

__all__ = ["flatten_gt_inds"]


def _sample_counts(gt_inds_per_image: Sequence[Tensor], num_samples_per_image: Sequence[int] | None,
                   num_samples: int) -> list[int]:
    if num_samples_per_image is None:
        counts = [t.shape[0] for t in gt_inds_per_image]
        given = "the lengths of gt_inds_per_image (one GT index per sample)"
    else:
        if len(num_samples_per_image) != len(gt_inds_per_image):
            raise ValueError(f"flatten_gt_inds: num_samples_per_image has {len(num_samples_per_image)} entries "
                             f"but gt_inds_per_image has {len(gt_inds_per_image)}; give one of each per image")
        counts = [int(n) for n in num_samples_per_image]
        given = "num_samples_per_image"
    if sum(counts) != num_samples:
        raise ValueError(f"flatten_gt_inds: {given} add up to {sum(counts)} samples, but labels has "
                         f"{num_samples}; labels must be the images' samples concatenated, image-major")
    return counts


def flatten_gt_inds(labels: Tensor, num_classes: int, gt_inds_per_image: Sequence[Tensor],
                    num_samples_per_image: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Flat ``(gt_inds, img_inds)`` for ``isr_p`` from per-image assignment results.

    Args:
        labels: ``(N,)`` integer labels of all samples of the batch, image-major (image 0's ``N_0``
            samples, then image 1's, ...), background ``num_classes``; the same tensor ``isr_p`` gets.
        num_classes: ``C``; a sample is positive iff ``0 <= label < C``.
        gt_inds_per_image: one 1-D integer tensor per image, either
            * ``(N_i,)``: every sample's 0-based GT index inside image ``i`` (e.g. torchvision's
              ``Matcher`` output; the values of non-positives, such as -1 / -2, are never read), or
            * ``(P_i,)``: only the positives' 0-based GT ids, in ascending sample order
              (mmdetection's ``sampling_result.pos_assigned_gt_inds``; for its per-anchor
              ``assigned_gt_inds``, which are 1-based, subtract 1 first).
            Both forms may be mixed; when ``N_i == P_i`` they coincide.
        num_samples_per_image: ``N_i`` per image (anchors or RoIs of image ``i``). Needed when the
            lists hold positives only; by default each list's length (one entry per sample).

    Returns:
        ``gt_inds (N,)`` int64: each positive's GT index inside its image, ``-1`` for every other
        sample (``isr_p`` reads positives only); ``img_inds (N,)`` int64: each sample's image index.

    Raises:
        ValueError: counts that do not add up, a list whose length is neither ``N_i`` nor ``P_i``,
            or a positive without a GT (index ``< 0``); the message names the image.
    """
    fn = "flatten_gt_inds"
    check_num_classes(fn, num_classes)
    check_tensor(fn, "labels", labels, ("N",), "int")
    for i, gt in enumerate(gt_inds_per_image):
        check_tensor(fn, f"gt_inds_per_image[{i}]", gt, (None,), "int")
    counts = _sample_counts(gt_inds_per_image, num_samples_per_image, labels.shape[0])
    device = labels.device
    img_inds = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                       torch.tensor(counts, dtype=torch.long, device=device))
    positive = (labels >= 0) & (labels < num_classes)
    pos_ids = []
    for i, (gt, image_positive) in enumerate(zip(gt_inds_per_image, torch.split(positive, counts))):
        pos_ids.append(_positives_gt_ids(i, gt.to(device=device, dtype=torch.long), image_positive))
    gt_inds = torch.full_like(img_inds, -1)
    # Positives in ascending flat order are image-major, so the per-image lists line up with them.
    gt_inds[positive] = torch.cat(pos_ids) if pos_ids else gt_inds[:0]
    return gt_inds, img_inds


def _positives_gt_ids(image: int, gt: Tensor, positive: Tensor) -> Tensor:
    """The GT ids of one image's positives, from a per-sample or a per-positive list."""
    num_samples, num_pos = positive.shape[0], int(positive.sum())
    if gt.shape[0] == num_samples:
        ids = gt[positive]
    elif gt.shape[0] == num_pos:
        ids = gt
    else:
        raise ValueError(f"flatten_gt_inds: gt_inds_per_image[{image}] has {gt.shape[0]} entries, but image "
                         f"{image} has {num_samples} samples and {num_pos} positives; give one GT index per "
                         f"sample ({num_samples}) or per positive ({num_pos})")
    if bool((ids < 0).any()):
        raise ValueError(f"flatten_gt_inds: image {image} has a positive sample with GT index "
                         f"{int(ids.min())}; positives need their 0-based GT index (>= 0)")
    return ids
