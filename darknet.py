"""DarkNet-53 and the YOLOv3 feature pyramid - paper Sec. 3.1 ("Strong baseline").

Public entry points:
    DarkNet53(width=1.0, depth=1.0)
        forward((B, 3, H, W)) -> {8: (B, 256w, H/8, W/8), 16: (B, 512w, ..), 32: (B, 1024w, ..)}
    Pyramid(width=1.0, spp=True)
        forward(backbone dict) -> {32: (B, 512w, H/32, W/32), 16: (B, 256w, ..), 8: (B, 256w, ..)}
        the three maps that feed the fusion (asff.py) or, without fusion, the heads.
    DropBlock(), SPP()
    read_darknet_weights(path, layers) / write_darknet_weights(path, layers)
        darknet's binary format (`darknet53.conv.74`, `yolov3.weights`) for a list of
        (conv, bn-or-None) pairs in darknet's cfg order (DarkNet53.darknet_layers(),
        head.Detector.darknet_layers()).
    letterbox(image, size) -> (3, size, size): the input darknet's own yolov3.weights were trained on.

The pyramid is YOLOv3's top-down path as the ASFF authors released it: each level is YOLOv3's
"five-conv" block (1x1, 3x3, 1x1, 3x3, 1x1); at stride 32 an SPP block (max-pools 5/9/13 + a
1x1 conv) sits after the third conv (SPP=False gives darknet's yolov3.cfg); lower levels take
the level above through a 1x1 lateral conv, nearest x2 up-sampling and concatenation with the
backbone map. The stride-8 map ends with the 3x3 conv that YOLOv3 runs before its stride-8
head; in the ASFF model that conv's output (256 ch) is the third fusion input. DropBlock slots
sit where the release put them (after the second 3x3 conv at stride 32, after the first at
strides 16 and 8: `FiveConv.forward`); they are identities unless `dropblock=True` and a keep
probability < 1 is set.

`width` scales every channel count and `depth` the number of residual units, for small models
that train on a laptop CPU (width=1, depth=1 is the paper's network).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asff import ConvBN  # the shared conv block lives in asff.py so that file stays torch-only


def scale_channels(c: int, width: float) -> int:
    """Channels of a width-scaled model: a multiple of 8 (so c/2 and c/4 stay whole)."""
    return max(8, int(round(c * width / 8)) * 8)


class Residual(nn.Module):
    """DarkNet residual unit: 1x1 conv c -> c/2, 3x3 conv c/2 -> c, added to the input."""

    def __init__(self, c: int):
        super().__init__()
        self.reduce = ConvBN(c, c // 2, 1)
        self.expand = ConvBN(c // 2, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.reduce(x))                 # (B, c, H, W)


class Stage(nn.Module):
    """One DarkNet-53 stage: a 3x3 stride-2 conv, then n residual units."""

    def __init__(self, c_in: int, c_out: int, n: int):
        super().__init__()
        self.down = ConvBN(c_in, c_out, 3, stride=2)
        self.units = nn.Sequential(*[Residual(c_out) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.down(x))                        # (B, c_out, H/2, W/2)


class DarkNet53(nn.Module):
    """DarkNet-53 without its classifier: a 3x3 stem and five stages of 1, 2, 8, 8, 4 units."""

    def __init__(self, width: float = 1.0, depth: float = 1.0):
        super().__init__()
        c = [scale_channels(n, width) for n in (32, 64, 128, 256, 512, 1024)]
        units = [max(1, round(n * depth)) for n in (1, 2, 8, 8, 4)]
        self.channels = {8: c[3], 16: c[4], 32: c[5]}
        self.stem = ConvBN(3, c[0], 3)
        self.stage1 = Stage(c[0], c[1], units[0])              # stride 2
        self.stage2 = Stage(c[1], c[2], units[1])              # stride 4
        self.stage3 = Stage(c[2], c[3], units[2])              # stride 8  (C3)
        self.stage4 = Stage(c[3], c[4], units[3])              # stride 16 (C4)
        self.stage5 = Stage(c[4], c[5], units[4])              # stride 32 (C5)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.stage2(self.stage1(self.stem(x)))             # (B, 128, H/4, W/4)
        c3 = self.stage3(x)                                    # (B, 256, H/8, W/8)
        c4 = self.stage4(c3)                                   # (B, 512, H/16, W/16)
        c5 = self.stage5(c4)                                   # (B, 1024, H/32, W/32)
        return {8: c3, 16: c4, 32: c5}

    def darknet_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """Conv layers in darknet's cfg order (the first 52 of yolov3.cfg: darknet53.conv.74)."""
        blocks = [self.stem]
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4, self.stage5):
            blocks.append(stage.down)
            for unit in stage.units:
                blocks += [unit.reduce, unit.expand]
        return [(b.conv, b.bn) for b in blocks]


class SPP(nn.Module):
    """Spatial pyramid pooling as released: [x, maxpool5(x), maxpool9(x), maxpool13(x)], stride 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pools = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in (5, 9, 13)]
        return torch.cat([x, *pools], dim=1)                   # (B, 4C, H, W)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018), part of ASFF* (Table 4). Identity unless keep_prob < 1.

    gamma = (1 - keep) * W^2 / (bs^2 * (W - bs + 1)^2) is computed from the current map size on
    every call (the release cached it at the first size seen, which is wrong under random shapes).
    """

    def __init__(self):
        super().__init__()
        self.block_size, self.keep_prob = 1, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep_prob >= 1.0:
            return x
        bs, width = self.block_size, x.shape[-1]
        gamma = (1 - self.keep_prob) * width ** 2 / (bs ** 2 * max(width - bs + 1, 1) ** 2)
        seeds = torch.bernoulli(torch.full_like(x, gamma))                   # (B, C, H, W)
        blocks = F.max_pool2d(seeds, bs, stride=1, padding=bs // 2)          # grow seeds to bs x bs
        keep = 1.0 - blocks[..., :x.shape[-2], :x.shape[-1]]                 # (B, C, H, W)
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))         # rescale the kept part


class FiveConv(nn.Module):
    """YOLOv3's five-conv block (1x1 c_in->c, 3x3 c->2c, 1x1, 3x3, 1x1), optional SPP after conv3.

    The DropBlock slot follows the 3x3 conv `drop_after` (2 or 4), where the release put it:
    after conv4 at stride 32, after conv2 at strides 16 and 8 (the baseline's module_list 16, 24
    and 33).
    """

    def __init__(self, c_in: int, c: int, spp: bool = False, drop_after: int = 2):
        super().__init__()
        if drop_after not in (2, 4):
            raise ValueError(f"drop_after {drop_after}: the DropBlock follows a 3x3 conv, 2 or 4")
        self.conv1 = ConvBN(c_in, c, 1)
        self.conv2 = ConvBN(c, 2 * c, 3)
        self.conv3 = ConvBN(2 * c, c, 1)
        self.spp = SPP() if spp else None
        self.spp_reduce = ConvBN(4 * c, c, 1) if spp else None
        self.conv4 = ConvBN(c, 2 * c, 3)
        self.conv5 = ConvBN(2 * c, c, 1)
        self.drop = DropBlock()
        self.drop_after = drop_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))                                        # (B, 2c, h, w)
        if self.drop_after == 2:
            x = self.drop(x)
        x = self.conv3(x)                                                    # (B, c, h, w)
        if self.spp is not None:
            x = self.spp_reduce(self.spp(x))                                 # (B, 4c -> c, h, w)
        x = self.conv4(x)                                                    # (B, 2c, h, w)
        if self.drop_after == 4:
            x = self.drop(x)
        return self.conv5(x)                                                 # (B, c, h, w)

    def convs(self) -> list[ConvBN]:
        """The conv blocks in execution (and darknet cfg) order."""
        middle = [self.spp_reduce] if self.spp is not None else []
        return [self.conv1, self.conv2, self.conv3, *middle, self.conv4, self.conv5]


class Pyramid(nn.Module):
    """YOLOv3's top-down pyramid as released by the ASFF authors (Sec. 3.1)."""

    def __init__(self, width: float = 1.0, spp: bool = True):
        super().__init__()
        c3, c4, c5 = (scale_channels(c, width) for c in (256, 512, 1024))
        self.s32 = FiveConv(c5, c5 // 2, spp, drop_after=4)    # -> p32, 512 ch
        self.s16_lateral = ConvBN(c5 // 2, c4 // 2, 1)          # 512 -> 256 before up-sampling
        self.s16 = FiveConv(c4 // 2 + c4, c4 // 2)             # [up(p32), C4] 768 -> p16, 256 ch
        self.s8_lateral = ConvBN(c4 // 2, c3 // 2, 1)           # 256 -> 128 before up-sampling
        self.s8 = FiveConv(c3 // 2 + c3, c3 // 2)              # [up(p16), C3] 384 -> 128 ch
        self.s8_out = ConvBN(c3 // 2, c3, 3)                    # 128 -> p8, 256 ch
        self.channels = {32: c5 // 2, 16: c4 // 2, 8: c3}

    def forward(self, c: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        p32 = self.s32(c[32])                                                # (B, 512, H/32, W/32)
        x = self.upsample(self.s16_lateral(p32), c[16])                      # (B, 768, H/16, W/16)
        p16 = self.s16(x)                                                    # (B, 256, H/16, W/16)
        x = self.upsample(self.s8_lateral(p16), c[8])                        # (B, 384, H/8, W/8)
        p8 = self.s8_out(self.s8(x))                                         # (B, 256, H/8, W/8)
        return {32: p32, 16: p16, 8: p8}

    @staticmethod
    def upsample(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Nearest x2 up-sampling, then concatenation [up(x), skip] as in YOLOv3."""
        return torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)

    def dropblocks(self) -> dict[int, DropBlock]:
        return {32: self.s32.drop, 16: self.s16.drop, 8: self.s8.drop}


# ---------------------------------------------------------------------------------------------
# Plumbing: darknet's binary weight files
# ---------------------------------------------------------------------------------------------
def read_darknet_weights(path: str, layers: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]) -> int:
    """Copy darknet weights into `layers`; returns the number of floats read. Errors name the file.

    Layout: an int32 header (major, minor, revision), a "seen" counter (int64 when
    major * 10 + minor >= 2, else int32), then for each conv layer in cfg order: with BN
    [beta, gamma, running_mean, running_var], without BN [bias]; then the conv weights
    (out, in, k, k) flattened, all float32 little-endian.
    """
    with open(path, "rb") as f:
        header = np.fromfile(f, dtype="<i4", count=3)
        if header.size < 3:
            raise ValueError(f"{path}: not a darknet weight file (header too short)")
        major, minor = int(header[0]), int(header[1])
        np.fromfile(f, dtype="<i8" if major * 10 + minor >= 2 else "<i4", count=1)
        data = np.fromfile(f, dtype="<f4")
    pos = 0
    with torch.no_grad():
        for conv, bn in layers:
            params = [bn.bias, bn.weight, bn.running_mean, bn.running_var] if bn else [conv.bias]
            for t in [*params, conv.weight]:
                if pos + t.numel() > data.size:
                    raise ValueError(f"{path}: file ends after {data.size} floats, but the model "
                                     f"needs more (layer {conv}, tensor {tuple(t.shape)})")
                t.copy_(torch.from_numpy(data[pos:pos + t.numel()].copy()).view_as(t))
                pos += t.numel()
    if pos != data.size:
        raise ValueError(f"{path}: holds {data.size} floats but the model takes {pos}: the file "
                         f"was written for another layout (number of classes, SPP, guided head?)")
    return pos


def write_darknet_weights(path: str, layers: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]) -> None:
    """Write `layers` in darknet's format (version 0.2.0, seen = 0)."""
    with open(path, "wb") as f:
        np.array([0, 2, 0], dtype="<i4").tofile(f)
        np.array([0], dtype="<i8").tofile(f)
        for conv, bn in layers:
            params = [bn.bias, bn.weight, bn.running_mean, bn.running_var] if bn else [conv.bias]
            for t in [*params, conv.weight]:
                t.detach().cpu().float().numpy().astype("<f4").tofile(f)


# ---------------------------------------------------------------------------------------------
# `python darknet.py`: shapes and parameter counts at 416 x 416
# ---------------------------------------------------------------------------------------------
# --- darknet's own input, on which its yolov3.weights were trained (evaluate.Inference(darknet=True))
def letterbox_geometry(original_hw: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, pad_x, pad_y): an (h, w) image resized keeping its aspect, centred in size x size."""
    (h, w), r = original_hw, min(size / original_hw[0], size / original_hw[1])
    new_w, new_h = round(w * r), round(h * r)
    return new_w, new_h, (size - new_w) // 2, (size - new_h) // 2


def letterbox(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> (3, size, size): pixels / 255, resized keeping the aspect, on 0.5 bars."""
    new_w, new_h, pad_x, pad_y = letterbox_geometry(image.shape[:2], size)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255                 # (1, 3, H, W)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)  # (1, 3, h', w')
    return F.pad(x[0], (pad_x, size - new_w - pad_x, pad_y, size - new_h - pad_y), value=0.5)


def _demo() -> None:
    backbone, pyramid = DarkNet53().eval(), Pyramid().eval()
    x = torch.randn(1, 3, 416, 416)
    with torch.no_grad():
        c = backbone(x)
        p = pyramid(c)
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    print(f"input {tuple(x.shape)}")
    print("DarkNet-53:", {s: tuple(t.shape) for s, t in c.items()}, f"{count(backbone):,} params")
    print("pyramid:   ", {s: tuple(t.shape) for s, t in p.items()}, f"{count(pyramid):,} params")
    small = DarkNet53(width=0.25, depth=0.34)
    print(f"DarkNet-53 width 0.25 depth 0.34: {count(small):,} params")


if __name__ == "__main__":
    _demo()
