"""Batching: padded collate, sharding, aspect grouping, resume, worker seeding, loaders."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from pisa.data import (CocoDataset, Collate, DatasetConfigError, GroupedBatchSampler,
                       InferenceBatchSampler, WorkerSeeder, build_dataloader, build_transforms,
                       collate)


def test_collate_pads_bottom_right_to_the_divisor():
    a = torch.ones(3, 30, 38)
    b = torch.full((3, 20, 50), 2.0)
    images, targets = collate([(a, {"image_id": 1}), (b, {"image_id": 2})], pad_divisor=32)
    # H = max(30, 20) = 30 -> 32; W = max(38, 50) = 50 -> 64
    assert images.shape == (2, 3, 32, 64) and images.dtype == torch.float32
    assert [t["image_id"] for t in targets] == [1, 2]
    assert torch.equal(images[0, :, :30, :38], a) and images[0, :, 30:].abs().sum() == 0
    assert images[0, :, :, 38:].abs().sum() == 0
    assert torch.equal(images[1, :, :20, :50], b) and images[1, :, 20:].abs().sum() == 0
    # already a multiple: no padding; divisor 1 keeps sizes
    assert collate([(torch.ones(3, 32, 64), {})])[0].shape == (1, 3, 32, 64)
    assert Collate(1)([(a, {})])[0].shape == (1, 3, 30, 38)
    with pytest.raises(DatasetConfigError):
        Collate(0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_samples", [0, 1, 2, 7, 10])
def test_eval_sharding_covers_every_index_once(num_samples, world_size):
    seen = []
    for rank in range(world_size):
        sampler = InferenceBatchSampler(num_samples, 2, rank=rank, world_size=world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen += [i for batch in batches for i in batch]
    assert sorted(seen) == list(range(num_samples))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_sharding_equal_batches_and_full_coverage(world_size):
    groups = np.array([0] * 7 + [1] * 4)
    per_rank = []
    for rank in range(world_size):
        sampler = GroupedBatchSampler(groups, 2, seed=1, rank=rank, world_size=world_size,
                                      with_sample_seeds=False)
        per_rank.append(list(sampler))
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1  # every rank runs the same number of iterations
    # groups of 7 and 4 are padded to multiples of B * W images, then cut into batches of B = 2:
    # W=1: 8 + 4 = 12 images = 6 batches; W=2: 8 + 4 -> 6 batches / 2 ranks = 3;
    # W=3: 12 + 6 -> 9 batches / 3 ranks = 3
    assert len(per_rank[0]) == {1: 6, 2: 3, 3: 3}[world_size]
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(len(groups)))


def test_aspect_grouping_keeps_each_batch_in_one_group():
    groups = np.array([0, 1] * 10 + [1] * 5)
    sampler = GroupedBatchSampler(groups, 4, seed=0, with_sample_seeds=False)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len(set(groups[batch])) == 1 and len(batch) == 4


def test_order_is_deterministic_per_epoch_and_changes_across_epochs():
    groups = np.zeros(20, dtype=np.int64)
    a = GroupedBatchSampler(groups, 2, seed=3, with_sample_seeds=False)
    b = GroupedBatchSampler(groups, 2, seed=3, with_sample_seeds=False)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)
    c = GroupedBatchSampler(groups, 2, seed=4, with_sample_seeds=False)
    c.set_epoch(5)
    assert list(a) != list(c)


def test_resume_mid_epoch_gives_the_remaining_order():
    groups = np.array([0, 1, 1, 0, 0] * 5)
    full = GroupedBatchSampler(groups, 2, seed=7, rank=1, world_size=2)
    full.set_epoch(2)
    batches = list(full)
    resumed = GroupedBatchSampler(groups, 2, seed=7, rank=1, world_size=2)
    resumed.set_epoch(2, start_iter=3)
    assert len(resumed) == len(batches) - 3
    assert list(resumed) == batches[3:]   # same indices and same per-sample seeds
    resumed.set_epoch(3)                  # the next epoch starts from its beginning again
    assert len(resumed) == len(batches)
    with pytest.raises(DatasetConfigError, match="start_iter"):
        resumed.set_epoch(3, start_iter=len(batches) + 1)


def test_sample_seeds_are_pairs():
    sampler = GroupedBatchSampler(np.zeros(4, dtype=np.int64), 2, seed=0)
    batch = next(iter(sampler))
    assert all(isinstance(i, int) and isinstance(s, int) for i, s in batch)


def test_bad_shard_arguments():
    with pytest.raises(DatasetConfigError, match="rank"):
        InferenceBatchSampler(4, 1, rank=2, world_size=2)
    with pytest.raises(DatasetConfigError, match="batch_size"):
        GroupedBatchSampler([0, 1], 0)
    with pytest.raises(DatasetConfigError, match="empty"):
        GroupedBatchSampler([], 1)


def test_worker_seeder_per_seed_rank_worker():
    def draws(seed, rank, worker):
        WorkerSeeder(seed, rank)(worker)
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    assert draws(0, 0, 0) == draws(0, 0, 0)
    assert len({draws(0, 0, 0), draws(0, 0, 1), draws(0, 1, 0), draws(1, 0, 0)}) == 4


def _dataset(files):
    transforms = build_transforms([(40, 32)], 0.5, [0, 0, 0], [1, 1, 1], True, train=True)
    return CocoDataset(*files, transforms)


def _epoch(loader, epoch, start_iter=0):
    loader.batch_sampler.set_epoch(epoch, start_iter)
    return [(images, [(t["image_id"], t["flip"]) for t in targets]) for images, targets in loader]


def test_train_loader_resume_reproduces_images_and_flips(coco_files):
    loader = build_dataloader(_dataset(coco_files), batch_size=1, workers=0, train=True, seed=0,
                              aspect_grouping=False)
    full = _epoch(loader, 1)
    assert len(full) == 3
    assert Counter(i for _, meta in full for i, _ in meta) == Counter({11: 1, 12: 1, 13: 1})
    resumed = _epoch(loader, 1, start_iter=1)
    assert [m for _, m in resumed] == [m for _, m in full[1:]]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, full[1:]))
    flips = {flip for e in range(6) for _, meta in _epoch(loader, e) for _, flip in meta}
    assert flips == {True, False}   # augmentation draws differ across epochs


def test_train_loader_workers_match_main_process(coco_files):
    kwargs = dict(batch_size=2, train=True, seed=0, aspect_grouping=True)
    main = _epoch(build_dataloader(_dataset(coco_files), workers=0, **kwargs), 4)
    worker = _epoch(build_dataloader(_dataset(coco_files), workers=1, **kwargs), 4)
    assert [m for _, m in main] == [m for _, m in worker]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(main, worker))
    for images, _ in main:
        assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0


def test_eval_loader_in_order(coco_files):
    ds = CocoDataset(*coco_files, build_transforms([(40, 32)], 0, [0, 0, 0], [1, 1, 1], True, False))
    loader = build_dataloader(ds, batch_size=2, workers=0, train=False, seed=0)
    ids = [t["image_id"] for _, targets in loader for t in targets]
    assert ids == [11, 12, 13]
    rank1 = build_dataloader(ds, batch_size=2, workers=0, train=False, seed=0, rank=1, world_size=2)
    assert [t["image_id"] for _, ts in rank1 for t in ts] == [12]
