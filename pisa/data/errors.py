"""Dataset errors: one class per problem, each message says what, where and what to do.

Every class derives from :class:`DatasetError`, itself a ``ValueError``. Structural problems of the
annotation JSON are raised while the dataset is constructed (before training starts); problems with
an image file are raised when that image is loaded.

A DataLoader worker re-raises a worker's exception as ``type(exc)("Caught X in DataLoader worker
process N.\\nOriginal Traceback ...")``. :class:`DatasetError` recognises that form and moves the
original message back to the front, so ``str(err)`` starts with the same clear text in the main
process as in the worker, followed by the worker traceback.
"""

from __future__ import annotations

import re

_WORKER_WRAPPED = re.compile(r"^Caught (\w+) (in .+?)\.\nOriginal (Traceback.*)$", re.DOTALL)


class DatasetError(ValueError):
    """Base class of all dataset problems.

    Attributes:
        path: the file the problem is in (annotation JSON or image), or None.
        image_id: the COCO image id concerned, or None.
        file_name: the image's ``file_name`` from the JSON, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        image_id: int | None = None,
        file_name: str | None = None,
    ) -> None:
        super().__init__(_unwrap_worker_message(type(self), message))
        self.path = path
        self.image_id = image_id
        self.file_name = file_name


def _unwrap_worker_message(cls: type, message: str) -> str:
    """Put the original message first when ``message`` is a DataLoader worker's wrapper text."""
    match = _WORKER_WRAPPED.match(message)
    if match is None:
        return message
    where, traceback_text = match.group(2), match.group(3)
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    start = traceback_text.rfind(marker)
    if start < 0:
        return message
    original = traceback_text[start + len(marker):].rstrip("\n")
    return f"{original}\n(raised {where}; worker traceback follows)\n{traceback_text}"


# --- the annotation file as a whole -------------------------------------------------------------


class AnnotationFileError(DatasetError):
    """The annotation file is missing, unreadable, not JSON, or lacks a top-level key."""


class CategoryError(DatasetError):
    """The ``categories`` list is empty or holds an entry without a valid id/name, or a duplicate."""


# --- one entry of "images" ----------------------------------------------------------------------


class ImageRecordError(DatasetError):
    """An ``images`` entry lacks ``id``/``file_name``/``width``/``height`` or has wrong types."""


class DuplicateImageIdError(ImageRecordError):
    """Two ``images`` entries share one id."""


# --- one entry of "annotations" -----------------------------------------------------------------


class AnnotationError(DatasetError):
    """An ``annotations`` entry is malformed."""


class MalformedBoxError(AnnotationError):
    """``bbox`` is missing, not a list of 4 numbers, or holds a non-finite value."""


class UnknownImageIdError(AnnotationError):
    """An annotation refers to an image id that no ``images`` entry has."""


class UnknownCategoryIdError(AnnotationError):
    """An annotation refers to a category id that no ``categories`` entry has."""


class DuplicateAnnotationIdError(AnnotationError):
    """Two annotations share one id."""


# --- an image file, at load time ----------------------------------------------------------------


class ImageLoadError(DatasetError):
    """An image file could not be used."""


class ImageNotFoundError(ImageLoadError):
    """The image file does not exist."""


class ImageDecodeError(ImageLoadError):
    """The image file exists but cannot be read or decoded (truncated, corrupt, a directory)."""


class ImageSizeMismatchError(ImageLoadError):
    """The decoded image size differs from the ``width``/``height`` in the annotation file."""


# --- configuration ------------------------------------------------------------------------------


class DatasetConfigError(DatasetError):
    """A ``data:`` config entry names an unknown dataset type or key, or holds a wrong value."""
