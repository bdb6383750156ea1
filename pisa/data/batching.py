"""Batching: padded collate, aspect-grouped and DDP-sharded batch samplers, worker seeding.

Training order is a pure function of ``(seed, epoch)``: every rank computes the same global list of
batches and takes its share, so a resumed run that calls ``set_epoch(epoch, start_iter)`` sees the
batches it had not yet seen, in the same order. Each sample also gets a seed from that list, passed
to the dataset as ``dataset[(index, sample_seed)]``, so its random flip/scale does not depend on which
worker loads it.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pisa.data.errors import DatasetConfigError

_SEED_HIGH = 2**63 - 1


def pad_images(images: Sequence[torch.Tensor], pad_divisor: int = 32) -> torch.Tensor:
    """Stack ``[3, h_i, w_i]`` images into ``[B, 3, H, W]``, zero-padded at the bottom/right.

    ``H``, ``W`` are the largest ``h_i``, ``w_i`` rounded up to a multiple of ``pad_divisor``.
    """
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    height = -(-height // pad_divisor) * pad_divisor
    width = -(-width // pad_divisor) * pad_divisor
    batch = _empty_batch(images[0], (len(images), images[0].shape[0], height, width))
    for slot, img in zip(batch, images):
        h, w = img.shape[-2:]
        slot[:, :h, :w].copy_(img)
        slot[:, h:, :].zero_()
        slot[:, :h, w:].zero_()
    return batch


def _empty_batch(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised tensor of ``shape``; in a DataLoader worker it lives in shared memory.

    A worker's batch must reach the main process through shared memory; allocating it there directly
    (as torch's default_collate does) saves a copy of the whole padded batch.
    """
    if get_worker_info() is None or not hasattr(like, "_typed_storage"):
        return like.new_empty(shape)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).view(shape)


def collate(batch: Sequence[tuple[torch.Tensor, dict]], pad_divisor: int = 32
            ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``(images [B, 3, H, W] padded, [target, ...])``."""
    images, targets = zip(*batch)
    return pad_images(images, pad_divisor), list(targets)


class Collate:
    """Picklable :func:`collate` with a fixed ``pad_divisor`` (for DataLoader workers)."""

    def __init__(self, pad_divisor: int = 32) -> None:
        if pad_divisor < 1:
            raise DatasetConfigError(f"pad_divisor={pad_divisor} must be a positive integer")
        self.pad_divisor = int(pad_divisor)

    def __call__(self, batch):
        return collate(batch, self.pad_divisor)


class GroupedBatchSampler(Sampler[list]):
    """Training batches: shuffled per epoch, one aspect group per batch, sharded over ranks.

    Per epoch, with a generator seeded by ``(seed, epoch)``: each group's indices are shuffled and
    repeated cyclically up to a multiple of ``batch_size * world_size``, cut into batches, and the
    batches of all groups shuffled together; rank ``r`` takes batches ``r, r + W, r + 2W, ...``, so
    every rank has the same number of batches (the reference's distributed group sampler).

    Args:
        group_ids: int ``[N]``, e.g. 1 where width >= height else 0; all zeros for no grouping.
        batch_size: images per batch on one rank.
        seed, rank, world_size: as in the trainer.
        with_sample_seeds: yield ``(index, sample_seed)`` pairs instead of bare indices.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, with_sample_seeds: bool = True) -> None:
        _check_shard(rank, world_size, batch_size)
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        if len(self.group_ids) == 0:
            raise DatasetConfigError("cannot sample batches from an empty dataset")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.with_sample_seeds = with_sample_seeds
        self.epoch, self.start_iter = 0, 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Select the epoch's order; skip this rank's first ``start_iter`` batches (resume)."""
        if not 0 <= start_iter <= self.batches_per_epoch:
            raise DatasetConfigError(f"start_iter={start_iter} is outside an epoch of "
                                     f"{self.batches_per_epoch} batches")
        self.epoch, self.start_iter = int(epoch), int(start_iter)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same every epoch)."""
        chunk = self.batch_size * self.world_size
        sizes = np.bincount(self.group_ids - self.group_ids.min())
        return int(sum(-(-n // chunk) for n in sizes if n > 0))

    def epoch_batches(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's index batches ``[batches_per_epoch, B]`` and per-index seeds ``[N]``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        chunk = self.batch_size * self.world_size
        per_group = []
        for group in np.unique(self.group_ids):
            members = rng.permutation(np.flatnonzero(self.group_ids == group))
            padded = np.resize(members, -(-len(members) // chunk) * chunk)
            per_group.append(padded.reshape(-1, self.batch_size))
        batches = np.concatenate(per_group)
        batches = batches[rng.permutation(len(batches))]
        sample_seeds = rng.integers(0, _SEED_HIGH, size=len(self.group_ids))
        return batches[self.rank::self.world_size], sample_seeds

    def __iter__(self) -> Iterator[list]:
        batches, sample_seeds = self.epoch_batches()
        for batch in batches[self.start_iter:]:
            if self.with_sample_seeds:
                yield [(int(i), int(sample_seeds[i])) for i in batch]
            else:
                yield batch.tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_iter


class InferenceBatchSampler(Sampler[list]):
    """Evaluation batches: rank ``r`` takes indices ``r, r + W, ...`` in order, without padding.

    Every index is seen exactly once over all ranks, so results gathered on rank 0 need no
    de-duplication; ranks may differ by one batch.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_shard(rank, world_size, batch_size)
        self.indices = np.arange(rank, num_samples, world_size)
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Evaluation order never changes; present so loaders share one interface."""

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def _check_shard(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetConfigError(f"rank={rank} must lie in [0, world_size={world_size})")
    if batch_size < 1:
        raise DatasetConfigError(f"batch_size={batch_size} must be a positive integer")


class WorkerSeeder:
    """``worker_init_fn`` seeding ``random``, numpy and torch from ``(seed, rank, worker_id)``."""

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, worker_id: int) -> None:
        state = np.random.SeedSequence([self.seed, self.rank, worker_id]).generate_state(2, np.uint64)
        value = int(state[0]) & _SEED_HIGH
        random.seed(value)
        np.random.seed(int(state[1]) % 2**32)
        torch.manual_seed(value)


def build_dataloader(dataset: Dataset, *, batch_size: int, workers: int, train: bool, seed: int,
                     rank: int = 0, world_size: int = 1, aspect_grouping: bool = True,
                     pad_divisor: int = 32, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding ``(images [B, 3, H, W], list[target])``.

    Training uses :class:`GroupedBatchSampler` (call ``loader.batch_sampler.set_epoch(epoch,
    start_iter)`` before each epoch; workers persist between epochs); evaluation uses
    :class:`InferenceBatchSampler`. Aspect grouping needs ``dataset.aspect_ratio_flags()``.
    """
    if train:
        groups = np.zeros(len(dataset), dtype=np.int64)
        if aspect_grouping and hasattr(dataset, "aspect_ratio_flags"):
            groups = dataset.aspect_ratio_flags()
        batch_sampler: Sampler = GroupedBatchSampler(
            groups, batch_size, seed=seed, rank=rank, world_size=world_size,
            with_sample_seeds=getattr(dataset, "supports_sample_seeds", False))
    else:
        batch_sampler = InferenceBatchSampler(len(dataset), batch_size, rank=rank,
                                              world_size=world_size)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      collate_fn=Collate(pad_divisor), worker_init_fn=WorkerSeeder(seed, rank),
                      persistent_workers=train and workers > 0, pin_memory=pin_memory)
