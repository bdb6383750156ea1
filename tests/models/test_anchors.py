import math

import pytest
import torch

from pisa.models.anchors import AnchorGenerator, SSDAnchorGenerator, ssd_anchor_sizes


def retinanet_generator() -> AnchorGenerator:
    return AnchorGenerator([8, 16, 32, 64, 128], [0.5, 1.0, 2.0], octave_base_scale=4, scales_per_octave=3)


def test_retinanet_first_location_of_level0():
    # Base 8, scales 4·2^(i/3) = 4, 5.0397, 6.3496; ratio r = h/w: w = 8·σ/√r, h = 8·σ·√r, centre (0, 0).
    # r = 0.5: w = 32·√2 = 45.255 (half 22.627), h = 32/√2 (half 11.314); next scales × 2^(1/3), 2^(2/3).
    # r = 1: half-sides 16, 20.159, 25.398. r = 2: the r = 0.5 anchors with x and y swapped.
    expected = torch.tensor([
        [-22.627417, -11.313708, 22.627417, 11.313708],
        [-28.508758, -14.254379, 28.508758, 14.254379],
        [-35.918785, -17.959393, 35.918785, 17.959393],
        [-16.0, -16.0, 16.0, 16.0],
        [-20.158737, -20.158737, 20.158737, 20.158737],
        [-25.398417, -25.398417, 25.398417, 25.398417],
        [-11.313708, -22.627417, 11.313708, 22.627417],
        [-14.254379, -28.508758, 14.254379, 28.508758],
        [-17.959393, -35.918785, 17.959393, 35.918785],
    ])
    generator = retinanet_generator()
    assert generator.num_anchors == 9
    level0 = generator.grid_anchors([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])[0]
    assert level0.shape == (2 * 3 * 9, 4)
    torch.testing.assert_close(level0[:9], expected, atol=1e-5, rtol=0)
    # The next location (w = 1) is the same set moved by one stride in x; the next row by one stride in y.
    torch.testing.assert_close(level0[9:18], expected + torch.tensor([8.0, 0, 8, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(level0[27:36], expected + torch.tensor([0, 8.0, 0, 8]), atol=1e-5, rtol=0)


def test_rpn_p2_first_location():
    # Base 4, scale 8 → 32-pixel anchors for ratios 0.5, 1, 2.
    generator = AnchorGenerator([4, 8, 16, 32, 64], [0.5, 1.0, 2.0], scales=[8])
    expected = torch.tensor([
        [-22.627417, -11.313708, 22.627417, 11.313708],
        [-16.0, -16.0, 16.0, 16.0],
        [-11.313708, -22.627417, 11.313708, 22.627417],
    ])
    torch.testing.assert_close(generator.base_anchors()[0], expected, atol=1e-5, rtol=0)
    assert generator.num_anchors == 3


def test_grid_order_and_centres():
    # Index (h·W + w)·A + a, centre (w·stride + offset·stride, h·stride + offset·stride).
    generator = AnchorGenerator([16], [0.5, 1.0], scales=[1.0, 2.0], center_offset=0.5)
    height, width, count = 3, 5, generator.num_anchors
    grid = generator.grid_anchors([(height, width)])[0].view(height, width, count, 4)
    centres = (grid[..., :2] + grid[..., 2:]) / 2
    expected_x = (torch.arange(width) * 16 + 8.0)[None, :, None].expand(height, width, count)
    expected_y = (torch.arange(height) * 16 + 8.0)[:, None, None].expand(height, width, count)
    torch.testing.assert_close(centres[..., 0], expected_x)
    torch.testing.assert_close(centres[..., 1], expected_y)
    # Anchor a = ratio_idx·n_scales + scale_idx: a = 1 is (r = 0.5, σ = 2), w = 16·2·√2, h = 16·2/√2.
    sizes = grid[0, 0, :, 2:] - grid[0, 0, :, :2]
    torch.testing.assert_close(sizes[1], torch.tensor([32 * math.sqrt(2), 32 / math.sqrt(2)]))


def test_base_anchors_match_float64_formula_and_base_sizes():
    generator = AnchorGenerator([8, 16], [0.5, 2.0], scales=[3.0], base_sizes=[10, 20])
    for base_size, base in zip([10, 20], generator.base_anchors()):
        half_w = [0.5 * base_size * 3 / math.sqrt(r) for r in (0.5, 2.0)]
        half_h = [0.5 * base_size * 3 * math.sqrt(r) for r in (0.5, 2.0)]
        expected = torch.tensor([[-w, -h, w, h] for w, h in zip(half_w, half_h)], dtype=torch.float32)
        torch.testing.assert_close(base, expected)


def test_anchors_concatenate_levels_and_respect_dtype():
    generator = retinanet_generator()
    sizes = [(4, 6), (2, 3), (1, 2), (1, 1), (1, 1)]
    flat = generator.anchors(sizes, dtype=torch.float64)
    assert flat.dtype == torch.float64
    assert flat.shape == (9 * (24 + 6 + 2 + 1 + 1), 4)
    levels = generator.grid_anchors(sizes, dtype=torch.float64)
    torch.testing.assert_close(flat, torch.cat(levels))
    # Cached: the same tensors come back for the same key, fresh ones for another dtype.
    assert generator.grid_anchors(sizes, dtype=torch.float64)[0] is levels[0]
    assert generator.grid_anchors(sizes)[0].dtype == torch.float32


def test_valid_flags_follow_the_image_extent():
    # Stride 8, feature map 4×5 (a 32×40 batch tensor), image padded on its own to (h, w) = (20, 30):
    # valid rows y < ceil(20/8) = 3, valid columns x < ceil(30/8) = 4.
    generator = AnchorGenerator([8], [1.0, 2.0], scales=[1.0])
    flags = generator.valid_flags([(4, 5)], (20, 30))[0]
    assert flags.dtype == torch.bool and flags.shape == (4 * 5 * 2,)
    per_location = flags.view(4, 5, 2)
    assert torch.equal(per_location[..., 0], per_location[..., 1])
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(per_location[..., 0], expected)
    # A valid extent beyond the feature map is capped at it.
    assert generator.valid_flags([(4, 5)], (100, 100))[0].all()


def test_ssd300_anchors():
    min_sizes, max_sizes = ssd_anchor_sizes(300, (0.15, 0.9), 6)
    assert min_sizes == [21, 45, 99, 153, 207, 261]
    assert max_sizes == [45, 99, 153, 207, 261, 315]
    generator = SSDAnchorGenerator([8, 16, 32, 64, 100, 300], [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                   min_sizes, max_sizes)
    assert generator.num_anchors_per_level == [4, 6, 6, 6, 4, 4]
    levels = generator.grid_anchors([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])
    assert sum(level.shape[0] for level in levels) == 8732
    # Level 0 centre (4, 4): min 21; √(21·45) = 30.741; r = 1/2: w = 21·√2 = 29.698, h = 21/√2 = 14.849.
    expected_first = torch.tensor([
        [-6.5, -6.5, 14.5, 14.5],
        [-11.370, -11.370, 19.370, 19.370],
        [-10.849, -3.425, 18.849, 11.425],
        [-3.425, -10.849, 11.425, 18.849],
    ])
    torch.testing.assert_close(levels[0][:4], expected_first, atol=1e-3, rtol=0)
    # Last level centre (150, 150): min 261, √(261·315) = 286.73.
    expected_last = torch.tensor([[19.5, 19.5, 280.5, 280.5], [6.634, 6.634, 293.366, 293.366]])
    torch.testing.assert_close(levels[-1][:2], expected_last, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        generator.num_anchors


def test_ssd512_anchors():
    min_sizes, max_sizes = ssd_anchor_sizes(512, (0.1, 0.9), 7)
    assert min_sizes == [20, 51, 133, 215, 296, 378, 460]
    assert max_sizes == [51, 133, 215, 296, 378, 460, 542]
    generator = SSDAnchorGenerator([8, 16, 32, 64, 128, 256, 512], [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
                                   min_sizes, max_sizes)
    sizes = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert generator.anchors(sizes).shape[0] == 24564
    expected = torch.tensor([[-6.0, -6.0, 14.0, 14.0], [-11.969, -11.969, 19.969, 19.969],
                             [-10.142, -3.071, 18.142, 11.071]])
    torch.testing.assert_close(generator.grid_anchors(sizes)[0][:3], expected, atol=1e-3, rtol=0)


def test_batch_valid_flags_stack_each_images_flags_and_are_cached():
    generator = retinanet_generator()
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]  # a 64 x 80 batch tensor
    shapes = [(64, 80), (32, 64), (64, 80)]
    flags = generator.batch_valid_flags(sizes, shapes)
    assert flags.dtype == torch.bool and flags.shape == (3, 9 * (80 + 20 + 6 + 2 + 1))
    for row, shape in zip(flags, shapes):
        assert torch.equal(row, torch.cat(generator.valid_flags(sizes, shape)))
    # Level 0 of the (32, 64) image: rows y < ceil(32/8) = 4 of 8, columns x < ceil(64/8) = 8 of 10.
    level0 = flags[1, : 8 * 10 * 9].view(8, 10, 9)[..., 0]
    assert level0.sum() == 4 * 8 and level0[:4, :8].all()
    # One computation per distinct shape, shared by later calls; empty batches keep the anchor count.
    again = generator.batch_valid_flags(sizes, [(32, 64)])
    assert len(generator._valid_cache) == 2 and torch.equal(again[0], flags[1])
    assert generator.batch_valid_flags(sizes, []).shape == (0, flags.shape[1])


def test_configuration_errors_are_reported():
    with pytest.raises(ValueError, match="either scales"):
        AnchorGenerator([8], [1.0], scales=[1.0], octave_base_scale=4, scales_per_octave=3)
    with pytest.raises(ValueError, match="give scales"):
        AnchorGenerator([8], [1.0], octave_base_scale=4)
    with pytest.raises(ValueError, match="base_sizes"):
        AnchorGenerator([8, 16], [1.0], scales=[1.0], base_sizes=[8])
    with pytest.raises(ValueError, match="2 levels"):
        AnchorGenerator([8, 16], [1.0], scales=[1.0]).grid_anchors([(2, 2)])
