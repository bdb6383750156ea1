import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from pisa.models.box_coder import DeltaXYWHCoder, box_iou, clip_boxes

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
PRIOR = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def random_boxes(count: int, generator: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * size
    wh = torch.rand(count, 2, generator=generator) * size / 2 + 1.0
    return torch.cat([xy, xy + wh], dim=1)


# ---- method spec T3 -----------------------------------------------------------------------------------

def test_t3_shift_in_x_and_its_iou():
    # dx = 0.1 moves the centre by 0.1·10 = 1 px; IoU with the prior = 9·10 / (11·10) = 9/11.
    decoded = DeltaXYWHCoder().decode(PRIOR, torch.tensor([[0.1, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(decoded, torch.tensor([[1.0, 0.0, 11.0, 10.0]]), atol=1e-5, rtol=0)
    assert box_iou(decoded, PRIOR)[0, 0].item() == pytest.approx(9 / 11, abs=1e-6)
    # With R-CNN stds the prediction 1 de-normalises to dx = 0.1, the same box.
    rcnn = DeltaXYWHCoder(stds=RCNN_STDS).decode(PRIOR, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rcnn, decoded, atol=1e-5, rtol=0)


def test_t3_double_width():
    # dw = ln 2 doubles the width around centre 5: x ∈ [−5, 15]; IoU = 100 / 200.
    decoded = DeltaXYWHCoder().decode(PRIOR, torch.tensor([[0.0, 0.0, math.log(2), 0.0]]))
    torch.testing.assert_close(decoded, torch.tensor([[-5.0, 0.0, 15.0, 10.0]]), atol=1e-5, rtol=0)
    assert box_iou(decoded, PRIOR)[0, 0].item() == pytest.approx(0.5, abs=1e-6)


def test_t3_dw_is_clamped():
    # dw = 10 is clamped to ln(1000/16): width 10·62.5 = 625 around centre 5.
    decoded = DeltaXYWHCoder().decode(PRIOR, torch.tensor([[0.0, 0.0, 10.0, 0.0]]))
    torch.testing.assert_close(decoded, torch.tensor([[-307.5, 0.0, 317.5, 10.0]]), atol=1e-4, rtol=0)
    shrunk = DeltaXYWHCoder().decode(PRIOR, torch.tensor([[0.0, 0.0, 0.0, -10.0]]))
    torch.testing.assert_close(shrunk, torch.tensor([[0.0, 4.92, 10.0, 5.08]]), atol=1e-5, rtol=0)


def test_t3_max_shape_clamps_x_to_width_and_y_to_height():
    # 5 · 0.1 = 0.5 → centre x 10, box [5, 0, 15, 10]; clamped to (H, W) = (8, 12) → [5, 0, 12, 8].
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.1, 0.1))
    decoded = coder.decode(PRIOR, torch.tensor([[5.0, 0.0, 0.0, 0.0]]), max_shape=(8, 12))
    torch.testing.assert_close(decoded, torch.tensor([[5.0, 0.0, 12.0, 8.0]]), atol=1e-5, rtol=0)
    negative = coder.decode(PRIOR, torch.tensor([[-5.0, -5.0, 0.0, 0.0]]), max_shape=(8, 12))
    torch.testing.assert_close(negative, torch.tensor([[0.0, 0.0, 5.0, 5.0]]), atol=1e-5, rtol=0)


def test_t3_encode_with_rcnn_stds():
    # Centres (5, 5) → (10, 2.5), sizes 10×10 → 20×5: d = (0.5, −0.25, ln 2, −ln 2) / (0.1, 0.1, 0.2, 0.2).
    deltas = DeltaXYWHCoder(stds=RCNN_STDS).encode(PRIOR, torch.tensor([[0.0, 0.0, 20.0, 5.0]]))
    torch.testing.assert_close(deltas, torch.tensor([[5.0, -2.5, 3.465736, -3.465736]]), atol=1e-5, rtol=0)


# ---- invariants and parity ------------------------------------------------------------------------

@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), RCNN_STDS])
def test_encode_decode_round_trip(stds):
    generator = torch.Generator().manual_seed(0)
    priors, gts = random_boxes(200, generator).double(), random_boxes(200, generator).double()
    coder = DeltaXYWHCoder(means=(0.1, -0.1, 0.0, 0.05), stds=stds)
    deltas = coder.encode(priors, gts)
    assert deltas.dtype == torch.float64
    torch.testing.assert_close(coder.decode(priors, deltas), gts, atol=1e-9, rtol=0)


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), RCNN_STDS])
def test_parity_with_torchvision_box_coder(stds):
    generator = torch.Generator().manual_seed(1)
    priors, gts = random_boxes(300, generator), random_boxes(300, generator)
    ours = DeltaXYWHCoder(stds=stds)
    theirs = BoxCoder(weights=tuple(1 / s for s in stds))
    torch.testing.assert_close(ours.encode(priors, gts), theirs.encode_single(gts, priors), atol=1e-5, rtol=1e-5)
    # torchvision clamps dw, dh only from above; keep them above −ln(1000/16) so both coders agree, and
    # make some exceed +ln(1000/16) so the common upper clamp is exercised.
    deltas = torch.randn(300, 4, generator=generator) * 3 / torch.tensor(stds)
    deltas[:, 2:] = deltas[:, 2:].clamp(min=-4.0 / stds[2])
    assert (deltas[:, 2:] * stds[2] > math.log(1000 / 16)).any()
    torch.testing.assert_close(ours.decode(priors, deltas), theirs.decode_single(deltas, priors),
                               atol=1e-3, rtol=1e-5)


def test_half_precision_inputs_give_float32():
    priors = PRIOR.half()
    decoded = DeltaXYWHCoder().decode(priors, torch.tensor([[0.1, 0.0, 0.0, 0.0]], dtype=torch.half))
    assert decoded.dtype == torch.float32
    assert DeltaXYWHCoder().encode(priors, priors).dtype == torch.float32


def test_class_specific_and_broadcast_decoding():
    generator = torch.Generator().manual_seed(2)
    priors = random_boxes(5, generator)
    deltas = torch.randn(5, 3 * 4, generator=generator)
    coder = DeltaXYWHCoder(stds=RCNN_STDS)
    decoded = coder.decode(priors, deltas, max_shape=(60, 80))
    assert decoded.shape == (5, 12)
    for k in range(3):
        expected = coder.decode(priors, deltas[:, 4 * k:4 * k + 4], max_shape=(60, 80))
        torch.testing.assert_close(decoded[:, 4 * k:4 * k + 4], expected)
    batched = coder.decode(priors, deltas[None, :, :4].expand(2, 5, 4))
    torch.testing.assert_close(batched[1], coder.decode(priors, deltas[:, :4]))


def test_box_iou_matches_torchvision_and_iof_by_hand():
    generator = torch.Generator().manual_seed(3)
    a, b = random_boxes(40, generator), random_boxes(30, generator)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b))
    # Prior [0, 0, 10, 10] against crowd [5, 0, 100, 100]: intersection 50, prior area 100 → IoF 0.5;
    # union 100 + 9500 − 50 = 9550.
    crowd = torch.tensor([[5.0, 0.0, 100.0, 100.0]])
    assert box_iou(PRIOR, crowd, mode="iof").item() == pytest.approx(0.5)
    assert box_iou(PRIOR, crowd).item() == pytest.approx(50 / 9550)
    # Degenerate boxes give 0, not NaN.
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    assert box_iou(point, point).item() == 0.0
    with pytest.raises(ValueError, match="mode"):
        box_iou(PRIOR, PRIOR, mode="giou")


def test_clip_boxes():
    boxes = torch.tensor([[-3.0, -2.0, 50.0, 40.0]])
    torch.testing.assert_close(clip_boxes(boxes, (30, 20)), torch.tensor([[0.0, 0.0, 20.0, 30.0]]))
