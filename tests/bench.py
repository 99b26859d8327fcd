"""Benchmarks: how fast the loss, the data loader, a training step and the detector run (the
speed column of Tables 3-4). Each subcommand prints a table and, as its last line, one JSON
object of its figures (scripts read those keys; keep them stable).

    python tests/bench.py loss [--threads 1]          compute_loss against the per-object loop
    python tests/bench.py data                        one DataLoader worker, mixup + augmentation:
                                                      per-step CPU ms, images/s, CPU model
    python tests/bench.py train --steps 3 --size-max 416 --batch-size 4 [train.py's flags]
                                                      training steps of train.py's model
    python tests/bench.py speed [--runs 5 --threads 1 --half --device cuda --speed-sizes 608]
                                                      Tables 3-4: forward of baseline / sum /
                                                      concat / ASFF / ASFF*, decode + NMS
    python tests/bench.py against ../ref [--runs 5]  ours against another checkout (git worktree
                                                      add ../ref COMMIT): forwards at 416 and 608,
                                                      a training step, % of the conv roofline

Everything here only measures: the code it times lives in the concept files (loss.py,
data.py, train.py, evaluate.py, head.py). No library file imports this one.
"""

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import PIL
import torch
from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # `python tests/bench.py` from anywhere

import data  # noqa: E402
import evaluate  # noqa: E402
import loss  # noqa: E402
import train  # noqa: E402
from head import ANCHOR_MASKS, FREE_SLOT_SCALE, RELEASED_ANCHORS, STRIDES, Detector, decode_level  # noqa: E402
from test_loss import reference_loss  # noqa: E402


def timed_ms(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of fn(), CUDA-synchronised on a GPU. On a CPU shared with other
    jobs the CPU time is the steadier figure: it does not count the time other jobs hold the cores
    (with --threads 1 it is exactly this call's compute)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def median_ms(fn, repeats: int) -> float:
    """Median wall ms of `repeats` calls of fn() after one untimed call (the upper one of an even
    count)."""
    fn()                                                                       # warm-up
    times = sorted(timed_ms(fn, torch.device("cpu"))[0] for _ in range(repeats))
    return times[len(times) // 2]


# ---------------------------------------------------------------------------------------------
# loss: compute_loss against the per-object loop reference of tests/test_loss.py
# ---------------------------------------------------------------------------------------------
def loss_benchmark(batch: int = 16, size: int = 608, objects: int = 20, num_classes: int = 80) -> dict:
    """Assignment + loss for a batch of `batch` images at `size` with `objects` objects each, on
    random raw outputs of the real head shapes; `ms_per_batch` is the forward pass of
    compute_loss with autograd recording, as in training."""
    torch.manual_seed(0)
    model = Detector(num_classes, width=0.25, depth=0.34)   # the loss reads anchors and slots only
    outputs = {s: {"pred": torch.randn(batch, 4, 5 + num_classes, size // s, size // s),
                   "anchor_log": 0.5 * torch.randn(batch, 4, 2, size // s, size // s)} for s in STRIDES}
    for o in outputs.values():
        o["pred"].requires_grad_(), o["anchor_log"].requires_grad_()
    targets = [torch.cat([torch.randint(0, num_classes, (objects, 1)).float(),
                          torch.rand(objects, 2) * size,
                          torch.exp(torch.empty(objects, 2).uniform_(2.0, 6.0)),   # 7..400 px
                          torch.ones(objects, 1)], dim=1) for _ in range(batch)]
    levels = {s: loss.Level(s, o["pred"], o["anchor_log"], model.slot_sizes(s))
              for s, o in outputs.items()}

    def assignment():
        gt = loss.prepare_targets(targets, num_classes, (size, size))
        assign = loss.assign_targets(gt, model.anchors, levels)
        return [loss.slot_targets(assign[s], 4, tuple(level.pred.shape[-2:]), True)
                for s, level in levels.items()]

    def ignore():
        gt = loss.prepare_targets(targets, num_classes, (size, size))
        return [loss.ignore_mask(level, gt, 0.7) for level in levels.values()]

    def backward():
        loss.compute_loss(outputs, targets, model)["total"].backward()

    ms = {"assignment": median_ms(assignment, 10), "ignore": median_ms(ignore, 10),
          "loss": median_ms(lambda: loss.compute_loss(outputs, targets, model), 10),
          "loss+backward": median_ms(backward, 5),
          "loop": median_ms(lambda: reference_loss(outputs, targets, model), 3)}
    print(f"compute_loss: {batch} images at {size}, {objects} objects each, {num_classes} classes, "
          f"{torch.get_num_threads()} threads (median ms)")
    print(f"  {'assignment (targets, levels, slots)':<40}{ms['assignment']:>9.1f}")
    print(f"  {'ignore masks (3 levels)':<40}{ms['ignore']:>9.1f}")
    print(f"  {'compute_loss forward (all of it)':<40}{ms['loss']:>9.1f}")
    print(f"  {'compute_loss forward + backward':<40}{ms['loss+backward']:>9.1f}")
    print(f"  {'per-object loop reference, forward':<40}{ms['loop']:>9.1f}")
    return {"ms_per_batch": round(ms["loss"], 2),
            "ms_per_batch_loop_reference": round(ms["loop"], 2),
            "ms_assignment": round(ms["assignment"], 2), "ms_ignore": round(ms["ignore"], 2),
            "ms_forward_backward": round(ms["loss+backward"], 2), "batch": batch, "size": size,
            "objects_per_image": objects, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# data: one DataLoader worker with the full augmentation and mixup
# ---------------------------------------------------------------------------------------------
PIPELINE = {  # data.py's step functions, in the order a sample meets them -> what each does
    "draw_colour": "colour draws",
    "expand": "zoom out: boxes and matrix",
    "ssd_crop": "SSD crop: boxes and matrix",
    "hflip": "flip: boxes and matrix",
    "random_affine": "affine: boxes and matrix",
    "_decode": "decode (JPEG at 1/k where the output is smaller)",
    "mixup": "mixup blend (where the crop keeps)",
    "colour_distort": "colour distortion (where the crop keeps)",
    "rotate_hue": "  of which hue (HSV)",
    "saturate": "  of which saturation",
    "warp": "warp: zoom out, crop, flip, affine, resize",
    "warp nearest": "  of which nearest",
    "warp bilinear": "  of which bilinear (resize if not turned)",
    "to_tensor": "to tensor",
    "other": "other (Python, numpy glue, crops)",
    "sample": "one sample (all of the above)",
    "collate": "collate: normalise, per image",
}
NESTED = ("rotate_hue", "saturate", "warp nearest", "warp bilinear")   # parts of the row above


def step_profile(dataset: data.TrainDataset, n: int, batch_size: int) -> tuple[dict, dict]:
    """CPU ms per image of each step of TrainDataset's own pipeline, timed in this thread by
    wrapping data.py's step functions (thread CPU time: what other jobs on the machine do is not
    counted), and the share of images each step ran on; collate timed on batches of the samples."""
    ms, runs = defaultdict(float), defaultdict(int)

    def timed(name, fn):
        def step(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                nearest = name == "warp" and args[3] == Image.NEAREST
                key = name if name != "warp" else "warp nearest" if nearest else "warp bilinear"
                ms[key] += 1000 * (time.thread_time() - start) / n
                runs[key] += 1
        return step

    with contextlib.ExitStack() as patches:
        for name in (name for name in PIPELINE if hasattr(data, name)):
            patches.enter_context(mock.patch.object(data, name, timed(name, getattr(data, name))))
        samples = []
        for i in range(n):
            start = time.thread_time()
            samples.append(dataset[i % len(dataset)])
            ms["sample"] += 1000 * (time.thread_time() - start) / n
    ms["warp"] = ms["warp nearest"] + ms["warp bilinear"]
    ms["other"] = ms["sample"] - sum(ms[k] for k in PIPELINE if hasattr(data, k) and k not in NESTED)
    start = time.thread_time()
    for b in range(0, n - batch_size + 1, batch_size):
        data.collate(samples[b:b + batch_size])
    ms["collate"] = 1000 * (time.thread_time() - start) / (n // batch_size * batch_size)
    share = {k: runs[k] / n for k in runs}
    share["warp"] = share.get("warp nearest", 0) + share.get("warp bilinear", 0)
    return dict(ms), share


def step_table(ms: dict, share: dict) -> str:
    total = ms["sample"] + ms["collate"]
    out = [f"{'step (one worker, in-process CPU time)':<50}{'ms/image':>9}{'share':>7}{'calls/image':>12}"]
    for key, label in PIPELINE.items():
        calls = f"{share[key]:.2f}" if key in share else ""
        out.append(f"{label:<50}{ms.get(key, 0):>9.2f}{ms.get(key, 0) / total:>7.0%}{calls:>12}")
    return "\n".join(out)


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and which of its SIMD extensions PIL, numpy and torch might use."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return model, [f for f in ("sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni") if f in flags]


def private_mb_of_children() -> float:
    """Private (unshared) memory of this process's children, from Linux's smaps_rollup."""
    total = 0.0
    with contextlib.suppress(OSError):
        for pid in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean", "Private_Dirty")):
                    total += int(line.split()[1]) / 1024  # kB
    return total


def data_benchmark(n_images: int = 32, batches: int = 25, batch_size: int = 8, size: int = 608) -> dict:
    """One DataLoader worker, full augmentation and mixup at `size`, on 640x480 JPEGs."""
    torch.set_num_threads(1)  # as inside a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        data._write_split(Path(tmp), "bench", n_images, 640, 480, 0, 0, fmt="jpg", max_objects=10)
        images = data.CocoDetection(str(Path(tmp) / "bench"), str(Path(tmp) / "bench.json"))
        dataset = data.TrainDataset(images, size=size, mixup=True)
        ms, share = step_profile(dataset, max(4 * n_images, batch_size), batch_size)
        print(step_table(ms, share))
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                                 num_samples=batches * batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=1,
                                             collate_fn=data.collate, prefetch_factor=4)
        it = iter(loader)
        next(it)  # worker start-up and first batch are not timed
        start, n, private_mb = time.perf_counter(), 0, 0.0
        for batch, _ in it:
            n += len(batch)
            private_mb = max(private_mb, private_mb_of_children())
        seconds = time.perf_counter() - start
        del it, loader  # joins the worker, so its peak memory is in RUSAGE_CHILDREN
    worker = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker, now joined
    cpu_s = worker.ru_utime + worker.ru_stime  # all its batches: on a shared machine this is
    model, simd = cpu_model()  # the figure that does not depend on what else runs
    result = {
        "images_per_s_per_worker": round(n / seconds, 1),
        "images_per_cpu_s_per_worker": round(batches * batch_size / cpu_s, 1),
        "images_per_cpu_s": round(batches * batch_size / cpu_s, 1),
        "peak_mb_per_worker": round(worker.ru_maxrss / 1024, 1),
        "private_mb_per_worker": round(private_mb, 1), "size": size, "mixup": True,
        "source": "640x480 JPEG", "images_timed": n, "load_average_1min": os.getloadavg()[0],
        "cpu_model": model, "cpu_simd": simd, "cpus": os.cpu_count(), "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"), "numpy": np.__version__,
        "step_ms": {k: round(v, 3) for k, v in ms.items()}}
    print(f"CPU: {model} ({', '.join(simd) or 'no AVX'}; {os.cpu_count()} cores, load "
          f"{result['load_average_1min']:.1f}); Pillow {PIL.__version__}, "
          f"libjpeg-turbo {result['libjpeg_turbo']}")
    print(f"one worker, end to end: {result['images_per_s_per_worker']} images/s at {size} "
          f"({result['images_per_cpu_s_per_worker']} per CPU second), peak RSS "
          f"{result['peak_mb_per_worker']} MB of which {result['private_mb_per_worker']} MB "
          "private (the rest is shared with the main process: torch, the data set)")
    return result


# ---------------------------------------------------------------------------------------------
# train: train.train_step on random inputs
# ---------------------------------------------------------------------------------------------
def train_config(argv: list[str]) -> train.Config:
    """train.py's flags as a train.Config, without the CPU demo's settings (train.DEMO): the
    benchmark times the model the flags describe, full size unless --width / --depth say less
    (--size-min 32: it times --size-max alone, which may then be below train.py's 320)."""
    with mock.patch.dict(train.DEMO, {"size_min": 32, "out": tempfile.mkdtemp()}, clear=True):
        return train.read_command_line(argv)[0]


def random_batches(n: int, batch: int, size: int, num_classes: int, objects: int = 8) -> list:
    """n batches of random uint8 images (B, 3, size, size), as train.py's loader gives them, with
    `objects` random boxes per image."""
    g = torch.Generator().manual_seed(0)
    box = lambda: torch.cat([torch.randint(num_classes, (objects, 1), generator=g).float(),  # noqa: E731
                             size * (0.1 + 0.8 * torch.rand(objects, 2, generator=g)),    # cx, cy
                             size * (0.05 + 0.4 * torch.rand(objects, 2, generator=g)),   # w, h
                             torch.ones(objects, 1)], dim=1)                              # (O, 6)
    return [(torch.randint(256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
             [box() for _ in range(batch)])
            for _ in range(n)]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024           # Linux: KiB


def train_benchmark(cfg: train.Config, steps: int, device: torch.device,
                    num_classes: int = 80) -> dict:
    """`steps` timed train_step calls (forward, loss, backward, SGD step) of the configured
    model at size_max, after one untimed step; a tiny lr keeps random weights finite."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    parts = train.build_parts(cfg, num_classes, None, 1, device)     # the model, SGD, AMP as train.py's
    amp_dtype, size, per_step = parts.amp_dtype, cfg.size_max, cfg.batch_size * cfg.accumulate
    batches = iter(random_batches((steps + 1) * cfg.accumulate, cfg.batch_size, size, num_classes))
    step = lambda: train.train_step(parts, batches, cfg, 0, size, 1e-6)  # noqa: E731
    seconds = [timed_ms(step, device)[0] / 1000 for _ in range(steps + 1)]
    timed = sorted(seconds[1:])
    median = timed[len(timed) // 2]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    summary = {"images_per_s": round(per_step / median, 3), "s_per_step": round(median, 4),
               "batch": per_step, "size": size, "fusion": cfg.fusion or "none", "rfb": cfg.rfb,
               "width": cfg.width, "depth": cfg.depth, "device": where, "amp": str(amp_dtype),
               "peak_mb": round(peak_memory_mb(device)), "steps_timed": len(timed)}
    print(f"training throughput: Detector(fusion={cfg.fusion!r}, rfb={cfg.rfb}, width "
          f"{cfg.width}, depth {cfg.depth}) on {where}, amp {amp_dtype}, batch {per_step} at "
          f"{size}x{size}")
    print(f"{'step':>6}{'seconds':>10}{'images/s':>10}")
    for k, t in enumerate(seconds):
        print(f"{k:>6}{t:>10.2f}{per_step / t:>10.2f}" + ("  (untimed warm-up)" if k == 0 else ""))
    print(f"median {median:.2f} s per step = {per_step / median:.2f} images/s; peak memory "
          f"{summary['peak_mb']} MB")
    return summary


# ---------------------------------------------------------------------------------------------
# speed (Tables 3-4): forward and decode+NMS timed separately, variants interleaved
# ---------------------------------------------------------------------------------------------
SPEED_VARIANTS = {"baseline": dict(fusion=None), "sum": dict(fusion="sum"),
                  "concat": dict(fusion="concat"), "asff": dict(fusion="asff"),
                  "asff*": dict(fusion="asff", rfb=True, dropblock=True)}
PAPER_FPS_608 = {"baseline": 50, "sum": 48, "concat": 42, "asff": 46, "asff*": 45.5}  # V100


def realistic_raw(size: int, num_classes: int = 80, n_objects: int = 15, seed: int = 0):
    """Raw head outputs of a plausible trained model on a (1, 3, size, size) input, to time the
    decode and NMS on what they see in practice rather than on all-zero scores: n_objects
    objects; objectness logits ~ N(-12, 2) rising by up to +10 within ~1.5 strides of an
    object's centre at every level, the object's class logit raised alike. A few hundred
    (box, score) rows then pass conf 0.005, in clusters that NMS has to resolve."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n_objects, 2, generator=g) * size                  # (O, 2) x, y
    labels = torch.randint(num_classes, (n_objects,), generator=g)          # (O,)
    raw = {}
    for stride in (32, 16, 8):
        h = w = size // stride
        sizes = [RELEASED_ANCHORS[a] for a in ANCHOR_MASKS[stride]]
        sizes.append((FREE_SLOT_SCALE * stride,) * 2)                       # the free slot
        pred = torch.randn(1, 4, 5 + num_classes, h, w, generator=g)        # (1, S, 5+C, h, w)
        cell = (torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
                .flip(0).float() + 0.5) * stride                            # (2, h, w) x, y
        d = (cell[None] - centres[:, :, None, None]).norm(dim=1) / stride   # (O, h, w)
        near, nearest = torch.exp(-(d / 1.5) ** 2).max(0)                   # (h, w), (h, w)
        pred[:, :, 4] = pred[:, :, 4] * 2 - 12 + 10 * near                  # obj logit
        pred[:, :, 5:] -= 6
        onehot = torch.nn.functional.one_hot(labels[nearest], num_classes)  # (h, w, C)
        pred[:, :, 5:] += 8 * near[:, :, None].mul(onehot).permute(2, 0, 1)
        raw[stride] = (pred, torch.zeros(1, 4, 2, h, w), torch.tensor(sizes, dtype=torch.float32))
    return raw


def time_decode_nms(size: int, runs: int = 30, conf_thre: float = evaluate.CONF_THRE,
                    nms_thre: float = evaluate.NMS_THRE, device: str = "cpu") -> dict[str, float]:
    """Median ms per image (wall, and process CPU as *_cpu_ms) of the decode (head.decode_level
    on the 3 levels) and of evaluate.postprocess, on `realistic_raw` outputs at `size` with 80
    classes."""
    dev = torch.device(device)
    raw = {s: [t.to(dev) for t in v] for s, v in realistic_raw(size).items()}
    decode = lambda: torch.cat([decode_level(p, sh, s, a).flatten(1, 3)   # noqa: E731
                                for s, (p, sh, a) in raw.items()], dim=1)  # (1, N, 85)
    decoded = decode()
    post = lambda: evaluate.postprocess(decoded, conf_thre, nms_thre)    # noqa: E731
    dec = np.median([timed_ms(decode, dev) for _ in range(runs)], axis=0)   # (wall, cpu)
    nms = np.median([timed_ms(post, dev) for _ in range(runs)], axis=0)
    cand = int((decoded[0, :, 4:5] * decoded[0, :, 5:]).max(1).values.ge(conf_thre).sum())
    return {"decode_ms": float(dec[0]), "nms_ms": float(nms[0]), "decode_cpu_ms": float(dec[1]),
            "nms_cpu_ms": float(nms[1]), "candidates": cand, "kept": len(post()[0])}


def speed_benchmark(sizes=(416, 608), variants=tuple(SPEED_VARIANTS), device: str = "cpu",
                    amp_dtype: torch.dtype | None = None, batch: int = 1, runs: int = 5,
                    warmup: int = 1, width: float = 1.0, depth: float = 1.0, fold: bool = True,
                    verbose: bool = True) -> dict:
    """Median forward ms per image of every variant at every size, rounds interleaved (each
    round times every (size, variant) once) so load changes hit all alike; then the same after
    evaluate.prepare_for_inference (conv+BN folded, NHWC), as evaluation runs them. Returns
    {"forward": {(folded, size, variant): wall ms}, "forward_cpu": the same in process CPU ms,
    "decode_nms": {size: time_decode_nms(size)}}."""
    dev = torch.device(device)
    models = {}
    for v in variants:
        torch.manual_seed(0)
        models[v] = Detector(80, width=width, depth=depth, **SPEED_VARIANTS[v]).eval().to(dev)
    times = {}
    for folded in (False, True) if fold else (False,):
        if folded:   # as evaluation runs them: folded, NHWC
            models = {v: evaluate.prepare_for_inference(m) for v, m in models.items()}
        for r in range(warmup + runs):
            for s in sizes:
                x = torch.randn(batch, 3, s, s, device=dev)                # (B, 3, S, S)
                for v in variants:
                    with torch.no_grad(), torch.autocast(dev.type, amp_dtype,
                                                         enabled=amp_dtype is not None):
                        wall, cpu = timed_ms(partial(models[v], x), dev)
                    if r >= warmup:
                        times.setdefault((folded, s, v), []).append((wall / batch, cpu / batch))
            if verbose:
                print(f"  round {r + 1}/{warmup + runs} ({'folded' if folded else 'plain'})",
                      flush=True)
    median = lambda k, col: float(np.median([t[col] for t in times[k]]))  # noqa: E731
    return {"forward": {k: median(k, 0) for k in times},
            "forward_cpu": {k: median(k, 1) for k in times},
            "decode_nms": {s: time_decode_nms(s, device=device) for s in sizes}}


def overheads(fwd: dict, sizes, variants, folds, tag: str) -> dict[str, float]:
    """{"<variant>_overhead_<tag><size>": forward / baseline forward - 1} (asff* -> asff_star)."""
    out = {}
    for folded, fold_tag in ((False, ""), (True, "folded_")):
        if "baseline" not in variants or folded not in folds:
            continue
        for s in sizes:
            for v in (v for v in variants if v != "baseline"):
                ratio = fwd[(folded, s, v)] / fwd[(folded, s, "baseline")] - 1
                out[f"{v.replace('*', '_star')}_overhead_{tag}{fold_tag}{s}"] = round(ratio, 4)
    return out


def speed_report(bench: dict, sizes, variants) -> tuple[str, dict]:
    """A readable table of speed_benchmark's figures, and the JSON summary of the headline ones."""
    fwd, cpu, dn = bench["forward"], bench["forward_cpu"], bench["decode_nms"]
    folds = sorted({k[0] for k in fwd})
    nan = float("nan")
    lines = [f"{'variant':<9}{'size':>5}{'fwd ms':>9}{'cpu ms':>9}{'folded':>9}"
             f"{'f. cpu':>9}{'decode':>8}{'NMS':>7}{'FPS*':>7}{'paper FPS':>10}"]
    summary = {}
    for s in sizes:
        for v in variants:
            total = fwd[(folds[-1], s, v)] + dn[s]["decode_ms"] + dn[s]["nms_ms"]
            paper = PAPER_FPS_608.get(v) if s == 608 else None
            lines.append(f"{v:<9}{s:>5}{fwd[(False, s, v)]:>9.1f}{cpu[(False, s, v)]:>9.1f}"
                         f"{fwd.get((True, s, v), nan):>9.1f}{cpu.get((True, s, v), nan):>9.1f}"
                         f"{dn[s]['decode_ms']:>8.2f}{dn[s]['nms_ms']:>7.2f}{1000 / total:>7.2f}"
                         f"{paper or '-':>10}")
            for folded, tag in ((False, ""), (True, "folded_")):
                if folded in folds:
                    summary[f"forward_{tag}ms_{v}_{s}"] = round(fwd[(folded, s, v)], 2)
        summary[f"decode_nms_ms_{s}"] = round(dn[s]["decode_ms"] + dn[s]["nms_ms"], 3)
        summary[f"decode_nms_cpu_ms_{s}"] = round(dn[s]["decode_cpu_ms"] + dn[s]["nms_cpu_ms"], 3)
        summary[f"decode_nms_candidates_{s}"] = dn[s]["candidates"]
    summary |= overheads(fwd, sizes, variants, folds, "") | overheads(cpu, sizes, variants,
                                                                     folds, "cpu_")
    lines.append("ms per image, medians. fwd: wall time of the eval forward (it includes the "
                 "head's decode); cpu: process CPU time of it; folded: after "
                 "prepare_for_inference (conv+BN folded, NHWC). decode, NMS: "
                 "wall time on realistic_raw() outputs (CPU time in the JSON). FPS* = 1000 "
                 "/ (folded fwd + decode + NMS). paper FPS: V100, Tables 3-4.")
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------
# against: this code against another checkout of it (e.g. an older commit), in one process
# ---------------------------------------------------------------------------------------------
CODE = ("asff", "darknet", "head", "loss", "data", "evaluate", "train")


def import_checkout(folder: str) -> dict:
    """The modules of another checkout of this repository, imported under their own names
    without disturbing ours: {name: module}."""
    ours = {n: sys.modules.pop(n) for n in CODE if n in sys.modules}
    sys.path.insert(0, str(Path(folder).resolve()))
    try:
        return {n: importlib.import_module(n) for n in ("head", "loss")}
    finally:
        sys.path.pop(0)
        for n in CODE:
            sys.modules.pop(n, None)
        sys.modules.update(ours)


def conv_roofline(device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of one large 3x3 convolution (256 -> 256 channels on 104 x 104, NHWC, as
    prepare_for_inference runs ours): what this machine's convolution kernels reach, the ceiling
    for a detector made of such convs."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last)
    x = torch.randn(1, 256, 104, 104, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ms = median_ms(lambda: conv(x), repeats)
    return 2 * 9 * 256 * 256 * 104 * 104 / (ms / 1000) / 1e9


def training_step(head_module, loss_module, fusion, channels_last: bool, size: int, batch: int,
                  width: float = 1.0, depth: float = 1.0):
    """A closure running one SGD step (forward, compute_loss, backward, step) of a Detector of
    `head_module` (full size unless width / depth say otherwise) on random images and boxes."""
    torch.manual_seed(0)
    model = head_module.Detector(80, fusion=fusion, width=width, depth=depth).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    batches = random_batches(2, batch, size, 80)

    def step(k=[0]):  # noqa: B006 - the step counter lives with the closure
        images, targets = batches[k[0] % 2]
        k[0] += 1
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses = loss_module.compute_loss(model(images), targets, model)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def against_benchmark(reference: str, sizes=(416, 608), runs: int = 5, train_size: int = 416,
                      train_batch: int = 2, train_runs: int = 5, width: float = 1.0,
                      depth: float = 1.0) -> tuple[str, dict]:
    """Ours (evaluate.prepare_for_inference; training in NHWC as train.py runs it) against the
    checkout at `reference` as it ran (its plain eval forward; its training step), rounds
    interleaved; FLOPs and the fraction of the measured conv roofline. width / depth below 1
    shrink both sides' models (a quick look; the figures to quote are at full size)."""
    import head
    ref = import_checkout(reference)
    dev = torch.device("cpu")
    models, scale = {}, dict(width=width, depth=depth)
    for name, fusion in (("asff", "asff"), ("baseline", None)):
        torch.manual_seed(0)
        models[("ours", name)] = evaluate.prepare_for_inference(head.Detector(80, fusion=fusion, **scale))
        torch.manual_seed(0)
        models[("ref", name)] = ref["head"].Detector(80, fusion=fusion, **scale).eval()
    flops = {(n, s): head.count_flops(head.Detector(80, fusion=f, **scale), s) / 1e9
             for n, f in (("asff", "asff"), ("baseline", None)) for s in sizes}
    roof = conv_roofline(dev)
    times = {}
    with torch.inference_mode():
        for r in range(runs + 1):
            for s in sizes:
                x = torch.randn(1, 3, s, s)
                for key, model in models.items():
                    ms = timed_ms(partial(model, x), dev)[0]
                    if r:
                        times.setdefault((*key, s), []).append(ms)
    steps = {k: training_step(ref["head"] if k == "ref" else head, ref["loss"] if k == "ref" else loss,
                              "asff", k == "ours", train_size, train_batch, **scale)
             for k in ("ours", "ref")}
    for r in range(train_runs + 1):
        for key, step in steps.items():
            ms = timed_ms(step, dev)[0]
            if r:
                times.setdefault((key, "train", train_size), []).append(ms)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return against_report(med, flops, roof, sizes, train_size, train_batch)


def against_report(med: dict, flops: dict, roof: float, sizes, train_size: int,
                   train_batch: int) -> tuple[str, dict]:
    lines = [f"conv roofline (3x3, 256 ch, 104 x 104, NHWC): {roof:.1f} GFLOP/s",
             f"{'model':<10}{'size':>5}{'ours ms':>9}{'ref ms':>9}{'ratio':>7}{'GFLOPs':>8}"
             f"{'GFLOP/s':>9}{'of roof':>8}"]
    summary = {"roofline_gflops": round(roof, 1)}
    for s in sizes:
        for name in ("asff", "baseline"):
            ours, theirs = med[("ours", name, s)], med[("ref", name, s)]
            rate = flops[(name, s)] / (ours / 1000)
            lines.append(f"{name:<10}{s:>5}{ours:>9.1f}{theirs:>9.1f}{ours / theirs:>7.3f}"
                         f"{flops[(name, s)]:>8.1f}{rate:>9.1f}{rate / roof:>8.1%}")
            summary[f"{name}_ratio_{s}"] = round(ours / theirs, 4)
            summary[f"{name}_roofline_fraction_{s}"] = round(rate / roof, 4)
        summary[f"asff_overhead_{s}"] = round(med[("ours", "asff", s)] / med[("ours", "baseline", s)] - 1, 4)
    ours, theirs = med[("ours", "train", train_size)], med[("ref", "train", train_size)]
    lines.append(f"training step, ASFF, batch {train_batch} at {train_size}: ours {ours:.0f} ms, ref "
                 f"{theirs:.0f} ms, ratio {ours / theirs:.3f}")
    summary["train_step_ratio"] = round(ours / theirs, 4)
    lines.append("ms: medians of interleaved rounds, batch 1, fp32. ours: prepare_for_inference (folded, "
                 "NHWC); ref: the other checkout's plain eval forward, as its evaluation ran it.")
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def run_loss(args, rest) -> dict:
    return loss_benchmark(args.batch, args.size, args.objects)


def run_data(args, rest) -> dict:
    return data_benchmark(args.images, args.batches, args.batch_size, args.size)


def run_train(args, rest) -> dict:
    cfg = train_config(rest)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return train_benchmark(cfg, args.steps, device)


def run_speed(args, rest) -> dict:
    dtype = torch.float16 if args.half else None
    where = (f"device {args.device} ({torch.get_num_threads()} threads)" if args.device == "cpu"
             else f"device {torch.cuda.get_device_name()}")
    print(f"{where}, {'fp16 autocast' if args.half else 'fp32'}, batch {args.speed_batch}, inputs "
          f"{args.speed_sizes}, width {args.width}, depth {args.depth}, median of {args.runs} "
          f"interleaved rounds after {args.warmup} warm-up; ms per image", flush=True)
    timings = speed_benchmark(args.speed_sizes, args.variants, args.device, dtype, args.speed_batch,
                              args.runs, args.warmup, args.width, args.depth, not args.no_fold)
    table, summary = speed_report(timings, args.speed_sizes, args.variants)
    print(table)
    return summary


def run_against(args, rest) -> dict:
    print(f"ours vs {args.reference}, cpu, {torch.get_num_threads()} threads", flush=True)
    table, summary = against_benchmark(args.reference, args.sizes, args.runs, args.train_size,
                                       args.train_batch, args.train_runs, args.width, args.depth)
    print(table)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("    python"):])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("loss", help="compute_loss against the per-object loop reference")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=608)
    p.add_argument("--objects", type=int, default=20, help="objects per image")
    p.set_defaults(run=run_loss)

    p = commands.add_parser("data", help="one DataLoader worker, mixup + augmentation")
    p.add_argument("--images", type=int, default=32, help="640x480 JPEGs written to a temp folder")
    p.add_argument("--batches", type=int, default=25, help="batches timed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=608)
    p.set_defaults(run=run_data)

    about = ("training steps of train.py's model; every other flag is train.py's (python "
             "train.py --help), without its CPU-demo settings: full size unless --width/--depth")
    p = commands.add_parser("train", help=about, description=about, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed")
    p.set_defaults(run=run_train)

    p = commands.add_parser("speed", help="Tables 3-4: forward of each variant, decode + NMS")
    p.add_argument("--speed-sizes", type=int, nargs="+", default=[416, 608])
    p.add_argument("--variants", nargs="+", default=list(SPEED_VARIANTS), choices=list(SPEED_VARIANTS))
    p.add_argument("--runs", type=int, default=5, help="timed rounds per (variant, size)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--speed-batch", type=int, default=1)
    p.add_argument("--no-fold", action="store_true", help="skip the conv+BN folded timings")
    p.add_argument("--half", action="store_true", help="fp16 autocast (GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--depth", type=float, default=1.0)
    p.set_defaults(run=run_speed)

    p = commands.add_parser("against", help="ours against another checkout (inference, training)")
    p.add_argument("reference", help="a checkout of this repository, e.g. `git worktree add "
                   "../ref <commit>`")
    p.add_argument("--sizes", type=int, nargs="+", default=[416, 608])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--train-runs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=416)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of both models")
    p.add_argument("--depth", type=float, default=1.0, help="depth multiplier of both models")
    p.set_defaults(run=run_against)

    for name in ("loss", "speed", "against"):
        commands.choices[name].add_argument(
            "--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a "
                                        "busy machine)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run one benchmark; its table, then its JSON summary as the last line. Returns the summary."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    summary = args.run(args, rest)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
