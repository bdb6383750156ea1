"""Every public function of pisa.losses checks its tensors up front, with one message naming the
function, the argument, the expected shape and dtype and the ones given; and the reference's calling
conventions (R-CNN RoIs with a batch column, ``avg_factor=None``, the L1 variant of CARL) work."""

import math

import pytest
import torch

from pisa.losses import (aligned_box_iou, carl_loss, gt_group_ids, iou_hlr, isr_p, l1_loss, nms_match, score_hlr,
                         sigmoid_focal_loss, smooth_l1_loss, softmax_cross_entropy)

from .test_isr_p import delta_decode, random_batch

F, L = torch.float32, torch.long


def z(*shape, dtype=F):
    return torch.zeros(*shape, dtype=dtype)


def isr_p_args(**changes):
    """Valid isr_p arguments for N = 3, C = 2 (sigmoid focal), with some replaced."""
    args = dict(cls_score=z(3, 2), bbox_pred=z(3, 4), labels=z(3, dtype=L), label_weights=torch.ones(3),
                bbox_targets=z(3, 4), priors=z(3, 4), gt_inds=z(3, dtype=L), img_inds=z(3, dtype=L),
                num_classes=2, decode=lambda priors, deltas: deltas)
    return {**args, **changes}


def carl_args(**changes):
    args = dict(cls_score=z(3, 2), labels=z(3, dtype=L), bbox_pred=z(3, 4), bbox_targets=z(3, 4), num_classes=2)
    return {**args, **changes}


BAD_CALLS = [
    (lambda: sigmoid_focal_loss(z(3, 2), z(3)), TypeError,
     "sigmoid_focal_loss: labels must have shape (N,) with N = 3 and an integer dtype"
     "; got shape (3,), dtype torch.float32"),
    (lambda: sigmoid_focal_loss(z(3), z(3, dtype=L)), ValueError,
     "sigmoid_focal_loss: logits must have shape (N, C) and a floating-point dtype"
     "; got shape (3,), dtype torch.float32"),
    (lambda: softmax_cross_entropy(z(3, 3), z(4, dtype=L)), ValueError,
     "softmax_cross_entropy: labels must have shape (N,) with N = 3 and an integer dtype"
     "; got shape (4,), dtype torch.int64"),
    (lambda: smooth_l1_loss(z(3, 4), z(3, 3)), ValueError,
     "smooth_l1_loss: target must have shape (3, 4) and a floating-point dtype; got shape (3, 3), dtype torch.float32 "
     "(the shape of pred)"),
    (lambda: l1_loss(z(3, 4, dtype=L), z(3, 4)), TypeError,
     "l1_loss: pred must be a tensor of a floating-point dtype; got shape (3, 4), dtype torch.int64"),
    (lambda: aligned_box_iou(z(3, 4), z(2, 4)), ValueError,
     "aligned_box_iou: b must have shape (P, 4) with P = 3 and a floating-point dtype"
     "; got shape (2, 4), dtype torch.float32"),
    (lambda: gt_group_ids(z(3, dtype=L), z(3)), TypeError,
     "gt_group_ids: gt_inds must have shape (P,) with P = 3 and an integer dtype; got shape (3,), dtype torch.float32"),
    (lambda: iou_hlr(z(3, dtype=L), z(2, dtype=L), z(3)), ValueError,
     "iou_hlr: groups must have shape (P,) with P = 3 and an integer dtype; got shape (2,), dtype torch.int64"),
    (lambda: nms_match(z(3, 5), z(3)), ValueError,
     "nms_match: boxes must have shape (V, 4) and a floating-point dtype; got shape (3, 5), dtype torch.float32"),
    (lambda: nms_match(z(3, 4), z(3), batch_ids=z(3)), TypeError,
     "nms_match: batch_ids must have shape (V,) with V = 3 and an integer dtype; got shape (3,), dtype torch.float32"),
    (lambda: score_hlr(z(3, 4), z(3, 1)), ValueError,
     "score_hlr: scores must have shape (V,) with V = 3 and a floating-point dtype"
     "; got shape (3, 1), dtype torch.float32"),
    (lambda: isr_p(**isr_p_args(priors=z(3, 3))), ValueError,
     "isr_p: priors must have shape (N, 4) or (N, 5) with N = 3 and a floating-point dtype; got shape (3, 3), dtype "
     "torch.float32 (anchors / RoIs (x1, y1, x2, y2), or R-CNN RoIs (batch_index, x1, y1, x2, y2))"),
    (lambda: isr_p(**isr_p_args(cls_score=z(3, 3))), ValueError,
     "isr_p: cls_score must have shape (N, 2) with N = 3 and a floating-point dtype; got shape (3, 3), dtype "
     "torch.float32 (cls_loss='sigmoid_focal' needs (N, num_classes) sigmoid logits)"),
    (lambda: isr_p(**isr_p_args(cls_loss="softmax_ce")), ValueError,
     "isr_p: cls_score must have shape (N, 3) with N = 3 and a floating-point dtype; got shape (3, 2), dtype "
     "torch.float32 (cls_loss='softmax_ce' needs (N, num_classes + 1) logits, background last)"),
    (lambda: isr_p(**isr_p_args(bbox_pred=z(3, 6))), ValueError,
     "isr_p: bbox_pred must have shape (N, 4) or (N, 8) with N = 3 and a floating-point dtype; got shape (3, 6), "
     "dtype torch.float32 (class-agnostic (N, 4) or class-specific (N, 4 * num_classes) deltas)"),
    (lambda: isr_p(**isr_p_args(label_weights=z(2))), ValueError,
     "isr_p: label_weights must have shape (N,) with N = 3 and a floating-point dtype; got shape (2,), dtype "
     "torch.float32"),
    (lambda: isr_p(**isr_p_args(gt_inds=[0, 0, 0])), TypeError,
     "isr_p: gt_inds must have shape (N,) with N = 3 and an integer dtype; got a list, not a tensor"),
    (lambda: isr_p(**isr_p_args(img_inds=z(3))), TypeError,
     "isr_p: img_inds must have shape (N,) with N = 3 and an integer dtype; got shape (3,), dtype torch.float32 "
     "(image index of every sample)"),
    (lambda: isr_p(**isr_p_args(decode=None)), TypeError,
     "isr_p: decode must be a callable decode(priors (P, 4), deltas (P, 4)) -> boxes (P, 4), e.g. your box coder's "
     "decode; got NoneType"),
    (lambda: isr_p(**isr_p_args(cls_loss="focal")), ValueError,
     "isr_p: cls_loss must be 'sigmoid_focal', 'softmax_ce' or a callable, got 'focal'"),
    (lambda: carl_loss(**carl_args(cls_score=z(3, 3))), ValueError,
     "carl_loss: cls_score must have shape (N, 2) with N = 3 and a floating-point dtype; got shape (3, 3), dtype "
     "torch.float32 (sigmoid=True: one logit per class; softmax heads pass sigmoid=False with C + 1 columns)"),
    (lambda: carl_loss(**carl_args(bbox_targets=z(3, 4, dtype=torch.int32))), TypeError,
     "carl_loss: bbox_targets must have shape (N, 4) with N = 3 and a floating-point dtype; got shape (3, 4), dtype "
     "torch.int32 (encoded target deltas)"),
    (lambda: carl_loss(**carl_args(avg_factor=0)), ValueError,
     "carl_loss: avg_factor must be a positive number, a one-element tensor or None (= N); got 0"),
    (lambda: carl_loss(**carl_args(avg_factor=torch.ones(2))), ValueError,
     "carl_loss: avg_factor must be a number, a one-element tensor or None (= N); got a tensor of shape (2,), "
     "dtype torch.float32"),
    (lambda: carl_loss(**carl_args(loss="giou")), ValueError,
     "carl_loss: loss must be one of ('smooth_l1', 'l1') (the head's regression loss on encoded deltas; IoU-type "
     "losses are not supported, defect D10), got 'giou'"),
    (lambda: carl_loss(**carl_args(num_classes=0)), ValueError,
     "carl_loss: num_classes must be the number of foreground classes C, an int >= 1 (background is label C); got 0"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS, ids=[m.split(":")[0] + "-" + str(i)
                                                              for i, (_, _, m) in enumerate(BAD_CALLS)])
def test_bad_input_message(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value) == message


def test_isr_p_accepts_rcnn_rois_with_batch_column():
    # Priors (N, 5) = (batch_index, x1, y1, x2, y2), as R-CNN heads hold them: same weights as (N, 4).
    inputs = random_batch(0, 3)
    ref = isr_p(**inputs, num_classes=3, decode=delta_decode)
    rois = torch.cat([inputs["img_inds"][:, None].float(), inputs["priors"]], dim=1)
    out = isr_p(**dict(inputs, priors=rois), num_classes=3, decode=delta_decode)
    assert torch.equal(out, ref)
    # The first column is the one dropped: reading the first four columns as a box changes the weights.
    misread = isr_p(**dict(inputs, priors=rois[:, :4].contiguous()), num_classes=3, decode=delta_decode)
    assert not torch.allclose(misread, ref)


def t4_inputs():
    # Method spec T4: C = 2, rows label 0, 1, background; delta errors (0.5, 0, 0, 0), (2, 0.2, 0, 0); N = 3.
    logits = torch.tensor([[math.log(3), 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    deltas = torch.tensor([[0.5, 0.0, 0.0, 0.0], [2.0, 0.2, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    return dict(cls_score=logits, labels=torch.tensor([0, 1, 2]), bbox_pred=deltas, bbox_targets=z(3, 4),
                num_classes=2, sigmoid=False)


def test_carl_avg_factor_none_means_n():
    # T4 normalises by A = N = 3, so avg_factor=None (the reference's N) gives its golden 0.461822.
    loss = carl_loss(**t4_inputs(), avg_factor=None)
    torch.testing.assert_close(loss, torch.tensor(0.461822), atol=1e-5, rtol=0)
    assert torch.equal(loss, carl_loss(**t4_inputs()))  # None is the default
    torch.testing.assert_close(carl_loss(**t4_inputs(), avg_factor=torch.tensor([3])), loss, atol=0, rtol=0)


def test_carl_l1_variant():
    # T4 with L1: R = (0.5, 2.2) summed over coordinates; c = (51/43, 35/43);
    # loss = (51/43 * 0.5 + 35/43 * 2.2) / 3 = (0.593023 + 1.790698) / 3 = 0.794574.
    loss = carl_loss(**t4_inputs(), avg_factor=3, loss="l1")
    torch.testing.assert_close(loss, torch.tensor(0.794574), atol=1e-5, rtol=0)
    # beta is ignored with loss="l1", and beta = 0 on SmoothL1 is the same L1.
    assert torch.equal(loss, carl_loss(**t4_inputs(), avg_factor=3, loss="l1", beta=0.11))
    torch.testing.assert_close(carl_loss(**t4_inputs(), avg_factor=3, beta=0.0), loss, atol=0, rtol=0)
