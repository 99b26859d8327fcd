"""Adaptively spatial feature fusion (ASFF) - paper Sec. 3.2, Eq. 1-2, and Table 3's alternatives.

Each pyramid level n is resized to the shape of x^l (Sec. 3.2), then the maps x^(n->l) fused:

    Eq. 1:  y^l_ij = alpha^l_ij * x^(1->l)_ij + beta^l_ij * x^(2->l)_ij + gamma^l_ij * x^(3->l)_ij
    Eq. 2:  alpha^l_ij = exp(la) / (exp(la) + exp(lb) + exp(lc))      (softmax over the levels)

so alpha + beta + gamma = 1 per position, shared by all channels; la, lb, lc: 1x1 convs.

Level naming: the paper's levels 1, 2, 3 run coarse to fine, strides 32, 16, 8 (the authors' code
indexes stride 32 as 0); here a pyramid is a dict {stride: tensor}, the weights run coarse to fine.

Public entry points (this file needs only torch, and imports on Python 3.8+, so it can be copied):
    ConvBN(c_in, c_out, k, stride=1, *, norm, act)    conv (no bias) + norm + act, fuse_bn()
    Resize(c_in, c_out, src_stride, dst_stride, *, norm, act)
        forward(x, size=None): x^(n->l), (B, c_in, H/src, W/src) -> (B, c_out, *size)
    ASFF(channels, level, out_channels, weight_channels=16, mode="asff", *, norm, act,
         out_act=True, out_block=True)
        forward({stride: (B, C_s, H/s, W/s)}) -> (B, out_channels, H/level, W/level)
        fuse(pyramid) -> (y^l, weights (B, L, H/level, W/level)): forward = expand(y^l)
        fusion_weights(resized) -> Eq. 2, the maps of Figure 3; combine(resized) -> Eq. 1
    mode "sum" / "concat": Table 3's baselines, sharing the resizing, combined differently.
    norm(channels) and act() build each block's norm and activation: by default YOLOv3's
    BatchNorm and LeakyReLU(0.1) under the released key names (the norm is `bn` whatever it is);
    e.g. norm=lambda c: nn.GroupNorm(min(32, c), c), act=nn.ReLU for an mmdetection RetinaNet.

Any pyramid, any input size: each source is brought to the exact size of the pyramid's own
stride-`level` map (Resize.fit_to), e.g. RetinaNet's P3-P7 (Table 5) of an 800 x 1216 input.
The fusers go in an nn.ModuleDict, which registers them with the host (a plain dict hides them
from .parameters(), .to() and state_dict(): never trained or saved):

    >>> import torch
    >>> from asff import ASFF
    >>> channels = {128: 256, 64: 256, 32: 256, 16: 256, 8: 256}            # P7 .. P3 of an FPN
    >>> fusers = torch.nn.ModuleDict({f"s{s}": ASFF(channels, s, 256) for s in channels})
    >>> pyramid = {s: torch.randn(1, 256, -(-201 // s), -(-301 // s)) for s in channels}  # ceil
    >>> [tuple(fusers[f"s{s}"](pyramid).shape[1:]) for s in channels]      # those of the inputs
    [(256, 2, 3), (256, 4, 5), (256, 7, 10), (256, 13, 19), (256, 26, 38)]

Departures from the authors' code: one module parametrised by the channel dict, not a class per
level; any number of levels (down by 2^k: k-1 max-pools, one stride-2 conv; up: one nearest
interpolation); any map sizes (released: multiples of 32, where fit_to returns the map as it is).
"""

from __future__ import annotations

from functools import partial
from typing import Callable  # noqa: UP035 (aliases below run: Python 3.8 has no abc.Callable[...])

import torch
import torch.nn.functional as F
from torch import nn

leaky_relu = partial(nn.LeakyReLU, 0.1)   # DarkNet's activation, LeakyReLU(0.1): the default `act`
tracing = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # export (torch >= 2.3)
Norm = Callable[[int], nn.Module]    # norm(channels) -> module, e.g. nn.BatchNorm2d
Act = Callable[[], nn.Module]        # act() -> module, e.g. nn.ReLU
GROUP_NORM = "norm=lambda c: nn.GroupNorm(min(32, c), c)"


class ConvBN(nn.Module):
    """The conv block used everywhere in DarkNet/YOLOv3: conv (no bias), norm, activation (None: none)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, *,
                 norm: Norm = nn.BatchNorm2d, act: Act | None = leaky_relu):
        super().__init__()
        if isinstance(norm, nn.Module) or isinstance(act, nn.Module):
            raise TypeError(f"norm and act build one module per block: give a class or function "
                            f"(act=nn.ReLU, norm=nn.BatchNorm2d), not the module "
                            f"{norm if isinstance(norm, nn.Module) else act}")
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2, bias=False)
        try:
            self.bn = norm(c_out)              # named `bn` for the released key names
        except TypeError as e:                 # e.g. norm=nn.GroupNorm, which wants num_groups first
            raise TypeError(f"norm is called as norm(channels); norm({c_out}) failed ({e}): for "
                            f"GroupNorm give {GROUP_NORM}") from None
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_bn(self) -> None:
        """Fold a BatchNorm or SyncBatchNorm: w' = w g / sqrt(v + eps), b' = beta - m g / sqrt(v + eps)."""
        if not isinstance(self.bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or self.bn.running_var is None:
            raise ValueError(f"fuse_bn folds a BatchNorm with running statistics, not {self.bn}")
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)  # (c_out,)
        fused = nn.utils.skip_init(nn.Conv2d, self.conv.in_channels, self.conv.out_channels,  # no
                                   self.conv.kernel_size, self.conv.stride, self.conv.padding,  # RNG
                                   device=self.conv.weight.device).to(self.conv.weight)
        fused.weight.copy_(self.conv.weight * scale[:, None, None, None])
        fused.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv, self.bn = fused, nn.Identity()


class Resize(nn.Module):
    """x^(n->l): bring a map of stride `src_stride`, `c_in` channels to `dst_stride`, `c_out`.

    Sec. 3.2: up-sampling = 1x1 conv to the target channels (none where they agree, as the
    released s16 -> s8 path), then nearest interpolation; down-sampling by 1/2 = a 3x3 stride-2
    conv; by 1/4 = a stride-2 max-pool first (by 1/2^k: k-1). Strides a power of 2 apart."""

    def __init__(self, c_in: int, c_out: int, src_stride: int, dst_stride: int, *,
                 norm: Norm = nn.BatchNorm2d, act: Act = leaky_relu):
        super().__init__()
        ratio = max(src_stride, dst_stride) // min(src_stride, dst_stride)
        if max(src_stride, dst_stride) % min(src_stride, dst_stride) or ratio & (ratio - 1):
            raise ValueError(f"Resize needs strides a power of 2 apart, got {src_stride} and {dst_stride}")
        self.src_stride, self.dst_stride = src_stride, dst_stride
        self.up, self.n_pools = (ratio if src_stride > dst_stride else 1), 0
        if src_stride < dst_stride:            # finer source: pools, then one stride-2 conv
            self.n_pools = ratio.bit_length() - 2
            self.proj = ConvBN(c_in, c_out, 3, stride=2, norm=norm, act=act)
        else:                                  # coarser (or same) source: a 1x1 conv if channels differ
            self.proj = ConvBN(c_in, c_out, 1, norm=norm, act=act) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, c_in, h, w) -> (B, c_out, *size); without `size`, the ratio's own size (see fit_to)."""
        for _ in range(self.n_pools):
            x = F.max_pool2d(x, 3, stride=2, padding=1)                  # (B, c_in, h/2, w/2)
        x = self.proj(x)                                                 # (B, c_out, h', w')
        if self.up > 1:
            x = F.interpolate(x, scale_factor=self.up, mode="nearest")   # (B, c_out, h*up, w*up)
        return x if size is None else self.fit_to(x, size)              # (B, c_out, *size)

    def fit_to(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Cut off, or repeat, the last rows / columns of x (B, C, h, w) to make it (B, C, *size).
        Rule: the stride-2 ops above round up, ceil(n/2), as DarkNet, ResNet and FPN's P6/P7 do;
        down-sampling then lands on the target and up-sampling by r overshoots by up to r-1 rows
        (cut). Pyramids that round down (n // 2) get one row too many down (cut) and up to r-1 too
        few up (the last repeated). Cell (i, j) at stride s stays on cell (i // r, j // r) at r*s."""
        (h, w), (H, W) = x.shape[-2:], size    # traced (export): no shortcut, no check, no guards
        if not tracing() and (h, w) == (H, W):
            return x                           # exact multiples: the released computation
        if not tracing() and max(abs(h - H), abs(w - W)) > self.up:
            raise ValueError(f"Resize s{self.src_stride}->s{self.dst_stride} gives {h}x{w}, the target is "
                             f"{H}x{W}: not rounding; are the pyramid's keys its strides?")
        rows = torch.arange(H, device=x.device).clamp(max=h - 1)        # (H,) i -> min(i, h-1)
        cols = torch.arange(W, device=x.device).clamp(max=w - 1)        # (W,)
        return x[:, :, rows][:, :, :, cols]                              # (B, C, H, W)


class ASFF(nn.Module):
    """Fuse all pyramid levels into the level of stride `level` (Eq. 1-2), or sum / concat them.

    channels: {stride: channels} of the input pyramid, e.g. {32: 512, 16: 256, 8: 256}.
    The fused map has channels[level] channels (the released `inter_dim`); a 3x3 conv block
    (`expand`, as released) then gives `out_channels` for the detection head.
    weight_channels: channels of each level's 1x1 weight branch (16 released; 8 with RFB).
    norm, act: passed to every conv block (see ConvBN).
    out_act=False leaves the activation out of that last block, out_block=False the whole block
    (then out_channels must be channels[level]): for hosts whose heads were built for an FPN's
    linear outputs (RetinaNet, FCOS), which then get features of the same kind. Defaults: the paper.
    """

    def __init__(self, channels: dict[int, int], level: int, out_channels: int,
                 weight_channels: int = 16, mode: str = "asff", *, norm: Norm = nn.BatchNorm2d,
                 act: Act = leaky_relu, out_act: bool = True, out_block: bool = True):
        super().__init__()
        check_wiring(channels, level, out_channels, mode, out_block)
        self.mode, self.level, self.strides = mode, level, sorted(channels, reverse=True)  # coarse to fine
        inter, n = channels[level], len(channels)
        self.resize = nn.ModuleDict({f"s{s}": Resize(channels[s], inter, s, level, norm=norm, act=act)
                                     for s in self.strides})
        if mode == "asff":
            try:
                self.weight_branch = nn.ModuleDict({f"s{s}": ConvBN(inter, weight_channels, 1, norm=norm,
                                                                    act=act) for s in self.strides})
            except ValueError as e:            # e.g. GroupNorm(32, c) on 16 channels
                raise ValueError(f"ASFF weight_channels={weight_channels}: the weight branches' norm fails "
                                 f"({e}); give another weight_channels or {GROUP_NORM}") from None
            self.weight_logits = nn.Conv2d(weight_channels * n, n, 1)   # la, lb, lc of Eq. 2
        elif mode == "concat":
            self.squeeze = ConvBN(inter * n, inter, 1, norm=norm, act=act)
        self.expand = (ConvBN(inter, out_channels, 3, norm=norm, act=act if out_act else None)
                       if out_block else nn.Identity())

    def resize_all(self, pyramid: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """[x^(n->l) for n coarse to fine], each (B, inter, H/level, W/level) as pyramid[level]."""
        if not isinstance(pyramid, dict):
            raise TypeError(f"ASFF takes the pyramid as a dict {{stride: tensor}}, e.g. "
                            f"{{32: c5, 16: c4, 8: c3}}, not a {type(pyramid).__name__}")
        if any(s not in pyramid for s in self.strides):
            raise ValueError(f"ASFF-s{self.level} fuses strides {self.strides}; the pyramid has "
                             f"{list(pyramid)}: give {{stride: tensor}}")
        size = tuple(pyramid[self.level].shape[-2:])            # (H/level, W/level), the host's
        return [self.resize[f"s{s}"](pyramid[s], size) for s in self.strides]

    def fusion_weights(self, resized: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 2: per-position softmax over the levels -> (B, L, H/level, W/level), sums to 1."""
        per_level = [self.weight_branch[f"s{s}"](x) for s, x in zip(self.strides, resized)]
        logits = self.weight_logits(torch.cat(per_level, dim=1))       # (B, L, h, w)
        return torch.softmax(logits, dim=1)                            # (B, L, h, w)

    def combine(self, resized: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused map y^l (B, inter, h, w) of the resized maps and, for ASFF, its weights (B, L, h, w)."""
        if self.mode == "sum":
            return torch.stack(resized).sum(dim=0), None                # Table 3 "sum"
        if self.mode == "concat":
            return self.squeeze(torch.cat(resized, dim=1)), None        # Table 3 "concat"
        w = self.fusion_weights(resized)                                # (B, L, h, w)
        y = sum(w[:, k:k + 1] * x for k, x in enumerate(resized))       # Eq. 1: (B, inter, h, w)
        return y, w

    def fuse(self, pyramid: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y^l, Eq. 2 weights or None) of a pyramid: forward is expand(y^l); a host that wants the
        maps too calls `y, w = fuser.fuse(pyramid); out = fuser.expand(y)` (one pass)."""
        return self.combine(self.resize_all(pyramid))

    def forward(self, pyramid: dict[int, torch.Tensor]) -> torch.Tensor:
        y, _ = self.fuse(pyramid)                                       # (B, inter, h, w)
        return self.expand(y)                                           # (B, out_channels, h, w)


def check_wiring(channels: dict[int, int], level: int, out_channels: int, mode: str,
                 out_block: bool) -> None:
    """One-line errors, naming what to give, for the usual ways of wiring ASFF into a host wrongly."""
    if mode not in ("asff", "sum", "concat"):
        raise ValueError(f"ASFF mode must be 'asff', 'sum' or 'concat', got {mode!r}")
    if not isinstance(channels, dict) or not all(isinstance(s, int) for s in channels):
        raise TypeError(f"ASFF channels must be {{stride: channels}}, int strides, e.g. {{32: 256, 16: 256, "
                        f"8: 256}}, got {channels!r} (key torchvision FPN's '0', '1', ... by stride)")
    if level not in channels:
        raise ValueError(f"ASFF level {level} is not a stride of the pyramid {sorted(channels)}")
    if not out_block and out_channels != channels[level]:
        raise ValueError(f"ASFF out_block=False returns the fused map of channels[{level}] = "
                         f"{channels[level]} channels: give out_channels={channels[level]}")


def _demo() -> None:
    torch.manual_seed(0)
    yolo = {32: 512, 16: 256, 8: 256}                            # the YOLOv3 pyramid of Sec. 3.1
    retina = dict.fromkeys((128, 64, 32, 16, 8), 256)            # RetinaNet's P7 .. P3 (Table 5)
    for channels, outs, (H, W) in ((yolo, {32: 1024, 16: 512, 8: 256}, (416, 416)),
                                   (retina, retina, (401, 601))):
        pyramid = {s: torch.randn(1, c, -(-H // s), -(-W // s)) for s, c in channels.items()}  # ceil
        print(f"pyramid of a {H}x{W} input:", {s: tuple(x.shape) for s, x in pyramid.items()})
        for level, out in outs.items():
            fuser = ASFF(channels, level, out).eval()
            with torch.no_grad():
                y, w = fuser.fuse(pyramid)                       # then expand(y) = fuser(pyramid)
            print(f"ASFF-s{level}: fused {tuple(y.shape[1:])}, weights {tuple(w.shape)} (sum "
                  f"{w.sum(1).mean():.3f}) -> out {tuple(fuser.expand(y).shape)}, "
                  f"{sum(p.numel() for p in fuser.parameters()):,} params")
    print(", ".join(f"{m}-s8: {sum(p.numel() for p in ASFF(yolo, 8, 256, mode=m).parameters()):,} "
                    "params" for m in ("sum", "concat")))


if __name__ == "__main__":
    _demo()
