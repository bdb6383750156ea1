"""The classes a model is trained for: their count follows the training set, and every split and
checkpoint must agree on them.

Labels ``0..K-1`` stand for the training set's categories in ascending category id. A dataset with
more categories than ``model.num_classes`` would silently train its extra labels as background (they
fall at or past the background index), so every mismatch stops the run before the first iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pisa.config_schema import ConfigError

__all__ = ["ClassInfo", "AUTO", "resolve_num_classes", "class_difference", "check_same_classes",
           "checkpoint_classes", "check_val_classes"]

AUTO = "auto"  # model.num_classes: take the count from the training set


@dataclass(frozen=True)
class ClassInfo:
    """Class names and COCO category ids in label order, and where they come from (a file name)."""

    names: tuple[str, ...]
    cat_ids: tuple[int, ...]
    source: str

    @classmethod
    def of_dataset(cls, dataset: Any) -> "ClassInfo":
        """From a dataset with ``class_names``, ``label_to_cat_id`` and ``ann_file`` (a CocoDataset)."""
        return cls(tuple(dataset.class_names), tuple(int(c) for c in dataset.label_to_cat_id),
                   str(getattr(dataset, "ann_file", "the dataset")))

    @classmethod
    def of_checkpoint_meta(cls, meta: dict, source: str) -> "ClassInfo | None":
        """From a checkpoint's ``meta`` (``class_names`` [+ ``cat_ids``]); None if it holds none."""
        names = meta.get("class_names") or meta.get("CLASSES")
        if not names:
            return None
        cat_ids = meta.get("cat_ids") or ()
        return cls(tuple(str(n) for n in names), tuple(int(c) for c in cat_ids), source)

    def __len__(self) -> int:
        return len(self.names)


def resolve_num_classes(model_cfg: dict, classes: ClassInfo) -> int:
    """``model.num_classes`` checked against (or, if ``auto``, taken from) the training set.

    Writes the resolved count into ``model_cfg`` and returns it. Raises :class:`ConfigError` naming
    both numbers, the annotation file and the fix when they differ.
    """
    wanted = model_cfg.get("num_classes", AUTO)
    found = len(classes)
    if wanted in (None, AUTO):
        model_cfg["num_classes"] = found
        return found
    if int(wanted) != found:
        more = ("its labels beyond the model's would train as background" if found > wanted
                else "the model would keep classes no image has")
        raise ConfigError(f"model.num_classes is {wanted} but the training set {classes.source} has {found} "
                          f"categories ({more}); use --set model.num_classes={found} "
                          f"(or model.num_classes=auto to follow the training set)")
    return found


def _pairs(info: ClassInfo) -> dict[int, str]:
    return dict(zip(info.cat_ids, info.names))


def class_difference(expected: ClassInfo, actual: ClassInfo) -> str | None:
    """How ``actual``'s classes differ from ``expected``'s, or None when they are the same.

    Compared by category id and name (and order); when either side has no ids, by name alone.
    """
    if expected.cat_ids and actual.cat_ids:
        if expected.cat_ids == actual.cat_ids and expected.names == actual.names:
            return None
        a, b = _pairs(expected), _pairs(actual)
        parts = []
        only_a = [f"{i} {a[i]!r}" for i in a if i not in b]
        only_b = [f"{i} {b[i]!r}" for i in b if i not in a]
        renamed = [f"{i} {a[i]!r} vs {b[i]!r}" for i in a if i in b and a[i] != b[i]]
        if only_a:
            parts.append(f"only in {expected.source}: {_short(only_a)}")
        if only_b:
            parts.append(f"only in {actual.source}: {_short(only_b)}")
        if renamed:
            parts.append(f"same id, other name: {_short(renamed)}")
        return "; ".join(parts) or "the same categories in another order"
    if expected.names == actual.names:
        return None
    only_a = [n for n in expected.names if n not in actual.names]
    only_b = [n for n in actual.names if n not in expected.names]
    parts = [f"only in {src}: {_short([repr(n) for n in names])}"
             for src, names in ((expected.source, only_a), (actual.source, only_b)) if names]
    return "; ".join(parts) or "the same class names in another order"


def _short(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def check_same_classes(expected: ClassInfo, actual: ClassInfo, what: str, fix: str) -> None:
    """Raise :class:`ConfigError` ``"{what}: ... differ: ...; {fix}"`` unless the classes agree."""
    difference = class_difference(expected, actual)
    if difference is not None:
        raise ConfigError(f"{what}: the categories of {actual.source} ({len(actual)}) differ from those of "
                          f"{expected.source} ({len(expected)}): {difference}; {fix}")


def checkpoint_classes(meta: dict, source: str, model_cfg: dict) -> ClassInfo | None:
    """The classes a checkpoint was trained for, from its ``meta`` (None if it records none).

    Resolves ``model_cfg["num_classes"] == "auto"`` to their count, before the model is built.
    """
    classes = ClassInfo.of_checkpoint_meta(meta, source=source)
    if model_cfg.get("num_classes", AUTO) == AUTO:
        if classes is None:
            raise ConfigError(f"model.num_classes is auto, but {source} records no class names to take the "
                              f"count from; set it, e.g. --set model.num_classes=80")
        model_cfg["num_classes"] = len(classes)
    return classes


def check_val_classes(classes: ClassInfo | None, dataset: Any) -> None:
    """A validation set must hold the categories the checkpoint was trained for (ids and names)."""
    if classes is None or not hasattr(dataset, "label_to_cat_id"):
        return
    check_same_classes(classes, ClassInfo.of_dataset(dataset), "data.val",
                       "evaluate on a dataset with the categories the model was trained for")
