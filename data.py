"""Data: COCO-format reading, a built-in synthetic set, the released augmentation, mixup (paper
Sec. 3.1, bag of freebies) and random input shapes (Sec. 3.4).

Public entry points:
    MEAN, STD                    ImageNet mean / std (RGB), what the released checkpoints expect
    normalize(image, size)       uint8 (H, W, 3) RGB -> (3, size, size) float, plain bilinear resize
    CocoDetection(image_dir, ann_file, include_crowd=False, require_annotations=True)
        .coco (pycocotools, over the boxes kept), .cat_ids (sorted JSON ids; class k <->
        cat_ids[k]), .cat_to_class, .class_names, .ids (image ids),
        load_image(i) -> (uint8 (H, W, 3) RGB, image_id),
        load_targets(i) -> float32 (N, 5) [class, x1, y1, x2, y2] in image pixels
    make_synthetic(root=None, n_train=1024, n_val=64, image_size=192, seed=0) -> dict of paths
        (train_images, train_json, val_images, val_json), generated once into a cache folder
    TrainDataset(data, size=608, seed=0, mixup=True, augment=True, min_size=6.0)
        [i] -> (uint8 (3, size, size), float32 (N, 6) [class, cx, cy, w, h, mix] in input pixels);
        .set_epoch(epoch); .mixup = False turns mixup off (mix column then 1.0)
    collate(batch) -> (float (B, 3, S, S) normalised, list of B (N_i, 6) float tensors)
    random_size(seed, iteration, every=10, sizes=(320, 352, ..., 608)) -> int
    resize_batch(images (B, 3, S, S), targets, size) -> (B, 3, size, size), boxes scaled

Training loop (random shapes, Sec. 3.4: one size per mini-batch, drawn every 10 iterations as
released, the same on every rank because it depends only on the seed and the iteration):

    train_set = TrainDataset(CocoDetection(paths["train_images"], paths["train_json"]), size=608)
    loader = DataLoader(train_set, batch_size, sampler=sampler, collate_fn=collate, num_workers=4)
    for epoch in range(epochs):
        train_set.set_epoch(epoch); train_set.mixup = epoch < epochs - 30   # before iterating:
        sampler.set_epoch(epoch)    # workers get a fresh copy each epoch (no persistent_workers)
        for images, targets in loader:
            size = random_size(seed, iteration)
            images, targets = resize_batch(images, targets, size)

Command line: `python data.py [--out DIR] [--root CACHE]` generates the synthetic set, prints
its statistics and writes DIR/asff_data_demo.png (8 augmented, mixed samples with their boxes);
`python tests/bench.py data` times one loader worker (last line: JSON).

The data set augments at the largest size and the batch is resized once more to the drawn size
(the release resized each image straight to the drawn size: one interpolation less, but the size
has to be known inside the worker); boxes are therefore filtered by min_size at the largest size.
Every random draw of sample i in epoch e comes from numpy's Generator(SeedSequence([seed, e, i])):
results do not depend on the worker count, and workers never repeat each other's draws (they did
in the release: docs/released-code.md, mixup). `mixup` and `epoch` are read inside the workers,
which copy the data set when an epoch's iterator starts: set them before, and do not use
persistent_workers.

Augmentation (as released: docs/released-code.md, augmentation), per sample: mixup; photometric
distortion; zoom out; SSD random crop; horizontal flip; small random affine; resize to the square
size. The geometric steps are affine maps, so each step returns its 3x3 matrix and the moved boxes,
and the image is warped once by their product (PIL, one pass from the source image, showing only
what the crop kept). Boxes whose shorter side is not above min_size (6 px) are dropped; if none
survive, the un-augmented image and all its boxes are used (as released). Departures, each for a
reason:
- the affine translation uses the width for x and the height for y (the release swaps them);
- saturation scales HSV's S with V and hue kept, computed in RGB (c -> V - s (V - c)) instead of
  a second HSV round trip (9 ms of a 20 ms budget); it clips per channel where s * S > 1;
- resampling is nearest or bilinear at random (the release draws among five OpenCV methods;
  PIL's bicubic warp is 2.5x slower than bilinear);
- boxes are COCO's continuous (x, y, x + w, y + h), not the release's inclusive x + w - 1;
- crowd boxes are left out by default (include_crowd=True trains on them, as released);
- targets are a list of (N, 6) tensors, not padded to 50 rows.

Bad input - found at start-up when it can be, and never a crash in the middle of an epoch.
Every annotation file is checked entry by entry before pycocotools sees it (FIELDS: the keys and
types each entry needs); each problem is a DataError naming the file, the entry (`images[3]
(id 7)`) and the field. `.coco`, what COCOeval scores against, is built from what was kept:
| problem                                    | found    | what happens                           |
|--------------------------------------------|----------|----------------------------------------|
| file missing, unreadable, empty, not UTF-8 | start-up | DataError: file and reason (JSON: line |
| or not valid JSON                          |          | and column)                            |
| top level not an object; no images /       | start-up | DataError naming the key (annotations  |
| categories / annotations list; images or   |          | optional: require_annotations=False)   |
| categories empty                           |          |                                        |
| entry not an object, or a FIELDS key       | start-up | DataError: file, entry, key (and the   |
| missing or of the wrong type / range (true |          | value as the file has it)              |
| is not a number; NaN, inf; size <= 0)      |          |                                        |
| duplicate id (images, categories,          | start-up | DataError: file, both entries          |
| annotations) or category name              |          |                                        |
| annotation on an unknown image / category  | start-up | DataError: file, entry and the id      |
| kept box with a negative area              | start-up | DataError: file, entry                 |
| box with zero or negative width/height     | start-up | skipped, for training and in .coco;    |
|                                            |          | one warning: count, first annotation id|
| box wholly outside its image               | start-up | skipped, for training and in .coco;    |
|                                            |          | counted warning                        |
| box partly outside its image               | start-up | clipped, for training and in .coco;    |
|                                            |          | counted warning                        |
| crowd box (iscrowd 1)                      | -        | not trained on (include_crowd=True     |
|                                            |          | does); in .coco as COCO's ignore region|
| image file missing                         | start-up | DataError: count, first file, image id |
|                                            |          | (usually a wrong image_dir)            |
| corrupt or truncated image, or decoded     | loading  | load_image: DataError naming the file; |
| size unlike the JSON's width/height        |          | TrainDataset warns (running count) and |
|                                            |          | trains on the next image instead       |
| grayscale, palette, RGBA, CMYK, 16-bit     | loading  | converted to RGB; alpha dropped (as    |
|                                            |          | OpenCV), 16-bit scaled by 1/257        |
| EXIF-rotated photo                         | loading  | rotation applied (as OpenCV's imread)  |
| image with no objects                      | -        | valid: a (0, 6) target                 |
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
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageDraw, ImageOps
from pycocotools.coco import COCO

MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB
STD = (0.229, 0.224, 0.225)
FILL = tuple(round(255 * m) for m in MEAN)  # (124, 116, 104): zoom-out, affine border (released)
SIZES = tuple(range(320, 609, 32))  # Sec. 3.4 random shapes {320, 352, ..., 608}


class UserError(Exception):
    """A mistake in what the user gave (data, files, flags), not in the code. The scripts print
    its message as one line and exit with status 2 (exit_on_user_error; ASFF_DEBUG=1 shows the
    traceback too)."""


class DataError(UserError, ValueError):
    """A problem with the data (not the code); the message names the file and the entry."""


def exit_on_user_error(main, argv: list[str] | None = None):
    """Run a script's main(argv); a UserError ends it with one line on stderr and status 2."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("ASFF_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------------
# Reading COCO-format data. Every file is checked here, entry by entry, before pycocotools sees
# it: pycocotools indexes by id and image_id (a bare KeyError when one is missing) and trusts
# every number (a TypeError, or a silently wrong AP, later). Each problem is a DataError naming
# the file, the entry (its place in the list and its id) and the field.


def _number(v) -> bool:
    """A finite JSON number. true and false are not numbers here, though Python's bool is an int."""
    return type(v) in (int, float) and abs(v) < 1e30  # NaN fails the comparison, as inf does


def _side(v) -> bool:
    """A whole number of pixels > 0 (640 or 640.0)."""
    return type(v) in (int, float) and 0 < v < 2**31 and v == int(v)


def _id(v) -> bool:
    """An integer that numpy's int64, and so COCOeval, can hold."""
    return type(v) is int and -(2**63) <= v < 2**63


def _text(v) -> bool:
    return type(v) is str and v.strip() != ""


def _box(v) -> bool:
    return type(v) is list and len(v) == 4 and all(_number(c) for c in v)


# Per list: (required fields, optional fields), each field: (test, what it must be)
FIELDS = {
    "images": ({"id": (_id, "an integer"), "file_name": (_text, "a non-empty string"),
                "width": (_side, "a whole number of pixels > 0"),
                "height": (_side, "a whole number of pixels > 0")}, {}),
    "categories": ({"id": (_id, "an integer"), "name": (_text, "a non-empty string")}, {}),
    "annotations": ({"id": (_id, "an integer"), "image_id": (_id, "an integer"),
                     "category_id": (_id, "an integer"),
                     "bbox": (_box, "4 finite numbers [x, y, w, h]")},
                    {"iscrowd": (lambda v: type(v) in (int, float) and v in (0, 1), "0 or 1"),
                     "area": (_number, "a finite number")}),  # >= 0 if the box is kept
}
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number",
              float: "a number", bool: "true/false", type(None): "null"}


def _shown(value) -> str:
    """A value as the file has it (null, true, "640", NaN), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except RecursionError:  # nested deeper than json.dumps goes: name its type only
        return JSON_TYPES[type(value)]
    return text if len(text) <= 60 else text[:56] + " ..."


def _entry(ann_file: str, key: str, position: int, entry) -> str:
    """Where an entry is: 'file: annotations[12] (id 7)', with the id when it is a usable one."""
    has_id = type(entry) is dict and _id(entry.get("id"))
    return f"{ann_file}: {key}[{position}]" + (f" (id {entry['id']})" if has_id else "")


def _check_entries(ann_file: str, key: str, entries: list) -> dict:
    """Each entry of the list an object with the FIELDS of its kind, ids unique -> {id: entry}."""
    required, optional = FIELDS[key]

    def wrong(position, entry, field, wanted):
        return DataError(f"{_entry(ann_file, key, position, entry)}: '{field}' is "
                         f"{_shown(entry[field])}, not {wanted}")

    by_id = {}
    for position, entry in enumerate(entries):
        if type(entry) is not dict:
            raise DataError(f"{_entry(ann_file, key, position, entry)} is {_shown(entry)}, not "
                            f"an object with {', '.join(required)}")
        for field, (test, wanted) in required.items():
            if field not in entry:
                raise DataError(f"{_entry(ann_file, key, position, entry)}: '{field}' is missing "
                                f"(each entry of '{key}' needs {', '.join(required)})")
            if not test(entry[field]):
                raise wrong(position, entry, field, wanted)
        for field, (test, wanted) in optional.items():
            if field in entry and not test(entry[field]):
                raise wrong(position, entry, field, wanted)
        if by_id.setdefault(entry["id"], entry) is not entry:
            first = next(i for i, e in enumerate(entries) if e["id"] == entry["id"])
            raise DataError(f"{_entry(ann_file, key, position, entry)}: duplicate id "
                            f"{entry['id']}, also {key}[{first}]'s; ids must be unique")
    return by_id


def _load_json(ann_file: str):
    """The parsed file; DataError naming it when it cannot be read or is not JSON."""
    try:
        with open(ann_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is harmless
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: not UTF-8 text (byte {e.start}); a COCO annotation file "
                        "is UTF-8 JSON") from e
    except OSError as e:
        raise DataError(f"{ann_file}: cannot read the annotation file ({e.strerror or e})") from e
    if not text.strip():
        raise DataError(f"{ann_file}: the file is empty; expected COCO-format JSON")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from e


def _read_json(ann_file: str, require_annotations: bool) -> tuple[dict, dict]:
    """Load a COCO-format file and check all of it but what annotations refer to (that is
    _check_annotation's): (the data, {image id: image entry})."""
    data = _load_json(ann_file)
    if type(data) is not dict:
        raise DataError(f"{ann_file}: the top level is {JSON_TYPES[type(data)]}, not an object "
                        "with 'images', 'annotations' and 'categories' lists; is this a "
                        "COCO-format annotation file?")
    keys = ["images", "categories"]
    if require_annotations or "annotations" in data:  # optional: COCO test-dev's has none
        keys.append("annotations")
    for key in keys:
        if type(data.get(key)) is not list:
            found = f" ('{key}' is {_shown(data[key])})" if key in data else ""
            raise DataError(f"{ann_file}: no '{key}' list{found}; is this a COCO-format "
                            "annotation file?")
        if not data[key] and key != "annotations":  # no objects at all is valid, if useless
            raise DataError(f"{ann_file}: the '{key}' list is empty")
    images = _check_entries(ann_file, "images", data["images"])
    _check_entries(ann_file, "categories", data["categories"])
    names = {}
    for position, category in enumerate(data["categories"]):
        first = names.setdefault(category["name"], position)
        if first != position:  # two classes one name: pictures and category checks would lie
            raise DataError(f"{_entry(ann_file, 'categories', position, category)}: duplicate "
                            f"name {_shown(category['name'])}, also categories[{first}]'s")
    _check_entries(ann_file, "annotations", data.get("annotations", []))
    return data, images


def _coco_api(data: dict) -> COCO:
    """A pycocotools COCO object over an already loaded dict, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_annotation(ann: dict, position: int, images: dict, cat_to_class: dict,
                      ann_file: str) -> None:
    """The image and the category an annotation refers to exist."""
    for field, known, where in (("image_id", images, "images"),
                                ("category_id", cat_to_class, "categories")):
        if ann[field] not in known:
            raise DataError(f"{_entry(ann_file, 'annotations', position, ann)}: {field} "
                            f"{ann[field]} is not in '{where}'")


def _annotation_rows(data: dict, images: dict, ann_file: str, cat_to_class: dict,
                     include_crowd: bool):
    """Per image, the training rows [class, x1, y1, x2, y2]; and the annotations COCOeval scores
    against: the same boxes, crowd ones included (COCO's ignore regions). A box of zero or
    negative size or wholly outside its image is skipped for both, one partly outside is
    clipped for both; one counted warning per kind of problem."""
    rows = {image_id: [] for image_id in images}
    kept = []
    problems = {"zero or negative width/height, skipped": [], "outside the image, skipped": [],
                "partly outside the image, clipped": []}
    for position, ann in enumerate(data.get("annotations", [])):
        _check_annotation(ann, position, images, cat_to_class, ann_file)
        x, y, w, h = box = ann["bbox"]
        W, H = images[ann["image_id"]]["width"], images[ann["image_id"]]["height"]
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if w <= 0 or h <= 0:
            problems["zero or negative width/height, skipped"].append(ann["id"])
            continue
        if x2 <= x1 or y2 <= y1:
            problems["outside the image, skipped"].append(ann["id"])
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            problems["partly outside the image, clipped"].append(ann["id"])
            box = [x1, y1, x2 - x1, y2 - y1]
        area, crowd = ann.get("area", box[2] * box[3]), int(ann.get("iscrowd", 0))
        if area < 0:  # COCOeval would silently ignore the box (outside every area range)
            raise DataError(f"{_entry(ann_file, 'annotations', position, ann)}: 'area' is "
                            f"{_shown(area)}, not >= 0")
        kept.append({"id": ann["id"], "image_id": ann["image_id"], "bbox": box, "area": area,
                     "category_id": ann["category_id"], "iscrowd": crowd})
        if include_crowd or not crowd:
            rows[ann["image_id"]].append((cat_to_class[ann["category_id"]], x1, y1, x2, y2))
    for problem, ids in problems.items():
        if ids:
            warnings.warn(f"{ann_file}: {len(ids)} box(es) {problem}; annotation ids {ids[:5]}"
                          + (" ..." if len(ids) > 5 else ""), stacklevel=3)
    return [rows[image["id"]] for image in data["images"]], kept


def open_rgb(path: str) -> Image.Image:
    """Decode an image file as 8-bit RGB, upright by its EXIF orientation; DataError if not."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, while the file is open
            ImageOps.exif_transpose(image, in_place=True)  # as OpenCV's imread in the release
            if image.mode.startswith("I"):  # 16-bit grayscale: convert("RGB") would clip at 255
                gray = np.asarray(image).astype(np.float32).clip(0, 65535) / 257
                return Image.fromarray(gray.round().astype(np.uint8)).convert("RGB")
            # L, P, LA, RGBA (alpha dropped, as OpenCV), CMYK; RGB as it is (no copy)
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e


class CocoDetection:
    """A COCO-format detection set (COCO itself or custom), read once and checked at start-up."""

    def __init__(self, image_dir: str, ann_file: str, include_crowd: bool = False,
                 require_annotations: bool = True):
        data, images = _read_json(ann_file, require_annotations)
        self.ann_file = str(ann_file)
        self.cat_ids = sorted(c["id"] for c in data["categories"])  # class k <-> cat_ids[k]
        self.cat_to_class = {cat_id: k for k, cat_id in enumerate(self.cat_ids)}
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.class_names = [names[cat_id] for cat_id in self.cat_ids]
        self.ids = [image["id"] for image in data["images"]]
        rows, kept = _annotation_rows(data, images, ann_file, self.cat_to_class, include_crowd)
        # COCOeval scores against exactly what was kept here: the file's boxes less the skipped
        # ones, clipped where clipped (not the file as it is)
        ground_truth = {k: v for k, v in data.items() if k != "annotations"}
        if "annotations" in data:
            ground_truth["annotations"] = kept
        self.coco = _coco_api(ground_truth)
        # Per-sample data lives in numpy arrays, not lists of Python objects, so that forked
        # DataLoader workers do not copy it page by page through reference counts.
        self._files = np.array([os.path.join(image_dir, im["file_name"]) for im in data["images"]])
        self._sizes = np.array([(im["width"], im["height"]) for im in data["images"]], np.int64)
        self._first = np.cumsum([0] + [len(r) for r in rows])  # image i: rows first[i]:first[i+1]
        self._rows = np.array([row for r in rows for row in r], np.float32).reshape(-1, 5)
        self._check_files(image_dir)

    def _check_files(self, image_dir):
        missing = [i for i, path in enumerate(self._files) if not os.path.isfile(path)]
        if missing:
            i = missing[0]
            raise DataError(
                f"{self.ann_file}: {len(missing)} of {len(self)} image files are missing under "
                f"{image_dir}, e.g. {self._files[i]} (image id {self.ids[i]}); wrong folder?")

    def __len__(self) -> int:
        return len(self.ids)

    def open(self, index: int) -> Image.Image:
        """The image as PIL RGB, checked against the size the annotation file gives."""
        image = open_rgb(str(self._files[index]))
        if image.size != tuple(self._sizes[index]):
            W, H = self._sizes[index]
            raise DataError(f"{self._files[index]}: decoded size {image.size[0]}x{image.size[1]} "
                            f"(after EXIF rotation) is not the {W}x{H} of {self.ann_file}")
        return image

    def load_image(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 (H, W, 3) RGB, image id); DataError names the file when it cannot be used."""
        return np.array(self.open(index)), self.ids[index]  # a writable copy, for torch

    def load_targets(self, index: int) -> np.ndarray:
        """float32 (N, 5) [class, x1, y1, x2, y2] in image pixels (crowd left out unless asked)."""
        return self._rows[self._first[index]:self._first[index + 1]].copy()


# ----------------------------------------------------------------------------------------------
# The built-in synthetic set: coloured shapes of 8 px to 60% of the image on textured
# backgrounds, a few per image (scale conflict in one image, Sec. 1), drawn large to small so
# that small ones partly hide large ones.

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
        lt = np.maximum(placed[:, :2], (x, y))
        rb = np.minimum(placed[:, 2:], (x + w, y + h))
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
        w = int(np.clip(round(side * aspect), 8, width))
        h = int(np.clip(round(side / aspect), 8, height))
        cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
        xy = _place(rng, w, h, width, height, np.array(placed, np.int64).reshape(-1, 4))
        if xy is None:
            continue
        colour = np.clip(np.add(SYNTHETIC_CLASSES[cls][2], rng.integers(-20, 21, 3)), 0, 255)
        draw_shape(draw, SYNTHETIC_CLASSES[cls][1], (*xy, w, h), tuple(colour.tolist()))
        placed.append((xy[0], xy[1], xy[0] + w, xy[1] + h))
        objects.append((cls, [*xy, w, h]))
    return image, objects


def _write_split(folder: Path, split: str, n: int, width: int, height: int, seed: int,
                 stream: int, fmt: str = "png", max_objects: int = 6) -> None:
    """Images folder/split/*.png and folder/split.json (COCO format); image i of the split drawn
    from its own random stream [seed, stream, i]."""
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        image, objects = draw_scene(np.random.default_rng([seed, stream, i]), width, height,
                                    max_objects)
        name = f"{i:06d}.{fmt}"
        image.save(folder / split / name, **({"quality": 90} if fmt == "jpg" else
                                             {"compress_level": 1}))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for cls, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": [x, y, w, h],
                                "category_id": cls + 1, "area": w * h, "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, (name, _, _) in enumerate(SYNTHETIC_CLASSES)]
    data = {"info": {"description": "asff synthetic shapes", "seed": seed}, "images": images,
            "annotations": annotations, "categories": categories}
    (folder / f"{split}.json").write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def make_synthetic(root: str | None = None, n_train: int = 1024, n_val: int = 64,
                   image_size: int = 192, seed: int = 0) -> dict:
    """Generate the synthetic set once into root/synthetic-<hash of the arguments> (root default:
    $ASFF_CACHE or ~/.cache/asff) and return its paths. Same arguments -> identical files."""
    params = {"version": SYNTHETIC_VERSION, "n_train": n_train, "n_val": n_val,
              "image_size": image_size, "seed": seed}
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
# Augmentation (as released: docs/released-code.md, augmentation).
# Rows are float (N, 6) [x1, y1, x2, y2, class, mix].


def color_distort(image: Image.Image, brightness: float = 0.0, contrast: float = 1.0,
                  hue: int = 0, saturation: float = 1.0) -> Image.Image:
    """The released colour steps: x -> clip(clip(x + brightness) * contrast); HSV hue + hue
    (OpenCV units: 180 is a full turn); HSV saturation * saturation. Look-up tables and PIL's
    channel operations keep it at C speed."""
    if brightness != 0 or contrast != 1:
        lut = np.clip(np.clip(np.arange(256) + brightness, 0, 255) * contrast, 0, 255)
        image = image.point(np.tile(lut.round().astype(np.uint8), 3).tolist())
    if hue != 0:
        h, s, v = image.convert("HSV").split()
        shift = round(hue * 256 / 180)  # PIL's hue runs 0..255 for a full turn
        image = Image.merge("HSV", (h.point([(i + shift) % 256 for i in range(256)]), s, v))
        image = image.convert("RGB")
    if saturation != 1:
        # S = (V - min) / V with V = max(R, G, B): scaling S by s keeping V and the hue is
        # c -> V - s * (V - c) per channel, without a second HSV round trip (9 ms at 640x480).
        # Where s * S > 1 the channels are clipped at 0 (HSV would clip S at 1).
        r, g, b = image.split()
        v = ImageChops.lighter(ImageChops.lighter(r, g), b)
        image = Image.blend(Image.merge("RGB", (v, v, v)), image, saturation)  # v + s * (c - v)
    return image


def photometric(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The released draws (docs/released-code.md, augmentation), each step with p = 0.5."""
    brightness = rng.uniform(-32, 32) if rng.random() < 0.5 else 0.0
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    hue = int(rng.integers(-18, 19)) if rng.random() < 0.5 else 0
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    return color_distort(image, brightness, contrast, hue, saturation)


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


def _iou(rois: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(R, 4) x (N, 4) corner boxes -> (R, N) IoU."""
    lt = np.maximum(rois[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(rois[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_r = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area_r[:, None] + area_b[None] - inter)


CROP_MIN_IOU = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)  # SSD modes; None = no crop


def ssd_crop(rng, rows, wh, tries=50):
    """SSD random crop: a window of 0.3-1 of each side whose IoU with every box is at least the
    drawn mode's minimum; boxes whose centre falls inside are kept and clipped."""
    W, H = wh
    identity = (np.eye(3), rows, wh)
    if len(rows) == 0:
        return identity
    for _ in range(50):  # the release retries modes forever; 50 modes make failure negligible
        min_iou = CROP_MIN_IOU[rng.integers(len(CROP_MIN_IOU))]
        if min_iou is None:
            return identity
        scale = rng.uniform(0.3, 1, tries)  # the release's 50 windows, drawn at once
        ratio = np.sqrt(rng.uniform(np.maximum(0.5, scale**2), np.minimum(2, 1 / scale**2)))
        w = np.maximum(1, (scale * ratio * W).astype(int))
        h = np.maximum(1, (scale / ratio * H).astype(int))
        left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        rois = np.stack([left, top, left + w, top + h], 1).astype(np.float64)  # (tries, 4)
        centres = (rows[:, :2] + rows[:, 2:4]) / 2  # (N, 2)
        inside = ((rois[:, None, :2] < centres) & (centres < rois[:, None, 2:])).all(2)  # (R, N)
        ok = (_iou(rois, rows[:, :4]).min(1) >= min_iou) & inside.any(1)
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
    a = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    alpha, beta = s * math.cos(a), s * math.sin(a)  # OpenCV's getRotationMatrix2D(centre, a, s)
    R = np.array([[alpha, beta, (1 - alpha) * W / 2 - beta * H / 2],
                  [-beta, alpha, beta * W / 2 + (1 - alpha) * H / 2], [0, 0, 1]])
    # x shifts by a fraction of the width and y of the height (the release swaps them:
    # docs/released-code.md, augmentation)
    T = _translation(rng.uniform(-translate, translate) * W, rng.uniform(-translate, translate) * H)
    sx, sy = (math.tan(math.radians(rng.uniform(-shear, shear))) for _ in range(2))
    S = np.array([[1, sx, 0], [sy, 1, 0], [0, 0, 1]])
    A = S @ T @ R
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


def warp(image: Image.Image, M: np.ndarray, size: int, resample=Image.BILINEAR,
         window=None) -> Image.Image:
    """The size x size image whose pixel p shows source pixel M^-1 p if it lies in the window
    (x1, y1, x2, y2; default the whole image), else the mean colour."""
    if window is not None:  # integers: expand offsets, crop windows and mirroring are whole pixels
        x1, y1 = max(0, round(window[0])), max(0, round(window[1]))
        x2, y2 = min(image.width, round(window[2])), min(image.height, round(window[3]))
        image, M = image.crop((x1, y1, x2, y2)), M @ _translation(x1, y1)
    inverse = np.linalg.inv(M)[:2].ravel()
    return image.transform((size, size), Image.AFFINE, tuple(inverse), resample, fillcolor=FILL)


def augment(image: Image.Image, rows: np.ndarray, rng: np.random.Generator, size: int,
            min_size: float = 6.0):
    """Photometric then geometric augmentation to size x size; boxes with a side <= min_size
    dropped; if none is left, the un-augmented image with all its boxes (as released)."""
    distorted = photometric(image, rng)
    M, out, window = geometry(rng, rows, image.size, size)
    out = out[np.minimum(out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]) > min_size]
    resample = (Image.NEAREST, Image.BILINEAR)[rng.integers(2)]
    if len(rows) and not len(out):
        M = resize_matrix(image.size, size)
        return warp(image, M, size), _move_boxes(M, rows)
    return warp(distorted, M, size, resample, window), out


def draw_mixup(rng: np.random.Generator, index: int, n: int) -> tuple[float, int]:
    """Mixup ratio lambda ~ Beta(1.5, 1.5) and a partner drawn uniformly among the other images."""
    lam = float(np.clip(rng.beta(1.5, 1.5), 0, 1))
    partner = int(rng.integers(n - 1))
    return lam, partner + (partner >= index)


def mixup(image1, rows1, image2, rows2, lam: float):
    """Bag of freebies (Sec. 3.1): both images top-left on a (max H, max W) canvas,
    blended = lam * image1 + (1 - lam) * image2; each box carries its image's ratio."""
    W, H = max(image1.width, image2.width), max(image1.height, image2.height)

    def padded(image):  # top-left on a black W x H canvas (no renormalisation, as released)
        if image.size == (W, H):
            return image
        canvas = Image.new("RGB", (W, H))
        canvas.paste(image, (0, 0))
        return canvas

    blended = Image.blend(padded(image1), padded(image2), 1 - lam)  # im1 (1 - a) + im2 a
    rows1, rows2 = rows1.copy(), rows2.copy()
    rows1[:, 5], rows2[:, 5] = lam, 1 - lam
    return blended, np.concatenate([rows1, rows2])


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
        self.unreadable = 0  # images skipped so far in this process (each worker counts its own)

    def set_epoch(self, epoch: int) -> None:
        """New draws for every sample; call before iterating the epoch's DataLoader."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def _load(self, index: int):
        """PIL image and rows [x1, y1, x2, y2, class, 1]; an unreadable image is replaced by the
        next readable one with a warning, so a bad file never stops an epoch."""
        for j in ((index + k) % len(self) for k in range(len(self))):
            try:
                image = self.data.open(j)
            except DataError as e:
                self.unreadable += 1
                warnings.warn(f"{e}; training on the next image instead ({self.unreadable} "
                              "unreadable so far in this process)", stacklevel=2)
                continue
            targets = self.data.load_targets(j)  # [class, x1, y1, x2, y2]
            ones = np.ones((len(targets), 1), np.float32)
            return image, np.concatenate([targets[:, 1:], targets[:, :1], ones], 1)
        raise DataError(f"{self.data.ann_file}: no readable image at all")

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])  # per-sample stream
        image, rows = self._load(index)
        if self.mixup and len(self) > 1:
            lam, partner = draw_mixup(rng, index, len(self))
            image, rows = mixup(image, rows, *self._load(partner), lam)
        if self.augment:
            image, rows = augment(image, rows, rng, self.size, self.min_size)
        else:
            M = resize_matrix(image.size, self.size)
            image, rows = warp(image, M, self.size), _move_boxes(M, rows)
        x1, y1, x2, y2, cls, mix = rows.T
        target = np.stack([cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, mix], 1)
        return (torch.from_numpy(np.array(image)).permute(2, 0, 1),  # (3, S, S) uint8
                torch.from_numpy(target.astype(np.float32)).reshape(-1, 6))  # (N, 6)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker ignores SIGTERM and SIGINT. systemd, SLURM, Ctrl-C
    and `kill -- -PGID` signal the whole process group; the main process catches the signal,
    finishes its step, saves and then shuts its workers down, which must live until then."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _normalize_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in 0..255 -> (x / 255 - MEAN) / STD, as a new float tensor."""
    std = torch.tensor(STD).view(1, 3, 1, 1)
    scale, shift = 1 / (255 * std), -torch.tensor(MEAN).view(1, 3, 1, 1) / std
    return x.to(torch.float32, copy=True).mul_(scale).add_(shift)  # in place on the copy: 2x faster


def normalize(image: np.ndarray, size) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size) float: plain bilinear resize (OpenCV's INTER_LINEAR,
    as the released evaluation does), then ImageNet normalisation. size: int or (h, w)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)  # (1, 3, h, w)
    return _normalize_batch(x)[0]


def collate(batch):
    """[(uint8 (3, S, S), (N_i, 6)), ...] -> (float (B, 3, S, S), [(N_i, 6), ...])."""
    images = torch.stack([image for image, _ in batch])  # (B, 3, S, S) uint8
    return _normalize_batch(images), [target for _, target in batch]


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
# Script: `python data.py` shows the data (the loader's speed: `python tests/bench.py data`).


def _draw_samples(dataset: TrainDataset, indices, class_names) -> Image.Image:
    """A grid of training samples with their boxes, class names and mixup ratios."""
    S, tiles = dataset.size, []
    for i in indices:
        image, target = dataset[i]
        tile = Image.fromarray(image.permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(tile)
        for cls, cx, cy, w, h, mix in target.tolist():
            colour = SYNTHETIC_CLASSES[int(cls) % len(SYNTHETIC_CLASSES)][2]
            draw.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), outline=colour)
            draw.text((cx - w / 2 + 2, cy - h / 2 + 1), f"{class_names[int(cls)]} {mix:.2f}",
                      fill=(255, 255, 255))
        tiles.append(tile)
    grid = Image.new("RGB", (4 * S, S * math.ceil(len(tiles) / 4)))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % 4) * S, (k // 4) * S))
    return grid


def demo(out: str, root: str | None, seed: int) -> None:
    start = time.perf_counter()
    paths = make_synthetic(root, seed=seed)
    print(f"synthetic set in {paths['root']} ({time.perf_counter() - start:.1f} s)")
    for split in ("train", "val"):
        data = CocoDetection(paths[f"{split}_images"], paths[f"{split}_json"])
        rows = data._rows
        sides = np.sqrt((rows[:, 3] - rows[:, 1]) * (rows[:, 4] - rows[:, 2]))
        per_class = np.bincount(rows[:, 0].astype(int), minlength=len(data.cat_ids))
        print(f"{split}: {len(data)} images, {len(rows)} boxes; per class "
              + ", ".join(f"{n} {c}" for n, c in zip(data.class_names, per_class, strict=True))
              + f"; box side {sides.min():.0f}-{sides.max():.0f} px, "
              f"small/medium/large (COCO) {np.histogram(sides, [0, 32, 96, 1e9])[0].tolist()}")
    train = TrainDataset(CocoDetection(paths["train_images"], paths["train_json"]), size=320,
                         seed=seed)
    path = Path(out) / "asff_data_demo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _draw_samples(train, range(8), train.data.class_names).save(path)
    print(f"wrote {path}: 8 training samples (augmented, mixed; box label: class and mix ratio)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs", help="folder for asff_data_demo.png")
    parser.add_argument("--root", default=None, help="cache folder (default $ASFF_CACHE or "
                        "~/.cache/asff)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    demo(args.out, args.root, args.seed)


if __name__ == "__main__":
    main()
