"""Multi-scale RoIAlign: level mapping at the exact scale boundaries, aligned pooling, order, gradients."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from pisa.models.roi_align import MultiScaleRoIAlign, map_roi_levels, ungroup


def _squares(sides):
    return torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides])


def test_level_boundaries_of_sqrt_area():
    # floor(log2(s / 56 + 1e-6)): s = 112, 224, 448 are exactly 2, 4, 8 times 56, so they open levels 1, 2, 3;
    # just below each boundary the log2 stays under the integer (the 1e-6 only rescues exact hits).
    sides = [1.0, 56.0, 111.99, 112.0, 223.99, 224.0, 447.99, 448.0, 895.99, 896.0, 5000.0]
    levels = map_roi_levels(_squares(sides))
    assert levels.dtype == torch.int64
    assert levels.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # >= 896 would be level 4: clamped to P5


def test_level_uses_the_geometric_mean_of_width_and_height():
    # 224 x 56 has sqrt area 112 (level 1); 448 x 28 also 112; 447.9 x 28 is just below (level 0).
    rois = torch.tensor([[0.0, 0.0, 224.0, 56.0], [0.0, 0.0, 448.0, 28.0], [0.0, 0.0, 447.9, 28.0]])
    assert map_roi_levels(rois).tolist() == [1, 1, 0]
    # Fewer levels clamp lower; a larger finest_scale moves every boundary up.
    assert map_roi_levels(_squares([448.0]), num_levels=2).tolist() == [1]
    assert map_roi_levels(_squares([112.0]), finest_scale=112.0).tolist() == [0]
    assert map_roi_levels(_squares([224.0]), finest_scale=112.0).tolist() == [1]


def test_map_roi_levels_rejects_batch_column():
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        map_roi_levels(torch.zeros(3, 5))


def _level_features(batch=2, channels=3, size=640):
    """P2..P5 for a ``size`` x ``size`` input: level l is constant 10·l + batch index, channel c adds 100·c."""
    feats = []
    for level, stride in enumerate((4, 8, 16, 32)):
        side = size // stride
        base = torch.full((batch, channels, side, side), 10.0 * level)
        base += torch.arange(batch, dtype=torch.float32)[:, None, None, None]
        base += 100.0 * torch.arange(channels, dtype=torch.float32)[None, :, None, None]
        feats.append(base)
    return feats


def test_each_roi_is_pooled_on_its_level_and_image_in_input_order():
    pool = MultiScaleRoIAlign(output_size=7)
    feats = _level_features()
    # Levels 3, 0, 2, 1, 0 (sides 500, 30, 300, 150, 60), images 1, 0, 0, 1, 1: output order = input order.
    boxes = _squares([500.0, 30.0, 300.0, 150.0, 60.0])
    rois = torch.cat([torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]]), boxes], dim=1)
    out = pool(feats, rois)
    assert out.shape == (5, 3, 7, 7)
    # Constant maps pool to their constant wherever the samples fall inside the map (all these do).
    expected = torch.tensor([30.0 + 1, 0.0, 20.0, 10.0 + 1, 0.0 + 1])
    for c in range(3):
        torch.testing.assert_close(out[:, c].mean(dim=(1, 2)), expected + 100.0 * c)


def test_grouped_rows_are_by_level_and_ungroup_restores_input_order():
    pool = MultiScaleRoIAlign(output_size=7)
    feats = _level_features()
    boxes = _squares([500.0, 30.0, 300.0, 150.0, 60.0])  # levels 3, 0, 2, 1, 0
    rois = torch.cat([torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]]), boxes], dim=1)
    grouped, order = pool.forward_grouped(feats, rois)
    # P2 first (RoIs 1 and 4, in input order), then P3 (3), P4 (2), P5 (0).
    assert order.tolist() == [1, 4, 3, 2, 0]
    torch.testing.assert_close(grouped[:, 0].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 11.0, 20.0, 31.0]))
    assert torch.equal(ungroup(grouped, order), pool(feats, rois))
    # A row-wise head can run on the grouped rows: ungrouping its output equals running it in order.
    head = torch.nn.Linear(3 * 49, 2)
    torch.testing.assert_close(ungroup(head(grouped.flatten(1)), order), head(pool(feats, rois).flatten(1)))


def test_grouped_on_one_level_or_no_rois_keeps_the_input_order():
    pool = MultiScaleRoIAlign(output_size=7)
    feats = _level_features()
    rois = torch.cat([torch.tensor([[0.0], [1.0]]), _squares([30.0, 60.0])], dim=1)  # both on P2
    grouped, order = pool.forward_grouped(feats, rois)
    assert order is None and ungroup(grouped, order) is grouped
    torch.testing.assert_close(grouped[:, 0].mean(dim=(1, 2)), torch.tensor([0.0, 1.0]))
    empty, order = pool.forward_grouped(feats, torch.zeros(0, 5))
    assert empty.shape == (0, 3, 7, 7) and order is None


def test_matches_torchvision_roi_align_per_level_with_the_level_stride():
    torch.manual_seed(0)
    pool = MultiScaleRoIAlign(output_size=5, sampling_ratio=0)
    feats = [torch.randn(2, 4, 64 // s, 64 // s) for s in (1, 2, 4, 8)]
    xy = torch.rand(12, 2) * 100
    wh = torch.tensor([20.0, 40, 80, 120, 160, 230, 300, 460, 10, 111.5, 112.5, 700])[:, None].expand(12, 2)
    rois = torch.cat([torch.randint(0, 2, (12, 1)).float(), xy, xy + wh], dim=1)
    out = pool(feats, rois)
    levels = map_roi_levels(rois[:, 1:])
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for i in range(12):
        level = int(levels[i])
        expected = roi_align(feats[level], rois[i:i + 1], 5, spatial_scale=1 / (4 * 2 ** level),
                             sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[i:i + 1], expected)


def test_aligned_sampling_golden_on_a_ramp():
    # Feature value = column index j on a stride-4 map. The RoI x in [8, 36] maps to [2, 9] on the map;
    # aligned=True shifts by -0.5 pixel to [1.5, 8.5], so the 7 bins have centres 2, 3, ..., 8, and bilinear
    # sampling of a linear ramp is exact: column k pools to 2 + k (aligned=False would give 2.5 + k).
    pool = MultiScaleRoIAlign(output_size=7)
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 1, 32, 32).contiguous()
    feats = [ramp] + [torch.zeros(1, 1, 32 // 2 ** k, 32 // 2 ** k) for k in (1, 2, 3)]
    rois = torch.tensor([[0.0, 8.0, 40.0, 36.0, 68.0]])  # 28 x 28: level 0 (P2, stride 4)
    out = pool(feats, rois)
    expected = (2.0 + torch.arange(7, dtype=torch.float32)).expand(7, 7)
    torch.testing.assert_close(out[0, 0], expected)


def test_gradients_reach_only_the_levels_used_and_empty_rois():
    pool = MultiScaleRoIAlign(output_size=2)
    feats = [torch.randn(1, 2, 16 // 2 ** k, 16 // 2 ** k, requires_grad=True) for k in range(4)]
    rois = torch.tensor([[0.0, 0.0, 0.0, 30.0, 30.0], [0.0, 0.0, 0.0, 250.0, 250.0]])  # levels 0 and 2
    pool(feats, rois).sum().backward()
    assert [f.grad is not None and bool(f.grad.abs().sum() > 0) for f in feats] == [True, False, True, False]
    empty = pool(feats, torch.zeros(0, 5))
    assert empty.shape == (0, 2, 2, 2)


def test_extra_p6_is_ignored_and_bad_inputs_are_errors():
    pool = MultiScaleRoIAlign(output_size=2)
    feats = _level_features(batch=1, channels=1)
    rois = torch.tensor([[0.0, 0.0, 0.0, 50.0, 50.0]])
    p6 = torch.full((1, 1, 4, 4), 99.0)
    assert torch.equal(pool(feats + [p6], rois), pool(feats, rois))
    with pytest.raises(ValueError, match="P2..P5"):
        pool(feats[:3], rois)
    with pytest.raises(ValueError, match=r"\(R, 5\)"):
        pool(feats, rois[:, 1:])


@pytest.mark.parametrize("num_images, sampling_ratio, aligned", [(2, 0, True), (3, 2, False), (1, 0, True)])
def test_threaded_cpu_pooling_and_gradient_equal_torchvision(monkeypatch, num_images, sampling_ratio, aligned):
    """pool_rois splits RoIs (forward) and images (backward; RoIs with one image) over 2 threads; the
    pooled values are torchvision's bit for bit, and so are the gradients when split by image."""
    import pisa.models.roi_align as ra

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []
    real_roi_align = ra.roi_align
    monkeypatch.setattr(ra, "roi_align", lambda *a, **k: calls.append(a[1].shape[0]) or real_roi_align(*a, **k))
    try:
        g = torch.Generator().manual_seed(0)
        feat = torch.randn(num_images, 3, 17, 23, generator=g)
        n = 300
        xy = (torch.rand(n, 2, generator=g) * 1.5 - 0.25) * torch.tensor([23.0, 17.0]) * 4
        wh = (torch.rand(n, 2, generator=g) - 0.1) * torch.tensor([23.0, 17.0]) * 2.4  # some empty, some outside
        rois = torch.cat([torch.randint(0, num_images, (n, 1), generator=g).float(), xy, xy + wh], 1)
        ours, ref = feat.clone().requires_grad_(), feat.clone().requires_grad_()
        pooled = ra.pool_rois(ours, rois, 7, 0.25, sampling_ratio, aligned)
        expected = roi_align(ref, rois, 7, 0.25, sampling_ratio, aligned)
        assert calls == [150, 150]  # the forward ran on two halves of the RoIs
        assert torch.equal(pooled, expected)
        upstream = torch.randn(expected.shape, generator=g)
        pooled.backward(upstream)
        expected.backward(upstream)
        if num_images >= 2:
            assert torch.equal(ours.grad, ref.grad)
        else:  # two partial gradients summed
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert torch.equal(ra.pool_rois(feat, rois, 7, 0.25, sampling_ratio, aligned), expected.detach())
    finally:
        torch.set_num_threads(threads)
