"""Checkpoints: plain data only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values:
``model`` (state dict, never DDP's ``module.`` prefix), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (completed epochs), ``iter`` (completed iterations), ``best``, ``config`` and ``meta``
(version, class names, RNG states of every rank, data position). RNG states are stored as tensors
and ints so that ``torch.load(weights_only=True)`` can read them back without unpickling code.
"""

from __future__ import annotations

import importlib
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRUST_HINT = "if you trust it, pass --trust-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and what to do."""


# ----------------------------------------------------------------------------------------------
# state dict hygiene


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop DDP's ``module.`` prefix when every key carries it (checkpoints from DDP-wrapped models)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def nonfinite_entries(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state_dict`` holding NaN or inf."""
    bad = []
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------------------------
# RNG state as weights_only-loadable plain data


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and initialised CUDA devices), numpy and Python RNG states as tensors/ints/floats."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only for devices present."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for index, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng.cpu(), index)
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))


# ----------------------------------------------------------------------------------------------
# atomic writing


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable. Some filesystems cannot open directories; the rename is still atomic."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of earlier writes to ``path`` that a killed process left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into a temp file in the same directory, flush, fsync, rename, fsync the dir.

    A crash at any point leaves either the old file or the complete new one at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` hold the same bytes as ``src`` (hard link, else copy), atomically.

    A hard link costs no disk; later replacing ``src`` by rename leaves ``dst`` untouched.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    return dst


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a training checkpoint (see module docstring) atomically to ``path``.

    Refuses a model whose parameters or buffers hold NaN/inf: such a file could only poison a
    resume. DDP's ``module.`` prefix is removed from ``state['model']``.
    """
    model_state = strip_module_prefix(state["model"])
    bad = nonfinite_entries(model_state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(f"refusing to write {path}: the model has non-finite values in {shown}; "
                              "the last good checkpoint is kept")
    return atomic_torch_save({**state, "model": model_state}, path)


# ----------------------------------------------------------------------------------------------
# reading


def _unsafe_reason(err: Exception) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"it references {match.group(1)}" if match else str(err).splitlines()[0][:200]


def load_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (full unpickling only with ``trust``).

    Raises :class:`CheckpointError` for a missing or corrupt file, and for a file that needs
    arbitrary code to load (a pickled class) unless ``trust`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: this file would execute code on load ({_unsafe_reason(err)}); "
                              f"{TRUST_HINT}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(err).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def shape_mismatches(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, str]:
    """Keys that ``state`` and ``model`` share with other shapes -> ``"checkpoint [..], model [..]"``
    (``load_state_dict`` raises on those even when not strict)."""
    own = model.state_dict()
    return {k: f"checkpoint {list(v.shape)}, model {list(own[k].shape)}" for k, v in state.items()
            if k in own and torch.is_tensor(v) and v.shape != own[k].shape}


def describe_mismatches(mismatched: dict[str, str], limit: int = 3) -> str:
    """``"key: checkpoint [..], model [..]; ..."`` for the first ``limit`` entries."""
    shown = "; ".join(f"{k}: {v}" for k, v in list(mismatched.items())[:limit])
    return shown + ("; ..." if len(mismatched) > limit else "")


def load_model_weights(path: str | os.PathLike, model_cfg: dict, trust: bool = False) -> dict[str, Any]:
    """Model state dict from a pisa checkpoint (``model`` key) or an mmdetection one (converted).

    ``model_cfg`` is the ``model`` section of the config, which the mmdetection converter needs to
    map keys. The converter is imported only when an mmdetection file is met.
    """
    return load_model_checkpoint(path, model_cfg, trust)[0]


def load_model_checkpoint(path: str | os.PathLike, model_cfg: dict,
                          trust: bool = False) -> tuple[dict[str, Any], str | None]:
    """``(state_dict, embedded_config)``, as ``load_model_weights``; ``embedded_config`` is the config
    text an mmdetection file carries in ``meta["config"]`` (kept as ``meta["mmdet_config"]`` by
    ``scripts/convert_mmdet.py``), or None."""
    obj = _read_any_checkpoint(path, trust)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if isinstance(obj.get("model"), dict):
        state, text = strip_module_prefix(obj["model"]), meta.get("mmdet_config")
    elif isinstance(obj.get("state_dict"), dict) and _via_converter(lambda c: c.is_mmdet_checkpoint(obj)):
        state = _via_converter(lambda c: c.convert_mmdet_state_dict(obj["state_dict"], model_cfg))
        text = meta.get("config")
    else:
        raise CheckpointError(f"{path} is neither a pisa checkpoint (no 'model' key) nor an mmdetection one "
                              f"(keys: {sorted(obj)[:8]})")
    return state, text if isinstance(text, str) else None


def read_checkpoint_meta(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """The ``meta`` dict of a pisa or mmdetection checkpoint (``{}`` if it has none).

    pisa checkpoints keep ``class_names`` and ``cat_ids`` there; mmdetection ones ``CLASSES``.
    """
    meta = _read_any_checkpoint(path, trust).get("meta")
    return meta if isinstance(meta, dict) else {}


def _read_any_checkpoint(path: str | os.PathLike, trust: bool) -> dict[str, Any]:
    """``load_checkpoint``, falling back to the converter's reader for mmdetection files: they may hold
    a few known-safe non-tensor objects; that reader knows which, and refuses anything else with the
    same advice."""
    try:
        return load_checkpoint(path, trust=trust)
    except CheckpointError as err:
        if TRUST_HINT not in str(err):
            raise
        return _via_converter(lambda convert: convert.read_mmdet_checkpoint(str(path), trust=trust))


def _via_converter(call):
    """Run ``call(pisa.models.convert)``, imported only when needed; its ValueErrors become
    CheckpointErrors (they name the file and the fix)."""
    convert = importlib.import_module("pisa.models.convert")
    try:
        return call(convert)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
