"""Public PISA loss API: pure functions usable from any training loop.

Conventions: ``C`` foreground classes ``0..C-1``, background label ``C``; sigmoid heads have ``C``
logit columns, softmax heads ``C + 1`` with background last; boxes ``(x1, y1, x2, y2)`` without
``+1``. Every function checks its tensors' shapes and dtypes first and names the argument in its
error. See ``docs/losses.md``.
"""

from .focal import sigmoid_focal_loss, softmax_cross_entropy
from .hlr import HLRRank, gt_group_ids, iou_hlr, nms_match, score_hlr
from .per_image import flatten_gt_inds
from .pisa import carl_loss, isr_p
from .regression import aligned_box_iou, l1_loss, smooth_l1_loss

__all__ = [
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "smooth_l1_loss",
    "l1_loss",
    "aligned_box_iou",
    "HLRRank",
    "iou_hlr",
    "gt_group_ids",
    "nms_match",
    "score_hlr",
    "isr_p",
    "carl_loss",
    "flatten_gt_inds",
]
