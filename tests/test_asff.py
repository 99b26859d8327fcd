"""asff.py: Eq. 1-2 against a float64 per-position loop, Sec. 3.2 resizing, Sec. 3.3 gradients."""

import pytest
import torch
import torch.nn.functional as F

from asff import ASFF, ConvBN, Resize

CHANNELS = {32: 16, 16: 8, 8: 8}          # a small YOLOv3-like pyramid: 512/256/256 scaled down


def pyramid(size=64, batch=2, channels=CHANNELS, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(batch, c, size // s, size // s, generator=g, dtype=dtype)
            for s, c in channels.items()}


def randomize_bn(module, seed=1):
    """Give every BatchNorm non-trivial running statistics so eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return module


@pytest.mark.parametrize("level", [32, 16, 8])
def test_eq2_weights_are_a_softmax_over_levels(level):
    fuser = randomize_bn(ASFF(CHANNELS, level, 32)).eval()
    with torch.no_grad():
        w = fuser.fusion_weights(fuser.resize_all(pyramid()))
    assert w.shape == (2, 3, 64 // level, 64 // level)
    assert w.min() >= 0 and w.max() <= 1
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 64 // level, 64 // level))
    assert w.std() > 1e-3                                  # not a constant 1/3 map


def conv_block_at(block: ConvBN, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 ConvBN applied to one feature vector, in float64, written out."""
    w = block.conv.weight.double()[:, :, 0, 0]
    bn = block.bn
    z = w @ v
    z = (z - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    z = z * bn.weight.double() + bn.bias.double()
    return torch.where(z > 0, z, 0.1 * z)


@pytest.mark.parametrize("level", [32, 16, 8])
def test_asff_equals_float64_per_position_loop(level):
    fuser = randomize_bn(ASFF(CHANNELS, level, 32)).eval()
    with torch.no_grad():
        resized = fuser.resize_all(pyramid())
        y, w = fuser.combine(resized)
    strides = [32, 16, 8]
    B, C, H, W = y.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                x = [r[b, :, i, j].double() for r in resized]
                v = torch.cat([conv_block_at(fuser.weight_branch[f"s{s}"], xn) for s, xn in zip(strides, x)])
                logits = fuser.weight_logits.weight.double()[:, :, 0, 0] @ v \
                    + fuser.weight_logits.bias.double()
                a = torch.exp(logits) / torch.exp(logits).sum()            # Eq. 2
                expect = a[0] * x[0] + a[1] * x[1] + a[2] * x[2]           # Eq. 1
                torch.testing.assert_close(w[b, :, i, j].double(), a, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(y[b, :, i, j].double(), expect, rtol=1e-5, atol=1e-5)


def test_resizing_follows_section_3_2():
    x = pyramid()
    # up-sampling: 1x1 conv to the target channels, then nearest interpolation
    up = randomize_bn(Resize(16, 8, src_stride=32, dst_stride=8)).eval()
    with torch.no_grad():
        expect = F.interpolate(up.proj(x[32]), scale_factor=4, mode="nearest")
        torch.testing.assert_close(up(x[32]), expect)
    assert isinstance(Resize(8, 8, 16, 8).proj, torch.nn.Identity)   # released: no conv s16 -> s8
    # down-sampling by 1/4: stride-2 max-pool, then the 3x3 stride-2 conv
    down = randomize_bn(Resize(8, 16, src_stride=8, dst_stride=32)).eval()
    assert down.proj.conv.kernel_size == (3, 3) and down.proj.conv.stride == (2, 2)
    with torch.no_grad():
        expect = down.proj(F.max_pool2d(x[8], 3, stride=2, padding=1))
        torch.testing.assert_close(down(x[8]), expect)
    # down-sampling by 1/2: the conv alone
    half = Resize(8, 16, src_stride=16, dst_stride=32)
    assert half.n_pools == 0 and half.proj.conv.stride == (2, 2)


def cell_by_cell(z, size, r):
    """Target cell (i, j) <- z[min(i // r, h - 1), min(j // r, w - 1)]: fit_to's rule, one cell at a time."""
    (h, w), (H, W) = z.shape[2:], size
    out = torch.empty(*z.shape[:2], H, W, dtype=z.dtype)
    for i in range(H):
        for j in range(W):
            out[:, :, i, j] = z[:, :, min(i // r, h - 1), min(j // r, w - 1)]
    return out


# (src stride, dst stride, source size, target size): sizes of 100x200 / 801x1201 / 800x1216 inputs
ODD_SIZES = [(32, 8, (4, 7), (13, 25)),       # ceil pyramid (stride-2 convs): 16x28, 3 rows cut
             (32, 8, (3, 6), (12, 25)),       # floor pyramid (n // s): 12x24, last column repeated
             (8, 32, (13, 25), (4, 7)),       # ceil pyramid, down: lands exactly
             (8, 32, (12, 25), (3, 6)),       # floor pyramid, down: 3x7, one column cut
             (16, 32, (50, 75), (26, 38)),    # floor source, ceil target: 25x38, last row repeated
             (128, 8, (7, 10), (100, 152)),   # RetinaNet P7 -> P3 (x16): 112x160 cut
             (8, 128, (101, 151), (7, 10))]   # P3 -> P7: three pools and the conv land exactly


@pytest.mark.parametrize("src,dst,hw,size", ODD_SIZES)
def test_resize_to_any_size_cuts_or_repeats_the_last_rows(src, dst, hw, size):
    block = randomize_bn(Resize(8, 16, src, dst)).eval()
    x = torch.randn(2, 8, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = x
        for _ in range(block.n_pools):
            z = F.max_pool2d(z, 3, stride=2, padding=1)
        z = block.proj(z)                                           # the ratio's own size
        if src < dst:
            assert z.shape[2:] == tuple(-(-n // (dst // src)) for n in hw)   # ceil(n / r)
        expect = cell_by_cell(z, size, max(src // dst, 1))
        assert torch.equal(block(x, size), expect)


def test_resize_rejects_sizes_that_rounding_cannot_explain():
    with pytest.raises(ValueError, match=r"s32->s8 gives 16x16, the target is 30x30"):
        Resize(8, 8, 32, 8)(torch.randn(1, 8, 4, 4), (30, 30))
    with pytest.raises(ValueError, match="not rounding"):
        Resize(8, 8, 8, 32)(torch.randn(1, 8, 16, 16), (6, 6))        # 4x4 is 2 rows off
    assert Resize(8, 8, 8, 32)(torch.randn(1, 8, 16, 16), (5, 3)).shape == (1, 8, 5, 3)
    for src, dst in ((8, 24), (12, 8)):
        with pytest.raises(ValueError, match="power of 2"):
            Resize(8, 8, src, dst)
    with pytest.raises(ValueError, match="level 4"):
        ASFF(CHANNELS, 4, 32)
    with pytest.raises(ValueError, match=r"fuses strides \[32, 16, 8\]; the pyramid has \[16, 8\]"):
        ASFF(CHANNELS, 8, 32)({s: x for s, x in pyramid().items() if s != 32})


def test_eq6_selected_level_blocks_other_gradients_while_sum_passes_all():
    fuser = ASFF(CHANNELS, 16, 32).eval()
    with torch.no_grad():                       # weights select the stride-32 source everywhere
        fuser.weight_logits.weight.zero_()
        fuser.weight_logits.bias.copy_(torch.tensor([60.0, 0.0, 0.0]))
    resized = [r.detach().requires_grad_(True) for r in fuser.resize_all(pyramid())]
    y, _ = fuser.combine(resized)
    y.sum().backward()
    assert torch.allclose(resized[0].grad, torch.ones_like(resized[0]))       # alpha = 1
    assert resized[1].grad.abs().max() < 1e-12 and resized[2].grad.abs().max() < 1e-12   # Eq. 6
    summed = ASFF(CHANNELS, 16, 32, mode="sum")
    resized = [r.detach().requires_grad_(True) for r in summed.resize_all(pyramid())]
    summed.combine(resized)[0].sum().backward()
    for r in resized:                                                         # Eq. 5
        torch.testing.assert_close(r.grad, torch.ones_like(r))


def test_sum_and_concat_share_the_resizing():
    shapes = {}
    for mode in ("asff", "sum", "concat"):
        fuser = ASFF(CHANNELS, 8, 32, mode=mode)
        shapes[mode] = {k: v.shape for k, v in fuser.resize.state_dict().items()}
        assert fuser(pyramid()).shape == (2, 32, 8, 8)
    assert shapes["asff"] == shapes["sum"] == shapes["concat"]
    with pytest.raises(ValueError, match="mode"):
        ASFF(CHANNELS, 8, 32, mode="max")


def test_any_number_of_levels_retinanet_style():
    channels = {8: 8, 16: 8, 32: 8, 64: 8}                   # four equal-width FPN levels
    x = pyramid(size=128, channels=channels)
    for level in channels:
        fuser = ASFF(channels, level, 8).eval()
        with torch.no_grad():
            out = fuser(x)
            w = fuser.fusion_weights(fuser.resize_all(x))
        assert out.shape == (2, 8, 128 // level, 128 // level)
        assert w.shape == (2, 4, 128 // level, 128 // level)
    assert ASFF(channels, 64, 8).resize["s8"].n_pools == 2    # 1/8: two pools then the conv


def test_forward_uses_the_named_weight_function():
    fuser = randomize_bn(ASFF(CHANNELS, 8, 32)).eval()
    x = pyramid()
    with torch.no_grad():
        resized = fuser.resize_all(x)
        w = fuser.fusion_weights(resized)
        expect = fuser.expand(sum(w[:, k:k + 1] * r for k, r in enumerate(resized)))
        torch.testing.assert_close(fuser(x), expect)


def test_export_matches_eager():
    fuser = randomize_bn(ASFF(CHANNELS, 16, 32)).eval()
    exported = torch.export.export(fuser, (pyramid(),)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(pyramid(seed=5)), fuser(pyramid(seed=5)))


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm])
def test_conv_bn_folding_is_exact(norm):
    block = randomize_bn(ConvBN(8, 16, 3, norm=norm)).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        before = block(x)
        block.fuse_bn()
        torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-5)
    assert isinstance(block.bn, torch.nn.Identity)


def test_asff_py_imports_on_python_3_8():
    """No 3.10-only syntax, and annotations (X | None, list[...]) are never evaluated: postponed
    by `from __future__ import annotations`; `|` between types appears only inside annotations."""
    import ast
    from pathlib import Path
    source = (Path(__file__).resolve().parents[1] / "asff.py").read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    assert any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and n.names[0].name == "annotations"
               for n in tree.body)
    annotations = {id(sub) for n in ast.walk(tree) for a in (getattr(n, "annotation", None),
                                                            getattr(n, "returns", None)) if a is not None
                   for sub in ast.walk(a)}
    assert not [ast.unparse(n) for n in ast.walk(tree)
                if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and id(n) not in annotations]
    assert not [n.value.id for n in ast.walk(tree) if isinstance(n, ast.Subscript) and isinstance(
        n.value, ast.Name) and n.value.id in ("list", "dict", "tuple", "type") and id(n) not in annotations]


def test_fuse_gives_forward_and_the_eq2_maps_in_one_pass():
    fuser = randomize_bn(ASFF(CHANNELS, 16, 32)).eval()
    x = pyramid()
    with torch.no_grad():
        y, w = fuser.fuse(x)
        torch.testing.assert_close(fuser.expand(y), fuser(x))
        torch.testing.assert_close(w, fuser.fusion_weights(fuser.resize_all(x)))


def test_detector_folds_sync_batch_norm():
    from head import Detector
    torch.manual_seed(0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        randomize_bn(Detector(3, fusion="asff", width=0.125, depth=0.33))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.features(x)                                # the head inputs, by stride
        model.fuse_conv_bn()
        for s, f in model.features(x).items():
            torch.testing.assert_close(f, before[s], rtol=1e-4, atol=1e-4 * before[s].abs().max().item())
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)) for m in model.modules())
