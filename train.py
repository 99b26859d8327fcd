"""Training - paper Sec. 3.4, top to bottom like a lab notebook.

Sec. 3.4: SGD (momentum 0.9, weight decay 5e-4: param_groups), 300 epochs, a linear warm-up and
a cosine from lr 0.001 to 0.00001 at 4 GPUs x 16 images (lr_at), random input sizes 320..608 by 32
(size_at), mixup but for the last 30 epochs (mixup_on); Sec. 3.1's freebies: mixup, synchronized
BatchNorm, ASFF*'s DropBlock (dropblock_at). Defaults: the paper where it is explicit, the release
(docs/released-code.md) where it is silent. Then train_step (lr, step and EMA in one place) and
main's sections 1-6. Checkpoints hold no RNG state: every draw is a function of seed, rank, epoch,
index or iteration, so a resume is exact.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from collections import namedtuple
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
import evaluate
from darknet import read_darknet_weights
from data import COUNT, FRACTION, NATURAL, POSITIVE, SIZE
from head import Detector, load_released
from loss import IOU_FORMS, TERMS, compute_loss


def flag(default, help: str, **keywords):
    """A Config field: its default, its one-line --help and other add_argument keywords."""
    return dataclasses.field(default=default, metadata=dict(help=help, **keywords))

@dataclasses.dataclass
class Config:
    # where things are
    data: str = flag("", "COCO root with train2017/, val2017/, annotations/; empty: the synthetic set")
    out: str = flag("runs/asff", "run folder (with --resume: the checkpoint's folder unless given)")
    resume: str = flag("", "a run's last.pt (or folder) to continue exactly; other flags must agree")
    backbone: str = flag("", "pretrained DarkNet-53 (Sec. 3.4): darknet53.conv.74 / darknet53_feature_mx.pth")
    weights: str = flag("", "start from a whole detector (ours, a released .pth, yolov3.weights)")
    train_images: str = flag("", "a COCO-format set of your own instead of --data: training images")
    train_ann: str = flag("", "... its training annotation JSON (any categories)")
    val_images: str = flag("", "... validation images")
    val_ann: str = flag("", "... validation annotation JSON (the same categories)")
    synthetic_train: int = flag(1024, "images in the synthetic training set", type=COUNT)
    synthetic_val: int = flag(64, "images in the synthetic validation set", type=COUNT)
    # the model (Sec. 3.1-3.3, Tables 1-4)
    fusion: str | None = flag("asff", "Table 3", type=lambda t: None if t == "none" else t,
                              choices=(None, "sum", "concat", "asff"), metavar="{none,sum,concat,asff}")
    guided: bool = flag(True, "guided anchoring + anchor-free slot (Sec. 3.1, Table 1 'GA')")
    spp: bool = flag(True, "SPP at stride 32 (the release's strong baseline)")
    rfb: bool = flag(False, "RFB in the heads (ASFF*, Table 4)")
    dropblock: bool = flag(False, "DropBlock in the pyramid (ASFF*, Table 4; schedule: DROPBLOCK)")
    width: float = flag(1.0, "channel multiplier (1: the paper's DarkNet-53)", type=POSITIVE)
    depth: float = flag(1.0, "residual-unit multiplier (1: the paper's DarkNet-53)", type=POSITIVE)
    anchors: str = flag("auto", "ninth anchor: released if guided", choices=("auto", "released", "yolov3"))
    # the loss (Sec. 3.1, Tables 1-2)
    iou_loss: bool | None = flag(None, "IoU losses (Table 1); none: on with guided anchoring", type=bool)
    iou_form: str = flag("1-iou^2", "1-iou^2 (released), -ln(iou) (UnitBox) or 1-iou", choices=IOU_FORMS)
    ignore_thre: float = flag(0.7, "YOLOv3's ignore threshold (release cfg IGNORETHRE)", type=FRACTION)
    ignore_ratio: float | None = flag(None, "ignore area, Table 2 (0.2); none: off",
                                      type=lambda t: None if t == "none" else FRACTION(t))
    label_smooth: bool = flag(True, "the release's label smoothing (not in the paper)")
    # data (Sec. 3.1 bag of freebies, Sec. 3.4 random shapes)
    mixup: bool = flag(True, "mixup (Sec. 3.1)")
    augment: bool = flag(True, "the release's colour, zoom-out, crop, flip and affine steps")
    include_crowd: bool = flag(False, "train on COCO's crowd boxes too (the release does)")
    mixup_off: float = flag(30 / 300, "last part of the epochs without mixup (Sec. 3.4: 0.1)", type=FRACTION)
    size_min: int = flag(320, "smallest random input size (Sec. 3.4: 320)", type=SIZE)
    size_max: int = flag(608, "largest random input size (Sec. 3.4: 608)", type=SIZE)
    size_every: int = flag(10, "iterations per random size (release; the paper: every batch)", type=COUNT)
    fixed_size_last: float = flag(0.0, "last part of the epochs at --size-max (release: 1/30)", type=FRACTION)
    eval_size: int = flag(608, "test size (Table 3: 608)", type=SIZE)
    nms: float = flag(0.6, "NMS IoU of the evaluations (Sec. 3.4: 0.6; release: 0.65)", type=FRACTION)
    # optimisation (Sec. 3.4)
    epochs: int = flag(300, "Sec. 3.4: 300 epochs", type=COUNT)
    batch_size: int = flag(16, "images per process and micro-batch (Sec. 3.4: 4 GPUs x 16)", type=COUNT)
    accumulate: int = flag(1, "micro-batches per optimizer step", type=COUNT)
    lr: float = flag(1e-3, "lr per 64 images, scaled by total batch / 64 (Sec. 3.4: 0.001)", type=POSITIVE)
    min_lr: float = flag(1e-5, "end of the cosine per 64 images (Sec. 3.4: 0.00001)", type=POSITIVE)
    scale_lr: bool = flag(True, "scale lr and min_lr by total batch / 64 (off: the release's flat 1e-3)")
    schedule: str = flag("paper", "paper; released: released_lr", choices=("paper", "released"))
    warmup: float = flag(4 / 300, "part of the iterations in warm-up (Sec. 3.4: 4/300)", type=FRACTION)
    momentum: float = flag(0.9, "SGD momentum (Sec. 3.4)", type=FRACTION)
    weight_decay: float = flag(5e-4, "on conv weights only (Sec. 3.4: 0.0005)", type=POSITIVE)
    decay_all: bool = flag(False, "weight decay on BatchNorm and biases too (as released)")
    clip_grad: float = flag(0.0, "clip the gradient norm (not in the paper); 0: off", type=POSITIVE)
    ema: float = flag(0.0, "EMA decay, e.g. 0.9998 (YOLOX, not in the paper); 0: off", type=FRACTION)
    amp: str = flag("auto", "GPU mixed precision: amp_dtype_for", choices=("auto", "none", "bf16", "fp16"))
    freeze_bn: bool = flag(False, "BatchNorm in eval mode: fixed statistics (tiny batches)")
    channels_last: bool = flag(True, "NHWC tensors: faster on CPUs (oneDNN) and tensor cores")
    compile: bool = flag(False, "torch.compile the model (slow first steps)")
    # the run
    workers: int = flag(4, "DataLoader worker processes per rank", type=NATURAL)
    threads: int = flag(0, "torch CPU threads per process (0: torch's choice)", type=NATURAL)
    seed: int = flag(0, "seeds the init, the data order and draws, the sizes", type=NATURAL)
    log_every: int = flag(10, "iterations between progress lines (release: 10)", type=COUNT)
    eval_every: int = flag(10, "epochs between evaluations (release: 10)", type=COUNT)
    max_iters: int = flag(0, "stop after this many iterations, schedule unchanged; 0: no limit", type=NATURAL)
    debug: bool = flag(False, "a user error shows its traceback too (as ASFF_DEBUG=1)")

# The CPU demo (no data set given): a small ASFF from scratch on data.make_synthetic's shapes, 18
# epochs of 1,024 images at 128-192 px; docs/measurements.md says why each value departs.
DEMO = dict(out="runs/demo", width=0.25, depth=0.33, epochs=18, batch_size=16,
            lr=8e-2, min_lr=4e-4, warmup=0.05, clip_grad=10.0, mixup=False, augment=False,
            label_smooth=False, size_min=128, size_max=192, eval_size=192, workers=0, eval_every=5)
# ASFF*'s DropBlock as released (docs/released-code.md): from these parts of the epochs on, block sizes
DROPBLOCK = ((5 / 300, {32: 1, 16: 3, 8: 5}), (80 / 300, {32: 3, 16: 5, 8: 7}),   # per stride, keep
             (150 / 300, {32: 7, 16: 7, 8: 7}))                                  # probability 0.9
ARCHITECTURE = ("fusion", "guided", "spp", "rfb", "dropblock", "width", "depth", "anchors")
LOSS_SWITCHES = ("iou_loss", "iou_form", "ignore_thre", "ignore_ratio", "label_smooth")

# --- The schedule (Sec. 3.4), functions of the iteration or epoch -------------------------------
def lr_at(cfg: Config, iteration: int, total_iters: int, world: int) -> float:
    """Sec. 3.4: a linear warm-up to lr * batch / 64, then a cosine to min_lr * batch / 64; released:
    (it / W)^4 for 5/300 of the epochs, flat to 20/300, a cosine per epoch to 270/300 (released-code.md)."""
    scale = cfg.batch_size * cfg.accumulate * world / 64 if cfg.scale_lr else 1.0
    base, final, per_epoch = cfg.lr * scale, cfg.min_lr * scale, total_iters / cfg.epochs  # 1e-3 at 4 x 16
    if released := cfg.schedule == "released":       # in iterations, at epoch starts
        warm, flat, end = (round(f / 300 * cfg.epochs) * per_epoch for f in (5, 20, 270))
    else:
        warm = flat = round(cfg.warmup * total_iters)
        end = total_iters - 1
    if iteration < warm:
        return base * ((iteration / warm) ** 4 if released else (iteration + 1) / warm)
    now = iteration // per_epoch * per_epoch if released else iteration      # released: per epoch
    t = min(max(now - flat, 0) / max(end - flat, 1), 1.0)                      # 0 -> 1 over the cosine
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))

def size_at(cfg: Config, iteration: int, epoch: int) -> int:
    """Sec. 3.4's random shapes (the same on every rank); at the end fixed_size_last at size_max."""
    if epoch >= cfg.epochs - round(cfg.fixed_size_last * cfg.epochs):
        return cfg.size_max
    return data.random_size(cfg.seed, iteration, cfg.size_every, range(cfg.size_min, cfg.size_max + 1, 32))

def mixup_on(cfg: Config, epoch: int) -> bool:
    return cfg.mixup and epoch < cfg.epochs - round(cfg.mixup_off * cfg.epochs)   # Sec. 3.4: not at the end

def dropblock_at(cfg: Config, epoch: int) -> tuple[dict[int, int], float]:
    """ASFF*'s DropBlock in this epoch: (block size per stride, keep probability)."""
    started = [sizes for start, sizes in DROPBLOCK if epoch >= round(start * cfg.epochs)]
    return (started[-1], 0.9) if started else ({32: 1, 16: 1, 8: 1}, 1.0)

def evaluation_due(cfg: Config, epoch: int) -> bool:   # after `epoch` whole epochs
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs

def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weight decay on conv weights (4-D) only (decay_all: on everything, as released)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": weight_decay}] if decay_all else [
        {"params": [p for p in params if p.ndim == 4], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim != 4], "weight_decay": 0.0}]

# --- The model and one optimizer step -----------------------------------------------------------
def model_args(cfg: Config, num_classes: int) -> dict:   # the Detector's (every checkpoint saves them)
    return dict(num_classes=num_classes, **{k: getattr(cfg, k) for k in ARCHITECTURE[:-1]},
                anchors=None if cfg.anchors == "auto" else cfg.anchors)

def build_model(cfg: Config, num_classes: int) -> Detector:
    """The config's Detector (MSRA init), its backbone pretrained (Sec. 3.4) if --backbone."""
    model = Detector(**model_args(cfg, num_classes))
    if cfg.backbone.endswith((".pth", ".pt")):        # the release's DarkNet-53, one key map
        state = evaluate.read_checkpoint(cfg.backbone)
        evaluate.naming(cfg.backbone, load_released, model, state, cfg.backbone)
    elif cfg.backbone:                                # darknet's binary darknet53.conv.74
        evaluate.naming(cfg.backbone, read_darknet_weights, cfg.backbone, model.backbone.darknet_layers())
    return model

def amp_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 from compute capability 8.0 (is_bf16_supported() counts emulation), else fp16 + scaler."""
    if device.type != "cuda" or cfg.amp == "none":
        return None
    auto = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": auto}[cfg.amp]

# What a step works on: the model, what is called (it or its DDP wrapper), SGD, AMP, the EMA copy.
Parts = namedtuple("Parts", "model ddp optimizer scaler amp_dtype device world ema rank",
                   defaults=(1, None, 0))

class NonFinite(RuntimeError):
    """A step gave a non-finite loss, gradient or weight (nothing of it is saved)."""

def train_step(parts: Parts, batches, cfg: Config, iteration: int, size: int, lr: float) -> dict:
    """lr, cfg.accumulate micro-batches at size x size (uint8 to the device, normalised and resized
    there), one SGD step, EMA -> loss terms, grad norm: read in one host synchronisation, at the end."""
    model, scaler, world = parts.model, parts.scaler, parts.world
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, parts.rank, iteration]).generate_state(1)[0]))
    terms = torch.zeros(len(TERMS), device=parts.device)          # DropBlock draws: from that seed
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for k in range(cfg.accumulate):
        images, targets = next(batches)                                    # uint8 (B, 3, S0, S0)
        images, targets = data.to_input(images.to(parts.device, non_blocking=True),
                                        [t.to(parts.device, non_blocking=True) for t in targets], size)
        images = images.contiguous(memory_format=layout)                   # (B, 3, size, size)
        with nullcontext() if world == 1 or k == cfg.accumulate - 1 else parts.ddp.no_sync():
            with torch.autocast(parts.device.type, parts.amp_dtype, enabled=parts.amp_dtype is not None):
                outputs = parts.ddp(images)                 # {stride: {"pred": (B, S, 5+C, h, w)}}
            outputs = {s: {n: v if v is None else v.float() for n, v in o.items()}  # the loss in fp32
                       for s, o in outputs.items()}
            losses = compute_loss(outputs, targets, model, **{k: getattr(cfg, k) for k in LOSS_SWITCHES})
            scaler.scale(losses["total"] / cfg.accumulate).backward()
        terms += torch.stack([losses[t].detach() for t in TERMS]) / cfg.accumulate   # (6,)
    scaler.unscale_(parts.optimizer)                  # a no-op without fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
    scaler.step(parts.optimizer)                      # fp16: skipped if a gradient is not finite
    scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    finite = [t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]
    bad = torch.stack([~terms.isfinite().all(), ~(grad_norm.isfinite() | scaler.is_enabled()),
                       ~torch.stack(finite).all()]).float()        # loss, gradient, weights (3,)
    report = torch.cat([terms / world, grad_norm.detach().float()[None] / world, bad])   # (10,)
    if world > 1:                                     # every rank sees a NaN of any rank (and the
        dist.all_reduce(report)                       # BatchNorm statistics are per rank on CPU)
    *values, norm, bad_loss, bad_gradient, bad_weights = report.tolist()   # the one host sync
    if bad_loss or bad_gradient or bad_weights:       # a finite step can still overflow a weight
        what = "loss" if bad_loss else "gradient norm" if bad_gradient else "weights after the step"
        terms_text = ", ".join(f"{t}={v:.4g}" for t, v in zip(TERMS, values, strict=True))
        raise NonFinite(f"non-finite {what} ({terms_text}, gradient norm {norm:.4g})")
    if parts.ema is not None:                         # e = d * e + (1 - d) * w, d ramped up (YOLOX)
        d = cfg.ema * (1 - math.exp(-(iteration + 1) / 2000))
        for e, w in zip(parts.ema.state_dict().values(), model.state_dict().values(), strict=True):
            e.mul_(d).add_(w, alpha=1 - d) if e.is_floating_point() else e.copy_(w)
    return dict(zip(TERMS, values, strict=True)) | {"grad_norm": norm}

# --- The run: main's numbered sections ----------------------------------------------------------
RANK = int(os.environ.get("RANK", 0))                 # torchrun's; rank 0 prints and writes
STOP = {"signal": 0, "evaluating": False}             # set by on_signal
POSITION = dict(iteration=0, epoch=0, batch_in_epoch=0, best_ap=-1.0, metrics={}, evaluated_at=-1)  # saved

class Stopped(Exception):
    """A signal came: last.pt is saved and the run ends with status 128 + the signal's number."""

def on_signal(signum: int, frame) -> None:
    """Stop after the step under way (one process: at once in an evaluation); a second SIGINT: at once."""
    if STOP["signal"] and signum == signal.SIGINT:
        raise SystemExit(128 + signum)
    STOP["signal"] = STOP["signal"] or signum
    if RANK == 0:                                     # os.write: a print may be under way
        os.write(1, f"{signal.Signals(signum).name}: stopping, then saving last.pt ...\n".encode())
    if STOP["evaluating"]:
        raise Stopped

def say(*args, **kwargs) -> None:
    if RANK == 0:
        print(*args, **kwargs, flush=True)

def log(run: dict, row: dict) -> None:
    if RANK == 0:                                     # log.jsonl: a JSON object per line
        with open(run["out"] / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

def main(argv: list[str] | None = None) -> Detector | None:
    """Train as the command line says; this rank's trained model (None: a finished run)."""
    cfg, ckpt, start = read_command_line(argv)        # flags, files and --out: checked first
    done = ckpt and (ckpt["epoch"] >= cfg.epochs or 0 < cfg.max_iters <= ckpt["iteration"])
    if done and ckpt["evaluated_at"] == ckpt["iteration"]:     # a finished run: nothing to do
        return say(f"{cfg.resume}: this run is finished (iteration {ckpt['iteration']}, {ckpt['epoch']} of "
                   f"{cfg.epochs} epochs, AP {ckpt['metrics']['AP']:.3f}); nothing was changed")
    # 1. distributed set-up (torchrun's RANK, LOCAL_RANK, WORLD_SIZE) and seeds
    world, device = int(os.environ.get("WORLD_SIZE", 1)), torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True         # the 10 input sizes repeat
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)                       # the init, the same on every rank (train_step
    STOP.update(signal=0, evaluating=False)           # reseeds from seed, rank and iteration)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(cfg, ckpt, start, world, device)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()

def train(cfg: Config, ckpt: dict | None, start: dict | None, world: int, device: torch.device) -> Detector:
    """Sections 2 to 6; `run` holds what the loop reads and writes, its POSITION saved in last.pt."""
    # 2. the data: COCO, a COCO-format set of your own, or the synthetic shapes
    train_data, val_data = open_data(cfg, world)
    train_set = data.TrainDataset(train_data, cfg.size_max, cfg.seed, cfg.mixup, cfg.augment)
    sampler = DistributedSampler(train_set, world, RANK, shuffle=True, seed=cfg.seed, drop_last=True)
    steps = len(sampler) // (cfg.batch_size * cfg.accumulate)                   # per epoch
    # 3. the model, EMA, SGD, AMP, SyncBN (Sec. 3.1) and DDP (a resumed run's backbone is in the checkpoint)
    parts = build_parts(dataclasses.replace(cfg, backbone="") if ckpt else cfg, len(train_data.cat_ids),
                        start, world, device)
    # 4. resume: weights, optimizer, scaler, EMA and the position (the config is the checkpoint's)
    for name in [n for n in ("model", "optimizer", "scaler", "ema") if ckpt and getattr(parts, n)]:
        getattr(parts, name).load_state_dict(ckpt[name])
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    run = {k: ckpt[k] for k in POSITION} if ckpt else dict(POSITION)
    run |= dict(train_data=train_data, val_data=val_data, train_set=train_set, sampler=sampler, steps=steps,
                total=cfg.epochs * steps, planned=min(cfg.epochs * steps, cfg.max_iters or math.inf),
                out=Path(cfg.out), start=time.time(), first=run["iteration"], seconds=0.0,
                kept=run["iteration"] if ckpt else None)
    log(run, {"resumed" if ckpt else "started": run["iteration"], "config": dataclasses.asdict(cfg)})
    say(f"{world} process(es) on {device}, amp {parts.amp_dtype}; {len(train_data)} training images, "
        f"{steps} steps/epoch x {cfg.epochs} epochs; iterations {run['iteration']} to {run['planned']}")
    # 5. the loop: epochs from the position on, an evaluation when due (it saves), else last.pt
    try:
        if run["batch_in_epoch"] == 0 < run["epoch"] and evaluation_due(cfg, run["epoch"]):
            evaluation(cfg, parts, run)               # one that a signal cut short (none if done)
        while run["epoch"] < cfg.epochs and run["iteration"] < run["planned"]:
            train_epoch(cfg, parts, run)
            if run["batch_in_epoch"] == 0 and evaluation_due(cfg, run["epoch"]):
                evaluation(cfg, parts, run)
            else:
                save_checkpoints(cfg, parts, run)
        evaluation(cfg, parts, run)                   # --max-iters ended between two
    except Stopped:                                   # a signal: last.pt, exit 128 + N
        save_checkpoints(cfg, parts, run)
        say(f"stopped by {signal.Signals(STOP['signal']).name} at iteration {run['iteration']}; saved "
            f"last.pt (continue with --resume {run['out'] / 'last.pt'})")
        raise SystemExit(128 + STOP["signal"]) from None
    except NonFinite as e:                            # nothing saved, exit 1
        say(f"iteration {run['iteration']} (epoch {run['epoch']}): {e}; stopped without saving; " + (
            f"{run['out'] / 'last.pt'} keeps iteration {run['kept']}" if run["kept"] is not None else
            "no checkpoint of this run yet"), file=sys.stderr)
        log(run, {"iteration": run["iteration"], "non_finite": str(e)})
        raise SystemExit(1) from None
    # 6. the end: metrics.json, Figure 3
    if RANK == 0:
        finish(cfg, parts, run)
    return parts.model

def open_data(cfg: Config, world: int) -> tuple[data.CocoDetection, data.CocoDetection]:
    """(training, validation) sets: a step of images at least, the same categories."""
    paths = dict(train_images=cfg.train_images, train_json=cfg.train_ann, val_images=cfg.val_images,
                 val_json=cfg.val_ann)
    for split in ("train", "val") if cfg.data and not cfg.train_ann else ():     # COCO 2017
        paths |= {f"{split}_images": f"{cfg.data}/{split}2017",
                  f"{split}_json": f"{cfg.data}/annotations/instances_{split}2017.json"}
    if not cfg.data and not cfg.train_ann:            # written once, by the first rank to get there
        paths = data.make_synthetic(n_train=cfg.synthetic_train, n_val=cfg.synthetic_val)
    train_data = data.CocoDetection(paths["train_images"], paths["train_json"], cfg.include_crowd)
    val_data = data.CocoDetection(paths["val_images"], paths["val_json"])
    if len(train_data) < (per_step := cfg.batch_size * cfg.accumulate * world):
        raise data.DataError(f"{train_data.ann_file}: {len(train_data)} training image(s), fewer than one "
                             f"step takes ({per_step} = batch size x accumulate x processes)")
    train, val = (dict(zip(d.cat_ids, d.class_names, strict=True)) for d in (train_data, val_data))
    if train != val:
        raise data.DataError(f"{val_data.ann_file}: the categories (id: name) are not those of "
                             f"{train_data.ann_file}: {val} against {train}")
    return train_data, val_data

def build_parts(cfg: Config, num_classes: int, start: dict | None, world: int, device: torch.device) -> Parts:
    """The Detector (--backbone, --weights), EMA, SGD on the decay groups, AMP, SyncBN, DDP."""
    model = build_model(cfg, num_classes)
    if start is not None:
        renewed = evaluate.transfer_weights(model, start, cfg.weights)
        say(f"--weights {cfg.weights}: {len(start)} tensors" + f"; {len(renewed)} prediction convs keep "
            f"their box and objectness rows, new class rows for {num_classes} classes" * bool(renewed))
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    if world > 1 and device.type == "cuda":           # Sec. 3.1's synchronized BN (gloo has none)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules() if cfg.freeze_bn else ():   # --freeze-bn: BatchNorm statistics fixed
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)):
            m.eval()
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.decay_all), 0.0, cfg.momentum)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ddp = model if world == 1 else DistributedDataParallel(model)   # on the device of its parameters
    return Parts(model, torch.compile(ddp) if cfg.compile else ddp, optimizer, scaler, amp_dtype, device,
                 world, ema, RANK)

def train_epoch(cfg: Config, parts: Parts, run: dict) -> None:
    """The rest of the epoch (its mixup, Sec. 3.4, and DropBlock, ASFF*), a status line every --log-every
    steps; all ranks stop after the step in which any got a signal."""
    epoch, per_step = run["epoch"], cfg.batch_size * cfg.accumulate
    run["train_set"].set_epoch(epoch)
    run["train_set"].mixup = mixup_on(cfg, epoch)
    run["sampler"].set_epoch(epoch)                   # its order: a function of seed and epoch
    parts.model.set_dropblock(*dropblock_at(cfg, epoch))
    order = list(run["sampler"])[run["batch_in_epoch"] * per_step: run["steps"] * per_step]
    batches = iter(DataLoader(run["train_set"], cfg.batch_size, sampler=order, collate_fn=data.stack_batch,
                              num_workers=cfg.workers, pin_memory=parts.device.type == "cuda",
                              worker_init_fn=data.ignore_stop_signals))  # a signal to the group: us only
    while run["epoch"] == epoch and run["iteration"] < run["planned"]:
        tic, it = time.time(), run["iteration"]
        size, lr = size_at(cfg, it, epoch), lr_at(cfg, it, run["total"], parts.world)
        try:
            values = train_step(parts, batches, cfg, it, size, lr)
        except torch.cuda.OutOfMemoryError as e:
            raise data.UserError(f"out of memory at iteration {it}: input size {size} x {size}, batch "
                                 f"{cfg.batch_size}; lower --batch-size or --size-max") from e
        batch = (run["batch_in_epoch"] + 1) % run["steps"]         # after the epoch's last step: 0
        run.update(iteration=it + 1, epoch=epoch + (batch == 0), batch_in_epoch=batch,
                   seconds=run["seconds"] + time.time() - tic)
        if it + 1 in (run["first"] + 1, run["planned"]) or (it + 1) % cfg.log_every == 0:
            status(cfg, parts, run, dict(epoch=epoch, iteration=it + 1, **values, lr=lr, size=size))
        stop_together(parts)

def stop_together(parts: Parts) -> None:
    """Stopped on every rank when any rank got a signal: all stop at the same point."""
    if parts.world > 1:                               # one all-reduce: the signal of any rank
        signum = torch.tensor([STOP["signal"]], device=parts.device)
        dist.all_reduce(signum, dist.ReduceOp.MAX)
        STOP["signal"] = int(signum.item())
    if STOP["signal"]:
        raise Stopped

def status(cfg: Config, parts: Parts, run: dict, row: dict) -> None:
    """The status line (rank 0) and its log.jsonl row; images/s and ETA over this process's steps."""
    it, done = row["iteration"], row["iteration"] - run["first"]
    memory = (torch.cuda.max_memory_allocated(parts.device) / 2**20 if parts.device.type == "cuda" else
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)          # Linux: KiB
    row["images_per_s"] = done * cfg.batch_size * cfg.accumulate * parts.world / run["seconds"]
    eta = (run["planned"] - it) * run["seconds"] / done / 60
    say(f"epoch {row['epoch'] + 1}/{cfg.epochs} iter {it}/{run['planned']} | " + " ".join(
        f"{t} {row[t]:.3f}" for t in TERMS) + f" | lr {row['lr']:.2e} | size {row['size']} | "
        f"{row['images_per_s']:.1f} img/s | ETA {eta:.1f} min | peak mem {memory:.0f} MB")
    log(run, row | {"time": time.time() - run["start"]})

def evaluation(cfg: Config, parts: Parts, run: dict) -> None:
    """COCO AP of the EMA (else the model), sharded over the ranks, then last.pt (and best.pt)."""
    if run["evaluated_at"] == run["iteration"]:      # already (a resumed run)
        return
    say(f"evaluating at iteration {run['iteration']} ({run['epoch']} epochs done)")
    stop_together(parts)                              # a signal came before it
    STOP["evaluating"] = parts.world == 1             # one process: a signal stops the evaluation;
    try:                                              # DDP ranks finish it, then stop together
        run["metrics"] = evaluate.evaluate(parts.ema or parts.model, run["val_data"], eval_size=cfg.eval_size,
                                           nms=cfg.nms, verbose=RANK == 0)
    finally:
        STOP["evaluating"] = False
    run["evaluated_at"] = run["iteration"]
    log(run, {"epoch": run["epoch"], "iteration": run["iteration"], "eval": run["metrics"]})
    save_checkpoints(cfg, parts, run, best=run["metrics"]["AP"] > run["best_ap"])
    stop_together(parts)

def save_checkpoints(cfg: Config, parts: Parts, run: dict, best: bool = False) -> None:
    """Rank 0: last.pt (and best.pt), written whole or not at all (a temporary file, fsync, rename)."""
    run["best_ap"] = run["metrics"]["AP"] if best else run["best_ap"]
    state = {"model": parts.model.state_dict(), "ema": parts.ema and parts.ema.state_dict(),
             "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
             "config": dataclasses.asdict(cfg), "model_args": model_args(cfg, parts.model.num_classes),
             "eval_size": cfg.eval_size, "class_names": list(run["train_data"].class_names),
             "cat_ids": list(run["train_data"].cat_ids), "world_size": parts.world,
             **{k: run[k] for k in POSITION}}
    for path in [run["out"] / name for name in ("last.pt", "best.pt")[:1 + best]] if RANK == 0 else []:
        with open(tmp := path.with_name(path.name + ".tmp"), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)                         # a crash leaves the old file or the new one
    run["kept"] = run["iteration"]

def finish(cfg: Config, parts: Parts, run: dict) -> None:
    """metrics.json, Figure 3 of a validation image with 3-5 objects (else the first)."""
    out, val, minutes = run["out"], run["val_data"], (time.time() - run["start"]) / 60
    images = (run["iteration"] - run["first"]) * cfg.batch_size * cfg.accumulate * parts.world
    summary = run["metrics"] | dict(iterations=run["iteration"], wall_time_s=60 * minutes,
                                    train_images_per_s=images / max(run["seconds"], 1e-9))
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    pick = min(range(len(val)), key=lambda i: (not 3 <= len(val.load_targets(i)) <= 5, i))
    try:
        evaluate.show(parts.ema or parts.model, val.load_image(pick)[0], out, cfg.eval_size, val.class_names,
                      name="demo", conf=0.2)
    except data.DataError as e:                       # an unreadable image: no picture, the run stands
        say(f"figure3_demo.png not drawn: {e}")
    say(f"done in {minutes:.1f} min: AP {summary['AP']:.3f}, AP50 {summary['AP50']:.3f}; wrote {out}")

# --- The command line: a flag per Config field; the files and the folder checked first ----------
RESUME_MAY_DIFFER = ("out", "resume", "max_iters", "log_every", "eval_every", "workers", "threads",
                     "debug", "channels_last", "compile")   # how, not what
WHERE = {"backbone": "darknet53.conv.74 (pjreddie.com/media/files) or the authors' darknet53_feature_mx.pth "
         "(github.com/GOATmessi8/ASFF)", "weights": evaluate.WEIGHT_FILES, "resume": "a run's last.pt"}
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json", "figure3_demo.png")

def read_command_line(argv: list[str] | None = None) -> tuple[Config, dict | None, dict | None]:
    """(Config, --resume's checkpoint, --weights' state dict): a flag per Config field over the
    defaults (DEMO's without data, the checkpoint's with --resume); refused here if anything can be."""
    parser = data.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                         argument_default=argparse.SUPPRESS, epilog="examples: README.md. Exit status: 0 "
                         "done, 1 a non-finite step, 2 a bad flag or file, 128 + N stopped by signal N.")
    shown = lambda v: "none" if v in ("", None) else v
    for f in dataclasses.fields(Config):
        demo = f"; the demo: {shown(DEMO[f.name])}" if f.name in DEMO else ""
        keywords = {"type": type(f.default), **f.metadata} | {"help": f"{f.metadata['help']} [default: "
                                                                      f"{shown(f.default)}{demo}]"}
        if keywords["type"] is bool:
            keywords.update(type=None, action=argparse.BooleanOptionalAction)
        parser.add_argument("--" + f.name.replace("_", "-"), **keywords)
    given = vars(parser.parse_args(argv))
    if given.get("resume") and Path(given["resume"]).is_dir():
        given["resume"] = str(Path(given["resume"]) / "last.pt")
    for name in [name for name in ("resume", "weights", "backbone") if given.get(name)]:
        if not Path(given[name]).is_file():
            raise data.UserError(f"--{name} {given[name]}: no such file; it takes {WHERE[name]}")
    if given.get("weights") and (given.get("resume") or given.get("backbone")):
        raise data.UserError("--weights starts a new run from a whole detector: it goes with neither "
                             "--resume (which continues a run) nor --backbone (which it includes)")
    ckpt = resume_checkpoint(given) if given.get("resume") else None
    base = {} if given.get("data") or given.get("train_ann") else DEMO
    if ckpt is not None:                              # the run's own folder unless --out is given
        base = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__} | {
            "out": str(Path(given["resume"]).parent)}
    cfg, start = Config(**base | given), None
    if cfg.weights and ckpt is None:                  # the file's architecture; flags given must agree
        flags = {k: None if given[k] == "auto" else given[k] for k in ARCHITECTURE if k in given}
        source, saved = evaluate.load_detector(cfg.weights, **flags)
        arch = {k: v for k, v in saved["model_args"].items() if k in ARCHITECTURE} | {
            "anchors": saved["model_args"]["anchors"] or "auto"}
        cfg, start = dataclasses.replace(cfg, **arch), source.state_dict()
    custom = (cfg.train_images, cfg.train_ann, cfg.val_images, cfg.val_ann)
    if cfg.size_min > cfg.size_max:
        raise data.UserError(f"--size-min {cfg.size_min} is over --size-max {cfg.size_max}")
    if any(custom) and not all(custom):
        raise data.UserError("a set of your own takes --train-images, --train-ann, --val-images, --val-ann")
    if Path(cfg.out).is_file():
        raise data.UserError(f"--out {cfg.out}: a file, not a folder")
    held = [name for name in RUN_FILES if (Path(cfg.out) / name).exists()]
    if held and not (ckpt and Path(cfg.resume).resolve().parent == Path(cfg.out).resolve()):
        raise data.UserError(f"{cfg.out} already holds a run ({', '.join(held)}): continue it with --resume "
                             f"{Path(cfg.out) / 'last.pt'}, give a new --out, or remove that folder")
    return cfg, ckpt, start

def resume_checkpoint(given: dict) -> dict:
    """--resume's file, refused unless of the flags given (but RESUME_MAY_DIFFER) and processes."""
    ckpt = evaluate.read_checkpoint(given["resume"])
    if not all(k in ckpt for k in ("model", "optimizer", "config", "iteration")):
        raise data.UserError(f"{given['resume']}: not a train.py checkpoint (--weights starts a run from it)")
    saved = ckpt["config"] | {"world_size": ckpt.get("world_size", 1)}
    now = {k: v for k, v in given.items() if k not in RESUME_MAY_DIFFER} | {
        "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    if differ := [f"{k} (checkpoint {saved.get(k, 'absent')!r}, now {v!r})" for k, v in now.items()
                  if saved.get(k, "absent") != v]:
        raise data.UserError(f"{given['resume']} was made with another configuration: {', '.join(differ)}")
    return ckpt

if __name__ == "__main__":
    data.exit_on_user_error(main)
