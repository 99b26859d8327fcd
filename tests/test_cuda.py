"""The CUDA paths: deformable conv, mixed precision, SyncBatchNorm + NCCL DDP, the GPU speed run.

Skipped without a GPU. The suite hides GPUs by default (tests/conftest.py), so on a GPU machine
run this file with them visible:
    ASFF_TEST_CUDA=1 python -m pytest tests/test_cuda.py
Each test compares the GPU against the CPU or against a plain step, never against a figure of
one machine: fp32 within float rounding, bf16 / fp16 within their precision (8 and 11 bits of
mantissa: relative errors near 4e-3 and 5e-4 per operation, accumulated over a 3x3 x C sum).
"""

import contextlib
import io
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

import bench
from head import Detector, deform_conv2d
from loss import compute_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (on a GPU machine: ASFF_TEST_CUDA=1)")
GPU = torch.device("cuda", 0)


def deform_inputs(seed: int = 0, groups: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 13, 17, generator=g)                           # (B, C, H, W)
    offset = 3 * torch.randn(2, 18 * groups, 13, 17, generator=g)         # (B, 2 * 9 * G, H, W)
    weight = torch.randn(24, 32, 3, 3, generator=g) / 10                  # (C_out, C, 3, 3)
    bias = torch.randn(24, generator=g)
    return x, offset, weight, bias, groups


def test_deform_conv_on_cuda_equals_cpu_and_is_close_in_half_precision():
    x, offset, weight, bias, groups = deform_inputs()
    cpu = deform_conv2d(x, offset, weight, bias, groups)                  # (B, 24, H, W)
    moved = [t.to(GPU) for t in (x, offset, weight, bias)]
    gpu = deform_conv2d(*moved, groups)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)      # fp32: rounding only
    scale = cpu.abs().max().item()
    for dtype, rel in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        with torch.autocast("cuda", dtype):
            low = deform_conv2d(*moved, groups).float().cpu()
        assert (low - cpu).abs().max().item() < rel * scale, dtype


def small_model() -> Detector:
    torch.manual_seed(0)
    return Detector(5, fusion="asff", width=0.125, depth=0.33).to(GPU).train()


def boxes(batch: int, size: int) -> list[torch.Tensor]:
    return [t.to(GPU) for _, targets in bench.random_batches(1, batch, size, 5) for t in targets]


def amp_step(model, images, targets, dtype, scaler) -> tuple[float, bool]:
    """One SGD step under autocast(dtype) with the GradScaler as train.py uses it (the loss in
    fp32); returns (loss, whether the weights changed)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype, enabled=dtype is not None):
        outputs = model(images)
    outputs = {s: {k: v if v is None else v.float() for k, v in o.items()} for s, o in outputs.items()}
    losses = compute_loss(outputs, targets, model)
    scaler.scale(losses["total"]).backward()
    scaler.step(optimizer)
    scaler.update()
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return losses["total"].item(), changed


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_a_training_step_under_each_amp_mode_is_finite(dtype):
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = small_model()
    images = torch.randn(2, 3, 128, 128, device=GPU)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    total, changed = amp_step(model, images, boxes(2, 128), dtype, scaler)
    assert torch.isfinite(torch.tensor(total)) and changed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_skips_an_overflowing_step():
    """An fp16 gradient of inf: the scaler leaves the weights as they were and halves its scale."""
    model = small_model()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    images = torch.randn(2, 3, 128, 128, device=GPU)
    hook = model.heads["s8"].pred.weight.register_hook(lambda g: g * float("inf"))
    _, changed = amp_step(model, images, boxes(2, 128), torch.float16, scaler)
    hook.remove()
    assert not changed and scaler.get_scale() == 2.0 ** 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_batchnorm_and_one_rank_nccl_ddp_equal_a_plain_step():
    """world size 1: SyncBatchNorm's statistics are the batch's own and DDP's all-reduce averages
    over one rank, so a step through both equals a plain step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        plain, synced = small_model(), small_model()
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(synced)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[0])
        images, targets = torch.randn(2, 3, 128, 128, device=GPU), boxes(2, 128)
        for model, runner in ((plain, plain), (synced, ddp)):
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            compute_loss(runner(images), targets, model)["total"].backward()
            optimizer.step()
        for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


def test_gpu_speed_run_prints_fps_at_608_in_half_precision():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = bench.main(["speed", "--half", "--device", "cuda", "--speed-sizes", "608",
                              "--runs", "2", "--variants", "baseline", "asff"])
    printed = out.getvalue()
    assert "fp16 autocast" in printed and json.loads(printed.strip().splitlines()[-1]) == summary
    fps = 1000 / (summary["forward_folded_ms_asff_608"] + summary["decode_nms_ms_608"])
    assert fps > 0 and summary["forward_ms_asff_608"] > 0
