"""COCO evaluation and Figure 3 pictures - paper Sec. 3.4, Tables 3-4 (AP), Figure 3.

Inference (Sec. 3.4): plain resize to the test size (as released; letterbox is an option), the
model's eval-mode decode (head.py), then `postprocess`: score = obj * class probability (the
argmax class, as released), a low threshold (COCO AP needs the tail), greedy NMS per class at
IoU 0.6 (the paper; the release 0.65), at most 100 boxes per image. Entry points:
    postprocess(decoded (B, N, 5+C)) -> B x (K, 7) [x1, y1, x2, y2, score, class, obj], input px
    to_original, to_coco_results, coco_score (pycocotools): image pixels, COCO ids, the 12 stats
    evaluate(model, dataset, cfg=EvalConfig(), **settings) -> dict (sharded over torch ranks)
    draw_figure3(image, detections, maps, class_names) -> PIL.Image; show(...) writes it
    load_model(weights) -> Detector: our checkpoint, an authors' one, darknet's .weights
    dataclass_parser(cls, ...), init_distributed(device): command line and torchrun, as train.py

Command line (`python evaluate.py -h`; no arguments prints the help and a toy NMS example):
    python evaluate.py --weights yolov3_asff.pth --data /coco --size 608    # val2017 AP
    python evaluate.py --weights ckpt.pt --data /coco --test-dev --out run/  # server file
    python evaluate.py --show img.jpg --weights ckpt.pt --out run/           # Figure 3
    python evaluate.py --detect photos/ --weights ckpt.pt --out found/       # your images
    torchrun --nproc_per_node 4 evaluate.py --weights ...                    # sharded
    python tests/bench.py speed --runs 5 --threads 1                         # Tables 3-4 FPS
Our checkpoints carry their model arguments, evaluation size and class names, used by default
(flags override; a flag contradicting the architecture is an error).

Departures from the release: NMS 0.6 (paper), not 0.65; at most 100 boxes per image (COCO scores
100); pure-PyTorch NMS. As released, boxes are not clipped and widths get no +1.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import itertools
import json
import os
import shutil
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pycocotools.cocoeval import COCOeval

import data
from asff import ConvBN
from darknet import read_darknet_weights
from head import DeformConv2d, Detector, columns_weight, load_released

CONF_THRE = 0.005   # low, as COCO AP needs (the release: 0.001 in eval.py, 0.01 in main.py)
NMS_THRE = 0.6      # Sec. 3.4; the release's config moved to 0.65 after publication
MAX_DET = 100       # COCOeval's maxDets: more boxes per image are never scored
DRAW_CONF = 0.3     # pictures (--detect, --show) draw boxes over this score
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")   # order of COCOeval.stats
PAPER_COLUMNS = COCO_STATS[:6]                                # Tables 3-4
COCO_NAMES = tuple(n.replace("_", " ") for n in (  # the 80 classes in sorted-id order (the release's
    # demo.py indexed a 90-name list and labelled most classes wrongly: docs/released-code.md)
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush").split())
COCO_CAT_IDS = tuple(k for k in range(1, 91) if k not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


# ---------------------------------------------------------------------------------------------
# Post-processing (Sec. 3.4): threshold, per-class NMS, top 100
# ---------------------------------------------------------------------------------------------
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
    """Greedy NMS per class -> kept indices by descending score (ties: input order). A box goes
    when its IoU with a kept, higher-scoring box of its class is > iou_thre. Each class is shifted
    to its own region of the plane (float64: exact), so one greedy pass does every class; in
    chunks by score (memory O(chunk^2)), stopping once `max_det` boxes are kept."""
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
    """Decoded rows (B, N, 5+C) -> per image (K <= max_det, 7) [x1, y1, x2, y2, score = obj * cls
    prob, class index, obj] by descending score; candidates: the argmax class of each box, or
    with multi_label every (box, class) pair over the threshold."""
    out = []
    for p in decoded:                 # (N, 5+C); class probs <= 1, so obj >= conf is necessary
        p = p[p[:, 4] >= conf_thre]                                      # (N', 5+C)
        obj = p[:, 4]                                                    # (N',)
        if multi_label:
            rows, cls = (p[:, 5:] * obj[:, None] >= conf_thre).nonzero(as_tuple=True)  # (K,), (K,)
            score = p[rows, 5 + cls] * obj[rows]                         # (K,)
        else:
            cls_prob, cls = p[:, 5:].max(1)                              # (N',), (N',)
            score = obj * cls_prob                                       # (N',) obj * max cls
            rows = (score >= conf_thre).nonzero().squeeze(1)             # (K,)
            cls, score = cls[rows], score[rows]                          # (K,), (K,)
        cx, cy, w, h = p[rows, :4].unbind(-1)                            # (K,) each
        boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)  # (K, 4) corners
        keep = batched_nms(boxes, score, cls, nms_thre, max_det)         # (K',)
        columns = (score[keep, None], cls[keep, None].to(p.dtype), obj[rows][keep, None])
        out.append(torch.cat((boxes[keep], *columns), dim=1))            # (K', 7)
    return out


# ---------------------------------------------------------------------------------------------
# The inference-time model: eval mode, conv+BN folded, NHWC, convs packed, optionally compiled
# ---------------------------------------------------------------------------------------------
def prepare_for_inference(model: Detector, fold: bool = True, channels_last: bool = True,
                          compile: bool = False, in_place: bool = False, pack: bool = True) -> Detector:
    """The one place where a model is made ready to evaluate, detect, export or time (all call
    it): eval mode; each BatchNorm folded into its conv (ConvBN.fuse_bn: the same function up to
    float rounding) and the activations made in-place (each acts on a conv's fresh output);
    NHWC ("channels_last") tensors, which oneDNN convolutions on CPUs and tensor cores on GPUs
    run without layout reorders; on a CPU, each conv's weight packed for oneDNN (once per input
    shape) with its activation inside the same call (PackedConv; pack=False, or no oneDNN: 1x1
    convs dilated instead, the same conv run by oneDNN); torch.compile when asked (inductor; on
    a CPU it needs a C++ compiler). Unless in_place, on a deep copy: a model in training
    (train.py's) stays as it is. The result is for inference only: no gradients, and not for
    saving (export: pack off)."""
    model = model if in_place else copy.deepcopy(model)
    model.eval()
    if fold and hasattr(model, "fuse_conv_bn"):           # a Detector (tests pass stand-ins)
        model.fuse_conv_bn()
        for m in model.modules():
            if isinstance(m, torch.nn.LeakyReLU):
                m.inplace = True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if pack and not compile and can_pack(device_of(model)):
        pack_convs(model)
    else:
        for m in model.modules():
            # A 1x1 conv ignores dilation; dilated, PyTorch's CPU dispatch sends it to oneDNN
            # even single-threaded, not to its MKL GEMM path (~2x slower on AVX-512 CPUs).
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.weight.is_cpu:
                m.dilation = (2, 2)
    if compile:
        model.forward = compiled(model.forward, device_of(model))
    return model


def fused_activation(act: torch.nn.Module) -> tuple[str, list] | None:
    """The (name, scalars) by which oneDNN applies `act` inside a conv, or None if it cannot."""
    if type(act) is torch.nn.LeakyReLU:
        return "leaky_relu", [act.negative_slope]
    return {torch.nn.Identity: ("none", []), torch.nn.ReLU: ("relu", [])}.get(type(act))


class PackedConv(torch.nn.Module):
    """A CPU conv (and the activation after it) as one oneDNN call on a weight packed ahead.

    Eager PyTorch hands oneDNN the weight in PyTorch's layout at every call, and oneDNN first
    reorders it into its blocked layout: for the stride-32 3x3 convs (1024 x 512 x 3 x 3, 19 MB)
    that copy costs about as much as the conv itself at 416. Here the reorder happens once per
    input shape, and the activation runs in the same pass over the output. These are the ops
    torch.compile's CPU backend emits (torch.ops.mkldnn); the sums are the same, the outputs
    equal to rounding.

    Which blocked layout oneDNN wants depends on the CPU and on the input's shape (on AVX2 its
    kernels block the weight by 16, 24 or 32 output channels as the map's width suits). A weight
    packed for another shape is re-laid-out at every call by a slow generic reorder, so each
    input shape gets its own packing, made at its first call: the last SHAPES_KEPT are kept."""

    SHAPES_KEPT = 2            # evaluation runs one size; the speed benchmark alternates two

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: torch.nn.Module,
                 padding=(0, 0), stride=(1, 1), dilation=(1, 1), groups: int = 1):
        super().__init__()
        self.args = (list(padding), list(stride), list(dilation), groups)
        self.register_buffer("weight", weight.detach().contiguous())   # PyTorch's layout
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.packed = {}                   # input shape -> the weight in oneDNN's layout for it
        self.act, self.scalars = fused_activation(act)

    def packed_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The weight packed (opaque oneDNN tensor, no gradient) for inputs of `shape`."""
        if shape not in self.packed:
            while len(self.packed) >= self.SHAPES_KEPT:
                self.packed.pop(next(iter(self.packed)))                  # the oldest shape
            self.packed[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.to_mkldnn(), *self.args, list(shape))
        return self.packed[shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed_for(tuple(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *self.args,
                                                       self.act, self.scalars, "")  # (B, C_out, H', W')


def pack_conv(conv: torch.nn.Conv2d, act: torch.nn.Module) -> PackedConv:
    """`conv` followed by `act` (an activation fused_activation knows) as one PackedConv."""
    return PackedConv(conv.weight, conv.bias, act, conv.padding, conv.stride, conv.dilation, conv.groups)


def pack_convs(model: torch.nn.Module) -> None:
    """Every float32 nn.Conv2d -> PackedConv, with the activation of a folded ConvBN fused in;
    each deformable conv's 1x1 conv over its columns packed too."""
    fp32 = lambda m: m.weight.dtype == torch.float32                  # noqa: E731
    for block in list(model.modules()):
        if isinstance(block, ConvBN) and isinstance(block.bn, torch.nn.Identity) and fp32(block.conv) \
                and fused_activation(block.act) is not None:            # a folded ConvBN
            block.conv, block.act = pack_conv(block.conv, block.act), torch.nn.Identity()
        if isinstance(block, DeformConv2d) and fp32(block):
            block.project = PackedConv(columns_weight(block.weight), block.bias, torch.nn.Identity())
    for parent in list(model.modules()):
        for name, m in parent.named_children():
            if type(m) is torch.nn.Conv2d and fp32(m):
                setattr(parent, name, pack_conv(m, torch.nn.Identity()))


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's tensors are (a packed model may keep no parameters: it is on the CPU)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@functools.cache
def can_pack(device: torch.device) -> bool:
    """Whether PackedConv runs here: a CPU whose PyTorch has oneDNN, checked on a small conv."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    conv = torch.nn.utils.skip_init(torch.nn.Conv2d, 4, 8, 3, padding=1)   # draws no RNG
    x = torch.arange(2 * 4 * 6 * 6, dtype=torch.float32).view(2, 4, 6, 6).sin()
    try:
        with torch.no_grad():
            conv.weight.copy_(torch.linspace(-1, 1, conv.weight.numel()).view_as(conv.weight))
            conv.bias.fill_(0.1)
            packed = pack_conv(conv, torch.nn.LeakyReLU(0.1))(x)
            return torch.allclose(packed, F.leaky_relu(conv(x), 0.1), rtol=1e-4, atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def compiled(forward, device: torch.device):
    """torch.compile(forward); on a CPU, inductor builds its kernels with a C++ compiler, so
    without one it is refused here rather than failing at the first call."""
    if device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        raise data.UserError("--compile on a CPU needs a C++ compiler (torch inductor builds its "
                             "kernels with it); none found: install g++ or drop --compile")
    return torch.compile(forward)


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
    """(K, 7) detections in input pixels -> (K, 7) in the original image's pixels (a new tensor):
    x * (orig_w / in_w) for the plain resize, (x - pad_x) * (orig_w / new_w) for the letterbox."""
    (in_h, in_w), (h, w) = input_hw, original_hw
    new_w, new_h, pad_x, pad_y = (letterbox_geometry(original_hw, input_hw) if letterbox
                                  else (in_w, in_h, 0, 0))
    out = det.clone()                                                    # (K, 7)
    out[:, [0, 2]] = (det[:, [0, 2]] - pad_x) * (w / new_w)
    out[:, [1, 3]] = (det[:, [1, 3]] - pad_y) * (h / new_h)
    return out


def preprocess(image: np.ndarray, size: int, letterbox: bool = False,
               darknet: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size): data.normalize's plain resize (the release's), or
    that resize to the letterbox area pasted on zeros (= the mean colour). darknet: what darknet's
    own models were trained on - pixels / 255, no mean or std, letterbox bars of 0.5."""
    new_w, new_h, pad_x, pad_y = (letterbox_geometry(image.shape[:2], (size, size)) if letterbox
                                  else (size, size, 0, 0))
    if darknet:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255   # (1, 3, H, W)
        resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    else:
        resized = data.normalize(image, (new_h, new_w))                  # (3, new_h, new_w)
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
    return [{"image_id": int(image_id), "category_id": int(cat_ids[int(cls)]),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
             "score": round(score, 5)}
            for det, image_id in zip(detections, image_ids)
            for x1, y1, x2, y2, score, cls, _ in det.tolist()]


def check_results(results: list[dict], coco_gt) -> None:
    """Refuse results whose category or image id the annotations lack (before pycocotools, whose
    own message is an assert or a KeyError deep inside COCOeval)."""
    cats, images = set(coco_gt.getCatIds()), set(coco_gt.getImgIds())
    bad_cats = sorted({r["category_id"] for r in results} - cats)
    bad_images = sorted({r["image_id"] for r in results} - images)
    if bad_cats:
        raise ValueError(f"results use category id(s) {bad_cats[:10]} that the annotation file "
                         f"does not define (it has {len(cats)}: {sorted(cats)[:10]}...)")
    if bad_images:
        raise ValueError(f"results use image id(s) {bad_images[:10]} that the annotation file lacks")


def coco_score(coco_gt, results: list[dict], image_ids: list[int] | None = None,
               verbose: bool = True) -> dict[str, float]:
    """COCOeval(bbox) of `results` over `image_ids` (default: all) -> the 12 stats as floats;
    prints pycocotools' summary when verbose. No detections at all scores 0."""
    check_results(results, coco_gt)
    if not results:
        print("no detections: every AP and AR is 0")
        return dict.fromkeys(COCO_STATS, 0.0)
    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
        cocoeval = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox")
        if image_ids is not None:                     # (loadRes adds keys to each dict: copies)
            cocoeval.params.imgIds = sorted(image_ids)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, cocoeval.stats)}


# ---------------------------------------------------------------------------------------------
# Evaluation loop: one process or sharded over torch.distributed ranks
# ---------------------------------------------------------------------------------------------
def _load_batch(dataset, indices, cfg: "EvalConfig", failures: list[str]):
    """Load and preprocess images; a failing image is named, counted and left out."""
    inputs, metas = [], []
    for index in indices:
        try:
            image, image_id = dataset.load_image(index)
        except Exception as e:  # noqa: BLE001 - any decode failure: name it, skip the image
            info = getattr(dataset, "coco", None) and dataset.coco.imgs.get(dataset.ids[index])
            failures.append(info["file_name"] if info else f"image id {dataset.ids[index]}")
            print(f"skipped {failures[-1]}: {type(e).__name__}: {e}", flush=True)
            continue
        inputs.append(preprocess(image, cfg.size, cfg.letterbox, cfg.darknet_input))  # (3, S, S)
        metas.append((index, image_id, image.shape[:2]))
    return inputs, metas


def _infer_shard(model, dataset, indices, cfg: "EvalConfig", total: int, world: int,
                 verbose: bool) -> tuple[dict[int, list[dict]], list[str]]:
    """Detections of the images at `indices`: {dataset index: COCO result dicts}, failures; a
    status line every ~5 s (rank 0's count x ranks, rate, ETA)."""
    device, per_image, failures = device_of(model), {}, []
    tic, last = time.time(), 0.0
    post = dict(conf_thre=CONF_THRE if cfg.conf_thre is None else cfg.conf_thre,
                nms_thre=cfg.nms_thre, max_det=cfg.max_det, multi_label=cfg.multi_label)
    for start in range(0, len(indices), cfg.batch_size):
        inputs, metas = _load_batch(dataset, indices[start:start + cfg.batch_size], cfg, failures)
        if inputs:
            x = torch.stack(inputs).to(device)                           # (B, 3, S, S)
            with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=cfg.half):
                decoded = model(x).float()                               # (B, N, 5+C)
            for det, (index, image_id, hw) in zip(postprocess(decoded, **post), metas):
                det = to_original(det.cpu(), (cfg.size, cfg.size), hw, cfg.letterbox)  # (K, 7)
                per_image[index] = to_coco_results([det], [image_id], dataset.cat_ids)
        done, now = min((start + cfg.batch_size) * world, total), time.time()
        if verbose and (now - last > 5 or done >= total):
            rate, last = done / max(now - tic, 1e-9), now
            print(f"eval {done}/{total} images  {rate:.1f} img/s  ETA "
                  f"{(total - done) / max(rate, 1e-9):.0f}s", flush=True)
    return per_image, failures


def check_classes(model, dataset, weights: str | None = None) -> None:
    """The model's class k is the data set's category cat_ids[k]: a model of another class
    count is refused before any image is run."""
    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != len(dataset.cat_ids):
        raise data.DataError(f"{weights or 'the model'}: {classes} classes, but "
                             f"{getattr(dataset, 'ann_file', 'the data set')} has "
                             f"{len(dataset.cat_ids)} categories; evaluate a model on the "
                             "categories it was trained on")


def evaluate(model, dataset, cfg: "EvalConfig | None" = None, verbose: bool = True,
             **settings) -> dict[str, float]:
    """COCO evaluation of `model` (the bare Detector, not its DDP wrapper) on `dataset` (.coco,
    .cat_ids, .ids, load_image(i) -> (uint8 (H, W, 3), image_id)). cfg: an EvalConfig; keyword
    `settings` replace its fields (train.py: size=..., nms_thre=...). Under torch.distributed rank
    r runs images r, r + world, ...; rank 0 scores and writes cfg.out; every rank returns rank 0's
    dict: the 12 COCO stats (not with test_dev), images, failed_images, detections, size, seconds."""
    cfg = dataclasses.replace(cfg or EvalConfig(), **settings)
    check_classes(model, dataset)
    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    start, n = time.time(), len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    prepared = prepare_for_inference(model, cfg.fold, cfg.channels_last, cfg.compile)  # a copy
    part = _infer_shard(prepared, dataset, list(range(rank, n, world)), cfg, n, world,
                        verbose and rank == 0)
    parts = [part] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(parts, part)
    metrics = [{}]
    if rank == 0:
        per_image = {i: r for p, _ in parts for i, r in p.items()}
        failures = [name for _, f in parts for name in f]
        results = [r for i in sorted(per_image) for r in per_image[i]]   # dataset order
        image_ids = [dataset.ids[i] for i in range(n)]                   # failed ones included
        metrics = [_report(dataset, results, image_ids, failures, cfg, verbose, start)]
    if world > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


def _report(dataset, results, image_ids, failures, cfg: "EvalConfig", verbose: bool,
            start: float) -> dict[str, float]:
    """Rank 0: score (or write the test-dev file), print, and write cfg.out."""
    counts = {"images": float(len(image_ids)), "failed_images": float(len(failures)),
              "detections": float(len(results)), "size": float(cfg.size),
              "seconds": time.time() - start}
    if verbose:
        print(f"evaluated {len(image_ids)} images at {cfg.size} x {cfg.size}, {len(results)} "
              f"detections, {len(failures)} failed to decode{': ' if failures else ''}"
              + ", ".join(failures[:5]))
    check_results(results, dataset.coco)
    out = Path(cfg.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.test_dev:   # the evaluation server's file name rule: detections_test-dev2017_<alg>_results
        (out / "detections_test-dev2017_asff_results.json").write_text(json.dumps(results))
        print(f"wrote {out}/detections_test-dev2017_asff_results.json for the COCO test-dev "
              "server (not scored here)")
        return counts
    metrics = coco_score(dataset.coco, results, image_ids, verbose) | counts
    if verbose:                                       # the paper's columns, in percent
        print("".join(f"{k:>7}" for k in PAPER_COLUMNS) + "\n"
              + "".join(f"{100 * metrics[k]:>7.1f}" for k in PAPER_COLUMNS))
    if cfg.out:
        (out / "results.json").write_text(json.dumps(results))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# ---------------------------------------------------------------------------------------------
# Figure 3: detections beside the fusion weight maps and the fused feature of each level
# ---------------------------------------------------------------------------------------------
# Heat map colours: five stops of matplotlib's "inferno", linear in between (0 is black).
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
    words = str(class_names[cls] if 0 <= cls < len(class_names) else "").lower().split()
    return COLOR_WORDS.get(words[0] if words else "", PALETTE[cls % len(PALETTE)])


def heat_colors(values: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] (clipped) -> (h, w, 3) uint8 RGB by HEAT_STOPS."""
    v = np.clip(np.asarray(values, np.float64), 0, 1)
    rgb = [np.interp(v, [s for s, _ in HEAT_STOPS], [c[k] for _, c in HEAT_STOPS]) for k in range(3)]
    return np.round(np.stack(rgb, -1)).astype(np.uint8)


def label_font(size: int):
    """PIL's default font at `size` px (Pillow >= 10.1 scales it; older ones: its fixed bitmap)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, det, class_names, conf: float = 0.0) -> Image.Image:
    """A copy of `image` with each (K, 7) detection (its pixels) over `conf` boxed in its class's
    colour and labelled "name score" (labels placed by label_spots, so none hides another);
    lines and text scale with the image."""
    scale = max(image.size) / 640
    font = label_font(max(11, round(14 * scale)))
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    det = torch.as_tensor(np.asarray(det, np.float64)).reshape(-1, 7)    # (K, 7)
    det = det[(det[:, 4] >= conf) & torch.isfinite(det).all(1)]          # (K', 7)
    det[:, [0, 2]] = det[:, [0, 2]].clamp(-1, image.width)     # Pillow fails on huge coordinates
    det[:, [1, 3]] = det[:, [1, 3]].clamp(-1, image.height)
    rows = det.tolist()
    labels = [f"{class_names[int(c)] if int(c) < len(class_names) else int(c)} {score:.2f}"
              for *_, score, c, _ in rows]
    extents = [draw.textbbox((0, 0), label, font=font) for label in labels]
    sizes = [(b[2] - b[0] + 4, b[3] - b[1] + 4) for b in extents]        # label boxes (w, h)
    spots = label_spots([r[:4] for r in rows], sizes, image.size)
    colors = [class_color(class_names, int(r[5])) for r in rows]
    for (x1, y1, x2, y2, *_), color in zip(rows, colors):                 # boxes, then labels
        draw.rectangle((x1, y1, x2, y2), outline=color, width=max(2, round(3 * scale)))
    for label, color, (tx, ty) in zip(labels, colors, spots):
        box = draw.textbbox((tx + 2, ty + 2), label, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=color)
        draw.text((tx + 2, ty + 2), label, fill=(0, 0, 0), font=font)
    return image


def label_spots(boxes, sizes, image_wh) -> list[tuple[float, float]]:
    """Top-left corners for the labels (w, h) of boxes [x1, y1, x2, y2], in order (highest
    score first): the first of above the box, inside its top, inside its bottom, below it that
    stays in the picture and overlaps no label placed before; else above the box."""
    placed, spots = [], []
    for (x1, y1, _, y2), (w, h) in zip(boxes, sizes):
        tx = min(max(x1, 0), max(image_wh[0] - w, 0))                  # inside the picture
        tries = [y1 - h, max(y1, 0), y2 - h, y2]                        # above, in, in, below
        inside = [ty for ty in tries if 0 <= ty <= image_wh[1] - h] or [max(y1, 0)]
        free = [ty for ty in inside if not any(
            tx < px + pw and px < tx + w and ty < py + ph and py < ty + h for px, py, pw, ph in placed)]
        ty = (free or inside)[0]
        placed.append((tx, ty, w, h))
        spots.append((tx, ty))
    return spots


def figure3_size(image_wh: tuple[int, int], tile: int = TILE) -> tuple[int, int]:
    """(width, height) of draw_figure3's canvas for an image of (w, h) with fusion maps."""
    panel_h = 3 * tile + 2 * GAP
    return round(image_wh[0] * panel_h / image_wh[1]) + 4 * (GAP + tile), TITLE + panel_h + BAR


def tile_origin(image_wh: tuple[int, int], row: int, col: int, tile: int = TILE):
    """Top-left (x, y) of the heat-map tile of level row (0 = s32, 1 = s16, 2 = s8), column col
    (0 alpha, 1 beta, 2 gamma, 3 fused)."""
    det_w = figure3_size(image_wh, tile)[0] - 4 * (GAP + tile)
    return det_w + GAP + col * (tile + GAP), TITLE + row * (tile + GAP)


def draw_figure3(image, detections, maps, class_names, tile: int = TILE) -> Image.Image:
    """Figure 3: the image (PIL or uint8 (H, W, 3)) with its (K, 7) detections, beside one row
    per level (s32, s16, s8) of heat maps: alpha, beta, gamma (Eq. 2 weights of the s32, s16, s8
    sources, scale [0, 1] with a colour bar) and the channel-summed fused y^l (min-max scaled).
    maps: {stride: {"weights": (3, h, w), "fused": (h, w)}}, or None (no ASFF): boxes alone."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if not maps:
        return draw_boxes(image, detections, class_names)
    width, height = figure3_size(image.size, tile)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    det_w, det_h = width - 4 * (GAP + tile), height - TITLE - BAR
    det = torch.as_tensor(np.asarray(detections, np.float64)).reshape(-1, 7).clone()  # (K, 7)
    det[:, [0, 2]] *= det_w / image.width                 # boxes drawn after the resize: crisp
    det[:, [1, 3]] *= det_h / image.height
    canvas.paste(draw_boxes(image.resize((det_w, det_h), Image.BILINEAR), det, class_names), (0, TITLE))
    draw.text((2, 2), "detections", fill=(0, 0, 0), font=font)
    for col, title in enumerate(MAP_COLUMNS):
        draw.text((tile_origin(image.size, 0, col, tile)[0] + 2, 2), title, fill=(0, 0, 0), font=font)
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
    canvas.paste(Image.fromarray(heat_colors(np.tile(np.linspace(0, 1, width), (8, 1)))), (x, y + 4))
    for value in (0.0, 0.5, 1.0):
        tx, label = x + round(value * (width - 1)), f"{value:g}"
        draw.line((tx, y + 12, tx, y + 15), fill=(0, 0, 0))
        draw.text((min(max(tx - 3 * len(label), x), x + width - 6 * len(label)), y + 15), label,
                  fill=(0, 0, 0), font=font)
    draw.text((x + width // 4 - 40, y + 15), "Eq. 2 weight", fill=(0, 0, 0), font=font)
    draw.text((x + width + GAP + 2, y + 4), "fused: min-max per level", fill=(0, 0, 0), font=font)


def show(model, image, out: str, size: int, class_names, name: str = "image",
         cfg: "EvalConfig | None" = None, **settings) -> Path:
    """Figure 3 of one image (a file path, or uint8 (H, W, 3) RGB) at size x size, boxes over
    conf_thre (default DRAW_CONF); cfg and `settings` as in evaluate. Writes and returns
    out/figure3_<name>.png (name: the file's stem for a path)."""
    cfg = dataclasses.replace(cfg or EvalConfig(), size=size, **settings)
    if isinstance(image, (str, Path)):
        image, name = np.asarray(data.open_rgb(str(image))), Path(image).stem   # EXIF-upright
    conf = DRAW_CONF if cfg.conf_thre is None else cfg.conf_thre
    model = prepare_for_inference(model, cfg.fold, cfg.channels_last)
    det, x = detect_image(model, image, cfg)                       # (K, 7), (1, 3, S, S)
    maps = None
    if model.fusion_mode == "asff":
        with torch.inference_mode():
            maps = {s: {k: t[0] for k, t in m.items()} for s, m in model.fusion_maps(x).items()}
    path = Path(out) / f"figure3_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_figure3(image, det[det[:, 4] >= conf], maps, class_names).save(path)
    print(f"wrote {path}: {int((det[:, 4] >= conf).sum())} detections over {conf}")
    return path


# ---------------------------------------------------------------------------------------------
# Detection on your own images (--detect), and export (--export)
# ---------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(paths: list[str]) -> list[Path]:
    """The files given and the image files inside the folders given (recursively, sorted)."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise data.UserError(f"{path}: no such file or folder")
        files += sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) \
            if path.is_dir() else [path]
    if not files:
        raise data.UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return files


def detect_image(model, image: np.ndarray, cfg: "EvalConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) RGB -> ((K, 7) detections in its pixels, every box over CONF_THRE; the
    (1, 3, S, S) input): the evaluation's preprocessing, decode and NMS, in eval mode."""
    x = preprocess(image, cfg.size, cfg.letterbox, cfg.darknet_input)[None]      # (1, 3, S, S)
    x = x.to(device_of(model))
    with torch.inference_mode():
        det = postprocess(model.eval()(x), CONF_THRE, cfg.nms_thre, cfg.max_det, cfg.multi_label)[0]
    return to_original(det.cpu(), (cfg.size, cfg.size), image.shape[:2], cfg.letterbox), x


def detect(model, paths: list[str], class_names, cat_ids, cfg: "EvalConfig") -> dict:
    """Detect on image files and folders, into cfg.out (default detections/): <name>.png per image
    with its boxes over cfg.conf_thre (default DRAW_CONF), and detections.json, every box over
    CONF_THRE as COCO results (image_id: the file's place in the list) with file_name and
    category. Unreadable files are named, skipped and counted. -> {"images", "skipped", "boxes"}"""
    files, out = image_files(paths), Path(cfg.out or "detections")
    model = prepare_for_inference(model, cfg.fold, cfg.channels_last, cfg.compile)
    out.mkdir(parents=True, exist_ok=True)
    conf = DRAW_CONF if cfg.conf_thre is None else cfg.conf_thre
    rows, skipped, drawn, names, start = [], [], 0, set(), time.time()
    for k, file in enumerate(files):
        try:
            image = data.open_rgb(str(file))                                # EXIF-upright RGB
        except data.DataError as e:
            skipped.append(str(e))
            print(f"[{k + 1}/{len(files)}] skipped: {e}", flush=True)
            continue
        det = detect_image(model, np.asarray(image), cfg)[0]                # (K, 7)
        name = file.stem if file.stem not in names else f"{file.stem}-{k}"
        names.add(name)
        draw_boxes(image, det, class_names, conf).save(out / f"{name}.png")
        rows += [r | {"file_name": str(file), "category": str(class_names[int(c)])}
                 for r, c in zip(to_coco_results([det], [k], cat_ids), det[:, 5].tolist())]
        drawn += int((det[:, 4] >= conf).sum())
        left = (time.time() - start) / (k + 1) * (len(files) - k - 1)
        print(f"[{k + 1}/{len(files)}] {file}: {int((det[:, 4] >= conf).sum())} boxes over {conf} "
              f"-> {out / name}.png (ETA {left:.0f} s)", flush=True)
    (out / "detections.json").write_text(json.dumps(rows, indent=1))
    print(f"detected on {len(files) - len(skipped)} image(s), {drawn} boxes over {conf}; "
          f"{len(skipped)} unreadable file(s) skipped; wrote {out}/detections.json "
          f"({len(rows)} boxes over {CONF_THRE})")
    return {"images": len(files) - len(skipped), "skipped": skipped, "boxes": len(rows)}


def export(model, path: str, size: int, fold: bool = True) -> Path:
    """torch.export of the model as prepare_for_inference makes it, for (B, 3, size, size)
    normalised inputs, any batch B -> (B, N, 5 + C) decoded rows, as model(x); run it with
    torch.export.load(path).module()."""
    model = prepare_for_inference(model, fold, channels_last=False, pack=False)  # plain weights, saved
    example = torch.zeros(2, 3, size, size, device=device_of(model))
    with torch.no_grad():
        program = torch.export.export(model, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        rows = model(example[:1]).shape[1]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    print(f"wrote {path}: (B, 3, {size}, {size}) -> (B, {rows}, {5 + model.num_classes}) decoded "
          "[cx, cy, w, h, obj, cls...] in input pixels")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Plumbing: the command line - flags generated from one dataclass, torchrun, what main runs
# ---------------------------------------------------------------------------------------------
def opt(default, help: str, **argparse_keywords):
    """A config field: its --help text, and other add_argument keywords for dataclass_parser
    (flags, choices, nargs, const, metavar)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_keywords})


@dataclasses.dataclass
class EvalConfig:
    # what to evaluate, on what
    weights: str | None = opt(None, "our checkpoint, an authors' .pth, darknet's .weights; none: random")
    ema: bool | None = opt(None, "our checkpoint's EMA (--no-ema: raw) weights; default: EMA if saved")
    data: str | None = opt(None, "COCO root: val2017/ (test2017/), annotations/; none: synthetic set")
    images: str | None = opt(None, "image folder of a custom COCO-format set (with --ann)")
    ann: str | None = opt(None, "annotation JSON of that set (with --images)")
    test_dev: bool = opt(False, "write the results file for the COCO server (not scored here)")
    # inference (Sec. 3.4)
    size: int = opt(608, "test size, a multiple of 32; default: the checkpoint's, else 608")
    conf_thre: float | None = opt(None, f"score threshold; default: {CONF_THRE} to evaluate, "
                                        f"{DRAW_CONF} to draw", flags=("--conf", "--draw-conf"))
    nms_thre: float = opt(NMS_THRE, "per-class NMS IoU (paper 0.6; release 0.65)", flags=("--nms",))
    max_det: int = opt(MAX_DET, "detections kept per image (COCO scores 100)")
    multi_label: bool = opt(False, "every class over --conf is a detection, not only the argmax")
    letterbox: bool = opt(False, "letterbox instead of the released plain resize")
    darknet_input: bool = opt(False, "darknet's input: pixels / 255, letterbox (a .weights file's)")
    fold: bool = opt(True, "fold conv+BN, in-place activations (prepare_for_inference; same outputs)")
    channels_last: bool = opt(True, "NHWC tensors for the convolutions (faster on CPU and GPU)")
    compile: bool = opt(False, "torch.compile the model (first call slow; a CPU needs a C++ compiler)")
    # the run
    batch_size: int = opt(8, "images per forward", flags=("--batch",))
    limit: int | None = opt(None, "evaluate only the first N images", metavar="N")
    device: str | None = opt(None, "cpu, cuda or cuda:K; default: cuda if there is a GPU")
    half: bool = opt(False, "fp16 autocast (for a GPU)")
    threads: int = opt(0, "torch CPU threads (0: torch's choice)")
    out: str | None = opt(None, "folder for metrics, results, pictures (--detect: detections/)")
    debug: bool = opt(False, "a user error shows its traceback too (as ASFF_DEBUG=1)")
    # the model without --weights; with --weights, a flag given must agree with the file
    fusion: str | None = opt("asff", "Table 3's fusion", choices=(None, "sum", "concat", "asff"))
    rfb: bool = opt(False, "RFB in the heads (ASFF*, Table 4)")
    num_classes: int = opt(80, "classes (also of darknet's .weights)")
    width: float = opt(1.0, "channel multiplier (1: DarkNet-53)")
    depth: float = opt(1.0, "residual-unit multiplier (1: DarkNet-53)")
    # instead of evaluating
    show: str | None = opt(None, "Figure 3 of IMAGE (default: the first evaluation image)", nargs="?",
                           const="", metavar="IMAGE")
    detect: list[str] | None = opt(None, "detect on images, folders: PNGs, detections.json", metavar="PATH")
    export: str | None = opt(None, "write a torch.export program (.pt2) for --size inputs", metavar="FILE")


MODEL_FLAGS = ("num_classes", "fusion", "rfb", "width", "depth")   # EvalConfig's Detector arguments


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake ends with one line on stderr and exit status 2, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (-h lists the flags)\n")


def none_or(kind):
    """argparse type of an optional field: "none" -> None, else kind(text)."""
    def convert(text: str):
        return None if text.lower() == "none" else kind(text)
    convert.__name__ = kind.__name__                   # argparse's "invalid float value: 'x'"
    return convert


def dataclass_parser(cls, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """argparse from a dataclass of opt() fields: --field-name (or metadata "flags"), its help with
    "[default: ...]" unless it says "default" itself, bools as --x/--no-x, lists nargs="+",
    "none" -> None for optional fields, other metadata to add_argument; no abbreviations.
    Defaults are SUPPRESSed: vars(parse_args()) holds the flags given; cls(**given) the config."""
    parser = OneLineParser(description=description, epilog=epilog, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        flags, text = meta.pop("flags", ("--" + f.name.replace("_", "-"),)), meta.pop("help")
        shown = "none" if f.default is None else f.default
        text = text if "default" in text else f"{text} [default: {shown}]"
        keywords = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **keywords, **meta)
            continue
        if typing.get_origin(kind) is list:
            kind, meta["nargs"] = typing.get_args(kind)[0], meta.get("nargs", "+")
        optional = type(None) in typing.get_args(f.type) and "nargs" not in meta
        if "choices" in meta:
            meta.setdefault("metavar", "{" + ",".join(str(c).lower() for c in meta["choices"]) + "}")
        parser.add_argument(*flags, type=none_or(kind) if optional else kind, **keywords, **meta)
    return parser


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """torchrun's RANK / LOCAL_RANK / WORLD_SIZE (a plain run: rank 0 of 1) -> (rank, world,
    device); with world > 1 it joins the process group, nccl on GPUs, gloo on CPU. device: "cpu",
    "cuda", "cuda:K" or None (cuda if there is a GPU); under torchrun a GPU is cuda:LOCAL_RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError as e:
        raise data.UserError(f"--device {name}: not a torch device (cpu, cuda, cuda:K)") from e
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise data.UserError(f"--device {name}: torch sees no GPU here; use --device cpu")
        if world > 1 or chosen.index is None:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return rank, world, chosen


def check_settings(cfg: EvalConfig, size_from: str = "--size") -> None:
    """Values that would fail deep inside with a traceback, refused in one line (a size the
    strides do not divide ends in "Sizes of tensors must match" at the fusion)."""
    if cfg.size < 32 or cfg.size % 32:
        low = max(32, cfg.size // 32 * 32)
        raise data.UserError(f"{size_from} {cfg.size}: the test size must be a multiple of 32 (the "
                             f"coarsest stride), e.g. {low} or {low + 32}")
    for flag, value, ok in (("--batch", cfg.batch_size, cfg.batch_size >= 1),
                            ("--max-det", cfg.max_det, cfg.max_det >= 1),
                            ("--limit", cfg.limit, cfg.limit is None or cfg.limit >= 1),
                            ("--threads", cfg.threads, cfg.threads >= 0),
                            ("--nms", cfg.nms_thre, 0 <= cfg.nms_thre <= 1),
                            ("--conf", cfg.conf_thre, cfg.conf_thre is None or 0 <= cfg.conf_thre <= 1)):
        if not ok:
            raise data.UserError(f"{flag} {value}: out of range (--batch, --max-det, --limit: 1 or "
                                 "more; --threads: 0 or more; --nms, --conf: in [0, 1])")
    if cfg.data and not Path(cfg.data).is_dir():
        raise data.UserError(f"--data {cfg.data}: no such folder (a COCO root holds val2017/ and "
                             "annotations/); a custom set is --images FOLDER --ann FILE.json")


def open_dataset(cfg: EvalConfig) -> data.CocoDetection:
    """COCO val2017 / test-dev2017 under --data, a custom set (--images, --ann), or the built-in
    synthetic validation set (what train.py's demo uses, cached)."""
    unlabelled = dict(require_annotations=not cfg.test_dev)   # test-dev has no annotations
    if cfg.images:
        return data.CocoDetection(cfg.images, cfg.ann, **unlabelled)
    if cfg.data:
        split, ann = (("test2017", "image_info_test-dev2017.json") if cfg.test_dev
                      else ("val2017", "instances_val2017.json"))
        return data.CocoDetection(os.path.join(cfg.data, split),
                                  os.path.join(cfg.data, "annotations", ann), **unlabelled)
    paths = data.make_synthetic()
    return data.CocoDetection(paths["val_images"], paths["val_json"])


def class_names(saved: dict, num_classes: int, dataset=None) -> tuple[list[str], list[int]]:
    """(names, category ids) of the model's classes: the checkpoint's, the data set's, COCO's
    for 80 classes, else "class k" and k."""
    for names, ids in ((saved.get("class_names"), saved.get("cat_ids")),
                       (getattr(dataset, "class_names", None), getattr(dataset, "cat_ids", None))):
        if names and len(names) == num_classes:
            return list(names), list(ids if ids and len(ids) == num_classes else range(num_classes))
    if num_classes == len(COCO_NAMES):
        return list(COCO_NAMES), list(COCO_CAT_IDS)
    return [f"class {k}" for k in range(num_classes)], list(range(num_classes))


def _demo() -> None:
    """No arguments: a toy run of postprocess on four boxes (two overlap in class 0)."""
    decoded = torch.tensor([[[50., 50, 40, 40, 0.9, 0.9, 0.1],     # class 0, score 0.81
                             [54., 50, 40, 40, 0.8, 0.9, 0.1],     # class 0, IoU 0.82: dropped
                             [54., 50, 40, 40, 0.8, 0.1, 0.9],     # class 1: kept (other class)
                             [200., 90, 30, 60, 0.004, 0.9, 0.1]]])  # score < 0.005: dropped
    print("\ntoy example: decoded rows [cx, cy, w, h, obj, cls0, cls1] ->\npostprocess (conf "
          f"0.005, NMS 0.6): [x1, y1, x2, y2, score, class, obj]\n{postprocess(decoded)[0]}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    examples = __doc__[__doc__.index("Command line"):__doc__.index("Departures")]
    parser = dataclass_parser(EvalConfig, __doc__.split("\n")[0], examples)
    if not argv:
        return parser.print_help() or _demo()
    given = vars(parser.parse_args(argv))
    cfg = EvalConfig(**given)
    if bool(cfg.images) != bool(cfg.ann) or (cfg.images and cfg.data):
        parser.error("--images and --ann go together: a custom set is an image folder and its "
                     "COCO-format annotation JSON (instead of --data)")
    check_settings(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, _, device = init_distributed(cfg.device)
    flags = {k: getattr(cfg, k) for k in MODEL_FLAGS if k in given or not cfg.weights}
    model, saved = load_detector(cfg.weights, cfg.ema, **flags)
    model = model.to(device).eval()
    if "size" not in given and saved.get("eval_size"):             # the size it was trained for
        cfg = dataclasses.replace(cfg, size=int(saved["eval_size"]))
        check_settings(cfg, f"{cfg.weights}: eval_size")
    darknet = cfg.darknet_input or str(cfg.weights).endswith(".weights")  # darknet's model, input
    cfg = dataclasses.replace(cfg, darknet_input=darknet, letterbox=cfg.letterbox or darknet)
    if cfg.export:
        return export(model, cfg.export, cfg.size, cfg.fold)
    if cfg.detect:
        return detect(model, cfg.detect, *class_names(saved, model.num_classes), cfg)
    if cfg.show is not None:                   # IMAGE, or the first image of the evaluation set
        dataset = open_dataset(cfg) if not cfg.show or cfg.data or cfg.ann else None
        image, image_id = (cfg.show, None) if cfg.show else dataset.load_image(0)
        name = "image" if image_id is None else Path(dataset.coco.imgs[image_id]["file_name"]).stem
        names = class_names(saved, model.num_classes, dataset)[0]
        return show(model, image, cfg.out or ".", cfg.size, names, name, cfg)
    dataset = open_dataset(cfg)
    check_classes(model, dataset, cfg.weights or f"random weights (--num-classes {cfg.num_classes})")
    evaluate(model, dataset, cfg)
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Plumbing: weights - our checkpoints, the authors' released ones, darknet's yolov3.weights
# ---------------------------------------------------------------------------------------------
DETECTOR_DEFAULTS = {k: p.default for k, p in inspect.signature(Detector).parameters.items()}
SAVED_SETTINGS = ("eval_size", "class_names", "cat_ids")           # what else our checkpoints hold


def read_checkpoint(path: str) -> dict:
    """torch.load(path, weights_only=True) of a checkpoint or state dict; anything else is a
    UserError naming the file and what it is not (missing, empty, not a torch file, code)."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        raise data.UserError(f"{path}: {'empty file' if Path(path).is_file() else 'no such file'}, "
                             "not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and weights-only refusals alike
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise data.UserError(f"{path}: not a checkpoint that torch.load(weights_only=True) can "
                             f"read ({type(e).__name__}: {detail})") from e
    if not isinstance(state, dict) or not state:
        raise data.UserError(f"{path}: holds a {type(state).__name__}, not a checkpoint or state dict")
    return state


def is_training_checkpoint(state: dict) -> bool:
    """train.py's checkpoints: model, optimizer and config side by side (see train.py)."""
    return all(k in state for k in ("model", "optimizer", "config"))


def load_foreign(load, path: str, *args):
    """Call a weights loader (head.load_released, darknet.read_darknet_weights, load_checked); its
    key, shape and length errors become DataErrors (UserErrors) naming the file."""
    if not Path(path).is_file():
        raise data.UserError(f"{path}: no such file")
    try:
        return load(*args)
    except (KeyError, ValueError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise data.DataError(message if str(path) in message else f"{path}: {message}") from e


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
    """Detector arguments of our checkpoint: its model_args (train.py saves them), or in an older
    one its config's Detector arguments, num_classes (taken from the data set) read off the s32 head."""
    config = dict(ckpt.get("model_args") or
                  {k: ckpt["config"][k] for k in DETECTOR_DEFAULTS if k in ckpt["config"]})
    config["fusion"] = None if config.get("fusion") == "none" else config.get("fusion")
    config["anchors"] = None if config.get("anchors") == "auto" else config.get("anchors")
    if "num_classes" not in config:
        slots = 4 if config.get("guided", True) else 3           # 5 + C outputs per slot
        config["num_classes"] = ckpt["model"]["heads.s32.pred.weight"].shape[0] // slots - 5
    return config


def load_detector(weights: str | None = None, ema: bool | None = None,
                  **model_flags) -> tuple[Detector, dict]:
    """(Detector, the SAVED_SETTINGS its file holds) from our checkpoint (its EMA weights if saved,
    unless ema=False; ema=True requires them), an authors' state dict, darknet's .weights, or None
    (random, from `model_flags`); with a file, `model_flags` must agree with its architecture."""
    if weights is None:
        return Detector(**model_flags), {}
    darknet = str(weights).endswith(".weights")
    state = {} if darknet else read_checkpoint(weights)
    ours = "model" in state and "config" in state
    args = (dict(num_classes=model_flags.get("num_classes", 80), fusion=None, guided=False, spp=False)
            if darknet else checkpoint_config(state) if ours
            else load_foreign(released_config, weights, state))
    for key, value in model_flags.items():
        theirs = args.get(key, DETECTOR_DEFAULTS[key])
        if value != theirs:
            value, theirs = ("none" if v is None else v for v in (value, theirs))
            raise data.UserError(f"--{key.replace('_', '-')} {value} contradicts {weights}, a model "
                                 f"with {key} {theirs}: leave the flag out")
    model = Detector(**args)
    if darknet:
        load_foreign(read_darknet_weights, weights, str(weights), model.darknet_layers())
        return model, {}
    if not ours:
        return load_foreign(load_released, weights, model, state, str(weights)), {}
    if ema and state.get("ema") is None:
        raise data.UserError(f"{weights}: the checkpoint holds no EMA weights (trained with ema 0)")
    use_ema = state.get("ema") is not None and ema is not False
    load_foreign(load_checked, weights, model, state["ema" if use_ema else "model"], str(weights))
    saved = {k: state[k] for k in SAVED_SETTINGS if state.get(k) is not None}
    eval_size = saved.get("eval_size", state["config"].get("eval_size"))
    return model, saved | ({"eval_size": eval_size} if eval_size else {})


def load_model(weights: str | None = None, ema: bool | None = None, **model_flags) -> Detector:
    """load_detector's model alone."""
    return load_detector(weights, ema, **model_flags)[0]


if __name__ == "__main__":
    if "--debug" in sys.argv[1:]:
        os.environ["ASFF_DEBUG"] = "1"    # data.exit_on_user_error then shows the traceback
    data.exit_on_user_error(main)
