"""Run a detector on image files: ``python -m pisa.predict CONFIG CHECKPOINT IMAGES...|DIR``.

Writes ``predictions.json`` (COCO results: ``image_id``, ``file_name``, ``category_id``, ``bbox`` as
``[x, y, w, h]``, ``score``) and, per image, a copy with the detections drawn, into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from pisa.cli import UsageError, reported_errors
from pisa.config import add_config_args, load_config
from pisa.data import transforms_from_config
from pisa.data.batching import pad_images
from pisa.data.classes import ClassInfo, checkpoint_classes
from pisa.data.errors import ImageDecodeError
from pisa.data.transforms import to_rgb_image
from pisa.engine.checkpoint import read_checkpoint_meta
from pisa.engine.evaluator import encode_masks
from pisa.eval import build_model_for_checkpoint, load_weights_strict

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# One colour per class (label modulo the palette length), distinct enough to tell classes apart.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
           (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128)]


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Expand directories (sorted, non-recursive) and check every file exists."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise UsageError(f"input {item} is neither an image file nor a directory")
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {list(inputs)}")
    return files


def class_info(classes: ClassInfo | None, num_classes: int) -> tuple[list[str], list[int]]:
    """Class names and COCO category ids stored with the checkpoint, else generic ones."""
    names = list(classes.names) if classes else []
    cat_ids = list(classes.cat_ids) if classes else []
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    if len(cat_ids) != num_classes:
        cat_ids = list(range(1, num_classes + 1))
    return names, cat_ids


def load_image(path: Path, transforms) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read ``path`` as RGB, upright by its EXIF orientation as a viewer shows it, and apply the test
    pipeline; the target carries only metas. Boxes are in that upright image's pixels."""
    try:
        with Image.open(path) as img:
            img = to_rgb_image(ImageOps.exif_transpose(img))
            img.load()
    except (OSError, UnidentifiedImageError) as err:
        raise ImageDecodeError(f"cannot read image {path}: {err}; remove it from the inputs or re-save it",
                               path=str(path)) from None
    empty = torch.zeros((0, 4), dtype=torch.float32)
    target = {"boxes": empty, "labels": torch.zeros((0,), dtype=torch.int64), "ignore_boxes": empty,
              "ori_shape": (img.height, img.width), "img_shape": (img.height, img.width),
              "scale_factor": (1.0, 1.0), "flip": False}
    return transforms(img, target)


def class_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


MASK_OPACITY = 0.5  # share of the class colour in a mask's pixels; the image shows through the rest


def draw_masks(img: Image.Image, det: dict[str, torch.Tensor], opacity: float = MASK_OPACITY) -> Image.Image:
    """An RGB copy of ``img`` with each detection's mask filled in its class colour (``class_colour``,
    as its box), semi-transparent: ``pixel = (1 - opacity) * pixel + opacity * colour``.

    ``det["masks"]`` is ``(D, H, W)`` bool (or 0/1) at the image's size, ``det["labels"]`` ``(D,)``,
    ``det["scores"]`` ``(D,)``. Masks are blended in increasing score order, so where masks overlap
    the highest-scoring one is blended last and shows most.
    """
    canvas = to_rgb_image(img)
    masks = det["masks"].cpu()
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (canvas.height, canvas.width):
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not fit an image of "
                         f"{canvas.height}x{canvas.width} (expected (D, {canvas.height}, {canvas.width}))")
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(canvas.height, canvas.width, 3).float()
    for i in torch.argsort(det["scores"].cpu(), stable=True).tolist():
        colour = torch.tensor(class_colour(int(det["labels"][i])), dtype=torch.float32)
        inside = masks[i] != 0
        pixels[inside] = (1 - opacity) * pixels[inside] + opacity * colour
    data = pixels.round().clamp(0, 255).to(torch.uint8).numpy().tobytes()
    return Image.frombytes("RGB", (canvas.width, canvas.height), data)


def draw_detections(img: Image.Image, det: dict[str, torch.Tensor], names: Sequence[str]) -> Image.Image:
    """An RGB copy of ``img`` with each detection's box in its class colour and a filled label
    ("name score") on the box's top edge, kept inside the image; higher scores are drawn last, so
    they stay on top."""
    canvas = to_rgb_image(img).copy()
    if "masks" in det:
        canvas = draw_masks(canvas, det)
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in torch.argsort(det["scores"]).tolist():
        label, score = int(det["labels"][i]), float(det["scores"][i])
        x1, y1, x2, y2 = det["boxes"][i].tolist()
        colour = class_colour(label)
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        text = f"{names[label]} {score:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 2
        ty = y1 - h if y1 >= h else y1  # above the box, or inside it at the image's top edge
        tx = max(0, min(x1, canvas.width - 1 - w))  # shifted left rather than cut at the right edge
        pen.rectangle((tx, ty, tx + w, ty + h), fill=colour)
        # Dark text on light colours, white on dark ones (Rec. 601 luma).
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        pen.text((tx + 2 - left, ty + 1 - top), text, fill=(0, 0, 0) if luma > 140 else (255, 255, 255), font=font)
    return canvas


def draw(path: Path, det: dict[str, torch.Tensor], names: Sequence[str], out: Path) -> None:
    """Save a copy of ``path`` with boxes, class names and scores drawn."""
    with Image.open(path) as img:
        draw_detections(ImageOps.exif_transpose(img), det, names).save(out)


def to_coco(image_id: int, path: Path, det: dict[str, torch.Tensor], cat_ids: Sequence[int]) -> list[dict]:
    """COCO result rows; with ``masks`` each row also holds its ``segmentation`` as compressed RLE."""
    rows = []
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        x1, y1, x2, y2 = box
        rows.append({"image_id": image_id, "file_name": path.name, "category_id": int(cat_ids[label]),
                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                     "score": round(score, 4)})
    if det.get("masks") is not None:
        for row, rle in zip(rows, encode_masks(det["masks"], len(rows))):
            row["segmentation"] = rle
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pisa.predict", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", nargs="+", help="image files and/or directories of images")
    parser.add_argument("--out", default="predictions", help="output directory (default: predictions)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="least score to keep (default 0.3)")
    parser.add_argument("--no-draw", action="store_true", help="only write the results JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of the checkpoint (only for files you trust)")
    add_config_args(parser)
    return parser.parse_args(argv)


@torch.no_grad()
def predict(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(args.config, args.overrides, check_paths=("load_from",))  # no dataset is read
    files = find_images(args.inputs)
    classes = checkpoint_classes(read_checkpoint_meta(args.checkpoint, args.trust_checkpoint), args.checkpoint,
                                 cfg["model"])
    model = build_model_for_checkpoint(cfg)
    for warning in load_weights_strict(model, args.checkpoint, cfg, args.trust_checkpoint):
        print(warning, file=sys.stderr)
    model.to(args.device).eval()
    names, cat_ids = class_info(classes, cfg["model"]["num_classes"])
    transforms = transforms_from_config(cfg["data"], train=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for image_id, path in enumerate(files):
        image, target = load_image(path, transforms)
        images = pad_images([image], cfg["data"]["pad_divisor"]).to(args.device)
        det = {k: v.cpu() for k, v in model(images, [target])[0].items()}
        keep = det["scores"] >= args.score_thr
        det = {k: v[keep] for k, v in det.items()}
        results += to_coco(image_id, path, det, cat_ids)
        if not args.no_draw:
            draw(path, det, names, out / f"{path.stem}_pred.jpg")
    tmp = out / "predictions.json.tmp"
    tmp.write_text(json.dumps(results))
    os.replace(tmp, out / "predictions.json")
    print(f"{len(results)} detections on {len(files)} images -> {out / 'predictions.json'}")
    return results


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with reported_errors(lambda: "use fewer or smaller images, or lower data.test_transforms.scales"):
        return predict(args)


if __name__ == "__main__":
    main()
