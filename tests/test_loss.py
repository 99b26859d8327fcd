"""loss.py: the released objective against the golden fixtures, a per-object loop reference,
hand-computed numbers and finite differences (Sec. 3.1, 3.3, 3.4; Tables 1-2)."""

import math
import os
from contextlib import contextmanager
from functools import cache

import pytest
import torch
import torch.nn.functional as F

import loss
from golden import golden_model, golden_reference, needs_golden
from head import ANCHOR_MASKS, STRIDES, Detector, decode_level

GRAD_NAMES = {  # released parameter -> ours (the golden README's gradient list)
    "module_list.0.conv.weight": "backbone.stem.conv.weight",
    **{f"head_s{s}.{theirs}.bias": f"heads.s{s}.{ours}.bias" for s in STRIDES
       for theirs, ours in (("guide_wh", "guide"), ("conv_offset", "offset"), ("conv", "pred"))},
    **{f"fusion_s{s}.weight_levels.bias": f"fusion.s{s}.weight_logits.bias" for s in STRIDES},
}
FREE_IOU_ATOL = 2 * (1e-4 + 1e-4 * 3.1)   # two log-shapes, each within the raw outputs' bound
TIGHT_GRADS = ("head_s32.conv.bias", "head_s16.conv.bias", "head_s8.conv.bias",
               "head_s32.guide_wh.bias", "head_s16.guide_wh.bias", "head_s8.guide_wh.bias")


@contextmanager
def torch_threads(n: int):
    """Run a block on n torch threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@cache
def tiny_model(num_classes: int = 4, guided: bool = True) -> Detector:
    """Only the loss's view of the model matters here: classes, anchors, slot sizes."""
    return Detector(num_classes=num_classes, guided=guided, width=0.25, depth=0.34)


def raw_outputs(model, size=256, batch=2, seed=None, dtype=torch.float32, scale=1.0):
    """Training-mode head outputs of the documented shapes: zeros, or random with `seed`."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    S, C = model.n_slots, model.num_classes
    out = {}
    for s in STRIDES:
        n = size // s                                                       # grid side
        pred = torch.zeros(batch, S, 5 + C, n, n, dtype=dtype)
        anchor_log = torch.zeros(batch, S, 2, n, n, dtype=dtype) if model.guided else None
        if seed is not None:
            pred = scale * torch.randn(pred.shape, generator=g, dtype=dtype)
            anchor_log = 0.5 * scale * torch.randn(anchor_log.shape, generator=g, dtype=dtype) \
                if model.guided else None
        out[s] = {"pred": pred.requires_grad_(),
                  "anchor_log": anchor_log.requires_grad_() if anchor_log is not None else None}
    return out


def box(cls, cx, cy, w, h, mix=1.0):
    return [float(cls), cx, cy, w, h, mix]


def gt_of(model, targets, size=256, dtype=torch.float32):
    return loss.prepare_targets(targets, model.num_classes, (size, size), dtype=dtype)


def levels_of(model, outputs):
    return {s: loss.Level(s, outputs[s]["pred"], outputs[s]["anchor_log"], model.slot_sizes(s).to(
        outputs[s]["pred"])) for s in STRIDES}


def assign(model, outputs, targets, size=256):
    """The assignment as tables of each level's objects (LevelAssignment.compact), and the targets."""
    gt = gt_of(model, targets, size, outputs[8]["pred"].dtype)
    assignment = loss.assign_targets(gt, model.anchors, levels_of(model, outputs))
    return {s: a.compact() for s, a in assignment.items()}, gt


def assignment_table(assignment, gt) -> torch.Tensor:
    """The golden README's columns: [image, row, level, stride, i, j, a, slot, best IoU,
    free-slot IoU, best anchor], levels s32 first, then image, then row."""
    rows = []
    for level, s in enumerate(STRIDES):
        a = assignment[s]
        n = len(a.gt)
        cols = [a.image, gt.row[a.gt], torch.full((n,), level), torch.full((n,), s), a.i, a.j,
                a.anchor_slot, a.slot, a.best_iou, a.free_iou, a.best_anchor]
        rows.append(torch.stack([c.double() for c in cols], dim=1))
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# The per-object loop reference: the release's algorithm written plainly, dense targets
# ---------------------------------------------------------------------------------------------
def ref_iou_cxcywh(a, b):
    ix = (torch.min(a[..., 0] + a[..., 2] / 2, b[..., 0] + b[..., 2] / 2)
          - torch.max(a[..., 0] - a[..., 2] / 2, b[..., 0] - b[..., 2] / 2)).clamp(min=0)
    iy = (torch.min(a[..., 1] + a[..., 3] / 2, b[..., 1] + b[..., 3] / 2)
          - torch.max(a[..., 1] - a[..., 3] / 2, b[..., 1] - b[..., 3] / 2)).clamp(min=0)
    return ix * iy / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - ix * iy)


def ref_shape_iou(w1, h1, w2, h2):
    inter = min(w1, w2) * min(h1, h2)
    return inter / (w1 * h1 + w2 * h2 - inter)


def shape_iou_dense(wh1, wh2):
    inter = torch.min(wh1[:, 0], wh2[:, 0]) * torch.min(wh1[:, 1], wh2[:, 1])
    return inter / (wh1[:, 0] * wh1[:, 1] + wh2[:, 0] * wh2[:, 1] - inter)


def ref_form(iou, form):
    return {"1-iou^2": 1 - iou ** 2, "-ln(iou)": -torch.log(iou.clamp(min=1e-7)),
            "1-iou": 1 - iou}[form]


def ref_valid_objects(targets, num_classes, size):
    objects = []
    for t in targets:
        keep = []
        for r, (c, cx, cy, w, h, mix) in enumerate(t.tolist()):
            if not (0 <= c < num_classes and c == int(c)):      # dropped, as loss.py drops it
                continue
            finite = all(math.isfinite(v) for v in (cx, cy, w, h, mix))
            if finite and w > 0 and h > 0 and cx + w / 2 > 0 and cx - w / 2 < size \
                    and cy + h / 2 > 0 and cy - h / 2 < size:
                keep.append((r, int(c), cx, cy, w, h, mix))
        objects.append(keep)
    return objects


def reference_decode(pred, anchor_log, sizes, s):
    """Every slot decoded: (B, S, H, W, 5+C) raw, (B, S, H, W, 2) guided anchors, (..., 4) boxes."""
    B, S, _, H, W = pred.shape
    p = pred.permute(0, 1, 3, 4, 2)
    anc = sizes.to(pred).view(1, S, 1, 1, 2).expand(B, S, H, W, 2)
    if anchor_log is not None:
        anc = anc * torch.exp(anchor_log.permute(0, 1, 3, 4, 2))
    i_grid = torch.arange(W, dtype=pred.dtype).view(1, 1, 1, W)
    j_grid = torch.arange(H, dtype=pred.dtype).view(1, 1, H, 1)
    boxes = torch.stack([(torch.sigmoid(p[..., 0]) + i_grid) * s,
                         (torch.sigmoid(p[..., 1]) + j_grid) * s,
                         torch.exp(p[..., 2]) * anc[..., 0], torch.exp(p[..., 3]) * anc[..., 1]],
                        dim=-1)
    return p, anc, boxes


def reference_targets(p, anc, boxes, s, level, objects, anchors, guided, ignore_thre,
                      label_smooth, size):
    """The release's loop: dense target tensors written object by object (later ones win)."""
    B, S, H, W, C5 = p.shape
    zeros = lambda *tail: torch.zeros(B, S, H, W, *tail, dtype=p.dtype)
    T = {"box": zeros(4), "xy": zeros(2), "wh": zeros(2), "cls": zeros(C5 - 5), "scale": zeros(),
         "obj": zeros(), "obj_w": zeros() + 1, "coord": zeros().bool(), "shape": zeros().bool()}
    rows = []
    for b in range(B):
        if not objects[b]:
            continue
        g = torch.tensor([o[2:6] for o in objects[b]], dtype=p.dtype)
        best_pred = ref_iou_cxcywh(boxes[b].detach().reshape(-1, 1, 4), g[None]).max(1).values
        T["obj_w"][b] = (best_pred <= ignore_thre).view(S, H, W).to(p.dtype)
        for r, c, cx, cy, w, h, mix in objects[b]:
            ious = [ref_shape_iou(w, h, aw, ah) for aw, ah in anchors]
            best = max(range(9), key=lambda k: ious[k])
            if best not in ANCHOR_MASKS[s]:
                continue
            a = ANCHOR_MASKS[s].index(best)
            i, j = min(max(math.floor(cx / s), 0), W - 1), min(max(math.floor(cy / s), 0), H - 1)
            aa, free = a, 0.0
            if guided:
                free = ref_shape_iou(w, h, *anc[b, 3, j, i].tolist())
                aa = 3 if free > ious[best] else a
            rows.append([b, r, level, s, i, j, a, aa, ious[best], free, best])
            T["coord"][b, aa, j, i] = True
            for slot in (a, 3) if guided else (a,):
                T["shape"][b, slot, j, i] = True
                T["box"][b, slot, j, i] = torch.tensor([cx, cy, w, h], dtype=p.dtype)
            T["obj_w"][b, aa, j, i], T["obj"][b, aa, j, i] = mix, 1.0
            T["xy"][b, aa, j, i] = torch.tensor([cx / s - i, cy / s - j], dtype=p.dtype).clamp(0, 1)
            T["wh"][b, aa, j, i] = torch.log(torch.tensor([w, h], dtype=p.dtype)
                                             / anc[b, aa, j, i] + 1e-12)    # keeps its graph
            T["scale"][b, aa, j, i] = 2 - min(w * h, size * size) / (size * size)
            if label_smooth:
                T["cls"][b, aa, j, i] = 1 / (C5 - 5)
                T["cls"][b, aa, j, i, c] = 1 - 1 / (C5 - 5)
            else:
                T["cls"][b, aa, j, i, c] = 1
    return T, rows


def reference_terms(p, anc, boxes, T, shape_loss, iou_loss, iou_form):
    """Dense sums, as the release computes them (masks and zero weights select the slots)."""
    bce = lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="none")
    zero = p.new_zeros(())
    t = {"anchor": zero, "iou": zero}
    if shape_loss:
        t["anchor"] = ref_form(shape_iou_dense(anc[T["shape"]], T["box"][T["shape"]][:, 2:]),
                               iou_form).sum()
    if iou_loss:
        iou = ref_iou_cxcywh(boxes[T["coord"]], T["box"][T["coord"]])
        t["iou"] = (T["scale"][T["coord"]] * ref_form(iou, iou_form)).sum()
    t["xy"] = (T["scale"][..., None] * bce(p[..., :2], T["xy"])).sum()
    t["wh"] = (T["scale"][..., None] * (p[..., 2:4] - T["wh"]).abs()).sum()
    t["obj"] = (T["obj_w"] * bce(p[..., 4], T["obj"])).sum()
    t["cls"] = (T["coord"][..., None] * bce(p[..., 5:], T["cls"])).sum()
    return t


def reference_loss(outputs, targets, model, ignore_thre=0.7, label_smooth=True, iou_loss=None,
                   iou_form="1-iou^2"):
    """Loop over levels, images and objects; returns ({term_s<stride>: value}, assignment rows)."""
    iou_loss = model.guided if iou_loss is None else iou_loss
    size = outputs[8]["pred"].shape[-1] * 8
    objects = ref_valid_objects(targets, model.num_classes, size)
    terms, rows = {}, []
    for level, s in enumerate(STRIDES):
        pred = outputs[s]["pred"]
        p, anc, boxes = reference_decode(pred, outputs[s]["anchor_log"], model.slot_sizes(s), s)
        T, level_rows = reference_targets(p, anc, boxes, s, level, objects, model.anchors.tolist(),
                                          model.guided, ignore_thre, label_smooth, size)
        t = reference_terms(p, anc, boxes, T, iou_loss and model.guided, iou_loss, iou_form)
        terms.update({f"{k}_s{s}": v / pred.shape[0] for k, v in t.items()})
        rows += level_rows
    return terms, torch.tensor(rows, dtype=torch.float64).reshape(-1, 11)


def random_targets(batch, n, size, seed, num_classes, dtype=torch.float64, collide=True):
    """n random boxes per image; with `collide`, the second half repeats the first half's centres
    (slightly larger, other classes) so objects share cells and slots."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        wh = torch.exp(torch.empty(n, 2, dtype=dtype).uniform_(1.5, 5.5, generator=g))
        xy = torch.rand(n, 2, generator=g, dtype=dtype) * size
        cls = torch.randint(0, num_classes, (n, 1), generator=g).to(dtype)
        t = torch.cat([cls, xy, wh, torch.rand(n, 1, generator=g, dtype=dtype)], dim=1)
        if collide:
            half = n // 2
            t[half:] = t[:n - half]
            t[half:, 3:5] *= 1.05
            t[half:, 0] = torch.randint(0, num_classes, (n - half,), generator=g).to(dtype)
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Golden: the authors' model and loss on the regenerated weights
# ---------------------------------------------------------------------------------------------
@cache
def golden_pass(variant):
    """Our model in training mode on the golden input: loss.py's terms, the gradients the README
    lists and the detached raw outputs (the 80-million-weight model itself is not kept)."""
    ref = golden_reference(variant)
    targets = [t[t[:, :5].sum(dim=1) > 0] for t in ref["targets"]]
    # the fixtures' thread count (their bit-exact setting; other CPUs still round differently)
    with torch_threads(ref["settings"]["num_threads"]):
        model = golden_model(variant).train()
        outputs = model(ref["input"])
        losses = loss.compute_loss(outputs, targets, model)
        losses["total"].backward()
    params = dict(model.named_parameters())
    grads = {theirs: params[ours].grad.clone() for theirs, ours in GRAD_NAMES.items()
             if ours in params}
    detached = {s: {k: v.detach() for k, v in o.items()} for s, o in outputs.items()}
    return ref, targets, detached, {k: v.detach() for k, v in losses.items()}, grads


@needs_golden
@pytest.mark.parametrize("variant", ["baseline", "asff", "asff-rfb"])
def test_golden_loss_terms_total_and_per_level(variant):
    ref, _, _, losses, _ = golden_pass(variant)
    for term in ("total", "anchor", "iou", "l1", "obj", "cls"):
        torch.testing.assert_close(losses[term], ref["loss_terms"][term], rtol=1e-4, atol=0)
        per_level = torch.stack([losses[f"{term}_s{s}"] for s in STRIDES])
        torch.testing.assert_close(per_level, ref["loss_terms_per_level"][term], rtol=1e-4, atol=0)


@needs_golden
@pytest.mark.parametrize("variant", ["baseline", "asff", "asff-rfb"])
def test_golden_assignment_and_ignore_masks(variant):
    ref, targets, outputs, _, _ = golden_pass(variant)
    model = tiny_model(80)                  # the released anchors and slot sizes, as golden_model
    assignment, gt = assign(model, outputs, targets)
    table = assignment_table(assignment, gt)
    expected = ref["assignment"]
    assert table.shape == expected.shape
    exact = [0, 1, 2, 3, 4, 5, 6, 7, 10]
    assert torch.equal(table[:, exact], expected[:, exact])
    # best IoU: the GT shape against the 9 fixed anchors, float32 arithmetic on the targets only
    torch.testing.assert_close(table[:, 8], expected[:, 8], rtol=0, atol=1e-6)
    # free-slot IoU: against the predicted shape A * exp(g), so it inherits the forward's
    # rounding, which differs between CPUs (AVX2 and AVX-512 kernels sum in different orders).
    # A shape IoU moves by at most |d gw| + |d gh| (d IoU / d log w lies in [-1, 1]), and the raw
    # outputs are held to atol 1e-4 + rtol 1e-4 (test_head's golden bound; |g| <= 3.1 in the
    # fixtures). Seen: up to 7.6e-5 on an AVX2 CPU, where the old 1e-5 failed.
    torch.testing.assert_close(table[:, 9], expected[:, 9], rtol=0, atol=FREE_IOU_ATOL)
    assert (table[:, 7] == loss.FREE_SLOT).any()                    # takeovers are exercised
    for s, level in levels_of(model, outputs).items():
        mask = loss.ignore_mask(level, gt, 0.7)
        assert torch.equal(mask, ref["ignore_mask"][f"s{s}"].bool()), f"ignore mask at s{s}"


@needs_golden
@pytest.mark.parametrize("variant", ["baseline", "asff", "asff-rfb"])
def test_golden_gradients(variant):
    ref, _, _, _, grads = golden_pass(variant)
    assert set(ref["grads"]) <= set(grads)
    for theirs, expected in ref["grads"].items():
        ours = grads[theirs].flatten().double()
        expected = expected.flatten().double()
        rel = ((ours - expected).norm() / expected.norm()).item()
        cosine = F.cosine_similarity(ours, expected, dim=0).item()
        if theirs in TIGHT_GRADS:
            assert rel <= 1e-3, f"{theirs}: relative L2 error {rel:.2e}"
        else:
            assert rel <= 5e-2 or cosine >= 0.999, f"{theirs}: rel {rel:.2e}, cosine {cosine:.6f}"


# ---------------------------------------------------------------------------------------------
# IoU and the IoU-loss forms: hand numbers and finite differences
# ---------------------------------------------------------------------------------------------
def test_iou_against_hand_numbers():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    assert loss.iou_cxcywh(a, torch.tensor([1.0, 0.0, 2.0, 2.0])).item() == pytest.approx(2 / 6)
    assert loss.iou_cxcywh(a, torch.tensor([0.5, 0.5, 1.0, 1.0])).item() == pytest.approx(1 / 4)
    assert loss.iou_cxcywh(a, torch.tensor([3.0, 0.0, 2.0, 2.0])).item() == 0.0        # apart
    assert loss.iou_cxcywh(a, torch.tensor([0.0, 3.0, 2.0, 4.0])).item() == 0.0        # x-overlap only
    assert loss.iou_cxcywh(a, a).item() == pytest.approx(1.0)
    assert loss.shape_iou(torch.tensor([2.0, 3.0]), torch.tensor([3.0, 1.0])).item() == \
        pytest.approx(2 / 7)
    anchors = torch.tensor([[156.0, 198.0], [121.0, 240.0]])
    ious = loss.shape_iou(torch.tensor([[300.0, 300.0]]), anchors)
    torch.testing.assert_close(ious, torch.tensor([156 * 198 / 90000, 121 * 240 / 90000]))


@pytest.mark.parametrize("form,expected", [("1-iou^2", 8 / 9), ("-ln(iou)", math.log(3)),
                                           ("1-iou", 2 / 3)])
def test_iou_loss_forms_against_hand_numbers(form, expected):
    assert loss.iou_loss_form(torch.tensor(1 / 3), form).item() == pytest.approx(expected)
    assert loss.iou_loss_form(torch.tensor(1.0), form).item() == pytest.approx(0.0, abs=1e-7)


def test_iou_loss_zero_overlap_is_finite_for_every_form():
    for form in loss.IOU_FORMS:
        x = torch.tensor(0.0, requires_grad=True)
        value = loss.iou_loss_form(x, form)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad)
    with pytest.raises(ValueError, match="iou_form"):
        loss.iou_loss_form(torch.tensor(0.5), "giou")


@pytest.mark.parametrize("form", loss.IOU_FORMS)
def test_iou_terms_match_finite_differences(form):
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    rand = lambda *shape: torch.rand(*shape, generator=g, **d)
    boxes = torch.cat([10 + rand(6, 2), 3 + rand(6, 2)], dim=1).requires_grad_()   # overlapping
    gt_boxes = torch.cat([10 + rand(6, 2), 3 + rand(6, 2)], dim=1)
    weight = 1 + torch.rand(6, generator=g, **d)
    assert torch.autograd.gradcheck(lambda b: loss.box_loss(b, gt_boxes, weight, form), (boxes,))
    wh = (2 + torch.rand(6, 2, generator=g, **d)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: loss.anchor_loss(w, gt_boxes[:, 2:], form), (wh,))


def test_yolo_terms_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    d = dict(dtype=torch.float64)
    t = torch.randn(5, 2, generator=g, **d).requires_grad_()
    anchor = (5 + torch.rand(5, 2, generator=g, **d)).requires_grad_()
    target = torch.rand(5, 2, generator=g, **d)
    weight = 1 + torch.rand(5, generator=g, **d)
    gt_wh = 5 + 10 * torch.rand(5, 2, generator=g, **d)
    assert torch.autograd.gradcheck(lambda x: loss.offset_loss(x, target, weight), (t,))
    assert torch.autograd.gradcheck(lambda x, a: loss.size_loss(x, a, gt_wh, weight), (t, anchor))
    logits = torch.randn(7, 3, generator=g, **d).requires_grad_()
    soft = torch.rand(7, 3, generator=g, **d)
    assert torch.autograd.gradcheck(lambda x: loss.class_loss(x, soft), (logits,))
    assert torch.autograd.gradcheck(lambda x: loss.objectness_loss(x, soft, soft + 0.5), (logits,))


def test_whole_loss_gradient_matches_finite_differences():
    """Directional derivative of the total (assignment fixed) against a central difference."""
    model = tiny_model(3)
    outputs = raw_outputs(model, size=128, batch=2, seed=5, dtype=torch.float64, scale=0.5)
    targets = random_targets(2, 6, 128, seed=6, num_classes=3)
    leaves = [t for o in outputs.values() for t in o.values()]
    total = loss.compute_loss(outputs, targets, model)["total"]
    grads = torch.autograd.grad(total, leaves)
    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in leaves]
    analytic = sum((gr * v).sum() for gr, v in zip(grads, direction, strict=True)).item()

    def shifted(h):
        moved = {s: {k: v.detach() + h * direction[2 * n + m] for m, (k, v) in enumerate(o.items())}
                 for n, (s, o) in enumerate(outputs.items())}
        return loss.compute_loss(moved, targets, model)["total"].item()

    h = 1e-6
    assert analytic == pytest.approx((shifted(h) - shifted(-h)) / (2 * h), rel=1e-5)


def test_level_boxes_match_head_decode_level():
    model = tiny_model(4)
    outputs = raw_outputs(model, size=128, batch=2, seed=2)
    for s, level in levels_of(model, outputs).items():
        full = decode_level(level.pred.detach(), level.anchor_log.detach(), s, level.sizes)
        B, S, H, W, _ = full.shape
        b, k, j, i = torch.meshgrid(*[torch.arange(n) for n in (B, S, H, W)], indexing="ij")
        torch.testing.assert_close(level.boxes(b, k, j, i).detach(), full[..., :4])


# ---------------------------------------------------------------------------------------------
# Assignment on hand-built cases (zero outputs: every free slot predicts a 4*stride square)
# ---------------------------------------------------------------------------------------------
def positives(assignment):
    """{stride: [(image, slot, j, i, anchor slot, best anchor)]} of an assignment."""
    columns = lambda a: (a.image, a.slot, a.j, a.i, a.anchor_slot, a.best_anchor)
    return {s: [tuple(int(x) for x in row) for row in zip(*columns(a), strict=True)]
            for s, a in assignment.items()}


def test_20px_box_goes_to_stride_8_and_300px_box_to_stride_32():
    model = tiny_model(4)
    targets = [torch.tensor([box(1, 100.0, 60.0, 20, 20), box(2, 160.0, 170.0, 300, 300)])]
    found = positives(assign(model, raw_outputs(model, size=320, batch=1), targets, size=320)[0])
    # 20x20: IoU 0.571 with (16,30) = anchor 1; 300x300: 0.343 with (156,198) = anchor 7
    assert found == {32: [(0, 1, 5, 5, 1, 7)], 16: [], 8: [(0, 1, 7, 12, 1, 1)]}
    # with YOLOv3's ninth anchor (373,326) the 300x300 box would pick anchor 8 instead
    plain = tiny_model(4, guided=False)
    found = positives(assign(plain, raw_outputs(plain, size=320, batch=1), targets, size=320)[0])
    assert found[32] == [(0, 2, 5, 5, 2, 8)]


def test_two_objects_in_one_cell_and_slot_the_later_overwrites():
    model = tiny_model(4)
    first, later = box(1, 100.2, 60.3, 20, 20), box(2, 101.5, 61.0, 18, 24)   # s8 (12, 7), slot 1
    outputs = raw_outputs(model, batch=1, seed=3, scale=0.3)
    (assignment, gt) = assign(model, outputs, [torch.tensor([first, later])])
    st = loss.slot_targets(assignment[8], 4, (32, 32), guided=True)
    assert st.positive.tolist() == [False, True] and st.pos_row.tolist() == [1, 1]    # one positive
    assert st.shape_last.tolist() == [[False, False], [True, True]] and st.box_row.tolist() == [1, 1]
    assert (st.slot_row >= 0).sum() == 1 and st.slot_row[1260] == 1   # slot_targets' example
    both = loss.compute_loss(outputs, [torch.tensor([first, later])], model)
    only_later = loss.compute_loss(outputs, [torch.tensor([later])], model)
    for k in ("anchor", "iou", "xy", "wh", "cls"):
        assert both[k].item() == pytest.approx(only_later[k].item(), rel=1e-6), k
    swapped = loss.compute_loss(outputs, [torch.tensor([later, first])], model)
    assert swapped["cls"].item() != pytest.approx(both["cls"].item(), rel=1e-4)


def test_two_objects_in_one_cell_with_different_anchors_are_both_positive():
    model = tiny_model(4)
    targets = [torch.tensor([box(1, 100.2, 60.3, 20, 20), box(2, 101.5, 61.0, 30, 22)])]
    found = positives(assign(model, raw_outputs(model, batch=1), targets)[0])
    assert found[8] == [(0, 1, 7, 12, 1, 1), (0, 2, 7, 12, 2, 2)]


def test_objects_on_the_image_edge_use_the_border_cell():
    model = tiny_model(4)
    targets = [torch.tensor([box(0, 256.0, 0.0, 20, 20),      # centre on the bottom-right corner
                             box(1, -5.0, 128.3, 20, 20),     # centre outside, box still inside
                             box(2, 255.99, 255.99, 20, 20)])]
    outputs = raw_outputs(model, batch=1)
    found = positives(assign(model, outputs, targets)[0])
    assert [(j, i) for _, _, j, i, _, _ in found[8]] == [(0, 31), (16, 0), (31, 31)]
    losses = loss.compute_loss(outputs, targets, model)
    assert losses["dropped"].item() == 0
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("free_size,expected_slot", [((24.0, 20.0), 3), ((4.0, 4.0), 2)])
def test_anchor_free_slot_takes_over_only_when_its_shape_fits_better(free_size, expected_slot):
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=1)
    with torch.no_grad():       # free slot at the object's s8 cell (12, 7): 32 * exp(g) = free_size
        outputs[8]["anchor_log"][0, 3, :, 7, 12] = torch.log(torch.tensor(free_size) / 32)
    targets = [torch.tensor([box(3, 100.5, 60.3, 24, 20)])]          # best anchor 2, IoU 0.632
    assignment, _ = assign(model, outputs, targets)
    a = assignment[8]
    assert a.anchor_slot.tolist() == [2] and a.best_iou.item() == pytest.approx(480 / 759)
    assert a.slot.tolist() == [expected_slot]
    losses = loss.compute_loss(outputs, targets, model)
    if expected_slot == 3:   # tw = 0 and the free slot's guided anchor is exactly the object
        assert losses["wh"].item() == pytest.approx(0.0, abs=1e-6)
    else:
        assert losses["wh"].item() > 0.1


# ---------------------------------------------------------------------------------------------
# Ignore mask and Table 2's adjacent ignore regions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iou,ignored", [(0.69, False), (0.71, True)])
def test_ignore_mask_at_the_threshold(iou, ignored):
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=1)
    side = 64 * math.sqrt(iou)         # a concentric square inside the 64x64 object: IoU = iou
    with torch.no_grad():              # s32 cell (2, 2), slot 0 (anchor 116x90), centre (72, 72)
        outputs[32]["pred"][0, 0, :4, 2, 2] = torch.tensor(
            [math.log(1 / 3), math.log(1 / 3), math.log(side / 116), math.log(side / 90)])
    targets = [torch.tensor([box(1, 72.0, 72.0, 64, 64)])]
    gt = gt_of(model, targets)
    level = levels_of(model, outputs)[32]
    assert loss.iou_cxcywh(level.boxes(*[torch.tensor(0)] * 2, torch.tensor(2), torch.tensor(2)),
                           gt.box[0]).item() == pytest.approx(iou, abs=1e-5)
    mask = loss.ignore_mask(level, gt, 0.7)
    assert mask.sum().item() == int(ignored) and mask[0, 0, 2, 2].item() == ignored
    loss.compute_loss(outputs, targets, model)["obj"].backward()
    obj_grad = outputs[32]["pred"].grad[0, 0, 4, 2, 2].item()
    assert (obj_grad == 0) == ignored


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9])
def test_ignore_mask_equals_all_pairs_iou(threshold):
    """The candidate-window shortcut must find every prediction the all-pairs IoU finds."""
    model = tiny_model(4)
    outputs = raw_outputs(model, size=128, batch=2, seed=11, scale=0.7)
    levels = levels_of(model, outputs)
    g = torch.Generator().manual_seed(12)
    boxes = []
    for b in range(2):                 # objects near some predictions: IoUs straddle the threshold
        for level in levels.values():
            B, S, _, H, W = level.pred.shape
            k = [torch.randint(0, n, (3,), generator=g) for n in (S, H, W)]
            picked = level.boxes(torch.tensor(b), *k).detach()
            spread = torch.tensor([[0.04], [0.15], [0.4]])                      # near, mid, far
            picked = picked * (1 + spread * (torch.rand(3, 4, generator=g) - 0.5))
            boxes += [[1.0, *row, 1.0] for row in picked.tolist()]
    targets = [torch.tensor(boxes[:9]), torch.tensor(boxes[9:])]
    gt = gt_of(model, targets, size=128)
    hits = 0
    for s, level in levels.items():
        B, S, _, H, W = level.pred.shape
        b, k, j, i = torch.meshgrid(*[torch.arange(n) for n in (B, S, H, W)], indexing="ij")
        every = level.boxes(b, k, j, i).detach()                                # (B, S, H, W, 4)
        padded = torch.stack([t[:, 1:5] for t in targets])                      # (B, 9, 4)
        expected = (ref_iou_cxcywh(every[..., None, :], padded[:, None, None, None]).amax(-1)
                    > threshold)
        assert torch.equal(loss.ignore_mask(level, gt, threshold), expected), f"s{s}"
        hits += int(expected.sum())
    assert hits > 0


def cells(mask):
    return sorted((int(j), int(i)) for j, i in mask.nonzero()[:, -2:])


def test_adjacent_ignore_regions_cover_exactly_the_right_cells():
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=1)
    grids = {s: (256 // s, 256 // s) for s in STRIDES}
    targets = [torch.tensor([box(1, 100.0, 100.0, 60, 48)])]            # s16, anchor 4
    assignment, gt = assign(model, outputs, targets)
    assert len(assignment[16].gt) == 1
    centre = loss.adjacent_ignore(assignment, gt, 1, grids, 0.0)
    assert cells(centre[32]) == [(3, 3)] and cells(centre[8]) == [(12, 12)]
    assert not centre[16].any()
    region = loss.adjacent_ignore(assignment, gt, 1, grids, 0.5)       # x 85..115, y 88..112
    assert cells(region[32]) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert cells(region[8]) == [(j, i) for j in range(11, 14) for i in range(10, 15)]
    targets = [torch.tensor([box(1, 120.9, 136.4, 150, 180)])]          # s32: only s16 is adjacent
    assignment, gt = assign(model, outputs, targets)
    centre = loss.adjacent_ignore(assignment, gt, 1, grids, 0.0)
    assert cells(centre[16]) == [(8, 7)] and not centre[8].any() and not centre[32].any()
    loss.compute_loss(outputs, targets, model, ignore_ratio=0.0)["obj"].backward()
    assert (outputs[16]["pred"].grad[0, :, 4, 8, 7] == 0).all()
    assert (outputs[16]["pred"].grad[0, :, 4, 8, 6] != 0).all()


# ---------------------------------------------------------------------------------------------
# Each term is zero or non-zero exactly where it should be
# ---------------------------------------------------------------------------------------------
def test_images_without_objects_give_only_objectness():
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=2, seed=4)
    losses = loss.compute_loss(outputs, [torch.zeros(0, 6), torch.zeros(0, 6)], model)
    for k in ("anchor", "iou", "xy", "wh", "l1", "cls"):
        assert losses[k].item() == 0.0, k
    assert losses["obj"].item() > 0 and losses["total"].item() == losses["obj"].item()
    losses["total"].backward()
    assert all(torch.isfinite(o["pred"].grad).all() for o in outputs.values())


def term_gradients(model, outputs, targets, term, **switches):
    for o in outputs.values():
        for t in o.values():
            if t is not None:
                t.grad = None
    losses = loss.compute_loss(outputs, targets, model, **switches)
    losses[term].backward()
    pred, anchor_log = outputs[8]["pred"], outputs[8]["anchor_log"]
    zero = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)
    return zero(pred)[0], zero(anchor_log)[0]                  # (S, 5+C, H, W), (S, 2, H, W)


def test_each_term_reaches_exactly_its_slots_and_channels():
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=1, seed=8, scale=0.3)
    with torch.no_grad():      # positive box partly overlapping the object in x and in y
        outputs[8]["pred"][0, 2, :4, 7, 12] = torch.tensor([3.0, -1.5, -0.3, 0.0])
    targets = [torch.tensor([box(3, 100.5, 60.3, 24, 20)])]               # s8 (12, 7), slot 2
    nz = lambda g: sorted(tuple(int(x) for x in idx) for idx in g.nonzero())
    at = lambda slot, chans: sorted((slot, c, 7, 12) for c in chans)
    pred_g, shape_g = term_gradients(model, outputs, targets, "cls")
    assert nz(pred_g) == at(2, range(5, 9)) and not shape_g.any()
    pred_g, shape_g = term_gradients(model, outputs, targets, "xy")
    assert nz(pred_g) == at(2, [0, 1]) and not shape_g.any()
    pred_g, shape_g = term_gradients(model, outputs, targets, "wh")
    assert nz(pred_g) == at(2, [2, 3]) and nz(shape_g) == at(2, [0, 1])
    # the wh target is log(gt / (A exp(g))) with the guided anchor not detached: |tw + g - c|
    torch.testing.assert_close(shape_g[2, :, 7, 12], pred_g[2, 2:4, 7, 12])
    pred_g, shape_g = term_gradients(model, outputs, targets, "iou")
    assert nz(pred_g) == at(2, range(4)) and nz(shape_g) == at(2, [0, 1])
    pred_g, shape_g = term_gradients(model, outputs, targets, "anchor")
    assert not pred_g.any() and nz(shape_g) == at(2, [0, 1]) + at(3, [0, 1])
    pred_g, shape_g = term_gradients(model, outputs, targets, "obj")
    ignored = loss.ignore_mask(levels_of(model, outputs)[8], gt_of(model, targets), 0.7)[0]
    ignored[2, 7, 12] = False                                            # the positive is set back
    assert ignored.sum() == 1                                            # here: the free slot
    assert torch.equal(pred_g[:, 4] == 0, ignored)
    assert not pred_g[:, :4].any() and not pred_g[:, 5:].any() and not shape_g.any()


def test_switches_turn_terms_off():
    model, plain = tiny_model(4), tiny_model(4, guided=False)
    targets = [torch.tensor([box(3, 100.5, 60.3, 24, 20), box(1, 150.0, 120.0, 120, 90)])]
    on = loss.compute_loss(raw_outputs(model, batch=1, seed=9), targets, model)
    assert on["anchor"].item() > 0 and on["iou"].item() > 0
    off = loss.compute_loss(raw_outputs(model, batch=1, seed=9), targets, model, iou_loss=False)
    assert off["anchor"].item() == 0 and off["iou"].item() == 0 and off["wh"] == on["wh"]
    yolo = loss.compute_loss(raw_outputs(plain, batch=1, seed=9), targets, plain)
    assert yolo["anchor"].item() == 0 and yolo["iou"].item() == 0 and yolo["wh"].item() > 0
    yolo_iou = loss.compute_loss(raw_outputs(plain, batch=1, seed=9), targets, plain, iou_loss=True)
    assert yolo_iou["anchor"].item() == 0 and yolo_iou["iou"].item() > 0
    with pytest.raises(ValueError, match="ignore_thre"):
        loss.compute_loss(raw_outputs(model, batch=1), targets, model, ignore_thre=0.0)


def test_mix_ratio_weights_objectness_but_not_classes():
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=1, seed=10, dtype=torch.float64)   # obj sums ~1e3 cells
    full = loss.compute_loss(outputs, [torch.tensor([box(3, 100.5, 60.3, 24, 20, 1.0)])], model)
    mixed = loss.compute_loss(outputs, [torch.tensor([box(3, 100.5, 60.3, 24, 20, 0.6)])], model)
    slot = assign(model, outputs, [torch.tensor([box(3, 100.5, 60.3, 24, 20)])])[0][8].slot.item()
    logit = outputs[8]["pred"][0, slot, 4, 7, 12]
    expected = 0.4 * F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
    assert (full["obj"] - mixed["obj"]).item() == pytest.approx(expected.item(), rel=1e-6)
    assert full["cls"].item() == mixed["cls"].item()


def test_released_label_smoothing_targets():
    pos_cls = torch.tensor([2, 0])
    obj_cls, pos_of = torch.tensor([1, 2, 0]), torch.tensor([0, 0, 1])
    smooth = loss.class_targets(pos_cls, obj_cls, pos_of, 4, True, torch.zeros(()))
    torch.testing.assert_close(smooth, torch.tensor([[.25, .25, .75, .25], [.75, .25, .25, .25]]))
    hard = loss.class_targets(pos_cls, obj_cls, pos_of, 4, False, torch.zeros(()))
    torch.testing.assert_close(hard, torch.tensor([[0.0, 1, 1, 0], [1, 0, 0, 0]]))   # multi-hot


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_invalid_boxes_are_dropped_and_counted():
    model = tiny_model(4)
    targets = [torch.tensor([box(1, 100.0, 100.0, 0, 20), box(1, 100.0, 100.0, 20, -3),
                             box(1, 300.0, 100.0, 40, 40), box(1, 100.0, -30.0, 40, 40),
                             box(1, float("nan"), 100.0, 20, 20)]),
               torch.tensor([box(2, 100.0, 100.0, 20, 20)])]
    losses = loss.compute_loss(raw_outputs(model, batch=2), targets, model)
    assert losses["dropped"].item() == 5
    assert losses["cls"].item() > 0 and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("bad_class", [4.0, -1.0, 1.5, float("nan")])
def test_class_ids_outside_the_range_are_dropped_and_counted(bad_class):
    """Checked on the device (raising would make the host wait for it): the row is left out."""
    model = tiny_model(4)
    good = [torch.tensor([box(1, 100.0, 100.0, 20, 20)]), torch.tensor([box(0, 50.0, 50.0, 20, 20)])]
    targets = [good[0], torch.cat([good[1], torch.tensor([box(bad_class, 60.0, 60.0, 20, 20)])])]
    outputs = raw_outputs(model, batch=2, seed=15)
    losses, expected = (loss.compute_loss(outputs, t, model) for t in (targets, good))
    assert losses["dropped"].item() == 1 and expected["dropped"].item() == 0
    for k in loss.TERMS:                          # the same sums, over more (zero) rows
        assert losses[k].item() == pytest.approx(expected[k].item(), rel=1e-6), k


@pytest.mark.parametrize("form", loss.IOU_FORMS)
def test_no_nan_or_inf_for_border_tiny_and_huge_boxes(form):
    model = tiny_model(4)
    targets = [torch.tensor([box(0, 0.0, 0.0, 1e-3, 1e-3), box(1, 128.0, 128.0, 5000, 5000),
                             box(2, 255.9, 0.1, 256, 3), box(3, 128.0, 128.0, 256, 256)]),
               torch.zeros(0, 6)]
    outputs = raw_outputs(model, batch=2, seed=13)
    losses = loss.compute_loss(outputs, targets, model, iou_form=form, label_smooth=False)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    for o in outputs.values():
        assert torch.isfinite(o["pred"].grad).all() and torch.isfinite(o["anchor_log"].grad).all()


def test_a_diverged_log_shape_gives_a_finite_loss_and_gradient():
    """g = +-136.6 (seen in a diverging run) overflows exp in float32; Level.anchors bounds it at
    +-MAX_ANCHOR_LOG, and leaves every shape inside the bound as A * exp(g) exactly."""
    model = tiny_model(4)
    outputs = raw_outputs(model, batch=1, seed=14, scale=0.5)
    with torch.no_grad():
        outputs[8]["anchor_log"][0, :, :, 7, 12] = 136.6  # every slot of the s8 object's cell
        outputs[16]["anchor_log"][0, :, :, 3, 9] = -136.6  # and of the s16 object's
    targets = [torch.tensor([box(3, 100.5, 60.3, 24, 20), box(1, 150.0, 60.0, 60, 48)])]
    losses = loss.compute_loss(outputs, targets, model)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["total"].backward()
    for o in outputs.values():
        assert torch.isfinite(o["pred"].grad).all() and torch.isfinite(o["anchor_log"].grad).all()
    levels = levels_of(model, outputs)
    at = [torch.tensor(v) for v in (0, 2, 7, 12)]
    torch.testing.assert_close(levels[8].anchors(*at), model.slot_sizes(8)[2] * 1e4)
    inside = [torch.tensor(v) for v in (0, 1, 5, 20)]                    # an ordinary cell
    g = outputs[8]["anchor_log"][0, 1, :, 5, 20]
    assert levels[8].anchors(*inside).tolist() == (model.slot_sizes(8)[1] * torch.exp(g)).tolist()


# ---------------------------------------------------------------------------------------------
# Vectorised == the per-object loop reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guided,label_smooth,iou_form", [
    (True, True, "1-iou^2"), (True, False, "-ln(iou)"), (False, True, "1-iou"),
    (False, False, "1-iou^2")])
def test_vectorised_matches_the_loop_reference(guided, label_smooth, iou_form):
    model = tiny_model(6, guided)
    for seed in (0, 1):
        outputs = raw_outputs(model, size=192, batch=3, seed=seed, dtype=torch.float64)
        targets = random_targets(3, 10, 192, seed=seed + 100, num_classes=6)
        targets[1] = targets[1][:0]                                         # an empty image
        switches = dict(label_smooth=label_smooth, iou_form=iou_form, iou_loss=True)
        ours = loss.compute_loss(outputs, targets, model, **switches)
        theirs, rows = reference_loss(outputs, targets, model, **switches)
        assignment, gt = assign(model, outputs, targets, size=192)
        table = assignment_table(assignment, gt)
        assert torch.equal(table, rows)
        keys = torch.stack([table[:, 0], table[:, 2], table[:, 7], table[:, 5], table[:, 4]], 1)
        assert len(torch.unique(keys, dim=0)) < len(keys)                   # collisions happened
        for k, v in theirs.items():
            assert ours[k].item() == pytest.approx(v.item(), rel=1e-9, abs=1e-12), k
        leaves = [t for o in outputs.values() for t in o.values() if t is not None]
        mine = torch.autograd.grad(ours["total"], leaves)
        ref = torch.autograd.grad(sum(theirs.values()), leaves)
        for a, b in zip(mine, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# No host synchronisation: every shape follows from the batch layout (the list lengths) alone
# ---------------------------------------------------------------------------------------------
def layout_batch(model, device="cpu"):
    """Three images at 128: colliding objects, an empty image, a zero-width box, a class id of 9."""
    targets = random_targets(3, 6, 128, seed=16, num_classes=model.num_classes, dtype=torch.float32)
    targets[1] = targets[1][:0]
    targets[2] = torch.cat([targets[2], torch.tensor([box(1, 60.0, 60.0, 0, 9), box(9, 60.0, 60.0, 9, 9)])])
    outputs = raw_outputs(model, size=128, batch=3, seed=17)
    outputs = {s: {k: v.detach().to(device).requires_grad_() if v is not None else None
                   for k, v in o.items()} for s, o in outputs.items()}
    return outputs, [t.to(device) for t in targets]


@pytest.mark.parametrize("guided,switches", [(True, {}), (True, dict(label_smooth=False, ignore_ratio=0.5)),
                                             (False, dict(iou_loss=True, iou_form="-ln(iou)"))])
def test_compute_loss_runs_on_tensors_without_data(guided, switches):
    """On the meta device tensors have shapes but no values: any step that needs a value on the host
    (.item(), if tensor, nonzero, unique, boolean-mask reads, repeat_interleave by tensor counts:
    each a GPU synchronisation) raises there. The loss and its backward run on meta tensors."""
    with pytest.raises((RuntimeError, NotImplementedError)):       # the probe does catch them
        torch.ones(3, device="meta").nonzero()
    with pytest.raises(RuntimeError):
        torch.ones(3, device="meta").sum().item()
    model = tiny_model(3, guided)
    outputs, targets = layout_batch(model, "meta")
    losses = loss.compute_loss(outputs, targets, model, **switches)
    assert all(v.device.type == "meta" and v.shape == () for v in losses.values())
    assert losses["dropped"].dtype == torch.int64
    losses["total"].backward()
    assert all(o["pred"].grad.shape == o["pred"].shape for o in outputs.values())


def test_compute_loss_compiles_to_one_graph_equal_to_eager():
    """fullgraph=True raises at a graph break (Python branching on a tensor's value, .tolist());
    with the default settings of recent torch it lets .item() and nonzero through, which the meta
    test above catches. The compiled loss equals the eager one, the invalid rows counted."""
    model = tiny_model(3)
    outputs, targets = layout_batch(model)
    run = lambda o, t: loss.compute_loss(o, t, model, label_smooth=False, ignore_ratio=0.5)  # noqa: E731
    compiled = torch.compile(run, fullgraph=True, backend="eager", dynamic=False)(outputs, targets)
    eager = run(outputs, targets)
    assert eager["dropped"].item() == 2 and set(compiled) == set(eager)
    for k, v in eager.items():
        assert torch.equal(compiled[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (ASFF_TEST_CUDA=1 shows it)")
def test_compute_loss_does_not_synchronise_the_gpu():
    """torch.cuda.set_sync_debug_mode("error") raises at each synchronising call (a value read back,
    a blocking copy); the loss's forward makes none, with targets on the GPU or on the host."""
    model = tiny_model(3)
    for on_gpu in (True, False):
        outputs, targets = layout_batch(model, "cuda")
        targets = targets if on_gpu else [t.cpu() for t in targets]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = loss.compute_loss(outputs, targets, model, label_smooth=False, ignore_ratio=0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert losses["dropped"].item() == 2 and torch.isfinite(losses["total"]).item()


# ---------------------------------------------------------------------------------------------
# Fitting two images: the objective's minimum is the objects, and the network takes its gradient
# (tests with a `seed` argument run once per seed of ASFF_TEST_SEEDS, see conftest.py)
# ---------------------------------------------------------------------------------------------
# Each object has exactly an anchor's shape (s8, s16 | s16, s8, s32): the free slot, which learns
# the same shape, can at best tie with that anchor (a strict > takes over), so the positives
# never change slots while the shapes train.
OBJECTS = [[(0, 20.2, 25.7, 33, 23), (2, 40.0, 36.1, 62, 45)],
           [(1, 20.4, 31.4, 30, 61), (0, 50.2, 50.7, 16, 30), (2, 33.3, 30.6, 116, 90)]]


def fitting_threads() -> int:
    """1 unless ASFF_TEST_THREADS says otherwise: on 2 cores shared with other jobs, 2 threads
    stall each other on these small tensors (measured 7x slower). The results do not depend on it."""
    return int(os.environ.get("ASFF_TEST_THREADS", 1))


def two_image_targets(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """OBJECTS with their centres moved by up to 3 px by the seed (seed 0: as listed). Each
    image has at most one object per level, so no two objects ever share a slot."""
    g = torch.Generator().manual_seed(seed)
    shift = (6 * torch.rand(5, 2, generator=g, dtype=torch.float64) - 3) * (seed != 0)
    rows = [box(c, x + dx, y + dy, w, h) for (c, x, y, w, h), (dx, dy) in
            zip([o for image in OBJECTS for o in image], shift.tolist(), strict=True)]
    return [torch.tensor(rows[:2], dtype=dtype), torch.tensor(rows[2:], dtype=dtype)]


def xy_floor(model, outputs, targets, size):
    """The xy term's minimum: BCE against a fractional offset f is at least its entropy H(f)."""
    assignment, gt = assign(model, outputs, targets, size)
    floor = 0.0
    for s, a in assignment.items():
        f = (gt.box[a.gt, :2] / s - torch.stack([a.i, a.j], 1)).clamp(1e-6, 1 - 1e-6)
        floor += loss.offset_loss(torch.logit(f), f, loss.box_weight(gt.box[a.gt, 2:], size * size))
    return floor.item() / len(targets)


def descend(fit, optimizer, steps: int) -> tuple[dict, dict]:
    """The loss terms before and after `steps` optimizer steps on fit()["total"]."""
    first = fit()
    for _ in range(steps):
        optimizer.zero_grad()
        fit()["total"].backward()
        optimizer.step()
    return first, fit()


def test_the_objective_is_minimal_at_the_objects(seed):
    """Sec. 3.4's objective over free head outputs, one parameter per output value (a network
    would have to learn them): from random offset, objectness and class logits and the anchors'
    own shapes (g = tw = th = 0), full-batch Rprop reaches every term's minimum, and decoding the
    outputs gives the objects. Machine-independent by design: the terms share one minimum (the
    objects' boxes, sure objectness and classes), the shapes start at it, and Rprop, which
    follows gradient signs and shrinks a step at each sign change, closes in on it to a few of
    its smallest steps (1e-6) whatever the rounding; float64 keeps that far below float32's
    resolution.
    (From random shapes, the L1 size term's kink along tw + g = const stalls Adam and Rprop
    on the anchor term, 0.5-1.7 of it left after 400 steps: a valley this test is not about.)"""
    model = tiny_model(3)
    targets = two_image_targets(seed, torch.float64)
    outputs = raw_outputs(model, size=64, batch=2, seed=seed, dtype=torch.float64)
    with torch.no_grad():
        for o in outputs.values():
            o["anchor_log"].zero_()
            o["pred"][:, :, 2:4] = 0.0
    leaves = [t for o in outputs.values() for t in o.values()]
    optimizer = torch.optim.Rprop(leaves, lr=0.01)
    fit = lambda: loss.compute_loss(outputs, targets, model, label_smooth=False)  # noqa: E731
    with torch_threads(fitting_threads()):
        first, losses = descend(fit, optimizer, 200)
    detached = {s: {k: v.detach() for k, v in o.items()} for s, o in outputs.items()}
    assignment, _ = assign(model, detached, targets, 64)
    assert all((a.slot == a.anchor_slot).all() for a in assignment.values())   # no takeover
    floor = xy_floor(model, detached, targets, 64)
    # measured over seeds 0-7 on 1 and 2 threads: box terms <= 1.4e-5, obj and cls <= 5e-17,
    # xy - floor <= 5e-13, 1 - IoU = 2e-6, from terms of 3 to 250 at the start; the bounds leave
    # 7x (box terms) to 1e6x of margin
    assert first["total"].item() > 100 and losses["xy"].item() - floor < 1e-6
    for term in ("anchor", "iou", "wh"):
        assert losses[term].item() < 1e-4, (term, losses[term].item())
    for term in ("obj", "cls"):
        assert losses[term].item() < 1e-9, (term, losses[term].item())
    rows = torch.cat([decode_level(o["pred"], o["anchor_log"], s, model.slot_sizes(s).double())
                      .flatten(1, 3) for s, o in detached.items()], dim=1)   # (2, N, 5+C)
    for b, t in enumerate(targets):      # every object found by a confident box of its class
        found = rows[b, rows[b, :, 4] * rows[b, :, 5:].max(dim=1).values > 0.5]
        iou = loss.iou_cxcywh(found[:, None, :4], t[None, :, 1:5])          # (found, objects)
        same = found[:, 5:].argmax(dim=1)[:, None] == t[None, :, 0].long()
        assert ((iou * same).amax(dim=0) > 0.999).all(), iou


def test_demo_terms_equal_their_hand_sums(capsys):
    """`python loss.py`: on its zero-prediction case each term equals the sum its line states
    (ln 2 per objectness slot and class, w_box ln 2 per coordinate, 1 - IoU^2 of the shapes),
    and the object nearer the 32 x 32 free slot than any anchor is taken by the free slot."""
    terms = loss._demo()
    assert set(terms) == {"anchor", "iou", "xy", "wh", "obj", "cls"}
    for name, (value, by_hand) in terms.items():
        assert value == pytest.approx(by_hand, rel=1e-5), name
    assert terms["cls"][0] == pytest.approx(3 * 3 * math.log(2), rel=1e-6)   # 3 positives x 3 classes
    assert terms["obj"][0] == pytest.approx(255 * math.log(2), rel=1e-6)     # 256 slots, 1 ignored
    printed = capsys.readouterr().out
    assert "(the anchor-free slot takes it)" in printed and "its anchor is on another level" in printed



def test_the_network_learns_objectness_and_classes_first(seed):
    """The objective's gradient trains the network: 30 Adam steps on two noise images cut the
    objectness and class terms, and the total they dominate at first, to under a quarter.
    Only this early phase is checked: its fall is driven by large gradients of one sign (the
    biases learning how rare objects are); over seeds 0-7, each also from two starts moved by
    1e-6 (more than another CPU's rounding) and on 2 threads, the three ratios were at most
    0.08, so the bound of 0.25 has 3x of margin. Later on, the box terms' path is chaotic: two
    starts 1e-7 apart ended 400 steps with IoU terms of 0.12 and 0.89, which is why no longer
    run of the network is asserted here."""
    with torch_threads(fitting_threads()):
        torch.manual_seed(seed)
        model = Detector(num_classes=3, width=0.125, depth=0.33).train()
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        targets = two_image_targets(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        fit = lambda: loss.compute_loss(model(images), targets, model, label_smooth=False)  # noqa: E731
        first, losses = descend(fit, optimizer, 30)
    for term in ("total", "obj", "cls"):
        assert losses[term].item() < 0.25 * first[term].item(), (term, losses[term].item(),
                                                                first[term].item())
