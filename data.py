"""Data - paper Sec. 3.1 (mixup, a freebie) and Sec. 3.4 (random input shapes), with the release's
augmentation, over COCO-format sets or a built-in synthetic one.

Boxes are float32 rows (N, 6) [x1, y1, x2, y2, class, mix] in pixels (mix: 1 but in mixup) until
collate turns them into the loss's (N, 6) [class, cx, cy, w, h, mix].
    CocoDetection(image_dir, ann_file) -> .coco (pycocotools), .cat_ids, .class_names; load_image(i)
        -> (uint8 (H, W, 3), image id); load_targets(i) -> rows. make_synthetic() -> paths
    TrainDataset(data, size)[i] -> (uint8 (3, size, size), rows); collate(batch) -> (float (B, 3, S,
        S), targets), on the device to_input(*stack_batch(batch), size); random_size(seed, iteration)
Per sample, as released (docs/released-code.md; not in the paper): mixup, colour, zoom out, SSD
crop, flip, small affine, resize; sample i of epoch e draws from the stream [seed, e, i]. All draws
come first, then the pixels: a JPEG decoded at the coarsest DCT scale that covers the output, mixup
and colour only where the crop keeps, one warp (departures: docs/released-code.md). `python data.py` draws
samples, `--check --images DIR --ann FILE` checks a set (bad input: docs/data.md).
"""

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageDraw, ImageOps
from pycocotools.coco import COCO

from loss import box_iou

MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB
STD = (0.229, 0.224, 0.225)
FILL = tuple(round(255 * m) for m in MEAN)  # (124, 116, 104): zoom-out, affine border (released)
SIZES = tuple(range(320, 609, 32))  # Sec. 3.4 random shapes {320, 352, ..., 608}

# --- Plumbing: errors, and the scripts' way out
class UserError(Exception):
    """A mistake in what the user gave (data, files, flags): one line, exit status 2 (exit_on_user_error)."""

class DataError(UserError, ValueError):
    """A problem with the data; the message names the file and the entry."""

def exit_on_user_error(main, argv: list[str] | None = None):
    """main(argv); a UserError: one line on stderr, status 2 (--debug, ASFF_DEBUG=1: the traceback).
    Any error kills the loader workers left: they ignore the SIGTERM Python's exit sends, then waits."""
    try:
        return main(argv)
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (None, 0)):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills
            for worker in multiprocessing.active_children():
                worker.kill()  # SIGKILL: cannot be ignored
        if not isinstance(e, UserError) or os.environ.get("ASFF_DEBUG") or "--debug" in (argv or sys.argv):
            raise
        text = str(e).strip()  # from a loader worker: torch's traceback, then "data.DataError: ..."
        print(f"error: {text.splitlines()[-1].split('Error: ', 1)[-1] if 'Traceback' in text else text}",
              file=sys.stderr)
        raise SystemExit(2) from None

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (-h lists the flags)\n")

def checked(kind, test, what: str):
    """An argparse type: kind(text) where test(value) holds, else argparse's one-line error."""
    def convert(text: str):
        with contextlib.suppress(ValueError, RuntimeError):
            if test(value := kind(text)):
                return value
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return convert

COUNT, NATURAL = (checked(int, lambda v, k=k: v >= k, f"must be a whole number >= {k}") for k in (1, 0))
POSITIVE = checked(float, lambda v: 0 <= v < math.inf, "must be a number >= 0")  # NaN fails too
FRACTION = checked(float, lambda v: 0 <= v <= 1, "must be a number in [0, 1]")
SIZE = checked(int, lambda v: v >= 32 and v % 32 == 0, "must be a multiple of 32 (the coarsest stride)")

# --- Plumbing: COCO-format files, checked in one pass over their lists and keys before
# pycocotools sees them (it trusts every key and number: a bare KeyError, or a silently wrong AP)
_number = lambda v: type(v) in (int, float) and abs(v) < 1e30  # finite (NaN fails); true is none
INTEGER = (lambda v: type(v) is int and -(2**63) <= v < 2**63, "an integer")  # numpy's int64
TEXT = (lambda v: type(v) is str and v.strip() != "", "a non-empty string")
SIDE = (lambda v: type(v) in (int, float) and 0 < v < 2**31 and v == int(v), "a whole number of pixels > 0")
FIELDS = {  # each list's keys: (test, what the value must be); "?": may be left out
    "images": {"id": INTEGER, "file_name": TEXT, "width": SIDE, "height": SIDE},
    "categories": {"id": INTEGER, "name": TEXT},
    "annotations": {"id": INTEGER, "image_id": INTEGER, "category_id": INTEGER, "bbox": (
        lambda v: type(v) is list and len(v) == 4 and all(map(_number, v)), "4 finite numbers [x, y, w, h]"),
        "iscrowd?": (lambda v: type(v) in (int, float) and v in (0, 1), "0 or 1"),
        "area?": (_number, "a finite number")}}  # and >= 0 where the box is kept (kept_boxes)
UNIQUE = {"images": ("id",), "categories": ("id", "name"), "annotations": ("id",)}
LINKS = {"image_id": "images", "category_id": "categories"}  # what an annotation refers to
TYPES = {dict: "an object", list: "a list", str: "a string"}  # the rest _shown shows as they are
SKIPS = ("zero or negative width/height, skipped", "outside the image, skipped",
         "partly outside the image, clipped")

def _shown(value) -> str:
    """A value as the file has it (null, true, "640", NaN), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except RecursionError:  # nested deeper than json.dumps goes: its type only
        text = TYPES[type(value)] + " nested too deeply to show"
    return text if len(text) <= 60 else text[:56] + " ..."

def check_entries(ann_file: str, data: dict) -> None:
    """Entries with their FIELDS, ids unique, links known; else 'file: annotations[12] (id 7): problem'."""
    seen = {}  # (list, key) -> {value: position of its first entry}
    for key, fields in FIELDS.items():
        needed = ", ".join(field for field in fields if not field.endswith("?"))
        for position, entry in enumerate(data.get(key, [])):
            known = type(entry) is dict and INTEGER[0](entry.get("id"))  # an id to name the entry by
            where = f"{ann_file}: {key}[{position}]" + (f" (id {entry['id']})" if known else "")
            if type(entry) is not dict:
                raise DataError(f"{where} is {_shown(entry)}, not an object with {needed}")
            for field, (test, wanted) in fields.items():
                name = field.rstrip("?")
                if name == field and name not in entry:
                    raise DataError(f"{where}: '{name}' is missing (each entry of '{key}' needs {needed})")
                if name in entry and not test(entry[name]):
                    raise DataError(f"{where}: '{name}' is {_shown(entry[name])}, not {wanted}")
            for name in UNIQUE[key]:
                first = seen.setdefault((key, name), {}).setdefault(entry[name], position)
                if first != position:
                    raise DataError(f"{where}: duplicate {name} {_shown(entry[name])}, also {key}[{first}]'s")
            for name, other in LINKS.items() if key == "annotations" else ():
                if entry[name] not in seen[other, "id"]:
                    raise DataError(f"{where}: {name} {entry[name]} is not in '{other}'")

def read_coco(ann_file: str, require_annotations: bool = True) -> dict:
    """A COCO-format file as a dict, every entry checked (check_entries); DataError if not."""
    try:
        with open(ann_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is harmless
            text = f.read()
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: not UTF-8 text (byte {e.start}); COCO files are UTF-8 JSON") from e
    except OSError as e:
        raise DataError(f"{ann_file}: cannot read the annotation file ({e.strerror or e})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{ann_file}: " + (f"not valid JSON ({e})" if text.strip() else
                                           "the file is empty; expected COCO-format JSON")) from e
    if type(data) is not dict:
        raise DataError(f"{ann_file}: the top level is {TYPES.get(type(data)) or _shown(data)}, not an "
                        "object with 'images', 'annotations' and 'categories' lists; is it COCO-format?")
    optional = not require_annotations and "annotations" not in data  # COCO test-dev's has none
    for key in ("images", "categories") + (() if optional else ("annotations",)):
        if type(data.get(key)) is not list:
            found = f" ('{key}' is {_shown(data[key])})" if key in data else ""
            raise DataError(f"{ann_file}: no '{key}' list{found}; is this a COCO-format annotation file?")
        if not data[key] and key != "annotations":  # no objects at all is valid, if useless
            raise DataError(f"{ann_file}: the '{key}' list is empty")
    check_entries(ann_file, data)
    return data

def kept_boxes(ann_file: str, data: dict, cat_to_class: dict, include_crowd: bool):
    """(rows per image, the annotations COCOeval scores, {problem: ids}): empty or outside boxes skipped,
    partly outside ones clipped; crowd boxes trained on if asked."""
    images = {image["id"]: image for image in data["images"]}
    rows, kept, problems = {image_id: [] for image_id in images}, [], {p: [] for p in SKIPS}
    for position, ann in enumerate(data.get("annotations", [])):
        (x, y, w, h), image = ann["bbox"], images[ann["image_id"]]
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, image["width"]), min(y + h, image["height"])
        problem = (SKIPS[0] if w <= 0 or h <= 0 else SKIPS[1] if x2 <= x1 or y2 <= y1 else
                   SKIPS[2] if (x1, y1, x2, y2) != (x, y, x + w, y + h) else None)
        problems.get(problem, []).append(ann["id"])
        if problem in SKIPS[:2]:
            continue
        box, crowd = [x1, y1, x2 - x1, y2 - y1] if problem else ann["bbox"], int(ann.get("iscrowd", 0))
        if (area := ann.get("area", box[2] * box[3])) < 0:  # COCOeval would ignore the box, silently
            raise DataError(f"{ann_file}: annotations[{position}] (id {ann['id']}): 'area' is {area}, "
                            "not >= 0")
        kept.append({"id": ann["id"], "image_id": ann["image_id"], "bbox": box, "iscrowd": crowd,
                     "area": area, "category_id": ann["category_id"]})
        if include_crowd or not crowd:
            rows[ann["image_id"]].append((x1, y1, x2, y2, cat_to_class[ann["category_id"]], 1))
    return [rows[image["id"]] for image in data["images"]], kept, problems

def _decode(path: str, reduce: int = 1) -> tuple[Image.Image, tuple[int, int]]:
    """(8-bit RGB at 1/reduce of the size, EXIF-upright as the release's OpenCV reads it, the full
    upright size): a JPEG decoded at that scale (DCT scaling), others averaged. DataError if not."""
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
    """A COCO-format set, checked at start-up; numpy arrays (forked workers share them): files, sizes."""

    def __init__(self, image_dir: str, ann_file: str, include_crowd: bool = False,
                 require_annotations: bool = True):
        data = read_coco(ann_file, require_annotations)
        self.ann_file = str(ann_file)
        self.cat_ids = sorted(c["id"] for c in data["categories"])  # class k <-> cat_ids[k]
        self.cat_to_class = {cat_id: k for k, cat_id in enumerate(self.cat_ids)}
        self.class_names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        self.ids = [image["id"] for image in data["images"]]
        rows, kept, self.skipped = kept_boxes(self.ann_file, data, self.cat_to_class, include_crowd)
        for problem, ids in self.skipped.items():  # counted and said, with the first ids
            if ids:
                warnings.warn(f"{ann_file}: {len(ids)} box(es) {problem}; annotation ids {ids[:5]}"
                              + " ..." * (len(ids) > 5), stacklevel=2)
        if (clipped := len(self.skipped[SKIPS[2]])) > (n := len(data.get("annotations", []))) / 2:
            warnings.warn(f"{ann_file}: {clipped} of {n} boxes reach past their image: are they [x1, y1, x2, "
                          "y2]? A COCO bbox is [x, y, width, height]", stacklevel=2)
        self.coco = COCO()  # COCOeval scores what was kept: the file's boxes less the skipped, clipped
        self.coco.dataset = {k: v for k, v in data.items() if k != "annotations"} | (
            {"annotations": kept} if "annotations" in data else {})
        with contextlib.redirect_stdout(None):  # without pycocotools' progress prints
            self.coco.createIndex()
        self.files = np.array([os.path.join(image_dir, im["file_name"]) for im in data["images"]])
        self.sizes = np.array([(im["width"], im["height"]) for im in data["images"]], np.int64)  # (N, 2)
        self.first = np.cumsum([0] + [len(r) for r in rows])  # (N + 1,)
        self.rows = np.array([row for r in rows for row in r], np.float32).reshape(-1, 6)  # (M, 6)
        if missing := [i for i, path in enumerate(self.files) if not os.path.isfile(path)]:
            raise DataError(f"{self.ann_file}: {len(missing)} of {len(self)} images missing (wrong folder?), "
                            f"e.g. {self.files[missing[0]]} (image id {self.ids[missing[0]]})")

    def __len__(self) -> int:
        return len(self.ids)

    def open(self, index: int, reduce: int = 1) -> Image.Image:
        """PIL RGB at 1/reduce of its size; DataError if undecodable or not the annotation file's size."""
        image, size = _decode(str(self.files[index]), reduce)
        if size != tuple(self.sizes[index]):
            raise DataError(f"{self.files[index]}: decoded size {size[0]}x{size[1]} (after EXIF rotation) "
                            f"is not the {self.sizes[index, 0]}x{self.sizes[index, 1]} of {self.ann_file}")
        return image

    def load_image(self, index: int) -> tuple[np.ndarray, int]:
        return np.array(self.open(index)), self.ids[index]  # (uint8 (H, W, 3) RGB, writable), image id

    def load_targets(self, index: int) -> np.ndarray:
        return self.rows[self.first[index]:self.first[index + 1]].copy()  # (N, 6) [x1, y1, x2, y2, class, 1]

    def boxes_per_class(self) -> np.ndarray:
        return np.bincount(self.rows[:, 4].astype(np.int64), minlength=len(self.cat_ids))  # (C,)

# --- The demo's data: a few coloured shapes of 8 px to 60% of the image on textured backgrounds
# (Sec. 1's scale conflict in one image), drawn large to small: small ones partly hide large ones.
SYNTHETIC_CLASSES = (  # (name, shape, RGB): distinct in shape and in colour, so it learns fast
    ("red circle", "circle", (220, 40, 40)), ("green square", "square", (40, 170, 60)),
    ("blue triangle", "triangle", (40, 80, 220)), ("yellow diamond", "diamond", (230, 200, 30)),
    ("magenta cross", "cross", (200, 40, 200)))
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
    elif shape in ("triangle", "diamond"):
        corners = [(x, b), (r, b), (mx, y)] if shape == "triangle" else [(mx, y), (r, my), (mx, b), (x, my)]
        draw.polygon(corners, fill=colour)
    elif shape == "cross":  # a plus sign, arms one third thick
        tw, th = max(2, round(w / 3)), max(2, round(h / 3))
        draw.rectangle((x + (w - tw) // 2, y, x + (w - tw) // 2 + tw - 1, b), fill=colour)
        draw.rectangle((x, y + (h - th) // 2, r, y + (h - th) // 2 + th - 1), fill=colour)

def draw_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 6):
    """One synthetic image (PIL RGB) and its objects [(class, [x, y, w, h]), ...]."""
    image = Image.fromarray(_texture(rng, width, height))
    draw = ImageDraw.Draw(image)
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, max_objects + 1))  # 5% empty images
    # sides 8 px to 60% of the image, uniform in sqrt(side): a third COCO-small (log-uniform: half)
    sides = rng.uniform(np.sqrt(8), np.sqrt(0.6 * min(width, height)), n) ** 2
    objects, placed = [], np.zeros((0, 4), np.int64)  # (K, 4) corners of the boxes drawn
    for side in sorted(sides, reverse=True):  # large first, so small ones are not hidden
        aspect = np.exp(rng.uniform(-0.3, 0.3))
        w, h = int(np.clip(round(side * aspect), 8, width)), int(np.clip(round(side / aspect), 8, height))
        cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
        for _ in range(20):  # a place where the box hides at most 35% of each earlier box
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            lt, rb = np.maximum(placed[:, :2], (x, y)), np.minimum(placed[:, 2:], (x + w, y + h))
            hidden = np.prod(np.clip(rb - lt, 0, None), 1)  # (K,) overlap areas
            if (hidden <= 0.35 * np.prod(placed[:, 2:] - placed[:, :2], 1)).all():
                break
        else:
            continue
        colour = np.clip(np.add(SYNTHETIC_CLASSES[cls][2], rng.integers(-20, 21, 3)), 0, 255)
        draw_shape(draw, SYNTHETIC_CLASSES[cls][1], (x, y, w, h), tuple(colour.tolist()))
        placed = np.concatenate([placed, [(x, y, x + w, y + h)]])
        objects.append((cls, [x, y, w, h]))
    return image, objects

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
    """The synthetic set's paths, written once into root/synthetic-<hash of the arguments> (root: $ASFF_CACHE
    or ~/.cache/asff); val is the same whatever n_train (its own streams), n_train=0 writes it alone."""
    params = dict(version=SYNTHETIC_VERSION, n_train=n_train, n_val=n_val, image_size=image_size, seed=seed)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(root or os.environ.get("ASFF_CACHE") or Path.home() / ".cache" / "asff")
    folder = root / f"synthetic-{digest}"
    if not folder.is_dir():  # written under a temporary name, then renamed: complete or absent
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
        if n_train:
            _write_split(tmp, "train", n_train, image_size, image_size, seed, stream=0)
        _write_split(tmp, "val", n_val, image_size, image_size, seed, stream=1)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (a DDP rank) finished first: its files are the same
            shutil.rmtree(tmp)
    train = {"train_images": str(folder / "train"), "train_json": str(folder / "train.json")}
    return {"root": str(folder), **{key: path if n_train else None for key, path in train.items()},
            "val_images": str(folder / "val"), "val_json": str(folder / "val.json")}

# --- Paper, Sec. 3.1 (bag of freebies): mixup; both images' boxes, weighted by their ratio (mix)
def draw_mixup(rng: np.random.Generator, index: int, n: int) -> tuple[float, int]:
    """Mixup ratio lambda ~ Beta(1.5, 1.5) and a partner drawn uniformly among the other images."""
    lam, partner = float(np.clip(rng.beta(1.5, 1.5), 0, 1)), int(rng.integers(n - 1))
    return lam, partner + (partner >= index)

def mixup(image1: Image.Image, image2: Image.Image, lam: float, box=None) -> Image.Image:
    """lam * image1 + (1 - lam) * image2, both top-left on a (max W, max H) canvas, black where one does
    not reach (as released); made only in box (default: all)."""
    box = box or (0, 0, max(image1.width, image2.width), max(image1.height, image2.height))
    return Image.blend(_cut(image1, box), _cut(image2, box), 1 - lam)  # im1 (1 - a) + im2 a

def mixup_rows(rows1: np.ndarray, rows2: np.ndarray, lam: float) -> np.ndarray:
    """Both images' rows, each box carrying its image's ratio (lam, 1 - lam) as its mix."""
    rows = np.concatenate([rows1, rows2])  # (N1 + N2, 6)
    rows[:, 5] = np.repeat([lam, 1 - lam], [len(rows1), len(rows2)])
    return rows

# --- The release's augmentation (not in the paper; docs/released-code.md): colour
def draw_colour(rng: np.random.Generator) -> tuple[float, float, int, float]:
    """The released colour draws, each step with p = 0.5 -> colour_distort's arguments."""
    brightness = rng.uniform(-32, 32) if rng.random() < 0.5 else 0.0
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    hue = int(rng.integers(-18, 19)) if rng.random() < 0.5 else 0
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    return brightness, contrast, hue, saturation

def colour_distort(image: Image.Image, brightness: float = 0.0, contrast: float = 1.0, hue: int = 0,
                   saturation: float = 1.0) -> Image.Image:
    """The released colour steps: x -> clip(clip(x + brightness) * contrast), HSV hue, saturation."""
    if brightness != 0 or contrast != 1:
        lut = np.clip(np.clip(np.arange(256) + brightness, 0, 255) * contrast, 0, 255)
        image = image.point(np.tile(lut.round().astype(np.uint8), 3).tolist())
    image = rotate_hue(image, hue) if hue != 0 else image
    return saturate(image, saturation) if saturation != 1 else image

# PIL's 8-bit hue H turns in 255 steps, 6 sextants. Channel c (R, G, B centred at sextant 0, 2, 4)
# holds the share g_c(H) = clip(2 - d, 0, 1) of the chroma V - min, d its distance from its centre.
SHORTFALL = np.stack([1 - np.clip(2 - np.abs((np.arange(256) * 6 / 255 - centre + 3) % 6 - 3), 0, 1)
                      for centre in (0, 2, 4)], 1).astype(np.float32)  # (256, 3): 1 - g_c(H)

def rotate_hue(image: Image.Image, hue: int) -> Image.Image:
    """HSV hue + hue (OpenCV units: 180 is a full turn). PIL converts to HSV; back by c = V - V S
    (1 - g_c(H)): PIL's own RGB values (its round trip: 1.2-2x the time on the CPUs measured)."""
    hsv = np.asarray(image.convert("HSV"))  # (H, W, 3) uint8
    h = hsv[..., 0] + np.uint8(round(hue * 256 / 180) % 256)  # (H, W), wraps at 256 (uint8)
    v = hsv[..., 2:].astype(np.float32)  # (H, W, 1)
    chroma = v * hsv[..., 1:2] * np.float32(1 / 255)  # (H, W, 1) V S = max - min
    return Image.fromarray(np.rint(v - chroma * SHORTFALL[h]).astype(np.uint8))  # (H, W, 3)

def saturate(image: Image.Image, s: float) -> Image.Image:
    """HSV saturation * s, hue and value kept, in RGB: S = (V - min) / V with V = max(R, G, B), so
    c -> V - s (V - c) (no second HSV round trip); where s S > 1 channels clip at 0 (HSV: S at 1)."""
    r, g, b = image.split()
    v = ImageChops.lighter(ImageChops.lighter(r, g), b)
    return Image.blend(Image.merge("RGB", (v, v, v)), image, s)  # v + s (c - v)

# --- The release's augmentation: the geometric steps. Each returns its 3x3 matrix (old pixels ->
# new pixels), the moved rows and the new canvas size; only the product touches the pixels.
def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)

def move_boxes(T: np.ndarray, rows: np.ndarray) -> np.ndarray:
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
    (W, H), s = wh, rng.uniform(1, 4)
    r = math.sqrt(rng.uniform(max(0.5, 1 / s**2), min(2, s**2)))  # keeps s*r >= 1 and s/r >= 1
    w, h = max(W, int(s * r * W)), max(H, int(s / r * H))
    T = translation(rng.integers(0, w - W + 1), rng.integers(0, h - H + 1))
    return T, move_boxes(T, rows), (w, h)

CROP_MIN_IOU = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)  # SSD modes; None = no crop

def ssd_crop(rng, rows, wh, tries=50):
    """SSD crop: 0.3-1 of each side, IoU >= the drawn minimum with every box; centres inside kept."""
    W, H = wh
    identity, boxes = (np.eye(3), rows, wh), torch.from_numpy(rows[:, :4].astype(np.float64))  # (N, 4)
    for _ in range(50 if len(rows) else 0):  # the release retries forever; 50 modes fail seldom
        min_iou = CROP_MIN_IOU[rng.integers(len(CROP_MIN_IOU))]
        if min_iou is None:
            return identity
        scale = rng.uniform(0.3, 1, tries)  # the release's 50 windows, drawn at once
        ratio = np.sqrt(rng.uniform(np.maximum(0.5, scale**2), np.minimum(2, 1 / scale**2)))
        w, h = np.maximum(1, (scale * ratio * W).astype(int)), np.maximum(1, (scale / ratio * H).astype(int))
        left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        rois = np.stack([left, top, left + w, top + h], 1).astype(np.float64)  # (R, 4)
        centres = (rows[:, :2] + rows[:, 2:4]) / 2  # (N, 2)
        inside = ((rois[:, None, :2] < centres) & (centres < rois[:, None, 2:])).all(2)  # (R, N)
        iou = box_iou(torch.from_numpy(rois), boxes).numpy()  # (R, N)
        if (ok := (iou.min(1) >= min_iou) & inside.any(1)).any():
            k = int(np.argmax(ok))
            kept = rows[inside[k]].copy()
            kept[:, :4] = np.clip(kept[:, :4], rois[k, [0, 1, 0, 1]], rois[k, [2, 3, 2, 3]])
            T = translation(-rois[k, 0], -rois[k, 1])
            return T, move_boxes(T, kept), (int(w[k]), int(h[k]))
    return identity

def hflip(rng, rows, wh):
    T = np.array([[-1, 0, wh[0]], [0, 1, 0], [0, 0, 1]], np.float64)  # mirror left-right: x -> W - x
    return T, move_boxes(T, rows), wh

def random_affine(rng, rows, wh, degrees=10.0, translate=0.1, scale=0.1, shear=2.0):
    """A = S @ T @ R: rotation about the centre with scale, translation, shear. Boxes: enclosing box of
    the moved corners, shrunk by sqrt(max(|sin a|, |cos a|)) (the release's correction), clipped."""
    W, H = wh
    a, s = math.radians(rng.uniform(-degrees, degrees)), rng.uniform(1 - scale, 1 + scale)
    alpha, beta = s * math.cos(a), s * math.sin(a)  # OpenCV's getRotationMatrix2D(centre, a, s)
    R = np.array([[alpha, beta, (1 - alpha) * W / 2 - beta * H / 2],
                  [-beta, alpha, beta * W / 2 + (1 - alpha) * H / 2], [0, 0, 1]])
    # x shifts by a fraction of the width, y of the height (the release swaps them)
    T = translation(rng.uniform(-translate, translate) * W, rng.uniform(-translate, translate) * H)
    sx, sy = (math.tan(math.radians(rng.uniform(-shear, shear))) for _ in range(2))
    A = np.array([[1, sx, 0], [sy, 1, 0], [0, 0, 1]]) @ T @ R
    out = move_boxes(A, rows)
    centre, half = (out[:, :2] + out[:, 2:4]) / 2, (out[:, 2:4] - out[:, :2]) / 2
    half *= math.sqrt(max(abs(math.sin(a)), abs(math.cos(a))))
    out[:, :4] = np.clip(np.concatenate([centre - half, centre + half], 1), 0, [W, H, W, H])
    return A, out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])], wh

def resize_matrix(wh, size: int) -> np.ndarray:
    return np.diag([size / wh[0], size / wh[1], 1.0])  # a W x H image to size x size (aspect changes)

def geometry(rng, rows, wh, size):
    """The released geometric steps: one matrix M (source -> output pixels), the rows, the crop window."""
    M = np.eye(3)
    for step, p in ((expand, 0.5), (ssd_crop, 1.0), (hflip, 0.5), (random_affine, 0.5)):
        if step is random_affine:  # so far M only shifts and mirrors: the canvas is a rectangle
            window = move_boxes(np.linalg.inv(M), np.array([[0, 0, *wh, 0, 0]]))[0, :4]
        if rng.random() < p:
            T, rows, wh = step(rng, rows, wh)
            M = T @ M
    T = resize_matrix(wh, size)
    return T @ M, move_boxes(T, rows), window

# --- The release's augmentation: every draw of a sample first (a Plan), then the pixels
class Plan(NamedTuple):
    colour: tuple  # colour_distort's (brightness, contrast, hue, saturation)
    M: np.ndarray  # (3, 3) source pixels -> output pixels: the product of the geometric steps
    window: tuple  # (x1, y1, x2, y2) of the source that the crop keeps; the rest: the mean colour
    resample: int  # Image.NEAREST or Image.BILINEAR
    rows: np.ndarray  # (N, 6) in output pixels

NO_COLOUR = (0.0, 1.0, 0, 1.0)  # colour_distort's arguments that change nothing

def plain_resize(rows: np.ndarray, wh, size: int) -> Plan:
    """No augmentation: the image resized to size x size, bilinear, with all its boxes."""
    M = resize_matrix(wh, size)
    return Plan(NO_COLOUR, M, (0, 0, *wh), Image.BILINEAR, move_boxes(M, rows))

def draw_augmentation(rng: np.random.Generator, rows: np.ndarray, wh, size: int, min_size=6.0) -> Plan:
    """The released draws: colour, geometry, resampling; boxes <= min_size dropped (none left: plain)."""
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
    """Pixel p shows source pixel M^-1 p (the fill colour outside): every geometric step in one resampling."""
    if resample == Image.BILINEAR and M[0, 1] == M[1, 0] == 0 and M[1, 1] > 0:
        return _scale(image, M, size)
    inverse = tuple(np.linalg.inv(M)[:2].ravel())  # output pixel -> source pixel
    return image.transform((size, size), Image.AFFINE, inverse, resample, fillcolor=FILL)

def _scale(image: Image.Image, M: np.ndarray, size: int) -> Image.Image:
    """warp's bilinear M of scale, shift and mirroring only, by PIL's resize (2-3x faster than its
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
    if out is not None:
        out.paste(part, (a, c))
    return part if out is None else out

def _cut(image: Image.Image, box: tuple) -> Image.Image:
    return image if box == (0, 0, *image.size) else image.crop(box)  # black beyond the image

def render(images: list, lam: float, plan: Plan, size: int, reduce: int = 1) -> Image.Image:
    """A sample's pixels from its image(s) decoded at 1/reduce: mixup and colour on the crop window
    alone (pixel by pixel: the same pixels for less work), then one warp to the size."""
    W, H = max(im.width for im in images), max(im.height for im in images)  # mixup's canvas
    x1, y1, x2, y2 = (round(v / reduce) for v in plan.window)
    x1, y1 = max(0, x1), max(0, y1)
    box = (x1, y1, max(x1 + 1, min(W, x2)), max(y1 + 1, min(H, y2)))
    image = mixup(*images, lam, box) if len(images) == 2 else _cut(images[0], box)
    image = colour_distort(image, *plan.colour)
    M = plan.M @ np.diag([reduce, reduce, 1.0]) @ translation(x1, y1)  # box pixels -> output pixels
    return warp(image, M, size, plan.resample)

# --- Training samples and batches; paper Sec. 3.4: random input shapes
class TrainDataset(torch.utils.data.Dataset):
    """Augmented (and mixed) training samples at a fixed size; names the categories without a box."""

    def __init__(self, data: CocoDetection, size: int = 608, seed: int = 0, mixup: bool = True,
                 augment: bool = True, min_size: float = 6.0):
        if "annotations" not in data.coco.dataset:
            raise DataError(f"{data.ann_file}: no 'annotations'; cannot train on it")
        self.data, self.size, self.seed, self.min_size = data, size, seed, min_size
        self.mixup, self.augment, self.epoch, self.unreadable = mixup, augment, 0, set()  # (this process's)
        empty = [f"{i} {_shown(name)}" for i, name, n in zip(data.cat_ids, data.class_names,
                                                             data.boxes_per_class(), strict=True) if n == 0]
        if empty and os.environ.get("RANK", "0") == "0":
            print(f"warning: {data.ann_file}: categories without a training box, which the model learns "
                  f"never to predict (id name): {', '.join(empty)}", file=sys.stderr, flush=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # new draws for every sample: set before the epoch's DataLoader starts

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
        while (sample := self._sample(index)) is None:  # an image was unreadable: drawn without it
            pass
        return sample

    def _sample(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])  # the sample's own stream
        picks, lam = [self._readable(index)], 1.0
        if self.mixup and len(self) > 1:
            lam, partner = draw_mixup(rng, index, len(self))
            picks.append(self._readable(partner))
        rows = [self.data.load_targets(j) for j in picks]
        rows = mixup_rows(*rows, lam) if len(picks) == 2 else rows[0]  # (N, 6)
        canvas = tuple(self.data.sizes[picks].max(0))  # mixup's (max W, max H)
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
    """worker_init_fn: a signal to the process group (Ctrl-C, SLURM) is the main process's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> contiguous uint8 (3, H, W): the float conversion then runs 3x faster than on a view."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))  # (3, H, W)

def loss_targets(rows: torch.Tensor) -> torch.Tensor:
    """Rows (N, 6) [x1, y1, x2, y2, class, mix] -> the loss's (N, 6) [class, cx, cy, w, h, mix]."""
    x1, y1, x2, y2, cls, mix = rows.unbind(1)
    return torch.stack([cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, mix], 1)  # (N, 6)

def _normalize_(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in 0..255 -> (x / 255 - MEAN) / STD, in place, on x's device."""
    for c, (mean, std) in enumerate(zip(MEAN, STD)):  # Python floats: nothing to copy to a GPU and wait
        x[:, c].mul_(1 / (255 * std)).add_(-mean / std)  # (B, H, W)
    return x

def normalize(image: np.ndarray, size) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size): bilinear resize as released (OpenCV's), ImageNet mean, std."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)  # (1, 3, h, w)
    return _normalize_(x)[0]

def stack_batch(batch):
    """[(uint8 (3, S, S), rows (N_i, 6)), ...] -> (uint8 (B, 3, S, S), B x (N_i, 6) loss targets)."""
    return torch.stack([image for image, _ in batch]), [loss_targets(rows) for _, rows in batch]

def collate(batch):
    """stack_batch, the images normalised: (float (B, 3, S, S), B x (N_i, 6) loss targets)."""
    return to_input(*stack_batch(batch))

def to_input(images: torch.Tensor, targets: list, size: int | None = None):
    """uint8 (B, 3, H, W) on any device (1/4 of float's bytes to copy) -> collate's batch, resized."""
    x = _normalize_(images.float())  # (B, 3, H, W)
    return resize_batch(x, targets, size) if size else (x, targets)

def random_size(seed: int, iteration: int, every: int = 10, sizes=SIZES) -> int:
    """Sec. 3.4 random shapes: from (seed, iteration // every) only, so DDP ranks agree unasked."""
    rng = np.random.default_rng([seed, iteration // every])
    return int(sizes[rng.integers(len(sizes))])

def resize_batch(images: torch.Tensor, targets: list, size: int):
    """Resize a (B, 3, H, W) batch to (B, 3, size, size) and scale its boxes to match."""
    B, _, H, W = images.shape
    if (H, W) == (size, size):
        return images, targets
    images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False)  # (B, 3, size, size)
    scale = images.new_ones(6)  # [cls, cx, cy, w, h, mix], filled on the device (no copy, no wait)
    scale[1:5:2], scale[2:5:2] = size / W, size / H
    return images, [t * scale for t in targets]

# --- The script: `python data.py` draws training samples; --check reads a data set as training does
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
    print(f"wrote {Path(out) / 'asff_data_demo.png'}: 8 training samples (labels: class, mix ratio)")

def check(image_dir: str, ann_file: str, include_crowd: bool = False) -> None:
    """Read a data set as training does, decode every image, and print what was found."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        data = CocoDetection(image_dir, ann_file, include_crowd)
    per_class, (w0, h0), (w1, h1) = data.boxes_per_class(), data.sizes.min(0), data.sizes.max(0)
    print(f"{data.ann_file}: {len(data)} images ({(np.diff(data.first) == 0).sum()} without boxes), widths "
          f"{w0}-{w1}, heights {h0}-{h1} px; {len(data.rows)} boxes to train on in {len(per_class)} classes")
    print("  boxes per class: " + ", ".join(f"{name} {n}" for name, n in zip(data.class_names, per_class)))
    crowd = sum(a["iscrowd"] for a in data.coco.dataset.get("annotations", []))
    print(f"  crowd boxes: {crowd} (scored as COCO's ignore regions; trained on with --include-crowd)")
    for warning in said:  # skipped and clipped boxes: how many, which
        print("  " + str(warning.message).removeprefix(f"{data.ann_file}: "))
    unreadable = []
    for i in range(len(data)):
        try:
            data.open(i, reduce=8)  # every byte decoded (a JPEG at 1/8: the cheapest way)
        except DataError:
            unreadable.append(i)
    print(f"  decoded all {len(data)} images" if not unreadable else f"  {len(unreadable)} of {len(data)} "
          f"images unreadable (training uses the next one instead), e.g. {data.files[unreadable[0]]}")

def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs", help="folder for asff_data_demo.png")
    parser.add_argument("--root", default=None, help="cache folder; none: $ASFF_CACHE or ~/.cache/asff")
    parser.add_argument("--seed", type=NATURAL, default=0, help="the synthetic set's and the draws'")
    parser.add_argument("--check", action="store_true", help="read --images and --ann as training does")
    parser.add_argument("--images", help="image folder (with --check)")
    parser.add_argument("--ann", help="COCO-format annotation file (with --check)")
    parser.add_argument("--include-crowd", action="store_true", help="as train.py's")
    args = parser.parse_args(argv)
    if args.check != bool(args.images and args.ann) or bool(args.images) != bool(args.ann):
        parser.error("--check needs --images and --ann, and they need --check")
    check(args.images, args.ann, args.include_crowd) if args.check else demo(args.out, args.root, args.seed)

if __name__ == "__main__":
    exit_on_user_error(main)
