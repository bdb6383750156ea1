"""How the commands report failures: an expected failure is one line, a bug keeps its traceback.

Expected failures are the ones a user can fix: a bad config, a broken dataset or image, an unusable
checkpoint, a non-finite loss, running out of memory. ``python -m pisa.train|eval|predict`` print them
as ``error: ...`` on stderr and exit with status 1 (2 for config and usage errors). Anything else is a
bug in pisa and keeps Python's traceback. Set ``PISA_DEBUG=1`` to see the traceback of an expected
failure too.

Under ``torchrun`` the failing process prints its message (prefixed with its rank) and exits; the
other processes notice the broken process group, print one line saying so and exit as well, and
torchrun stops whatever is left, so no process waits out the collective timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable, Iterator

import torch

__all__ = ["UsageError", "DEBUG_ENV", "reported_errors", "error_line", "debug_enabled"]

DEBUG_ENV = "PISA_DEBUG"

# What a broken peer looks like from a healthy process (gloo: socket closed; NCCL: remote error).
_PEER_FAILURE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote process exited|"
                           r"NCCL communicator was aborted|socket .*(closed|reset)", re.IGNORECASE)


# The CPU allocator's out-of-memory message (CUDA raises torch.OutOfMemoryError).
_CPU_OOM = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")


class UsageError(ValueError):
    """A command-line argument names something that cannot be used (a missing input image, ...)."""


def debug_enabled() -> bool:
    """True when ``PISA_DEBUG`` is set to anything but ``""`` / ``0``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _expected_errors() -> dict[type[BaseException], int]:
    """Expected error classes -> exit status (imported late: the modules import torch and friends)."""
    from pisa.config_schema import ConfigError
    from pisa.data.errors import DatasetError
    from pisa.engine.checkpoint import CheckpointError
    from pisa.engine.trainer import NonFiniteLossError

    return {ConfigError: 2, UsageError: 2, DatasetError: 1, CheckpointError: 1, NonFiniteLossError: 1}


def error_line(err: BaseException) -> str:
    """The user-facing text of ``err`` without any traceback it carries.

    A DataLoader worker's error holds the worker's traceback after the original message
    (see :mod:`pisa.data.errors`); only the message and where it was raised are kept.
    """
    text = str(err)
    worker = re.search(r"\n\(raised (in .+?); worker traceback follows\)", text)
    if worker:
        text = f"{text[:worker.start()]} (raised {worker.group(1)})"
    text = text.split("\nTraceback (most recent call last)")[0]
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""


def _is_peer_failure(err: BaseException) -> bool:
    """A collective failed because another process of the group went away."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and bool(_PEER_FAILURE.search(str(err))))


def _report(message: str, status: int) -> None:
    print(f"error: {_rank_prefix()}{message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


@contextlib.contextmanager
def reported_errors(oom_hint: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn expected failures raised inside the block into one ``error:`` line and a non-zero exit.

    ``oom_hint()`` names the settings to lower when memory runs out (e.g. ``data.batch_size``).
    Other exceptions pass through unchanged; with ``PISA_DEBUG=1`` expected ones do as well.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException as err:
        if debug_enabled():
            raise
        status = next((code for cls, code in _expected_errors().items() if isinstance(err, cls)), None)
        if status is not None:
            _report(error_line(err), status)
        if isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                      and _CPU_OOM.search(str(err))):
            hint = oom_hint() if oom_hint else "lower the batch size or the input scale"
            _report(f"out of memory ({error_line(err)[:200]}); {hint}", 1)
        if _is_peer_failure(err):
            _report("another process of this run stopped (its error is printed above); stopping too "
                    f"({error_line(err)[:160]})", 1)
        raise
