"""Training objective: the YOLOv3 loss plus the strong baseline's IoU terms - Sec. 3.1, 3.3, 3.4.

Paper map:
- Sec. 3.1 / 3.4 (strong baseline): the YOLOv3 objective (BCE on centre offsets, L1 on log
  sizes, BCE objectness, BCE classes) plus an IoU loss on the guided-anchor shapes and on the
  decoded boxes. Table 1 switches the IoU loss (`iou_loss`) and guided anchoring (the model's
  `guided`) on and off.
- Sec. 3.3 (consistency): an object is positive at one cell of one level and background
  elsewhere, except where ignored; Table 2's adjacent-level ignore regions are `ignore_ratio`.

Entry point:
    compute_loss(outputs, targets, model, iou_loss=None, iou_form="1-iou^2", ignore_thre=0.7,
                 ignore_ratio=None, label_smooth=True) -> dict of 0-d tensors
      outputs: head.py's training output {stride: {"pred": (B, S, 5+C, H, W),
                                                    "shape": (B, S, 2, H, W) or None}}
      targets: B tensors (N_b, 6) = [class, cx, cy, w, h, mix] in input pixels
      returns total, anchor, iou, l1 (= xy + wh), xy, wh, obj, cls, the same per level as
      f"{term}_s{stride}", and `dropped` (boxes removed as invalid, int64).
The steps are functions of their own: prepare_targets -> assign_targets -> slot_targets ->
ignore_mask / adjacent_ignore -> level_loss (anchor_loss, box_loss, offset_loss, size_loss,
objectness_loss, class_loss). Every sum is divided by the batch size, as released.
`python loss.py` prints each term on a hand-made case (its speed: `python tests/bench.py loss`).

This is the authors' released objective (docs/released-code.md: assignment, loss terms, label
smoothing, guided-anchor gradient), including 1 - IoU^2 as the IoU loss, their label smoothing
(1 - 1/C and 1/C), the anchor-free slot's competition, the wh target carrying gradient into the
shape branch, and "the last object written to a slot wins" when two objects share a cell and
slot. It departs only on input the release
never sees: invalid boxes are dropped (counted), centres on or past the border use the nearest
cell, boxes larger than the image keep a box weight of 1, and -ln(IoU) clamps IoU at 1e-7.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from head import ANCHOR_MASKS, STRIDES

IOU_FORMS = ("1-iou^2", "-ln(iou)", "1-iou")
FREE_SLOT = 3          # the anchor-free slot follows the level's three anchor slots
UNION_EPS = 1e-16      # released: added to every IoU union
# Bound on a guided anchor's log-shape g before exp (Level.anchors). An object of 1 to 1333 px
# against base sizes of 10 to 373 px needs |g| < ln(373) = 5.9; at ln(1e4) = 9.2 an anchor is
# 10^4 times (or 1/10^4 of) its base size, at most 3.7e6 px, and its area (1.4e13) is finite in
# float32, where exp(g) alone overflows above g = 88.7 (a diverging run reached g = 136.6).
MAX_LOG_SHAPE = math.log(1e4)


class GroundTruth(NamedTuple):
    """The valid objects of a batch, flattened image by image, rows in their original order."""
    image: Tensor    # (N,) int64 image index b
    row: Tensor      # (N,) int64 row in that image's target tensor
    cls: Tensor      # (N,) int64 class
    box: Tensor      # (N, 4) cx, cy, w, h in input pixels
    mix: Tensor      # (N,) mixup ratio of the object's image
    dropped: Tensor  # () int64, rows removed as invalid


class LevelAssignment(NamedTuple):
    """One row per object whose best anchor lies on this level, in object order."""
    gt: Tensor           # (n,) index into GroundTruth
    image: Tensor        # (n,) b
    i: Tensor            # (n,) cell column
    j: Tensor            # (n,) cell row
    anchor_slot: Tensor  # (n,) slot of the best anchor, 0..2
    slot: Tensor         # (n,) positive slot, 0..2 or FREE_SLOT
    best_iou: Tensor     # (n,) shape IoU with the best of the 9 anchors
    free_iou: Tensor     # (n,) shape IoU with the predicted free-slot shape (0 when not guided)
    best_anchor: Tensor  # (n,) index 0..8 of the best anchor


class SlotTargets(NamedTuple):
    """Targets of one level, resolved as the release writes them (a later object overwrites)."""
    pos: Tensor          # (P,) flat (b, s, j, i) index of each positive slot
    pos_gt: Tensor       # (P,) object last written there: offsets, sizes, class, mix, weight
    pos_box_gt: Tensor   # (P,) object whose box the IoU loss compares with (last box written)
    pos_of: Tensor       # (n,) positive row of each assigned object (for multi-hot classes)
    shape: Tensor        # (K,) flat index of each anchor-shape slot (anchor slot + free slot)
    shape_gt: Tensor     # (K,) object last written there


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of (cx, cy, w, h) boxes, broadcasting (..., 4) x (..., 4) -> (...)."""
    overlap = (torch.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)
               - torch.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2))
    overlap = overlap.clamp(min=0)                                             # (..., 2)
    inter = overlap[..., 0] * overlap[..., 1]                                  # (...)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter + UNION_EPS)


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of two boxes sharing a centre (shapes only), (..., 2) x (..., 2) -> (...)."""
    inter = torch.minimum(wh1[..., 0], wh2[..., 0]) * torch.minimum(wh1[..., 1], wh2[..., 1])
    return inter / (wh1[..., 0] * wh1[..., 1] + wh2[..., 0] * wh2[..., 1] - inter + UNION_EPS)


def iou_loss_form(iou: Tensor, form: str) -> Tensor:
    """The IoU loss of Sec. 3.1 in one of three forms.

    The paper cites UnitBox's -ln(IoU); the release uses 1 - IoU^2 (and never says why). Its
    gradient 2 * IoU * dIoU fades as boxes stop overlapping instead of growing like
    -ln(IoU)'s dIoU / IoU, so poor early boxes cannot dominate; the BCE/L1 terms move those.
    """
    if form == "1-iou^2":
        return 1 - iou ** 2
    if form == "-ln(iou)":
        return -torch.log(iou.clamp(min=1e-7))
    if form == "1-iou":
        return 1 - iou
    raise ValueError(f"iou_form {form!r} is not one of {IOU_FORMS}")


def decode_boxes(t: Tensor, anchor_wh: Tensor, cell: Tensor, stride: int) -> Tensor:
    """head.decode_level's box at chosen slots: cx = (sigmoid(tx) + i) * stride, w = exp(tw) * A_w.

    t (..., 4) raw [tx, ty, tw, th]; anchor_wh (..., 2) guided anchor; cell (..., 2) (i, j).
    """
    xy = (torch.sigmoid(t[..., :2]) + cell) * stride                           # (..., 2)
    wh = torch.exp(t[..., 2:4]) * anchor_wh                                    # (..., 2)
    return torch.cat([xy, wh], dim=-1)                                         # (..., 4)


class Level(NamedTuple):
    """One level's raw head output. The loss reads it only at chosen slots (b, s, j, i), never
    decoding the whole grid: that is what keeps it fast."""
    stride: int
    pred: Tensor           # (B, S, 5+C, H, W) raw [tx, ty, tw, th, obj, cls...]
    shape: Tensor | None   # (B, S, 2, H, W) raw log shape factors g; None when not guided
    sizes: Tensor          # (S, 2) base size A of each slot (model.slot_sizes)

    def anchors(self, b: Tensor, s: Tensor, j: Tensor, i: Tensor) -> Tensor:
        """Guided anchors A * exp(g) at the given slots (head.anchor_shapes), g bounded by
        MAX_LOG_SHAPE so that a diverging shape branch gives a finite loss; (...) -> (..., 2)."""
        if self.shape is None:
            return self.sizes[s]                                               # (..., 2)
        g = self.shape[b, s, :, j, i].clamp(-MAX_LOG_SHAPE, MAX_LOG_SHAPE)     # (..., 2)
        return self.sizes[s] * torch.exp(g)                                    # (..., 2)

    def boxes(self, b: Tensor, s: Tensor, j: Tensor, i: Tensor) -> Tensor:
        """Decoded boxes of the given slots; (...) -> (..., 4)."""
        cell = torch.stack([i, j], dim=-1).to(self.pred)                       # (..., 2)
        t = self.pred[:, :, :4][b, s, :, j, i]                                 # (..., 4)
        return decode_boxes(t, self.anchors(b, s, j, i), cell, self.stride)


# ---------------------------------------------------------------------------------------------
# Targets and assignment
# ---------------------------------------------------------------------------------------------
def prepare_targets(targets, num_classes: int, image_hw: tuple[int, int],
                    device=None, dtype=torch.float32) -> GroundTruth:
    """Validate, flatten and filter the per-image (N_b, 6) targets.

    A class id outside [0, num_classes) (or not an integer) raises ValueError naming it and its
    image; boxes with w <= 0, h <= 0, non-finite numbers or no overlap with the image are dropped
    and counted.
    """
    for b, t in enumerate(targets):
        if t.dim() != 2 or t.shape[1] != 6:
            raise ValueError(f"targets of image {b} have shape {tuple(t.shape)}, expected (N, 6)")
    rows = torch.cat([t.to(device=device, dtype=dtype) for t in targets]
                     + [torch.zeros(0, 6, device=device, dtype=dtype)])        # (N_all, 6)
    counts = torch.tensor([len(t) for t in targets], device=device, dtype=torch.long)
    image = torch.repeat_interleave(torch.arange(len(targets), device=device), counts)  # (N_all,)
    start = torch.cumsum(counts, 0) - counts                                  # (B,)
    row = torch.arange(len(rows), device=device) - start[image]               # (N_all,)
    cls = rows[:, 0]
    bad = ~torch.isfinite(cls) | (cls < 0) | (cls >= num_classes) | (cls != cls.round())
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"class id {cls[k].item()} in image {int(image[k])} (row {int(row[k])}) "
                         f"is outside [0, {num_classes})")
    cx, cy, w, h = rows[:, 1:5].unbind(1)
    H, W = image_hw
    keep = (torch.isfinite(rows[:, 1:6]).all(1) & (w > 0) & (h > 0)
            & (cx + w / 2 > 0) & (cx - w / 2 < W) & (cy + h / 2 > 0) & (cy - h / 2 < H))
    return GroundTruth(image[keep], row[keep], cls[keep].long(), rows[keep, 1:5],
                       rows[keep, 5], (~keep).sum())


def assign_targets(gt: GroundTruth, anchors: Tensor, levels: dict[int, Level]
                   ) -> dict[int, LevelAssignment]:
    """Level, cell and slot of every object (Sec. 3.1; docs/released-code.md, assignment).

    The best of the 9 anchors by shape IoU picks the level and the anchor slot a; the cell holds
    the centre (i = floor(cx / stride), clamped into the grid). When guided, the anchor-free slot
    takes the object if its predicted shape 4 * stride * exp(g) at that cell overlaps the object
    better than the best fixed anchor does (a strict >, as released).
    """
    ious = shape_iou(gt.box[:, None, 2:], anchors.to(gt.box)[None])          # (N, 9)
    best_iou, best = ious.max(dim=1)                                           # (N,), (N,)
    out = {}
    for stride, level in levels.items():
        mask = torch.tensor(ANCHOR_MASKS[stride], device=best.device)
        n, a = (best[:, None] == mask).nonzero().unbind(1)                     # (n,) gt, (n,) slot
        H, W = level.pred.shape[-2:]
        i = torch.floor(gt.box[n, 0] / stride).long().clamp(0, W - 1)          # (n,)
        j = torch.floor(gt.box[n, 1] / stride).long().clamp(0, H - 1)          # (n,)
        b = gt.image[n]
        slot, free_iou = a, torch.zeros_like(best_iou[n])
        if level.shape is not None:
            free_wh = level.anchors(b, torch.full_like(a, FREE_SLOT), j, i).detach()  # (n, 2)
            free_iou = shape_iou(gt.box[n, 2:], free_wh)                       # (n,)
            slot = torch.where(free_iou > best_iou[n], FREE_SLOT, a)
        out[stride] = LevelAssignment(n, b, i, j, a, slot, best_iou[n], free_iou, best[n])
    return out


def last_writer(keys: Tensor, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each distinct key, the largest `order` among its writers (the release's last write).

    Returns (sorted distinct keys (U,), winning order (U,), position in U of each write (K,)).
    """
    uniq, inverse = torch.unique(keys, return_inverse=True)                   # (U,), (K,)
    winner = torch.full_like(uniq, -1).scatter_reduce(0, inverse, order, "amax")  # (U,)
    return uniq, winner, inverse


def slot_targets(assign: LevelAssignment, n_slots: int, grid: tuple[int, int],
                 guided: bool) -> SlotTargets:
    """Which slots are positive / learn a shape, and which object each one learns.

    The release loops over objects and writes into dense target tensors, so a later object on
    the same cell and slot overwrites an earlier one. Here every write is a (slot index, object)
    pair and the last writer of each slot is found at once. Every object writes its box into its
    anchor slot and, when guided, into the free slot (anchor-shape targets, step 4); its positive
    slot gets offsets, sizes, class and objectness.
    """
    H, W = grid
    cell = assign.j * W + assign.i                                             # (n,)
    base = assign.image * (n_slots * H * W) + cell                             # (n,) slot 0 index
    pos, pos_gt, pos_of = last_writer(base + assign.slot * H * W, assign.gt)
    shape_slots = [assign.anchor_slot] + ([torch.full_like(cell, FREE_SLOT)] if guided else [])
    shape_keys = torch.cat([base + s * H * W for s in shape_slots])           # (K,)
    shape, shape_gt, _ = last_writer(shape_keys, assign.gt.repeat(len(shape_slots)))
    pos_box_gt = shape_gt[torch.searchsorted(shape, pos)]                     # (P,)
    return SlotTargets(pos, pos_gt, pos_box_gt, pos_of, shape, shape_gt)


def ignore_candidates(gt: GroundTruth, stride: int, grid: tuple[int, int], ignore_thre: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(object, row j, column i) of every cell whose predictions might reach IoU > t with it.

    IoU > t needs the x-overlap ox > t * max(w_p, w_g) (inter <= ox * min(h), union >= either
    area), and ox <= (w_p + w_g) / 2 - |dx|; so the centres are closer than D * w_g with
    D = (1 - t) * max(1, 1 / (2t)), likewise in y. Cells touching that window are kept (0.1%
    slack for rounding); the exact IoU then decides. At 608 with 20 objects an image this is
    ~80x fewer (prediction, object) pairs than all of them.
    """
    H, W = grid
    D = (1 - ignore_thre) * max(1.0, 1 / (2 * ignore_thre)) * 1.001
    limit = torch.tensor([W - 1, H - 1], device=gt.box.device)
    lo = torch.ceil((gt.box[:, :2] - D * gt.box[:, 2:]) / stride).long() - 1  # (N, 2) i0, j0
    hi = torch.floor((gt.box[:, :2] + D * gt.box[:, 2:]) / stride).long()     # (N, 2) i1, j1
    lo, hi = lo.clamp(min=0).minimum(limit), hi.clamp(min=0).minimum(limit)
    size = (hi - lo + 1).clamp(min=0)                                          # (N, 2) x, y cells
    count = size[:, 0] * size[:, 1]                                            # (N,)
    g = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)  # (T,)
    k = torch.arange(len(g), device=g.device) - (torch.cumsum(count, 0) - count)[g]     # (T,)
    return g, lo[g, 1] + k // size[g, 0], lo[g, 0] + k % size[g, 0]


def ignore_mask(level: Level, gt: GroundTruth, ignore_thre: float) -> Tensor:
    """(B, S, H, W) bool: predictions whose decoded box has IoU > ignore_thre (in (0, 1]) with any
    object of their image. They get no objectness loss (YOLOv3's rule; released at 0.7)."""
    if not 0 < ignore_thre <= 1:
        raise ValueError(f"ignore_thre must lie in (0, 1], got {ignore_thre}")
    B, S, _, H, W = level.pred.shape
    mask = torch.zeros(B * S * H * W, dtype=torch.bool, device=level.pred.device)
    g, j, i = ignore_candidates(gt, level.stride, (H, W), ignore_thre)        # (T,) each
    b, s = gt.image[g, None], torch.arange(S, device=g.device)                 # (T, 1), (S,)
    j, i = j[:, None], i[:, None]                                              # (T, 1)
    with torch.no_grad():
        iou = box_iou(level.boxes(b, s, j, i), gt.box[g, None])                # (T, S)
    flat = ((b * S + s) * H + j) * W + i                                       # (T, S)
    mask[flat[iou > ignore_thre]] = True
    return mask.view(B, S, H, W)


def adjacent_ignore(assign: dict[int, LevelAssignment], gt: GroundTruth, batch: int,
                    grids: dict[int, tuple[int, int]], ratio: float) -> dict[int, Tensor]:
    """Table 2: on the levels next to an object's level, ignore the cells its centre region covers.

    The region is ratio * (w, h) around the centre (ratio 0: the centre's cell only); a cell is
    covered when it overlaps the region. Returns {stride: (B, H, W) bool}, all slots ignored.
    """
    device = gt.box.device
    out = {s: torch.zeros(batch, *grids[s], dtype=torch.bool, device=device) for s in STRIDES}
    for level, stride in enumerate(STRIDES):
        box = gt.box[assign[stride].gt]                                        # (n, 4)
        half = ratio * box[:, 2:] / 2                                          # (n, 2)
        for neighbour in STRIDES[max(level - 1, 0):level + 2]:
            if neighbour == stride or len(box) == 0:
                continue
            H, W = grids[neighbour]
            size = torch.tensor([W - 1, H - 1], device=box.device)
            lo = torch.floor((box[:, :2] - half) / neighbour).long()           # (n, 2) i0, j0
            hi = torch.maximum(lo, torch.ceil((box[:, :2] + half) / neighbour).long() - 1)
            lo, hi = lo.clamp(min=0).minimum(size), hi.clamp(min=0).minimum(size)
            i = torch.arange(W, device=box.device)
            j = torch.arange(H, device=box.device)[:, None]
            covered = ((i >= lo[:, None, None, 0]) & (i <= hi[:, None, None, 0])
                       & (j >= lo[:, None, None, 1]) & (j <= hi[:, None, None, 1]))  # (n, H, W)
            per_image = torch.zeros(batch, H, W, device=box.device)
            out[neighbour] |= per_image.index_add_(0, assign[stride].image, covered.float()) > 0
    return out


# ---------------------------------------------------------------------------------------------
# Loss terms (each a sum over elements; level_loss divides by the batch size)
# ---------------------------------------------------------------------------------------------
def box_weight(wh: Tensor, image_area: float) -> Tensor:
    """The release's tgt_scale = 2 - w*h / image area (small boxes count up to twice); (P,).

    w*h is capped at the image area so boxes larger than the image keep a weight of 1.
    """
    return 2 - (wh[:, 0] * wh[:, 1]).clamp(max=image_area) / image_area


def anchor_loss(anchor_wh: Tensor, gt_wh: Tensor, form: str) -> Tensor:
    """Guided-anchor shape IoU loss (Sec. 3.1), centred shapes; (K, 2) x (K, 2) -> ()."""
    return iou_loss_form(shape_iou(anchor_wh, gt_wh), form).sum()


def box_loss(boxes: Tensor, gt_boxes: Tensor, weight: Tensor, form: str) -> Tensor:
    """Box IoU loss (Sec. 3.1): weight * L_IoU(decoded box, object box); (P, 4) -> ()."""
    return (weight * iou_loss_form(box_iou(boxes, gt_boxes), form)).sum()


def offset_loss(txy: Tensor, target_xy: Tensor, weight: Tensor) -> Tensor:
    """YOLOv3 centre loss: weight * BCE(sigmoid(t), centre offset in its cell); (P, 2) -> ()."""
    bce = F.binary_cross_entropy_with_logits(txy, target_xy, reduction="none")  # (P, 2)
    return (weight[:, None] * bce).sum()


def size_loss(twh: Tensor, anchor_wh: Tensor, gt_wh: Tensor, weight: Tensor) -> Tensor:
    """YOLOv3 size loss: weight * |t - log(gt / guided anchor)|; (P, 2) -> ().

    The guided anchor is not detached (docs/released-code.md, guided-anchor gradient): the target
    moves with exp(g), so this term trains the shape branch too, in effect
    |tw + gw - log(gt_w / A_w)|. The 1e-12 is released.
    """
    target = torch.log(gt_wh / anchor_wh + 1e-12)                              # (P, 2)
    return (weight[:, None] * (twh - target).abs()).sum()


def objectness_loss(logit: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """BCE(obj, 0/1) x weight: 1 for negatives, 0 where ignored, the mix ratio at positives."""
    return F.binary_cross_entropy_with_logits(logit, target, weight, reduction="sum")


def class_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE of the independent class sigmoids at the positives, weight 1; (P, C) -> ()."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")


def class_targets(pos_cls: Tensor, obj_cls: Tensor, pos_of: Tensor, num_classes: int,
                  label_smooth: bool, like: Tensor) -> Tensor:
    """(P, C) class targets from the last object of each positive (pos_cls (P,)) or, without
    smoothing, from every object written there (obj_cls (n,) at rows pos_of (n,)).

    Released smoothing: the true class 1 - 1/C and every other class 1/C (not the usual eps/C);
    it rewrites the whole row, so the last object wins. Without it the release only writes ones,
    so objects sharing a slot leave a multi-hot row.
    """
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
# ---------------------------------------------------------------------------------------------
def level_loss(level: Level, gt: GroundTruth, assign: LevelAssignment, st: SlotTargets,
               ignored: Tensor, *, iou_loss: bool, shape_loss: bool, iou_form: str,
               label_smooth: bool) -> dict[str, Tensor]:
    """The six terms of one level, each summed and divided by the batch size (as released).

    ignored (B, S, H, W) bool; st from slot_targets.
    """
    B, S, _, H, W = level.pred.shape
    b, s, j, i = torch.unravel_index(st.pos, (B, S, H, W))                     # (P,) each
    rows = level.pred[b, s, :, j, i]                                           # (P, 5+C)
    pos_anchor = level.anchors(b, s, j, i)                                     # (P, 2)
    box = gt.box[st.pos_gt]                                                    # (P, 4)
    cell = torch.stack([i, j], dim=1).to(box)                                  # (P, 2)
    weight = box_weight(box[:, 2:], H * W * level.stride ** 2)                 # (P,)
    zero = level.pred.new_zeros(())
    terms = {
        "anchor": zero, "iou": zero,
        "xy": offset_loss(rows[:, :2], (box[:, :2] / level.stride - cell).clamp(0, 1), weight),
        "wh": size_loss(rows[:, 2:4], pos_anchor, box[:, 2:], weight),
    }
    if shape_loss:                       # both the anchor slot and the free slot learn the shape
        shape_anchor = level.anchors(*torch.unravel_index(st.shape, (B, S, H, W)))  # (K, 2)
        terms["anchor"] = anchor_loss(shape_anchor, gt.box[st.shape_gt, 2:], iou_form)
    if iou_loss:
        boxes = decode_boxes(rows[:, :4], pos_anchor, cell, level.stride)     # (P, 4)
        terms["iou"] = box_loss(boxes, gt.box[st.pos_box_gt], weight, iou_form)
    obj_weight = (~ignored).to(box).flatten()                                 # (B*S*H*W,)
    obj_weight[st.pos] = gt.mix[st.pos_gt]                # positives set back, weighted by mixup
    obj_target = torch.zeros_like(obj_weight).index_fill_(0, st.pos, 1.0)    # (B*S*H*W,)
    terms["obj"] = objectness_loss(level.pred[:, :, 4].flatten(), obj_target, obj_weight)
    cls_target = class_targets(gt.cls[st.pos_gt], gt.cls[assign.gt], st.pos_of,
                               rows.shape[1] - 5, label_smooth, box)           # (P, C)
    terms["cls"] = class_loss(rows[:, 5:], cls_target)
    return {k: v / max(B, 1) for k, v in terms.items()}


def compute_loss(outputs: dict, targets, model, iou_loss: bool | None = None,
                 iou_form: str = "1-iou^2", ignore_thre: float = 0.7,
                 ignore_ratio: float | None = None, label_smooth: bool = True,
                 ) -> dict[str, Tensor]:
    """The released training objective over the three levels (see the module docstring).

    Switches (paper ablations): iou_loss - Table 1's IoU terms (None: on when the model is guided,
    off for plain YOLOv3; the anchor-shape term also needs model.guided); iou_form - one of
    IOU_FORMS; ignore_thre - YOLOv3's ignore threshold; ignore_ratio - Table 2's adjacent-level
    ignore region (None: off, 0: the centre cell); label_smooth - the release's smoothing.
    """
    if iou_form not in IOU_FORMS:
        raise ValueError(f"iou_form {iou_form!r} is not one of {IOU_FORMS}")
    iou_loss = model.guided if iou_loss is None else iou_loss
    levels = {s: Level(s, outputs[s]["pred"], outputs[s]["shape"],
                       model.slot_sizes(s).to(outputs[s]["pred"])) for s in STRIDES}
    grids = {s: tuple(level.pred.shape[-2:]) for s, level in levels.items()}
    finest = levels[STRIDES[-1]]
    B = finest.pred.shape[0]
    image_hw = (grids[finest.stride][0] * finest.stride, grids[finest.stride][1] * finest.stride)
    gt = prepare_targets(targets, model.num_classes, image_hw, finest.pred.device,
                         finest.pred.dtype)
    assign = assign_targets(gt, model.anchors, levels)
    adjacent = None
    if ignore_ratio is not None:
        adjacent = adjacent_ignore(assign, gt, B, grids, ignore_ratio)         # {s: (B, H, W)}
    losses = {}
    for s, level in levels.items():
        ignored = ignore_mask(level, gt, ignore_thre)                          # (B, S, H, W)
        if adjacent is not None:
            ignored = ignored | adjacent[s][:, None]
        st = slot_targets(assign[s], level.pred.shape[1], grids[s], model.guided)
        terms = level_loss(level, gt, assign[s], st, ignored, iou_loss=iou_loss,
                           shape_loss=iou_loss and model.guided, iou_form=iou_form,
                           label_smooth=label_smooth)
        terms["l1"] = terms["xy"] + terms["wh"]
        terms["total"] = terms["anchor"] + terms["iou"] + terms["l1"] + terms["obj"] + terms["cls"]
        losses.update({f"{k}_s{s}": v for k, v in terms.items()})
    for k in ("total", "anchor", "iou", "l1", "xy", "wh", "obj", "cls"):
        losses[k] = sum(losses[f"{k}_s{s}"] for s in STRIDES)
    losses["dropped"] = gt.dropped
    return losses


# ---------------------------------------------------------------------------------------------
# `python loss.py`: each term on a hand-made case (its speed: python tests/bench.py loss)
# ---------------------------------------------------------------------------------------------
DEMO_OBJECTS = (   # [class, cx, cy, w, h, mix] in a 64 x 64 input; centres mid-cell at stride 8
    (0, 12, 12, 12, 14, 1.0),     # nearest anchor (10, 13)
    (1, 36, 20, 18, 28, 1.0),     # nearest anchor (16, 30)
    (2, 44, 44, 32, 30, 1.0),     # closer to the free slot's 32 x 32 than to any fixed anchor
    (1, 28, 36, 56, 48, 1.0),     # nearest anchor (62, 45): stride 16, not the level shown
)


def _demo_assignment(gt: GroundTruth, assign: LevelAssignment, st: SlotTargets, ignored: Tensor,
                     anchors: Tensor) -> int:
    """One line per object: its best anchor, the free slot's IoU, the slot and cell it gets; then
    the ignored slots that are not positive (returns their number)."""
    from head import ANCHOR_MASKS
    print("object  class  (cx, cy, w, h)      best anchor  IoU   free-slot IoU  slot  cell (i, j)")
    for k, (cls, box) in enumerate(zip(gt.cls.tolist(), gt.box.tolist())):
        best = int(shape_iou(gt.box[k, 2:], anchors).argmax())
        shown = "(" + ", ".join(f"{v:g}" for v in box) + ")"
        where = f"{shown:<20}{str(tuple(anchors[best].int().tolist())):<13}"
        rows = (assign.gt == k).nonzero().flatten().tolist()
        if not rows:
            stride = next(s for s, mask in ANCHOR_MASKS.items() if best in mask)
            print(f"{k:>6}  {cls:>5}  {where}its level is stride {stride}: background here")
            continue
        r = rows[0]
        slot = int(assign.slot[r])
        takeover = "  (the anchor-free slot takes it)" if slot == FREE_SLOT else ""
        print(f"{k:>6}  {cls:>5}  {where}{assign.best_iou[r]:.2f}  {assign.free_iou[r]:>13.2f}  "
              f"{slot:>4}  ({int(assign.i[r])}, {int(assign.j[r])}){takeover}")
    extra = ignored.flatten().clone()                                             # (B*S*H*W,)
    extra[st.pos] = False                                 # positives are never ignored
    _, s, j, i = torch.unravel_index(extra.nonzero().flatten(), ignored.shape)    # (K,) each
    where = [f"slot {a} of cell ({b}, {c})" for a, b, c in zip(s.tolist(), i.tolist(), j.tolist())]
    print(f"\n{len(st.pos)} positive slots. Ignored (decoded box IoU > 0.7 with an object, so no "
          f"objectness loss): {', '.join(where) or 'none'}. Every other slot is a negative.\n")
    return len(where)


def _demo() -> dict[str, tuple[float, float]]:
    """The six terms of level_loss at stride 8 for DEMO_OBJECTS, when the head predicts zeros
    everywhere: every box is its slot's anchor at its cell's centre (the guided anchor exp(0)
    times the base size), every objectness and class probability 0.5. Each term is printed
    beside the same sum worked out from the numbers in the assignment table; returns
    {term: (value, by hand)} (tests/test_loss.py checks them)."""
    from head import ANCHOR_MASKS, FREE_SLOT_SCALE, RELEASED_ANCHORS
    stride, size, C = 8, 64, 3
    H = W = size // stride
    sizes = torch.tensor([RELEASED_ANCHORS[a] for a in ANCHOR_MASKS[stride]]
                         + [(FREE_SLOT_SCALE * stride,) * 2], dtype=torch.float32)  # (4, 2)
    level = Level(stride, torch.zeros(1, 4, 5 + C, H, W), torch.zeros(1, 4, 2, H, W), sizes)
    anchors = torch.tensor(RELEASED_ANCHORS, dtype=torch.float32)                 # (9, 2)
    gt = prepare_targets([torch.tensor(DEMO_OBJECTS)], C, (size, size))
    assign = assign_targets(gt, anchors, {stride: level})[stride]
    st = slot_targets(assign, 4, (H, W), guided=True)
    ignored = ignore_mask(level, gt, 0.7)                                         # (1, 4, H, W)
    terms = level_loss(level, gt, assign, st, ignored, iou_loss=True, shape_loss=True,
                       iou_form="1-iou^2", label_smooth=True)
    print(f"One {size} x {size} image, {C} classes, the stride-{stride} level: {H} x {W} cells x 4 "
          f"slots (anchors {', '.join(str(tuple(a)) for a in sizes[:3].int().tolist())} and the "
          f"anchor-free slot's {int(sizes[3, 0])} x {int(sizes[3, 1])}).\nThe head predicts 0 "
          "everywhere: each box is its slot's anchor centred in its cell, each probability 0.5.\n")
    n_ignored = _demo_assignment(gt, assign, st, ignored, anchors)
    box = gt.box[assign.gt]                                                       # (n, 4)
    weight = 2 - box[:, 2] * box[:, 3] / size ** 2        # box_weight: small boxes count more
    pos_iou = torch.where(assign.slot == FREE_SLOT, assign.free_iou, assign.best_iou)  # (n,)
    pos_wh = sizes[assign.slot]                                                   # (n, 2)
    ln2, negatives = math.log(2), 4 * H * W - len(st.pos) - n_ignored
    by_hand = {
        "anchor": ((1 - assign.best_iou ** 2) + (1 - assign.free_iou ** 2)).sum(),
        "iou": (weight * (1 - pos_iou ** 2)).sum(),
        "xy": weight.sum() * 2 * ln2,
        "wh": (weight[:, None] * torch.log(box[:, 2:] / pos_wh).abs()).sum(),
        "obj": (negatives + len(st.pos)) * ln2, "cls": len(st.pos) * C * ln2}
    meaning = {
        "anchor": "sum of 1 - IoU^2 of the guided shape, at the anchor slot and the free slot",
        "iou": "sum of w_box (1 - IoU^2) of the decoded box (here centred on the object)",
        "xy": "sum of w_box BCE(0, 0.5) = w_box ln 2 for x and y (centres mid-cell)",
        "wh": "sum of w_box |0 - log(w / anchor w)| + the same for h",
        "obj": f"ln 2 per slot not ignored: {negatives} negatives + {len(st.pos)} positives",
        "cls": f"ln 2 per class ({C}) and positive ({len(st.pos)}), whatever the target"}
    print(f"{'term':<8}{'value':>8}{'by hand':>9}   how (w_box = 2 - w h / {size}^2, "
          f"{', '.join(f'{w:.3f}' for w in weight.tolist())})")
    for name in meaning:
        print(f"{name:<8}{terms[name].item():>8.3f}{float(by_hand[name]):>9.3f}   {meaning[name]}")
    print("\nEach is a sum divided by the batch size (1 here); compute_loss adds the three levels, "
          "and total = anchor + iou + xy + wh + obj + cls.")
    return {name: (terms[name].item(), float(by_hand[name])) for name in meaning}


if __name__ == "__main__":
    _demo()
