"""The CUDA paths: the deformable conv and its custom backward, the whole detector in bf16 / fp16,
AMP steps with the GradScaler, SyncBatchNorm's synchronised kernels in a 2-process DDP step.

tests/gpu_check.sh runs this file on a GPU machine with the GPUs visible (the suite hides them,
tests/conftest.py; by hand: ASFF_TEST_CUDA=1 python -m pytest tests/test_cuda.py). Without a GPU
every test skips but the first, which checks that gpu_check.sh refuses to run. Each comparison
is against the CPU, float64 or a plain step, with a bound derived from the precision in use, never
against a figure of one machine.
"""

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bench
import train
from head import Detector, deform_conv2d
from loss import compute_loss

REPO = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device (on a GPU machine: bash tests/gpu_check.sh)")
GPU = torch.device("cuda", 0)
TF32_UNIT = 2.0 ** -11        # TF32 keeps 10 mantissa bits: each operand rounded within 2^-11


def test_gpu_check_refuses_without_a_gpu():
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "tests/gpu_check.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == "", (done.returncode, done.stdout)
    assert len(done.stderr.strip().splitlines()) == 1 and "no GPU is visible" in done.stderr


def deform_inputs(seed: int = 0, groups: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 13, 17, generator=g, dtype=dtype)                 # (B, C, H, W)
    offset = 3 * torch.randn(2, 18 * groups, 13, 17, generator=g, dtype=dtype)   # (B, 2*9*G, H, W)
    weight = torch.randn(24, 32, 3, 3, generator=g, dtype=dtype) / 10        # (C_out, C, 3, 3)
    bias = torch.randn(24, generator=g, dtype=dtype)
    return x, offset, weight, bias, groups


@needs_gpu
def test_deform_conv_on_cuda_equals_cpu_within_tf32_and_half_precision():
    """fp32 on the GPU may run its 1x1 conv in TF32 (Ampere and later): each product's operands are
    rounded within 2^-11, so |gpu - cpu| <= 2 * 2^-11 * sum |x_k w_k| (the same sum over |x|, |w|)."""
    x, offset, weight, bias, groups = deform_inputs()
    cpu = deform_conv2d(x, offset, weight, bias, groups)                     # (B, 24, H, W)
    magnitude = deform_conv2d(x.abs(), offset, weight.abs(), None, groups)   # sum |x_k| |w_k|
    moved = [t.to(GPU) for t in (x, offset, weight, bias)]
    gpu = deform_conv2d(*moved, groups).cpu()
    assert ((gpu - cpu).abs() <= 2 * TF32_UNIT * magnitude + 1e-5).all()
    for dtype, unit in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        with torch.autocast("cuda", dtype):                                  # the gather stays fp32
            low = deform_conv2d(*moved, groups).float().cpu()
        assert ((low - cpu).abs() <= 3 * unit * magnitude + 3 * unit * cpu.abs() + 1e-4).all(), dtype


@needs_gpu
def test_deform_conv_custom_backward_on_cuda_against_float64_autograd():
    """GatherCorners' backward (a gather of the row-sorted samples) against numerical gradients."""
    x, offset, weight, bias, groups = (t.to(GPU) if torch.is_tensor(t) else t for t in
                                       deform_inputs(1, groups=2, dtype=torch.float64))
    x, offset, weight = x[:1, :8, :5, :6], offset[:1, :36, :5, :6] / 3, weight[:4, :8]
    inputs = [t.clone().requires_grad_() for t in (x, offset, weight, bias[:4])]
    assert torch.autograd.gradcheck(lambda *t: deform_conv2d(*t, 2), inputs, atol=1e-6, rtol=1e-4)


def small_model(width: float = 0.125) -> Detector:
    torch.manual_seed(0)
    return Detector(5, fusion="asff", width=width, depth=0.33).to(GPU, memory_format=torch.channels_last)


@needs_gpu
@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_whole_detector_in_half_precision_is_close_to_fp32(dtype, unit):
    """Channels-last forward at 256 (BatchNorm with its statistics): the raw head outputs of bf16 /
    fp16 autocast against fp32 without TF32, within one rounding at `unit` per layer of the ~75 on
    the deepest path, added up (75 * unit: 0.29 for bf16, 0.037 for fp16, relative, in norm)."""
    if dtype is torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 convolutions need compute capability 8.0")
    model = small_model(0.25).train()
    for m in model.modules():                          # train-mode outputs, eval-mode statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 256, 256, device=GPU).contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            full = model(x)
            with torch.autocast("cuda", dtype):
                low = model(x)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    for s in (32, 16, 8):
        a, b = full[s]["pred"].float(), low[s]["pred"].float()           # (B, S, 5+C, h, w)
        assert ((a - b).norm() / a.norm()).item() < 75 * unit, (s, dtype)


def boxes(batch: int, size: int) -> list[torch.Tensor]:
    return [t.to(GPU) for _, targets in bench.random_batches(1, batch, size, 5) for t in targets]


def amp_steps(model, dtype, scaler, steps: int) -> list[bool]:
    """`steps` SGD steps of train.py's train_step under autocast(dtype); whether each moved the weights."""
    cfg = train.Config(batch_size=2, channels_last=True, clip_grad=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    parts = train.Parts(model, model, optimizer, scaler, dtype, GPU)
    batches, moved = iter(bench.random_batches(steps, 2, 128, 5)), []
    for it in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        train.train_step(parts, batches, cfg, it, 128, 1e-3)
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return moved


@needs_gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_training_steps_under_each_amp_mode_stay_finite(dtype):
    if dtype is torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 convolutions need compute capability 8.0")
    model = small_model()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    moved = amp_steps(model, dtype, scaler, 6)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    if dtype is torch.float16:   # an overflowing step is skipped and halves the scale; others move
        skipped = moved.count(False)
        assert scaler.get_scale() == 2.0 ** (16 - skipped) and skipped < len(moved), moved
    else:
        assert all(moved)


@needs_gpu
def test_a_training_step_waits_for_the_gpu_once():
    """set_sync_debug_mode("warn") warns at each call that makes the host wait for the GPU: a step in
    bf16 (fp32 below compute capability 8.0) waits once, to read its report (the progress line, the
    non-finite check); the batch arrives pinned, as train.py's DataLoader gives it."""
    bf16 = torch.cuda.get_device_capability() >= (8, 0)
    cfg = train.Config(**train.DEMO | {"amp": "bf16" if bf16 else "none", "batch_size": 4})
    parts = train.build_parts(cfg, 5, None, 1, GPU)
    batches = iter([(images.pin_memory(), [t.pin_memory() for t in targets])
                    for images, targets in bench.random_batches(3, 4, 192, 5)])
    train.train_step(parts, batches, cfg, 0, 128, 1e-4)          # cuDNN's choices, the allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.train_step(parts, batches, cfg, 1, 160, 1e-4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in said if "synchroniz" in str(w.message).lower()]
    assert len(waits) == 1, waits


def ddp_rank(rank: int, world: int, init: str, images, targets, out: str) -> None:
    """One rank of a 2-process step on the same GPU: SyncBatchNorm (gloo), half the batch each."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(small_model())
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
    half = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    compute_loss(ddp(images[half].to(GPU)), [t.to(GPU) for t in targets[half]], model)["total"].backward()
    optimizer.step()
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


@needs_gpu
def test_two_process_syncbn_step_equals_one_process_on_the_whole_batch(tmp_path):
    """SyncBatchNorm's statistics over both halves are the whole batch's, and DDP's average of the
    per-half losses (each / B/2) is the whole batch's loss / B: one step gives the same weights."""
    torch.manual_seed(1)
    images, targets = torch.randn(4, 3, 128, 128), [t.cpu() for t in boxes(4, 128)]
    mp.spawn(ddp_rank, (2, f"file://{tmp_path / 'init'}", images, targets, str(tmp_path / "w.pt")), nprocs=2)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    compute_loss(model(images.to(GPU)), [t.to(GPU) for t in targets], model)["total"].backward()
    optimizer.step()
    synced = torch.load(tmp_path / "w.pt", weights_only=True)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(synced[name], value.cpu(), rtol=1e-3, atol=1e-4, msg=name)
