"""asff.py copied into a second detector (Table 5): a RetinaNet-like FPN with P3-P7 written here,
fused by ASFF at 800 x 1216 and at odd input sizes; the fusers' parameters registered, trained,
cast and saved with the host; GroupNorm + ReLU; Eq. 1-2 against a float64 loop at 5 levels;
and the example in asff.py's docstring, run as a doctest."""

import doctest
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asff
from asff import ASFF, ConvBN
from test_asff import conv_block_at, randomize_bn

STRIDES = (128, 64, 32, 16, 8)                    # P7 .. P3, coarse to fine as in asff.py


def group_norm(c: int) -> nn.Module:
    """mmdetection's GroupNorm of 32 groups (16 for the 16-channel weight branches)."""
    return nn.GroupNorm(min(32, c), c)


class TinyBackbone(nn.Module):
    """C3, C4, C5 (strides 8, 16, 32) from five 3x3 stride-2 convs: ceil(n/2) per step, as ResNet."""

    def __init__(self, widths=(3, 8, 16, 32, 64, 128)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1)
                                    for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        x, c = images, {}
        for k, stage in enumerate(self.stages, start=1):
            x = F.relu(stage(x))                                     # (B, C_k, H/2^k, W/2^k)
            c[2 ** k] = x
        return {s: c[s] for s in (8, 16, 32)}


class RetinaFPN(nn.Module):
    """RetinaNet's neck: 1x1 laterals, top-down sums (nearest to the finer map's own size, as
    mmdetection's FPN does), 3x3 outputs P3-P5, P6 = stride-2 conv on P5, P7 on relu(P6)."""

    def __init__(self, c_in: dict[int, int], width: int):
        super().__init__()
        self.lateral = nn.ModuleDict({f"s{s}": nn.Conv2d(c, width, 1) for s, c in c_in.items()})
        self.output = nn.ModuleDict({f"s{s}": nn.Conv2d(width, width, 3, padding=1) for s in c_in})
        self.p6 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, c: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        lat = {s: self.lateral[f"s{s}"](c[s]) for s in c}           # (B, width, H/s, W/s)
        for s in (16, 8):
            lat[s] = lat[s] + F.interpolate(lat[2 * s], size=lat[s].shape[-2:], mode="nearest")
        p = {s: self.output[f"s{s}"](lat[s]) for s in lat}          # P3, P4, P5
        p[64] = self.p6(p[32])                                       # (B, width, H/64, W/64)
        p[128] = self.p7(F.relu(p[64]))                              # (B, width, H/128, W/128)
        return p


class AsffRetinaNet(nn.Module):
    """Backbone -> FPN -> one ASFF per level (in an nn.ModuleDict) -> a head shared by the levels."""

    def __init__(self, width: int = 256, **asff_args):
        super().__init__()
        self.backbone = TinyBackbone()
        self.fpn = RetinaFPN({8: 32, 16: 64, 32: 128}, width)
        channels = dict.fromkeys(STRIDES, width)
        self.fusion = nn.ModuleDict({f"s{s}": ASFF(channels, s, width, **asff_args) for s in STRIDES})
        self.head = nn.Conv2d(width, 9 * 4, 3, padding=1)            # 9 anchors x 4 box terms

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        p = self.fpn(self.backbone(images))                          # {s: (B, width, H/s, W/s)}
        return {s: self.head(self.fusion[f"s{s}"](p)) for s in STRIDES}   # (B, 36, H/s, W/s)


def ceil_sizes(H: int, W: int) -> dict[int, tuple[int, int]]:
    """What stride-2 convs with padding 1 give: ceil(n / s) at every stride, by hand."""
    return {s: (-(-H // s), -(-W // s)) for s in STRIDES}


def images(H, W, batch=1, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_docstring_example_runs():
    """The example that travels with the file (nn.ModuleDict, 5 levels, odd sizes) is executed."""
    result = doctest.testmod(asff, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
    assert "nn.ModuleDict(" in asff.__doc__


@pytest.mark.parametrize("H,W", [(800, 1216), (801, 1201)])
def test_retinanet_pyramid_shapes_at_800_and_odd_sizes(H, W):
    torch.manual_seed(0)
    model = AsffRetinaNet().eval()
    with torch.no_grad():
        pyramid = model.fpn(model.backbone(images(H, W)))
        fused = {s: model.fusion[f"s{s}"](pyramid) for s in STRIDES}
    expect = ceil_sizes(H, W)                   # 800x1216: 100x152, 50x76, 25x38, 13x19, 7x10
    assert {s: tuple(x.shape[2:]) for s, x in pyramid.items()} == expect
    for s in STRIDES:
        assert fused[s].shape == (1, 256, *expect[s])


def test_every_fuser_is_registered_and_trained():
    torch.manual_seed(0)
    model = AsffRetinaNet(width=64).train()
    fuser_params = list(model.fusion.parameters())
    host = {id(p) for p in model.parameters()}
    assert len(fuser_params) > 0 and all(id(p) in host for p in fuser_params)
    assert sum(p.numel() for p in fuser_params) == sum(
        sum(p.numel() for p in ASFF(dict.fromkeys(STRIDES, 64), s, 64).parameters()) for s in STRIDES)
    out = model(images(97, 129, batch=2))
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out.values())   # not BN-blind
    loss.backward()
    for name, p in model.fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_model_to_float64_casts_the_fusers():
    torch.manual_seed(0)
    model = randomize_bn(AsffRetinaNet(width=32)).eval()
    x = images(97, 129)
    with torch.no_grad():
        out32 = model(x)
        model.to(torch.float64)
        out64 = model(x.double())
    assert all(t.dtype == torch.float64 for t in model.fusion.state_dict().values()
               if t.is_floating_point())
    for s in STRIDES:
        assert out64[s].dtype == torch.float64
        torch.testing.assert_close(out64[s].float(), out32[s], rtol=1e-3, atol=1e-4)


def test_state_dict_round_trip_restores_the_fusers():
    torch.manual_seed(0)
    model = randomize_bn(AsffRetinaNet(width=32)).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "fusion.s8.weight_logits.weight" in state and "fusion.s128.resize.s8.proj.bn.running_var" in state
    torch.manual_seed(1)
    fresh = AsffRetinaNet(width=32).eval()
    fresh.load_state_dict(state)                                  # strict: every key, both ways
    x = images(97, 129)
    with torch.no_grad():
        before, after = model(x), fresh(x)
    for s in STRIDES:
        assert torch.equal(before[s], after[s])


def test_group_norm_and_relu_fusers():
    torch.manual_seed(0)
    model = AsffRetinaNet(width=64, norm=group_norm, act=nn.ReLU).train()
    blocks = [m for m in model.fusion.modules() if isinstance(m, ConvBN)]
    assert blocks and all(isinstance(b.bn, nn.GroupNorm) and isinstance(b.act, nn.ReLU) for b in blocks)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LeakyReLU)) for m in model.fusion.modules())
    x = images(97, 129, batch=2)
    out = model(x)
    alone = model(x[:1])                        # GroupNorm: no statistics shared across images
    for s, size in ceil_sizes(97, 129).items():
        assert out[s].shape == (2, 36, *size)
        torch.testing.assert_close(alone[s][0], out[s][0], rtol=1e-3, atol=1e-4)
    sum(o.square().mean() for o in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    with pytest.raises(ValueError, match="BatchNorm"):
        blocks[0].fuse_bn()


def pyramid_5(H, W, channels, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(batch, c, -(-H // s), -(-W // s), generator=g) for s, c in channels.items()}


@pytest.mark.parametrize("level", STRIDES)
def test_asff_equals_float64_per_position_loop_at_5_levels(level):
    channels = {128: 8, 64: 8, 32: 16, 16: 8, 8: 8}             # 1x1 convs where widths differ
    fuser = randomize_bn(ASFF(channels, level, 16)).eval()
    with torch.no_grad():
        resized = fuser.resize_all(pyramid_5(161, 225, channels))  # s8 21x29 ... s128 2x2
        y, w = fuser.combine(resized)
    assert w.shape == (2, 5, -(-161 // level), -(-225 // level))
    B, _, H, W = y.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                x = [r[b, :, i, j].double() for r in resized]
                v = torch.cat([conv_block_at(fuser.weight_branch[f"s{s}"], xn) for s, xn in zip(STRIDES, x)])
                logits = fuser.weight_logits.weight.double()[:, :, 0, 0] @ v \
                    + fuser.weight_logits.bias.double()
                a = torch.exp(logits) / torch.exp(logits).sum()              # Eq. 2, 5 levels
                expect = sum(a[k] * x[k] for k in range(5))                  # Eq. 1
                torch.testing.assert_close(w[b, :, i, j].double(), a, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(y[b, :, i, j].double(), expect, rtol=1e-5, atol=1e-5)


# --- asff.py as a drop-in (issue 27): wiring errors, linear outputs, dynamic export, overfit ------
def test_wiring_mistakes_answer_in_one_line_naming_what_to_give():
    channels, x = dict.fromkeys((32, 16, 8), 32), pyramid_5(64, 64, dict.fromkeys((32, 16, 8), 32))
    cases = [(TypeError, r"dict \{stride: tensor\}", lambda: ASFF(channels, 8, 32)(list(x.values()))),
             (ValueError, r"give \{stride: tensor\}", lambda: ASFF(channels, 8, 32)(
                 {str(k): v for k, v in x.items()})),
             (TypeError, r"int strides.*'0', '1'", lambda: ASFF({"0": 32, "1": 32}, "0", 32)),
             (TypeError, r"act=nn\.ReLU.*not the module", lambda: ASFF(channels, 8, 32, act=nn.ReLU())),
             (TypeError, r"norm=lambda c: nn\.GroupNorm", lambda: ASFF(channels, 8, 32, norm=nn.GroupNorm)),
             (ValueError, r"weight_channels=16", lambda: ASFF(channels, 8, 32,
                                                              norm=lambda c: nn.GroupNorm(32, c))),
             (ValueError, r"out_channels=32", lambda: ASFF(channels, 8, 64, out_block=False))]
    for error, message, call in cases:
        with pytest.raises(error, match=message) as caught:
            call()
        assert "\n" not in str(caught.value), str(caught.value)


def test_no_submodule_is_called_weight_so_host_init_loops_work():
    """Host code often runs `init(m.weight)` on every module that has one: it must be a tensor."""
    model = AsffRetinaNet(width=16, norm=group_norm, act=nn.ReLU)
    for m in model.modules():
        weight = getattr(m, "weight", None)
        assert weight is None or isinstance(weight, torch.Tensor), type(m)
        if isinstance(weight, torch.Tensor):
            nn.init.normal_(weight, std=0.01)


def test_linear_outputs_leave_the_activation_or_the_block_out():
    channels = dict.fromkeys(STRIDES, 16)
    x = pyramid_5(97, 129, channels)
    linear = ASFF(channels, 16, 16, norm=group_norm, act=nn.ReLU, out_act=False).eval()
    assert isinstance(linear.expand.act, nn.Identity) and isinstance(linear.expand.bn, nn.GroupNorm)
    with torch.no_grad():
        y, w = linear.fuse(x)                                       # the same pass as forward
        out = linear(x)
    torch.testing.assert_close(out, linear.expand(y))
    assert (out < 0).any()                                          # not rectified
    bare = ASFF(channels, 16, 16, out_block=False).eval()
    assert isinstance(bare.expand, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(bare(x), bare.fuse(x)[0])         # y^l itself, Eq. 1
    assert sum(p.numel() for p in bare.parameters()) < sum(p.numel() for p in linear.parameters())


def test_dynamic_size_export_accepts_three_unlike_sizes():
    """torch.export with a dynamic height and width: one program for every size whose P7 has at
    least 2 rows and columns (a size-1 dimension is specialised by torch.export itself)."""
    torch.manual_seed(0)
    model = randomize_bn(AsffRetinaNet(width=16)).eval()
    dims = {2: torch.export.Dim("H", min=129, max=2048), 3: torch.export.Dim("W", min=129, max=2048)}
    program = torch.export.export(model, (images(257, 385),), dynamic_shapes={"images": dims}).module()
    for H, W in ((129, 131), (201, 333), (400, 611)):
        x = images(H, W, seed=H)
        with torch.no_grad():
            got, want = program(x), model(x)
        for s in STRIDES:
            assert got[s].shape == want[s].shape == (1, 36, *ceil_sizes(H, W)[s])
            torch.testing.assert_close(got[s], want[s], rtol=1e-4, atol=1e-5)


class RetinaHead(nn.Module):
    """RetinaNet's head, shared by the levels: two 3x3 conv + ReLU towers (four in RetinaNet), a
    class conv with the prior-0.01 bias and a box conv, those two normal(0.01) as RetinaNet's."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        tower = lambda: nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls, self.box = nn.Conv2d(width, classes, 3, padding=1), nn.Conv2d(width, 4, 3, padding=1)
        for m in (self.cls, self.box):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.constant_(m.bias, -4.595 if m is self.cls else 0.0)       # -log((1 - 0.01) / 0.01)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(self.cls_tower(f)), self.box(self.box_tower(f))    # (B, K, h, w), (B, 4, h, w)


def focal_loss(logits, target, alpha=0.25, gamma=2.0):
    """RetinaNet's sigmoid focal loss, summed."""
    p_t = torch.where(target > 0, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (torch.where(target > 0, alpha, 1 - alpha) * (1 - p_t) ** gamma * ce).sum()


def overfit_fall(seed: int, fusers: dict | None = None, steps: int = 20, classes: int = 4) -> float:
    """1 - last / first loss (focal + L1 over the positives) of `steps` SGD steps on one batch of a
    backbone + FPN + RetinaNet head host; `fusers`: ASFF keywords (GroupNorm, ReLU), None: none."""
    torch.manual_seed(seed)
    backbone, fpn, head = TinyBackbone(), RetinaFPN({8: 32, 16: 64, 32: 128}, 16), RetinaHead(16, classes)
    fusers = None if fusers is None else nn.ModuleDict({f"s{s}": ASFF(
        dict.fromkeys(STRIDES, 16), s, 16, norm=group_norm, act=nn.ReLU, **fusers) for s in STRIDES})
    params = [p for m in (backbone, fpn, head, fusers) if m is not None for p in m.parameters()]
    g = torch.Generator().manual_seed(seed)
    x, targets = images(96, 96, batch=2, seed=seed), {}
    for s, (h, w) in ceil_sizes(96, 96).items():               # ~5% positive cells, a class each
        pos = torch.rand(2, h, w, generator=g) < 0.05
        cls = F.one_hot(torch.randint(classes, (2, h, w), generator=g), classes).permute(0, 3, 1, 2)
        targets[s] = (cls * pos[:, None], pos, torch.randn(2, 4, h, w, generator=g))
    n_pos = max(sum(int(t[1].sum()) for t in targets.values()), 1)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps + 1):
        p = fpn(backbone(x))
        out = {s: head(p[s] if fusers is None else fusers[f"s{s}"](p)) for s in STRIDES}
        total = sum(focal_loss(out[s][0], t.float()) + (out[s][1] - box).abs().permute(0, 2, 3, 1)[pos].sum()
                    for s, (t, pos, box) in targets.items()) / n_pos
        losses.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return 1 - losses[-1] / losses[0]


def test_linear_output_fusers_do_not_hurt_the_overfit():
    """Issue 27: 20 SGD steps on one batch of this RetinaNet-like host. Measured, seeds 0-4, 1 and 2
    threads alike: the loss falls 1.4-6.2% without fusers, 9.4-23.7% with the paper's fusers,
    19.7-34.9% with out_act=False, 1.3-6.0% with out_block=False. Bound: the linear-output fusers
    keep at least half the host's own fall (measured: 5-15x it), and the loss falls."""
    plain, linear = overfit_fall(0), overfit_fall(0, {"out_act": False})
    assert plain > 0 and linear >= 0.5 * plain, (plain, linear)
