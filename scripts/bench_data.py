"""Data-loading throughput and worker memory: pisa's dataset + loader vs torchvision's CocoDetection.

Both sides read the same files and do the same work per image: decode, keep-ratio resize to the
scale, random horizontal flip, float conversion, normalisation, and a collate that pads the batch to
a multiple of 32. Throughput is images per second over one epoch, from the first batch received (so
worker start-up is excluded) to the last, and CPU time (main process plus workers, from /proc) per
image, which a busy machine disturbs less than wall time; worker memory is the resident set (RSS) and proportional
set (PSS, shared pages divided among sharers) of the worker processes, read from /proc at the first
and at the last batch of the epoch.

    python scripts/bench_data.py                      # the demo data (generated on first use)
    python scripts/bench_data.py --ann A.json --img-dir DIR --workers 0 2 4
    python scripts/bench_data.py --replicate 100      # list every image 100x: a COCO-sized index
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from pisa.data import (CocoDataset, build_dataloader, build_transforms, ensure_demo_dataset,
                       pad_images)

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


# --- /proc helpers ------------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the DataLoader workers), from /proc/*/stat."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0]) / 1024
    return values["Rss"], values["Pss"]


def workers_memory() -> tuple[float, float]:
    """Summed (RSS, PSS) over this process's children, MiB."""
    totals = [memory_mib(p) for p in child_pids(os.getpid())]
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (the workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    total = own.user + own.system
    for pid in child_pids(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime
    return total


# --- the two pipelines --------------------------------------------------------------------------


def pisa_loader(ann: str, img_dir: str, scale, batch_size: int, workers: int) -> DataLoader:
    transforms = build_transforms([scale], 0.5, MEAN, STD, True, train=True)
    dataset = CocoDataset(ann, img_dir, transforms)
    return build_dataloader(dataset, batch_size=batch_size, workers=workers, train=True, seed=0)


class PadCollate:
    """torchvision side: pad images to a multiple of 32 (the same padding as pisa's collate)."""

    def __call__(self, batch):
        images, targets = zip(*batch)
        return pad_images(images, 32), list(targets)


def _keep_ratio_resize(scale) -> v2.Resize:
    """torchvision's form of pisa's keep-ratio rule: short side to ``min(scale)``, long side capped."""
    if min(scale) == max(scale):  # torchvision needs max_size > size; a square limit caps the long side
        return v2.Resize(size=None, max_size=max(scale))
    return v2.Resize(size=min(scale), max_size=max(scale))


def torchvision_loader(ann: str, img_dir: str, scale, batch_size: int, workers: int) -> DataLoader:
    transforms = v2.Compose([
        v2.ToImage(),
        _keep_ratio_resize(scale),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32),
        v2.Normalize(MEAN, STD),
    ])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = CocoDetection(img_dir, ann, transforms=transforms)
    dataset = wrap_dataset_for_transforms_v2(coco, target_keys={"boxes", "labels", "image_id"})
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      collate_fn=PadCollate(), generator=torch.Generator().manual_seed(0))


def run_epoch(loader: DataLoader, batch_size: int, limit: int | None) -> dict[str, float]:
    """Images/s after the first batch, and worker memory at the first and the last batch."""
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(0)
    total = len(loader) if limit is None else min(len(loader), max(2, limit // batch_size))
    count, start, cpu_start, mem_start, mem_end = 0, 0.0, 0.0, (0.0, 0.0), (0.0, 0.0)
    for step, (images, _) in enumerate(loader):
        if step == 0:
            start, cpu_start, mem_start = time.perf_counter(), cpu_seconds(), workers_memory()
            continue
        count += images.shape[0]
        if step == total - 1:
            cpu_end, mem_end = cpu_seconds(), workers_memory()
            break
    elapsed = time.perf_counter() - start
    return {"ips": count / elapsed, "cpu_ms": 1000 * (cpu_end - cpu_start) / count,
            "rss0": mem_start[0], "rss1": mem_end[0], "pss0": mem_start[1], "pss1": mem_end[1]}


# --- driver ------------------------------------------------------------------------------------


def replicate_annotations(ann: str, copies: int, out_dir: str) -> str:
    """An annotation file listing every image ``copies`` times (new ids, same files)."""
    coco = json.loads(Path(ann).read_text())
    step = max(img["id"] for img in coco["images"]) + 1
    images, anns = [], []
    for k in range(copies):
        images += [{**img, "id": img["id"] + k * step} for img in coco["images"]]
        anns += [{**a, "id": len(anns) + i + 1, "image_id": a["image_id"] + k * step}
                 for i, a in enumerate(coco["annotations"])]
    path = Path(out_dir) / f"replicated_x{copies}.json"
    path.write_text(json.dumps({**coco, "images": images, "annotations": anns}))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ann", help="instances_*.json (default: the demo train split)")
    parser.add_argument("--img-dir", help="image folder of --ann")
    parser.add_argument("--scale", type=int, nargs=2, default=[1333, 800], metavar=("LONG", "SHORT"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replicate", type=int, default=1, help="list each image this many times")
    parser.add_argument("--limit", type=int, default=None, help="images per measured epoch")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; the best is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (workers always use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ann is None:
        paths = ensure_demo_dataset()
        args.ann, args.img_dir = paths["train_ann"], paths["train_img_dir"]
    with tempfile.TemporaryDirectory() as tmp:
        ann = replicate_annotations(args.ann, args.replicate, tmp) if args.replicate > 1 else args.ann
        report(ann, args)


def report(ann: str, args: argparse.Namespace) -> None:
    num_images = len(json.loads(Path(ann).read_text())["images"])
    print(f"data: {ann} ({num_images} images), img_dir {args.img_dir}")
    print(f"scale {tuple(args.scale)}, batch {args.batch_size}, main-process torch threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}, best of {args.repeat}")
    print(f"{'workers':>7} | {'pisa img/s':>10} | {'tv img/s':>9} | {'ratio':>5} | "
          f"{'pisa CPU ms/img':>15} | {'tv CPU ms/img':>13} | "
          f"{'pisa workers RSS/PSS MiB start -> end':>38} | {'tv workers RSS/PSS MiB start -> end':>36}")
    builds = {"pisa": [], "tv": []}
    for workers in args.workers:
        row: dict[str, dict] = {}
        for _ in range(args.repeat):  # alternate the two so a busy spell hits both alike
            for name, build in (("pisa", pisa_loader), ("tv", torchvision_loader)):
                begin = time.perf_counter()
                loader = build(ann, args.img_dir, tuple(args.scale), args.batch_size, workers)
                built = time.perf_counter() - begin
                result = {**run_epoch(loader, args.batch_size, args.limit), "build": built}
                del loader
                if name not in row or result["ips"] > row[name]["ips"]:
                    row[name] = result
        p, t = row["pisa"], row["tv"]
        builds["pisa"].append(p["build"])
        builds["tv"].append(t["build"])
        mem = lambda r: (f"{r['rss0']:.0f}/{r['pss0']:.0f} -> {r['rss1']:.0f}/{r['pss1']:.0f}"
                         if workers else "-")
        print(f"{workers:>7} | {p['ips']:>10.1f} | {t['ips']:>9.1f} | {p['ips'] / t['ips']:>5.2f} | "
              f"{p['cpu_ms']:>15.2f} | {t['cpu_ms']:>13.2f} | {mem(p):>38} | {mem(t):>36}",
              flush=True)
    print(f"dataset construction (index the JSON), median s: pisa {_median(builds['pisa']):.3f}, "
          f"torchvision {_median(builds['tv']):.3f}")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


if __name__ == "__main__":
    main()
