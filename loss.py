"""Training objective: the YOLOv3 loss plus the strong baseline's IoU terms - Sec. 3.1, 3.3, 3.4.

- Sec. 3.1 / 3.4 (strong baseline): YOLOv3's objective (BCE on centre offsets, L1 on log sizes,
  BCE objectness and classes) plus an IoU loss on the guided anchors and on the decoded boxes;
  Table 1 switches the IoU loss (`iou_loss`) and guided anchoring (the model's `guided`).
- Sec. 3.3 (consistency): an object is positive at one cell of one level and background
  elsewhere, except where ignored; Table 2's adjacent-level ignore regions are `ignore_ratio`.

compute_loss(outputs, targets, model, **switches) -> dict of 0-d tensors
    outputs: head.py's training output {stride: {"pred": (B, S, 5+C, H, W),
                                                  "anchor_log": (B, S, 2, H, W) or None}}
    targets: B tensors (N_b, 6) = [class, cx, cy, w, h, mix] in input pixels
    returns total, anchor, iou, l1 (= xy + wh), xy, wh, obj, cls, the same per level as
    f"{term}_s{stride}", and `dropped` (target rows left out as invalid, int64).
Steps: prepare_targets -> assign_targets -> slot_targets -> ignore_mask / adjacent_ignore ->
level_loss (its six terms, each a sum / batch size). `python loss.py`: a hand-made case.
Fixed shapes: targets padded to T rows per image (T: the longest list), all rows computed, masks
where rows do not count, so a GPU step never waits for the host (tests/test_loss.py: meta tensors).

The released objective (docs/released-code.md: assignment, loss terms, label smoothing, guided-
anchor gradient) except on input it never sees: invalid rows (class id outside [0, C) included)
are dropped (counted), centres on or past the border use the nearest cell, boxes larger than the
image weigh 1, -ln(IoU) clamps at 1e-7.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from head import ANCHOR_MASKS, FREE_SLOT_SCALE, RELEASED_ANCHORS, STRIDES, decode_level

IOU_FORMS = ("1-iou^2", "-ln(iou)", "1-iou")
TERMS = ("total", "anchor", "iou", "l1", "obj", "cls")   # what train.py logs and plots
FREE_SLOT = 3          # the anchor-free slot follows the level's three anchor slots
UNION_EPS = 1e-16      # released: added to every IoU union
# Bound on the log-shape g (Level.anchors): objects of 1-1333 px on bases of 10-373 px need |g| < 5.9;
MAX_ANCHOR_LOG = math.log(1e4)   # at ln(1e4) anchor areas stay finite in float32 (a run reached 136.6)
IGNORE_CHUNK = 1 << 20  # ignore_mask's pairs per pass: 4 MB temporaries stay in cache (2x faster than 16 MB)


class GroundTruth(NamedTuple):
    """Target rows padded to T per image, flattened image by image (N = B*T, original order, then
    padding). Rows not `valid` hold a 1 x 1 box, class 0, mix 0: every row computes finitely."""
    image: Tensor    # (N,) int64 image index b
    row: Tensor      # (N,) int64 row in that image's target tensor
    cls: Tensor      # (N,) int64 class
    box: Tensor      # (N, 4) cx, cy, w, h in input pixels
    mix: Tensor      # (N,) mixup ratio of the object's image
    valid: Tensor    # (N,) bool, a real row that passed the checks
    dropped: Tensor  # () int64, real rows found invalid


class LevelAssignment(NamedTuple):
    """One row per GroundTruth row, in object order; `on` marks the objects of this level."""
    gt: Tensor           # (n,) index into GroundTruth
    on: Tensor           # (n,) bool: a valid object whose best anchor lies on this level
    image: Tensor        # (n,) b
    i: Tensor            # (n,) cell column
    j: Tensor            # (n,) cell row
    anchor_slot: Tensor  # (n,) slot of the best anchor, 0..2 (where `on`)
    slot: Tensor         # (n,) positive slot, 0..2 or FREE_SLOT (where `on`)
    best_iou: Tensor     # (n,) shape IoU with the best of the 9 anchors
    free_iou: Tensor     # (n,) shape IoU with the predicted free-slot shape (0 when not guided)
    best_anchor: Tensor  # (n,) index 0..8 of the best anchor
    batch: int           # B, images in the batch (sizes slot_targets' per-slot tables)

    def compact(self) -> "LevelAssignment":
        """The rows `on` this level, to read (tests, demo); compute_loss never waits for a count."""
        return LevelAssignment(*(t[self.on] for t in self[:-1]), self.batch)


class SlotTargets(NamedTuple):
    """Targets of one level, resolved as the release writes them (a later object overwrites)."""
    slot_row: Tensor    # (B*S*H*W,) row last written at each slot as positive, -1 for none
    pos_row: Tensor     # (n,) row last written at the row's positive slot (itself when not `on`)
    positive: Tensor    # (n,) bool: `on` and last there: it trains box, objectness and class there
    box_row: Tensor     # (n,) row whose box the IoU loss compares with (last box written there)
    shape_last: Tensor  # (n, K) bool: `on` and last at its anchor (, free) slot: it trains the shape


# ---------------------------------------------------------------------------------------------
# Geometry
def iou_cxcywh(a: Tensor, b: Tensor) -> Tensor:
    """IoU of (cx, cy, w, h) boxes, element-wise with broadcasting: (..., 4) x (..., 4) -> (...)."""
    overlap = (torch.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)  # (..., 2)
               - torch.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2)).clamp(min=0)
    inter = overlap[..., 0] * overlap[..., 1]                                  # (...)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter + UNION_EPS)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every pair of corner boxes [x1, y1, x2, y2]: (N, 4) x (M, 4) -> (N, M) (NMS, crops)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])                       # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])                       # (N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)                                  # (N, M)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)  # (N,), (M,)
    return inter / (area_a[:, None] + area_b[None, :] - inter)               # (N, M)


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of two boxes sharing a centre (shapes only), (..., 2) x (..., 2) -> (...)."""
    inter = torch.minimum(wh1[..., 0], wh2[..., 0]) * torch.minimum(wh1[..., 1], wh2[..., 1])
    return inter / (wh1[..., 0] * wh1[..., 1] + wh2[..., 0] * wh2[..., 1] - inter + UNION_EPS)


def iou_loss_form(iou: Tensor, form: str) -> Tensor:
    """Sec. 3.1's IoU loss: the paper's -ln(IoU) (UnitBox), the release's 1 - IoU^2 (its gradient
    2 IoU dIoU fades for poor early boxes, -ln's dIoU / IoU grows: BCE/L1 move those) or 1 - IoU."""
    if form == "1-iou^2":
        return 1 - iou ** 2
    if form == "-ln(iou)":
        return -torch.log(iou.clamp(min=1e-7))
    if form == "1-iou":
        return 1 - iou
    raise ValueError(f"iou_form {form!r} is not one of {IOU_FORMS}")


class Level(NamedTuple):
    """One level's raw head output, read only at chosen slots (b, s, j, i): that keeps it fast."""
    stride: int
    pred: Tensor               # (B, S, 5+C, H, W) raw [tx, ty, tw, th, obj, cls...]
    anchor_log: Tensor | None  # (B, S, 2, H, W) raw log-shape g; None when not guided
    sizes: Tensor              # (S, 2) base size A of each slot (model.slot_sizes)

    def anchors(self, b: Tensor, s: Tensor, j: Tensor, i: Tensor) -> Tensor:
        """Guided anchors A * exp(g), |g| <= MAX_ANCHOR_LOG, at the given slots; (...) -> (..., 2)."""
        if self.anchor_log is None:
            return self.sizes[s]                                               # (..., 2)
        g = self.anchor_log[b, s, :, j, i].clamp(-MAX_ANCHOR_LOG, MAX_ANCHOR_LOG)  # (..., 2)
        return self.sizes[s] * torch.exp(g)                                    # (..., 2)

    def boxes(self, b: Tensor, s: Tensor, j: Tensor, i: Tensor) -> Tensor:
        """head.decode_level's (cx, cy, w, h) at the given slots; (...) -> (..., 4)."""
        t = self.pred[:, :, :4][b, s, :, j, i]                                 # (..., 4)
        cell = torch.stack([i, j], dim=-1).to(self.pred)                       # (..., 2)
        xy = (torch.sigmoid(t[..., :2]) + cell) * self.stride                  # (..., 2)
        wh = torch.exp(t[..., 2:4]) * self.anchors(b, s, j, i)                 # (..., 2)
        return torch.cat([xy, wh], dim=-1)                                     # (..., 4)


# ---------------------------------------------------------------------------------------------
# Targets and assignment
def prepare_targets(targets, num_classes: int, image_hw: tuple[int, int],
                    device=None, dtype=torch.float32) -> GroundTruth:
    """Pad the per-image (N_b, 6) targets to (B, T, 6), T = max N_b, and flatten them. Rows with a class
    id outside [0, num_classes) or not whole, w or h <= 0, non-finite numbers or no overlap with the
    image are not `valid`, counted in `dropped` (a raise would wait for the GPU); not 6 columns raises."""
    for b, t in enumerate(targets):
        if t.dim() != 2 or t.shape[1] != 6:
            raise ValueError(f"targets of image {b} have shape {tuple(t.shape)}, expected (N, 6)")
    rows = pad_sequence([t.to(dtype) for t in targets], batch_first=True, padding_value=math.nan)  # (B, T, 6)
    rows = F.pad(rows, (0, 0, 0, int(rows.shape[1] == 0)), value=math.nan)    # T >= 1 row to gather
    rows = rows.to(device, non_blocking=rows.is_cpu)   # host -> GPU without waiting for the GPU
    (B, T, _), (cls, cx, cy, w, h, mix), (H, W) = rows.shape, rows.unbind(-1), image_hw  # (B, T) each
    valid = (torch.isfinite(rows).all(-1) & (cls >= 0) & (cls < num_classes) & (cls == cls.round())
             & (w > 0) & (h > 0) & (cx + w / 2 > 0) & (cx - w / 2 < W) & (cy + h / 2 > 0)
             & (cy - h / 2 < H))                                      # (B, T), NaN padding fails
    image, row = torch.meshgrid(*(torch.arange(n, device=rows.device) for n in (B, T)), indexing="ij")
    box = torch.where(valid[..., None], rows[..., 1:5], 1.0)                   # (B, T, 4)
    return GroundTruth(image.flatten(), row.flatten(), torch.where(valid, cls, 0).long().flatten(),
                       box.view(-1, 4), torch.where(valid, mix, 0).flatten(), valid.flatten(),
                       sum(len(t) for t in targets) - valid.sum())


def assign_targets(gt: GroundTruth, anchors: Tensor, levels: dict[int, Level]) -> dict[int, LevelAssignment]:
    """Level, cell, slot of every object (Sec. 3.1), all rows on every level: the best of the 9 anchors
    by shape IoU picks the level (`on`) and anchor slot a, the cell holds the centre (clamped); when
    guided, the free slot takes it if its predicted shape 4 * stride * exp(g) fits strictly better."""
    anchors = anchors.to(gt.box, non_blocking=True)[None]                      # (1, 9, 2) host -> GPU
    best_iou, best = shape_iou(gt.box[:, None, 2:], anchors).max(dim=1)        # (N,) of 9
    out, n = {}, torch.arange(len(best), device=best.device)                   # (N,)
    for stride, level in levels.items():
        (H, W), B = level.pred.shape[-2:], level.pred.shape[0]
        match = torch.stack([best == k for k in ANCHOR_MASKS[stride]], dim=1)  # (N, 3) is anchor a best
        on, a = match.any(dim=1) & gt.valid, match.int().argmax(dim=1)         # (N,) each
        i = torch.floor(gt.box[:, 0] / stride).long().clamp(0, W - 1)          # (N,) centre's cell
        j = torch.floor(gt.box[:, 1] / stride).long().clamp(0, H - 1)          # (N,)
        slot, free_iou = a, torch.zeros_like(best_iou)                         # (N,) each
        if level.anchor_log is not None:   # the anchor-free slot takes the object if it fits better
            free_wh = level.anchors(gt.image, torch.full_like(a, FREE_SLOT), j, i).detach()  # (N, 2)
            free_iou = shape_iou(gt.box[:, 2:], free_wh)                       # (N,)
            slot = torch.where(free_iou > best_iou, FREE_SLOT, a)
        out[stride] = LevelAssignment(n, on, gt.image, i, j, a, slot, best_iou, free_iou, best, B)
    return out


def last_writer(keys: Tensor, on: Tensor, size: int) -> Tensor:
    """"A later object takes the slot": (size,) the last (largest) row among the rows `on` writing
    each slot, -1 if none; keys (n, K) flat slot indices. A scatter of amax: deterministic, no sort."""
    rows = torch.arange(len(keys), device=keys.device)[:, None].expand_as(keys)  # (n, K)
    writer = torch.where(on[:, None], rows, -1)                                 # (n, K)
    return keys.new_full((size,), -1).scatter_reduce(0, keys.flatten(), writer.flatten(), "amax")


def slot_targets(assign: LevelAssignment, n_slots: int, grid: tuple[int, int], guided: bool) -> SlotTargets:
    """Which slots train, on which object: the release's per-object writes, all at once. An object
    trains two slots at its cell: the positive one (`slot`: its anchor's, or the anchor-free one if
    that fits better) learns box, objectness and class; its anchor's slot (and, guided, the anchor-free
    one) learns the guided shape. A later object takes a slot written twice (last_writer); rows not
    `on` write nothing. Flat index of slot s at cell (j, i) of image b: ((b * S + s) * H + j) * W + i.
    Example (stride 8, 32 x 32 cells, S = 4): objects 0 (20 x 20) and 1 (18 x 24) in cell (i, j) =
    (12, 7), both matched best by anchor (16, 30), slot 1 (index (1 * 32 + 7) * 32 + 12 = 1260; free
    slot 3: 3308). Positive writes 1260 <- 0, 1: slot_row[1260] = 1, pos_row [1, 1], positive [False,
    True]: one positive, object 1's. Shape writes 1260 <- 0, 1 and 3308 <- 0, 1: shape_last [[False,
    False], [True, True]]: both learn object 1's shape. (With different anchors both would be positive.)"""
    (H, W), flat = grid, lambda slot: ((assign.image * n_slots + slot) * H + assign.j) * W + assign.i
    rows = torch.arange(len(assign.gt), device=assign.gt.device)              # (n,)
    pos = flat(assign.slot)                                                    # (n,) positive slots
    shape_slots = [assign.anchor_slot] + ([torch.full_like(assign.slot, FREE_SLOT)] if guided else [])
    shape_pos = torch.stack([flat(s) for s in shape_slots], dim=1)            # (n, K) shape slots
    slot_row = last_writer(pos[:, None], assign.on, assign.batch * n_slots * H * W)  # (B*S*H*W,)
    shape_row = last_writer(shape_pos, assign.on, len(slot_row))              # (B*S*H*W,)
    pos_row = torch.where(assign.on, slot_row[pos], rows)                     # (n,)
    box_row = torch.where(assign.on, shape_row[pos], rows)   # (n,) a positive slot is a shape slot too
    shape_last = assign.on[:, None] & (shape_row[shape_pos] == rows[:, None])  # (n, K)
    return SlotTargets(slot_row, pos_row, assign.on & (pos_row == rows), box_row, shape_last)


def ignore_mask(level: Level, gt: GroundTruth, ignore_thre: float) -> Tensor:
    """(B, S, H, W) bool: predictions whose decoded box has IoU > ignore_thre (in (0, 1]) with any valid
    object of their image, all pairs, IGNORE_CHUNK at a time. No objectness loss there (YOLOv3; 0.7)."""
    if not 0 < ignore_thre <= 1:
        raise ValueError(f"ignore_thre must lie in (0, 1], got {ignore_thre}")
    (B, S, _, H, W), g = level.pred.shape, level.anchor_log
    with torch.no_grad():            # every slot, decoded as Level.boxes decodes it (g bounded)
        g = None if g is None else g.clamp(-MAX_ANCHOR_LOG, MAX_ANCHOR_LOG)   # (B, S, 2, H, W)
        boxes = decode_level(level.pred[:, :, :4], g, level.stride, level.sizes)  # (B, S, H, W, 4)
    boxes = boxes.view(B, -1, 4).mT.contiguous().mT[:, None]  # (B, 1, S*H*W, 4) held as x, y, w, h planes
    objects, valid = gt.box.view(B, -1, 1, 4), gt.valid.view(B, -1, 1)        # (B, T, 1, 4), (B, T, 1)
    mask = torch.zeros(B, S * H * W, dtype=torch.bool, device=boxes.device)  # (B, S*H*W)
    for t in range(0, valid.shape[1], step := max(1, IGNORE_CHUNK // (B * S * H * W))):  # objects a chunk
        iou = iou_cxcywh(boxes, objects[:, t:t + step])                        # (B, step, S*H*W)
        mask |= ((iou > ignore_thre) & valid[:, t:t + step]).any(dim=1)
    return mask.view(B, S, H, W)


def cell_span(centre: Tensor, half: Tensor, stride: int, n: int) -> tuple[Tensor, Tensor]:
    """First, last of the n cells (`stride` px) that centre +- half overlaps (half 0: centre's), clamped."""
    lo = torch.floor((centre - half) / stride).long()                          # (...)
    hi = torch.maximum(lo, torch.ceil((centre + half) / stride).long() - 1)   # (...)
    return lo.clamp(0, n - 1), hi.clamp(0, n - 1)


def adjacent_ignore(assign: dict[int, LevelAssignment], gt: GroundTruth, batch: int,
                    grids: dict[int, tuple[int, int]], ratio: float) -> dict[int, Tensor]:
    """Table 2: on the levels next to an object's level, ignore (all slots of) the cells that
    overlap its centre region ratio * (w, h) (ratio 0: the centre's cell) -> {stride: (B, H, W)}."""
    out = {s: torch.zeros(batch, *grids[s], dtype=torch.bool, device=gt.box.device) for s in STRIDES}
    for level, stride in enumerate(STRIDES):
        a = assign[stride]
        box, half = gt.box[a.gt], ratio * gt.box[a.gt, 2:] / 2                 # (n, 4), (n, 2)
        for neighbour in (n for n in STRIDES[max(level - 1, 0):level + 2] if n != stride):
            H, W = grids[neighbour]
            i0, i1 = cell_span(box[:, 0, None, None], half[:, 0, None, None], neighbour, W)  # (n, 1, 1)
            j0, j1 = cell_span(box[:, 1, None, None], half[:, 1, None, None], neighbour, H)  # (n, 1, 1)
            i, j = torch.arange(W, device=box.device), torch.arange(H, device=box.device)[:, None]
            covered = a.on[:, None, None] & (i >= i0) & (i <= i1) & (j >= j0) & (j <= j1)  # (n, H, W)
            out[neighbour] |= box.new_zeros(batch, H, W).index_add_(0, a.image, covered.to(box)) > 0
    return out


# ---------------------------------------------------------------------------------------------
# Loss terms (each a sum over elements; level_loss divides by the batch size)
def box_weight(wh: Tensor, image_area: float) -> Tensor:
    """The release's tgt_scale = 2 - w*h / image area (small boxes count up to twice; w*h capped)."""
    return 2 - (wh[:, 0] * wh[:, 1]).clamp(max=image_area) / image_area


def anchor_loss(anchor_wh: Tensor, gt_wh: Tensor, form: str, weight: Tensor | None = None) -> Tensor:
    """Guided-anchor shape IoU loss (Sec. 3.1), centred shapes, x weight (..., None: 1); (..., 2) -> ()."""
    l_iou = iou_loss_form(shape_iou(anchor_wh, gt_wh), form)                  # (...)
    return (l_iou if weight is None else weight * l_iou).sum()


def box_loss(boxes: Tensor, gt_boxes: Tensor, weight: Tensor, form: str) -> Tensor:
    """Box IoU loss (Sec. 3.1): weight * L_IoU(decoded box, object box); (P, 4) -> ()."""
    return (weight * iou_loss_form(iou_cxcywh(boxes, gt_boxes), form)).sum()


def offset_loss(txy: Tensor, target_xy: Tensor, weight: Tensor) -> Tensor:
    """YOLOv3 centre loss: weight * BCE(sigmoid(t), centre offset in its cell); (P, 2) -> ()."""
    bce = F.binary_cross_entropy_with_logits(txy, target_xy, reduction="none")  # (P, 2)
    return (weight[:, None] * bce).sum()


def size_loss(twh: Tensor, anchor_wh: Tensor, gt_wh: Tensor, weight: Tensor) -> Tensor:
    """YOLOv3 size loss: weight * |t - log(gt / guided anchor)| (+1e-12 as released); (P, 2) -> ().
    The anchor is not detached (as released): in effect |tw + gw - log(gt_w / A_w)|, training g."""
    target = torch.log(gt_wh / anchor_wh + 1e-12)                              # (P, 2)
    return (weight[:, None] * (twh - target).abs()).sum()


def objectness_loss(logit: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """BCE(obj, 0/1) x weight: 1 for negatives, 0 where ignored, the mix ratio at positives."""
    return F.binary_cross_entropy_with_logits(logit, target, weight, reduction="sum")


def class_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """BCE of the independent class sigmoids x weight (1 at the positives, None: 1); (P, C) -> ()."""
    return F.binary_cross_entropy_with_logits(logits, target, weight, reduction="sum")


def class_targets(pos_cls: Tensor, obj_cls: Tensor, pos_of: Tensor, num_classes: int,
                  label_smooth: bool, like: Tensor) -> Tensor:
    """(P, C) class targets: released smoothing (true class 1 - 1/C, others 1/C) from each row's (last)
    object's class pos_cls (P,); without, ones from every object obj_cls (n,) at its row pos_of (n,)."""
    P = len(pos_cls)
    if label_smooth:
        target = like.new_full((P, num_classes), 1 / num_classes)              # (P, C)
        target[torch.arange(P, device=like.device), pos_cls] = 1 - 1 / num_classes
    else:
        target = like.new_zeros(P, num_classes)                                # (P, C)
        target[pos_of, obj_cls] = 1
    return target


# ---------------------------------------------------------------------------------------------
# One level, then the whole objective
def level_loss(level: Level, gt: GroundTruth, assign: LevelAssignment, st: SlotTargets, ignored: Tensor, *,
               iou_loss: bool, shape_loss: bool, iou_form: str, label_smooth: bool) -> dict[str, Tensor]:
    """The six terms of one level, each a sum divided by the batch size; ignored (B, S, H, W). Every row
    is computed at its slots, weight 0 where it does not train (st.positive / shape_last False)."""
    B, S, _, H, W = level.pred.shape
    b, s, j, i = assign.image, assign.slot, assign.j, assign.i                 # (n,) each
    rows = level.pred[b, s, :, j, i]                                           # (n, 5+C)
    box, cell = gt.box[assign.gt], torch.stack([i, j], dim=1).to(gt.box)      # (n, 4), (n, 2)
    weight = box_weight(box[:, 2:], H * W * level.stride ** 2) * st.positive   # (n,) 0 off positives
    terms = {"anchor": level.pred.new_zeros(()), "iou": level.pred.new_zeros(()),
             "xy": offset_loss(rows[:, :2], (box[:, :2] / level.stride - cell).clamp(0, 1), weight),
             "wh": size_loss(rows[:, 2:4], level.anchors(b, s, j, i), box[:, 2:], weight)}
    if shape_loss:                       # both the anchor slot and the free slot learn the shape
        shape_slot = torch.stack([assign.anchor_slot, torch.full_like(s, FREE_SLOT)], dim=1)  # (n, 2)
        shape_anchor = level.anchors(b[:, None], shape_slot, j[:, None], i[:, None])  # (n, 2, 2)
        terms["anchor"] = anchor_loss(shape_anchor, box[:, None, 2:], iou_form, st.shape_last.to(box))
    if iou_loss:
        terms["iou"] = box_loss(level.boxes(b, s, j, i), box[st.box_row], weight, iou_form)
    positive, mix = st.slot_row >= 0, gt.mix[assign.gt][st.slot_row.clamp(min=0)]  # (B*S*H*W,) each
    obj_weight = torch.where(positive, mix, (~ignored).flatten().to(box))    # positives: mixup ratio
    terms["obj"] = objectness_loss(level.pred[:, :, 4].flatten(), positive.to(box), obj_weight)
    cls = gt.cls[assign.gt]                                                    # (n,)
    cls_target = class_targets(cls, cls, st.pos_row, rows.shape[1] - 5, label_smooth, box)  # (n, C)
    terms["cls"] = class_loss(rows[:, 5:], cls_target, st.positive[:, None].to(box))
    return {k: v / max(B, 1) for k, v in terms.items()}


def compute_loss(outputs: dict, targets, model, iou_loss: bool | None = None, iou_form: str = "1-iou^2",
                 ignore_thre: float = 0.7, ignore_ratio: float | None = None,
                 label_smooth: bool = True) -> dict[str, Tensor]:
    """The released objective over the three levels. Ablation switches: iou_loss, Table 1's IoU
    terms (None: model.guided; the anchor term needs it too); iou_form (IOU_FORMS); ignore_thre;
    ignore_ratio, Table 2's region (None: off, 0: the centre cell); label_smooth, as released."""
    if iou_form not in IOU_FORMS:
        raise ValueError(f"iou_form {iou_form!r} is not one of {IOU_FORMS}")
    iou_loss = model.guided if iou_loss is None else iou_loss
    levels = {s: Level(s, outputs[s]["pred"], outputs[s]["anchor_log"],   # host -> GPU, no wait
                       model.slot_sizes(s).to(outputs[s]["pred"], non_blocking=True)) for s in STRIDES}
    grids = {s: tuple(level.pred.shape[-2:]) for s, level in levels.items()}
    finest = levels[STRIDES[-1]]
    B, image_hw = finest.pred.shape[0], tuple(n * finest.stride for n in grids[finest.stride])
    gt = prepare_targets(targets, model.num_classes, image_hw, finest.pred.device, finest.pred.dtype)
    assign = assign_targets(gt, model.anchors, levels)
    adjacent = None if ignore_ratio is None else adjacent_ignore(assign, gt, B, grids, ignore_ratio)
    losses = {}
    for s, level in levels.items():
        ignored = ignore_mask(level, gt, ignore_thre)                          # (B, S, H, W)
        if adjacent is not None:
            ignored = ignored | adjacent[s][:, None]
        st = slot_targets(assign[s], level.pred.shape[1], grids[s], model.guided)
        terms = level_loss(level, gt, assign[s], st, ignored, iou_loss=iou_loss, iou_form=iou_form,
                           shape_loss=iou_loss and model.guided, label_smooth=label_smooth)
        terms["l1"] = terms["xy"] + terms["wh"]
        terms["total"] = terms["anchor"] + terms["iou"] + terms["l1"] + terms["obj"] + terms["cls"]
        losses.update({f"{k}_s{s}": v for k, v in terms.items()})
    losses.update({k: sum(losses[f"{k}_s{s}"] for s in STRIDES) for k in TERMS + ("xy", "wh")})
    return {**losses, "dropped": gt.dropped}


# ---------------------------------------------------------------------------------------------
# `python loss.py`: each term on a hand-made case (its speed: python tests/bench.py loss)
DEMO_OBJECTS = (   # [class, cx, cy, w, h, mix] in a 64 x 64 input; centres mid-cell at stride 8
    (0, 12, 12, 12, 14, 1.0),     # nearest anchor (10, 13)
    (1, 36, 20, 18, 28, 1.0),     # nearest anchor (16, 30)
    (2, 44, 44, 32, 30, 1.0),     # closer to the free slot's 32 x 32 than to any fixed anchor
    (1, 28, 36, 56, 48, 1.0))     # nearest anchor (62, 45): stride 16, not the level shown


def _demo_assignment(gt: GroundTruth, assign: LevelAssignment, anchors: Tensor) -> None:
    """One line per object: its best anchor and IoU, the free slot's IoU, its slot and cell."""
    print("object  class  (cx, cy, w, h)      best anchor  IoU   free-slot IoU  slot  cell (i, j)")
    for k, (cls, box) in enumerate(zip(gt.cls.tolist(), gt.box.tolist())):
        best = int(shape_iou(gt.box[k, 2:], anchors).argmax())
        line = f"{k:>6}  {cls:>5}  {str(tuple(map(int, box))):<20}{str(tuple(map(int, anchors[best]))):<13}"
        rows = (assign.gt == k).nonzero().flatten().tolist()
        if not rows:
            print(f"{line}its anchor is on another level: background here")
            continue
        r = rows[0]
        takeover = "  (the anchor-free slot takes it)" if assign.slot[r] == FREE_SLOT else ""
        print(f"{line}{assign.best_iou[r]:.2f}  {assign.free_iou[r]:>13.2f}  {int(assign.slot[r]):>4}  "
              f"({int(assign.i[r])}, {int(assign.j[r])}){takeover}")


def _demo() -> dict[str, tuple[float, float]]:
    """level_loss at stride 8 for DEMO_OBJECTS, the head predicting zeros, each term beside its sum
    by hand from the assignment table; returns {term: (value, by hand)} (tests/test_loss.py)."""
    (stride, size, C), H = (8, 64, 3), 64 // 8
    W, anchors = H, torch.tensor(RELEASED_ANCHORS, dtype=torch.float32)           # (9, 2)
    free = anchors.new_full((1, 2), FREE_SLOT_SCALE * stride)                    # the anchor-free slot
    sizes = torch.cat([anchors[list(ANCHOR_MASKS[stride])], free])                # (4, 2)
    level = Level(stride, torch.zeros(1, 4, 5 + C, H, W), torch.zeros(1, 4, 2, H, W), sizes)
    gt = prepare_targets([torch.tensor(DEMO_OBJECTS)], C, (size, size))
    assign = assign_targets(gt, anchors, {stride: level})[stride]
    st = slot_targets(assign, 4, (H, W), guided=True)
    ignored = ignore_mask(level, gt, 0.7)                                         # (1, 4, H, W)
    terms = level_loss(level, gt, assign, st, ignored, iou_loss=True, shape_loss=True, iou_form="1-iou^2",
                       label_smooth=True)
    assign = assign.compact()                                 # the objects of this level, to read
    print(f"One {size} x {size} image, {C} classes, stride {stride}: {H} x {W} cells x 4 slots (anchors "
          f"{sizes[:3].int().tolist()}, anchor-free {sizes[3].int().tolist()}).\nThe head predicts 0: each "
          "box is its slot's anchor centred in its cell, each probability 0.5.\n")
    _demo_assignment(gt, assign, anchors)
    P, n_ignored = int((st.slot_row >= 0).sum()), int((ignored.flatten() & (st.slot_row < 0)).sum())
    print(f"\n{P} positive slots, {n_ignored} ignored (decoded box IoU > 0.7 with an object: no "
          f"objectness loss), {4 * H * W - P - n_ignored} negatives.\n")
    box = gt.box[assign.gt]                                                       # (n, 4)
    w, ln2 = 2 - box[:, 2] * box[:, 3] / size ** 2, math.log(2)  # w: box_weight, small boxes count more
    pos_iou = torch.where(assign.slot == FREE_SLOT, assign.free_iou, assign.best_iou)  # (n,)
    wh_hand = w[:, None] * torch.log(box[:, 2:] / sizes[assign.slot]).abs()      # (n, 2)
    by_hand = {  # term: (the sum by hand, of what)
        "anchor": ((2 - assign.best_iou ** 2 - assign.free_iou ** 2).sum(), "1 - IoU^2 of the guided shape"
                   " at the anchor slot, + the same at the free slot"),
        "iou": ((w * (1 - pos_iou ** 2)).sum(), "w_box (1 - IoU^2) of the decoded box (centred)"),
        "xy": (w.sum() * 2 * ln2, "w_box BCE(0, 0.5) = w_box ln 2 for x and y (centres mid-cell)"),
        "wh": (wh_hand.sum(), "w_box |0 - log(w / anchor w)| + the same for h"),
        "obj": ((4 * H * W - n_ignored) * ln2, "ln 2 per slot not ignored, negative or positive"),
        "cls": (P * C * ln2, f"ln 2 per class ({C}) and positive ({P}), whatever the target")}
    print(f"{'term':<8}{'value':>8}{'by hand':>9}   sum of (w_box = 2 - w h / {size}^2: "
          f"{', '.join(f'{v:.3f}' for v in w.tolist())})")
    for name, (value, how) in by_hand.items():
        print(f"{name:<8}{terms[name].item():>8.3f}{float(value):>9.3f}   {how}")
    print("\nEach is divided by the batch size (1 here); total = the six terms over the three levels.")
    return {name: (terms[name].item(), float(value)) for name, (value, _) in by_hand.items()}


if __name__ == "__main__":
    _demo()
