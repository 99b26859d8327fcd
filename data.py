"""Data: mixup (paper Sec. 3.1, bag of freebies), random input shapes (Sec. 3.4) and the released
augmentation, over COCO-format sets or a built-in synthetic one.

One box layout from reading through augmentation and mixup: float32 rows (N, 6) [x1, y1, x2, y2,
class, mix] in pixels (COCO's continuous x + w; mix is 1 but in mixup). collate converts them once,
to what the loss reads: (N, 6) [class, cx, cy, w, h, mix] (loss_targets).

    CocoDetection(image_dir, ann_file, include_crowd=False, require_annotations=True): .cat_ids
        (class k <-> cat_ids[k]), .class_names, .ids, .coco (pycocotools, over the boxes kept),
        .skipped; load_image(i) -> (uint8 (H, W, 3) RGB, image id); load_targets(i) -> rows
    make_synthetic(root=None, n_train=1024, n_val=64, image_size=192, seed=0) -> dict of paths
    TrainDataset(data, size=608, seed=0, mixup=True, augment=True, min_size=6.0)[i] -> (uint8
        (3, size, size), rows in input pixels); set .set_epoch(e) and .mixup before an epoch's
        DataLoader iterator starts (its workers copy the set; no persistent_workers)
    collate(batch) -> (float (B, 3, S, S) normalised, B x (N_i, 6) loss targets)
    random_size(seed, iteration) -> one of 320, 352, ..., 608, redrawn every 10 iterations
    resize_batch(images, targets, size); normalize(image, size): evaluation's plain resize

Per sample, as released (docs/released-code.md, augmentation): mixup; colour (brightness,
contrast, hue, saturation); zoom out; SSD crop; flip; small affine; resize to the square. Sample i
of epoch e draws from Generator(SeedSequence([seed, e, i])), whatever the worker. All draws come
first, from boxes and image sizes alone; then the pixels: a JPEG decoded at the coarsest DCT
scale that still covers the output, mixup and colour only where the crop keeps, one warp by the
product of the geometric steps' matrices. Departures: the affine shift takes x from the width (the
release: the height); saturation computed in RGB; nearest or bilinear resampling (the release:
one of five OpenCV methods); crowd boxes left out unless include_crowd; targets not padded to 50
rows; samples made at the largest size, the batch resized to the drawn one (resize_batch).
`python data.py` draws augmented samples; `python data.py --check --images DIR --ann FILE`
checks a data set as training reads it. Bad input: README.md, "Data: formats and bad input".
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageDraw, ImageOps
from pycocotools.coco import COCO

MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB
STD = (0.229, 0.224, 0.225)
FILL = tuple(round(255 * m) for m in MEAN)  # (124, 116, 104): zoom-out, affine border (released)
SIZES = tuple(range(320, 609, 32))  # Sec. 3.4 random shapes {320, 352, ..., 608}


# ----------------------------------------------------------------------------------------------
# Plumbing: errors, and reading COCO-format files, checked entry by entry before pycocotools sees
# them (it trusts every key and number: a bare KeyError, or a silently wrong AP)

class UserError(Exception):
    """A mistake in what the user gave (data, files, flags), not in the code: the scripts print
    its message as one line and exit with status 2 (ASFF_DEBUG=1 shows the traceback too)."""


class DataError(UserError, ValueError):
    """A problem with the data; the message names the file and the entry."""


def exit_on_user_error(main, argv: list[str] | None = None):
    """Run a script's main(argv); a UserError ends it with one line on stderr and status 2."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("ASFF_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


_number = lambda v: type(v) in (int, float) and abs(v) < 1e30  # finite (NaN fails); true is none
INTEGER = (lambda v: type(v) is int and -(2**63) <= v < 2**63, "an integer")  # numpy's int64
TEXT = (lambda v: type(v) is str and v.strip() != "", "a non-empty string")
SIDE = (lambda v: type(v) in (int, float) and 0 < v < 2**31 and v == int(v), "a whole number of pixels > 0")
FIELDS = {  # the keys each entry of each list needs: (test, what the value must be)
    "images": {"id": INTEGER, "file_name": TEXT, "width": SIDE, "height": SIDE},
    "categories": {"id": INTEGER, "name": TEXT},
    "annotations": {"id": INTEGER, "image_id": INTEGER, "category_id": INTEGER, "bbox": (
        lambda v: type(v) is list and len(v) == 4 and all(map(_number, v)), "4 finite numbers [x, y, w, h]")}}
OPTIONAL = {"iscrowd": (lambda v: type(v) in (int, float) and v in (0, 1), "0 or 1"),  # annotations'
            "area": (_number, "a finite number")}  # and >= 0 if the box is kept
TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
         bool: "true/false", type(None): "null"}
SKIPS = ("zero or negative width/height, skipped", "outside the image, skipped",
         "partly outside the image, clipped")


def _shown(value) -> str:
    """A value as the file has it (null, true, "640", NaN), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except RecursionError:  # nested deeper than json.dumps goes: its type only
        text = TYPES[type(value)]
    return text if len(text) <= 60 else text[:56] + " ..."


def _where(ann_file: str, key: str, position: int, entry) -> str:
    """'file: annotations[12] (id 7)', with the id when it is a usable one."""
    known = type(entry) is dict and INTEGER[0](entry.get("id"))
    return f"{ann_file}: {key}[{position}]" + (f" (id {entry['id']})" if known else "")


def _check_entries(ann_file: str, key: str, entries: list) -> dict:
    """Each entry an object with its FIELDS (OPTIONAL ones right where given), ids unique and
    category names too -> {id: entry}."""
    needed, seen = FIELDS[key], {"id": {}, "name": {}} if key == "categories" else {"id": {}}
    tests, names = needed | (OPTIONAL if key == "annotations" else {}), ", ".join(needed)
    for position, entry in enumerate(entries):
        where = _where(ann_file, key, position, entry)
        if type(entry) is not dict:
            raise DataError(f"{where} is {_shown(entry)}, not an object with {names}")
        for field, (test, wanted) in tests.items():
            if field in needed and field not in entry:
                raise DataError(f"{where}: '{field}' is missing (each entry of '{key}' needs {names})")
            if field in entry and not test(entry[field]):
                raise DataError(f"{where}: '{field}' is {_shown(entry[field])}, not {wanted}")
        for field, first in seen.items():
            if (k := first.setdefault(entry[field], position)) != position:
                raise DataError(f"{where}: duplicate {field} {_shown(entry[field])}, also {key}[{k}]'s")
    return {entry["id"]: entry for entry in entries}


def _read_json(ann_file: str, require_annotations: bool) -> tuple[dict, dict]:
    """A COCO-format file, checked but for what annotations refer to -> (data, {id: image})."""
    try:
        with open(ann_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is harmless
            text = f.read()
        data = json.loads(text) if text.strip() else None
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: not UTF-8 text (byte {e.start}); COCO files are UTF-8 JSON") from e
    except OSError as e:
        raise DataError(f"{ann_file}: cannot read the annotation file ({e.strerror or e})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from e
    if not text.strip():
        raise DataError(f"{ann_file}: the file is empty; expected COCO-format JSON")
    if type(data) is not dict:
        raise DataError(f"{ann_file}: the top level is {TYPES[type(data)]}, not an object with 'images', "
                        "'annotations' and 'categories' lists; is this a COCO-format annotation file?")
    optional = not require_annotations and "annotations" not in data  # COCO test-dev's has none
    for key in ("images", "categories") + (() if optional else ("annotations",)):
        if type(data.get(key)) is not list:
            found = f" ('{key}' is {_shown(data[key])})" if key in data else ""
            raise DataError(f"{ann_file}: no '{key}' list{found}; is this a COCO-format annotation file?")
        if not data[key] and key != "annotations":  # no objects at all is valid, if useless
            raise DataError(f"{ann_file}: the '{key}' list is empty")
    return data, {key: _check_entries(ann_file, key, data.get(key, [])) for key in FIELDS}["images"]


def _kept_boxes(data: dict, images: dict, cat_to_class: dict, ann_file: str, include_crowd: bool):
    """(training rows per image, the annotations COCOeval scores against, {problem: annotation ids}).
    A box of zero or negative size or wholly outside its image is skipped for both, one partly
    outside clipped for both; crowd boxes are scored (COCO's ignore regions), trained on if asked."""
    rows, kept, problems = {image_id: [] for image_id in images}, [], {p: [] for p in SKIPS}
    for position, ann in enumerate(data.get("annotations", [])):
        where = _where(ann_file, "annotations", position, ann)
        for field, known, key in (("image_id", images, "images"),
                                  ("category_id", cat_to_class, "categories")):
            if ann[field] not in known:
                raise DataError(f"{where}: {field} {ann[field]} is not in '{key}'")
        (x, y, w, h), image = ann["bbox"], images[ann["image_id"]]
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, image["width"]), min(y + h, image["height"])
        problem = (SKIPS[0] if w <= 0 or h <= 0 else SKIPS[1] if x2 <= x1 or y2 <= y1 else
                   SKIPS[2] if (x1, y1, x2, y2) != (x, y, x + w, y + h) else None)
        problems.get(problem, []).append(ann["id"])
        if problem in SKIPS[:2]:
            continue
        box = [x1, y1, x2 - x1, y2 - y1] if problem else ann["bbox"]
        area, crowd = ann.get("area", box[2] * box[3]), int(ann.get("iscrowd", 0))
        if area < 0:  # COCOeval would silently ignore the box (outside every area range)
            raise DataError(f"{where}: 'area' is {_shown(area)}, not >= 0")
        kept.append({"id": ann["id"], "image_id": ann["image_id"], "bbox": box, "area": area,
                     "category_id": ann["category_id"], "iscrowd": crowd})
        if include_crowd or not crowd:
            rows[ann["image_id"]].append((x1, y1, x2, y2, cat_to_class[ann["category_id"]], 1))
    for problem, ids in problems.items():
        if ids:
            warnings.warn(f"{ann_file}: {len(ids)} box(es) {problem}; annotation ids {ids[:5]}"
                          + (" ..." if len(ids) > 5 else ""), stacklevel=3)
    return [rows[image["id"]] for image in data["images"]], kept, problems


def _decode(path: str, reduce: int = 1) -> tuple[Image.Image, tuple[int, int]]:
    """(8-bit RGB at 1/reduce of the size, upright by the EXIF orientation as OpenCV's imread in the
    release; the full upright size). A JPEG decodes at that size directly (DCT scaling, draft),
    anything else is averaged over reduce x reduce blocks. DataError if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            W, H = image.size
            full = (H, W) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (W, H)
            if reduce > 1:
                image.draft(image.mode, (max(1, W // reduce), max(1, H // reduce)))
            image.load()  # decode now, while the file is open
            drafted = image.size != (W, H)
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode.startswith("I"):  # 16-bit grayscale: convert("RGB") would clip at 255
                image = Image.fromarray((np.asarray(image).clip(0, 65535) / 257).round().astype(np.uint8))
            image = image if image.mode == "RGB" else image.convert("RGB")  # L, P, RGBA (alpha dropped), CMYK
            return (image.reduce(reduce) if reduce > 1 and not drafted else image), full
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e


def open_rgb(path: str) -> Image.Image:
    """Decode an image file as 8-bit RGB, upright by its EXIF orientation; DataError if not."""
    return _decode(path)[0]


class CocoDetection:
    """A COCO-format detection set (COCO itself or custom), read once and checked at start-up."""

    def __init__(self, image_dir: str, ann_file: str, include_crowd: bool = False,
                 require_annotations: bool = True):
        data, images = _read_json(ann_file, require_annotations)
        self.ann_file = str(ann_file)
        self.cat_ids = sorted(c["id"] for c in data["categories"])  # class k <-> cat_ids[k]
        self.cat_to_class = {cat_id: k for k, cat_id in enumerate(self.cat_ids)}
        self.class_names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        self.ids = [image["id"] for image in data["images"]]
        rows, kept, self.skipped = _kept_boxes(data, images, self.cat_to_class, ann_file, include_crowd)
        self.coco = COCO()  # COCOeval scores what was kept: the file's boxes less the skipped, clipped
        self.coco.dataset = {k: v for k, v in data.items() if k != "annotations"} | (
            {"annotations": kept} if "annotations" in data else {})
        with contextlib.redirect_stdout(io.StringIO()):  # without pycocotools' progress prints
            self.coco.createIndex()
        # numpy arrays, not Python objects: forked workers do not copy them page by page (refcounts)
        self._files = np.array([os.path.join(image_dir, im["file_name"]) for im in data["images"]])
        self._sizes = np.array([(im["width"], im["height"]) for im in data["images"]], np.int64)
        self._first = np.cumsum([0] + [len(r) for r in rows])  # image i: rows first[i]:first[i+1]
        self._rows = np.array([row for r in rows for row in r], np.float32).reshape(-1, 6)
        if missing := [i for i, path in enumerate(self._files) if not os.path.isfile(path)]:
            raise DataError(f"{self.ann_file}: {len(missing)} of {len(self)} image files are missing under "
                            f"{image_dir}, e.g. {self._files[missing[0]]} (image id {self.ids[missing[0]]}); "
                            "wrong folder?")

    def __len__(self) -> int:
        return len(self.ids)

    def open(self, index: int, reduce: int = 1) -> Image.Image:
        """The image as PIL RGB at 1/reduce of its size (ceil); DataError naming the file if it
        cannot be decoded or is not the size the annotation file gives."""
        image, size = _decode(str(self._files[index]), reduce)
        if size != tuple(self._sizes[index]):
            raise DataError(f"{self._files[index]}: decoded size {size[0]}x{size[1]} (after EXIF rotation) "
                            f"is not the {self._sizes[index, 0]}x{self._sizes[index, 1]} of {self.ann_file}")
        return image

    def load_image(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 (H, W, 3) RGB, image id)."""
        return np.array(self.open(index)), self.ids[index]  # a writable copy, for torch

    def load_targets(self, index: int) -> np.ndarray:
        """Rows (N, 6) [x1, y1, x2, y2, class, 1] in image pixels (crowd ones only if asked)."""
        return self._rows[self._first[index]:self._first[index + 1]].copy()


# ----------------------------------------------------------------------------------------------
# The demo's data: coloured shapes of 8 px to 60% of the image on textured backgrounds, a few per
# image, so that one image holds objects of very different scales (Sec. 1's scale conflict),
# drawn large to small so that small ones partly hide large ones.

SYNTHETIC_CLASSES = (  # (name, shape, RGB): distinct in shape and in colour, so it learns fast
    ("red circle", "circle", (220, 40, 40)),
    ("green square", "square", (40, 170, 60)),
    ("blue triangle", "triangle", (40, 80, 220)),
    ("yellow diamond", "diamond", (230, 200, 30)),
    ("magenta cross", "cross", (200, 40, 200)),
)
SYNTHETIC_VERSION = 1  # part of the cache key: bump when the drawing changes


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted background (uint8 (H, W, 3)): a smooth colour field, stripes or checks, noise."""
    coarse = rng.uniform(50, 200, (rng.integers(2, 6), rng.integers(2, 6), 1))
    coarse = coarse + rng.uniform(-20, 20, coarse.shape[:2] + (3,))  # a weak tint per blob
    field = Image.fromarray(coarse.clip(0, 255).astype(np.uint8))
    field = np.asarray(field.resize((width, height), Image.BILINEAR), np.float32)
    y, x = np.mgrid[:height, :width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    if rng.random() < 0.5:  # stripes
        pattern = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    else:  # checks
        pattern = np.sign(np.sin(np.pi * x / period) * np.sin(np.pi * y / period))
    texture = rng.uniform(5, 25) * pattern[..., None] + rng.normal(0, 6, (height, width, 1))
    return (field + texture).clip(0, 255).astype(np.uint8)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    """Fill `shape` so that its pixels span exactly the columns x..x+w-1, rows y..y+h-1."""
    x, y, w, h = box
    r, b = x + w - 1, y + h - 1  # last column and row (PIL's drawing bounds are inclusive)
    mx, my = x + (w - 1) / 2, y + (h - 1) / 2
    if shape == "circle":
        draw.ellipse((x, y, r, b), fill=colour)
    elif shape == "square":
        draw.rectangle((x, y, r, b), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, b), (r, b), (mx, y)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(mx, y), (r, my), (mx, b), (x, my)], fill=colour)
    elif shape == "cross":  # a plus sign, arms one third thick
        tw, th = max(2, round(w / 3)), max(2, round(h / 3))
        draw.rectangle((x + (w - tw) // 2, y, x + (w - tw) // 2 + tw - 1, b), fill=colour)
        draw.rectangle((x, y + (h - th) // 2, r, y + (h - th) // 2 + th - 1), fill=colour)


def _place(rng, w, h, width, height, placed, max_hidden=0.35):
    """A position (x, y) where a w x h box hides at most `max_hidden` of each earlier box
    (placed: (K, 4) corners), or None after 20 tries."""
    for _ in range(20):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        lt, rb = np.maximum(placed[:, :2], (x, y)), np.minimum(placed[:, 2:], (x + w, y + h))
        hidden = np.prod(np.clip(rb - lt, 0, None), 1)  # (K,) overlap areas
        if (hidden <= max_hidden * np.prod(placed[:, 2:] - placed[:, :2], 1)).all():
            return x, y
    return None


def draw_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 6):
    """One synthetic image (PIL RGB) and its objects [(class, [x, y, w, h]), ...]."""
    image = Image.fromarray(_texture(rng, width, height))
    draw = ImageDraw.Draw(image)
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, max_objects + 1))  # 5% empty images
    # sides from 8 px to 60% of the image, uniform in sqrt(side): about a third are COCO-small
    # (log-uniform would make half of them small, which a tiny CPU-trained model finds hard)
    sides = rng.uniform(np.sqrt(8), np.sqrt(0.6 * min(width, height)), n) ** 2
    objects, placed = [], []
    for side in sorted(sides, reverse=True):  # large first, so small ones are not hidden
        aspect = np.exp(rng.uniform(-0.3, 0.3))
        w, h = int(np.clip(round(side * aspect), 8, width)), int(np.clip(round(side / aspect), 8, height))
        cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
        xy = _place(rng, w, h, width, height, np.array(placed, np.int64).reshape(-1, 4))
        if xy is None:
            continue
        colour = np.clip(np.add(SYNTHETIC_CLASSES[cls][2], rng.integers(-20, 21, 3)), 0, 255)
        draw_shape(draw, SYNTHETIC_CLASSES[cls][1], (*xy, w, h), tuple(colour.tolist()))
        placed.append((xy[0], xy[1], xy[0] + w, xy[1] + h))
        objects.append((cls, [*xy, w, h]))
    return image, objects


# ----------------------------------------------------------------------------------------------
# Plumbing: writing and caching the synthetic set

def _write_split(folder: Path, split: str, n: int, width: int, height: int, seed: int, stream: int,
                 fmt: str = "png", max_objects: int = 6) -> None:
    """folder/split/*.png and folder/split.json (COCO format); image i from the stream [seed, stream, i]."""
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        image, objects = draw_scene(np.random.default_rng([seed, stream, i]), width, height, max_objects)
        image.save(folder / split / f"{i:06d}.{fmt}", **({"quality": 90} if fmt == "jpg" else
                                                         {"compress_level": 1}))
        images.append({"id": i + 1, "file_name": f"{i:06d}.{fmt}", "width": width, "height": height})
        annotations += [{"id": len(annotations) + k + 1, "image_id": i + 1, "bbox": [x, y, w, h],
                         "category_id": cls + 1, "area": w * h, "iscrowd": 0}
                        for k, (cls, (x, y, w, h)) in enumerate(objects)]
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, (name, _, _) in enumerate(SYNTHETIC_CLASSES)]
    data = {"info": {"description": "asff synthetic shapes", "seed": seed}, "images": images,
            "annotations": annotations, "categories": categories}
    (folder / f"{split}.json").write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def make_synthetic(root: str | None = None, n_train: int = 1024, n_val: int = 64,
                   image_size: int = 192, seed: int = 0) -> dict:
    """Generate the synthetic set once into root/synthetic-<hash of the arguments> (root default:
    $ASFF_CACHE or ~/.cache/asff) and return its paths. Same arguments -> identical files."""
    params = {"version": SYNTHETIC_VERSION, "n_train": n_train, "n_val": n_val, "image_size": image_size,
              "seed": seed}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(root or os.environ.get("ASFF_CACHE") or Path.home() / ".cache" / "asff")
    folder = root / f"synthetic-{digest}"
    if not folder.is_dir():  # written under a temporary name, then renamed: complete or absent
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
        _write_split(tmp, "train", n_train, image_size, image_size, seed, stream=0)
        _write_split(tmp, "val", n_val, image_size, image_size, seed, stream=1)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (a DDP rank) finished first: its files are the same
            shutil.rmtree(tmp)
    return {"root": str(folder), "train_images": str(folder / "train"),
            "train_json": str(folder / "train.json"), "val_images": str(folder / "val"),
            "val_json": str(folder / "val.json")}


# ----------------------------------------------------------------------------------------------
# Augmentation, as released (docs/released-code.md, augmentation): colour

def draw_colour(rng: np.random.Generator) -> tuple[float, float, int, float]:
    """The released colour draws, each step with p = 0.5 -> color_distort's arguments."""
    brightness = rng.uniform(-32, 32) if rng.random() < 0.5 else 0.0
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    hue = int(rng.integers(-18, 19)) if rng.random() < 0.5 else 0
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    return brightness, contrast, hue, saturation


def color_distort(image: Image.Image, brightness: float = 0.0, contrast: float = 1.0, hue: int = 0,
                  saturation: float = 1.0) -> Image.Image:
    """The released colour steps in order: x -> clip(clip(x + brightness) * contrast) (one look-up
    table); HSV hue + hue; HSV saturation * saturation."""
    if brightness != 0 or contrast != 1:
        lut = np.clip(np.clip(np.arange(256) + brightness, 0, 255) * contrast, 0, 255)
        image = image.point(np.tile(lut.round().astype(np.uint8), 3).tolist())
    image = rotate_hue(image, hue) if hue != 0 else image
    return saturate(image, saturation) if saturation != 1 else image


# PIL's 8-bit hue H makes a full turn in 255 steps, 6 sextants. Channel c holds the share
# g_c(H) = clip(2 - d, 0, 1) of the chroma V - min, d the distance in sextants from the channel's
# own hue (R 0, G 2, B 4): 1 where it is the largest channel, 0 where the smallest.
_SEXTANTS = np.arange(256) * 6 / 255
SHORTFALL = [(1 - np.clip(2 - np.abs((_SEXTANTS - centre + 3) % 6 - 3), 0, 1)).astype(np.float32)
             for centre in (0, 2, 4)]  # 1 - g_c(H) for R, G, B


def rotate_hue(image: Image.Image, hue: int) -> Image.Image:
    """HSV hue + hue (OpenCV units: 180 is a full turn), saturation and value kept. PIL converts to
    HSV; back to RGB by c = V - V S (1 - g_c(H)): PIL's HSV -> RGB values (every 24-bit colour
    checked) at half its cost."""
    hsv = np.asarray(image.convert("HSV"))  # (H, W, 3) uint8
    h = hsv[..., 0] + np.uint8(round(hue * 256 / 180) % 256)  # (H, W), wraps at 256 (uint8)
    v = hsv[..., 2].astype(np.float32)  # (H, W)
    chroma = v * hsv[..., 1] * np.float32(1 / 255)  # (H, W) V S = max - min
    rgb = np.empty_like(hsv)  # (H, W, 3)
    for c in range(3):
        rgb[..., c] = np.rint(v - chroma * SHORTFALL[c][h])
    return Image.fromarray(rgb)


def saturate(image: Image.Image, s: float) -> Image.Image:
    """HSV saturation * s, hue and value kept, in RGB: S = (V - min) / V with V = max(R, G, B), so
    c -> V - s (V - c) (no second HSV round trip); where s S > 1 channels clip at 0 (HSV: S at 1)."""
    r, g, b = image.split()
    v = ImageChops.lighter(ImageChops.lighter(r, g), b)
    return Image.blend(Image.merge("RGB", (v, v, v)), image, s)  # v + s (c - v)


# ----------------------------------------------------------------------------------------------
# Augmentation: the geometric steps. Each returns its 3x3 matrix (old pixels -> new pixels), the
# moved rows and the new canvas size; only the product of the matrices touches the pixels.

def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _move_boxes(T: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows with boxes replaced by the enclosing boxes of their four corners mapped by T."""
    x1, y1, x2, y2 = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    corners = np.stack([np.stack([x, y, np.ones_like(x)]) for x, y in
                        ((x1, y1), (x2, y1), (x1, y2), (x2, y2))])  # (4, 3, N)
    x, y = (T @ corners)[:, 0], (T @ corners)[:, 1]  # (4, N) each
    out = rows.copy()
    out[:, :4] = np.stack([x.min(0), y.min(0), x.max(0), y.max(0)], 1)
    return out


def expand(rng, rows, wh):
    """Zoom out (SSD): put the image on a canvas 1-4x as large filled with the mean colour."""
    W, H = wh
    s = rng.uniform(1, 4)
    r = math.sqrt(rng.uniform(max(0.5, 1 / s**2), min(2, s**2)))  # keeps s*r >= 1 and s/r >= 1
    w, h = max(W, int(s * r * W)), max(H, int(s / r * H))
    T = _translation(rng.integers(0, w - W + 1), rng.integers(0, h - H + 1))
    return T, _move_boxes(T, rows), (w, h)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(R, 4) x (N, 4) corner boxes [x1, y1, x2, y2] -> (R, N) IoU of every pair."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)  # (R, N)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    return inter / (area_a[:, None] + area_b[None] - inter)


CROP_MIN_IOU = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)  # SSD modes; None = no crop


def ssd_crop(rng, rows, wh, tries=50):
    """SSD random crop: a window of 0.3-1 of each side whose IoU with every box is at least the
    drawn mode's minimum; boxes whose centre falls inside are kept and clipped."""
    W, H = wh
    identity = (np.eye(3), rows, wh)
    for _ in range(50 if len(rows) else 0):  # the release retries forever; 50 modes fail seldom
        min_iou = CROP_MIN_IOU[rng.integers(len(CROP_MIN_IOU))]
        if min_iou is None:
            return identity
        scale = rng.uniform(0.3, 1, tries)  # the release's 50 windows, drawn at once
        ratio = np.sqrt(rng.uniform(np.maximum(0.5, scale**2), np.minimum(2, 1 / scale**2)))
        w, h = np.maximum(1, (scale * ratio * W).astype(int)), np.maximum(1, (scale / ratio * H).astype(int))
        left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        rois = np.stack([left, top, left + w, top + h], 1).astype(np.float64)  # (tries, 4)
        centres = (rows[:, :2] + rows[:, 2:4]) / 2  # (N, 2)
        inside = ((rois[:, None, :2] < centres) & (centres < rois[:, None, 2:])).all(2)  # (R, N)
        ok = (pairwise_iou(rois, rows[:, :4]).min(1) >= min_iou) & inside.any(1)
        if ok.any():
            k = int(np.argmax(ok))
            kept = rows[inside[k]].copy()
            kept[:, :4] = np.clip(kept[:, :4], rois[k, [0, 1, 0, 1]], rois[k, [2, 3, 2, 3]])
            T = _translation(-rois[k, 0], -rois[k, 1])
            return T, _move_boxes(T, kept), (int(w[k]), int(h[k]))
    return identity


def hflip(rng, rows, wh):
    """Mirror left-right: x -> W - x."""
    T = np.array([[-1, 0, wh[0]], [0, 1, 0], [0, 0, 1]], np.float64)
    return T, _move_boxes(T, rows), wh


def random_affine(rng, rows, wh, degrees=10.0, translate=0.1, scale=0.1, shear=2.0):
    """Rotation about the centre with scale, then translation, then shear: A = S @ T @ R, on a
    canvas of the same size. Boxes: enclosing box of the moved corners, shrunk by
    sqrt(max(|sin a|, |cos a|)) about its centre (the release's correction), clipped."""
    W, H = wh
    a, s = math.radians(rng.uniform(-degrees, degrees)), rng.uniform(1 - scale, 1 + scale)
    alpha, beta = s * math.cos(a), s * math.sin(a)  # OpenCV's getRotationMatrix2D(centre, a, s)
    R = np.array([[alpha, beta, (1 - alpha) * W / 2 - beta * H / 2],
                  [-beta, alpha, beta * W / 2 + (1 - alpha) * H / 2], [0, 0, 1]])
    # x shifts by a fraction of the width, y of the height (the release swaps them)
    T = _translation(rng.uniform(-translate, translate) * W, rng.uniform(-translate, translate) * H)
    sx, sy = (math.tan(math.radians(rng.uniform(-shear, shear))) for _ in range(2))
    A = np.array([[1, sx, 0], [sy, 1, 0], [0, 0, 1]]) @ T @ R
    out = _move_boxes(A, rows)
    centre, half = (out[:, :2] + out[:, 2:4]) / 2, (out[:, 2:4] - out[:, :2]) / 2
    half *= math.sqrt(max(abs(math.sin(a)), abs(math.cos(a))))
    out[:, :4] = np.clip(np.concatenate([centre - half, centre + half], 1), 0, [W, H, W, H])
    return A, out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])], wh


def resize_matrix(wh, size: int) -> np.ndarray:
    """Plain (aspect-changing) resize of a W x H image to size x size."""
    return np.diag([size / wh[0], size / wh[1], 1.0])


def geometry(rng, rows, wh, size):
    """The released geometric steps as one matrix M (source pixels -> output pixels), the moved
    rows, and the source window that the crop keeps: the affine may bring the canvas border into
    view, and there the release shows the fill colour, not the source cut away by the crop."""
    M = np.eye(3)
    for step, p in ((expand, 0.5), (ssd_crop, 1.0), (hflip, 0.5), (random_affine, 0.5)):
        if step is random_affine:  # so far M only shifts and mirrors: the canvas is a rectangle
            window = _move_boxes(np.linalg.inv(M), np.array([[0, 0, *wh, 0, 0]]))[0, :4]
        if rng.random() < p:
            T, rows, wh = step(rng, rows, wh)
            M = T @ M
    T = resize_matrix(wh, size)
    return T @ M, _move_boxes(T, rows), window


# ----------------------------------------------------------------------------------------------
# Augmentation: every draw of a sample first (a Plan, from its boxes and image size), then pixels

class Plan(NamedTuple):
    colour: tuple  # color_distort's (brightness, contrast, hue, saturation)
    M: np.ndarray  # (3, 3) source pixels -> output pixels: the product of the geometric steps
    window: tuple  # (x1, y1, x2, y2) of the source that the crop keeps; the rest: the mean colour
    resample: int  # Image.NEAREST or Image.BILINEAR
    rows: np.ndarray  # (N, 6) in output pixels


NO_COLOUR = (0.0, 1.0, 0, 1.0)  # color_distort's arguments that change nothing


def plain_resize(rows: np.ndarray, wh, size: int) -> Plan:
    """No augmentation: the image resized to size x size, bilinear, with all its boxes."""
    M = resize_matrix(wh, size)
    return Plan(NO_COLOUR, M, (0, 0, *wh), Image.BILINEAR, _move_boxes(M, rows))


def draw_augmentation(rng: np.random.Generator, rows: np.ndarray, wh, size: int, min_size=6.0) -> Plan:
    """The released draws for a W x H image: colour, the geometric steps, the resampling; boxes
    whose shorter side is not above min_size dropped; if none is left, plain_resize (as released)."""
    colour = draw_colour(rng)
    M, out, window = geometry(rng, rows, wh, size)
    out = out[np.minimum(out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]) > min_size]
    resample = (Image.NEAREST, Image.BILINEAR)[rng.integers(2)]
    if len(rows) and not len(out):
        return plain_resize(rows, wh, size)
    return Plan(colour, M, tuple(window), resample, out)


def reduction(M: np.ndarray) -> int:
    """The coarsest decoding scale 1/k (k = 1, 2, 4, 8) with a source pixel per output pixel still."""
    stretch = np.linalg.norm(M[:2, :2], 2)  # the most output pixels per source pixel, any direction
    return int(2 ** np.clip(np.floor(-np.log2(stretch)), 0, 3))


def warp(image: Image.Image, M: np.ndarray, size: int, resample=Image.BILINEAR) -> Image.Image:
    """The size x size image whose pixel p shows source pixel M^-1 p, the mean colour where that
    falls outside the image: zoom out, crop, flip, affine and resize in one resampling."""
    if resample == Image.BILINEAR and M[0, 1] == M[1, 0] == 0 and M[1, 1] > 0:
        return _scale(image, M, size)
    inverse = np.linalg.inv(M)[:2].ravel()
    return image.transform((size, size), Image.AFFINE, tuple(inverse), resample, fillcolor=FILL)


def _scale(image: Image.Image, M: np.ndarray, size: int) -> Image.Image:
    """warp's bilinear M of scale, shift and mirroring only, by PIL's resize (3x faster than its
    general warp, and it averages where it shrinks): the output pixels the image covers whole."""
    (sx, _, tx), (_, sy, ty) = M[:2]
    x1, x2 = sorted((tx, tx + sx * image.width))  # the image's columns in the output
    a, b = max(0, math.ceil(x1 - 1e-9)), min(size, math.floor(x2 + 1e-9))
    c, d = max(0, math.ceil(ty - 1e-9)), min(size, math.floor(ty + sy * image.height + 1e-9))
    out = Image.new("RGB", (size, size), FILL) if (a, c, b, d) != (0, 0, size, size) else None
    if b <= a or d <= c:
        return out
    u1, u2 = sorted(((a - tx) / sx, (b - tx) / sx))  # (a, b) and (c, d) in the source
    box = (max(0, u1), max(0, (c - ty) / sy), min(image.width, u2), min(image.height, (d - ty) / sy))
    part = image.resize((b - a, d - c), Image.BILINEAR, box=box)
    part = part.transpose(Image.FLIP_LEFT_RIGHT) if sx < 0 else part
    if out is None:
        return part
    out.paste(part, (a, c))
    return out


def _cut(image: Image.Image, box: tuple) -> Image.Image:
    """image.crop(box), black beyond the image; no copy if box is the whole image."""
    return image if box == (0, 0, *image.size) else image.crop(box)


def render(images: list, lam: float, plan: Plan, size: int, reduce: int = 1) -> Image.Image:
    """A sample's pixels from its decoded image(s) (at 1/reduce of their size): mixup and colour on
    the window alone (both go pixel by pixel: the same pixels for less work), one warp to the size."""
    W, H = max(im.width for im in images), max(im.height for im in images)  # mixup's canvas
    x1, y1, x2, y2 = (round(v / reduce) for v in plan.window)
    x1, y1 = max(0, x1), max(0, y1)
    box = (x1, y1, max(x1 + 1, min(W, x2)), max(y1 + 1, min(H, y2)))
    image = mixup(*images, lam, box) if len(images) == 2 else _cut(images[0], box)
    image = color_distort(image, *plan.colour)
    M = plan.M @ np.diag([reduce, reduce, 1.0]) @ _translation(x1, y1)  # box pixels -> output pixels
    return warp(image, M, size, plan.resample)


# ----------------------------------------------------------------------------------------------
# Mixup (Sec. 3.1, bag of freebies)

def draw_mixup(rng: np.random.Generator, index: int, n: int) -> tuple[float, int]:
    """Mixup ratio lambda ~ Beta(1.5, 1.5) and a partner drawn uniformly among the other images."""
    lam, partner = float(np.clip(rng.beta(1.5, 1.5), 0, 1)), int(rng.integers(n - 1))
    return lam, partner + (partner >= index)


def mixup(image1: Image.Image, image2: Image.Image, lam: float, box=None) -> Image.Image:
    """Both images top-left on a (max W, max H) canvas, black where one does not reach (as
    released), blended = lam * image1 + (1 - lam) * image2; made only in box (default: all)."""
    box = box or (0, 0, max(image1.width, image2.width), max(image1.height, image2.height))
    return Image.blend(_cut(image1, box), _cut(image2, box), 1 - lam)  # im1 (1 - a) + im2 a


def mixup_rows(rows1: np.ndarray, rows2: np.ndarray, lam: float) -> np.ndarray:
    """Both images' rows, each box carrying its image's ratio (lam, 1 - lam) as its mix."""
    rows1, rows2 = rows1.copy(), rows2.copy()
    rows1[:, 5], rows2[:, 5] = lam, 1 - lam
    return np.concatenate([rows1, rows2])


# ----------------------------------------------------------------------------------------------
# Training set, batching, random shapes

class TrainDataset(torch.utils.data.Dataset):
    """Augmented (and mixed) training samples at a fixed size; see the module docstring."""

    def __init__(self, data: CocoDetection, size: int = 608, seed: int = 0, mixup: bool = True,
                 augment: bool = True, min_size: float = 6.0):
        if "annotations" not in data.coco.dataset:
            raise DataError(f"{data.ann_file}: no 'annotations'; cannot train on it")
        self.data, self.size, self.seed, self.min_size = data, size, seed, min_size
        self.mixup, self.augment, self.epoch = mixup, augment, 0
        self.unreadable = set()  # images found unreadable in this process (each worker its own)

    def set_epoch(self, epoch: int) -> None:
        """New draws for every sample; call before iterating the epoch's DataLoader."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def _readable(self, index: int) -> int:
        """index, or the next image not yet found unreadable: a bad file never stops an epoch."""
        for j in ((index + k) % len(self) for k in range(len(self))):
            if j not in self.unreadable:
                return j
        raise DataError(f"{self.data.ann_file}: no readable image at all")

    def __getitem__(self, index: int):
        """(uint8 (3, size, size), float32 rows (N, 6) in input pixels)."""
        sample = None
        while sample is None:  # None: an image turned out unreadable; drawn again without it
            sample = self._sample(index)
        return sample

    def _sample(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])  # the sample's own stream
        picks, lam = [self._readable(index)], 1.0
        if self.mixup and len(self) > 1:
            lam, partner = draw_mixup(rng, index, len(self))
            picks.append(self._readable(partner))
        rows = [self.data.load_targets(j) for j in picks]
        rows = mixup_rows(*rows, lam) if len(picks) == 2 else rows[0]  # (N, 6)
        canvas = tuple(self.data._sizes[picks].max(0))  # mixup's (max W, max H)
        plan = (draw_augmentation(rng, rows, canvas, self.size, self.min_size) if self.augment
                else plain_resize(rows, canvas, self.size))
        reduce, images = reduction(plan.M), []
        for j in picks:
            try:
                images.append(self.data.open(j, reduce))
            except DataError as e:
                self.unreadable.add(j)
                warnings.warn(f"{e}; training on the next image instead ({len(self.unreadable)} "
                              "unreadable so far in this process)", stacklevel=3)
                return None
        return to_tensor(render(images, lam, plan, self.size, reduce)), torch.from_numpy(plan.rows)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker ignores SIGTERM and SIGINT. systemd, SLURM, Ctrl-C
    and `kill -- -PGID` signal the whole process group; the main process catches the signal,
    finishes its step, saves and then shuts its workers down, which must live until then."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W), contiguous: PIL splits the channels (so collate's conversion to
    float reads contiguous planes, 3x faster than through a permuted view)."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


def loss_targets(rows: torch.Tensor) -> torch.Tensor:
    """Rows (N, 6) [x1, y1, x2, y2, class, mix] -> the loss's (N, 6) [class, cx, cy, w, h, mix]."""
    x1, y1, x2, y2, cls, mix = rows.unbind(1)
    return torch.stack([cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, mix], 1)


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in 0..255 -> (x / 255 - MEAN) / STD, in place."""
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.mul_(1 / (255 * std)).add_(-torch.tensor(MEAN).view(1, 3, 1, 1) / std)


def normalize(image: np.ndarray, size) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size) float: plain bilinear resize (OpenCV's INTER_LINEAR,
    as the released evaluation does), then ImageNet normalisation. size: int or (h, w)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)  # (1, 3, h, w)
    return _normalize_(x)[0]


def collate(batch):
    """[(uint8 (3, S, S), rows (N_i, 6)), ...] -> (float (B, 3, S, S), B x (N_i, 6) loss targets). In a
    DataLoader worker the batch is made in shared memory, where the main process reads it (as
    torch's default_collate does): no copy on the way, and half the page faults."""
    shape, images = (len(batch), *batch[0][0].shape), torch.empty(0)  # (B, 3, S, S)
    if torch.utils.data.get_worker_info() is not None:
        images = images.new(images._typed_storage()._new_shared(math.prod(shape)))
    images = images.resize_(shape)  # (B, 3, S, S) float
    for b, (image, _) in enumerate(batch):
        images[b].copy_(image)  # uint8 -> float
    return _normalize_(images), [loss_targets(rows) for _, rows in batch]


def random_size(seed: int, iteration: int, every: int = 10, sizes=SIZES) -> int:
    """Sec. 3.4 random shapes: one size from `sizes` per block of `every` iterations, a function
    of (seed, iteration // every) only, so all DDP ranks agree without communicating."""
    rng = np.random.default_rng([seed, iteration // every])
    return int(sizes[rng.integers(len(sizes))])


def resize_batch(images: torch.Tensor, targets: list, size: int):
    """Resize a (B, 3, H, W) batch to (B, 3, size, size) and scale its boxes to match."""
    B, _, H, W = images.shape
    if (H, W) == (size, size):
        return images, targets
    images = F.interpolate(images, size=(size, size), mode="bilinear",
                           align_corners=False)  # (B, 3, size, size)
    scale = torch.tensor([1, size / W, size / H, size / W, size / H, 1])  # [cls, cx, cy, w, h, mix]
    return images, [t * scale.to(t) for t in targets]


# ----------------------------------------------------------------------------------------------
# The demo (`python data.py`): training samples as the model sees them, boxes and mix ratios drawn

def demo(out: str, root: str | None, seed: int) -> None:
    """8 augmented, mixed samples of a small synthetic set, drawn with their boxes and mix ratios."""
    paths = make_synthetic(root, n_train=32, n_val=4, seed=seed)
    train = TrainDataset(CocoDetection(paths["train_images"], paths["train_json"]), size=320, seed=seed)
    grid = Image.new("RGB", (4 * 320, 2 * 320))
    for i in range(8):
        image, rows = train[i]
        tile = Image.fromarray(image.permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(tile)
        for x1, y1, x2, y2, cls, mix in rows.tolist():
            draw.rectangle((x1, y1, x2, y2), outline=SYNTHETIC_CLASSES[int(cls)][2])
            draw.text((x1 + 2, y1 + 1), f"{train.data.class_names[int(cls)]} {mix:.2f}")
        grid.paste(tile, (i % 4 * 320, i // 4 * 320))
    Path(out).mkdir(parents=True, exist_ok=True)
    grid.save(Path(out) / "asff_data_demo.png")
    print(f"wrote {Path(out) / 'asff_data_demo.png'}: 8 training samples at 320 of {paths['train_images']} "
          "(augmented, mixed; box label: class and mix ratio)")


# ----------------------------------------------------------------------------------------------
# Plumbing: the script. --check reads a data set as training does and says what it holds (the
# loader's speed: `python tests/bench.py data`).

def check(image_dir: str, ann_file: str, include_crowd: bool = False) -> None:
    """Read a data set as training does, decode every image, and print what was found."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below
        data = CocoDetection(image_dir, ann_file, include_crowd)
    per_class = np.bincount(data._rows[:, 4].astype(int), minlength=len(data.cat_ids))
    (w0, h0), (w1, h1) = data._sizes.min(0), data._sizes.max(0)
    print(f"{data.ann_file}: {len(data)} images ({(np.diff(data._first) == 0).sum()} without boxes), widths "
          f"{w0}-{w1}, heights {h0}-{h1} px; {len(data._rows)} boxes to train on in {len(per_class)} classes")
    classes = ", ".join(f"{name} {n}".replace(" ", "\xa0") for name, n in zip(data.class_names, per_class))
    for line in textwrap.wrap(f"boxes per class: {classes}", 96, initial_indent="  ",
                              subsequent_indent="    "):
        print(line.replace("\xa0", " "))  # (no line break inside "name count")
    problems = [f"{len(ids)} {what.split(', ')[1]} ({what.split(', ')[0]})"
                for what, ids in data.skipped.items()]
    crowd = sum(a["iscrowd"] for a in data.coco.dataset.get("annotations", []))
    print(f"  boxes: {', '.join(problems)}; crowd: {crowd} (scored as COCO's ignore regions; trained on with "
          "--include-crowd)")
    unreadable = []
    for i in range(len(data)):
        try:
            data.open(i, reduce=8)  # every byte decoded (a JPEG at 1/8: the cheapest way)
        except DataError:
            unreadable.append(i)
    print(f"  decoded all {len(data)} images" if not unreadable else f"  {len(unreadable)} of {len(data)} "
          f"images unreadable (training uses the next one instead), e.g. {data._files[unreadable[0]]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs", help="folder for asff_data_demo.png")
    parser.add_argument("--root", default=None, help="cache folder (default $ASFF_CACHE or ~/.cache/asff)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="read --images and --ann as training does")
    parser.add_argument("--images", help="image folder (with --check)")
    parser.add_argument("--ann", help="COCO-format annotation file (with --check)")
    parser.add_argument("--include-crowd", action="store_true", help="as train.py's")
    args = parser.parse_args(argv)
    if args.check != bool(args.images and args.ann) or bool(args.images) != bool(args.ann):
        parser.error("--check needs --images and --ann, and they need --check")
    if args.check:
        check(args.images, args.ann, args.include_crowd)
    else:
        demo(args.out, args.root, args.seed)


if __name__ == "__main__":
    exit_on_user_error(main)
