"""Train the baseline, PISA, PAA and Sampling-Free demo detectors on the same data and schedule, print one table.

    nice -n 10 python scripts/compare_methods.py                 # the demo configs' full schedule (12 epochs)
    nice -n 10 python scripts/compare_methods.py --jobs 2        # two runs at a time, one thread each
    nice -n 10 python scripts/compare_methods.py --epochs 4      # shortened: lr steps scaled to 4 epochs
    python scripts/compare_methods.py --only pisa,paa --reuse    # re-evaluate existing runs

Each variant trains with ``python -m pisa.train CONFIG`` (the normal trainer, one process, evaluation
off so the training time is training only), then its last checkpoint is evaluated here on the demo
val split. Columns: COCO box AP, AP50, AP75, APs/m/l, training wall time, and the PISA-style analysis
of the top-100 detections per image: how many are positives (IoU >= 0.5 with a GT of their class), and
those positives' mean IoU and mean score.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from pisa.config import load_config
from pisa.engine import dist
from pisa.engine.inference import evaluate
from pisa.models import build_model
from pisa.models.box_coder import box_iou
from pisa.train import build_val_parts

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": "configs/demo/retinanet_r18_demo.yaml",
    "pisa": "configs/demo/pisa_retinanet_r18_demo.yaml",
    "paa": "configs/demo/paa_r18_demo.yaml",
    "sampling_free": "configs/demo/sampling_free_retinanet_r18_demo.yaml",
}
METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl")


def schedule_overrides(config: str, epochs: int | None) -> list[str]:
    """``--set`` items for a shortened schedule: ``epochs`` with the lr steps scaled proportionally."""
    if epochs is None:
        return []
    schedule = load_config(str(REPO / config), check_paths=False)["schedule"]
    steps = sorted({max(1, min(epochs, round(s * epochs / schedule["epochs"]))) for s in schedule["steps"]})
    steps = [s for s in steps if s < epochs] or []
    return [f"schedule.epochs={epochs}", f"schedule.steps={json.dumps(steps)}"]


def train(name: str, config: str, work_dir: Path, extra: list[str], threads: int) -> float:
    """Run the normal trainer in a subprocess with ``threads`` intra-op threads; returns its wall time (s)."""
    cmd = [sys.executable, "-m", "pisa.train", str(REPO / config), "--work-dir", str(work_dir),
           "--set", "train.eval_interval=0", *[a for item in extra for a in ("--set", item)]]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    tic = time.perf_counter()
    log_path = work_dir.parent / f"{name}.train.log"
    with open(log_path, "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    if code:
        raise TrainingFailed(f"training {name} failed (exit status {code}); its output is in {log_path}")
    seconds = time.perf_counter() - tic
    print(f"[{name}] trained in {seconds:.0f} s", flush=True)
    return seconds


class TrainingFailed(RuntimeError):
    """A variant's ``pisa.train`` run exited with an error (its log names the cause)."""


class RecordingEvaluator:
    """Forwards to a CocoEvaluator and keeps every image's detections for the positives analysis."""

    def __init__(self, inner) -> None:
        self.inner, self.detections = inner, {}

    def reset(self) -> None:
        self.inner.reset()
        self.detections = {}

    def add(self, image_ids, detections) -> None:
        self.inner.add(image_ids, detections)
        self.detections.update(zip(image_ids, detections))

    def gather(self) -> None:
        self.inner.gather()

    def evaluate(self, out_dir=None):
        return self.inner.evaluate(out_dir)


def positives_analysis(detections: dict[int, dict], dataset) -> dict[str, float]:
    """Top-100 detections per image that overlap a same-class GT at IoU >= 0.5: count, mean IoU, mean score."""
    index_of = {int(image_id): i for i, image_id in enumerate(dataset.image_ids)}
    ious, scores = [], []
    for image_id, det in detections.items():
        ann = dataset.get_annotations(index_of[image_id])
        gt_boxes = torch.as_tensor(ann["boxes"]).reshape(-1, 4).float()
        gt_labels = torch.as_tensor(ann["labels"]).long()
        if gt_boxes.shape[0] == 0 or det["boxes"].shape[0] == 0:
            continue
        overlap = box_iou(det["boxes"][:100].float(), gt_boxes)
        overlap[det["labels"][:100, None] != gt_labels[None, :]] = 0
        best = overlap.max(1).values
        keep = best >= 0.5
        ious.append(best[keep])
        scores.append(det["scores"][:100][keep].float())
    ious, scores = (torch.cat(v) if v else torch.zeros(0) for v in (ious, scores))
    n = ious.numel()
    return {"pos": n, "pos_iou": float(ious.mean()) if n else float("nan"),
            "pos_score": float(scores.mean()) if n else float("nan")}


def evaluate_run(config: str, work_dir: Path) -> dict[str, float]:
    cfg = load_config(str(REPO / config), [f"train.work_dir={json.dumps(str(work_dir))}"])
    model = build_model(cfg)
    state = torch.load(work_dir / "latest.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    loader, evaluator = build_val_parts(cfg, dist.DistInfo())  # one process, CPU
    recorder = RecordingEvaluator(evaluator)
    metrics = evaluate(model, loader, recorder, progress=False)
    return {**{k: metrics[k] for k in METRICS}, **positives_analysis(recorder.detections, loader.dataset)}


def format_table(rows: dict[str, dict]) -> str:
    header = "| method | AP | AP50 | AP75 | APs | APm | APl | train s | top-100 positives | their mean IoU | their mean score |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in rows.items():
        cells = [f"{100 * r[k]:.1f}" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['train_s']:.0f} | {r['pos']} | "
                     f"{r['pos_iou']:.3f} | {r['pos_score']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="shorten the schedule to N epochs (default: 12)")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--out", default="work_dirs/compare_methods", help="folder of the runs and results")
    parser.add_argument("--reuse", action="store_true", help="skip training where OUT/NAME/latest.pth exists")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of each training run (default 1: on a shared CPU more threads "
                             "oversubscribe the cores and a step can take 10x longer)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants trained at the same time, each with --threads threads (default 1; on "
                             "2 cores, --jobs 2 with one thread each uses both cores better than one run "
                             "with two threads)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra config override for every variant (repeatable)")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    torch.set_num_threads(args.threads)  # the evaluations here, as the training runs
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pending = [n for n in names if not (args.reuse and (out / n / "latest.pth").is_file())]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = {pool.submit(train, n, VARIANTS[n], out / n,
                            schedule_overrides(VARIANTS[n], args.epochs) + args.overrides, args.threads): n
                for n in pending}
        for run in as_completed(runs):
            try:
                (out / f"{runs[run]}.train_s").write_text(f"{run.result():.1f}\n")
            except TrainingFailed as err:
                pool.shutdown(wait=True, cancel_futures=True)  # runs not yet started are dropped
                print(f"error: {err}", file=sys.stderr)
                return 1
    rows = {}
    for name in names:
        rows[name] = {**evaluate_run(VARIANTS[name], out / name), "train_s": float((out / f"{name}.train_s").read_text())}
        print(f"[{name}] " + json.dumps(rows[name]), flush=True)
    schedule = f"{args.epochs} epochs (shortened)" if args.epochs else "the demo configs' schedule (12 epochs)"
    table = format_table(rows)
    print(f"\nDemo data, {schedule}, torch {torch.__version__}, {os.cpu_count()} CPUs:\n{table}")
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
