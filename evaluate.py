"""Inference and COCO evaluation - paper Sec. 3.4 (inference), Tables 3-4 (AP), Figure 3.

Sec. 3.4: the image resized to the test size (plainly, as released), the model's eval-mode decode
(head.py), then `postprocess`: score = obj * the argmax class's probability, a low threshold (COCO
AP needs the tail), greedy NMS per class at IoU 0.6 (the release: 0.65), at most 100 boxes an image.
    postprocess(decoded (B, N, 5+C)) -> B x (K, 7) [x1, y1, x2, y2, score, class, obj], input px
    Inference(eval_size)(model, images) -> per image (K, 7) in its own pixels
    coco_score, evaluate(model, dataset) -> the 12 COCO stats (pycocotools; sharded over ranks)
    show (Figure 3), load_detector (ours, released, darknet)
`python evaluate.py -h` lists the flags (no arguments: a toy NMS).
"""

import argparse
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import data
from darknet import letterbox, letterbox_geometry, read_darknet_weights
from head import Detector, load_released
from loss import box_iou

CONF_THRE = 0.005   # low, as COCO AP needs (the release: 0.001 in eval.py, 0.01 in main.py)
NMS_THRE = 0.6      # Sec. 3.4; the release's config moved to 0.65 after publication
MAX_DET = 100       # COCOeval's maxDets: more boxes per image are never scored
DRAW_CONF = 0.3     # pictures and --detect keep boxes over this score
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")   # --detect
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")   # order of COCOeval.stats
PAPER_COLUMNS = COCO_STATS[:6]                                # Tables 3-4
COCO_NAMES = tuple(n.replace("_", " ") for n in (  # the 80 classes in sorted-id order
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote "
    "keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush").split())
COCO_CAT_IDS = tuple(k for k in range(1, 91) if k not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


# --- 1. Post-processing (Sec. 3.4): threshold, per-class NMS, top 100 ---
def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                iou_thre: float, max_det: int | None = None, chunk: int = 512) -> torch.Tensor:
    """Greedy NMS per class -> kept indices by descending score (ties: input order): a box goes when
    its IoU with a kept, higher-scoring box of its class is > iou_thre. Each class is shifted to its
    own region of the plane (float64: exact), so one greedy pass, in chunks by score (memory
    O(chunk^2)) up to `max_det` kept, does every class."""
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
                max_det: int = MAX_DET) -> list[torch.Tensor]:
    """(B, N, 5+C) decoded rows -> per image (K, 7) [x1, y1, x2, y2, obj * max cls prob, class, obj]."""
    out = []
    for p in decoded:                 # (N, 5+C); class probs <= 1, so obj >= conf is necessary
        p = p[p[:, 4] >= conf_thre]                                      # (N', 5+C)
        cls_prob, cls = p[:, 5:].max(1)                                  # (N',), (N',)
        score = p[:, 4] * cls_prob                                       # (N',) obj * max cls
        p, cls, score = p[score >= conf_thre], cls[score >= conf_thre], score[score >= conf_thre]
        cx, cy, w, h = p[:, :4].unbind(-1)                               # (K,) each
        boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)  # (K, 4) corners
        keep = batched_nms(boxes, score, cls, nms_thre, max_det)         # (K',)
        columns = (score[keep, None], cls[keep, None].to(p.dtype), p[keep, 4:5])
        out.append(torch.cat((boxes[keep], *columns), dim=1))            # (K', 7)
    return out

def prepare_for_inference(model, fold: bool = True, channels_last: bool = True, compile: bool = False):
    """An eval-mode copy without gradients, BatchNorm folded into the convs (the same function up to
    rounding), NHWC (oneDNN and tensor cores run it without reorders), compiled if asked."""
    model = copy.deepcopy(model).eval()
    if fold and hasattr(model, "fuse_conv_bn"):           # a Detector (tests pass stand-ins)
        model.fuse_conv_bn()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.requires_grad_(False).to(memory_format=layout)
    if compile:
        model.forward = torch.compile(model.forward)
    return model


# --- 2. Image pixels -> the model's input -> image pixels ---
def preprocess(image: np.ndarray, size: int, darknet: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size): a plain resize (the release's), or darknet's letterbox."""
    return letterbox(image, size) if darknet else data.normalize(image, size)   # (3, size, size)

def to_original(det: torch.Tensor, size: int, original_hw: tuple[int, int], darknet: bool = False):
    """(K, 7) in input pixels -> a (K, 7) in the image's: x * w / size, or (x - pad_x) * w / new_w."""
    (h, w) = original_hw
    new_w, new_h, pad_x, pad_y = letterbox_geometry(original_hw, size) if darknet else (size, size, 0, 0)
    out = det.clone()                                                    # (K, 7)
    out[:, [0, 2]] = (det[:, [0, 2]] - pad_x) * (w / new_w)
    out[:, [1, 3]] = (det[:, [1, 3]] - pad_y) * (h / new_h)
    return out

@dataclasses.dataclass(frozen=True)
class Inference:
    """How images become detections (Sec. 3.4), the same for evaluation, --detect and --show."""
    eval_size: int = 608           # the test size, a multiple of 32 (Table 3: 608)
    conf: float = CONF_THRE        # score threshold
    nms: float = NMS_THRE          # per-class NMS IoU
    max_det: int = MAX_DET         # boxes kept per image
    darknet: bool = False          # darknet's own input (its .weights): letterbox, pixels / 255

    def __call__(self, model, images: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 (H, W, 3) RGB images -> per image (K, 7) in its pixels; model: prepared."""
        x = torch.stack([preprocess(im, self.eval_size, self.darknet) for im in images])  # (B, 3, S, S)
        with torch.inference_mode():
            decoded = model(x.to(next(model.parameters()).device)).float()  # (B, N, 5+C)
        return [to_original(det.cpu(), self.eval_size, im.shape[:2], self.darknet)
                for det, im in zip(postprocess(decoded, self.conf, self.nms, self.max_det), images)]


# --- 3. COCO results and scoring (pycocotools) ---
def to_coco_results(detections: list[torch.Tensor], image_ids: list[int], cat_ids: list[int]) -> list[dict]:
    """Per-image (K, 7) -> COCO results: [x, y, w, h] (w = x2 - x1, as released), cat_ids[class]."""
    return [{"image_id": int(image_id), "category_id": int(cat_ids[int(cls)]),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
             "score": round(score, 5)}
            for det, image_id in zip(detections, image_ids) for x1, y1, x2, y2, score, cls, _ in det.tolist()]

def scorable(coco_gt: COCO) -> COCO:
    """COCOeval records a match by the ground truth's annotation id and reads 0 as "no match": a
    file with an annotation id 0 (or ids repeated) is scored on a copy numbered 1..n."""
    anns = coco_gt.dataset.get("annotations", [])
    if 0 not in (ids := [a["id"] for a in anns]) and len(set(ids)) == len(ids):
        return coco_gt
    renumbered = COCO()
    renumbered.dataset = coco_gt.dataset | {"annotations": [a | {"id": k + 1} for k, a in enumerate(anns)]}
    with contextlib.redirect_stdout(io.StringIO()):
        renumbered.createIndex()
    return renumbered

def coco_score(coco_gt, results: list[dict], image_ids: list[int] | None = None,
               verbose: bool = True) -> dict[str, float]:
    """COCOeval(bbox) over `image_ids` (default: all) -> the 12 stats (-1: no box of that size)."""
    for key, known in (("category_id", coco_gt.getCatIds()), ("image_id", coco_gt.getImgIds())):
        if bad := sorted({r[key] for r in results} - set(known)):
            raise ValueError(f"results use {key.replace('_', ' ')}(s) {bad[:10]} that the "
                             f"annotation file lacks (it has {sorted(known)[:10]}...)")
    if not results:
        return dict.fromkeys(COCO_STATS, 0.0)
    coco_gt = scorable(coco_gt)
    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
        cocoeval = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox")  # copies:
        if image_ids is not None:                                    # loadRes adds keys
            cocoeval.params.imgIds = sorted(image_ids)
        cocoeval.evaluate(), cocoeval.accumulate(), cocoeval.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, cocoeval.stats)}

def paper_columns(metrics: dict) -> str:
    """Tables 3-4's columns in percent; an empty size bucket (pycocotools: -1) as n/a."""
    return "".join(f"{k:>7}" for k in PAPER_COLUMNS) + "\n" + "".join(
        f"{'n/a' if metrics[k] < 0 else f'{100 * metrics[k]:.1f}':>7}" for k in PAPER_COLUMNS)


# --- 4. The evaluation: one process, or sharded over torch.distributed ranks ---
def infer_shard(model, dataset, indices: list[int], infer: Inference, batch_size: int,
                total: int, world: int, verbose: bool) -> tuple[dict[int, list[dict]], list[str]]:
    """({dataset index: COCO results}, images that failed to decode: named, counted, left out)."""
    per_image, failures, tic = {}, [], time.time()
    for start in range(0, len(indices), batch_size):
        images, metas = [], []
        for index in indices[start:start + batch_size]:
            try:
                image, image_id = dataset.load_image(index)
            except Exception as e:  # noqa: BLE001 - any decode failure: name it, skip the image
                info = dataset.coco.imgs.get(dataset.ids[index], {})
                failures.append(info.get("file_name", f"image id {dataset.ids[index]}"))
                print(f"skipped {failures[-1]}: {type(e).__name__}: {e}", flush=True)
                continue
            images.append(image), metas.append((index, image_id))
        for det, (index, image_id) in zip(infer(model, images) if images else [], metas):
            per_image[index] = to_coco_results([det], [image_id], dataset.cat_ids)
        if verbose and (start // batch_size % 50 == 49 or start + batch_size >= len(indices)):
            done = min((start + batch_size) * world, total)                     # every 50 batches
            print(f"eval {done}/{total} images, {done / (time.time() - tic):.1f} img/s", flush=True)
    return per_image, failures

def check_classes(model, dataset, weights: str | None = None) -> None:
    """The model's class k is the data set's category cat_ids[k]: another count is refused."""
    if getattr(model, "num_classes", len(dataset.cat_ids)) != len(dataset.cat_ids):
        raise data.DataError(f"{weights or 'the model'}: {model.num_classes} classes, but "
                             f"{getattr(dataset, 'ann_file', 'the data set')} has {len(dataset.cat_ids)} "
                             "categories; evaluate a model on the categories it was trained on")

def evaluate(model, dataset, eval_size: int = 608, nms: float = NMS_THRE, verbose: bool = True,
             conf: float = CONF_THRE, max_det: int = MAX_DET, darknet: bool = False, batch_size: int = 8,
             limit: int | None = None, out=None, test_dev: bool = False, compile: bool = False) -> dict:
    """COCO evaluation of a prepared copy of `model` on `dataset` (.coco, .cat_ids, .ids, load_image):
    rank r of a torch.distributed group runs images r, r + world, ...; every rank returns the 12
    stats, images, failed_images, detections, eval_size, seconds; rank 0 writes `out`/metrics.json
    and results.json (test_dev: the COCO server's file, not scored)."""
    check_classes(model, dataset)
    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    start, n = time.time(), len(dataset) if limit is None else min(limit, len(dataset))
    infer = Inference(eval_size, conf, nms, max_det, darknet)
    prepared, mine = prepare_for_inference(model, compile=compile), list(range(rank, n, world))
    parts = [infer_shard(prepared, dataset, mine, infer, batch_size, n, world, verbose and rank == 0)] * world
    if world > 1:
        dist.all_gather_object(parts, parts[rank])
    per_image = {i: r for p, _ in parts for i, r in p.items()}
    failures = [name for _, f in parts for name in f]
    results = [r for i in sorted(per_image) for r in per_image[i]]      # dataset order
    verbose, folder = verbose and rank == 0, Path(out or "runs/test-dev")
    if verbose:
        print(f"evaluated {n} images at {eval_size} x {eval_size}, {len(results)} detections, "
              f"{len(failures)} failed to decode{': ' if failures else ''}" + ", ".join(failures[:5]))
    if rank == 0 and (out or test_dev):   # the server's file name: detections_<split>_<method>_results
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ("detections_test-dev2017_asff_results.json" if test_dev else "results.json")).write_text(
            json.dumps(results))
    metrics = {} if test_dev else coco_score(dataset.coco, results, dataset.ids[:n], verbose)
    metrics |= {"images": n, "failed_images": len(failures), "detections": len(results),
                "eval_size": eval_size, "seconds": time.time() - start}
    if verbose and not test_dev:
        print(paper_columns(metrics))
    if rank == 0 and out and not test_dev:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# --- 5. Pictures: Figure 3, boxes with labels ---
HEAT_STOPS = ((0.0, (0, 0, 0)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)),   # matplotlib's
              (0.75, (249, 142, 9)), (1.0, (252, 255, 164)))                  # "inferno"
TILE, GAP, TITLE, BAR = 160, 4, 16, 24  # heat-map tile side, gap, title strip, colour-bar strip (px)
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (240, 50, 230),  # the synthetic
           (245, 130, 48), (145, 30, 180), (70, 240, 240), (210, 245, 60), (250, 190, 190))  # classes first

def heat_colours(values: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] (clipped) -> (h, w, 3) uint8 RGB by HEAT_STOPS."""
    v = np.clip(np.asarray(values, np.float64), 0, 1)
    rgb = [np.interp(v, [s for s, _ in HEAT_STOPS], [c[k] for _, c in HEAT_STOPS]) for k in range(3)]
    return np.round(np.stack(rgb, -1)).astype(np.uint8)

def draw_boxes(image: Image.Image, det, class_names, conf: float = 0.0) -> Image.Image:
    """A copy of `image`, each (K, 7) box over `conf` in PALETTE[class], "name score" above it."""
    scale, image = max(image.size) / 640, image.convert("RGB")
    draw, text = ImageDraw.Draw(image), ImageFont.load_default(max(11, round(14 * scale)))
    det = torch.as_tensor(np.asarray(det, np.float64)).reshape(-1, 7)    # (K, 7)
    det = det[(det[:, 4] >= conf) & torch.isfinite(det).all(1)]          # (K', 7)
    det[:, 0:4:2], det[:, 1:4:2] = det[:, 0:4:2].clamp(-1, image.width), det[:, 1:4:2].clamp(-1, image.height)
    for x1, y1, x2, y2, _, c, _ in det.tolist():              # (clamped: Pillow fails on huge ones)
        draw.rectangle((x1, y1, x2, y2), outline=PALETTE[int(c) % 10], width=max(2, round(3 * scale)))
    for x1, y1, _, _, score, c, _ in det.flip(0).tolist():
        label = f"{class_names[int(c)] if int(c) < len(class_names) else int(c)} {score:.2f}"
        height = draw.textbbox((0, 0), label, font=text)[3] + 4
        top = y1 - height if y1 >= height else max(y1, 0)        # above the box, else inside it
        box = draw.textbbox((max(x1, 0) + 2, top + 2), label, font=text)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=PALETTE[int(c) % 10])
        draw.text(box[:2], label, fill=(0, 0, 0), font=text)
    return image

def draw_figure3(image, detections, maps, class_names) -> Image.Image:
    """Figure 3: the image (PIL or uint8 (H, W, 3)) with its (K, 7) detections, beside a row per
    level (s32, s16, s8) of heat maps: alpha, beta, gamma (Eq. 2's weights of the s32, s16, s8
    sources, 0..1 on the colour bar) and the channel-summed fused y^l (min-max scaled).
    maps: {stride: {"weights": (3, h, w), "fused": (h, w)}}, or None (no ASFF): boxes alone."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if not maps:
        return draw_boxes(image, detections, class_names)
    panel_h, black = 3 * TILE + 2 * GAP, (0, 0, 0)
    width, height = round(image.width * panel_h / image.height) + 4 * (GAP + TILE), TITLE + panel_h + BAR
    canvas, x0 = Image.new("RGB", (width, height), (255, 255, 255)), width - 4 * (GAP + TILE) + GAP
    det = torch.as_tensor(np.asarray(detections, np.float64)).reshape(-1, 7).clone()  # (K, 7)
    det[:, [0, 2]] *= (x0 - GAP) / image.width            # boxes drawn after the resize: crisp
    det[:, [1, 3]] *= (height - TITLE - BAR) / image.height
    resized = image.resize((x0 - GAP, height - TITLE - BAR), Image.BILINEAR)
    canvas.paste(draw_boxes(resized, det, class_names), (0, TITLE))
    draw = ImageDraw.Draw(canvas)
    for x, title in zip((2, *range(x0 + 2, width, TILE + GAP)), ("detections", "alpha (s32 source)",
                        "beta (s16 source)", "gamma (s8 source)", "fused sum over C")):
        draw.text((x, 2), title, fill=black)
    for row, stride in enumerate((32, 16, 8)):
        weights = torch.as_tensor(maps[stride]["weights"]).float().cpu()
        fused = torch.as_tensor(maps[stride]["fused"]).float().cpu().reshape(weights.shape[-2:])  # (h, w)
        fused = (fused - fused.min()) / (fused.max() - fused.min()).clamp(min=1e-12)          # 0..1
        y = TITLE + row * (TILE + GAP)
        for col, values in enumerate([*weights.reshape(-1, *weights.shape[-2:])[:3], fused]):
            heat = Image.fromarray(heat_colours(values.numpy())).resize((TILE, TILE), Image.NEAREST)
            canvas.paste(heat, (x0 + col * (TILE + GAP), y))
        draw.text((x0 + 2, y + 2), f"s{stride}", fill=(255, 255, 255), stroke_width=1, stroke_fill=black)
    bar_w = 3 * TILE + 2 * GAP                            # Eq. 2's scale under alpha, beta, gamma
    ramp = heat_colours(np.tile(np.linspace(0, 1, bar_w), (8, 1)))      # (8, bar_w, 3)
    canvas.paste(Image.fromarray(ramp), (x0, height - BAR + 2))
    draw.text((x0, height - 12), "0            Eq. 2 weight", fill=black)
    draw.text((x0 + bar_w - 8, height - 12), "1", fill=black)
    return canvas

def show(model, image, out, eval_size: int, class_names, name: str = "image", conf: float = DRAW_CONF,
         darknet: bool = False) -> Path:
    """Figure 3 of an image (a path, or uint8 (H, W, 3) RGB) -> the out/figure3_<name>.png written."""
    if isinstance(image, (str, Path)):
        image, name = np.asarray(data.open_rgb(str(image))), Path(image).stem   # EXIF-upright
    model = prepare_for_inference(model)
    (det,) = Inference(eval_size, conf, darknet=darknet)(model, [image])
    maps = None
    if model.fusion_mode == "asff":
        x = preprocess(image, eval_size, darknet)[None].to(next(model.parameters()).device)  # (1, 3, S, S)
        with torch.inference_mode():
            maps = {s: {k: t[0] for k, t in m.items()} for s, m in model.fusion_maps(x).items()}
    path = Path(out) / f"figure3_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_figure3(image, det, maps, class_names).save(path)
    print(f"wrote {path}: {len(det)} detections over {conf}")
    return path


# --- 6. Weights: our checkpoints, the authors' released ones, darknet's yolov3.weights ---
DETECTOR_DEFAULTS = {k: p.default for k, p in inspect.signature(Detector).parameters.items()}
WEIGHT_FILES = ("a weight file is train.py's RUN/last.pt or best.pt, the authors' yolov3_asff.pth and kin "
                "(github.com/GOATmessi8/ASFF) or darknet's yolov3.weights (pjreddie.com/darknet/yolo)")

def read_checkpoint(path) -> dict:
    """torch.load(path, weights_only=True) -> a dict, else a one-line UserError naming the file."""
    if not Path(path).is_file():
        raise data.UserError(f"{path}: {'a folder' if Path(path).is_dir() else 'no such file'}; "
                             + WEIGHT_FILES)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and weights-only refusals alike
        raise data.UserError(f"{path}: not a checkpoint that torch.load(weights_only=True) can read "
                             f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]})") from e
    if not isinstance(state, dict) or not state:
        raise data.UserError(f"{path}: holds a {type(state).__name__}, not a checkpoint or state dict")
    return state

def naming(path, load, *args):
    """load(*args); its key, shape and length errors become one-line DataErrors naming the file
    (load_state_dict's names each missing, unexpected or mis-shaped key, and both shapes)."""
    try:
        return load(*args)
    except (KeyError, ValueError, OSError, RuntimeError) as e:    # RuntimeError: load_state_dict's
        message = e.args[0] if isinstance(e, KeyError) and e.args else " ".join(str(e).split())
        raise data.DataError(message if str(path) in message else f"{path}: {message}") from e

def released_config(state: dict) -> dict:
    """A released checkpoint's Detector arguments, read off its keys (the s32 head: 4 x (5 + C))."""
    keys = [k.removeprefix("module.") for k in state]
    asff = any(k.startswith("level_0_fusion.") for k in keys)
    head = "level_0_header.conv.weight" if asff else "module_list.19.conv.weight"
    if (weight := state.get(head, state.get("module." + head))) is None:
        raise KeyError(f"no {head}: not a released baseline / ASFF / ASFF* detector checkpoint")
    return dict(num_classes=weight.shape[0] // 4 - 5, fusion="asff" if asff else None,
                rfb=any(".rfb." in k for k in keys))

def load_detector(weights=None, ema: bool | None = None, **model_flags) -> tuple[Detector, dict]:
    """(Detector, saved: model_args, eval_size, class_names, cat_ids, config) from our checkpoint
    (its EMA unless ema=False), a released one, darknet's .weights, or None (random, the flags)."""
    if weights is None:
        return Detector(**{"fusion": "asff"} | model_flags), {}
    if (darknet := str(weights).endswith(".weights")) and not Path(weights).is_file():
        raise data.UserError(f"{weights}: no such file; {WEIGHT_FILES}")
    state = {} if darknet else read_checkpoint(weights)
    if (ours := "model" in state and "optimizer" in state) and "model_args" not in state:
        raise data.UserError(f"{weights}: a train.py checkpoint without model_args (an older train.py's)")
    args = (dict(num_classes=model_flags.get("num_classes", 80), fusion=None, guided=False, spp=False)
            if darknet else dict(state["model_args"]) if ours else naming(weights, released_config, state))
    args["fusion"] = None if args.get("fusion") == "none" else args.get("fusion")
    for key, value in model_flags.items():
        if value != (theirs := args.get(key, DETECTOR_DEFAULTS[key])):
            value, theirs = ("none" if v is None else v for v in (value, theirs))
            raise data.UserError(f"--{key.replace('_', '-')} {value} contradicts {weights}, a model "
                                 f"with {key} {theirs}: leave the flag out")
    model = Detector(**args)
    if darknet:
        naming(weights, read_darknet_weights, str(weights), model.darknet_layers())
    elif not ours:
        naming(weights, load_released, model, state, str(weights))
    elif ema and state.get("ema") is None:
        raise data.UserError(f"{weights}: the checkpoint holds no EMA weights (trained with ema 0)")
    else:
        use_ema = state.get("ema") is not None and ema is not False
        naming(weights, model.load_state_dict, state["ema" if use_ema else "model"])
    return model, {k: state[k] for k in ("eval_size", "class_names", "cat_ids", "config")
                   if state.get(k) is not None} | {"model_args": DETECTOR_DEFAULTS | args}

def transfer_weights(model: Detector, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """A detector's state into `model` of any class count (train.py --weights): the prediction convs
    keep their [tx, ty, tw, th, obj] rows and get new class rows -> the keys given new rows."""
    ours, S = model.state_dict(), model.n_slots
    renewed = [k for k, v in ours.items() if k.endswith((".pred.weight", ".pred.bias")) and k in state
               and state[k].shape != v.shape and state[k].shape[1:] == v.shape[1:]]
    for key in renewed:
        rows = ours[key].clone().view(S, -1, *ours[key].shape[1:])               # (S, 5 + C_new, ...)
        rows[:, :5] = state[key].view(S, -1, *state[key].shape[1:])[:, :5]      # box + objectness
        state = state | {key: rows.view_as(ours[key])}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:                         # a missing, extra or mis-shaped key: the first
        raise data.DataError(f"{source}: another architecture: {str(e).splitlines()[1].strip()[:200]}") from e
    return renewed


# --- 7. Your own images (--detect) and a program that runs without this repository (--export) ---
def detect(model, paths: list[str], class_names, cat_ids, out, infer: Inference) -> int:
    """Detect on image files and folders: out/<name>.png each, out/detections.json the boxes over
    infer.conf clipped to the image (image_id: the file's place). -> the number of boxes."""
    files, out, rows, skipped = [], Path(out), [], 0
    for path in map(Path, paths):
        if not path.exists():
            raise data.UserError(f"{path}: no such file or folder")
        inside = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        files += inside if path.is_dir() else [path]
    if not files:
        raise data.UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    model, _ = prepare_for_inference(model), out.mkdir(parents=True, exist_ok=True)
    for k, file in enumerate(files):
        try:
            image = data.open_rgb(str(file))                                # EXIF-upright RGB
        except data.DataError as e:
            print(f"[{k + 1}/{len(files)}] skipped: {e}", flush=True)
            skipped += 1
            continue
        (det,) = infer(model, [np.asarray(image)])                          # (K, 7)
        det[:, [0, 2]] = det[:, [0, 2]].clamp(0, image.width)               # clipped to the image
        det[:, [1, 3]] = det[:, [1, 3]].clamp(0, image.height)
        det = det[(det[:, 2] > det[:, 0]) & (det[:, 3] > det[:, 1])]        # (K', 7) inside
        name = f"{file.stem}-{k}" if (out / f"{file.stem}.png").exists() and k else file.stem
        draw_boxes(image, det, class_names).save(out / f"{name}.png")
        rows += [r | {"file_name": str(file), "category": str(class_names[int(c)])}
                 for r, c in zip(to_coco_results([det], [k], cat_ids), det[:, 5].tolist())]
        print(f"[{k + 1}/{len(files)}] {file}: {len(det)} boxes over {infer.conf} -> {out / name}.png")
    (out / "detections.json").write_text(json.dumps(rows, indent=1))
    print(f"detected on {len(files) - skipped} image(s): {len(rows)} boxes over {infer.conf}; "
          f"{skipped} unreadable file(s) skipped; wrote {out}/detections.json")
    if skipped == len(files):
        raise data.UserError(f"none of the {len(files)} file(s) given could be read as an image")
    return len(rows)

def export(model, path, infer: Inference, class_names) -> Path:
    """torch.export of the prepared model for any batch and H, W (multiples of 32), with meta.json:
    what a process without this repository needs to run it on an image."""
    black, white = (data.normalize(np.full((1, 1, 3), v, np.uint8), 1).flatten() for v in (0, 255))
    std = [1.0] * 3 if infer.darknet else (1 / (white - black)).tolist()  # data.normalize's
    mean = [0.0] * 3 if infer.darknet else (-black * torch.tensor(std)).tolist()  # (x/255 - mean) / std
    h, w = torch.export.Dim("h", max=64), torch.export.Dim("w", max=64)
    example = torch.zeros(2, 3, infer.eval_size, infer.eval_size)                 # (B, 3, S, S)
    with torch.no_grad():
        exported = torch.export.export(prepare_for_inference(model, channels_last=False), (example,),
                                       dynamic_shapes=({0: torch.export.Dim("batch"), 2: 32 * h, 3: 32 * w},))
    meta = {"input": "RGB (B, 3, H, W): (pixels / 255 - mean) / std, H and W multiples of 32",
            "resize": "letterbox on 0.5 grey" if infer.darknet else "plain bilinear", "mean": mean,
            "std": std,
            "eval_size": infer.eval_size, "output": "(B, N, 5+C) [cx, cy, w, h, obj, class probs] input px",
            "score": "obj * max class prob", "conf": infer.conf, "nms": infer.nms, "nms_per_class": True,
            "max_det": infer.max_det, "class_names": list(class_names)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(exported, str(path), extra_files={"meta.json": json.dumps(meta)})
    print(f"wrote {path}; torch.export.load(path, extra_files={{'meta.json': ''}}) gives it and its settings")
    return Path(path)


# --- 8. The command line ---
def build_parser() -> argparse.ArgumentParser:
    size, unit, count = data.SIZE, data.FRACTION, data.COUNT
    p = data.Parser(description=__doc__.split("\n")[0], allow_abbrev=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", help="our checkpoint, an authors' .pth or darknet's .weights; none: random")
    p.add_argument("--raw", action="store_true", help="our checkpoint's raw weights, not the EMA")
    p.add_argument("--data", help="a COCO root (val2017/, annotations/); none: the run's synthetic set")
    p.add_argument("--images", help="the image folder of a COCO-format set of your own (with --ann)")
    p.add_argument("--ann", help="the annotation JSON of that set (with --images)")
    p.add_argument("--test-dev", action="store_true", help="write the COCO server's file for test2017")
    p.add_argument("--eval-size", type=size, help="test size; none: the checkpoint's, else 608")
    p.add_argument("--conf", type=unit, help=f"score threshold; none: {CONF_THRE}, pictures {DRAW_CONF}")
    p.add_argument("--nms", type=unit, default=NMS_THRE, help="per-class NMS IoU (release: 0.65)")
    p.add_argument("--max-det", type=count, default=MAX_DET, help="boxes kept per image")
    p.add_argument("--batch-size", type=count, default=8, help="images per forward")
    p.add_argument("--limit", type=count, help="evaluate the first N images only")
    device = data.checked(torch.device, lambda d: d.type == "cpu" or torch.cuda.is_available(),
                          "must be cpu, or cuda with a GPU")
    p.add_argument("--device", type=device, help="cpu, cuda or cuda:K; none: cuda if there is a GPU")
    p.add_argument("--out", help="folder of metrics.json, pictures; none: runs/show, runs/detect")
    p.add_argument("--debug", action="store_true", help="a user error shows its traceback too")
    p.add_argument("--show", nargs="?", const="", metavar="IMAGE", help="Figure 3 of IMAGE (none: "
                   "the first evaluation image)")
    p.add_argument("--detect", nargs="+", metavar="PATH", help="detect on images and folders")
    p.add_argument("--export", metavar="FILE", help="write a torch.export program (.pt2) and its settings")
    return p

def open_dataset(args, saved: dict) -> data.CocoDetection:
    """--images/--ann, COCO's val2017 (test-dev2017) under --data, or the checkpoint's synthetic set."""
    if args.images:
        return data.CocoDetection(args.images, args.ann, require_annotations=not args.test_dev)
    if not args.data:              # the demo's validation set, as many images as its run used
        paths = data.make_synthetic(n_train=0, n_val=saved.get("config", {}).get("synthetic_val", 64))
        return data.CocoDetection(paths["val_images"], paths["val_json"])
    if not Path(args.data).is_dir():
        raise data.UserError(f"--data {args.data}: no such folder (a COCO root holds val2017/ and "
                             "annotations/); a set of your own is --images FOLDER --ann FILE.json")
    split, ann = ("test2017", "image_info_test-dev2017") if args.test_dev else (
        "val2017", "instances_val2017")
    return data.CocoDetection(f"{args.data}/{split}", f"{args.data}/annotations/{ann}.json",
                              require_annotations=not args.test_dev)

def class_names(saved: dict, num_classes: int, dataset=None) -> tuple[list[str], list[int]]:
    """(names, category ids) of the model's classes: the checkpoint's, the data set's, COCO's."""
    for names, ids in ((saved.get("class_names"), saved.get("cat_ids")),
                       (getattr(dataset, "class_names", None), getattr(dataset, "cat_ids", None)),
                       (COCO_NAMES, COCO_CAT_IDS)):
        if names and len(names) == num_classes:
            return list(names), list(ids if ids and len(ids) == num_classes else range(num_classes))
    return [f"class {k}" for k in range(num_classes)], list(range(num_classes))

def toy_nms() -> None:
    """`python evaluate.py` alone: postprocess on four decoded boxes."""
    decoded = torch.tensor([[[50., 50, 40, 40, 0.9, 0.9, 0.1],     # class 0, score 0.81
                             [54., 50, 40, 40, 0.8, 0.9, 0.1],     # class 0, IoU 0.82 with it: goes
                             [54., 50, 40, 40, 0.8, 0.1, 0.9],     # class 1: kept (another class)
                             [200., 90, 30, 60, 0.004, 0.9, 0.1]]])  # score < 0.005: goes
    torch.set_printoptions(precision=3, sci_mode=False)
    print(f"four decoded boxes [cx, cy, w, h, obj, p(class 0), p(class 1)]:\n{decoded[0]}\nkept by "
          f"postprocess (score >= {CONF_THRE}, per-class NMS at IoU {NMS_THRE}) as [x1, y1, x2, y2, score, "
          f"class, obj]:\n{postprocess(decoded)[0]}\n(python evaluate.py -h lists the flags)")

def start(args) -> tuple[Detector, dict, Inference]:
    """(the model on its device (torchrun: the group joined), the file's settings, Inference)."""
    chosen = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:   # torchrun: a process per GPU (or CPU share)
        chosen = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if chosen.type == "cuda" else chosen
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    model, saved = load_detector(args.weights, False if args.raw else None)
    picture = args.detect or args.show is not None or args.export     # boxes for a person to see
    conf = args.conf if args.conf is not None else DRAW_CONF if picture else CONF_THRE
    infer = Inference(args.eval_size or saved.get("eval_size", 608), conf, args.nms, args.max_det,
                      darknet=str(args.weights).endswith(".weights"))
    return model.to(chosen), saved, infer

def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return toy_nms()
    args = (parser := build_parser()).parse_args(argv)
    if bool(args.images) != bool(args.ann) or (args.images and args.data):
        parser.error("--images and --ann go together: a set of your own is an image folder and its "
                     "COCO-format annotation JSON (instead of --data)")
    model, saved, infer = start(args)
    names, cat_ids = class_names(saved, model.num_classes)
    if args.export:
        return export(model, args.export, infer, names)
    if args.detect:
        return detect(model, args.detect, names, cat_ids, args.out or "runs/detect", infer)
    dataset = None if args.show else open_dataset(args, saved)
    if args.show is not None:                   # IMAGE, or the first image of the evaluation set
        image, image_id = (args.show, None) if args.show else dataset.load_image(0)
        name = "image" if image_id is None else Path(dataset.coco.imgs[image_id]["file_name"]).stem
        names = class_names(saved, model.num_classes, dataset)[0]
        return show(model, image, args.out or "runs/show", infer.eval_size, names, name, infer.conf,
                    infer.darknet)
    check_classes(model, dataset, args.weights or "random weights")
    evaluate(model, dataset, **dataclasses.asdict(infer), batch_size=args.batch_size, limit=args.limit,
             out=args.out, test_dev=args.test_dev)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    data.exit_on_user_error(main)
