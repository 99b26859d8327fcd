"""COCO evaluation and Figure 3 pictures - paper Sec. 3.4, Tables 3-4 (AP), Figure 3.

Inference (Sec. 3.4): plain resize to the test size (the release's preprocessing; letterbox is an
option), the model's eval-mode decode (head.py), then `postprocess`: corners from (cx, cy, w, h),
score = obj * class probability (one label per box, the argmax class, as released; multi-label
is an option), a low confidence threshold (COCO AP needs the tail), greedy NMS separately per
class at IoU 0.6 (the paper; the release used 0.65, `--nms 0.65`), at most 100 boxes per image.

Public entry points:
    postprocess(decoded (B, N, 5+C), conf_thre, nms_thre, max_det) -> list of B (K, 7) tensors
        columns [x1, y1, x2, y2, score, class, obj] in input pixels, by descending score
    batched_nms(boxes (K, 4), scores (K,), classes (K,), iou_thre) -> kept indices (K',)
    to_original(det (K, 7), input_hw, original_hw, letterbox=False) -> (K, 7) in image pixels
    to_coco_results(dets, image_ids, cat_ids) -> COCO results list ([x, y, w, h], real ids)
    coco_score(coco_gt, results, image_ids) -> {"AP", "AP50", ..., "ARl"} (pycocotools COCOeval)
    evaluate(model, dataset, size=608, ...) -> dict of floats; sharded over torch.distributed
        ranks when a process group is up (train.py calls it); scores against dataset.coco,
        which data.CocoDetection builds from the boxes it kept
    check_classes(model, dataset, weights) -> DataError unless model.num_classes equals the
        data set's category count (evaluate and the command line call it first)
    load_model(weights, **config) -> Detector from our checkpoint, a released one or darknet's
    draw_figure3(image, detections, maps, class_names) -> PIL.Image (Figure 3)
    show(model, image, out, size, class_names) -> path of the Figure 3 PNG (train.py's demo)

Command line (`python evaluate.py -h`; no arguments prints the help and a toy NMS example):
    python evaluate.py --weights yolov3_asff.pth --data /coco --size 608    # val2017 AP
    python evaluate.py --weights ckpt.pt --data /coco --test-dev --out run/  # server file
    python tests/bench.py speed --runs 5 --threads 1                         # Tables 3-4 FPS
    python evaluate.py --show img.jpg --weights ckpt.pt --out run/           # Figure 3
    torchrun --nproc_per_node 4 evaluate.py --weights ...                    # sharded

Departures from the release: NMS 0.6 (paper) rather than 0.65; a 100-box cap per image (COCO
scores only the top 100 anyway); pure-PyTorch NMS instead of torchvision's. Like the release,
boxes are not clipped to the image and no +1 is added to widths.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CONF_THRE = 0.005   # low, as COCO AP needs (the release: 0.001 in eval.py, 0.01 in main.py)
NMS_THRE = 0.6      # Sec. 3.4; the release's config moved to 0.65 after publication
MAX_DET = 100       # COCOeval's maxDets: more boxes per image are never scored
DRAW_CONF = 0.3     # pictures (--detect, --show) draw boxes over this score
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")   # order of COCOeval.stats
PAPER_COLUMNS = COCO_STATS[:6]                                # Tables 3-4
COCO_NAMES = tuple(n.replace("_", " ") for n in (  # the 80 classes, in sorted-id order (the
    # release's demo.py indexed a 90-name list and labelled most classes wrongly:
    # docs/released-code.md, demo class names)
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush").split())
COCO_CAT_IDS = tuple(k for k in range(1, 91) if k not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


# ---------------------------------------------------------------------------------------------
# Post-processing (Sec. 3.4): threshold, per-class NMS, top 100
# ---------------------------------------------------------------------------------------------
def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) [cx, cy, w, h] -> (..., 4) [x1, y1, x2, y2]."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of corner boxes: (N, 4), (M, 4) -> (N, M)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])                   # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])                   # (N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)                              # (N, M)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)                              # (N,)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)                              # (M,)
    return inter / (area_a[:, None] + area_b[None, :] - inter)           # (N, M)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                iou_thre: float, max_det: int | None = None, chunk: int = 512) -> torch.Tensor:
    """Greedy NMS separately per class; indices of the kept boxes by descending score.

    A box is dropped when its IoU with a kept, higher-scoring box of its class is > iou_thre.
    Equal scores keep input order (stable sort). The offset trick moves each class to its own
    region of the plane, so boxes of different classes never overlap and one greedy pass over
    all classes does the per-class NMS; float64 keeps that shift (up to C x span) exact.
    Candidates are taken in chunks by score, so memory stays O(chunk^2) and the pass stops as
    soon as `max_det` boxes are kept (the greedy order makes those the top max_det).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    b = boxes.double()                                                   # (K, 4)
    span = b.max() - b.min() + 1.0
    b = b - b.min() + classes.double()[:, None] * span                   # (K, 4) class-shifted
    order = scores.argsort(descending=True, stable=True)                 # (K,)
    b = b[order]                                                         # (K, 4) by score
    limit = max_det or len(order)
    kept: list[int] = []                                                 # positions in `order`
    for start in range(0, len(order), chunk):
        block = b[start:start + chunk]                                   # (M, 4)
        dead = torch.zeros(len(block), dtype=torch.bool, device=b.device)  # (M,)
        if kept:                                                         # earlier keepers
            dead = (box_iou(b[kept], block) > iou_thre).any(0)           # (M,)
        overlap = (box_iou(block, block) > iou_thre).cpu().numpy()       # (M, M)
        dead = dead.cpu().numpy().copy()
        # The greedy pass itself is sequential; it walks numpy views of the two masks because
        # a per-element torch index costs microseconds (it runs once per candidate).
        for i in range(len(block)):
            if dead[i]:
                continue
            kept.append(start + i)
            if len(kept) == limit:
                return order[kept]
            dead |= overlap[i]
    return order[kept]


def postprocess(decoded: torch.Tensor, conf_thre: float = CONF_THRE, nms_thre: float = NMS_THRE,
                max_det: int = MAX_DET, multi_label: bool = False) -> list[torch.Tensor]:
    """Decoded rows (B, N, 5+C) -> per image (K, 7) [x1, y1, x2, y2, score, class, obj].

    score = obj * class probability; class is the contiguous index (a float column); obj is the
    objectness alone. Rows by descending score, K <= max_det. With multi_label every
    (box, class) pair over the threshold is a candidate; otherwise only the argmax class.
    """
    return [_postprocess_image(p, conf_thre, nms_thre, max_det, multi_label) for p in decoded]


def _postprocess_image(p: torch.Tensor, conf_thre: float, nms_thre: float, max_det: int,
                       multi_label: bool) -> torch.Tensor:
    p = p[p[:, 4] >= conf_thre]       # (N', 5+C) class probs <= 1, so obj >= conf is necessary
    obj = p[:, 4]                                                        # (N',)
    if multi_label:
        rows, cls = (p[:, 5:] * obj[:, None] >= conf_thre).nonzero(as_tuple=True)  # (K,), (K,)
        score = p[rows, 5 + cls] * obj[rows]                             # (K,)
    else:
        cls_prob, cls = p[:, 5:].max(1)                                  # (N',), (N',)
        score = obj * cls_prob                                           # (N',) obj * max cls
        rows = (score >= conf_thre).nonzero().squeeze(1)                 # (K,)
        cls, score = cls[rows], score[rows]                              # (K,), (K,)
    boxes = xywh_to_xyxy(p[rows, :4])                                    # (K, 4)
    keep = batched_nms(boxes, score, cls, nms_thre, max_det)             # (K',)
    columns = (score[keep, None], cls[keep, None].to(p.dtype), obj[rows][keep, None])
    return torch.cat((boxes[keep], *columns), dim=1)                     # (K', 7)


# ---------------------------------------------------------------------------------------------
# Input pixels <-> original image pixels
# ---------------------------------------------------------------------------------------------
def letterbox_geometry(original_hw: tuple[int, int], input_hw: tuple[int, int]):
    """Letterbox: the image resized to (new_w, new_h) keeping its aspect, pasted at (pad_x,
    pad_y) of the input. Returns (new_w, new_h, pad_x, pad_y)."""
    (h, w), (in_h, in_w) = original_hw, input_hw
    r = min(in_w / w, in_h / h)
    new_w, new_h = round(w * r), round(h * r)
    return new_w, new_h, (in_w - new_w) // 2, (in_h - new_h) // 2


def to_original(det: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int],
                letterbox: bool = False) -> torch.Tensor:
    """(K, 7) detections in input pixels -> (K, 7) in the original image's pixels (a new tensor).

    Plain resize (the default, as released): x * (orig_w / in_w), y * (orig_h / in_h).
    Letterbox: the inverse of `letterbox_geometry`, (x - pad_x) * (orig_w / new_w).
    """
    (in_h, in_w), (h, w) = input_hw, original_hw
    new_w, new_h, pad_x, pad_y = (letterbox_geometry(original_hw, input_hw) if letterbox
                                  else (in_w, in_h, 0, 0))
    out = det.clone()                                                    # (K, 7)
    out[:, [0, 2]] = (det[:, [0, 2]] - pad_x) * (w / new_w)
    out[:, [1, 3]] = (det[:, [1, 3]] - pad_y) * (h / new_h)
    return out


def preprocess(image: np.ndarray, size: int, letterbox: bool = False,
               darknet: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size) input: data.normalize's plain resize (the release's),
    or the same resize to the letterbox area, pasted on zeros (= the ImageNet mean colour).

    darknet: the input darknet's own models (yolov3.weights) were trained on - pixels / 255,
    no mean or std, letterbox bars of 0.5 (darknet's letterbox_image).
    """
    from data import normalize
    new_w, new_h, pad_x, pad_y = (letterbox_geometry(image.shape[:2], (size, size)) if letterbox
                                  else (size, size, 0, 0))
    if darknet:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255   # (1, 3, H, W)
        resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    else:
        resized = normalize(image, (new_h, new_w))                       # (3, new_h, new_w)
    if not letterbox:
        return resized                                                   # (3, size, size)
    x = torch.full((3, size, size), 0.5 if darknet else 0.0)             # (3, size, size)
    x[:, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    return x


# ---------------------------------------------------------------------------------------------
# COCO results and scoring (pycocotools)
# ---------------------------------------------------------------------------------------------
def to_coco_results(detections: list[torch.Tensor], image_ids: list[int],
                    cat_ids: list[int]) -> list[dict]:
    """Per-image (K, 7) detections in original pixels -> COCO results: [x, y, w, h] (w = x2 - x1,
    no +1, as released) and the data set's own category id cat_ids[class]."""
    results = []
    for det, image_id in zip(detections, image_ids):
        for x1, y1, x2, y2, score, cls, _ in det.tolist():
            results.append({"image_id": int(image_id), "category_id": int(cat_ids[int(cls)]),
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2),
                                     round(y2 - y1, 2)],
                            "score": round(score, 5)})
    return results


def check_results(results: list[dict], coco_gt, source: str = "the annotation file") -> None:
    """Refuse results whose category or image id the annotations do not know (before
    pycocotools, whose own message is an assert or a KeyError deep inside COCOeval)."""
    known_cats, known_images = set(coco_gt.getCatIds()), set(coco_gt.getImgIds())
    bad_cats = sorted({r["category_id"] for r in results} - known_cats)
    if bad_cats:
        raise ValueError(f"results use category id(s) {bad_cats[:10]} that {source} does not "
                         f"define (it has {len(known_cats)} categories: {sorted(known_cats)[:10]}"
                         f"{'...' if len(known_cats) > 10 else ''})")
    bad_images = sorted({r["image_id"] for r in results} - known_images)
    if bad_images:
        raise ValueError(f"results use image id(s) {bad_images[:10]} that {source} does not have")


def coco_score(coco_gt, results: list[dict], image_ids: list[int] | None = None,
               verbose: bool = True) -> dict[str, float]:
    """COCOeval(bbox) of `results` over `image_ids` (default: all) -> the 12 stats as floats.

    Prints pycocotools' 12-line summary when verbose. No detections at all scores 0.
    """
    check_results(results, coco_gt)
    if not results:
        print("no detections: every AP and AR is 0")
        return dict.fromkeys(COCO_STATS, 0.0)
    out = sys.stdout if verbose else io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to each dict
        from pycocotools.cocoeval import COCOeval
        cocoeval = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            cocoeval.params.imgIds = sorted(image_ids)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, cocoeval.stats)}


def format_paper_row(metrics: dict[str, float]) -> str:
    """The paper's columns (AP, AP50, AP75, APs, APm, APl) in percent, as in Tables 3-4."""
    head = "".join(f"{k:>7}" for k in PAPER_COLUMNS)
    row = "".join(f"{100 * metrics[k]:>7.1f}" for k in PAPER_COLUMNS)
    return f"{head}\n{row}"


# ---------------------------------------------------------------------------------------------
# Evaluation loop: one process or sharded over torch.distributed ranks
# ---------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _image_name(dataset, index: int) -> str:
    image_id = dataset.ids[index]
    info = getattr(dataset, "coco", None) and dataset.coco.imgs.get(image_id)
    return info["file_name"] if info else f"image id {image_id}"


def _load_batch(dataset, indices, size, letterbox, darknet, failures):
    """Load and preprocess images; a failing image is named, counted and left out."""
    inputs, metas = [], []
    for index in indices:
        try:
            image, image_id = dataset.load_image(index)
        except Exception as e:  # noqa: BLE001 - any decode failure: name it, skip the image
            failures.append(_image_name(dataset, index))
            print(f"skipped {failures[-1]}: {type(e).__name__}: {e}", flush=True)
            continue
        inputs.append(preprocess(image, size, letterbox, darknet))       # (3, S, S)
        metas.append((index, image_id, image.shape[:2]))
    return inputs, metas


def _infer_shard(model, dataset, indices, size, post, letterbox, darknet, batch_size, amp_dtype,
                 progress) -> tuple[dict[int, list[dict]], list[str]]:
    """Detections of the images at `indices`: {dataset index: COCO result dicts}, failures."""
    device = next(model.parameters()).device
    per_image, failures = {}, []
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        inputs, metas = _load_batch(dataset, batch, size, letterbox, darknet, failures)
        if inputs:
            x = torch.stack(inputs).to(device)                           # (B, 3, S, S)
            with torch.no_grad(), torch.autocast(device.type, amp_dtype,
                                                 enabled=amp_dtype is not None):
                decoded = model(x).float()                               # (B, N, 5+C)
            for det, (index, image_id, hw) in zip(postprocess(decoded, **post), metas):
                det = to_original(det.cpu(), (size, size), hw, letterbox)  # (K, 7)
                per_image[index] = to_coco_results([det], [image_id], dataset.cat_ids)
        progress(len(batch))
    return per_image, failures


def _progress(total: int, world: int, verbose: bool):
    """A rank-0 status line every ~5 s: images done (rank 0's count x ranks) / total, rate, ETA."""
    state = {"done": 0, "start": time.time(), "last": 0.0}

    def step(n: int) -> None:
        state["done"] += n * world
        now = time.time()
        if verbose and (now - state["last"] > 5 or state["done"] >= total):
            done = min(state["done"], total)
            rate = done / max(now - state["start"], 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            print(f"eval {done}/{total} images  {rate:.1f} img/s  ETA {eta:.0f}s", flush=True)
            state["last"] = now
    return step


def check_classes(model, dataset, weights: str | None = None) -> None:
    """The model's class k is the data set's category cat_ids[k]: a model of another class
    count is refused before any image is run (with fewer classes some categories could never be
    detected, with more the extra ones have no category id)."""
    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != len(dataset.cat_ids):
        from data import DataError
        raise DataError(f"{weights or 'the model'}: {classes} classes, but "
                        f"{getattr(dataset, 'ann_file', 'the data set')} has "
                        f"{len(dataset.cat_ids)} categories; evaluate a model on the categories "
                        "it was trained on")


def evaluate(model, dataset, size: int = 608, conf_thre: float = CONF_THRE,
             nms_thre: float = NMS_THRE, max_det: int = MAX_DET, multi_label: bool = False,
             letterbox: bool = False, batch_size: int = 8, limit: int | None = None,
             test_dev: bool = False, out: str | None = None, amp_dtype: torch.dtype | None = None,
             verbose: bool = True, darknet_input: bool = False) -> dict[str, float]:
    """COCO evaluation of `model` (the bare Detector, not its DDP wrapper) on `dataset`
    (data.CocoDetection or anything with .coco, .cat_ids, .ids and
    load_image(index) -> (uint8 HxWx3 RGB, image_id)).

    Under torch.distributed each rank runs images rank, rank + world, ...; detections are
    gathered with all_gather_object, rank 0 scores, and every rank returns rank 0's dict:
    the 12 COCO stats (not with test_dev) plus images, failed_images, detections, seconds.
    darknet_input: preprocess as darknet does (pixels / 255, for darknet's yolov3.weights).
    `out` (rank 0): metrics.json and the results JSON; test_dev writes only the results file.
    """
    check_classes(model, dataset)
    rank, world = _rank_world()
    start, n = time.time(), len(dataset) if limit is None else min(limit, len(dataset))
    post = dict(conf_thre=conf_thre, nms_thre=nms_thre, max_det=max_det, multi_label=multi_label)
    was_training = model.training
    model.eval()
    part = _infer_shard(model, dataset, list(range(rank, n, world)), size, post, letterbox,
                        darknet_input, batch_size, amp_dtype,
                        _progress(n, world, verbose and rank == 0))
    model.train(was_training)
    parts = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    metrics = {}
    if rank == 0:
        per_image = {i: r for p, _ in parts for i, r in p.items()}
        failures = [name for _, f in parts for name in f]
        results = [r for i in sorted(per_image) for r in per_image[i]]   # dataset order
        image_ids = [dataset.ids[i] for i in range(n)]                   # failed ones included
        metrics = _report(dataset, results, image_ids, failures, test_dev, out, verbose, start)
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _report(dataset, results, image_ids, failures, test_dev, out, verbose,
            start) -> dict[str, float]:
    """Rank 0: score (or write the test-dev file), print, and write `out`."""
    counts = {"images": float(len(image_ids)), "failed_images": float(len(failures)),
              "detections": float(len(results)), "seconds": time.time() - start}
    if verbose:
        named = ": " + ", ".join(failures[:5]) if failures else ""
        print(f"evaluated {len(image_ids)} images, {len(results)} detections, "
              f"{len(failures)} failed to decode{named}")
    check_results(results, dataset.coco)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
    if test_dev:   # the evaluation server's file name rule: detections_test-dev2017_<alg>_results
        path = Path(out or ".") / "detections_test-dev2017_asff_results.json"
        path.write_text(json.dumps(results))
        print(f"wrote {path} for the COCO test-dev server (not scored here)")
        return counts
    metrics = coco_score(dataset.coco, results, image_ids, verbose) | counts
    if verbose:
        print(format_paper_row(metrics))
    if out:
        (Path(out) / "results.json").write_text(json.dumps(results))
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# ---------------------------------------------------------------------------------------------
# Weights: our checkpoints, the authors' released ones, darknet's yolov3.weights
# ---------------------------------------------------------------------------------------------
CONFIG_KEYS = ("num_classes", "fusion", "guided", "spp", "rfb", "dropblock", "width", "depth",
               "anchors")


def read_checkpoint(path: str) -> dict:
    """torch.load(path, weights_only=True) of a checkpoint or state dict; anything else is a
    UserError naming the file and what it is not (missing, empty, not a torch file, code)."""
    from data import UserError
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file")
    if file.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and weights-only refusals alike
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"{path}: not a checkpoint that torch.load(weights_only=True) can read "
                        f"({type(e).__name__}: {detail})") from e
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: holds a {type(state).__name__}, not a checkpoint or state dict")
    return state


def is_training_checkpoint(state: dict) -> bool:
    """train.py's checkpoints: model, optimizer and config side by side (see train.py)."""
    return all(k in state for k in ("model", "optimizer", "config"))


def load_foreign(load, path: str, *args):
    """Call a foreign-weights loader (head.load_released, darknet.read_darknet_weights); its
    key, shape and length errors become UserErrors naming the file."""
    from data import UserError
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    try:
        return load(*args)
    except (KeyError, ValueError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise UserError(message if str(path) in message else f"{path}: {message}") from e


def released_config(state: dict) -> dict:
    """Detector arguments of a released checkpoint, read off its keys: ASFF has level_*_fusion,
    ASFF* has an RFB in each head; the s32 head's conv has 4 x (5 + C) outputs."""
    keys = [k.removeprefix("module.") for k in state]
    asff = any(k.startswith("level_0_fusion.") for k in keys)
    head = "level_0_header.conv.weight" if asff else "module_list.19.conv.weight"
    weight = state.get(head, state.get("module." + head))
    if weight is None:
        raise KeyError(f"no {head}: not a released baseline / ASFF / ASFF* detector checkpoint")
    return dict(num_classes=weight.shape[0] // 4 - 5, fusion="asff" if asff else None,
                rfb=any(".rfb." in k for k in keys))


def load_checked(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict, but the first missing, unexpected or mis-shaped key is an error naming
    the key and both shapes (our checkpoints; the released ones go through head.load_released)."""
    ours = model.state_dict()
    for key in [*ours, *(k for k in state if k not in ours)]:
        mine = tuple(ours[key].shape) if key in ours else "absent"
        theirs = tuple(state[key].shape) if key in state else "absent"
        if mine != theirs:
            raise ValueError(f"{source}: key {key}: checkpoint {theirs}, model {mine} "
                             "(the checkpoint was made for another configuration)")
    model.load_state_dict(state)


def checkpoint_config(ckpt: dict) -> dict:
    """Detector arguments of our checkpoint: its config's CONFIG_KEYS; num_classes, which
    train.py takes from the data set rather than the config, is read off the s32 head."""
    config = {k: ckpt["config"][k] for k in CONFIG_KEYS if k in ckpt["config"]}
    if config.get("fusion") == "none":
        config["fusion"] = None
    if config.get("anchors") == "auto":
        config["anchors"] = None
    if "num_classes" not in config:
        slots = 4 if config.get("guided", True) else 3           # 5 + C outputs per slot
        config["num_classes"] = ckpt["model"]["heads.s32.pred.weight"].shape[0] // slots - 5
    return config


def load_model(weights: str | None = None, ema: bool | None = None, **config):
    """A Detector with weights from `weights`:
    - our checkpoint {"model": state dict, "config": {...}, "ema": state dict or None}
      (train.py): built from checkpoint_config (`config` arguments are ignored); the EMA weights
      when there are any (train.py evaluates those) unless ema=False; ema=True requires them;
    - an authors' checkpoint (a bare state dict): the variant read off its keys, head.load_released;
    - darknet's yolov3.weights: the original YOLOv3 layout (fusion=None, guided=False, spp=False);
    - None: random initialisation from `config` (for speed runs and smoke tests).
    """
    from head import Detector, load_released
    if weights is None:
        return Detector(**config)
    if str(weights).endswith(".weights"):
        from darknet import read_darknet_weights
        model = Detector(config.get("num_classes", 80), fusion=None, guided=False, spp=False)
        load_foreign(read_darknet_weights, weights, str(weights), model.darknet_layers())
        return model
    state = read_checkpoint(weights)
    if "config" in state and "model" in state:
        has_ema = state.get("ema") is not None
        if ema and not has_ema:
            raise ValueError(f"{weights}: the checkpoint holds no EMA weights (trained with ema 0)")
        model = Detector(**checkpoint_config(state))
        load_checked(model, state["ema" if has_ema and ema is not False else "model"], str(weights))
        return model
    model = Detector(**load_foreign(released_config, weights, state))
    return load_foreign(load_released, weights, model, state, str(weights))


# ---------------------------------------------------------------------------------------------
# Figure 3: detections beside the fusion weight maps and the fused feature of each level
# ---------------------------------------------------------------------------------------------
# Heat map colours: five stops of matplotlib's "inferno", linear in between, so 0 is black,
# 0.25 (87, 16, 110), 0.5 (188, 55, 84), 0.75 (249, 142, 9), 1 (252, 255, 164).
HEAT_STOPS = ((0.0, (0, 0, 0)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)),
              (0.75, (249, 142, 9)), (1.0, (252, 255, 164)))
TILE, GAP, TITLE = 160, 4, 16   # heat-map tile side, gap between panels, title strip height (px)
BAR = 28                        # colour-bar strip under the maps: the [0, 1] scale of Eq. 2
MAP_COLUMNS = ("alpha (s32 src)", "beta (s16 src)", "gamma (s8 src)", "fused sum_C")
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190))
# A class whose name starts with a colour word is boxed in that colour (the synthetic set's
# "blue triangle" in blue); any other class takes PALETTE[class index].
COLOR_WORDS = {"red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200),
               "yellow": (255, 225, 25), "orange": (245, 130, 48), "purple": (145, 30, 180),
               "cyan": (70, 240, 240), "magenta": (240, 50, 230), "pink": (250, 190, 190),
               "white": (255, 255, 255), "black": (40, 40, 40), "grey": (128, 128, 128),
               "gray": (128, 128, 128), "brown": (170, 110, 40)}


def class_color(class_names, cls: int) -> tuple[int, int, int]:
    """The box colour of class `cls`: its name's colour word, else PALETTE by index."""
    name = class_names[cls] if 0 <= cls < len(class_names) else ""
    words = str(name).lower().split()
    return COLOR_WORDS.get(words[0] if words else "", PALETTE[cls % len(PALETTE)])


def heat_colors(values: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] (clipped) -> (h, w, 3) uint8 RGB by HEAT_STOPS."""
    v = np.clip(np.asarray(values, np.float64), 0, 1)
    xs = [s for s, _ in HEAT_STOPS]
    rgb = [np.interp(v, xs, [c[k] for _, c in HEAT_STOPS]) for k in range(3)]
    return np.round(np.stack(rgb, -1)).astype(np.uint8)


def draw_detections(image: Image.Image, detections, class_names) -> Image.Image:
    """A copy of `image` with each (K, 7) detection (image pixels) boxed and labelled."""
    image = image.convert("RGB")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    det = np.asarray(detections, np.float64).reshape(-1, 7)
    det = det[np.isfinite(det).all(1)]
    det[:, [0, 2]] = det[:, [0, 2]].clip(-1, image.width)      # Pillow fails on huge coordinates
    det[:, [1, 3]] = det[:, [1, 3]].clip(-1, image.height)
    for x1, y1, x2, y2, score, cls, _ in det:
        color = class_color(class_names, int(cls))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
        name = class_names[int(cls)] if int(cls) < len(class_names) else str(int(cls))
        label = f"{name} {score:.2f}"
        tx, ty = x1, max(y1 - 12, 0)
        draw.rectangle(draw.textbbox((tx, ty), label, font=font), fill=color)
        draw.text((tx, ty), label, fill=(0, 0, 0), font=font)
    return image


def figure3_size(image_wh: tuple[int, int], tile: int = TILE) -> tuple[int, int]:
    """(width, height) of draw_figure3's canvas for an image of (w, h) with fusion maps."""
    panel_h = 3 * tile + 2 * GAP
    det_w = round(image_wh[0] * panel_h / image_wh[1])
    return det_w + 4 * (GAP + tile), TITLE + panel_h + BAR


def tile_origin(image_wh: tuple[int, int], row: int, col: int, tile: int = TILE):
    """Top-left (x, y) of the heat-map tile of level row (0 = s32, 1 = s16, 2 = s8), column col
    (0 alpha, 1 beta, 2 gamma, 3 fused)."""
    det_w = figure3_size(image_wh, tile)[0] - 4 * (GAP + tile)
    return det_w + GAP + col * (tile + GAP), TITLE + row * (tile + GAP)


def draw_figure3(image, detections, maps, class_names, tile: int = TILE) -> Image.Image:
    """Figure 3 as one picture.

    Layout (see figure3_size / tile_origin): a title strip of TITLE px on top; below it, on the
    left, the image with its detections scaled to the height of the three tile rows; to the
    right a grid of tile x tile heat maps, one row per output level (s32, s16, s8, top to
    bottom), columns alpha, beta, gamma (Eq. 2 weights of the s32, s16 and s8 sources, drawn on
    the fixed scale [0, 1]) and the channel-summed fused feature y^l (min-max scaled per level).
    Each map is enlarged with nearest-neighbour sampling, so each cell is a flat colour.

    image: PIL image or uint8 (H, W, 3) RGB; detections: (K, 7) in its pixels (postprocess +
    to_original); maps: {stride: {"weights": (3, h, w), "fused": (h, w)}} for this image (a
    leading batch dim of 1 is dropped), or None for a model without ASFF: then the picture is
    the image with its detections alone.
    """
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if not maps:
        return draw_detections(image, detections, class_names)
    width, height = figure3_size(image.size, tile)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    det_w, det_h = width - 4 * (GAP + tile), height - TITLE - BAR
    det = torch.as_tensor(np.asarray(detections, np.float64)).reshape(-1, 7).clone()  # (K, 7)
    det[:, [0, 2]] *= det_w / image.width                 # boxes drawn after the resize: crisp
    det[:, [1, 3]] *= det_h / image.height
    shown = draw_detections(image.resize((det_w, det_h), Image.BILINEAR), det, class_names)
    canvas.paste(shown, (0, TITLE))
    draw.text((2, 2), "detections", fill=(0, 0, 0), font=font)
    for col, title in enumerate(MAP_COLUMNS):
        draw.text((tile_origin(image.size, 0, col, tile)[0] + 2, 2), title, fill=(0, 0, 0),
                  font=font)
    for row, stride in enumerate((32, 16, 8)):
        weights = torch.as_tensor(maps[stride]["weights"]).float().cpu()
        fused = torch.as_tensor(maps[stride]["fused"]).float().cpu()
        weights, fused = weights.reshape(-1, *weights.shape[-2:]), fused.reshape(fused.shape[-2:])
        fused = (fused - fused.min()) / (fused.max() - fused.min()).clamp(min=1e-12)  # (h, w)
        for col, values in enumerate([*weights[:3], fused]):
            heat = Image.fromarray(heat_colors(values.numpy())).resize((tile, tile), Image.NEAREST)
            canvas.paste(heat, tile_origin(image.size, row, col, tile))
        x, y = tile_origin(image.size, row, 0, tile)
        draw.text((x + 2, y + 2), f"s{stride}", fill=(255, 255, 255), font=font, stroke_width=1,
                  stroke_fill=(0, 0, 0))
    draw_color_bar(canvas, tile_origin(image.size, 0, 0, tile)[0], height - BAR, 3 * tile + 2 * GAP)
    return canvas


def draw_color_bar(canvas: Image.Image, x: int, y: int, width: int) -> None:
    """The alpha/beta/gamma scale under the weight maps: 0 (black) to 1, labelled, in a
    BAR-high strip at (x, y); the fused column is min-max scaled per level instead."""
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    ramp = heat_colors(np.tile(np.linspace(0, 1, width), (8, 1)))            # (8, width, 3)
    canvas.paste(Image.fromarray(ramp), (x, y + 4))
    for value in (0.0, 0.5, 1.0):
        tx = x + round(value * (width - 1))
        draw.line((tx, y + 12, tx, y + 15), fill=(0, 0, 0))
        label = f"{value:g}"
        draw.text((min(max(tx - 3 * len(label), x), x + width - 6 * len(label)), y + 15), label,
                  fill=(0, 0, 0), font=font)
    draw.text((x + width // 4 - 40, y + 15), "Eq. 2 weight", fill=(0, 0, 0), font=font)
    draw.text((x + width + GAP + 2, y + 4), "fused: min-max per level", fill=(0, 0, 0), font=font)


def show(model, image, out: str, size: int, class_names, conf_thre: float = 0.3,
         nms_thre: float = NMS_THRE, name: str = "image", letterbox: bool = False,
         darknet_input: bool = False) -> Path:
    """Detect on one image (a file path, or uint8 (H, W, 3) RGB) and write
    out/figure3_<name>.png (name: the file's stem for a path); returns the PNG's path."""
    if isinstance(image, (str, Path)):
        from data import open_rgb  # EXIF-upright RGB, errors naming the file
        image, name = np.asarray(open_rgb(str(image))), Path(image).stem
    device = next(model.parameters()).device
    x = preprocess(image, size, letterbox, darknet_input)[None].to(device)  # (1, 3, S, S)
    model.eval()
    with torch.no_grad():
        det = postprocess(model(x), conf_thre, nms_thre)[0].cpu()           # (K, 7)
    det = to_original(det, (size, size), image.shape[:2], letterbox)        # (K, 7)
    maps = None
    if model.fusion_mode == "asff":
        maps = {s: {k: t[0] for k, t in m.items()} for s, m in model.fusion_maps(x).items()}
    path = Path(out) / f"figure3_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_figure3(image, det, maps, class_names).save(path)
    print(f"wrote {path}: {len(det)} detections over {conf_thre}")
    return path


# ---------------------------------------------------------------------------------------------
# Detection on your own images (--detect), and export (--export)
# ---------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(paths: list[str]) -> list[Path]:
    """The files given and the image files inside the folders given (recursively, sorted)."""
    from data import UserError
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return files


def detect_image(model, image: np.ndarray, size: int, nms_thre: float = NMS_THRE,
                 letterbox: bool = False, darknet: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (K, 7) [x1, y1, x2, y2, score, class, obj] in its pixels: the
    evaluation's preprocessing, decode and per-class NMS, every box over CONF_THRE."""
    device = next(model.parameters()).device
    x = preprocess(image, size, letterbox, darknet)[None].to(device)       # (1, 3, S, S)
    with torch.inference_mode():
        det = postprocess(model(x), CONF_THRE, nms_thre)[0].cpu()          # (K, 7)
    return to_original(det, (size, size), image.shape[:2], letterbox)      # (K, 7)


def draw_boxes(image: Image.Image, det: torch.Tensor, class_names, conf: float) -> Image.Image:
    """Boxes over `conf` with class name and score, line and text scaled to the image size."""
    scale = max(image.size) / 640
    try:                                                 # Pillow >= 10.1 sizes its own font
        font = ImageFont.load_default(size=max(11, round(14 * scale)))
    except TypeError:
        font = ImageFont.load_default()
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    det = det[(det[:, 4] >= conf) & torch.isfinite(det).all(1)].clone()   # (K', 7)
    det[:, [0, 2]] = det[:, [0, 2]].clamp(-1, image.width)     # Pillow fails on huge coordinates
    det[:, [1, 3]] = det[:, [1, 3]].clamp(-1, image.height)
    for x1, y1, x2, y2, score, cls, _ in det.tolist():
        color, cls = class_color(class_names, int(cls)), int(cls)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=max(2, round(3 * scale)))
        label = f"{class_names[cls] if cls < len(class_names) else cls} {score:.2f}"
        box = draw.textbbox((x1, y1), label, font=font)
        ty = y1 - (box[3] - box[1]) - 4 if y1 - (box[3] - box[1]) - 4 >= 0 else y1
        box = draw.textbbox((x1 + 2, ty + 2), label, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=color)
        draw.text((x1 + 2, ty + 2), label, fill=(0, 0, 0), font=font)
    return image


def detection_rows(det: torch.Tensor, file: Path, class_names, cat_ids) -> list[dict]:
    """COCO results rows ([x, y, w, h] in image pixels) with the file name and class name."""
    rows = []
    for x1, y1, x2, y2, score, cls, _ in det.tolist():
        rows.append({"file_name": str(file), "category_id": int(cat_ids[int(cls)]),
                     "category": str(class_names[int(cls)]), "score": round(score, 5),
                     "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)]})
    return rows


def detect(model, paths: list[str], out: str, size: int, class_names, cat_ids=None,
           conf: float = 0.3, nms_thre: float = NMS_THRE, letterbox: bool = False,
           darknet: bool = False) -> dict:
    """Detect on image files and folders: out/<name>.png per image (boxes over `conf`) and
    out/detections.json (every box over CONF_THRE, COCO results format plus file names).
    Unreadable files are named, skipped and counted. Returns {"images", "skipped", "boxes"}."""
    from data import DataError, open_rgb
    files, out = image_files(paths), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cat_ids = cat_ids or list(range(len(class_names)))
    rows, skipped, drawn, names, start = [], [], 0, set(), time.time()
    for k, file in enumerate(files):
        try:
            image = open_rgb(str(file))                                     # EXIF-upright RGB
        except DataError as e:
            skipped.append(str(e))
            print(f"[{k + 1}/{len(files)}] skipped: {e}", flush=True)
            continue
        det = detect_image(model, np.asarray(image), size, nms_thre, letterbox, darknet)
        name = file.stem if file.stem not in names else f"{file.stem}-{k}"
        names.add(name)
        draw_boxes(image, det, class_names, conf).save(out / f"{name}.png")
        rows += detection_rows(det, file, class_names, cat_ids)
        drawn += int((det[:, 4] >= conf).sum())
        left = (time.time() - start) / (k + 1) * (len(files) - k - 1)
        print(f"[{k + 1}/{len(files)}] {file}: {int((det[:, 4] >= conf).sum())} boxes over {conf} "
              f"-> {out / name}.png (ETA {left:.0f} s)", flush=True)
    (out / "detections.json").write_text(json.dumps(rows, indent=1))
    print(f"detected on {len(files) - len(skipped)} image(s), {drawn} boxes over {conf}; "
          f"{len(skipped)} unreadable file(s) skipped; wrote {out}/detections.json "
          f"({len(rows)} boxes over {CONF_THRE})")
    return {"images": len(files) - len(skipped), "skipped": skipped, "boxes": len(rows)}


def export(model, path: str, size: int) -> Path:
    """torch.export the eval-mode model at size x size, any batch: (B, 3, size, size) normalised
    input (preprocess) -> (B, N, 5 + C) decoded rows, the same as model(x). Load it with
    torch.export.load(path).module() - no asff code needed to run it."""
    model = model.eval()
    example = torch.zeros(2, 3, size, size, device=next(model.parameters()).device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    print(f"wrote {path}: (B, 3, {size}, {size}) -> (B, {model(example[:1]).shape[1]}, "
          f"{5 + model.num_classes}) decoded [cx, cy, w, h, obj, cls...] in input pixels")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    examples = __doc__[__doc__.index("Command line"):__doc__.index("Departures")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--weights", help="our checkpoint, an authors' .pth or darknet's yolov3.weights "
                        "(none: random weights with the --fusion/... flags below)")
    a("--no-ema", action="store_true", help="our checkpoint's raw weights, not its EMA ones")
    a("--data", help="COCO root with val2017/ (test2017/ with --test-dev) and annotations/; "
                     "default: the built-in synthetic set")
    a("--images", help="image folder of a custom COCO-format set (with --ann)")
    a("--ann", help="annotation JSON of that set")
    a("--test-dev", action="store_true", help="write the results file for the COCO server")
    a("--size", type=int, default=608, help="test size, a multiple of 32 (paper: 320-800)")
    a("--conf", "--draw-conf", dest="conf", type=float, default=None,
      help=f"score threshold on obj * cls: evaluation keeps boxes over it (default {CONF_THRE}: "
           f"COCO AP needs the tail); --detect and --show draw boxes over it (default {DRAW_CONF})")
    a("--nms", type=float, default=NMS_THRE, help="NMS IoU (paper 0.6; the release 0.65)")
    a("--max-det", type=int, default=MAX_DET, help="detections kept per image")
    a("--multi-label", action="store_true", help="every class over --conf, not only the argmax")
    a("--letterbox", action="store_true", help="letterbox instead of the released plain resize")
    a("--darknet-input", action="store_true",
      help="darknet's preprocessing: pixels / 255, letterbox (implies --letterbox); implied by a "
           ".weights file")
    a("--batch", type=int, default=8, help="images per forward")
    a("--limit", type=int, help="evaluate only the first N images")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--half", action="store_true", help="fp16 autocast (GPU)")
    a("--out", help="folder for metrics.json, the results JSON and pictures")
    a("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    a("--fusion", default="asff", choices=["none", "sum", "concat", "asff"],
      help="model without --weights (with the width/depth below)")
    a("--rfb", action="store_true")
    a("--num-classes", type=int, default=80)
    a("--width", type=float, default=1.0)
    a("--depth", type=float, default=1.0)
    a("--show", nargs="?", const="", metavar="IMAGE",
      help="draw Figure 3 for IMAGE (default: the first image of the evaluation set)")
    a("--detect", nargs="+", metavar="PATH", help="detect on these images / folders: one PNG "
      "per image and detections.json in --out (default detections/)")
    a("--export", metavar="FILE", help="write the model as a torch.export program (.pt2) for "
      "--size x --size inputs, any batch")
    return p


def _setup_device(name: str) -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on GPU, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = name.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def open_dataset(args):
    """COCO val2017 / test-dev2017 under --data, a custom set (--images, --ann), or the
    built-in synthetic validation set."""
    from data import CocoDetection, make_synthetic
    unlabelled = dict(require_annotations=not args.test_dev)   # test-dev has no annotations
    if args.images or args.ann:
        return CocoDetection(args.images, args.ann, **unlabelled)
    if args.data:
        split, ann = (("test2017", "image_info_test-dev2017.json") if args.test_dev
                      else ("val2017", "instances_val2017.json"))
        return CocoDetection(os.path.join(args.data, split),
                             os.path.join(args.data, "annotations", ann), **unlabelled)
    paths = make_synthetic()          # the defaults train.py's demo uses, cached
    return CocoDetection(paths["val_images"], paths["val_json"])


def _show_cli(args, model) -> None:
    """--show [IMAGE]: Figure 3 for IMAGE, or for the first image of the evaluation set (the
    synthetic one by default); class names from that set, COCO's for 80 classes, or numbers."""
    dataset = open_dataset(args) if not args.show or args.data or args.ann else None
    image, name = args.show, None
    if not args.show:
        image, image_id = dataset.load_image(0)
        name = Path(dataset.coco.imgs[image_id]["file_name"]).stem
    if dataset is not None and len(dataset.class_names) == model.num_classes:
        names = dataset.class_names
    elif model.num_classes == len(COCO_NAMES):
        names = COCO_NAMES
    else:
        names = [f"class {k}" for k in range(model.num_classes)]
    show(model, image, args.out or ".", args.size, names, _conf(args, DRAW_CONF), args.nms, name,
         args.letterbox, args.darknet_input)


def _conf(args, default: float) -> float:
    return default if args.conf is None else args.conf


def checkpoint_class_names(weights: str | None, num_classes: int) -> tuple[list[str], list[int]]:
    """(class names, category ids) for pictures and results: those train.py saved in the
    checkpoint, COCO's for an 80-class model without them, else "class k" and k."""
    state = read_checkpoint(weights) if weights and not str(weights).endswith(".weights") else {}
    if state.get("class_names") and len(state["class_names"]) == num_classes:
        return list(state["class_names"]), list(state.get("cat_ids") or range(num_classes))
    if num_classes == len(COCO_NAMES):
        return list(COCO_NAMES), list(COCO_CAT_IDS)
    return [f"class {k}" for k in range(num_classes)], list(range(num_classes))


def _demo() -> None:
    """No arguments: a toy run of postprocess on four boxes (two overlap in class 0)."""
    decoded = torch.tensor([[[50., 50, 40, 40, 0.9, 0.9, 0.1],     # class 0, score 0.81
                             [54., 50, 40, 40, 0.8, 0.9, 0.1],     # class 0, IoU 0.82: dropped
                             [54., 50, 40, 40, 0.8, 0.1, 0.9],     # class 1: kept (other class)
                             [200., 90, 30, 60, 0.004, 0.9, 0.1]]])  # score < 0.005: dropped
    print("\ntoy example: decoded rows [cx, cy, w, h, obj, cls0, cls1] ->")
    print("postprocess (conf 0.005, NMS 0.6): [x1, y1, x2, y2, score, class, obj]")
    print(postprocess(decoded)[0])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        _demo()
        return
    args = parser.parse_args(argv)
    if bool(args.images) != bool(args.ann):   # file names are relative to the image folder
        parser.error("--images and --ann go together: a custom set is an image folder and its "
                     "COCO-format annotation JSON")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _setup_device(args.device)
    args.darknet_input |= str(args.weights).endswith(".weights")   # darknet's model, its input
    args.letterbox |= args.darknet_input
    config = dict(num_classes=args.num_classes, rfb=args.rfb, width=args.width,
                  depth=args.depth, fusion=None if args.fusion == "none" else args.fusion)
    model = load_model(args.weights, False if args.no_ema else None, **config).to(device).eval()
    if args.export:
        return export(model, args.export, args.size)
    if args.detect:
        names, cat_ids = checkpoint_class_names(args.weights, model.num_classes)
        return detect(model, args.detect, args.out or "detections", args.size, names, cat_ids,
                      _conf(args, DRAW_CONF), args.nms, args.letterbox, args.darknet_input)
    if args.show is not None:
        return _show_cli(args, model)
    dataset = open_dataset(args)
    check_classes(model, dataset, args.weights or f"random weights (--num-classes "
                                                  f"{args.num_classes})")
    evaluate(model, dataset, args.size, _conf(args, CONF_THRE), args.nms, args.max_det,
             args.multi_label, args.letterbox, args.batch, args.limit, args.test_dev, args.out,
             torch.float16 if args.half else None, darknet_input=args.darknet_input)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from data import exit_on_user_error
    exit_on_user_error(main)
