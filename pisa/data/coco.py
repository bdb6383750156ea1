"""COCO ``instances_*.json`` detection dataset with compact annotation storage.

Indexing reads the JSON once, validates it (every structural problem raises a specific
:class:`~pisa.data.errors.DatasetError` naming the file, the image and what to do, or is counted and
skipped with ``on_error="skip"``), and keeps only flat numpy arrays: one float32 box array, one int64
label array and per-image offsets. No per-image Python objects survive indexing, so DataLoader
workers (forked or spawned) share or cheaply copy a few arrays and their memory stays flat.

Conventions (the reference's, see docs/data.md): category ids, in ascending order, map to labels
``0..K-1``; ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]`` clipped to the image; a box with
``area <= 0`` or a clipped width or height below 1 px is dropped and counted; crowd annotations become
``ignore_boxes``; annotations flagged ``ignore`` are left out.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from pisa.data import errors as E
from pisa.data.coco_index import SKIP_HINT, build_coco_index, short_repr
from pisa.data.transforms import as_tensor, to_rgb_image

# --- the dataset -------------------------------------------------------------------------------


class CocoDataset(torch.utils.data.Dataset):
    """COCO-format detection dataset: ``dataset[i] -> (image, target)``.

    Args:
        ann_file: an ``instances_*.json`` file (any categories, any ids).
        img_dir: folder that ``file_name`` entries are relative to.
        transforms: ``t(image, target, generator) -> (image, target)`` (see
            :mod:`pisa.data.transforms`); None returns the uint8 RGB image ``[3, H, W]``.
        filter_empty: drop images that have no annotation at all (training only; an image whose
            only annotations are crowd or degenerate is kept, as in the reference).
        with_masks: decode instance masks into ``target["masks"]`` (uint8 ``[N, h, w]``).
        on_error: ``"raise"`` (default) or ``"skip"``: skip broken entries or images, counted in
            :meth:`summary` (image skips are counted per process; workers warn on stderr).

    ``dataset[i]`` takes an int, or ``(i, seed)`` to draw the sample's augmentation from a
    generator seeded with ``seed`` (what :func:`pisa.data.build_dataloader` passes).

    Target: ``boxes`` float32 ``[N, 4]`` xyxy, ``labels`` int64 ``[N]`` in ``0..K-1``,
    ``ignore_boxes`` float32 ``[M, 4]``, optional ``masks``, and metas ``image_id``, ``img_shape``
    and ``ori_shape`` ``(h, w)``, ``scale_factor`` ``(sx, sy)``, ``flip``.
    """

    supports_sample_seeds = True

    def __init__(self, ann_file: str, img_dir: str, transforms: Callable | None = None, *,
                 filter_empty: bool = False, with_masks: bool = False,
                 on_error: str = "raise") -> None:
        self.ann_file, self.img_dir = os.fspath(ann_file), os.fspath(img_dir)
        if not os.path.isdir(self.img_dir):  # checked first: indexing a large file takes a while
            raise E.ImageNotFoundError(f"image folder {self.img_dir} (for {self.ann_file}) does not "
                                       "exist. Check the img_dir setting.", path=self.img_dir)
        self.index = build_coco_index(self.ann_file, with_masks=with_masks, on_error=on_error)
        self.transforms = transforms
        self.filter_empty, self.with_masks, self.on_error = filter_empty, with_masks, on_error
        rows = np.arange(len(self.index.image_ids))
        self._rows = rows[self.index.has_annotation] if filter_empty else rows
        self.load_skips: Counter = Counter()
        self._bad_rows: set[int] = set()

    # class mapping
    @property
    def num_classes(self) -> int:
        return len(self.index.cat_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)

    @property
    def label_to_cat_id(self) -> list[int]:
        """``label_to_cat_id[k]`` is the COCO category id of label ``k``."""
        return list(self.index.cat_ids)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c: k for k, c in enumerate(self.index.cat_ids)}

    @property
    def image_ids(self) -> np.ndarray:
        """int64 ``[len(self)]``: the COCO image id of each dataset index."""
        return self.index.image_ids[self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def image_info(self, i: int) -> dict[str, Any]:
        """``image_id``, ``file_name``, ``width``, ``height`` of index ``i`` (from the JSON)."""
        row = self._rows[i]
        return {"image_id": int(self.index.image_ids[row]),
                "file_name": self.index.file_names[row].decode("utf-8"),
                "width": int(self.index.widths[row]), "height": int(self.index.heights[row])}

    def aspect_ratio_flags(self) -> np.ndarray:
        """int64 ``[len(self)]``: 1 where width >= height, else 0 (for aspect-ratio grouping)."""
        return (self.index.widths[self._rows] >= self.index.heights[self._rows]).astype(np.int64)

    def get_annotations(self, i: int) -> dict[str, np.ndarray]:
        """Index ``i``'s ``boxes`` (xyxy, original image), ``labels`` and ``ignore_boxes`` (numpy)."""
        row, ix = self._rows[i], self.index
        lo, hi = ix.box_offsets[row], ix.box_offsets[row + 1]
        ilo, ihi = ix.ignore_offsets[row], ix.ignore_offsets[row + 1]
        return {"boxes": ix.boxes[lo:hi].copy(), "labels": ix.labels[lo:hi].copy(),
                "ignore_boxes": ix.ignore_boxes[ilo:ihi].copy()}

    def load_image(self, i: int) -> Image.Image:
        """Decode index ``i``'s image as 8-bit RGB; raises an ImageLoadError subclass."""
        info = self.image_info(i)
        path = os.path.join(self.img_dir, info["file_name"])
        where = f"image id {info['image_id']}, file '{info['file_name']}' of {self.ann_file}"
        kw = dict(path=path, image_id=info["image_id"], file_name=info["file_name"])
        try:
            img = Image.open(path)
        except FileNotFoundError:
            raise E.ImageNotFoundError(f"image file not found: {path} ({where}). Check img_dir "
                                       f"({self.img_dir}), restore the file, {SKIP_HINT}.",
                                       **kw) from None
        except OSError as exc:  # a directory, no permission, not an image
            raise E.ImageDecodeError(f"cannot open image file {path} ({where}): {exc}. Replace the "
                                     f"file, {SKIP_HINT}.", **kw) from None
        with img:
            size = (info["width"], info["height"])
            # A camera image stored sideways with an EXIF rotation, annotated as it is displayed.
            rotate = img.size != size and img.size == size[::-1] and _exif_orientation(img) in _ROTATING_ORIENTATIONS
            if img.size != size and not rotate:
                raise E.ImageSizeMismatchError(
                    f"image file {path} ({where}) is {img.width}x{img.height} (width x height) but the "
                    f"annotation file says {info['width']}x{info['height']}. The image and its "
                    f"annotations disagree: replace the file or fix the entry, {SKIP_HINT}.", **kw)
            try:
                img.load()
            except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
                raise E.ImageDecodeError(f"image file {path} ({where}) is truncated or corrupt: "
                                         f"{exc}. Replace the file, {SKIP_HINT}.", **kw) from None
            return to_rgb_image(ImageOps.exif_transpose(img) if rotate else img)

    def load_masks(self, i: int) -> np.ndarray:
        """uint8 ``[N, h, w]`` instance masks of index ``i`` (needs ``with_masks=True``)."""
        if self.index.segms is None:
            raise E.DatasetConfigError("masks were not indexed; construct the dataset with "
                                       "with_masks=True")
        info, row = self.image_info(i), self._rows[i]
        lo, hi = self.index.box_offsets[row], self.index.box_offsets[row + 1]
        masks = np.zeros((hi - lo, info["height"], info["width"]), dtype=np.uint8)
        for k in range(lo, hi):
            segm = json.loads(self.index.segms[k])
            try:
                masks[k - lo] = _decode_segmentation(segm, info["height"], info["width"])
            except Exception as exc:  # pycocotools raises bare Exceptions on malformed input
                raise E.AnnotationError(
                    f"annotation file {self.ann_file}: a segmentation of image id "
                    f"{info['image_id']} ('{info['file_name']}') cannot be decoded ({exc}): "
                    f"{short_repr(segm)}. Fix it, {SKIP_HINT}.", path=self.ann_file,
                    image_id=info["image_id"], file_name=info["file_name"]) from None
        return masks

    def __getitem__(self, index: int | tuple[int, int]):
        i, seed = index if isinstance(index, tuple) else (index, None)
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        image, target = self._load_sample(i % len(self))
        if self.transforms is None:
            return as_tensor(image), target
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        return self.transforms(image, target, generator)

    def _load_sample(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        """Image and untransformed target of ``i``; with ``on_error="skip"`` the next loadable one."""
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            if self._rows[j] in self._bad_rows:
                continue
            try:
                image = self.load_image(j)
                masks = self.load_masks(j) if self.with_masks else None
            except E.DatasetError as err:
                if self.on_error == "raise":
                    raise
                self._record_load_skip(int(self._rows[j]), err)
                continue
            return image, self._target(j, masks)
        raise E.ImageLoadError(f"no image of {self.ann_file} could be loaded (on_error='skip' skipped "
                               f"them all). Check img_dir ({self.img_dir}).", path=self.img_dir)

    def _record_load_skip(self, row: int, err: E.DatasetError) -> None:
        self._bad_rows.add(row)
        self.load_skips[type(err).__name__] += 1
        warnings.warn(f"skipped (on_error='skip'): {err}", stacklevel=3)

    def _target(self, i: int, masks: np.ndarray | None) -> dict[str, Any]:
        ann, info = self.get_annotations(i), self.image_info(i)
        shape = (info["height"], info["width"])
        target = {"boxes": torch.from_numpy(ann["boxes"]), "labels": torch.from_numpy(ann["labels"]),
                  "ignore_boxes": torch.from_numpy(ann["ignore_boxes"]),
                  "image_id": info["image_id"], "ori_shape": shape, "img_shape": shape,
                  "scale_factor": (1.0, 1.0), "flip": False}
        if masks is not None:
            target["masks"] = torch.from_numpy(masks)
        return target

    def brief(self) -> str:
        """One line: images, objects, classes, and what was dropped or skipped, with the file name."""
        ix, rows = self.index, self._rows
        counts = np.diff(ix.box_offsets)[rows]
        skipped = sum((ix.skipped + self.load_skips).values())
        extras = [f"{int((counts == 0).sum())} without objects"]
        if ix.dropped_degenerate:
            extras.append(f"{ix.dropped_degenerate} degenerate boxes dropped")
        if skipped:
            extras.append(f"{skipped} entries skipped (on_error=skip)")
        return (f"{len(rows)} images ({', '.join(extras)}), {int(counts.sum())} objects, "
                f"{self.num_classes} classes - {self.ann_file}")

    def summary(self) -> str:
        """A one-screen report: images, objects per class, empty images, crowds, drops, skips."""
        ix, rows = self.index, self._rows
        counts = np.diff(ix.box_offsets)[rows]
        in_use = np.repeat(np.isin(np.arange(len(ix.image_ids)), rows), np.diff(ix.box_offsets))
        per_class = np.bincount(ix.labels[in_use], minlength=self.num_classes)
        skipped = ix.skipped + self.load_skips
        lines = [
            f"COCO dataset {self.ann_file} (images in {self.img_dir})",
            f"  images: {len(rows)} of {len(ix.image_ids)} in the file"
            + (f" ({len(ix.image_ids) - len(rows)} without annotations removed by filter_empty)"
               if self.filter_empty else "")
            + f"; {int((counts == 0).sum())} without objects",
            f"  objects: {int(counts.sum())} in {self.num_classes} classes; crowd regions (ignored): "
            f"{int(np.diff(ix.ignore_offsets)[rows].sum())}; degenerate boxes dropped: "
            f"{ix.dropped_degenerate}",
            f"  skipped (on_error={self.on_error!r}): {sum(skipped.values())}"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")" if skipped else ""),
        ]
        lines += [f"    e.g. {m.splitlines()[0]}" for m in ix.skip_messages[:3]]
        lines.append("  objects per class (label cat_id name: count):")
        cells = [f"{k:>3} {c:>4} {n[:14]:<14} {int(v):>7}"
                 for k, (c, n, v) in enumerate(zip(ix.cat_ids, ix.class_names, per_class))]
        for start in range(0, len(cells), 3):
            lines.append("   " + "   ".join(cells[start:start + 3]))
        return "\n".join(lines)


# EXIF orientations that turn the image by 90 degrees (5-8), swapping its width and height.
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


def _exif_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag of ``img`` (1-8), or None when it has none or it cannot be read."""
    try:
        return img.getexif().get(0x0112)
    except Exception:  # malformed EXIF: treat as absent
        return None


def _decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> uint8 mask ``[height, width]``."""
    if isinstance(segm, list):
        # Parts of under 3 points cover nothing; a first one of 4 numbers would be read as a box.
        polygons = [part for part in segm if not isinstance(part, list) or len(part) >= 6]
        if not polygons:
            raise ValueError("no polygon part has 3 or more points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False notice, not ours to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)
