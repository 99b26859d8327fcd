"""Training - paper Sec. 3.4 (optimisation, random shapes, pretrained backbone) with the bag of
freebies of Sec. 3.1 (mixup, cosine learning rate, synchronized BatchNorm), as one script.

How to run it:
    python train.py                       # the CPU demo: built-in synthetic shapes, small ASFF
    torchrun --nproc_per_node=4 train.py --data /coco --backbone darknet53_feature_mx.pth
                                          # the paper: 4 GPUs x 16 images, 300 epochs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --data /coco --batch-size 4 --backbone darknet53.conv.74   # 2 nodes x 8 GPUs
    python train.py --resume runs/asff/last.pt     # continue exactly where it stopped
    python train.py --train-images my/train --train-ann my/train.json --val-images my/val \\
        --val-ann my/val.json                     # any COCO-format set, its own categories
    python tests/bench.py train --steps 3 --size-max 416 --batch-size 4   # training throughput

Paper rows (flags on top of the defaults):
    YOLOv3 (Table 1, 33.0 AP)     --fusion none --no-guided --no-spp --no-mixup
    strong baseline (Table 1)     --fusion none        (--no-guided, --no-iou-loss: its ablations)
    ignore area (Table 2)         --fusion none --ignore-ratio 0.2
    fusion (Table 3)              --fusion sum | concat | asff (the default)
    ASFF* (Table 4)               --rfb --dropblock --epochs 450   ("trained 1.5x longer")

Per iteration: a random input size (the same on every rank: data.random_size depends on the seed
and the iteration only), forward, loss.compute_loss, the loss terms averaged over ranks (a
non-finite one stops the run before the step), backward, SGD step (non-finite weights after it
stop the run too, before they are saved), EMA. Per epoch: the mixup switch and the DropBlock
schedule, evaluation every --eval-every epochs, last.pt / best.pt.

Defaults follow the paper where it is explicit and the release (docs/released-code.md) where it
is silent; each departure has a flag for the other choice (README, "Where the released code
departs from the paper"): lr 1e-3 per 64 images scaled linearly with the total batch
(--no-scale-lr: the release's flat 1e-3); linear warm-up over 4/300 then one per-iteration
cosine to 1e-5 (--schedule released: (it/W)^4 over 5 epochs, flat to epoch 20, cosine per epoch
to epoch 270, then flat); mixup off for the last 30/300 (release: 29, --mixup-off 0.0967);
weight decay on conv weights only (--decay-all: the release's default); NMS 0.6 in evaluation
(--nms 0.65); random sizes to the end (--fixed-size-last 0.0333: the release's last 10 epochs
at 608); crowd boxes left out (--include-crowd). SPP (--no-spp), the (121, 240) ninth anchor
(--anchors yolov3), label smoothing (--no-label-smooth), 1 - IoU^2 (--iou-form='-ln(iou)') and
the DropBlock schedule follow the release. Every epoch count of the schedule is a fraction of
--epochs, so a shorter run keeps the same shape. With no --data the DEMO settings below replace
the defaults (flags given still win).

Run folder (--out): last.pt (every epoch, at the end, and on SIGTERM/SIGINT to this process or
to its whole process group as systemd and SLURM send them: the loader workers ignore them),
best.pt (best AP), log.jsonl (progress and evaluation records), metrics.json (AP, AP50, AP75,
APs, APm, APl in [0, 1], wall time, training images/s), figure3_demo.png (detections and Eq. 2
weight maps).
A checkpoint holds tensors and plain Python only (torch.load(..., weights_only=True)):
    model, optimizer, scaler, ema (state dicts; ema None when off), iteration (steps done),
    epoch, batch_in_epoch (the data position), config (Config as a dict), world_size,
    rng (per rank: torch, cuda, numpy, python), best_ap, metrics, evaluated_at.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import resource
import signal
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
import evaluate
from darknet import read_darknet_weights
from head import Detector, load_released, transfer_weights
from loss import IOU_FORMS, compute_loss


def opt(default, help: str):
    """A config field with its source as the --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # where things are
    data: str = opt("", "COCO root with train2017/, val2017/, annotations/; empty: the synthetic set")
    out: str = opt("runs/asff", "run folder: last.pt, best.pt, log.jsonl, metrics.json, picture")
    resume: str = opt("", "checkpoint to continue from (its config must match)")
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
    fusion: str | None = opt("asff", "none, sum, concat or asff (Table 3)")
    guided: bool = opt(True, "guided anchoring + anchor-free slot (Sec. 3.1, Table 1 'GA')")
    spp: bool = opt(True, "SPP at stride 32 (in the release's strong baseline)")
    rfb: bool = opt(False, "RFB in the heads (ASFF*, Table 4)")
    dropblock: bool = opt(False, "DropBlock in the pyramid (ASFF*, Table 4; schedule: DROPBLOCK)")
    width: float = opt(1.0, "channel multiplier (1 = the paper's DarkNet-53)")
    depth: float = opt(1.0, "residual-unit multiplier (1 = the paper's DarkNet-53)")
    anchors: str = opt("auto", "released: ninth anchor (121, 240), what every released darknet "
                               "model was trained with; yolov3: YOLOv3's (373, 326); auto: "
                               "released with guided anchoring, yolov3 without")
    # the loss (Tables 1-2)
    iou_loss: bool | None = opt(None, "IoU losses (Table 1); none: on with guided anchoring")
    iou_form: str = opt("1-iou^2", "IoU loss form: 1-iou^2 (released), -ln(iou) (UnitBox, the "
                                   "paper's citation) or 1-iou")
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
    size_min: int = opt(320, "smallest random input size (Sec. 3.4: 320)")
    size_max: int = opt(608, "largest random input size (Sec. 3.4: 608), step 32")
    size_every: int = opt(10, "iterations per random size (release; the paper: every batch)")
    fixed_size_last: float = opt(0.0, "fraction of the epochs, at the end, at --size-max only "
                                      "(release: the last 10 of 300); 0: random to the end")
    eval_size: int = opt(608, "test size (Table 3: 608)")
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
                                 "epoch to 270/300, then min_lr (--warmup ignored)")
    warmup: float = opt(4 / 300, "fraction of the iterations in linear warm-up (Sec. 3.4: 4 of "
                                 "300 epochs)")
    momentum: float = opt(0.9, "SGD momentum (Sec. 3.4)")
    weight_decay: float = opt(5e-4, "on conv weights only (Sec. 3.4: 0.0005)")
    decay_all: bool = opt(False, "weight decay on every parameter, BatchNorm and biases too (the "
                                 "release's default; its --nowd is ours)")
    clip_grad: float = opt(0.0, "clip the gradient norm to this (not in the paper or release); 0: off")
    ema: float = opt(0.0, "EMA decay of the weights, e.g. 0.9998 (not in the paper); 0: off")
    amp: str = opt("auto", "auto, none, bf16 or fp16; auto: bf16 on a GPU that has it, else "
                           "fp16 with a GradScaler; none on CPU")
    freeze_bn: bool = opt(False, "BatchNorm in eval mode: fixed statistics (tiny batches)")
    # the run
    workers: int = opt(4, "DataLoader worker processes per rank")
    threads: int = opt(0, "torch CPU threads per process (0: torch's default, one per core; on a "
                          "machine shared with other jobs, fewer threads than cores is faster)")
    seed: int = opt(0, "seeds the init, the data order and draws, and the random sizes")
    log_every: int = opt(10, "iterations between progress lines (release: 10)")
    eval_every: int = opt(10, "epochs between evaluations (release: 10)")
    max_iters: int = opt(0, "stop after this many iterations, schedule unchanged (0: no limit)")


# The CPU demo (no --data): a small ASFF trained from scratch on data.make_synthetic's shapes.
# Measured on 2 idle CPU cores: 6.4 min in all, AP 0.487, AP50 0.726 at 192 px (960 steps of 16).
# It departs from the recipe where 10 minutes demand it: no pretrained backbone, so a larger lr;
# the loss (summed over cells, divided by the batch) starts with a gradient norm of ~6000,
# which diverges without the release's slow (it/W)^4 warm-up unless the norm is clipped; no
# mixup and no augmentation (each doubles the steps needed here), the 1024 distinct images of
# synthetic_train's default instead;
# small inputs (the synthetic images are 192 px).
DEMO = dict(out="runs/demo", width=0.25, depth=0.33, epochs=15, batch_size=16,
            lr=4e-2, min_lr=4e-4, warmup=0.05, clip_grad=10.0, mixup=False, augment=False,
            size_min=128, size_max=192, eval_size=192, workers=0, eval_every=5)

# ASFF* DropBlock schedule as released (docs/released-code.md, DropBlock schedule), epochs as
# fractions of the schedule: off before 5/300, then block sizes per stride with keep 0.9.
DROPBLOCK = ((5 / 300, {32: 1, 16: 3, 8: 5}), (80 / 300, {32: 3, 16: 5, 8: 7}),
             (150 / 300, {32: 7, 16: 7, 8: 7}))
DROPBLOCK_KEEP = 0.9
TERMS = ("total", "anchor", "iou", "l1", "obj", "cls")             # what the progress line shows
RESUME_MAY_DIFFER = ("out", "resume", "max_iters", "log_every", "eval_every", "workers", "threads",
                     "benchmark")    # benchmark: a field of checkpoints older than tests/bench.py
CHOICES = {"fusion": (None, "sum", "concat", "asff"), "anchors": ("auto", "released", "yolov3"),
           "schedule": ("paper", "released"), "iou_form": IOU_FORMS,
           "amp": ("auto", "none", "bf16", "fp16")}


def parse_config(argv: list[str] | None = None) -> Config:
    """argparse generated from Config; DEMO applies without --data; given flags win."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=f"demo (no --data): "
                                     f"{DEMO}", formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        base = [t for t in typing.get_args(f.type) or (f.type,) if t is not type(None)][0]
        kwargs = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} [{f.default}]")
        if base is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                **kwargs)
        else:
            convert = lambda s, base=base: None if s.lower() == "none" else base(s)  # noqa: E731
            parser.add_argument("--" + f.name.replace("_", "-"), type=convert,
                                metavar=base.__name__.upper(), **kwargs)
    given = vars(parser.parse_args(argv))
    real = given.get("data") or given.get("train_ann")
    cfg = Config(**({} if real else DEMO) | given)
    custom = (cfg.train_images, cfg.train_ann, cfg.val_images, cfg.val_ann)
    if any(custom) and not all(custom):
        parser.error("a custom set needs all of --train-images, --train-ann, --val-images, --val-ann")
    if cfg.weights and (cfg.resume or cfg.backbone):
        parser.error("--weights starts a new run from a whole detector: it goes with neither "
                     "--resume (which continues a run) nor --backbone (which it includes)")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: not one of "
                         + ", ".join("none" if a is None else a for a in allowed))
    return cfg


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
# Building blocks of the run
# ---------------------------------------------------------------------------------------------
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


def build_model(cfg: Config, num_classes: int) -> Detector:
    """The Detector of the config (MSRA init, head.init_weights), with a pretrained backbone."""
    model = Detector(num_classes, fusion=cfg.fusion, guided=cfg.guided, spp=cfg.spp, rfb=cfg.rfb,
                     dropblock=cfg.dropblock, width=cfg.width, depth=cfg.depth,
                     anchors=None if cfg.anchors == "auto" else cfg.anchors)
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
        evaluate.load_foreign(read_darknet_weights, path, path, source.darknet_layers())
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
    re-initialised when the class count differs (head.transfer_weights), with a report."""
    arch = {k: getattr(cfg, k) for k in ARCHITECTURE}
    state, classes = detector_weights(cfg, arch)
    report = evaluate.load_foreign(transfer_weights, cfg.weights, model, state, cfg.weights)
    fresh = report["reinitialised"]
    print(f"--weights {cfg.weights}: loaded {len(report['loaded'])} tensors"
          + (f"; {len(fresh)} prediction convs keep their box and objectness rows, their class "
             f"rows are new for {model.num_classes} classes (the file has {classes})" if fresh
             else f" (the file has the same {classes} classes)"), flush=True)


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


def save(state: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_resume(cfg: Config, world: int) -> dict:
    """The --resume file, refused with a UserError naming it unless it is a train.py checkpoint
    of this configuration (run() reads it before opening the data: a bad file fails at once)."""
    ckpt = evaluate.read_checkpoint(cfg.resume)
    if not evaluate.is_training_checkpoint(ckpt):
        raise data.UserError(f"{cfg.resume}: a state dict without a training state (no "
                             "optimizer, config): --resume continues a train.py run only")
    check_resumable(ckpt, cfg, world, cfg.resume)
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


class NonFiniteLoss(RuntimeError):
    """A step gave a non-finite `what` (loss, gradient, weights); `detail` says which values."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"non-finite {what}: {detail}")
        self.what, self.detail = what, detail


def kept_note(kept: dict) -> str:
    """What a stop leaves behind, naming a checkpoint file only if it exists."""
    if kept["path"] is not None and Path(kept["path"]).is_file():
        return f"{kept['path']} keeps the weights of iteration {kept['iteration']}"
    return "no checkpoint of this run was written yet (last.pt comes at the end of each epoch)"


def evaluation_due(cfg: Config, epoch: int) -> bool:
    """After `epoch` whole epochs: every --eval-every epochs and at the end."""
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------
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


def train_step(ddp, model, batches, size: int, cfg: Config, optimizer, scaler, amp_dtype,
               device: torch.device, world: int) -> dict[str, float]:
    """cfg.accumulate micro-batches at size x size, then one SGD step; returns the loss terms
    averaged over ranks (and micro-batches). A non-finite term raises before any backward."""
    terms = torch.zeros(len(TERMS), device=device)
    for k in range(cfg.accumulate):
        images, targets = next(batches)                                   # (B, 3, S0, S0)
        images, targets = data.resize_batch(images, targets, size)         # (B, 3, size, size)
        images = images.to(device, non_blocking=True)
        targets = [t.to(device) for t in targets]                          # B x (N_b, 6)
        last = k == cfg.accumulate - 1
        with ddp.no_sync() if world > 1 and not last else nullcontext():
            with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                outputs = ddp(images)                       # {stride: {"pred": (B, S, 5+C, h, w)}}
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
    scaler.unscale_(optimizer)                        # a no-op without fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):   # fp16 skips such steps
        raise NonFiniteLoss("gradient", f"norm={grad_norm.item():.4g} (loss terms "
                            f"{term_list(terms)})")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    bad = non_finite_weights(model, world)
    if bad:
        raise NonFiniteLoss("weights", f"after the SGD step: {', '.join(bad[:3])}"
                            f"{' ...' if len(bad) > 3 else ''} (loss terms {term_list(terms)}, "
                            f"gradient norm {grad_norm.item():.4g})")
    return dict(zip(TERMS, terms.tolist(), strict=True)) | {"grad_norm": grad_norm.item()}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> Detector:
    """Train as the command line says; returns the trained model (rank-local copy)."""
    cfg = parse_config(argv)
    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python train.py` is rank 0 of 1.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    stop = {"signal": None}                 # SIGTERM / SIGINT: save last.pt at the next step
    handlers = {s: signal.signal(s, lambda sig, _: stop.update(signal=sig))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(cfg, rank, world, device, stop)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: Config, rank: int, world: int, device: torch.device, stop: dict) -> Detector:
    master, start_time = rank == 0, time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    say = print if master else (lambda *a, **k: None)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                       # the same init on every rank
    ckpt = read_resume(cfg, world) if cfg.resume else None

    # data: one augmented sample stream per (seed, epoch, index), sharded by DistributedSampler
    train_data, val_data = open_data(cfg, world, master)
    train_set = data.TrainDataset(train_data, size=cfg.size_max, seed=cfg.seed, mixup=cfg.mixup,
                                  augment=cfg.augment)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_step = cfg.batch_size * cfg.accumulate
    steps_per_epoch = len(sampler) // per_step
    total_iters = cfg.epochs * steps_per_epoch
    planned = min(total_iters, cfg.max_iters or total_iters)

    # model, optimizer, mixed precision, EMA
    model = build_model(cfg, len(train_data.cat_ids)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.decay_all), lr=0.0,
                                momentum=cfg.momentum)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    iteration, epoch, batch_in_epoch, best_ap, metrics, evaluated_at = 0, 0, 0, -1.0, {}, -1
    if ckpt is not None:
        evaluate.load_foreign(evaluate.load_checked, cfg.resume, model, ckpt["model"], cfg.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        iteration, epoch, batch_in_epoch = ckpt["iteration"], ckpt["epoch"], ckpt["batch_in_epoch"]
        best_ap, metrics, evaluated_at = ckpt["best_ap"], ckpt["metrics"], ckpt["evaluated_at"]
        set_rng_states(ckpt["rng"][rank])
        say(f"resumed {cfg.resume}: iteration {iteration}, epoch {epoch}, batch {batch_in_epoch}")
    else:
        torch.manual_seed(cfg.seed + rank)            # per-rank DropBlock draws from here on
    eval_model = ema if ema is not None else model
    ddp = model
    if world > 1:
        if device.type == "cuda":                     # SyncBN (Sec. 3.1); CPU has none
            ddp = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = DistributedDataParallel(ddp, device_ids=[device.index] if device.type == "cuda" else None)
    set_train_mode(model, cfg.freeze_bn)
    # the newest good checkpoint of this run, for the message of a non-finite stop: the --resume
    # file until save_all writes last.pt
    kept = {"path": Path(cfg.resume) if ckpt is not None else None, "iteration": iteration}

    def checkpoint() -> dict:
        """All ranks call (the RNG states are gathered); rank 0 keeps the dict."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
                "iteration": iteration, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "config": dataclasses.asdict(cfg), "world_size": world, "rng": rng_states(world),
                "best_ap": best_ap, "metrics": metrics, "evaluated_at": evaluated_at}

    def log(record: dict) -> None:
        if master:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluation() -> dict:
        m = evaluate.evaluate(eval_model, val_data, size=cfg.eval_size, nms_thre=cfg.nms,
                              verbose=master)
        set_train_mode(model, cfg.freeze_bn)          # evaluate() restores plain train mode
        log({"epoch": epoch, "iteration": iteration, "eval": m})
        return m

    def save_all() -> None:
        """last.pt, and best.pt when this state's fresh evaluation is the best so far."""
        nonlocal best_ap
        is_best = evaluated_at == iteration and metrics["AP"] > best_ap
        best_ap = metrics["AP"] if is_best else best_ap
        state = checkpoint()
        if master:
            save(state, out / "last.pt")
            if is_best:
                save(state, out / "best.pt")
        kept.update(path=out / "last.pt", iteration=iteration)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"{world} process(es) on {device}, amp {amp_dtype}; model {n_params:,} parameters; "
        f"{len(train_data)} training images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs "
        f"= {total_iters} iterations (running {planned}) of {per_step * world} images")
    train_seconds, window_seconds, window_images, start_iter = 0.0, 0.0, 0, iteration
    if batch_in_epoch == 0 and epoch > 0 and evaluation_due(cfg, epoch) and evaluated_at != iteration:
        metrics, evaluated_at = evaluation(), iteration   # a signal came before the epoch's one
        save_all()
    while epoch < cfg.epochs and iteration < planned:
        train_set.set_epoch(epoch)
        train_set.mixup = mixup_on(cfg, epoch)
        sampler.set_epoch(epoch)
        model.set_dropblock(*dropblock_at(cfg, epoch))
        order = list(sampler)[batch_in_epoch * per_step:steps_per_epoch * per_step]  # resume point
        # its own generator: making a loader iterator draws a seed, which must not move the
        # global RNG (DropBlock's) differently in a resumed run; the workers ignore SIGTERM and
        # SIGINT, so a signal to the whole process group stops the run as one to this process
        batches = iter(DataLoader(train_set, cfg.batch_size, sampler=order, collate_fn=data.collate,
                                  num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                  worker_init_fn=data.ignore_stop_signals,
                                  generator=torch.Generator().manual_seed(cfg.seed + epoch)))
        while batch_in_epoch < steps_per_epoch and iteration < planned:
            tic = time.time()
            size = size_at(cfg, iteration, epoch)                        # the same on all ranks
            lr = lr_at(cfg, iteration, total_iters, world)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                terms = train_step(ddp, model, batches, size, cfg, optimizer, scaler, amp_dtype,
                                   device, world)
            except NonFiniteLoss as e:
                say(f"non-finite {e.what} at iteration {iteration} (epoch {epoch}, size {size}): "
                    f"{e.detail}; stopped without saving; {kept_note(kept)}")
                log({"iteration": iteration, "non_finite": str(e)})
                raise SystemExit(1) from e
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "allocate memory" not in str(e):
                    raise
                raise RuntimeError(f"out of memory at iteration {iteration}: input size {size} x "
                                   f"{size}, batch {cfg.batch_size} per process; lower "
                                   f"--batch-size (and raise --accumulate) or --size-max") from e
            iteration, batch_in_epoch = iteration + 1, batch_in_epoch + 1
            if ema is not None:
                ema_update(ema, model, cfg.ema, iteration)
            seconds = time.time() - tic
            train_seconds, window_seconds = train_seconds + seconds, window_seconds + seconds
            window_images += per_step * world
            if iteration % cfg.log_every == 0 or iteration == planned:
                speed, eta = window_images / window_seconds, (planned - iteration) * \
                    train_seconds / (iteration - start_iter)
                say(f"epoch {epoch + 1}/{cfg.epochs} iter {iteration}/{planned} | "
                    + " ".join(f"{t} {v:.3f}" for t, v in terms.items())
                    + f" | lr {lr:.2e} | size {size} | {speed:.1f} img/s | ETA {eta / 60:.1f} min"
                    f" | peak mem {peak_memory_mb(device):.0f} MB", flush=True)
                log({"epoch": epoch, "iteration": iteration, **terms, "lr": lr, "size": size,
                     "images_per_s": speed, "time": time.time() - start_time})
                window_seconds, window_images = 0.0, 0
            stop_now = torch.tensor([stop["signal"] is not None], dtype=torch.float32, device=device)
            if world > 1:
                dist.all_reduce(stop_now)                  # stop together, at the same iteration
            if stop_now.item():
                if batch_in_epoch == steps_per_epoch:      # the epoch's last step: the next at 0
                    epoch, batch_in_epoch = epoch + 1, 0
                save_all()
                say(f"stopped by signal at iteration {iteration}; saved {out / 'last.pt'} "
                    f"(continue with --resume {out / 'last.pt'})")
                return model
        if batch_in_epoch == steps_per_epoch:              # a whole epoch done
            epoch, batch_in_epoch = epoch + 1, 0
            if evaluation_due(cfg, epoch):
                metrics, evaluated_at = evaluation(), iteration
        save_all()
    if evaluated_at != iteration:                          # --max-iters ended between evaluations
        metrics, evaluated_at = evaluation(), iteration
        save_all()

    if master:
        summary = {k: float(metrics[k]) for k in evaluate.PAPER_COLUMNS} | {
            "wall_time_s": time.time() - start_time,
            "train_images_per_s": (iteration - start_iter) * per_step * world / max(train_seconds, 1e-9),
            "iterations": iteration, "epochs": epoch + batch_in_epoch / steps_per_epoch,
            "eval_size": cfg.eval_size, "world_size": world}
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        image = demo_image(val_data, say)               # the first with a few objects
        if image is not None:
            evaluate.show(eval_model, image, str(out), cfg.eval_size, val_data.class_names,
                          conf_thre=0.2, name="demo")
        say(f"done in {summary['wall_time_s'] / 60:.1f} min: AP {summary['AP']:.3f}, AP50 "
            f"{summary['AP50']:.3f}; wrote {out}/metrics.json, last.pt, best.pt"
            + (", figure3_demo.png" if image is not None else " (no readable image to draw)"))
    return model


if __name__ == "__main__":
    data.exit_on_user_error(main)
