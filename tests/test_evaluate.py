"""evaluate.py against independent references: pycocotools called directly, a float64
brute-force NMS, hand-computed APs and pixel colours, and a single process vs 2 gloo ranks."""

import contextlib
import copy
import io
import json
import math
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import bench
import evaluate as ev

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
CUSTOM_IDS = [3, 17, 42]                                   # non-contiguous, not starting at 1
IMAGES = [(1, 640, 480), (7, 500, 375), (12, 300, 400)]    # (id, width, height)
SHAPES = [(20, 18), (50, 60), (150, 120), (12, 30), (90, 70), (200, 180)]  # small/medium/large


def quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def write_gt(tmp_path, cat_ids, n_boxes=None, images=IMAGES):
    """A tiny COCO JSON: boxes of every size bucket spread over `images`, cycling categories."""
    n_boxes = n_boxes or max(len(cat_ids), 12)
    anns = []
    for k in range(n_boxes):
        image_id, w_img, h_img = images[k % len(images)]
        w, h = SHAPES[k % len(SHAPES)]
        x, y = (37 * k) % (w_img - w), (23 * k) % (h_img - h)
        anns.append({"id": k + 1, "image_id": image_id, "category_id": cat_ids[k % len(cat_ids)],
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    gt = {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"}
                     for i, w, h in images],
          "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids], "annotations": anns}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path, quiet_coco(path)


def gt_as_detections(coco: COCO, cat_ids, shift=0.0):
    """Per image (K, 7) [x1, y1, x2, y2, score, class, obj] from the GT, x shifted by shift*w."""
    to_class = {c: k for k, c in enumerate(cat_ids)}
    dets, ids = [], sorted(coco.getImgIds())
    for image_id in ids:
        rows = []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = a["bbox"]
            x += shift * w
            rows.append([x, y, x + w, y + h, 0.9 - 0.001 * a["id"], to_class[a["category_id"]], 1])
        dets.append(torch.tensor(rows, dtype=torch.float64).reshape(-1, 7))
    return dets, ids


# ---------------------------------------------------------------------------------------------
# COCO scoring and category ids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cat_ids", [COCO_IDS, CUSTOM_IDS], ids=["coco80", "custom"])
def test_ground_truth_as_detections_scores_one_and_ids_round_trip(tmp_path, cat_ids):
    path, coco = write_gt(tmp_path, cat_ids)
    dets, ids = gt_as_detections(coco, cat_ids)
    results = ev.to_coco_results(dets, ids, cat_ids)
    # each result carries the category id of the GT box it came from (contiguous -> id -> same)
    gt_by_box = {(a["image_id"], tuple(a["bbox"])): a["category_id"]
                 for a in coco.loadAnns(coco.getAnnIds())}
    assert [gt_by_box[(r["image_id"], tuple(r["bbox"]))] for r in results] == \
        [r["category_id"] for r in results]
    assert sorted({r["category_id"] for r in results}) == sorted(cat_ids)
    metrics = ev.coco_score(coco, results, verbose=False)
    assert [metrics[k] for k in ev.PAPER_COLUMNS] == pytest.approx([1.0] * 6, abs=1e-12), metrics


def test_shifted_boxes_match_a_direct_pycocotools_call(tmp_path):
    path, coco = write_gt(tmp_path, CUSTOM_IDS)
    # every box shifted by 0.13 w: IoU = 0.87 / 1.13 = 0.770, matched at thresholds .50-.75 only
    dets, ids = gt_as_detections(coco, CUSTOM_IDS, shift=0.13)
    metrics = ev.coco_score(coco, ev.to_coco_results(dets, ids, CUSTOM_IDS), verbose=False)
    assert [metrics[k] for k in ("AP", "AP50", "AP75")] == pytest.approx([0.6, 1, 1], abs=1e-12)
    # mixed shifts, an extra false positive: the pipeline's figures are pycocotools' own
    dets = [d.clone() for d in dets]
    for d in dets:
        d[::2, [0, 2]] += 0.4 * (d[::2, 2:3] - d[::2, 0:1])
    false_positive = torch.tensor([[5.0, 5, 60, 60, 0.95, 1, 1]], dtype=torch.float64)
    dets[0] = torch.cat([dets[0], false_positive])
    results = ev.to_coco_results(dets, ids, CUSTOM_IDS)
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    ours = ev.coco_score(coco, json.loads(res_path.read_text()), verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        direct = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
        direct.evaluate(), direct.accumulate(), direct.summarize()
    assert list(ours.values()) == [float(s) for s in direct.stats]
    assert 0.1 < ours["AP"] < 0.6


def test_unknown_category_id_is_an_error_before_pycocotools(tmp_path):
    path, coco = write_gt(tmp_path, CUSTOM_IDS)
    results = [{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5}]
    with pytest.raises(ValueError, match=r"category id\(s\) \[5\]"):
        ev.coco_score(coco, results, verbose=False)


def score_directly(ann_file, results) -> list[float]:
    """pycocotools on the annotation file as it is, no code of ours in between."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        direct = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        direct.evaluate(), direct.accumulate(), direct.summarize()
    return [float(s) for s in direct.stats]


def test_valid_file_scores_as_pycocotools_on_the_file_itself(tmp_path):
    data = pytest.importorskip("data")
    path, coco = write_gt(tmp_path, CUSTOM_IDS)
    for image_id, _, _ in IMAGES:
        (tmp_path / f"{image_id}.jpg").touch()           # only their presence is checked here
    dataset = data.CocoDetection(str(tmp_path), str(path))
    dets, ids = gt_as_detections(coco, CUSTOM_IDS, shift=0.13)
    for d in dets:
        d[::3, [0, 2]] += 0.3 * (d[::3, 2:3] - d[::3, 0:1])
    results = ev.to_coco_results(dets, ids, CUSTOM_IDS)
    ours = ev.coco_score(dataset.coco, results, verbose=False)
    assert list(ours.values()) == score_directly(path, results) and 0.1 < ours["AP"] < 0.6


def test_skipped_boxes_are_not_scored_and_crowd_boxes_are_ignore_regions(tmp_path):
    """A file with boxes the loader skips (zero or negative size, outside the image), clips
    and a crowd box: perfect detections of what it kept, plus one on the crowd region, score
    AP 1.0 through .coco; pycocotools on the file as it is scores them lower."""
    data = pytest.importorskip("data")
    path, coco = write_gt(tmp_path, CUSTOM_IDS)
    gt = json.loads(path.read_text())
    odd = [(1, [10, 10, 0, 40]), (1, [50, 60, 30, -2]), (7, [600, 10, 30, 30]),
           (7, [-20, 300, 60, 40]), (12, [250, 350, 80, 80])]      # the last two: clipped
    for k, (image_id, box) in enumerate(odd):
        gt["annotations"].append({"id": 100 + k, "image_id": image_id, "category_id": 17,
                                  "bbox": box, "area": abs(box[2] * box[3]), "iscrowd": 0})
    gt["annotations"].append({"id": 200, "image_id": 1, "category_id": 3, "bbox": [300, 200, 90,
                              90], "area": 8100, "iscrowd": 1})
    path.write_text(json.dumps(gt))
    for image_id, _, _ in IMAGES:
        (tmp_path / f"{image_id}.jpg").touch()
    with pytest.warns(UserWarning) as record:
        dataset = data.CocoDetection(str(tmp_path), str(path))
    assert [str(w.message).split(": ")[1].split(";")[0] for w in record] == [
        "2 box(es) zero or negative width/height, skipped", "1 box(es) outside the image, skipped",
        "2 box(es) partly outside the image, clipped"]
    dets = []
    for index in range(len(dataset)):
        rows = torch.as_tensor(dataset.load_targets(index), dtype=torch.float64)  # (N, 6)
        scores = 0.9 - 0.01 * torch.arange(len(rows), dtype=torch.float64)[:, None]
        dets.append(torch.cat([rows[:, :4], scores, rows[:, 4:5], torch.ones_like(scores)], 1))
    crowd = torch.tensor([[300.0, 200, 390, 290, 0.99, 0, 1]], dtype=torch.float64)
    dets[0] = torch.cat([crowd, dets[0]])                    # top score, on the crowd region
    results = ev.to_coco_results(dets, dataset.ids, dataset.cat_ids)
    assert len(results) == 12 + 2 + 1                        # write_gt's 12, the 2 clipped
    metrics = ev.coco_score(dataset.coco, results, verbose=False)
    assert [metrics[k] for k in ("AP", "AP50", "AP75", "AR100")] == [1.0] * 4, metrics
    assert score_directly(path, results)[0] < 0.9            # the file as it is: misses


# ---------------------------------------------------------------------------------------------
# NMS against a float64 brute force
# ---------------------------------------------------------------------------------------------
def iou64(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def reference_nms(boxes, scores, classes, thre, max_det=None) -> list[int]:
    """Greedy per-class NMS, one box at a time in float64; ties: lower index first."""
    b, s, c = boxes.double().tolist(), scores.double().tolist(), classes.tolist()
    kept = []
    for i in sorted(range(len(s)), key=lambda i: (-s[i], i)):
        if all(c[k] != c[i] or iou64(b[k], b[i]) <= thre for k in kept):
            kept.append(i)
    return kept[:max_det]


def random_boxes(n, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 40], 1)      # (n, 4)
    scores = (torch.rand(n, generator=g) * 20).round() / 20      # 21 values: many ties
    classes = torch.randint(n_classes, (n,), generator=g)
    boxes[n // 2:n // 2 + 30] = boxes[:30]                        # exact duplicates
    return boxes, scores, classes


@pytest.mark.parametrize("thre", [0.3, 0.6, 0.7])
@pytest.mark.parametrize("chunk,max_det", [(512, None), (16, None), (16, 25)])
def test_nms_equals_brute_force(thre, chunk, max_det):
    boxes, scores, classes = random_boxes(400, 5, seed=int(thre * 10))
    keep = ev.batched_nms(boxes, scores, classes, thre, max_det, chunk=chunk)
    assert keep.tolist() == reference_nms(boxes, scores, classes, thre, max_det)


def test_nms_edge_cases():
    empty = torch.zeros(0, 4)
    assert ev.batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    # IoU exactly at the threshold is kept (a box goes when IoU > thre); other class is kept
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 2, 1], [0, 0, 2, 1]])
    scores = torch.tensor([0.9, 0.8, 0.8, 0.7])
    classes = torch.tensor([0, 0, 0, 1])
    for chunk in (512, 1):   # one chunk, or each box its own (suppressed by earlier chunks)
        assert ev.batched_nms(boxes, scores, classes, 0.5, chunk=chunk).tolist() == [0, 1, 3]
    decoded = torch.rand(2, 50, 9) * torch.tensor([100, 100, 30, 30, 0.004, 1, 1, 1, 1])
    assert [tuple(d.shape) for d in ev.postprocess(decoded)] == [(0, 7), (0, 7)]


@pytest.mark.parametrize("multi_label", [False, True])
def test_postprocess_equals_brute_force(multi_label):
    g = torch.Generator().manual_seed(1)
    B, N, C, conf, thre, max_det = 2, 300, 4, 0.05, 0.5, 40
    decoded = torch.rand(B, N, 5 + C, generator=g)                           # (B, N, 5+C)
    decoded[..., :2] *= 100
    decoded[..., 2:4] = decoded[..., 2:4] * 40 + 2
    for p, out in zip(decoded, ev.postprocess(decoded, conf, thre, max_det, multi_label)):
        rows, classes, scores = [], [], []
        for r in range(N):
            probs = p[r, 5:].tolist()
            picks = range(C) if multi_label else [max(range(C), key=lambda k: probs[k])]
            for k in picks:
                if p[r, 4] * p[r, 5 + k] >= conf:
                    rows.append(r), classes.append(k), scores.append(float(p[r, 4] * p[r, 5 + k]))
        cx, cy, w, h = p[rows, :4].double().unbind(1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        keep = reference_nms(boxes, torch.tensor(scores, dtype=torch.float64),
                             torch.tensor(classes), thre, max_det)
        expected = [[*boxes[i].tolist(), scores[i], classes[i], float(p[rows[i], 4])] for i in keep]
        assert len(keep) > 10
        torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Decode round trip: raw prediction -> decoded -> postprocess -> original pixels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("letterbox", [False, True])
def test_encoded_boxes_decode_back_to_original_pixels(letterbox):
    head = pytest.importorskip("head")
    in_hw, orig_hw, C = (320, 416), (600, 500), 12               # non-square input and image
    g = torch.Generator().manual_seed(0)
    expected, levels, label = [], [], 0
    for stride in head.STRIDES:
        H, W = in_hw[0] // stride, in_hw[1] // stride
        slots = torch.tensor([head.RELEASED_ANCHORS[a] for a in head.ANCHOR_MASKS[stride]]
                             + [(head.FREE_SLOT_SCALE * stride,) * 2], dtype=torch.float32)
        pred = torch.full((1, 4, 5 + C, H, W), -20.0)             # obj, cls: nothing there
        shape = torch.randn(1, 4, 2, H, W, generator=g) * 0.3     # guided log factors
        for k in range(4):                                        # 3 anchor slots + free slot
            i, j, fx, fy = 1 + k, H - 1 - k % 2, 0.3 + 0.1 * k, 0.7 - 0.1 * k
            w, h = slots[k, 0] * (1.3 - 0.2 * k), slots[k, 1] * (0.8 + 0.1 * k)
            pred[0, k, 0, j, i] = math.log(fx / (1 - fx))               # tx = logit(fx)
            pred[0, k, 1, j, i] = math.log(fy / (1 - fy))
            pred[0, k, 2, j, i] = torch.log(w / slots[k, 0]) - shape[0, k, 0, j, i]  # log(w/A) - gw
            pred[0, k, 3, j, i] = torch.log(h / slots[k, 1]) - shape[0, k, 1, j, i]
            pred[0, k, 4, j, i], pred[0, k, 5 + label, j, i] = 6.0, 6.0
            cx, cy = (i + fx) * stride, (j + fy) * stride                       # input pixels
            expected.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, label])
            label += 1
        decoded = head.decode_level(pred, shape, stride, slots)  # (1, 4, H, W, 5+C)
        levels.append(decoded.flatten(1, 3))
    det = ev.postprocess(torch.cat(levels, 1), conf_thre=0.5)[0]                  # (12, 7)
    det = ev.to_original(det, in_hw, orig_hw, letterbox)                          # (12, 7)
    expected = torch.tensor(expected)                                             # (12, 5)
    # hand-computed: plain resize scales each axis; the letterbox puts the 600x500 image at
    # 320/600 = 0.533 into (267, 320) pixels, pasted at x = (416 - 267) // 2 = 74
    new_w, new_h, pad_x, pad_y = (267, 320, 74, 0) if letterbox else (416, 320, 0, 0)
    assert ev.letterbox_geometry(orig_hw, in_hw) == (267, 320, 74, 0)
    expected[:, [0, 2]] = (expected[:, [0, 2]] - pad_x) * (500 / new_w)
    expected[:, [1, 3]] = (expected[:, [1, 3]] - pad_y) * (600 / new_h)
    det = det[det[:, 5].argsort()]
    assert det[:, 5].tolist() == list(range(12))
    torch.testing.assert_close(det[:, :4], expected[:, :4], atol=2e-3, rtol=1e-5)


def test_letterbox_input_puts_the_image_between_mean_coloured_bars():
    pytest.importorskip("data")
    image = np.full((50, 100, 3), 200, np.uint8)                  # 100 x 50: 64 x 32 at 0.64
    x = ev.preprocess(image, 64, letterbox=True)                  # (3, 64, 64)
    inside = (200 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert x[:, :16].abs().max() == 0 and x[:, 48:].abs().max() == 0   # pad_y = (64 - 32) // 2
    torch.testing.assert_close(x[:, 16:48], inside[:, None, None].expand(3, 32, 64))


def test_darknet_input_is_pixels_over_255_with_grey_letterbox_bars():
    """darknet's own preprocessing (for yolov3.weights): x / 255, no mean/std, bars of 0.5."""
    image = np.full((50, 100, 3), 200, np.uint8)
    plain = ev.preprocess(image, 64, darknet=True)                # (3, 64, 64)
    torch.testing.assert_close(plain, torch.full((3, 64, 64), 200 / 255))
    boxed = ev.preprocess(image, 64, letterbox=True, darknet=True)
    assert (boxed[:, :16] == 0.5).all() and (boxed[:, 48:] == 0.5).all()
    torch.testing.assert_close(boxed[:, 16:48], torch.full((3, 32, 64), 200 / 255))


# ---------------------------------------------------------------------------------------------
# The picture (Figure 3)
# ---------------------------------------------------------------------------------------------
def test_figure3_size_layout_and_heat_map_colours(tmp_path):
    image = np.full((100, 200, 3), 128, np.uint8)                 # 200 x 100 grey
    det = torch.tensor([[20.0, 20, 80, 60, 0.9, 1, 0.9]])
    maps = {}
    for stride in (32, 16, 8):
        h, w = 128 // stride, 256 // stride
        beta = torch.full((h, w), 0.5)
        beta[:, w // 2:] = 1.0                                     # left half 0.5, right half 1
        weights = torch.stack([torch.full((h, w), 0.25), beta, torch.full((h, w), 0.75)])
        fused = torch.linspace(-3, 5, w).expand(h, w)              # min-max scaled: 0 .. 1 in x
        maps[stride] = {"weights": weights[None] if stride == 16 else weights, "fused": fused}
    picture = ev.draw_figure3(image, det, maps, ["a", "b"])
    picture.save(tmp_path / "f.png")
    picture = Image.open(tmp_path / "f.png").convert("RGB")
    # hand-computed layout: 3 rows of 160 px + 2 gaps of 4 = 488; image panel 200 * 488/100 = 976
    # wide; 4 tiles of 160 + 4 gaps; a 16 px title strip on top, a 28 px colour bar below
    assert picture.size == (976 + 4 * 164, 16 + 488 + 28)
    bar_y, bar_x, bar_w = 16 + 488 + 4, 976 + 4, 3 * 160 + 2 * 4   # the ramp, under alpha..gamma
    assert picture.getpixel((bar_x, bar_y)) == (0, 0, 0)                          # 0: black
    assert picture.getpixel((bar_x + bar_w - 1, bar_y)) == (252, 255, 164)        # 1
    assert picture.getpixel((bar_x + bar_w // 2, bar_y)) == tuple(ev.heat_colors(np.array(
        (bar_w // 2) / (bar_w - 1))).tolist())                                    # linear in x
    for row in range(3):
        y = 16 + row * 164 + 80                                    # the middle of the row's tiles
        at = lambda col, dx, y=y: picture.getpixel((976 + 4 + col * 164 + dx, y))  # noqa: E731
        assert at(0, 80) == (87, 16, 110)                           # alpha 0.25
        assert at(1, 40) == (188, 55, 84) and at(1, 120) == (252, 255, 164)  # beta 0.5 | 1
        assert at(2, 80) == (249, 142, 9)                           # gamma 0.75
        assert at(3, 2) == (0, 0, 0) and at(3, 157) == (252, 255, 164)  # fused: min .. max
    # without maps: the image at its own size, the box drawn in class 1's colour
    alone = ev.draw_figure3(image, det, None, ["a", "b"])
    assert alone.size == (200, 100) and alone.getpixel((20, 40)) == ev.PALETTE[1]
    assert alone.getpixel((50, 40)) == (128, 128, 128)
    # a class named after a colour is boxed in that colour, whatever its index
    named = ev.draw_figure3(image, det, None, ["red circle", "blue triangle"])
    assert named.getpixel((20, 40)) == ev.COLOR_WORDS["blue"]


# ---------------------------------------------------------------------------------------------
# Sharded evaluation: 2 gloo ranks == one process
# ---------------------------------------------------------------------------------------------
SHARD_IMAGES = [(1, 64, 48), (2, 80, 64), (3, 64, 64), (4, 96, 64), (5, 64, 80), (6, 48, 48),
                (7, 64, 32)]


class FakeSet:
    """The data.CocoDetection interface over write_gt's JSON; image k is a flat grey of value
    20 k + 10 (the fake model reads k back from it); index 3 (rank 1's) fails to decode."""

    def __init__(self, ann):
        self.coco = quiet_coco(ann)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.ids = [i for i, _, _ in SHARD_IMAGES]

    def __len__(self):
        return len(self.ids)

    def load_image(self, index):
        if index == 3:
            raise ValueError("truncated file")
        _, w, h = SHARD_IMAGES[index]
        return np.full((h, w, 3), 20 * index + 10, np.uint8), self.ids[index]


class FakeModel(torch.nn.Module):
    """Eval-mode Detector stand-in: the image's GT boxes, jittered, plus a false positive."""

    def __init__(self, dataset, size):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.rows = {}
        for index, (image_id, w, h) in enumerate(SHARD_IMAGES):
            rows = [[10, 10, 20, 20, 0.3, 0.9, 0, 0]]             # a false positive, class 0
            for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=image_id)):
                x, y, bw, bh = a["bbox"]
                cls = dataset.cat_ids.index(a["category_id"])
                jitter = 0.05 * (a["id"] % 4)
                box = [(x + bw / 2 + jitter * bw) * size / w, (y + bh / 2) * size / h,
                       bw * size / w, bh * size / h]
                rows.append([*box, 0.5 + 0.1 * (a["id"] % 5), *np.eye(3)[cls]])
            self.rows[index] = torch.tensor(rows + [[0.0] * 8] * (12 - len(rows)))

    def forward(self, x):                                          # (B, 3, S, S)
        grey = (x[:, 0, 0, 0] * 0.229 + 0.485) * 255               # (B,) undo data.normalize
        return torch.stack([self.rows[round((v - 10) / 20)] for v in grey.tolist()])


def run_fake_evaluation(ann, out, size=64):
    dataset = FakeSet(ann)
    return ev.evaluate(FakeModel(dataset, size), dataset, size=size, batch_size=2, out=out,
                       verbose=False)


def shard_worker(rank, world, port, ann, out):
    """torchrun's environment, then evaluate.init_distributed joins the gloo group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert ev.init_distributed("cpu") == (rank, world, torch.device("cpu"))
    assert dist.get_backend() == "gloo" and dist.get_world_size() == world
    torch.set_num_threads(1)
    metrics = run_fake_evaluation(ann, os.path.join(out, "sharded") if rank == 0 else None)
    with open(os.path.join(out, f"metrics.{rank}.json"), "w") as f:
        json.dump(metrics, f)
    dist.destroy_process_group()


def test_sharded_evaluation_equals_single_process(tmp_path):
    ann, _ = write_gt(tmp_path, CUSTOM_IDS, n_boxes=20, images=SHARD_IMAGES)
    single = run_fake_evaluation(ann, str(tmp_path / "single"))
    assert single["images"] == 7 and single["failed_images"] == 1 and 0.2 < single["AP"] < 0.95
    with socket.socket() as free:                                 # a free port for the group
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(shard_worker, args=(2, port, str(ann), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        sharded = json.loads((tmp_path / f"metrics.{rank}.json").read_text())
        assert {k: v for k, v in sharded.items() if k != "seconds"} == \
            {k: v for k, v in single.items() if k != "seconds"}
    for name in ("results.json", "metrics.json"):
        assert (tmp_path / "sharded" / name).exists()
    assert (tmp_path / "sharded" / "results.json").read_text() == \
        (tmp_path / "single" / "results.json").read_text()


# ---------------------------------------------------------------------------------------------
# Weights and the command line
# ---------------------------------------------------------------------------------------------
SMALL = dict(num_classes=5, fusion="asff", width=0.25, depth=0.34)   # the synthetic set's 5


def save_checkpoint(path, model, config, ema=None):
    torch.save({"model": model.state_dict(), "config": config,
                "ema": ema.state_dict() if ema else None}, path)
    return str(path)


def test_checkpoint_loads_and_a_mismatch_names_the_key(tmp_path):
    head = pytest.importorskip("head")
    torch.manual_seed(0)
    raw, ema = head.Detector(**SMALL).eval(), head.Detector(**SMALL).eval()
    # train.py's config: no num_classes (it comes from the data), fusion "asff", other fields
    config = {k: v for k, v in SMALL.items() if k != "num_classes"} | {"lr": 0.001}
    path = save_checkpoint(tmp_path / "a.pt", raw, config, ema)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ema_flag, expected in ((None, ema), (False, raw)):       # the EMA weights by default
            loaded = ev.load_model(path, ema_flag).eval()
            torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)
    wrong = save_checkpoint(tmp_path / "b.pt", raw, SMALL | {"num_classes": 6})
    with pytest.raises(ValueError, match=r"key heads\.s32\.pred\.weight: checkpoint \(40, .*"
                                         r"model \(44, "):
        ev.load_model(wrong)


def test_released_variant_is_read_off_the_keys():
    golden = pytest.importorskip("golden")
    if not all((golden.REFERENCE / f).is_file() for f in golden.LISTINGS.values()):
        pytest.skip(f"released key listings not found under {golden.REFERENCE}")
    expected = {"baseline": dict(num_classes=80, fusion=None, rfb=False),
                "asff": dict(num_classes=80, fusion="asff", rfb=False),
                "asff-rfb": dict(num_classes=80, fusion="asff", rfb=True)}
    for variant, config in expected.items():
        listing = golden.read_listing(golden.REFERENCE / golden.LISTINGS[variant])
        state = {"module." + k: torch.empty(shape, device="meta") for k, shape in listing}
        assert ev.released_config(state) == config


def test_command_line_evaluates_writes_and_draws(tmp_path, capsys):
    head = pytest.importorskip("head")
    data = pytest.importorskip("data")
    paths = data.make_synthetic(str(tmp_path), n_train=1, n_val=3, image_size=96)
    ckpt = save_checkpoint(tmp_path / "c.pt", head.Detector(**SMALL), SMALL)
    common = ["--weights", ckpt, "--images", paths["val_images"], "--ann", paths["val_json"],
              "--size", "96", "--out", str(tmp_path / "run")]
    ev.main(common + ["--conf", "0.001"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(ev.COCO_STATS) <= set(metrics) and metrics["images"] == 3
    assert "AP50" in capsys.readouterr().out
    info = json.loads(Path(paths["val_json"]).read_text())          # test-dev: no annotations
    del info["annotations"]
    (tmp_path / "info.json").write_text(json.dumps(info))
    ev.main(common[:4] + ["--ann", str(tmp_path / "info.json")] + common[6:] + ["--test-dev"])
    written = tmp_path / "run" / "detections_test-dev2017_asff_results.json"
    results = json.loads(written.read_text())
    assert results and {r["image_id"] for r in results} <= {i["id"] for i in info["images"]}
    ev.main(common + ["--show"])
    (png,) = (tmp_path / "run").glob("figure3_*.png")
    assert Image.open(png).size == ev.figure3_size((96, 96))


def test_images_and_ann_go_together(capsys):
    for argv in (["--images", "my/val"], ["--ann", "my/val.json"], ["--show", "--images", "v"]):
        with pytest.raises(SystemExit) as exit_:
            ev.main(argv)
        assert exit_.value.code == 2
        assert "--images and --ann go together" in capsys.readouterr().err


def test_model_of_another_class_count_is_refused_naming_both(tmp_path):
    head = pytest.importorskip("head")
    data = pytest.importorskip("data")
    paths = data.make_synthetic(str(tmp_path), n_train=1, n_val=2, image_size=64)   # 5 classes
    common = ["--images", paths["val_images"], "--ann", paths["val_json"], "--size", "64"]
    for classes in (3, 7):                                   # fewer, more than the categories
        config = SMALL | {"num_classes": classes}
        ckpt = save_checkpoint(tmp_path / f"c{classes}.pt", head.Detector(**config), config)
        with pytest.raises(data.DataError) as error:
            ev.main(["--weights", ckpt] + common)
        assert str(error.value).startswith(f"{ckpt}: {classes} classes, but "
                                           f"{paths['val_json']} has 5 categories")
    with pytest.raises(data.DataError, match=r"random weights \(--num-classes 80\): 80 classes"):
        ev.main(common)
    dataset = data.CocoDetection(paths["val_images"], paths["val_json"])
    with pytest.raises(data.DataError, match="the model: 7 classes, but .* has 5 categories"):
        ev.evaluate(head.Detector(**SMALL | {"num_classes": 7}), dataset, size=64, verbose=False)


def test_speed_report_ends_with_the_json_line(capsys):
    """tests/bench.py speed: the JSON summary (the last line printed) holds the overhead of each
    variant over the baseline, computed from the medians of speed_benchmark."""
    variants = ("baseline", "asff")
    timings = bench.speed_benchmark(sizes=(64,), variants=variants, runs=1, warmup=0,
                                    width=0.125, depth=0.34, verbose=False)
    table, last = bench.speed_report(timings, (64,), variants)
    ratio = timings["forward"][(False, 64, "asff")] / timings["forward"][(False, 64, "baseline")] - 1
    assert last["asff_overhead_64"] == pytest.approx(ratio, abs=1e-4)
    assert last["decode_nms_ms_64"] > 0 and "forward_folded_ms_asff_64" in last
    assert [line.split()[:2] for line in table.splitlines()[1:3]] == [["baseline", "64"],
                                                                    ["asff", "64"]]
    summary = bench.main(["speed", "--variants", *variants, "--speed-sizes", "64", "--runs", "1",
                          "--warmup", "0", "--width", "0.125", "--depth", "0.34", "--no-fold"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert "asff_overhead_64" in summary and "forward_folded_ms_asff_64" not in summary


# ---------------------------------------------------------------------------------------------
# The command line as users meet it: generated flags, checkpoint settings, one-line errors
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Toy:
    ratio: float | None = ev.opt(0.5, "a ratio")
    name: str = ev.opt("x", "a name", flags=("--name", "--alias"))
    on: bool = ev.opt(True, "a switch")
    paths: list[str] | None = ev.opt(None, "paths; default: none given")


def test_dataclass_parser_holds_only_the_flags_given(capsys):
    parser = ev.dataclass_parser(Toy, "toy")
    assert vars(parser.parse_args([])) == {} and Toy(**vars(parser.parse_args([]))) == Toy()
    given = vars(parser.parse_args(["--ratio", "none", "--no-on", "--alias", "y",
                                    "--paths", "a", "b"]))
    assert given == {"ratio": None, "on": False, "name": "y", "paths": ["a", "b"]}
    text = parser.format_help()
    assert "a ratio [default: 0.5]" in text and "--on, --no-on" in text
    assert "paths; default: none given" in text and "none given [default" not in text
    for argv, message in ((["--ratio", "x"], "invalid float value: 'x'"),
                          (["--rat", "0.1"], "unrecognized arguments: --rat 0.1")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_every_flag_has_help_with_its_default_and_abbreviations_are_refused(capsys):
    parser = ev.dataclass_parser(ev.EvalConfig, "evaluate")
    actions = [a for a in parser._actions if a.dest != "help"]
    assert len(actions) == len(ev.dataclasses.fields(ev.EvalConfig))
    for action in actions:
        assert action.help and "default" in action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--siz", "64"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --siz 64" in capsys.readouterr().err


def test_init_distributed_in_a_plain_run(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert ev.init_distributed("cpu") == (0, 1, torch.device("cpu"))
    with pytest.raises(ev.data.UserError, match="--device gpu0: not a torch device"):
        ev.init_distributed("gpu0")
    if not torch.cuda.is_available():
        assert ev.init_distributed(None) == (0, 1, torch.device("cpu"))
        with pytest.raises(ev.data.UserError, match="--device cuda: torch sees no GPU"):
            ev.init_distributed("cuda")


def contract_checkpoint(path, model, eval_size, class_names, cat_ids) -> str:
    """A checkpoint with what train.py saves for evaluation; its config names no architecture,
    so only model_args can build the model (a default-width Detector would not load)."""
    torch.save({"model": model.state_dict(), "ema": None, "optimizer": {}, "config": {"lr": 1e-3},
                "model_args": SMALL, "eval_size": eval_size, "class_names": class_names,
                "cat_ids": cat_ids}, path)
    return str(path)


def test_checkpoint_is_evaluated_at_its_size_and_flags_override(tmp_path, capsys):
    head = pytest.importorskip("head")
    data = pytest.importorskip("data")
    paths = data.make_synthetic(str(tmp_path), n_train=1, n_val=2, image_size=96)
    ckpt = contract_checkpoint(tmp_path / "c.pt", head.Detector(**SMALL), 64, list("abcde"),
                               [1, 2, 3, 4, 5])
    common = ["--weights", ckpt, "--images", paths["val_images"], "--ann", paths["val_json"]]
    for extra, size in (([], 64), (["--size", "96"], 96)):
        ev.main(common + extra + ["--out", str(tmp_path / f"run{size}")])
        metrics = json.loads((tmp_path / f"run{size}" / "metrics.json").read_text())
        assert metrics["size"] == size and f"at {size} x {size}" in capsys.readouterr().out


def test_flag_contradicting_the_checkpoint_is_refused_naming_both_values(tmp_path):
    head = pytest.importorskip("head")
    ckpt = contract_checkpoint(tmp_path / "c.pt", head.Detector(**SMALL), 64, list("abcde"),
                               [1, 2, 3, 4, 5])
    for argv, message in ((["--fusion", "sum"], f"--fusion sum contradicts {ckpt}, a model with "
                                                "fusion asff"),
                          (["--fusion", "none"], "--fusion none contradicts .* fusion asff"),
                          (["--width", "0.5"], "--width 0.5 contradicts .* width 0.25"),
                          (["--rfb"], "--rfb True contradicts .* rfb False")):
        with pytest.raises(ev.data.UserError, match=message):
            ev.main(["--weights", ckpt, "--export", str(tmp_path / "m.pt2")] + argv)
    model, saved = ev.load_detector(ckpt, fusion="asff", num_classes=5)   # agreeing flags: fine
    assert model.num_classes == 5 and saved == {"eval_size": 64, "class_names": list("abcde"),
                                                "cat_ids": [1, 2, 3, 4, 5]}


def run_script(tmp_path, *argv):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "ASFF_DEBUG": ""})


def test_user_errors_end_in_one_line_and_status_2(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    cases = ((["--data", str(tmp_path / "coco")], "no such folder"),
             (["--weights", "notes.pt"], "notes.pt: not a checkpoint"),
             (["--size", "200"], "--size 200: the test size must be a multiple of 32"),
             (["--size", "64", "--nms", "1.5"], "--nms 1.5: out of range"),
             (["--device", "gpu0"], "--device gpu0: not a torch device"),
             (["--size", "200", "--debug"], "Traceback"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:    # the runs side by side
        runs = list(pool.map(lambda case: run_script(tmp_path, *case[0]), cases))
    for (argv, message), done in zip(cases, runs, strict=True):
        if "--debug" in argv:
            assert done.returncode == 1 and message in done.stderr and "UserError" in done.stderr
            continue
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert message in line and line.startswith("error: ")
        if "--data" in argv:
            assert "--images" in line and "--ann" in line   # how a custom set is given instead


# ---------------------------------------------------------------------------------------------
# prepare_for_inference: folded, NHWC, packed, in-place activations - the released model's outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("variant", ["baseline", "asff", "asff-rfb"])
def test_prepared_model_gives_the_golden_outputs(variant, pack):
    golden = pytest.importorskip("golden")
    if not (golden.REFERENCE / "golden").is_dir():
        pytest.skip(f"golden fixtures not found under {golden.REFERENCE}")
    if pack and not ev.can_pack(torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN: prepare_for_inference packs nothing")
    ref, model = golden.golden_reference(variant), golden.golden_model(variant)
    prepared = ev.prepare_for_inference(model, pack=pack)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())   # a copy
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    convs = [m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d)]
    packed = [m for m in prepared.modules() if isinstance(m, ev.PackedConv)]
    if pack:   # every conv packed; the activations after folded convs fused into them
        head = pytest.importorskip("head")
        assert not convs and len(packed) == sum(isinstance(m, (torch.nn.Conv2d, head.DeformConv2d))
                                                for m in model.modules())   # + their projections
        assert sum(p.act == "leaky_relu" for p in packed) == sum(
            isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
        assert not any(isinstance(m, torch.nn.LeakyReLU) for m in prepared.modules())
    else:
        assert not packed and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        assert all(m.dilation == (2, 2) for m in convs if m.kernel_size == (1, 1))   # to oneDNN
    with torch.inference_mode():
        out = prepared(ref["input"])
    torch.testing.assert_close(out, ref["eval_output"], rtol=1e-4, atol=1e-4)
    if variant != "baseline":
        maps = prepared.fusion_maps(ref["input"])
        for s in (32, 16, 8):
            torch.testing.assert_close(maps[s]["weights"], ref["fusion_weights"][f"s{s}"],
                                       rtol=1e-4, atol=1e-4)


def test_prepare_leaves_a_training_model_alone_and_compile_needs_a_compiler(monkeypatch):
    head = pytest.importorskip("head")
    model = head.Detector(3, fusion="asff", width=0.125, depth=0.33).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ev.prepare_for_inference(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)    # folding draws nothing: resume stays exact
    monkeypatch.setattr(ev.shutil, "which", lambda name: None)
    data = pytest.importorskip("data")
    with pytest.raises(data.UserError, match="--compile on a CPU needs a C\\+\\+ compiler"):
        ev.prepare_for_inference(model, compile=True)


@pytest.mark.parametrize("k, stride, dilation, bias, act", [
    (3, 1, 1, False, torch.nn.LeakyReLU(0.1)), (3, 2, 1, True, torch.nn.ReLU()),
    (1, 1, 2, True, torch.nn.Identity()), (1, 1, 1, False, torch.nn.LeakyReLU(0.25))])
def test_a_packed_conv_is_the_conv_and_its_activation_in_float64(k, stride, dilation, bias, act):
    """PackedConv (weight reordered once per input shape, activation fused) against the float64
    conv + activation, on NCHW and NHWC inputs of three shapes, the first again after the
    others pushed its packing out (SHAPES_KEPT = 2): it is packed afresh, and right."""
    if not ev.can_pack(torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN: prepare_for_inference packs nothing")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, k, stride, padding=(k - 1) // 2, dilation=dilation, bias=bias)
    packed = ev.pack_conv(conv, act)
    exact = copy.deepcopy(conv).double()
    for shape in [(1, 24, 13, 13), (3, 24, 20, 17), (2, 24, 9, 31), (1, 24, 13, 13)]:
        x = torch.randn(shape)
        want = act(exact(x.double())).float()
        for layout in (torch.contiguous_format, torch.channels_last):
            got = packed(x.contiguous(memory_format=layout))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert list(packed.packed)[-1] == shape and len(packed.packed) <= packed.SHAPES_KEPT


def test_prepare_packs_only_float32_cpu_convs_and_the_deformable_projection():
    """A float64 model is prepared without packing (oneDNN packs float32); a float32 one has
    every conv packed, the deformable convs' projection too, and gives the float64 model's output."""
    head = pytest.importorskip("head")
    if not ev.can_pack(torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN: prepare_for_inference packs nothing")
    torch.manual_seed(0)
    model = head.Detector(5, fusion="asff", width=0.125, depth=0.33).eval()
    x = torch.randn(2, 3, 96, 96)
    double = ev.prepare_for_inference(model.double())
    assert not any(isinstance(m, ev.PackedConv) for m in double.modules())
    with torch.inference_mode():
        want = double(x.double()).float()
    single = ev.prepare_for_inference(model.float())
    deform = [m for m in single.modules() if isinstance(m, head.DeformConv2d)]
    assert deform and all(isinstance(m.project, ev.PackedConv) for m in deform)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in single.modules())
    with torch.inference_mode():
        got = single(x)
    cols = [0, 1, *range(4, got.shape[-1])]   # at random init exp(w), exp(h) overflow float32
    torch.testing.assert_close(got[..., cols], want[..., cols], rtol=1e-4, atol=1e-3)
    yolov3 = ev.prepare_for_inference(head.Detector(5, fusion=None, guided=False, spp=False,
                                                    width=0.125, depth=0.33))
    assert not list(yolov3.parameters()) and ev.device_of(yolov3) == torch.device("cpu")
    cfg = ev.EvalConfig(size=96)                      # every conv packed: no parameter left,
    det, _ = ev.detect_image(yolov3, np.zeros((50, 70, 3), np.uint8), cfg)   # still runs
    assert det.shape[1] == 7


def test_against_report_states_ratios_and_roofline_fractions_by_hand():
    """tests/bench.py against: ratio = ours / reference, GFLOP/s = GFLOPs / s, and its fraction of
    the measured roofline; the JSON line holds the same figures."""
    med = {("ours", "asff", 416): 360.0, ("ref", "asff", 416): 480.0,
           ("ours", "baseline", 416): 330.0, ("ref", "baseline", 416): 400.0,
           ("ours", "train", 416): 2800.0, ("ref", "train", 416): 3500.0}
    flops = {("asff", 416): 81.0, ("baseline", 416): 70.0}
    table, summary = bench.against_report(med, flops, 225.0, (416,), 416, 2)
    assert summary["asff_ratio_416"] == 0.75 and summary["baseline_ratio_416"] == 0.825
    assert summary["asff_roofline_fraction_416"] == 1.0           # 81 GFLOP in 0.36 s = 225
    assert summary["asff_overhead_416"] == round(360 / 330 - 1, 4)
    assert summary["train_step_ratio"] == 0.8 and "225.0 GFLOP/s" in table


def test_import_checkout_gives_another_copy_of_the_modules():
    import head
    other = bench.import_checkout(str(Path(__file__).resolve().parents[1]))
    assert other["head"].Detector is not head.Detector              # its own module objects
    assert sys.modules["head"] is head                              # ours untouched
    assert other["loss"].compute_loss.__module__ == "loss"
