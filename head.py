"""The detection head with guided anchoring, and the composed detector - paper Sec. 3.1 and 3.4.

Per pyramid level (stride 32, 16, 8), as the ASFF authors released it:
    S = 4 slots per position: the level's 3 of the 9 anchors, and slot 3, anchor-free with base
        size 4 x stride (FSAF-style, Sec. 3.1).
    guided anchoring (Wang et al. 2019): a 1x1 conv predicts each slot's log-shape
        anchor_log = (gw, gh); the slot's anchor becomes A * exp(g) (`decode_level`).
    feature adaption: a grouped 1x1 conv turns the *detached* anchor_log into the offsets of a
        3x3 deformable conv, one deformable group per slot (`deform_conv2d`, plain PyTorch);
        ASFF* runs an RFB block before it.
    prediction: a 1x1 conv gives S x (5 + C) channels, slot-major: [tx, ty, tw, th, obj, cls...].
    decoding (`decode_level`), slot k at column i, row j:
        cx = (sigmoid(tx) + i) * stride,  cy = (sigmoid(ty) + j) * stride
        w = exp(tw) * exp(gw) * A_w,      h = exp(th) * exp(gh) * A_h,   obj, cls = sigmoid(.)

Public entry points:
    Detector(num_classes=80, fusion=None | "sum" | "concat" | "asff", guided=True, spp=True,
             rfb=False, dropblock=False, width=1.0, depth=1.0, anchors=None)
        train mode: (B, 3, H, W) -> {stride: {"pred": (B, S, 5+C, H/s, W/s),
                                              "anchor_log": (B, S, 2, H/s, W/s) or None}}
        eval mode:  (B, 3, H, W) -> (B, N, 5+C) [cx, cy, w, h, obj, cls...] in input pixels,
                    levels s32, s16, s8, each ordered slot, row, column (the release's order)
        fusion_maps(x) -> {stride: {"weights": (B, 3, h, w), "fused": (B, h, w)}}  (Figure 3)
        set_dropblock(block_sizes, keep_prob), fuse_conv_bn(), darknet_layers()
        YOLOv3 (Table 1 row 1): guided=False, spp=False; strong baseline (Sec. 3.1): the defaults;
        + ASFF (Table 3): fusion="asff"; ASFF* (Table 4): also rfb=True, dropblock=True.
    load_released(model, path_or_state_dict): the authors' checkpoints through one key map;
    decode_level, deform_conv2d, init_weights; count_flops (`python head.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asff import ASFF, ConvBN
from darknet import DarkNet53, Pyramid, scale_channels

RELEASED_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119),  # guided default:
                    (116, 90), (156, 198), (121, 240))   # the checkpoints decode only with this 9th
DARKNET_ANCHORS = RELEASED_ANCHORS[:8] + ((373, 326),)    # YOLOv3's, as darknet's yolov3.weights
ANCHOR_SETS = {"released": RELEASED_ANCHORS, "yolov3": DARKNET_ANCHORS}
ANCHOR_MASKS = {32: (6, 7, 8), 16: (3, 4, 5), 8: (0, 1, 2)}
STRIDES = (32, 16, 8)
FREE_SLOT_SCALE = 4          # the anchor-free slot's base size is 4 x stride (128 / 64 / 32 px)


# ---------------------------------------------------------------------------------------------
# Deformable convolution (DCNv1 semantics, as torchvision.ops.deform_conv2d without mask)
def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """k x k stride-1 'same' deformable conv with `groups` deformable groups, as DCN computes it:
        out[o, p] = bias[o] + sum_t sum_c weight[o, c, t] * x_c(p + p_t + offset_t(p))
    x (B, C, H, W); offset (B, groups * 2 * k * k, H, W): in group g, channel 2t is the dy and
    2t+1 the dx of tap t = k * row + col; weight (C_out, C, k, k). Channel block g of x is read
    at offset group g's positions, bilinearly, zeros outside the map. Three steps: sample each
    tap (the im2col columns, 4 weighted corners per sample), weight and sum (a 1x1 conv over the
    columns), in bands of <= 16 MB of samples (a larger buffer is mapped afresh at every call).
    The sampling runs in float32, also under autocast (bf16 / fp16 gathers lack kernels)."""
    B, C, H, W = x.shape
    k, taps, dtype = weight.shape[-1], weight.shape[-1] ** 2, torch.promote_types(x.dtype, torch.float32)
    rows, corner_w = bilinear_corners(offset, groups, k)                  # (B, H, W*k*k*G, 4) each
    table = x.permute(0, 2, 3, 1).reshape(B * H * W * groups, C // groups).to(dtype)  # row (b, y, x, g)
    w = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], taps * C, 1, 1)  # (C_out, k*k*C, 1, 1)
    band, out = max(1, (16 << 20) // (W * taps * C * table.element_size())), []
    for y in range(0, H, band) if not torch.compiler.is_compiling() else [None]:   # traced: one band
        part = slice(y, y + band) if y is not None else slice(None)                # rows of the band
        with torch.autocast("cpu" if x.is_meta else x.device.type, enabled=False):  # sample in float32
            cols = GatherCorners.apply(rows[:, part].reshape(-1, 4), table,
                                       corner_w[:, part].reshape(-1, 4).to(dtype))  # (N, C/G)
        cols = cols.to(x.dtype).view(B, -1, W, taps * C).permute(0, 3, 1, 2)  # (B, k*k*C, band, W)
        out.append(F.conv2d(cols, w, bias))                # weight, sum: (B, C_out, band, W)
    return torch.cat(out, dim=2)                                          # (B, C_out, H, W)


class GatherCorners(torch.autograd.Function):
    """cols[n] = sum_j weights[n, j] * table[rows[n, j]]: rows, weights (N, 4); table (R, C) ->
    (N, C), F.embedding_bag's sum. Why a custom backward: PyTorch's scatter-add to the table is
    slow (demo training's deformable convs 1.4-1.9x slower at 1 and 2 threads); the transpose of
    a gather is a gather once the (sample, corner) pairs are sorted by the row they read."""

    @staticmethod
    def forward(ctx, rows, table, weights):
        ctx.save_for_backward(rows, table, weights)
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad):                                               # grad (N, C)
        rows, table, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        if ctx.needs_input_grad[1]:
            flat = rows.reshape(-1)                                        # (N*4,) pair -> row
            by_row = flat.argsort()                                        # (N*4,) pairs, row-sorted
            runs = torch.bincount(flat, minlength=table.shape[0])          # (R,) pairs per row
            grad_table = F.embedding_bag(by_row // 4, grad.contiguous(), runs.cumsum(0) - runs,
                                         mode="sum", per_sample_weights=weights.reshape(-1)[by_row])
        if ctx.needs_input_grad[2]:   # d cols[n] / d weights[n, j] = table[rows[n, j]]: PyTorch's
            with torch.enable_grad():                                     # own, fused kernel
                w = weights.detach().requires_grad_()
                out = F.embedding_bag(rows, table.detach(), mode="sum", per_sample_weights=w)
                (grad_weights,) = torch.autograd.grad(out, w, grad)
        return None, grad_table, grad_weights


def bilinear_corners(offset: torch.Tensor, groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (b, y, x, tap, g) at p = (y, x) + tap + offset: its 4 bilinear corners' rows in x's
    NHWC table of (B*H*W*G) rows and weights (1-ly or ly)(1-lx or lx) -> (B, H, W*k*k*G, 4) each."""
    B, _, H, W = offset.shape
    taps, dev, dtype = k * k, offset.device, torch.promote_types(offset.dtype, torch.float32)
    off = offset.view(B, groups, taps, 2, H, W).permute(3, 0, 4, 5, 2, 1).to(dtype)  # (2, B, H, W, k*k, G)
    tap = torch.arange(taps, device=dev).view(taps, 1)                     # (k*k, 1)
    # sample positions, each (B, H, W, k*k, G): the cell + the tap's place in the k x k + offset
    py = off[0] + (torch.arange(H, device=dev).view(H, 1, 1, 1) + tap // k - (k - 1) // 2)
    px = off[1] + (torch.arange(W, device=dev).view(W, 1, 1) + tap % k - (k - 1) // 2)
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = axis_corners(py, H), axis_corners(px, W)
    first = torch.arange(B, device=dev, dtype=torch.int32).view(B, 1, 1, 1, 1) * (H * W * groups) \
        + torch.arange(groups, device=dev, dtype=torch.int32)              # row of (b, 0, 0, g)
    y0, y1, x0, x1 = y0 * (W * groups) + first, y1 * (W * groups) + first, x0 * groups, x1 * groups  # rows
    rows = torch.stack([y0 + x0, y0 + x1, y1 + x0, y1 + x1], dim=-1)        # (B, H, W, k*k, G, 4)
    weights = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1)  # (B, H, W, k*k, G, 4)
    return rows.view(B, H, -1, 4), weights.view(B, H, -1, 4)


def axis_corners(p: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Positions p on one axis -> its neighbours floor(p), floor(p) + 1 as int32 indices clamped
    into [0, size) (NaN p: 0, its weights stay NaN) and their weights 1 - l, l, 0 off the map."""
    low = p.floor()
    frac = p - low                                                         # l = p - floor(p)
    w_low, w_high = (1 - frac) * ((low >= 0) & (low < size)), frac * ((low >= -1) & (low < size - 1))
    low = low.nan_to_num(0.0)
    return low.clamp(0, size - 1).int(), (low + 1).clamp_(0, size - 1).int(), w_low, w_high


class DeformConv2d(nn.Module):
    """Holds the deformable conv's weight (C_out, C_in, k, k) and bias; nn.Conv2d's default init."""

    def __init__(self, c_in: int, c_out: int, k: int, groups: int):
        super().__init__()
        template = nn.Conv2d(c_in, c_out, k)               # borrow PyTorch's default init
        self.weight, self.bias, self.groups = template.weight, template.bias, groups

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.groups)


class RFB(nn.Module):
    """ASFF*'s receptive field block as released: 4 linear branches of C/4 channels, concatenated
    (no BatchNorm, activation or residual); it runs on the head input before the deformable conv."""

    def __init__(self, c: int):
        super().__init__()
        q = c // 4
        self.branch0 = nn.Sequential(nn.Conv2d(c, q, 1))
        self.branch1 = nn.Sequential(nn.Conv2d(c, q, 1), nn.Conv2d(q, q, 3, padding=1))
        self.branch2 = nn.Sequential(nn.Conv2d(c, q, 1), nn.Conv2d(q, q, 3, padding=1),
                                     nn.Conv2d(q, q, 3, padding=2, dilation=2))
        self.branch3 = nn.Sequential(nn.Conv2d(c, q, 1), nn.Conv2d(q, q, 5, padding=2),
                                     nn.Conv2d(q, q, 3, padding=3, dilation=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in (self.branch0, self.branch1, self.branch2, self.branch3)], 1)


class Head(nn.Module):
    """One level's head: guided anchoring + feature adaption + the 1x1 prediction conv."""

    def __init__(self, c: int, num_classes: int, n_slots: int, guided: bool, rfb: bool):
        super().__init__()
        self.n_slots, self.guided = n_slots, guided
        if guided:
            self.guide = nn.Conv2d(c, 2 * n_slots, 1)                           # (gw, gh) per slot
            self.offset = nn.Conv2d(2 * n_slots, 18 * n_slots, 1, groups=n_slots)  # 9 taps x (dy, dx)
            self.rfb = RFB(c) if rfb else None
            self.dconv = DeformConv2d(c, c, 3, groups=n_slots)
        self.pred = nn.Conv2d(c, n_slots * (5 + num_classes), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, _, H, W = x.shape
        anchor_log = None
        if self.guided:
            anchor_log = self.guide(x)                                         # (B, 2S, H, W)
            feature = self.rfb(x) if self.rfb is not None else x               # (B, C, H, W)
            x = self.dconv(feature, self.offset(anchor_log.detach()))          # (B, C, H, W)
            anchor_log = anchor_log.view(B, self.n_slots, 2, H, W)             # (B, S, 2, H, W)
        pred = self.pred(x).view(B, self.n_slots, -1, H, W)                    # (B, S, 5+C, H, W)
        return pred, anchor_log


# ---------------------------------------------------------------------------------------------
# Decoding (eval mode, loss.py and evaluate.py share it)
def decode_level(pred: torch.Tensor, anchor_log: torch.Tensor | None, stride: int,
                 slot_sizes: torch.Tensor) -> torch.Tensor:
    """Raw predictions of one level -> (B, S, H, W, 5+C) [cx, cy, w, h, obj, cls...] in pixels."""
    B, S, _, H, W = pred.shape
    p = pred.permute(0, 1, 3, 4, 2)                                            # (B, S, H, W, 5+C)
    j = torch.arange(H, device=p.device, dtype=p.dtype).view(1, 1, H, 1)       # row index
    i = torch.arange(W, device=p.device, dtype=p.dtype).view(1, 1, 1, W)       # column index
    cx = (torch.sigmoid(p[..., 0]) + i) * stride                               # (B, S, H, W)
    cy = (torch.sigmoid(p[..., 1]) + j) * stride                               # (B, S, H, W)
    anchors = slot_sizes.to(p).view(1, S, 1, 1, 2)                             # (1, S, 1, 1, 2) A
    if anchor_log is not None:                                                 # guided: A * exp(g)
        anchors = anchors * torch.exp(anchor_log.permute(0, 1, 3, 4, 2))      # (B, S, H, W, 2)
    wh = torch.exp(p[..., 2:4]) * anchors                                      # (B, S, H, W, 2)
    scores = torch.sigmoid(p[..., 4:])                                         # (B, S, H, W, 1+C)
    return torch.cat([cx[..., None], cy[..., None], wh, scores], dim=-1)       # (B, S, H, W, 5+C)


# ---------------------------------------------------------------------------------------------
# The detector
class Detector(nn.Module):
    """DarkNet-53 + YOLOv3 pyramid + optional fusion (sum / concat / ASFF) + per-level heads.
    anchors: None (guided: "released", else "yolov3"), a name of ANCHOR_SETS or 9 (w, h) pairs."""

    def __init__(self, num_classes: int = 80, fusion: str | None = None, guided: bool = True,
                 spp: bool = True, rfb: bool = False, dropblock: bool = False,
                 width: float = 1.0, depth: float = 1.0, anchors=None):
        super().__init__()
        self.num_classes, self.fusion_mode, self.guided = num_classes, fusion, guided
        self.dropblock, self.strides, self.n_slots = dropblock, STRIDES, 4 if guided else 3
        anchors = ANCHOR_SETS[anchors] if isinstance(anchors, str) else anchors  # "released"/"yolov3"
        anchors = anchors or (RELEASED_ANCHORS if guided else DARKNET_ANCHORS)
        self.register_buffer("anchors", torch.tensor(anchors).float(), persistent=False)  # (9, 2) w, h
        self.backbone = DarkNet53(width, depth)
        self.pyramid = Pyramid(width, spp)
        head_c = {s: scale_channels(c, width) for s, c in ((32, 1024), (16, 512), (8, 256))}
        self.head_in = self.fusion = None
        if fusion is None:
            # YOLOv3 runs a 3x3 conv before each head; the pyramid already ends with it at s8.
            self.head_in = nn.ModuleDict({"s32": ConvBN(self.pyramid.channels[32], head_c[32], 3),
                                          "s16": ConvBN(self.pyramid.channels[16], head_c[16], 3),
                                          "s8": nn.Identity()})
        else:
            # ASFF's `expand` conv replaces them (8 weight channels with RFB: "to save memory").
            self.fusion = nn.ModuleDict({f"s{s}": ASFF(self.pyramid.channels, s, head_c[s],
                                                       weight_channels=8 if rfb else 16,
                                                       mode=fusion) for s in STRIDES})
        self.heads = nn.ModuleDict({f"s{s}": Head(head_c[s], num_classes, self.n_slots, guided, rfb)
                                    for s in STRIDES})
        init_weights(self)

    def slot_sizes(self, stride: int) -> torch.Tensor:
        """Base (w, h) in pixels of each slot at this level: its 3 anchors (+ 4*stride free slot)."""
        sizes = self.anchors[list(ANCHOR_MASKS[stride])]                       # (3, 2)
        free = sizes.new_full((1, 2), float(FREE_SLOT_SCALE * stride))         # anchor-free slot
        return torch.cat([sizes, free]) if self.guided else sizes              # (4, 2) or (3, 2)

    def features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Head inputs by stride: backbone -> pyramid -> fusion (or YOLOv3's 3x3 convs)."""
        pyramid = self.pyramid(self.backbone(images))                          # {32: (B, 512, ..)}
        if self.fusion is None:
            return {s: self.head_in[f"s{s}"](pyramid[s]) for s in STRIDES}
        return {s: self.fusion[f"s{s}"](pyramid) for s in STRIDES}            # (B, 1024/512/256, ..)

    def forward(self, images: torch.Tensor):
        feats = self.features(images)
        outs = {s: self.heads[f"s{s}"](feats[s]) for s in STRIDES}            # (pred, anchor_log)
        raw = {s: {"pred": p, "anchor_log": a} for s, (p, a) in outs.items()}  # (B, S, 5+C | 2, h, w)
        return raw if self.training else self.decode(raw)

    def decode(self, raw: dict) -> torch.Tensor:
        """Raw per-level predictions -> (B, N, 5+C) rows in the release's order."""
        rows = [decode_level(raw[s]["pred"], raw[s]["anchor_log"], s, self.slot_sizes(s)).flatten(1, 3)
                for s in STRIDES]                                              # (B, S*h*w, 5+C) each
        return torch.cat(rows, dim=1)                                          # (B, N, 5+C)

    @torch.no_grad()
    def fusion_maps(self, images: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """Figure 3: Eq. 2 weights (B, 3, h, w) and the channel-summed fused map (B, h, w)."""
        if self.fusion_mode != "asff":
            raise ValueError("fusion_maps needs a model built with fusion='asff'")
        pyramid = self.pyramid(self.backbone(images))
        fused = {s: self.fusion[f"s{s}"].fuse(pyramid) for s in STRIDES}  # y^l (B, C, h, w), w (B, 3, h, w)
        return {s: {"weights": w, "fused": y.sum(dim=1)} for s, (y, w) in fused.items()}  # fused (B, h, w)

    def set_dropblock(self, block_sizes: dict[int, int], keep_prob: float) -> None:
        """ASFF* schedule hook: block size per stride and keep probability (no-op without DropBlock)."""
        for s, block in (self.pyramid.dropblocks() if self.dropblock else {}).items():
            block.block_size, block.keep_prob = block_sizes[s], keep_prob

    def fuse_conv_bn(self) -> Detector:
        """Fold every BatchNorm into its conv (inference only; the model is put in eval mode)."""
        self.eval()
        for m in self.modules():
            if isinstance(m, ConvBN) and isinstance(m.bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                m.fuse_bn()
        return self

    def darknet_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """Conv layers in the order of darknet's yolov3.cfg (original YOLOv3 configuration only)."""
        if self.guided or self.fusion_mode is not None or self.pyramid.s32.spp is not None:
            raise ValueError("darknet's layout is the original YOLOv3: "
                             "Detector(fusion=None, guided=False, spp=False)")
        p, pairs = self.pyramid, lambda blocks: [(b.conv, b.bn) for b in blocks]
        pred = lambda s: [(self.heads[f"s{s}"].pred, None)]
        return (self.backbone.darknet_layers()
                + pairs(p.s32.convs() + [self.head_in["s32"]]) + pred(32)
                + pairs([p.s16_lateral] + p.s16.convs() + [self.head_in["s16"]]) + pred(16)
                + pairs([p.s8_lateral] + p.s8.convs() + [p.s8_out]) + pred(8))


def init_weights(model: nn.Module) -> None:
    """MSRA init for new layers (Sec. 3.4), as the release: Kaiming-normal (a=0.1, fan_in), zero
    bias, BN weight 1 and bias 0; the deformable conv keeps nn.Conv2d's default init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0.1, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Plumbing: the authors' released checkpoints, through one key map
BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_block(released: str, ours: str) -> dict[str, str]:
    return {f"{released}.conv.weight": f"{ours}.conv.weight",
            **{f"{released}.batch_norm.{leaf}": f"{ours}.bn.{leaf}" for leaf in BN_LEAVES}}


def _plain_conv(released: str, ours: str) -> dict[str, str]:
    return {f"{released}.{leaf}": f"{ours}.{leaf}" for leaf in ("weight", "bias")}


def _backbone_map(model: Detector) -> dict[str, str]:
    """module_list.0-10 -> backbone.*: stem, then (down conv, residual units) per stage."""
    keys = _conv_block("module_list.0", "backbone.stem")
    for k in range(1, 6):
        keys.update(_conv_block(f"module_list.{2 * k - 1}", f"backbone.stage{k}.down"))
        for u in range(len(getattr(model.backbone, f"stage{k}").units)):
            released, ours = f"module_list.{2 * k}.module_list.{u}", f"backbone.stage{k}.units.{u}"
            keys.update(_conv_block(f"{released}.0", f"{ours}.reduce"))
            keys.update(_conv_block(f"{released}.1", f"{ours}.expand"))
    return keys


def _head_map(released: str, ours: str, rfb: bool) -> dict[str, str]:
    keys = {}
    for theirs, mine in (("guide_wh", "guide"), ("Feature_adaption.conv_offset", "offset"),
                         ("Feature_adaption.dconv", "dconv"), ("conv", "pred")):
        keys.update(_plain_conv(f"{released}.{theirs}", f"{ours}.{mine}"))
    for b, n in enumerate((1, 2, 3, 3) if rfb else ()):         # RFB branch b has n convs
        for i in range(n):
            keys.update(_plain_conv(f"{released}.Feature_adaption.rfb.branch_{b}.{i}",
                                    f"{ours}.rfb.branch{b}.{i}"))
    return keys


def _fusion_map(level: int, stride: int) -> dict[str, str]:
    """level_<l>_fusion.* -> fusion.s<stride>.* (ASFF), l = 0 for stride 32 (authors' order)."""
    released, ours = f"level_{level}_fusion", f"fusion.s{stride}"
    resize_names = {0: "compress_level_0", 1: "stride_level_1", 2: "stride_level_2"}
    keys = {}
    for n, src in enumerate(STRIDES):
        if src != stride and not (stride == 8 and src == 16):   # s16 -> s8 has no conv
            keys.update(_conv_block(f"{released}.{resize_names[n]}", f"{ours}.resize.s{src}.proj"))
        keys.update(_conv_block(f"{released}.weight_level_{n}", f"{ours}.weight_branch.s{src}"))
    keys.update(_plain_conv(f"{released}.weight_levels", f"{ours}.weight_logits"))
    keys.update(_conv_block(f"{released}.expand", f"{ours}.expand"))
    return keys


def released_key_map(model: Detector) -> dict[str, str]:
    """Every key of the authors' state dict for this configuration -> our key (the one key map)."""
    if not model.guided or model.fusion_mode not in (None, "asff"):
        raise ValueError("released checkpoints exist for the guided baseline, ASFF and ASFF* only")
    keys = _backbone_map(model)
    pyr = {  # pyramid conv blocks: ours -> (baseline index, ASFF index)
        "s32.conv1": ("11.module_list.0.0",) * 2, "s32.conv2": ("11.module_list.0.1",) * 2,
        "s32.conv3": ("12",) * 2, "s32.spp_reduce": ("14",) * 2, "s32.conv4": ("15",) * 2,
        "s32.conv5": ("17",) * 2, "s16_lateral": ("20", "18"), "s16.conv1": ("22", "20"),
        "s16.conv2": ("23", "21"), "s16.conv3": ("25.module_list.0.0", "23.module_list.0.0"),
        "s16.conv4": ("25.module_list.0.1", "23.module_list.0.1"), "s16.conv5": ("26", "24"),
        "s8_lateral": ("29", "25"), "s8.conv1": ("31", "27"), "s8.conv2": ("32", "28"),
        "s8.conv3": ("34.module_list.0.0", "30.module_list.0.0"),
        "s8.conv4": ("34.module_list.0.1", "30.module_list.0.1"), "s8.conv5": ("35", "31"),
        "s8_out": ("36", "32")}
    asff = model.fusion_mode == "asff"
    for ours, idx in pyr.items():
        keys.update(_conv_block(f"module_list.{idx[asff]}", f"pyramid.{ours}"))
    rfb = model.heads["s8"].rfb is not None
    for level, s in enumerate(STRIDES):
        keys.update(_fusion_map(level, s) if asff else {})
        released = f"level_{level}_header" if asff else f"module_list.{(19, 28, 37)[level]}"
        keys.update(_head_map(released, f"heads.s{s}", rfb))
    if not asff:
        keys.update(_conv_block("module_list.18", "head_in.s32"))
        keys.update(_conv_block("module_list.27", "head_in.s16"))
    return keys


def load_released(model: Detector, source, name: str | None = None) -> Detector:
    """Load the authors' checkpoint (a path or a state dict) into `model`: every key maps to one
    of ours, every one of ours is filled, shapes equal, fp16 cast to fp32; only module_list.0-10
    (`darknet53_feature_mx.pth`): the backbone alone. Errors name the key, the file and shapes."""
    name = name or (source if isinstance(source, str) else "<state dict>")
    state = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, str) else source
    state = {k.removeprefix("module."): v for k, v in state.items()}
    backbone_only = all(k.split(".")[1] in map(str, range(11)) for k in state)
    # a backbone file fills DarkNet-53 under any head (Table 1's rows without guided anchoring)
    key_map = _backbone_map(model) if backbone_only else released_key_map(model)
    ours = model.state_dict()
    missing, extra = sorted(set(key_map) - set(state)), sorted(set(state) - set(key_map))
    if missing or extra:
        few = lambda keys: f"{keys[:5]}{'...' if len(keys) > 5 else ''}"
        raise KeyError(f"{name}: does not match Detector(fusion={model.fusion_mode!r}, "
                       f"rfb={model.heads['s8'].rfb is not None}, width/depth as built): "
                       f"missing keys {few(missing)}, unexpected keys {few(extra)}")
    converted = {}
    for released, our_key in key_map.items():
        tensor, target = state[released], ours[our_key]
        if tensor.shape != target.shape:
            raise ValueError(f"{name}: key {released} (ours {our_key}) has shape "
                             f"{tuple(tensor.shape)}, the model needs {tuple(target.shape)}")
        converted[our_key] = tensor.to(target.dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(converted, strict=not backbone_only)
    return model


# ---------------------------------------------------------------------------------------------
# `python head.py`: parameters and FLOPs of the paper's configurations
def count_flops(model: nn.Module, size: int) -> float:
    """Forward FLOPs at (1, 3, size, size) by FlopCounterMode, 2 per multiply-add (meta device: fast)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    return counter.get_total_flops()


def _demo(sizes: tuple[int, ...] = (416, 608)) -> None:
    configs = {"original YOLOv3": dict(guided=False, spp=False), "strong baseline": dict(fusion=None),
               "sum fusion": dict(fusion="sum"), "concat fusion": dict(fusion="concat"),
               "ASFF": dict(fusion="asff"), "ASFF*": dict(fusion="asff", rfb=True, dropblock=True)}
    print(f"parameters and FLOPs of {len(configs)} full-size detectors at {sizes}, built on the meta "
          "device (shapes only: seconds)", flush=True)
    print(f"{'configuration':<18}{'params':>14}" + "".join(f"{f'GFLOPs@{s}':>12}" for s in sizes))
    for name, kwargs in configs.items():
        with torch.device("meta"):
            model = Detector(80, **kwargs)
        flops = "".join(f"{count_flops(model, s) / 1e9:>12.2f}" for s in sizes)
        print(f"{name:<18}{sum(p.numel() for p in model.parameters()):>14,}{flops}", flush=True)


if __name__ == "__main__":
    _demo()
