"""Adaptively spatial feature fusion (ASFF) - paper Sec. 3.2, Eq. 1-2, and Table 3's alternatives.

For every output level l, every pyramid level n is first resized to the shape of x^l (Sec. 3.2,
"Feature resizing"), then the resized maps x^(n->l) are fused:

    Eq. 1:  y^l_ij = alpha^l_ij * x^(1->l)_ij + beta^l_ij * x^(2->l)_ij + gamma^l_ij * x^(3->l)_ij
    Eq. 2:  alpha^l_ij = exp(la) / (exp(la) + exp(lb) + exp(lc))      (softmax over the levels)

so alpha + beta + gamma = 1 at each position, and each weight is one scalar per position shared
by all channels. `la, lb, lc` come from 1x1 convs on the resized maps.

Level naming. The paper numbers the levels coarse to fine (level 1 = stride 32, level 2 = stride
16, level 3 = stride 8); the authors' code indexes stride 32 as level 0. Here levels are named by
their stride only: a feature pyramid is a dict {stride: tensor}, and the fusion weights are
ordered from the coarsest level to the finest (channel 0 weights the stride-32 source).

Public entry points (this file imports only torch, so it can be copied into another project):
    ConvBN(c_in, c_out, k, stride=1)              conv (no bias) + BatchNorm + LeakyReLU(0.1)
    Resize(c_in, c_out, src_stride, dst_stride)    x^(n->l): (B, c_in, H_n, W_n) -> (B, c_out, H_l, W_l)
    ASFF(channels, level, out_channels, weight_channels=16, mode="asff")
        forward({stride: (B, C_s, H/s, W/s)}) -> (B, out_channels, H/level, W/level)
        fusion_weights(resized) -> (B, L, H/level, W/level)  Eq. 2, the maps of Figure 3
    mode "sum" and "concat" are Table 3's element-wise sum and concatenation baselines; they
    share the resizing code and differ only in how the resized maps are combined.

Drop it onto another detector's three levels (e.g. RetinaNet's 256-channel P3-P5, Table 5):

    channels = {32: 256, 16: 256, 8: 256}
    fusers = {s: ASFF(channels, level=s, out_channels=256) for s in channels}
    fused = {s: fusers[s](pyramid) for s in channels}      # pyramid = {8: p3, 16: p4, 32: p5}

Where this departs from the authors' code: one module parametrised by the channel dict instead of
a hand-written class per level; any number of levels (down-sampling by 2^k uses k-1 max-pools
then one stride-2 conv, which is the paper's rule for 1/2 and 1/4). The resizing is exactly the
released one: up-sampling uses a 1x1 conv block only where the channel counts differ (the
released stride-16 -> stride-8 path has no conv), then nearest interpolation.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    """The conv block used everywhere in DarkNet/YOLOv3: conv (no bias), BatchNorm, LeakyReLU(0.1)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_bn(self) -> None:
        """Fold BatchNorm into the conv for inference.

        w' = w * g / sqrt(v + eps),  b' = beta - m * g / sqrt(v + eps)  (g, beta, m, v of the BN).
        """
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)  # (c_out,)
        fused = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
                          self.conv.stride, self.conv.padding, bias=True).to(self.conv.weight)
        fused.weight.copy_(self.conv.weight * scale[:, None, None, None])
        fused.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv, self.bn = fused, nn.Identity()


class Resize(nn.Module):
    """x^(n->l): bring a map of stride `src` and `c_in` channels to stride `dst` and `c_out` channels.

    Sec. 3.2: up-sampling = 1x1 conv to the target channels, then interpolation (nearest, as
    released); down-sampling by 1/2 = a 3x3 stride-2 conv; by 1/4 = a stride-2 max-pool first.
    """

    def __init__(self, c_in: int, c_out: int, src: int, dst: int):
        super().__init__()
        self.up = src // dst if src > dst else 1
        self.n_pools = 0
        if src < dst:                          # finer source: pools, then one stride-2 conv
            self.n_pools = (dst // src).bit_length() - 2
            self.proj = ConvBN(c_in, c_out, 3, stride=2)
        elif c_in != c_out:                    # coarser (or same) source with other channels
            self.proj = ConvBN(c_in, c_out, 1)
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_pools):
            x = F.max_pool2d(x, 3, stride=2, padding=1)                  # (B, c_in, H/2, W/2)
        x = self.proj(x)                                                 # (B, c_out, h, w)
        if self.up > 1:
            x = F.interpolate(x, scale_factor=self.up, mode="nearest")   # (B, c_out, H*up, W*up)
        return x


class ASFF(nn.Module):
    """Fuse all pyramid levels into the level of stride `level` (Eq. 1-2), or sum / concat them.

    channels: {stride: channels} of the input pyramid, e.g. {32: 512, 16: 256, 8: 256}.
    The fused map has channels[level] channels (the released `inter_dim`); a 3x3 conv block
    (`expand`, as released) then gives `out_channels` for the detection head.
    weight_channels: channels of each level's 1x1 weight branch (16 released; 8 with RFB).
    """

    def __init__(self, channels: dict[int, int], level: int, out_channels: int,
                 weight_channels: int = 16, mode: str = "asff"):
        super().__init__()
        if mode not in ("asff", "sum", "concat"):
            raise ValueError(f"ASFF mode must be 'asff', 'sum' or 'concat', got {mode!r}")
        self.mode, self.level = mode, level
        self.strides = sorted(channels, reverse=True)          # coarse to fine: paper order
        inter = channels[level]
        self.resize = nn.ModuleDict(
            {f"s{s}": Resize(channels[s], inter, s, level) for s in self.strides})
        n = len(self.strides)
        if mode == "asff":
            self.weight = nn.ModuleDict(
                {f"s{s}": ConvBN(inter, weight_channels, 1) for s in self.strides})
            self.weight_logits = nn.Conv2d(weight_channels * n, n, 1)   # la, lb, lc of Eq. 2
        elif mode == "concat":
            self.squeeze = ConvBN(inter * n, inter, 1)
        self.expand = ConvBN(inter, out_channels, 3)

    def resize_all(self, pyramid: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """[x^(n->l) for n coarse to fine], each (B, inter, H/level, W/level)."""
        return [self.resize[f"s{s}"](pyramid[s]) for s in self.strides]

    def fusion_weights(self, resized: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 2: per-position softmax over the levels -> (B, L, H/level, W/level), sums to 1."""
        per_level = [self.weight[f"s{s}"](x) for s, x in zip(self.strides, resized)]
        logits = self.weight_logits(torch.cat(per_level, dim=1))       # (B, L, h, w)
        return torch.softmax(logits, dim=1)                            # (B, L, h, w)

    def fuse(self, resized: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused map y^l (B, inter, h, w) and, for ASFF, its weights (B, L, h, w)."""
        if self.mode == "sum":
            return torch.stack(resized).sum(dim=0), None                # Table 3 "sum"
        if self.mode == "concat":
            return self.squeeze(torch.cat(resized, dim=1)), None        # Table 3 "concat"
        w = self.fusion_weights(resized)                                # (B, L, h, w)
        y = sum(w[:, k:k + 1] * x for k, x in enumerate(resized))       # Eq. 1: (B, inter, h, w)
        return y, w

    def forward(self, pyramid: dict[int, torch.Tensor]) -> torch.Tensor:
        y, _ = self.fuse(self.resize_all(pyramid))                      # (B, inter, h, w)
        return self.expand(y)                                           # (B, out_channels, h, w)


def _demo() -> None:
    torch.manual_seed(0)
    channels = {32: 512, 16: 256, 8: 256}                    # the YOLOv3 pyramid of Sec. 3.1
    pyramid = {s: torch.randn(1, c, 416 // s, 416 // s) for s, c in channels.items()}
    print("input pyramid:", {s: tuple(x.shape) for s, x in pyramid.items()})
    for level, out in ((32, 1024), (16, 512), (8, 256)):
        fuser = ASFF(channels, level, out).eval()
        with torch.no_grad():
            resized = fuser.resize_all(pyramid)
            w = fuser.fusion_weights(resized)
            y = fuser(pyramid)
        n_params = sum(p.numel() for p in fuser.parameters())
        print(f"ASFF-s{level}: resized {[tuple(r.shape[1:]) for r in resized]} -> "
              f"weights {tuple(w.shape)} (sum {w.sum(1).mean():.3f}) -> out {tuple(y.shape)}, "
              f"{n_params:,} params")
    for mode in ("sum", "concat"):
        n_params = sum(p.numel() for p in ASFF(channels, 8, 256, mode=mode).parameters())
        print(f"{mode}-s8: {n_params:,} params")


if __name__ == "__main__":
    _demo()
