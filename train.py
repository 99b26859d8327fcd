"""Training - paper Sec. 3.4 (SGD, cosine learning rate, random input shapes, a pretrained
backbone) with the bag of freebies of Sec. 3.1 (mixup, synchronized BatchNorm), as one script;
`python train.py -h` shows the flags and examples, the README the paper's runs (Tables 1-4).

Per iteration (train_step): the iteration's random input size (the same on every rank), forward,
loss.compute_loss, the loss terms averaged over ranks, backward, SGD step, EMA; a non-finite
loss, gradient or weight stops the run before anything is saved. Per epoch (train_one_epoch):
the mixup switch and the DropBlock schedule; evaluation every --eval-every epochs; last.pt and
best.pt. Defaults: the paper where it is explicit, the release (docs/released-code.md) where it
is silent, a flag for each other choice; every epoch count is a fraction of --epochs. Without
--data the CPU demo's settings (DEMO) replace the defaults.

Run folder (--out): last.pt (each epoch, at the end, on SIGTERM / SIGINT), best.pt (best AP),
log.jsonl, metrics.json (AP ... APl in [0, 1], time, images/s), figure3_demo.png, curves.png
(write_curves: the loss terms, lr and AP of log.jsonl; `--plot RUN_DIR` redraws it). Checkpoints
hold tensors and plain Python (weights_only=True): model, optimizer, scaler, ema, Progress's
fields, config, world_size, rng (per rank), and model_args (the Detector's arguments),
eval_size, class_names and cat_ids, which evaluate.py reads.
"""

import copy
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
import evaluate
from darknet import read_darknet_weights
from evaluate import opt
from head import Detector, load_released
from loss import IOU_FORMS, compute_loss


@dataclass
class Config:
    """The paper's hyper-parameters (Sec. 3.4) and the run's settings; the command line is made
    from it (evaluate.dataclass_parser), a checkpoint saves it as a dict."""
    # where things are
    data: str = opt("", "COCO root with train2017/, val2017/, annotations/; empty: the synthetic set")
    out: str = opt("runs/asff", "run folder: last.pt, best.pt, log.jsonl, metrics.json, picture; "
                                "with --resume the checkpoint's folder unless given")
    resume: str = opt("", "a last.pt to continue exactly, with its settings (flags given must "
                          "agree, but for --out, --max-iters and the run's flags below)")
    backbone: str = opt("", "pretrained DarkNet-53 (Sec. 3.4): darknet53.conv.74 or the release's "
                            "darknet53_feature_mx.pth; empty: MSRA init everywhere")
    weights: str = opt("", "start a new run from a whole detector: our checkpoint, a released "
                           ".pth or darknet's yolov3.weights, any class count (fine-tuning; "
                           "--resume continues a run instead)")
    train_images: str = opt("", "a custom COCO-format set instead of --data: training images")
    train_ann: str = opt("", "... its training annotation JSON (any categories)")
    val_images: str = opt("", "... validation images")
    val_ann: str = opt("", "... validation annotation JSON (the same categories)")
    synthetic_train: int = opt(1024, "images in the synthetic training set (data.make_synthetic)")
    synthetic_val: int = opt(64, "images in the synthetic validation set")
    # the model (Tables 1-4)
    fusion: str | None = opt("asff", "Table 3's fusion", choices=(None, "sum", "concat", "asff"))
    guided: bool = opt(True, "guided anchoring + anchor-free slot (Sec. 3.1, Table 1 'GA')")
    spp: bool = opt(True, "SPP at stride 32 (in the release's strong baseline)")
    rfb: bool = opt(False, "RFB in the heads (ASFF*, Table 4)")
    dropblock: bool = opt(False, "DropBlock in the pyramid (ASFF*, Table 4; schedule: DROPBLOCK)")
    width: float = opt(1.0, "channel multiplier (1 = the paper's DarkNet-53)")
    depth: float = opt(1.0, "residual-unit multiplier (1 = the paper's DarkNet-53)")
    anchors: str = opt("auto", "released: ninth anchor (121, 240), what every released darknet "
                               "model was trained with; yolov3: YOLOv3's (373, 326); auto: "
                               "released with guided anchoring, yolov3 without",
                       choices=("auto", "released", "yolov3"))
    # the loss (Tables 1-2)
    iou_loss: bool | None = opt(None, "IoU losses (Table 1); none: on with guided anchoring")
    iou_form: str = opt("1-iou^2", "IoU loss form: 1-iou^2 (released), -ln(iou) (UnitBox, the "
                                   "paper's citation) or 1-iou", choices=IOU_FORMS)
    ignore_thre: float = opt(0.7, "YOLOv3's ignore threshold (release cfg IGNORETHRE)")
    ignore_ratio: float | None = opt(None, "adjacent-level ignore area (Table 2: 0.2 best); "
                                           "none: off, as released")
    label_smooth: bool = opt(True, "the release's label smoothing (not in the paper)")
    # data
    mixup: bool = opt(True, "mixup (Sec. 3.1 bag of freebies)")
    augment: bool = opt(True, "the release's colour, zoom-out, crop, flip and affine steps")
    include_crowd: bool = opt(False, "train on COCO's crowd boxes too (the release does)")
    mixup_off: float = opt(30 / 300, "fraction of the epochs, at the end, without mixup "
                                     "(Sec. 3.4: the last 30 of 300)")
    size_min: int = opt(320, "smallest random input size, a multiple of 32 (Sec. 3.4: 320)")
    size_max: int = opt(608, "largest random input size, a multiple of 32 (Sec. 3.4: 608)")
    size_every: int = opt(10, "iterations per random size (release; the paper: every batch)")
    fixed_size_last: float = opt(0.0, "fraction of the epochs, at the end, at --size-max only "
                                      "(release: the last 10 of 300); 0: random to the end")
    eval_size: int = opt(608, "test size, a multiple of 32 (Table 3: 608)")
    nms: float = opt(0.6, "NMS IoU of the periodic evaluation (Sec. 3.4: 0.6; release: 0.65)")
    # optimisation (Sec. 3.4)
    epochs: int = opt(300, "Sec. 3.4: 300 epochs")
    batch_size: int = opt(16, "images per process and micro-batch (Sec. 3.4: 4 GPUs x 16)")
    accumulate: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "learning rate per 64 images, scaled linearly with the total batch "
                          "(Sec. 3.4: 0.001 at 4 x 16)")
    min_lr: float = opt(1e-5, "end of the cosine, per 64 images (Sec. 3.4: 0.00001)")
    scale_lr: bool = opt(True, "scale lr and min_lr by total batch / 64 (off: the release's flat "
                               "1e-3 whatever the batch)")
    schedule: str = opt("paper", "paper: linear warm-up, then cosine per iteration to the end; "
                                 "released: (it/W)^4 over 5/300, flat to 20/300, cosine per "
                                 "epoch to 270/300, then min_lr (--warmup ignored)",
                        choices=("paper", "released"))
    warmup: float = opt(4 / 300, "fraction of the iterations in linear warm-up (Sec. 3.4: 4 of "
                                 "300 epochs)")
    momentum: float = opt(0.9, "SGD momentum (Sec. 3.4)")
    weight_decay: float = opt(5e-4, "on conv weights only (Sec. 3.4: 0.0005)")
    decay_all: bool = opt(False, "weight decay on every parameter, BatchNorm and biases too (as "
                                 "released; its --nowd is ours)")
    clip_grad: float = opt(0.0, "clip the gradient norm to this (not in the paper or release); 0: off")
    ema: float = opt(0.0, "EMA decay of the weights, e.g. 0.9998 (not in the paper); 0: off")
    amp: str = opt("auto", "mixed precision; auto: bf16 on a GPU that has it, else fp16 with a "
                           "GradScaler; none on CPU", choices=("auto", "none", "bf16", "fp16"))
    freeze_bn: bool = opt(False, "BatchNorm in eval mode: fixed statistics (tiny batches)")
    channels_last: bool = opt(True, "NHWC tensors for the convolutions: faster on CPUs (oneDNN) "
                                    "and on GPUs (tensor cores); the same function")
    compile: bool = opt(False, "torch.compile the model's forward (the first steps are slow; a "
                               "CPU needs a C++ compiler)")
    # the run
    workers: int = opt(4, "DataLoader worker processes per rank")
    threads: int = opt(0, "torch CPU threads per process (0: torch's choice, one per core; on a "
                          "machine shared with other jobs, fewer threads than cores is faster)")
    seed: int = opt(0, "seeds the init, the data order and draws, and the random sizes")
    log_every: int = opt(10, "iterations between progress lines (release: 10)")
    eval_every: int = opt(10, "epochs between evaluations (release: 10)")
    max_iters: int = opt(0, "stop after this many iterations, schedule unchanged (0: no limit)")
    exist_ok: bool = opt(False, "a new run may replace the run in --out (its files are removed)")
    debug: bool = opt(False, "a user error shows its traceback too (as ASFF_DEBUG=1)")
    plot: str = opt("", "only draw RUN_DIR/curves.png from its log.jsonl (no training)",
                    metavar="RUN_DIR")



# The CPU demo (no --data): a small ASFF trained from scratch on data.make_synthetic's shapes,
# 1,152 steps of 16 images (18 epochs of 1,024) at 128-192 px (README, "Two commands", for its
# time and AP).
# It departs from the recipe where 10 minutes demand it: no pretrained backbone, so a larger lr;
# the loss (summed over cells, divided by the batch) starts with a gradient norm of ~6000,
# which diverges without the release's slow (it/W)^4 warm-up unless the norm is clipped; no
# mixup and no augmentation (each doubles the steps needed here), the 1024 distinct images of
# synthetic_train's default instead; small inputs (the synthetic images are 192 px); and no
# label smoothing: the release's targets 1 - 1/C and 1/C are 0.9875 / 0.0125 for COCO's 80
# classes but 0.8 / 0.2 for these 5, which cost 0.11 AP here (README, "The demo's settings").
DEMO = dict(out="runs/demo", width=0.25, depth=0.33, epochs=18, batch_size=16,
            lr=8e-2, min_lr=4e-4, warmup=0.05, clip_grad=10.0, mixup=False, augment=False,
            label_smooth=False, size_min=128, size_max=192, eval_size=192, workers=0, eval_every=5)

# ASFF* DropBlock schedule as released (docs/released-code.md, DropBlock schedule), epochs as
# fractions of the schedule: off before 5/300, then block sizes per stride with keep 0.9.
DROPBLOCK = ((5 / 300, {32: 1, 16: 3, 8: 5}), (80 / 300, {32: 3, 16: 5, 8: 7}),
             (150 / 300, {32: 7, 16: 7, 8: 7}))
DROPBLOCK_KEEP = 0.9
TERMS = ("total", "anchor", "iou", "l1", "obj", "cls")             # what the progress line shows


# ---------------------------------------------------------------------------------------------
# The schedule (Sec. 3.4), as functions of the iteration or epoch (the tests check them)
# ---------------------------------------------------------------------------------------------
def lr_at(cfg: Config, iteration: int, total_iters: int, world: int) -> float:
    """Linear warm-up to lr * total_batch / 64, then cosine to min_lr * total_batch / 64
    (scale_lr off: lr and min_lr as given; schedule "released": released_lr)."""
    scale = cfg.batch_size * cfg.accumulate * world / 64 if cfg.scale_lr else 1.0
    base, final = cfg.lr * scale, cfg.min_lr * scale               # Sec. 3.4: 1e-3 at 4 x 16
    if cfg.schedule == "released":
        return released_lr(cfg, iteration, total_iters, base, final)
    warm = round(cfg.warmup * total_iters)
    if iteration < warm:
        return base * (iteration + 1) / warm
    t = (iteration - warm) / max(total_iters - 1 - warm, 1)       # 0 -> 1 over the cosine
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(t, 1.0)))


def released_lr(cfg: Config, iteration: int, total_iters: int, base: float, final: float) -> float:
    """The release's schedule (docs/released-code.md, schedule), epochs as fractions of cfg.epochs:
    base * (it / W)^4 over the first 5/300 (W iterations), base until epoch 20/300, then a
    cosine stepped once per epoch that reaches `final` at epoch 270/300 and stays there."""
    per_epoch = total_iters / cfg.epochs
    burn_in = round(5 / 300 * cfg.epochs) * per_epoch
    if iteration < burn_in:
        return base * (iteration / burn_in) ** 4
    epoch = int(iteration // per_epoch)
    flat, end = round(20 / 300 * cfg.epochs), round(270 / 300 * cfg.epochs)
    t = min(max(epoch - flat, 0) / max(end - flat, 1), 1.0)       # 0 -> 1 over the cosine
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def size_at(cfg: Config, iteration: int, epoch: int) -> int:
    """Sec. 3.4 random shapes (the same on every rank: data.random_size depends on the seed and
    the iteration only); the last fixed_size_last of the epochs at size_max, as released."""
    if epoch >= cfg.epochs - round(cfg.fixed_size_last * cfg.epochs):
        return cfg.size_max
    return data.random_size(cfg.seed, iteration, cfg.size_every,
                            range(cfg.size_min, cfg.size_max + 1, 32))


def mixup_on(cfg: Config, epoch: int) -> bool:
    """Sec. 3.4: mixup for all but the last mixup_off fraction of the epochs."""
    return cfg.mixup and epoch < cfg.epochs - round(cfg.mixup_off * cfg.epochs)


def dropblock_at(cfg: Config, epoch: int) -> tuple[dict[int, int], float]:
    """ASFF*'s DropBlock (block size per stride, keep probability) in this epoch."""
    sizes, keep = {32: 1, 16: 1, 8: 1}, 1.0
    for start, block_sizes in DROPBLOCK:
        if epoch >= round(start * cfg.epochs):
            sizes, keep = block_sizes, DROPBLOCK_KEEP
    return sizes, keep


def evaluation_due(cfg: Config, epoch: int) -> bool:
    """After `epoch` whole epochs: every --eval-every epochs and at the end."""
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weight decay on conv weights (4-D) only; BatchNorm weights and all biases take none
    (decay_all: on everything, the release's default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim == 4], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim != 4], "weight_decay": 0.0}]


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


# ---------------------------------------------------------------------------------------------
# The model: Detector, pretrained weights (Sec. 3.4), EMA, mixed precision
# ---------------------------------------------------------------------------------------------
def model_args(cfg: Config, num_classes: int) -> dict:
    """The Detector's arguments (saved in every checkpoint as model_args)."""
    return dict(num_classes=num_classes, fusion=cfg.fusion, guided=cfg.guided, spp=cfg.spp,
                rfb=cfg.rfb, dropblock=cfg.dropblock, width=cfg.width, depth=cfg.depth,
                anchors=None if cfg.anchors == "auto" else cfg.anchors)


def build_model(cfg: Config, num_classes: int) -> Detector:
    """The Detector of the config (MSRA init, head.init_weights), with a pretrained backbone."""
    model = Detector(**model_args(cfg, num_classes))
    if cfg.backbone.endswith((".pth", ".pt")):    # the release's DarkNet-53 (one key map)
        state = evaluate.read_checkpoint(cfg.backbone)
        evaluate.load_foreign(load_released, cfg.backbone, model, state, cfg.backbone)
    elif cfg.backbone:                            # darknet's binary darknet53.conv.74
        evaluate.load_foreign(read_darknet_weights, cfg.backbone, cfg.backbone,
                              model.backbone.darknet_layers())
    if cfg.weights:
        start_from_detector(model, cfg)
    return model


ARCHITECTURE = ("fusion", "guided", "spp", "rfb", "dropblock", "width", "depth")


def detector_weights(cfg: Config, arch: dict) -> tuple[dict, int]:
    """(state dict, class count) of the whole detector in cfg.weights, in our key names."""
    path = cfg.weights
    if path.endswith(".weights"):                 # darknet's 80-class original YOLOv3
        source = Detector(80, **arch)
        evaluate.load_foreign(lambda: read_darknet_weights(path, source.darknet_layers()), path)
        return source.state_dict(), 80
    state = evaluate.read_checkpoint(path)
    if "model" in state and "config" in state:    # ours: the EMA weights when it kept them
        saved = evaluate.checkpoint_config(state)
        differ = [f"{k} (file {saved.get(k)!r}, this run {arch[k]!r})" for k in ARCHITECTURE
                  if k in saved and saved[k] != arch[k]]
        if differ:
            raise data.UserError(f"{path}: another architecture than this run's: "
                                 + ", ".join(differ) + "; give the file's flags")
        return state["ema"] or state["model"], saved["num_classes"]
    classes = evaluate.load_foreign(evaluate.released_config, path, state)["num_classes"]
    source = Detector(classes, **arch)             # the authors' file, through the key map
    evaluate.load_foreign(load_released, path, source, state, path)
    return source.state_dict(), classes


def start_from_detector(model: Detector, cfg: Config) -> None:
    """--weights: every tensor of the file; the class rows of the prediction convs are
    re-initialised when the class count differs (transfer_weights), with a report."""
    arch = {k: getattr(cfg, k) for k in ARCHITECTURE}
    state, classes = detector_weights(cfg, arch)
    report = evaluate.load_foreign(transfer_weights, cfg.weights, model, state, cfg.weights)
    fresh = report["reinitialised"]
    print(f"--weights {cfg.weights}: loaded {len(report['loaded'])} tensors"
          + (f"; {len(fresh)} prediction convs keep their box and objectness rows, their class "
             f"rows are new for {model.num_classes} classes (the file has {classes})" if fresh
             else f" (the file has the same {classes} classes)"), flush=True)


def transfer_weights(model: Detector, state: dict[str, torch.Tensor], source: str) -> dict:
    """Copy a state dict of `model`'s architecture, any class count: the prediction convs keep each
    slot's [tx, ty, tw, th, obj] rows from the file and `model`'s fresh class rows; any other
    shape difference names the key, the file and both shapes. -> {"loaded", "reinitialised": keys}"""
    ours = model.state_dict()
    for key in sorted(set(state) ^ set(ours)):
        where = "only in the file" if key in state else "missing from the file"
        raise ValueError(f"{source}: key {key} is {where}: the file holds another architecture "
                         "(fusion, guided, SPP, RFB?)")
    merged, report, S = {}, {"loaded": [], "reinitialised": []}, model.n_slots
    for key, target in ours.items():
        tensor = state[key].to(target.dtype)
        if tensor.shape == target.shape:
            merged[key], kind = tensor, "loaded"
        elif key.endswith((".pred.weight", ".pred.bias")) and tensor.shape[1:] == target.shape[1:] \
                and tensor.shape[0] % S == 0 and tensor.shape[0] // S > 5:   # only C differs
            rows = target.clone().view(S, -1, *target.shape[1:])          # (S, 5+C_new, ...)
            rows[:, :5] = tensor.view(S, -1, *tensor.shape[1:])[:, :5]     # box + objectness
            merged[key], kind = rows.view_as(target), "reinitialised"
        else:
            raise ValueError(f"{source}: key {key} has shape {tuple(tensor.shape)}, the model "
                             f"needs {tuple(target.shape)} (another width or depth?)")
        report[kind].append(key)
    model.load_state_dict(merged)
    return report


def amp_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Mixed precision: bf16 where the GPU has it, fp16 (with a GradScaler) otherwise."""
    if device.type != "cuda" or cfg.amp == "none":
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, updates: int) -> None:
    """e = d * e + (1 - d) * w, with d ramped up over the first few thousand steps (YOLOX)."""
    d = decay * (1 - math.exp(-updates / 2000))
    for e, w in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(d).add_(w.detach(), alpha=1 - d)
        else:
            e.copy_(w)


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a step works on: the model (its anchors for the loss, its weights checked), what
    is called (the model or its DDP wrapper), the optimizer, mixed precision, the EMA copy."""
    model: Detector
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    device: torch.device
    world: int = 1                                # processes
    ema: Detector | None = None


class NonFiniteLoss(RuntimeError):
    """A step gave a non-finite `what` (loss, gradient, weights); `detail` says which values."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"non-finite {what}: {detail}")
        self.what, self.detail = what, detail


def term_list(terms: torch.Tensor) -> str:
    return ", ".join(f"{t}={v:.4g}" for t, v in zip(TERMS, terms.tolist(), strict=True))


def non_finite_weights(model: torch.nn.Module, world: int) -> list[str]:
    """Names of the parameters and buffers that hold a non-finite value ([] on every rank when
    none does, on any). A finite loss and gradient can still take a step that overflows the
    weights (a huge learning rate or momentum); one fused max-abs per tensor finds that
    (about one read of the weights per step), before the weights reach the EMA or last.pt."""
    named = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
             if t.is_floating_point()]
    peaks = torch.stack(torch._foreach_norm([t.detach() for _, t in named], math.inf))
    bad = (~torch.isfinite(peaks)).sum()
    if world > 1:
        dist.all_reduce(bad)                      # BatchNorm statistics are per rank on CPU
    if not bad.item():
        return []
    names = [n for (n, _), peak in zip(named, peaks.tolist(), strict=True) if not math.isfinite(peak)]
    return names or ["on another rank"]


def train_step(parts: Parts, batches, size: int, cfg: Config) -> dict[str, float]:
    """cfg.accumulate micro-batches at size x size, then one SGD step; returns the loss terms
    averaged over ranks (and micro-batches). A non-finite loss term raises before any backward,
    a non-finite gradient or weight after the step (before the EMA or a checkpoint sees it)."""
    device, world, scaler, model = parts.device, parts.world, parts.scaler, parts.model
    terms = torch.zeros(len(TERMS), device=device)
    for k in range(cfg.accumulate):
        images, targets = next(batches)                                   # (B, 3, S0, S0)
        images, targets = data.resize_batch(images, targets, size)         # (B, 3, size, size)
        layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True, memory_format=layout)  # (B, 3, size, size)
        targets = [t.to(device) for t in targets]                          # B x (N_b, 6)
        last = k == cfg.accumulate - 1
        with parts.ddp.no_sync() if world > 1 and not last else nullcontext():
            with torch.autocast(device.type, parts.amp_dtype, enabled=parts.amp_dtype is not None):
                outputs = parts.ddp(images)                 # {stride: {"pred": (B, S, 5+C, h, w)}}
            outputs = {s: {k_: v if v is None else v.float() for k_, v in o.items()}
                       for s, o in outputs.items()}                        # the loss in fp32
            losses = compute_loss(outputs, targets, model, iou_loss=cfg.iou_loss,
                                  iou_form=cfg.iou_form, ignore_thre=cfg.ignore_thre,
                                  ignore_ratio=cfg.ignore_ratio, label_smooth=cfg.label_smooth)
            step_terms = torch.stack([losses[t].detach() for t in TERMS])  # (6,)
            if world > 1:
                dist.all_reduce(step_terms)                 # every rank sees a NaN of any rank
                step_terms /= world
            if not torch.isfinite(step_terms).all():
                raise NonFiniteLoss("loss", term_list(step_terms))
            scaler.scale(losses["total"] / cfg.accumulate).backward()
        terms += step_terms / cfg.accumulate
    scaler.unscale_(parts.optimizer)                  # a no-op without fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):   # fp16 skips such steps
        raise NonFiniteLoss("gradient", f"norm={grad_norm.item():.4g} (loss terms "
                            f"{term_list(terms)})")
    scaler.step(parts.optimizer)
    scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    bad = non_finite_weights(model, parts.world)
    if bad:
        raise NonFiniteLoss("weights", f"after the SGD step: {', '.join(bad[:3])}"
                            f"{' ...' if len(bad) > 3 else ''} (loss terms {term_list(terms)}, "
                            f"gradient norm {grad_norm.item():.4g})")
    return dict(zip(TERMS, terms.tolist(), strict=True)) | {"grad_norm": grad_norm.item()}


# ---------------------------------------------------------------------------------------------
# The data: COCO's layout, a custom COCO-format set or the synthetic shapes, checked at start
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The data of the run and its length in optimizer steps."""
    train_data: data.CocoDetection
    val_data: data.CocoDetection
    train_set: data.TrainDataset                  # one augmented sample stream per (seed, epoch, index)
    sampler: DistributedSampler                   # this rank's shard, reshuffled per epoch
    per_step: int                                 # images per process and optimizer step
    steps_per_epoch: int
    total_iters: int                              # of the schedule (lr and sizes follow it)
    planned: int                                  # this run's: --max-iters if fewer


def make_plan(cfg: Config, rank: int, world: int) -> Plan:
    """The data sets, the augmented training stream sharded by DistributedSampler, the length."""
    train_data, val_data = open_data(cfg, world, rank == 0)
    train_set = data.TrainDataset(train_data, size=cfg.size_max, seed=cfg.seed, mixup=cfg.mixup,
                                  augment=cfg.augment)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_step = cfg.batch_size * cfg.accumulate
    steps_per_epoch = len(sampler) // per_step
    total_iters = cfg.epochs * steps_per_epoch
    return Plan(train_data, val_data, train_set, sampler, per_step, steps_per_epoch, total_iters,
                min(total_iters, cfg.max_iters or total_iters))


def data_paths(cfg: Config) -> dict[str, str] | None:
    """Image folders and JSON files: a custom COCO-format set, COCO's layout under --data, or
    None (the synthetic set)."""
    if cfg.train_ann:
        return {"train_images": cfg.train_images, "train_json": cfg.train_ann,
                "val_images": cfg.val_images, "val_json": cfg.val_ann}
    if cfg.data:
        root = Path(cfg.data)
        return {f"{s}_{kind}": str(path) for s in ("train", "val") for kind, path in
                (("images", root / f"{s}2017"), ("json", root / "annotations" / f"instances_{s}2017.json"))}
    return None


def open_data(cfg: Config, world: int, master: bool):
    """(training CocoDetection, validation CocoDetection); rank 0 makes the synthetic set."""
    paths = data_paths(cfg)
    say(f"opening the data: {paths['train_json'] if paths else 'the synthetic set'} ...", flush=True)
    if paths is None:
        if world > 1 and not master:
            dist.barrier()                                     # wait for rank 0 to write it
        paths = data.make_synthetic(n_train=cfg.synthetic_train, n_val=cfg.synthetic_val)
        if world > 1 and master:
            dist.barrier()
    train_data = data.CocoDetection(paths["train_images"], paths["train_json"], cfg.include_crowd)
    val_data = data.CocoDetection(paths["val_images"], paths["val_json"])
    check_data(train_data, val_data, cfg.batch_size * cfg.accumulate * world)
    return train_data, val_data


def check_data(train_data, val_data, per_step: int) -> None:
    """Before any training: at least one optimizer step of training images (per_step = batch x
    accumulate x processes), and the validation categories the training ones (class k is the
    k-th smallest category id in both: evaluation maps classes back through the validation's)."""
    if len(train_data) < per_step:
        raise data.DataError(f"{train_data.ann_file}: {len(train_data)} training image(s), fewer "
                             f"than one optimizer step takes ({per_step} = batch size x "
                             "accumulate x processes); lower --batch-size or --accumulate")
    train = dict(zip(train_data.cat_ids, train_data.class_names, strict=True))
    val = dict(zip(val_data.cat_ids, val_data.class_names, strict=True))
    if train != val:
        only_val, only_train = sorted(val.keys() - train.keys()), sorted(train.keys() - val.keys())
        differences = [f"only in {split}: {_category_list(names, ids)}" for split, names, ids in
                       (("validation", val, only_val), ("training", train, only_train)) if ids]
        differences += [f"id {i} is {val[i]!r} in validation, {train[i]!r} in training"
                        for i in sorted(val.keys() & train.keys()) if val[i] != train[i]][:5]
        raise data.DataError(f"{val_data.ann_file}: the categories are not those of "
                             f"{train_data.ann_file}: {'; '.join(differences)}")


def _category_list(names: dict, ids: list) -> str:
    """The first five of ids with their names: 3 'cat', 7 'dog'."""
    return ", ".join(f"{i} {names[i]!r}" for i in ids[:5]) + (" ..." if len(ids) > 5 else "")


# ---------------------------------------------------------------------------------------------
# The run: set-up (DDP, SyncBN), the epochs, evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where the run stands; every checkpoint holds these fields, --resume restores them."""
    iteration: int = 0                            # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0                       # steps done in `epoch`: the data position
    best_ap: float = -1.0
    metrics: dict = field(default_factory=dict)   # of the latest evaluation
    evaluated_at: int = -1                        # the iteration it evaluated


def main(argv: list[str] | None = None) -> Detector | None:
    """Train as the command line says; returns this rank's trained model (None: a resumed run
    that was already finished, or --plot)."""
    cfg, ckpt = read_command_line(argv)
    if cfg.plot:
        print(write_curves(Path(cfg.plot)))
        return None
    if ckpt is not None and finished(ckpt, cfg):
        return None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = evaluate.init_distributed()
    if ckpt is not None:
        check_resumable(ckpt, cfg, world, cfg.resume)
    stop = {"signal": None}                 # SIGTERM / SIGINT: save last.pt after the step
    handlers = {s: signal.signal(s, partial(on_signal, stop)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(cfg, ckpt, rank, world, device, stop)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: Config, ckpt: dict | None, rank: int, world: int, device: torch.device,
        stop: dict) -> Detector:
    """Set-up, epochs of train_one_epoch with their evaluations and checkpoints, the summary."""
    if rank == 0:
        prepare_folder(cfg)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                   # the same init on every rank
    plan = make_plan(cfg, rank, world)
    parts, progress = set_up(cfg, ckpt, plan, rank, world, device)
    runlog = RunLog(Path(cfg.out), progress.iteration, Path(cfg.resume) if ckpt else None,
                    progress.iteration)
    write_log(runlog, {"resumed" if ckpt else "started": progress.iteration,
                       "config": dataclasses.asdict(cfg)})
    say(f"{world} process(es) on {device}, amp {parts.amp_dtype}; model "
        f"{sum(p.numel() for p in parts.model.parameters()):,} parameters; {len(plan.train_data)} "
        f"training images, {plan.steps_per_epoch} steps/epoch x {cfg.epochs} epochs = "
        f"{plan.total_iters} iterations (running {plan.planned}) of {plan.per_step * world} images")
    if progress.batch_in_epoch == 0 and 0 < progress.epoch and evaluation_due(cfg, progress.epoch) \
            and progress.evaluated_at != progress.iteration:
        run_evaluation(cfg, parts, plan, progress, runlog)    # a signal came before its evaluation
        save_checkpoints(cfg, parts, plan, progress, runlog)
    while progress.epoch < cfg.epochs and progress.iteration < plan.planned:
        if train_one_epoch(cfg, parts, plan, progress, runlog, stop):
            return parts.model                                # stopped by a signal, saved
        if progress.batch_in_epoch == plan.steps_per_epoch:   # a whole epoch done
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            if evaluation_due(cfg, progress.epoch):
                run_evaluation(cfg, parts, plan, progress, runlog)
        save_checkpoints(cfg, parts, plan, progress, runlog)
    if progress.evaluated_at != progress.iteration:           # --max-iters ended between them
        run_evaluation(cfg, parts, plan, progress, runlog)
        save_checkpoints(cfg, parts, plan, progress, runlog)
    if rank == 0:
        write_summary(cfg, parts, plan, progress, runlog)
    return parts.model


def set_up(cfg: Config, ckpt: dict | None, plan: Plan, rank: int, world: int,
           device: torch.device) -> tuple[Parts, Progress]:
    """Model (pretrained parts for a new run, the checkpoint's state for a resumed one), EMA,
    SGD on the weight-decay groups, mixed precision; DDP with SyncBN (Sec. 3.1) on GPUs."""
    weights_from = cfg if ckpt is None else dataclasses.replace(cfg, backbone="", weights="")
    model = build_model(weights_from, len(plan.train_data.cat_ids)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.decay_all), lr=0.0,
                                momentum=cfg.momentum)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    parts = Parts(model, model, optimizer, scaler, amp_dtype, device, world, ema)
    if ckpt is None:
        progress = Progress()
        torch.manual_seed(cfg.seed + rank)        # per-rank DropBlock draws from here on
    else:
        progress = restore(ckpt, parts, cfg.resume, rank)
    if world > 1:
        sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        parts.ddp = DistributedDataParallel(sync, device_ids=[device.index] if device.type == "cuda"
                                            else None)    # CPU (gloo) has no SyncBN
    if cfg.compile:
        parts.ddp = evaluate.compiled(parts.ddp, device)
    set_train_mode(model, cfg.freeze_bn)
    return parts, progress


def train_one_epoch(cfg: Config, parts: Parts, plan: Plan, progress: Progress, runlog: "RunLog",
                    stop: dict) -> bool:
    """The rest of epoch progress.epoch: its mixup switch (Sec. 3.4) and DropBlock (ASFF*), its
    data from the resume point, a train_step per batch at the iteration's size and learning
    rate. True when a signal stopped the run (last.pt saved)."""
    epoch = progress.epoch
    plan.train_set.set_epoch(epoch)
    plan.train_set.mixup = mixup_on(cfg, epoch)
    plan.sampler.set_epoch(epoch)
    parts.model.set_dropblock(*dropblock_at(cfg, epoch))
    batches = iter(epoch_loader(cfg, plan, progress, parts.device))
    while progress.batch_in_epoch < plan.steps_per_epoch and progress.iteration < plan.planned:
        tic = time.time()
        size = size_at(cfg, progress.iteration, epoch)           # the same on all ranks
        lr = lr_at(cfg, progress.iteration, plan.total_iters, parts.world)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        terms = guarded_step(cfg, parts, batches, size, progress, runlog)
        progress.iteration, progress.batch_in_epoch = progress.iteration + 1, progress.batch_in_epoch + 1
        if parts.ema is not None:
            ema_update(parts.ema, parts.model, cfg.ema, progress.iteration)
        report_progress(cfg, parts, plan, progress, runlog, terms | {"lr": lr, "size": size},
                        time.time() - tic)
        if stop_requested(stop, parts.device):
            if progress.batch_in_epoch == plan.steps_per_epoch:  # its last step: the next at 0
                progress.epoch, progress.batch_in_epoch = epoch + 1, 0
            save_checkpoints(cfg, parts, plan, progress, runlog)
            say(f"stopped by signal at iteration {progress.iteration}; saved {runlog.out / 'last.pt'} "
                f"(continue with --resume {runlog.out / 'last.pt'})")
            draw_curves(runlog)
            return True
    return False


def epoch_loader(cfg: Config, plan: Plan, progress: Progress, device: torch.device) -> DataLoader:
    """This rank's batches of the epoch from progress.batch_in_epoch on. Its own generator:
    making a loader iterator draws a seed, which must not move the global RNG (DropBlock's)
    differently in a resumed run; the workers ignore SIGTERM and SIGINT, so a signal to the
    whole process group stops the run as one to this process does."""
    order = list(plan.sampler)[progress.batch_in_epoch * plan.per_step:
                               plan.steps_per_epoch * plan.per_step]
    return DataLoader(plan.train_set, cfg.batch_size, sampler=order, collate_fn=data.collate,
                      num_workers=cfg.workers, pin_memory=device.type == "cuda",
                      worker_init_fn=data.ignore_stop_signals,
                      generator=torch.Generator().manual_seed(cfg.seed + progress.epoch))


def guarded_step(cfg: Config, parts: Parts, batches, size: int, progress: Progress,
                 runlog: "RunLog") -> dict[str, float]:
    """train_step; a non-finite step stops the run (exit status 1) before anything is saved,
    naming the newest checkpoint; running out of memory names the size and batch."""
    try:
        return train_step(parts, batches, size, cfg)
    except NonFiniteLoss as e:
        say(f"non-finite {e.what} at iteration {progress.iteration} (epoch {progress.epoch}, size "
            f"{size}): {e.detail}; stopped without saving; {kept_note(runlog)}")
        write_log(runlog, {"iteration": progress.iteration, "non_finite": str(e)})
        draw_curves(runlog)
        raise SystemExit(1) from e
    except torch.OutOfMemoryError as e:
        raise data.UserError(f"out of memory at iteration {progress.iteration}: input size {size} "
                             f"x {size}, batch {cfg.batch_size} per process; lower --batch-size "
                             "(and raise --accumulate) or --size-max") from e


def run_evaluation(cfg: Config, parts: Parts, plan: Plan, progress: Progress,
                   runlog: "RunLog") -> None:
    """COCO AP of the EMA weights (else the model) at --eval-size, sharded over the ranks."""
    say(f"evaluating at iteration {progress.iteration} ({progress.epoch} epochs done): "
        f"{len(plan.val_data)} validation images at {cfg.eval_size} px", flush=True)
    model = parts.ema if parts.ema is not None else parts.model
    progress.metrics = evaluate.evaluate(model, plan.val_data, size=cfg.eval_size,
                                         nms_thre=cfg.nms, verbose=is_master())
    progress.evaluated_at = progress.iteration
    set_train_mode(parts.model, cfg.freeze_bn)    # evaluate() restores plain train mode
    write_log(runlog, {"epoch": progress.epoch, "iteration": progress.iteration,
                       "eval": progress.metrics})


# ---------------------------------------------------------------------------------------------
# Plumbing: the command line - flags from Config (evaluate.dataclass_parser), their checks
# ---------------------------------------------------------------------------------------------
DESCRIPTION = """Train ASFF as in paper Sec. 3.4 (SGD, cosine learning rate, random input sizes,
mixup) on COCO, on a COCO-format set of your own, or on the built-in synthetic shapes."""
EXAMPLES = """examples:
  python train.py                                   the CPU demo (synthetic shapes): runs/demo/
  python train.py --resume runs/demo/last.pt        continue a stopped run exactly, in its folder
  torchrun --nproc_per_node=4 train.py --data /coco --backbone darknet53_feature_mx.pth
                                                    the paper: 4 GPUs x 16 images, 300 epochs
  python train.py --train-images my/train --train-ann my/train.json --val-images my/val \\
      --val-ann my/val.json --weights runs/demo/last.pt --out runs/mine   fine-tune on your set
The README lists the paper's rows (Tables 1-4) as flags.
"""
RESUME_MAY_DIFFER = ("out", "resume", "max_iters", "log_every", "eval_every", "workers", "threads",
                     "exist_ok", "debug", "plot", "channels_last", "compile",  # how, not what
                     "benchmark")    # benchmark: a field of checkpoints older than tests/bench.py
AT_LEAST = {"epochs": 1, "batch_size": 1, "accumulate": 1, "size_every": 1, "log_every": 1,
            "eval_every": 1, "synthetic_train": 1, "synthetic_val": 1, "workers": 0, "threads": 0,
            "max_iters": 0, "lr": 0, "min_lr": 0, "clip_grad": 0, "weight_decay": 0, "momentum": 0}
FRACTIONS = ("mixup_off", "fixed_size_last", "warmup", "nms", "ignore_thre", "ignore_ratio", "ema")


def command_line():
    """The parser: a flag per Config field with its help and default, and the demo's value where
    a plain `python train.py` uses another; usage examples."""
    demo = " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                    f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in DEMO.items())
    epilog = EXAMPLES + textwrap.fill(f"Without --data or a custom set the CPU demo runs: {demo}", 95)
    parser = evaluate.dataclass_parser(Config, DESCRIPTION, epilog)
    for action in parser._actions:
        action.help = action.help and action.help.replace("[default: ]", "[default: none]")
        if action.dest in DEMO and action.help.endswith("]"):
            action.help = action.help[:-1] + f"; the demo: {DEMO[action.dest]}]"
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """The command line as a Config (read_command_line without the checkpoint)."""
    return read_command_line(argv)[0]


def read_command_line(argv: list[str] | None = None) -> tuple[Config, dict | None]:
    """(Config, the --resume checkpoint or None). The Config: Config's defaults, DEMO's without a
    data set; with --resume the checkpoint's own config, in its folder; the flags given win.
    Bad values end in one line (UserError)."""
    parser = command_line()
    given = vars(parser.parse_args(argv))
    ckpt = read_resume(given["resume"]) if given.get("resume") else None
    if ckpt is not None:
        base = {f.name: ckpt["config"][f.name] for f in dataclasses.fields(Config)
                if f.name in ckpt["config"] and f.name != "exist_ok"}
        base["out"] = str(Path(given["resume"]).parent)
    else:
        base = {} if given.get("data") or given.get("train_ann") else DEMO
    cfg = Config(**base | given)
    if cfg.weights and ("weights" in given and cfg.resume or cfg.backbone):
        parser.error("--weights starts a new run from a whole detector: it goes with neither "
                     "--resume (which continues a run) nor --backbone (which it includes)")
    check_config(cfg)
    return cfg, ckpt


def check_config(cfg: Config) -> None:
    """Values that would fail later, deep inside, refused at once in one line."""
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("size_min", "size_max", "eval_size"):
        if (size := getattr(cfg, name)) < 32 or size % 32:
            low = max(32, size // 32 * 32)
            raise data.UserError(f"{flag(name)} {size}: input sizes are multiples of 32 (the "
                                 f"coarsest stride), e.g. {low} or {low + 32}")
    bad = [f"{flag(n)} {getattr(cfg, n)}: {low} or more" for n, low in AT_LEAST.items()
           if getattr(cfg, n) < low]
    bad += [f"{flag(n)} {v}: in [0, 1]" for n in FRACTIONS
            if (v := getattr(cfg, n)) is not None and not 0 <= v <= 1]
    bad += ["--size-min over --size-max"] if cfg.size_min > cfg.size_max else []
    if bad:
        raise data.UserError("out of range: " + "; ".join(bad))
    custom = (cfg.train_images, cfg.train_ann, cfg.val_images, cfg.val_ann)
    if any(custom) and not all(custom):
        raise data.UserError("a custom set needs all of --train-images, --train-ann, "
                             "--val-images and --val-ann")
    if cfg.data and not any(custom) and not Path(cfg.data).is_dir():
        raise data.UserError(f"--data {cfg.data}: no such folder (a COCO root holds train2017/, "
                             "val2017/ and annotations/); a COCO-format set of your own is "
                             "--train-images, --train-ann, --val-images, --val-ann")


# ---------------------------------------------------------------------------------------------
# Plumbing: checkpoints - what they hold, resume, the RNG states
# ---------------------------------------------------------------------------------------------
def checkpoint_state(cfg: Config, parts: Parts, progress: Progress, train_data) -> dict:
    """Everything an exact resume needs, and the settings evaluate.py reads. All ranks call
    (the RNG states are gathered); rank 0 saves it."""
    return {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            **dataclasses.asdict(progress), "config": dataclasses.asdict(cfg),
            "world_size": parts.world, "rng": rng_states(parts.world),
            "model_args": model_args(cfg, parts.model.num_classes), "eval_size": cfg.eval_size,
            "class_names": list(train_data.class_names), "cat_ids": list(train_data.cat_ids)}


def save_checkpoints(cfg: Config, parts: Parts, plan: Plan, progress: Progress,
                     runlog: "RunLog") -> None:
    """last.pt, and best.pt when this state's fresh evaluation is the best so far."""
    is_best = progress.evaluated_at == progress.iteration and progress.metrics["AP"] > progress.best_ap
    progress.best_ap = progress.metrics["AP"] if is_best else progress.best_ap
    state = checkpoint_state(cfg, parts, progress, plan.train_data)
    if is_master():
        save(state, runlog.out / "last.pt")
        if is_best:
            save(state, runlog.out / "best.pt")
    runlog.kept, runlog.kept_iteration = runlog.out / "last.pt", progress.iteration


def restore(ckpt: dict, parts: Parts, path: str, rank: int) -> Progress:
    """A checkpoint's model, optimizer, scaler, EMA and this rank's RNG states; its Progress."""
    evaluate.load_foreign(evaluate.load_checked, path, parts.model, ckpt["model"], path)
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(ckpt["ema"])
    set_rng_states(ckpt["rng"][rank])
    progress = Progress(**{f.name: ckpt[f.name] for f in dataclasses.fields(Progress)})
    say(f"resumed {path}: iteration {progress.iteration}, epoch {progress.epoch}, batch "
        f"{progress.batch_in_epoch}")
    return progress


def save(state: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_resume(path: str) -> dict:
    """The --resume file, refused with a UserError naming it unless it is a train.py checkpoint
    (read before the data is opened: a bad file fails at once)."""
    ckpt = evaluate.read_checkpoint(path)
    if not evaluate.is_training_checkpoint(ckpt):
        raise data.UserError(f"{path}: a state dict without a training state (no "
                             "optimizer, config): --resume continues a train.py run only")
    return ckpt


def check_resumable(ckpt: dict, cfg: Config, world: int, path: str) -> None:
    """Refuse a checkpoint of another configuration, naming each field that differs."""
    saved = ckpt["config"] | {"world_size": ckpt.get("world_size", "absent")}
    now = dataclasses.asdict(cfg) | {"world_size": world}
    differ = [k for k in sorted(set(saved) | set(now))
              if k not in RESUME_MAY_DIFFER and saved.get(k, "absent") != now.get(k, "absent")]
    if differ:
        raise data.UserError(f"{path} was made with another configuration; differing fields: "
                         + ", ".join(f"{k} (checkpoint {saved.get(k, 'absent')!r}, now "
                                     f"{now.get(k, 'absent')!r})" for k in differ))


def finished(ckpt: dict, cfg: Config) -> bool:
    """A resumed run with nothing left to do (trained to its end, evaluated there) says so."""
    done = ckpt["epoch"] >= cfg.epochs or 0 < cfg.max_iters <= ckpt["iteration"]
    if not done or ckpt["evaluated_at"] != ckpt["iteration"]:
        return False
    more = ("a larger --max-iters continues it" if ckpt["epoch"] < cfg.epochs else
            f"a longer run is a new one, e.g. --weights {cfg.resume} --out NEW_FOLDER")
    say(f"{cfg.resume}: this run is finished (iteration {ckpt['iteration']}, {ckpt['epoch']} of "
        f"{cfg.epochs} epochs done, AP {ckpt['metrics']['AP']:.3f}); nothing was changed; {more}")
    return True


def rng_states(world: int) -> list[dict]:
    """Every rank's RNG states (torch, cuda, numpy, python), as tensors and plain Python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    mine = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------
# Plumbing: the run folder, progress lines, log.jsonl, metrics.json and the picture
# ---------------------------------------------------------------------------------------------
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json", "figure3_demo.png", "curves.png")


@dataclass
class RunLog:
    """The run folder, the clock of the progress lines, the newest checkpoint of this run."""
    out: Path
    first_iteration: int = 0                      # where this process started
    kept: Path | None = None                      # for the message of a non-finite stop
    kept_iteration: int = 0
    start: float = field(default_factory=time.time)
    train_seconds: float = 0.0                    # in train steps, since the start
    window_seconds: float = 0.0                   # ... and images, since the last line
    window_images: int = 0


def is_master() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def say(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_master():
        print(*args, **kwargs)


def prepare_folder(cfg: Config) -> None:
    """Rank 0, before the data is read: a new run refuses a folder that holds a run unless
    --exist-ok, which removes that run's files (so this run's log starts fresh); --resume goes
    on in its own folder."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise data.UserError(f"--out {out}: a file, not a folder")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (cfg.resume and Path(cfg.resume).resolve().parent == out.resolve()):
        if not cfg.exist_ok:
            hint = f"continue it with --resume {out / 'last.pt'}, " if "last.pt" in held else ""
            raise data.UserError(f"{out} already holds a run ({', '.join(held)}): {hint}give a "
                                 "new --out, or --exist-ok to replace it")
        for name in held:
            (out / name).unlink()
        say(f"--exist-ok: removed the previous run's {', '.join(held)} from {out}")
    out.mkdir(parents=True, exist_ok=True)


def write_log(runlog: RunLog, record: dict) -> None:
    if is_master():
        with open(runlog.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def report_progress(cfg: Config, parts: Parts, plan: Plan, progress: Progress, runlog: RunLog,
                    values: dict, seconds: float) -> None:
    """The status line (and its log record) after the first step, every --log-every and the
    last: epoch and iteration, each loss term, lr, size, images/s, ETA, peak memory."""
    runlog.train_seconds += seconds
    runlog.window_seconds += seconds
    runlog.window_images += plan.per_step * parts.world
    it = progress.iteration
    if it != runlog.first_iteration + 1 and it % cfg.log_every and it != plan.planned:
        return
    speed = runlog.window_images / runlog.window_seconds
    eta = (plan.planned - it) * runlog.train_seconds / (it - runlog.first_iteration)
    terms = {k: v for k, v in values.items() if k not in ("lr", "size")}
    say(f"epoch {progress.epoch + 1}/{cfg.epochs} iter {it}/{plan.planned} | "
        + " ".join(f"{t} {v:.3f}" for t, v in terms.items())
        + f" | lr {values['lr']:.2e} | size {values['size']} | {speed:.1f} img/s | ETA "
        f"{eta / 60:.1f} min | peak mem {peak_memory_mb(parts.device):.0f} MB", flush=True)
    write_log(runlog, {"epoch": progress.epoch, "iteration": it, **values, "images_per_s": speed,
                       "time": time.time() - runlog.start})
    runlog.window_seconds, runlog.window_images = 0.0, 0


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def kept_note(runlog: RunLog) -> str:
    """What a stop leaves behind, naming a checkpoint file only if it exists."""
    if runlog.kept is not None and runlog.kept.is_file():
        return f"{runlog.kept} keeps the weights of iteration {runlog.kept_iteration}"
    return "no checkpoint of this run was written yet (last.pt comes at the end of each epoch)"


def write_summary(cfg: Config, parts: Parts, plan: Plan, progress: Progress, runlog: RunLog) -> None:
    """Rank 0: metrics.json, figure3_demo.png (the EMA weights if kept), curves.png and the
    closing line."""
    summary = {k: float(progress.metrics[k]) for k in evaluate.PAPER_COLUMNS} | {
        "wall_time_s": time.time() - runlog.start,
        "train_images_per_s": (progress.iteration - runlog.first_iteration) * plan.per_step
        * parts.world / max(runlog.train_seconds, 1e-9),
        "iterations": progress.iteration,
        "epochs": progress.epoch + progress.batch_in_epoch / plan.steps_per_epoch,
        "eval_size": cfg.eval_size, "world_size": parts.world}
    (runlog.out / "metrics.json").write_text(json.dumps(summary, indent=1))
    image = demo_image(plan.val_data, say)               # the first with a few objects
    if image is not None:
        evaluate.show(parts.ema if parts.ema is not None else parts.model, image, str(runlog.out),
                      cfg.eval_size, plan.val_data.class_names, conf_thre=0.2, name="demo")
    draw_curves(runlog)
    say(f"done in {summary['wall_time_s'] / 60:.1f} min: AP {summary['AP']:.3f}, AP50 "
        f"{summary['AP50']:.3f}; wrote {runlog.out}/metrics.json, last.pt, best.pt"
        + (", figure3_demo.png" if image is not None else " (no readable image to draw)"))


def demo_image(val_data, say, tries: int = 10):
    """The validation image of figure3_demo.png, uint8 (H, W, 3): the first with 3-5 objects
    (else the first); an unreadable one is skipped, saying so. None if `tries` all fail."""
    counts = [len(val_data.load_targets(i)) for i in range(len(val_data))]
    order = sorted(range(len(val_data)), key=lambda i: not 3 <= counts[i] <= 5)   # stable
    for index in order[:tries]:
        try:
            return val_data.load_image(index)[0]
        except data.DataError as e:
            say(f"figure3_demo.png: skipped an unreadable validation image: {e}")
    return None


# ---------------------------------------------------------------------------------------------
# Plumbing: curves.png - log.jsonl's loss terms and lr by iteration, AP and AP50 by epoch
# ---------------------------------------------------------------------------------------------
PANEL_W, PANEL_H = 400, 266                     # 3 x 3 panels: 1200 x 798, readable at 900 px
CURVE, RAW, GRID = (31, 119, 180), (174, 199, 232), (225, 225, 225)   # mean, raw values, grid


def read_log(path: Path) -> tuple[list[dict], list[dict], int]:
    """(progress rows, evaluation rows, malformed lines skipped), each in iteration order. A
    "started" or "resumed" row at iteration N drops the earlier rows after N (a resumed run does
    them again), and a later row of an iteration replaces an earlier one: no zig-zag."""
    if not path.is_file() or not path.stat().st_size:
        raise data.UserError(f"{path}: {'empty' if path.is_file() else 'no such file'} (train.py "
                             "writes log.jsonl into its run folder, a row per progress line)")
    steps, evals, bad = {}, {}, 0
    for line in filter(str.strip, path.read_text(errors="replace").splitlines()):
        try:                                      # a crash can cut the last line short
            row = json.loads(line)
            if (start := row.get("started", row.get("resumed"))) is not None:
                steps, evals = ({i: r for i, r in rows.items() if i <= start} for rows in (steps, evals))
            elif "eval" in row:
                evals[int(row["iteration"])] = {"epoch": float(row["epoch"])} | {
                    k: float(row["eval"][k]) for k in ("AP", "AP50")}
            elif "total" in row:
                steps[int(row["iteration"])] = {k: float(row[k]) for k in (*TERMS, "lr")}
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
    if not steps:
        raise data.UserError(f"{path}: no progress row" + f" ({bad} malformed line(s) skipped)" * (
            bad > 0) + "; train.py logs one after the first step")
    steps, evals = ([{"iteration": i, **r} for i, r in sorted(rows.items())] for rows in (steps, evals))
    return steps, evals, bad


def write_curves(run_dir: Path) -> str:
    """RUN_DIR/curves.png from RUN_DIR/log.jsonl: each loss term (log scale, the raw values
    under a running mean) and the learning rate against iterations, AP and AP50 against epochs;
    returns the line to print."""
    if not run_dir.is_dir():
        raise data.UserError(f"{run_dir}: no such folder (a train.py run folder holds log.jsonl)")
    steps, evals, bad = read_log(run_dir / "log.jsonl")
    canvas = Image.new("RGB", (3 * PANEL_W, 3 * PANEL_H), (255, 255, 255))
    font, its = evaluate.label_font(16), [r["iteration"] for r in steps]
    panels = [(f"loss {t} (log scale)", "iteration", its, [r[t] for r in steps], "log") for t in TERMS]
    panels += [("learning rate", "iteration", its, [r["lr"] for r in steps], "linear")]
    panels += [(f"{k} (validation)", "epoch", [r["epoch"] for r in evals], [r[k] for r in evals],
                "from 0") for k in ("AP", "AP50")]
    for k, panel in enumerate(panels):
        draw_panel(ImageDraw.Draw(canvas), font, k % 3 * PANEL_W, k // 3 * PANEL_H, *panel)
    canvas.save(run_dir / "curves.png")
    return (f"wrote {run_dir / 'curves.png'}: {len(steps)} progress rows, {len(evals)} evaluations"
            + (f"; skipped {bad} malformed line(s) of log.jsonl" if bad else ""))


def draw_panel(draw, font, x0: int, y0: int, title: str, xlabel: str, xs, ys, y_axis: str) -> None:
    """One panel at (x0, y0): title, x label, round ticks with grid lines, ys against xs as a
    line (x from 0), dots where there are few. y_axis "log" (a loss): log10 y, the raw values in
    a light colour under their running mean; "from 0" (AP): y from 0; "linear". No values: "no
    evaluation yet"."""
    left, top, right, bottom = x0 + 70, y0 + 30, x0 + PANEL_W - 20, y0 + PANEL_H - 54
    black, loss = (0, 0, 0), y_axis == "log"
    draw.text((x0 + PANEL_W / 2, y0 + 6), title, fill=black, font=font, anchor="ma")
    draw.text(((left + right) / 2, y0 + PANEL_H - 6), xlabel, fill=black, font=font, anchor="md")
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    if not ys:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no evaluation yet", fill=black,
                  font=font, anchor="mm")
        return
    ys = np.log10(np.maximum(ys, 1e-12)) if loss else np.array(ys)
    (xlo, xhi), (ylo, yhi) = span([0, *xs], 0.02), span([*ys, 0] if y_axis == "from 0" else ys)
    px = lambda x: left + (x - xlo) / (xhi - xlo) * (right - left)
    py = lambda y: bottom - (y - ylo) / (yhi - ylo) * (bottom - top)
    for t in ticks(xlo, xhi):
        draw.line((px(t), top + 1, px(t), bottom + 4), fill=GRID)
        draw.text((px(t), bottom + 6), f"{t:g}", fill=black, font=font, anchor="ma")
    for t in log_ticks(ylo, yhi) if loss else ticks(ylo, yhi):
        draw.line((left - 4, py(t), right - 1, py(t)), fill=GRID)
        draw.text((left - 6, py(t)), f"{10 ** t if loss else t:.4g}", fill=black, font=font, anchor="rm")
    w = 2 * (len(ys) // 25) + 1                   # a centred running mean of w rows (fewer at the ends)
    mean = np.convolve(ys, np.ones(w), "same") / np.convolve(np.ones(len(ys)), np.ones(w), "same")
    for values, colour in [(ys, RAW), (mean, CURVE)] if loss else [(ys, CURVE)]:
        points = [(px(x), py(y)) for x, y in zip(xs, values)]
        draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) < 20 else []:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def span(values, margin: float = 0.05) -> tuple[float, float]:
    """An axis range over values, a margin each side (around a single value: +-10%, or +-1)."""
    lo, hi = float(min(values)), float(max(values))
    lo, hi = (lo, hi) if hi > lo else (lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0))
    return lo - margin * (hi - lo), hi + margin * (hi - lo)


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values in [lo, hi], 1, 2 or 5 x 10^k apart: the closest that make n steps or fewer."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """log10 of round values in [10^lo, 10^hi]: the powers of ten if 3 or more, else 1, 2 and
    5 x 10^k if 2 or more, else ticks(10^lo, 10^hi)."""
    for ms, enough in (((1,), 3), ((1, 2, 5), 2)):
        found = [k + math.log10(m) for k in range(math.floor(lo), math.ceil(hi) + 1) for m in ms
                 if lo <= k + math.log10(m) <= hi]
        if len(found) >= enough:
            return found
    return [math.log10(v) for v in ticks(10 ** lo, 10 ** hi)]


def draw_curves(runlog: RunLog) -> None:
    """Rank 0, at the end of a run or a stop: curves.png, or why not (never fails the run)."""
    if is_master():
        try:
            say(write_curves(runlog.out))
        except data.UserError as e:               # e.g. log.jsonl removed during the run
            say(f"curves.png not drawn: {e}")


# ---------------------------------------------------------------------------------------------
# Plumbing: signals - SIGTERM / SIGINT save last.pt after the step under way
# ---------------------------------------------------------------------------------------------
def on_signal(stop: dict, signum: int, frame) -> None:
    """The handler: runs in the main thread between two bytecodes; acknowledges at once."""
    if stop["signal"] is None:
        text = (f"{signal.Signals(signum).name}: stopping after this step, then saving last.pt "
                "(the loader workers ignore it) ...")
        try:
            say(text, flush=True)
        except RuntimeError:                      # it came inside another print to stdout
            os.write(1, (text + "\n").encode())
    stop["signal"] = signum


def stop_requested(stop: dict, device: torch.device) -> bool:
    """Whether any rank got a signal: all stop together, at the same iteration."""
    flag = torch.tensor([stop["signal"] is not None], dtype=torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    return bool(flag.item())


if __name__ == "__main__":
    if "--debug" in sys.argv[1:]:
        os.environ["ASFF_DEBUG"] = "1"    # data.exit_on_user_error then shows the traceback
    data.exit_on_user_error(main)
