"""Up-front checks of the tensors given to the public functions of ``pisa.losses``.

Every public function validates its inputs before any computation, so a caller from another code
base gets one message naming the function, the argument, the shape and dtype expected and the ones
given, instead of an error from deep inside an indexing or broadcasting operation.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

__all__ = ["check_tensor", "check_num_classes", "Dim", "Shape"]

# A dimension is a fixed size (int), a named size (str, e.g. "N") or any size (None).
Dim = Union[int, str, None]
Shape = tuple[Dim, ...]

_KINDS = {
    "float": ("a floating-point", lambda d: d.is_floating_point),
    "int": ("an integer", lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool),
    "any": ("any", lambda d: True),
}


def _format_shape(shape: Shape) -> str:
    names = ["?" if dim is None else str(dim) for dim in shape]
    return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def _matches(actual: tuple[int, ...], shape: Shape, sizes: dict[str, int]) -> bool:
    if len(actual) != len(shape):
        return False
    for got, dim in zip(actual, shape):
        if isinstance(dim, int) and got != dim:
            return False
        if isinstance(dim, str) and dim in sizes and got != sizes[dim]:
            return False
    return True


def check_tensor(fn: str, name: str, value: object, shape: Shape | list[Shape] | None, kind: str = "any",
                 sizes: dict[str, int] | None = None, hint: str = "") -> None:
    """Raise if ``value`` is not a tensor of one of the given shapes and of the given dtype kind.

    Args:
        fn: the public function's name, first word of the message.
        name: the argument's name as the caller passes it.
        value: what was passed.
        shape: the expected shape, or a list of alternatives, or ``None`` for any shape. Named
            dimensions take their size from ``sizes`` when it holds the name, else any size.
        kind: ``"float"``, ``"int"`` (integer dtypes, not bool) or ``"any"``.
        sizes: sizes of named dimensions fixed by earlier arguments (e.g. ``{"N": 10}``).
        hint: appended to the message, e.g. which setting decides the expected shape.

    Raises:
        TypeError: ``value`` is not a tensor, or its dtype is of another kind.
        ValueError: its shape matches none of the alternatives.
    """
    sizes = sizes or {}
    alternatives = [] if shape is None else (shape if isinstance(shape, list) else [shape])
    kind_text, kind_ok = _KINDS[kind]
    expected = " or ".join(_format_shape(s) for s in alternatives)
    named = sorted({d for s in alternatives for d in s if isinstance(d, str) and d in sizes})
    if named:
        expected += " with " + ", ".join(f"{d} = {sizes[d]}" for d in named)
    if alternatives:
        wanted = f"{fn}: {name} must have shape {expected} and {kind_text} dtype"
    else:
        wanted = f"{fn}: {name} must be a tensor of {kind_text} dtype"
    if not isinstance(value, Tensor):
        raise TypeError(f"{wanted}; got a {type(value).__name__}, not a tensor")
    got = f"; got shape {tuple(value.shape)}, dtype {value.dtype}" + (f" ({hint})" if hint else "")
    if alternatives and not any(_matches(tuple(value.shape), s, sizes) for s in alternatives):
        raise ValueError(wanted + got)
    if not kind_ok(value.dtype):
        raise TypeError(wanted + got)


def check_num_classes(fn: str, num_classes: object) -> None:
    """Raise ``ValueError`` unless ``num_classes`` (``C``, foreground classes) is an int ``>= 1``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{fn}: num_classes must be the number of foreground classes C, an int >= 1 "
                         f"(background is label C); got {num_classes!r}")
