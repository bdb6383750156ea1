"""Training logs: one JSON object per line in ``work_dir/log.jsonl``, console lines, memory use.

Everything here writes on rank 0 only; other ranks get no-op objects so callers need no checks.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pisa.engine import dist


def console(message: str) -> None:
    """Print ``message`` on rank 0 without breaking an active tqdm bar."""
    if dist.is_main():
        tqdm.write(message, file=sys.stdout)


def _json_value(value: Any) -> Any:
    """Plain JSON: tensors become numbers; non-finite floats become strings ("nan", "inf")
    because strict JSON has no literal for them."""
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLogger:
    """Appends one JSON object per call to ``path`` (rank 0 only), flushed at once so a killed run
    keeps every line it reported."""

    def __init__(self, path: str | Path, enabled: bool | None = None) -> None:
        self.path = Path(path)
        self.enabled = dist.is_main() if enabled is None else enabled
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class WindowAverage:
    """Running means of named floats over the current logging window."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._sums[key] += float(value)
            self._counts[key] += 1

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._counts[k] for k in self._sums}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on ``device``, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def progress_bar(total: int, initial: int, desc: str = "train") -> tqdm:
    """tqdm bar with ETA on rank 0; a disabled bar elsewhere."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not dist.is_main(),
                file=sys.stderr)
