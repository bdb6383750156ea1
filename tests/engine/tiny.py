"""A tiny detector, data set, loader and evaluator for the engine tests, and the script that the
multi-process tests launch.

The tiny detector pools a 3x3 conv over the image and regresses one box and one class per image.
Both losses are means over the batch and there is no BatchNorm, so DDP's gradient averaging over
two halves of a batch equals one process on the whole batch.

Script use (the same flags as ``python -m pisa.train``, plus the tiny knobs):
    python tests/engine/tiny.py CONFIG [--set k=v ...] [--resume [PATH]] ... \
        [--hang-at N --hang-marker FILE] [--nonfinite-at N ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pisa import config as pisa_config
from pisa.engine import dist

IMAGE_SIZE = 16
NUM_CLASSES = 2


# ----------------------------------------------------------------------------------------------
# data


class TinyDetectionSet(Dataset):
    """``num_images`` 16x16 noise images, one box each; image ids start at ``first_id``.

    ``flip_prob`` > 0 flips with the *global* torch RNG, so exact resume depends on the trainer
    restoring RNG states.
    """

    def __init__(self, num_images: int, first_id: int = 100, flip_prob: float = 0.0) -> None:
        self.num_images, self.first_id, self.flip_prob = num_images, first_id, flip_prob
        self.class_names = [f"class{i}" for i in range(NUM_CLASSES)]
        self.label_to_cat_id = [1, 3]

    def __len__(self) -> int:
        return self.num_images

    def box(self, i: int) -> torch.Tensor:
        """Image ``i``'s box, xyxy pixels, before flipping."""
        x1, y1 = (3 * i) % 7, (5 * i) % 7
        return torch.tensor([x1, y1, x1 + 6 + i % 3, y1 + 5 + i % 4], dtype=torch.float32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(i))
        box = self.box(i)
        flip = self.flip_prob > 0 and bool(torch.rand(()) < self.flip_prob)
        if flip:
            image = image.flip(-1)
            box = torch.stack([IMAGE_SIZE - box[2], box[1], IMAGE_SIZE - box[0], box[3]])
        target = {"boxes": box[None], "labels": torch.tensor([i % NUM_CLASSES]), "ignore_boxes": torch.zeros(0, 4),
                  "image_id": self.first_id + i, "img_shape": (IMAGE_SIZE, IMAGE_SIZE),
                  "ori_shape": (IMAGE_SIZE, IMAGE_SIZE), "scale_factor": (1.0, 1.0), "flip": flip}
        return image, target

    def summary(self) -> str:
        return f"tiny set: {self.num_images} images, {NUM_CLASSES} classes"


class TinyBatchSampler:
    """Shuffled by ``(seed, epoch)``; global batches of ``batch_size * world_size`` cut into one
    contiguous slice per rank, so N ranks see together what one process with the total batch sees.
    Same resume interface as :class:`pisa.data.batching.GroupedBatchSampler`."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.start_iter = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch, self.start_iter = epoch, start_iter

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        total = self.batch_size * self.world_size
        for b in range(self.start_iter, self.batches_per_epoch):
            start = b * total + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_iter


class TinyEvalSampler:
    """Rank ``r`` takes images ``r, r + W, ...``: every image exactly once over all ranks."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def collate(batch):
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def tiny_loader(dataset: TinyDetectionSet, batch_size: int, train: bool, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    sampler = (TinyBatchSampler(len(dataset), batch_size, seed, rank, world_size) if train
               else TinyEvalSampler(len(dataset), batch_size, rank, world_size))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate)


# ----------------------------------------------------------------------------------------------
# model and evaluator


class TinyDetector(nn.Module):
    """Conv 3x3 -> ReLU -> global mean -> linear to (4 box values, K logits).

    Train mode: ``{"loss_cls": CE mean, "loss_bbox": L1 mean on boxes / IMAGE_SIZE, "acc": accuracy}``.
    ``nonfinite_at``: train-mode call numbers (1-based) at which ``nonfinite_term`` becomes NaN.
    ``hang_at``: call number at which to touch ``hang_marker`` and sleep (to be killed there).
    """

    def __init__(self, nonfinite_at: Sequence[int] = (), nonfinite_term: str = "loss_bbox",
                 hang_at: int | None = None, hang_marker: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4 + NUM_CLASSES)
        self.nonfinite_at, self.nonfinite_term = set(nonfinite_at), nonfinite_term
        self.hang_at, self.hang_marker = hang_at, hang_marker
        self.train_calls = 0

    def forward(self, images: torch.Tensor, targets: list[dict]):
        out = self.fc(F.relu(self.conv(images)).mean((2, 3))).float()
        boxes, logits = out[:, :4].sigmoid() * IMAGE_SIZE, out[:, 4:]
        if not self.training:
            scores, labels = logits.softmax(-1).max(-1)
            return [{"boxes": boxes[i:i + 1], "scores": scores[i:i + 1], "labels": labels[i:i + 1]}
                    for i in range(len(images))]
        self.train_calls += 1
        if self.train_calls == self.hang_at:
            Path(self.hang_marker).touch()
            time.sleep(600)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(out.device)
        gt_labels = torch.cat([t["labels"] for t in targets]).to(out.device)
        losses = {"loss_cls": F.cross_entropy(logits, gt_labels),
                  "loss_bbox": F.l1_loss(boxes / IMAGE_SIZE, gt_boxes / IMAGE_SIZE),
                  "acc": (logits.argmax(-1) == gt_labels).float().mean()}
        if self.train_calls in self.nonfinite_at:
            losses[self.nonfinite_term] = losses[self.nonfinite_term] * float("nan")
        return losses


class RecordingEvaluator:
    """Keeps every (image id, box) it is given, duplicates included, and scores
    ``bbox_AP = 1 - mean |box - gt| / IMAGE_SIZE`` over the gathered detections."""

    def __init__(self, dataset: TinyDetectionSet) -> None:
        self.dataset = dataset
        self.reset()

    def reset(self) -> None:
        self.records: list[tuple[int, list[float]]] = []

    def add(self, image_ids, detections) -> None:
        self.records += [(i, d["boxes"][0].tolist()) for i, d in zip(image_ids, detections)]

    def gather(self) -> None:
        self.records = [r for part in dist.all_gather_object(self.records) for r in part]

    def evaluate(self, out_dir=None) -> dict[str, Any]:
        errors = [np.abs(np.array(box) - self.dataset.box(i - self.dataset.first_id).numpy()).mean()
                  for i, box in self.records]
        return {"bbox_AP": float(1.0 - np.mean(errors) / IMAGE_SIZE), "image_ids": [i for i, _ in self.records]}

    @staticmethod
    def format_summary(metrics: dict[str, Any]) -> str:
        return f"bbox_AP {metrics['bbox_AP']:.4f}"


class Unpicklable:
    """A custom class: a checkpoint holding it needs full unpickling."""

    def __init__(self, value: int = 1) -> None:
        self.value = value


# ----------------------------------------------------------------------------------------------
# configs and runs


BASE_CONFIG = {
    "model": {"type": "retinanet", "num_classes": NUM_CLASSES, "backbone": {"pretrained": None}},
    "data": {"train": {"type": "synthetic"}, "val": {"type": "synthetic", "split": "val"},
             "batch_size": 2, "workers": 0},
    "optim": {"lr": 0.02, "ref_batch": 2},
    "schedule": {"epochs": 3, "steps": [2], "warmup_iters": 3, "warmup_ratio": 0.1},
    "train": {"work_dir": "unset", "log_interval": 1},
}


def tiny_config(work_dir: str | Path, **sections: dict) -> dict:
    """:data:`BASE_CONFIG` with ``sections`` merged in (e.g. ``train={"seed": 3}``), validated."""
    cfg = pisa_config.merge(BASE_CONFIG, {"train": {"work_dir": str(work_dir)}})
    cfg = pisa_config.merge(cfg, sections)
    return pisa_config.validate(cfg, check_paths=False)


def write_config(path: str | Path, cfg: dict) -> str:
    Path(path).write_text(pisa_config.dump(cfg))
    return str(path)


def tiny_parts(cfg: dict, info: dist.DistInfo, *, train_images: int = 12, val_images: int = 5,
               flip_prob: float = 0.5, **model_kwargs):
    """``pisa.train.build_parts`` for the tiny model and data."""
    from pisa.train import RunParts

    train_set = TinyDetectionSet(train_images, flip_prob=flip_prob)
    val_set = TinyDetectionSet(val_images, first_id=500)
    bs, seed = cfg["data"]["batch_size"], cfg["train"]["seed"]
    return RunParts(TinyDetector(**model_kwargs),
                    tiny_loader(train_set, bs, True, seed, info.rank, info.world_size),
                    tiny_loader(val_set, 1, False, seed, info.rank, info.world_size),
                    RecordingEvaluator(val_set), {"class_names": train_set.class_names})


def _parse_tiny_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--hang-marker")
    parser.add_argument("--nonfinite-at", type=int, action="append", default=[])
    parser.add_argument("--train-images", type=int, default=12)
    parser.add_argument("--val-images", type=int, default=5)
    parser.add_argument("--flip-prob", type=float, default=0.5)
    parser.add_argument("--result")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``pisa.train.main`` with the tiny parts, single-threaded (thread count changes float sums)."""
    from pisa.train import main as train_main

    tiny, rest = _parse_tiny_args(argv)
    build = functools.partial(tiny_parts, train_images=tiny.train_images, val_images=tiny.val_images,
                              flip_prob=tiny.flip_prob, nonfinite_at=tiny.nonfinite_at,
                              hang_at=tiny.hang_at, hang_marker=tiny.hang_marker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_main(rest, build=build)
    finally:
        torch.set_num_threads(threads)
    if tiny.result:
        Path(tiny.result).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
