"""Hierarchical local ranks (HLR) of PISA, and the ``nms_match`` grouping they use.

* IoU-HLR ranks positives: group by GT, rank by IoU inside each group, then order all rank-0
  samples by IoU, then all rank-1 samples, and so on, separately per class.
* Score-HLR ranks negatives the same way, with NMS clusters (``nms_match``) as groups and the
  maximum foreground probability as the score.

Everything is batched: ranks come from stable sorts and run-starts (cumulative maxima), never
from Python loops over classes, GTs, groups or images. Ties are broken by the lower flat index.

Compat mode (``legacy_float_keys=True``) instead reproduces the reference's ranking call for call:
its float32 keys, laid out per class (IoU-HLR) or per image (Score-HLR) in ascending sample order,
ranked with ``torch.sort(key, descending=True)``, which is not stable (on CPU, equal keys keep
their index order only in tensors of at most 16 elements). That mode loops over classes, groups and
images as the reference does (defect D8); it exists for index-level comparisons with the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_tensor
from .focal import upcast

__all__ = ["HLRRank", "iou_hlr", "gt_group_ids", "nms_match", "score_hlr"]


# --------------------------------------------------------------------------------------------
# sorting helpers
# --------------------------------------------------------------------------------------------

def _lexsort(keys: list[tuple[Tensor, bool]]) -> Tensor:
    """Stable lexicographic argsort of 1-D keys; ties go to the lower index.

    Args:
        keys: ``(key, descending)`` pairs, most significant first, all of length ``n``.

    Returns:
        ``(n,)`` int64 permutation.
    """
    n = keys[0][0].shape[0]
    perm = torch.arange(n, device=keys[0][0].device)
    # Least significant key first; every later stable sort keeps the earlier order among its ties.
    for key, descending in reversed(keys):
        perm = perm[torch.argsort(key[perm], descending=descending, stable=True)]
    return perm


def _run_starts(sorted_keys: list[Tensor]) -> Tensor:
    """For keys already in sorted order, the index where each element's run of equal keys starts.

    Args:
        sorted_keys: 1-D tensors of equal length ``n`` (e.g. ``labels[order]``); a run is a maximal
            stretch where all of them are equal.

    Returns:
        ``(n,)`` int64; ``arange(n) - result`` is each element's 0-based position inside its run.
    """
    n = sorted_keys[0].shape[0]
    device = sorted_keys[0].device
    new_run = torch.zeros(n, dtype=torch.bool, device=device)
    new_run[0] = True
    for key in sorted_keys:
        new_run[1:] |= key[1:] != key[:-1]
    idx = torch.arange(n, device=device)
    return torch.cummax(torch.where(new_run, idx, torch.zeros_like(idx)), dim=0).values


def _rank_in_runs(order: Tensor, keys: list[Tensor]) -> Tensor:
    """0-based position of every element inside its run of equal ``keys`` along ``order``.

    Args:
        order: ``(n,)`` permutation sorted (at least) by ``keys``.
        keys: 1-D tensors in original element order.

    Returns:
        ``(n,)`` int64 ranks in original element order.
    """
    sorted_keys = [k[order] for k in keys]
    pos = torch.arange(order.shape[0], device=order.device)
    ranks_sorted = pos - _run_starts(sorted_keys)
    return torch.empty_like(ranks_sorted).scatter_(0, order, ranks_sorted)


def _runs(keys: list[Tensor]) -> list[Tensor]:
    """Indices of the elements sharing each distinct value of ``keys``, one tensor per value.

    Args:
        keys: 1-D tensors of equal length ``n``, most significant first.

    Returns:
        One int64 tensor per distinct key tuple, in ascending key order; each lists its elements in
        ascending index order (the layout of the reference's ``nonzero(label == c)`` selections).
    """
    n = keys[0].shape[0]
    order = _lexsort([(key, False) for key in keys])
    pos = torch.arange(n, device=order.device)
    firsts = torch.nonzero(_run_starts([key[order] for key in keys]) == pos).squeeze(1)
    sizes = torch.diff(firsts, append=firsts.new_tensor([n]))
    return list(torch.split(order, sizes.tolist()))


def _reference_rank(key: Tensor) -> Tensor:
    """0-based rank of every element by ``key``, descending, with the reference's own sorting call.

    ``torch.sort(descending=True)`` without ``stable=True`` on the key's device: equal keys come
    out in whatever order that sort leaves them, exactly as in the reference. The rank is the
    inverse of that permutation (the reference sorts the permutation a second time for it).
    """
    order = torch.sort(key, descending=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


# --------------------------------------------------------------------------------------------
# IoU-HLR (positives)
# --------------------------------------------------------------------------------------------

@dataclass
class HLRRank:
    """IoU-HLR ranks of ``P`` positives.

    Attributes:
        local_rank: ``(P,)`` int64, position inside the positive's ``(class, group)`` by IoU, descending.
        rank: ``(P,)`` int64, position among the positives of its class by ``(local_rank, -IoU)``.
        n_max: scalar int64 tensor, the largest number of positives of any one class (0 if ``P = 0``).
    """

    local_rank: Tensor
    rank: Tensor
    n_max: Tensor


def iou_hlr(labels: Tensor, groups: Tensor, ious: Tensor, legacy_float_keys: bool = False) -> HLRRank:
    """IoU hierarchical local rank of positives (PISA §3.1; method spec §2 step 4).

    Args:
        labels: ``(P,)`` integer class of each positive.
        groups: ``(P,)`` integer group id (GT identity, see ``gt_group_ids``); only compared within a
            class.
        ious: ``(P,)`` float IoU of each positive's regressed box with its GT.
        legacy_float_keys: reproduce the reference's ranking exactly (defects D9, D8): per
            ``(class, group)`` the local rank comes from ``torch.sort(ious, descending=True)``; per
            class the rank from ``torch.sort(key, descending=True)`` of the float32 key
            ``iou + n_max - local_rank``; both sorts are unstable and run on the positives of that
            group / class in ascending order, as the reference lays them out. Near-ties (closer than
            one float32 step of the key) and exact ties then order as in the reference.

    Returns:
        ``HLRRank`` with local ranks, class ranks and ``n_max``. By default ties go to the lower index.
    """
    check_tensor("iou_hlr", "labels", labels, ("P",), "int")
    size = {"P": labels.shape[0]}
    check_tensor("iou_hlr", "groups", groups, ("P",), "int", size)
    check_tensor("iou_hlr", "ious", ious, ("P",), "float", size)
    device = labels.device
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return HLRRank(empty, empty.clone(), torch.zeros((), dtype=torch.long, device=device))
    ious = upcast(ious).detach()
    labels, groups = labels.long(), groups.long()
    order1 = _lexsort([(labels, False), (groups, False), (ious, True)])
    # order1 is sorted by class first, so its class runs give the per-class counts.
    n_max = _rank_in_runs(order1, [labels]).max() + 1
    if legacy_float_keys:
        local_rank, rank = _reference_iou_hlr(labels, groups, ious.float(), n_max)
        return HLRRank(local_rank=local_rank, rank=rank, n_max=n_max)
    local_rank = _rank_in_runs(order1, [labels, groups])
    order2 = _lexsort([(labels, False), (local_rank, False), (ious, True)])
    rank = _rank_in_runs(order2, [labels])
    return HLRRank(local_rank=local_rank, rank=rank, n_max=n_max)


def _reference_iou_hlr(labels: Tensor, groups: Tensor, ious: Tensor, n_max: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's IoU-HLR, call for call: ``(local_rank, rank)``, both ``(P,)`` int64.

    ``ious`` is float32. Each sort sees the same tensor the reference sorts: the IoUs of one
    ``(class, group)`` cell, then the keys of one class, members in ascending index order.
    """
    local_rank = torch.empty_like(labels)
    key = torch.empty_like(ious)
    for members in _runs([labels, groups]):
        local = _reference_rank(ious[members])
        local_rank[members] = local
        key[members] = ious[members] + (n_max - local).float()  # exact integers, then one float32 add
    rank = torch.empty_like(labels)
    for members in _runs([labels]):
        rank[members] = _reference_rank(key[members])
    return local_rank, rank


def gt_group_ids(img_inds: Tensor, gt_inds: Tensor, legacy_gt_offset: bool = False) -> Tensor:
    """Integer group id of each positive's ``(image, GT)`` pair.

    Args:
        img_inds: ``(P,)`` image index of each positive, non-decreasing (positives in ascending
            flat order, image-major).
        gt_inds: ``(P,)`` index of the assigned GT inside its image (``>= 0``).
        legacy_gt_offset: reproduce the reference's non-cumulative offset (defect D1): image ``i``'s
            GT indices are shifted by ``1 +`` the largest GT index among the positives of the
            previous image that has positives. With 3+ images, ids of different images collide.

    Returns:
        ``(P,)`` int64 group ids. By default they are unique per ``(image, GT)`` pair.
    """
    check_tensor("gt_group_ids", "img_inds", img_inds, ("P",), "int")
    check_tensor("gt_group_ids", "gt_inds", gt_inds, ("P",), "int", {"P": img_inds.shape[0]})
    img, gt = img_inds.long(), gt_inds.long()
    if gt.numel() == 0:
        return gt.clone()
    if not legacy_gt_offset:
        return img * (gt.max() + 1) + gt
    if bool((img[1:] < img[:-1]).any()):
        raise ValueError("gt_group_ids(legacy_gt_offset=True): img_inds must be non-decreasing "
                         "(positives in ascending flat order, image-major)")
    # One run per image that has positives; the offset of run j is 1 + the max GT index of run j-1.
    new_run = torch.ones_like(img, dtype=torch.bool)
    new_run[1:] = img[1:] != img[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    run_max = torch.full_like(gt, -1).scatter_reduce(0, run_id, gt, reduce="amax", include_self=True)
    prev_max = torch.cat([run_max.new_full((1,), -1), run_max[:-1]])
    return gt + (prev_max + 1)[run_id]


# --------------------------------------------------------------------------------------------
# nms_match and Score-HLR (negatives)
# --------------------------------------------------------------------------------------------

def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of the boxes ``a[..., :4]`` and ``b[..., :4]``, broadcast against each other.

    Computed in the boxes' dtype (float32, or float64 if given) with no eps:
    ``inter / (area_a + area_b - inter)``, so a 0/0 (two zero-area boxes) stays NaN and never
    matches. Every operation is commutative in IEEE arithmetic, so a pair gets bit for bit the same
    IoU whichever side each box is on, and in a pairwise matrix as in a list of pairs.
    """
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
    h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0)
    inter = w.mul_(h)
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def _greedy_keep(suppressed_by: Tensor, valid: Tensor) -> Tensor:
    """Keep set of greedy NMS, given who may suppress whom (used by ``_dense_grouping``).

    Args:
        suppressed_by: ``(R, W, W)`` bool; ``[r, b, a]`` is true iff ``a`` precedes ``b`` in score
            order and would suppress ``b`` if ``a`` is kept.
        valid: ``(R, W)`` bool, false for padding.

    Returns:
        ``(R, W)`` bool keep mask, identical to the sequential greedy pass.

    A box is decided once every possible suppressor of it is decided: it is dropped as soon as one
    of them is kept, and kept when none is kept. Each round settles at least the first undecided
    box, and usually many, so the loop runs over dependency rounds (a handful in practice), never
    over boxes.
    """
    keep = torch.zeros_like(valid)
    undecided = valid.clone()
    while True:
        undecided &= ~(suppressed_by & keep[:, None, :]).any(dim=2)
        blocked = (suppressed_by & undecided[:, None, :]).any(dim=2)
        ready = undecided & ~blocked
        keep |= ready
        undecided &= ~ready
        if not bool(undecided.any()):
            return keep


@dataclass
class _Layout:
    """Boxes of several images in visiting order, image after image (the input of the groupings).

    Attributes:
        boxes: ``(V, 4)`` boxes in visiting order.
        run: ``(V,)`` int64 image slot (``0..R-1``, non-decreasing).
        pos: ``(V,)`` int64 position inside its image.
        start: ``(V,)`` int64 flat index of its image's first box.
        sizes: number of boxes of each image slot.
    """

    boxes: Tensor
    run: Tensor
    pos: Tensor
    start: Tensor
    sizes: list[int]


def _dense_grouping(lay: _Layout, iou_thr: float) -> tuple[Tensor, Tensor]:
    """Greedy keep set and leaders from the full ``W x W`` suppression mask of every image.

    Returns:
        ``keep (V,)`` bool and ``leader (V,)`` int64: the flat index of each box's group leader (the
        earliest kept box that suppresses it; itself if kept), both in visiting order.
    """
    num_runs, width = len(lay.sizes), max(lay.sizes)
    device = lay.boxes.device
    padded = lay.boxes.new_zeros(num_runs, width, 4)
    padded[lay.run, lay.pos] = lay.boxes
    valid = torch.zeros(num_runs, width, dtype=torch.bool, device=device)
    valid[lay.run, lay.pos] = True
    # [r, b, a]: a comes before b in visiting order and IoU(a, b) >= thr.
    earlier = torch.ones(width, width, dtype=torch.bool, device=device).tril(diagonal=-1)
    suppressed_by = ((_iou(padded[:, :, None], padded[:, None]) >= iou_thr) & earlier
                     & valid[:, :, None] & valid[:, None, :])
    keep = _greedy_keep(suppressed_by, valid)
    # A dropped box joins the first kept box that suppresses it: the one that dropped it greedily.
    col = torch.arange(width, device=device).expand(num_runs, width)
    leader = torch.where(keep, col, (suppressed_by & keep[:, None, :]).to(torch.uint8).argmax(dim=2))
    return keep[lay.run, lay.pos], lay.start + leader[lay.run, lay.pos]


def _joining_pairs(lay: _Layout, iou_thr: float) -> tuple[Tensor, Tensor]:
    """Every pair of boxes of one image with ``IoU >= iou_thr``, for a threshold ``> 0``.

    Such a pair overlaps (a disjoint pair has IoU 0, or NaN), so it is found without a ``W x W``
    matrix: with each image's boxes sorted by ``x1`` into slots, the boxes that come after slot
    ``s`` and overlap it in x are the slots ``s + 1 .. hi_s - 1``, those with ``x1 < x2_s``
    (``searchsorted``). Only these pairs get an IoU, with the same ``_iou`` arithmetic as the dense
    mask. Boxes must have finite coordinates.

    Returns:
        ``(first, second)`` int64 flat indices in visiting order, ``first < second``.
    """
    by_x = _lexsort([(lay.run, False), (lay.boxes[:, 0], False)])  # still image after image
    sorted_boxes = lay.boxes[by_x]  # slot k holds box by_x[k]; it has run[k], pos[k]
    device = sorted_boxes.device
    rows = sorted_boxes.new_full((len(lay.sizes), max(lay.sizes)), float("inf"))
    rows[lay.run, lay.pos] = sorted_boxes[:, 0]
    ends = torch.zeros_like(rows)
    ends[lay.run, lay.pos] = sorted_boxes[:, 2]
    hi = torch.searchsorted(rows, ends, side="left")[lay.run, lay.pos]  # first slot with x1 >= own x2
    count = (hi - lay.pos - 1).clamp_(min=0)
    total = int(count.sum())
    slots = torch.arange(count.shape[0], device=device)
    slot = torch.repeat_interleave(slots, count, output_size=total)
    # The k-th pair of slot s pairs it with slot s + 1 + k.
    other = torch.arange(total, device=device) + (slots + 1 - (torch.cumsum(count, 0) - count))[slot]
    coords = sorted_boxes.t().contiguous()  # (4, V): gathers of whole coordinate rows are the fast layout
    hit = _iou(coords.index_select(1, slot).t(), coords.index_select(1, other).t()) >= iou_thr
    i, j = by_x[slot[hit]], by_x[other[hit]]
    return torch.minimum(i, j), torch.maximum(i, j)


def _edge_greedy_keep(first: Tensor, second: Tensor, num: int) -> Tensor:
    """Keep set of greedy NMS from the list of suppression edges (the sparse ``_greedy_keep``).

    Args:
        first, second: ``(E,)`` int64 flat indices in visiting order: box ``first[e]`` precedes box
            ``second[e]`` and would suppress it if kept.
        num: number of boxes ``V``.

    Returns:
        ``(V,)`` bool keep mask, identical to the sequential greedy pass.

    The same dependency rounds as ``_greedy_keep``, on the edges instead of a ``V x V`` mask: drop
    the undecided boxes that a kept box suppresses, then keep those with no undecided suppressor
    left. Edges into decided boxes are dropped as the rounds go.
    """
    keep = torch.zeros(num, dtype=torch.bool, device=first.device)
    undecided = torch.ones_like(keep)
    while True:
        undecided[second[keep[first]]] = False
        live = undecided[second]
        first, second = first[live], second[live]
        blocked = torch.zeros_like(keep)
        blocked[second[undecided[first]]] = True
        ready = undecided & ~blocked
        keep |= ready
        undecided &= ~ready
        if not bool(undecided.any()):
            return keep


def _sparse_grouping(lay: _Layout, iou_thr: float) -> tuple[Tensor, Tensor]:
    """``_dense_grouping``'s result from the IoUs of the overlapping pairs only (thresholds > 0).

    The suppression edges (earlier box, later box, ``IoU >= thr``) come from ``_joining_pairs``, the
    keep set from ``_edge_greedy_keep``; each dropped box's leader is the earliest kept box with an
    edge into it.

    Returns:
        ``keep (V,)`` bool and ``leader (V,)`` int64, as ``_dense_grouping``.
    """
    first, second = _joining_pairs(lay, iou_thr)
    num = lay.boxes.shape[0]
    keep = _edge_greedy_keep(first, second, num)
    by_kept = keep[first]
    leader = torch.arange(num, device=keep.device)
    return keep, leader.scatter_reduce_(0, second[by_kept], first[by_kept], reduce="amin", include_self=True)


def _batch_index(boxes: Tensor, batch_ids: Tensor | None, fn: str) -> Tensor:
    if batch_ids is None:
        return torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    check_tensor(fn, "batch_ids", batch_ids, ("V",), "int", {"V": boxes.shape[0]})
    return batch_ids.long()


def _check_boxes_and_scores(fn: str, boxes: Tensor, scores: Tensor) -> None:
    check_tensor(fn, "boxes", boxes, ("V", 4), "float")
    check_tensor(fn, "scores", scores, ("V",), "float", {"V": boxes.shape[0]})


def _visit_order(scores: Tensor, batch: Tensor, legacy_sort: bool) -> Tensor:
    """Order in which ``nms_match`` visits the boxes: by batch id, then by score, descending.

    By default ties go to the lower index. With ``legacy_sort`` each image's boxes (in ascending
    index order) are ordered by ``torch.sort(scores, descending=True)`` on CPU, the unstable sort
    of the reference's CPU-only grouping op, which receives each image's valid negatives alone.
    """
    if not legacy_sort:
        return _lexsort([(batch, False), (scores, True)])
    parts = []
    for members in _runs([batch]):
        by_score = torch.sort(scores[members].float().cpu(), descending=True).indices
        parts.append(members[by_score.to(members.device)])
    return torch.cat(parts)


def nms_match(boxes: Tensor, scores: Tensor, iou_thr: float = 0.5, batch_ids: Tensor | None = None, *,
              legacy_sort: bool = False) -> tuple[Tensor, Tensor]:
    """Group boxes into greedy-NMS clusters (method spec §4.2).

    Boxes are visited by score (descending, ties to the lower index). An unsuppressed box becomes a
    leader; every later unsuppressed box with ``IoU(leader, box) >= iou_thr`` (note ``>=``) joins
    its group. Boxes only group with boxes of the same batch id.

    IoUs are float32 (float64 for float64 boxes) with no eps, as in the greedy definition. For a
    threshold above zero only overlapping pairs can join, so the IoUs are computed for the pairs
    whose x intervals overlap (found by a sort and ``searchsorted`` per image) and the keep set
    comes from dependency rounds over the joining pairs: no ``V x V`` matrix and no loop over boxes,
    groups or images. A threshold ``<= 0`` (where disjoint boxes join) or non-finite coordinates
    use the full per-image ``V x V`` mask instead; both give the greedy result exactly.

    Args:
        boxes: ``(V, 4)`` float boxes ``(x1, y1, x2, y2)``.
        scores: ``(V,)`` float scores.
        iou_thr: grouping threshold.
        batch_ids: optional ``(V,)`` integer image index of each box.
        legacy_sort: visit each image's boxes in the order of ``torch.sort(scores, descending=True)``
            on CPU (not stable), as the reference's grouping op does, instead of ties to the lower
            index. Only boxes with exactly equal scores can be affected.

    Returns:
        ``group_id (V,)`` int64: groups numbered ``0..G-1`` in leader order, by (batch id, leader
        score); ``rank_in_group (V,)`` int64: position in visiting order inside the group (0 = leader).
    """
    _check_boxes_and_scores("nms_match", boxes, scores)
    num = boxes.shape[0]
    device = boxes.device
    batch = _batch_index(boxes, batch_ids, "nms_match")
    if num == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    boxes, scores = upcast(boxes).detach(), upcast(scores).detach()
    order = _visit_order(scores, batch, legacy_sort)
    starts = _run_starts([batch[order]])
    new_run = starts == torch.arange(num, device=device)
    run = torch.cumsum(new_run.long(), 0) - 1
    lay = _Layout(boxes=boxes[order], run=run, pos=torch.arange(num, device=device) - starts, start=starts,
                  sizes=torch.bincount(run).tolist())
    # Pairs that do not overlap have IoU 0 (or NaN): they reach only a threshold <= 0 (as rounded
    # to the boxes' dtype, the way `iou >= iou_thr` compares), which needs every pair.
    if float(torch.tensor(iou_thr, dtype=boxes.dtype)) > 0 and bool(torch.isfinite(boxes).all()):
        keep, leader = _sparse_grouping(lay, iou_thr)
    else:
        keep, leader = _dense_grouping(lay, iou_thr)
    # Groups are numbered in leader order: image after image, by leader score.
    group_sorted = (torch.cumsum(keep.long(), 0) - 1)[leader]

    # Elements of `order` are in visiting order within their image, so a stable sort by group
    # lists each group's members in that order.
    group_id = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)
    by_group = order[torch.argsort(group_sorted, stable=True)]
    rank_in_group = _rank_in_runs(by_group, [group_id])
    return group_id, rank_in_group


def score_hlr(boxes: Tensor, scores: Tensor, iou_thr: float = 0.5, batch_ids: Tensor | None = None,
              legacy_float_keys: bool = False) -> Tensor:
    """Score hierarchical local rank of negatives (PISA §3.1; method spec §4.1 step 8).

    Negatives are grouped by ``nms_match``; then, per batch id, all leaders are listed by score,
    then all second members by score, and so on.

    Args:
        boxes: ``(V, 4)`` decoded boxes of the (valid) negatives.
        scores: ``(V,)`` maximum foreground probability of each negative.
        iou_thr: ``nms_match`` threshold.
        batch_ids: optional ``(V,)`` integer image index; ranks are computed separately per image.
        legacy_float_keys: reproduce the reference's ranking exactly (defects D9, D8): groups from
            ``nms_match(legacy_sort=True)``, then per image the float32 key
            ``V_img - rank_in_group + score`` of its negatives (ascending index order, as the
            reference lays out the image's valid negatives) ranked by
            ``torch.sort(key, descending=True)``, which is not stable. Near-ties and exact ties
            then order as in the reference.

    Returns:
        ``(V,)`` int64 0-based Score-HLR rank within each batch id. By default ties go to the lower
        index.
    """
    _check_boxes_and_scores("score_hlr", boxes, scores)
    batch = _batch_index(boxes, batch_ids, "score_hlr")
    _, rank_in_group = nms_match(boxes, scores, iou_thr, batch_ids, legacy_sort=legacy_float_keys)
    if boxes.shape[0] == 0:
        return rank_in_group
    scores = upcast(scores).detach()
    if legacy_float_keys:
        return _reference_score_hlr(scores.float(), rank_in_group, batch)
    order = _lexsort([(batch, False), (rank_in_group, False), (scores, True)])
    return _rank_in_runs(order, [batch])


def _reference_score_hlr(scores: Tensor, rank_in_group: Tensor, batch: Tensor) -> Tensor:
    """The reference's Score-HLR ranking, one image at a time, with its key and its sorting call."""
    rank = torch.empty_like(rank_in_group)
    for members in _runs([batch]):
        # V - g is an exact integer in float32; adding the score is the key's one rounding.
        key = (members.shape[0] - rank_in_group[members]).float() + scores[members]
        rank[members] = _reference_rank(key)
    return rank
