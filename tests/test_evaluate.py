"""evaluate.py against independent references: pycocotools called directly, a float64
brute-force NMS, hand-computed APs, boxes and pixel colours, the golden outputs of the released
model through prepare_for_inference, and a single process vs 2 gloo ranks."""

import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def test_postprocess_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    B, N, C, conf, thre, max_det = 2, 300, 4, 0.05, 0.5, 40
    decoded = torch.rand(B, N, 5 + C, generator=g)                           # (B, N, 5+C)
    decoded[..., :2] *= 100
    decoded[..., 2:4] = decoded[..., 2:4] * 40 + 2
    for p, out in zip(decoded, ev.postprocess(decoded, conf, thre, max_det)):
        rows, classes, scores = [], [], []
        for r in range(N):
            probs = p[r, 5:].tolist()
            for k in [max(range(C), key=lambda k: probs[k])]:          # the argmax class
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
# Every valid COCO-format file scores right (issue 26): ids from 0 or 1, crowds, COCO-sized ids
# ---------------------------------------------------------------------------------------------
def rle_of_box(x, y, w, h, width, height) -> dict:
    """The uncompressed RLE (column-major runs) of a filled box, as COCO's crowd regions are."""
    mask = np.zeros((height, width), np.uint8)
    mask[y:y + h, x:x + w] = 1
    flat, counts, value, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return {"counts": counts + [run], "size": [height, width]}


def labelled_file(tmp_path, first_id: int, image_ids, cat_ids) -> Path:
    """Two images, boxes of three categories, a crowd region (RLE) on each image; annotation ids
    counting from first_id."""
    anns, k = [], first_id
    for image_id in image_ids:
        for j, (x, y, w, h) in enumerate([(10, 12, 40, 30), (60, 50, 25, 45), (5, 70, 90, 20)]):
            anns.append({"id": k, "image_id": image_id, "category_id": cat_ids[j], "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0, "segmentation": []})
            k += 1
        anns.append({"id": k, "image_id": image_id, "category_id": cat_ids[0], "bbox": [100, 5, 30, 30],
                     "area": 900, "iscrowd": 1, "segmentation": rle_of_box(100, 5, 30, 30, 160, 120)})
        k += 1
    gt = {"images": [{"id": i, "width": 160, "height": 120, "file_name": f"{i}.jpg"} for i in image_ids],
          "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids], "annotations": anns}
    path = tmp_path / f"gt-{first_id}.json"
    path.write_text(json.dumps(gt))
    return path


@pytest.mark.parametrize("first_id", [0, 1])
def test_ground_truth_as_detections_scores_exactly_one_whatever_the_numbering(tmp_path, first_id):
    """pycocotools alone reads annotation id 0 as "no match": files numbered from 0 scored lower
    (the box with id 0 missed, its detection a false positive). coco_score: exactly 1.0."""
    path = labelled_file(tmp_path, first_id, image_ids=[0, 581929] if first_id == 0 else [139, 581929],
                         cat_ids=[0, 7, 90] if first_id == 0 else [1, 7, 90])
    coco = quiet_coco(path)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9 - 0.01 * n}
               for n, a in enumerate(coco.dataset["annotations"]) if not a["iscrowd"]]
    metrics = ev.coco_score(coco, results, verbose=False)
    assert [metrics[k] for k in ("AP", "AP50", "AP75", "AR100")] == [1.0] * 4, metrics
    assert (score_directly(path, results)[0] < 1.0) == (first_id == 0)   # the bug that is avoided
    assert [a["id"] for a in coco.dataset["annotations"]][0] == first_id   # the caller's copy untouched


# ---------------------------------------------------------------------------------------------
# Decode round trip: raw prediction -> decoded -> postprocess -> original pixels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("darknet", [False, True])
def test_encoded_boxes_decode_back_to_original_pixels(darknet):
    head = pytest.importorskip("head")
    size, orig_hw, C = 416, (600, 500), 12
    g = torch.Generator().manual_seed(0)
    expected, levels, label = [], [], 0
    for stride in head.STRIDES:
        H = W = size // stride
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
        levels.append(head.decode_level(pred, shape, stride, slots).flatten(1, 3))
    det = ev.postprocess(torch.cat(levels, 1), conf_thre=0.5)[0]                  # (12, 7)
    det = ev.to_original(det, size, orig_hw, darknet)                            # (12, 7)
    expected = torch.tensor(expected)                                             # (12, 5)
    # by hand: the plain resize scales each axis; darknet's letterbox puts the 500 x 600 image at
    # 416/600 into 347 x 416 pixels, pasted at x = (416 - 347) // 2 = 34
    new_w, new_h, pad_x = (347, 416, 34) if darknet else (416, 416, 0)
    assert ev.letterbox_geometry(orig_hw, size) == (347, 416, 34, 0)
    expected[:, [0, 2]] = (expected[:, [0, 2]] - pad_x) * (500 / new_w)
    expected[:, [1, 3]] = expected[:, [1, 3]] * (600 / new_h)
    det = det[det[:, 5].argsort()]
    assert det[:, 5].tolist() == list(range(12))
    torch.testing.assert_close(det[:, :4], expected[:, :4], atol=2e-3, rtol=1e-5)


def test_input_is_data_normalize_or_darknets_pixels_over_255_with_grey_bars():
    data = pytest.importorskip("data")
    image = np.full((50, 100, 3), 200, np.uint8)                  # 100 x 50: 64 x 32 in a 64 box
    torch.testing.assert_close(ev.preprocess(image, 64), data.normalize(image, 64))
    boxed = ev.preprocess(image, 64, darknet=True)                # (3, 64, 64)
    assert (boxed[:, :16] == 0.5).all() and (boxed[:, 48:] == 0.5).all()
    torch.testing.assert_close(boxed[:, 16:48], torch.full((3, 32, 64), 200 / 255))


# ---------------------------------------------------------------------------------------------
# The picture (Figure 3)
# ---------------------------------------------------------------------------------------------
def test_figure3_layout_and_heat_map_colours(tmp_path):
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
    ev.draw_figure3(image, det, maps, ["a", "b"]).save(tmp_path / "f.png")
    picture = Image.open(tmp_path / "f.png").convert("RGB")
    # by hand: 3 rows of 160 px + 2 gaps of 4 = 488 high; the image panel 200 * 488 / 100 = 976
    # wide; 4 tiles of 160 + 4 gaps; a 16 px title strip on top, a 24 px colour bar below
    assert picture.size == (976 + 4 * 164, 16 + 488 + 24)
    bar_y, bar_x, bar_w = 16 + 488 + 2, 976 + 4, 3 * 160 + 2 * 4   # the ramp under alpha..gamma
    assert picture.getpixel((bar_x, bar_y)) == (0, 0, 0)                          # 0: black
    assert picture.getpixel((bar_x + bar_w - 1, bar_y)) == (252, 255, 164)        # 1
    assert picture.getpixel((bar_x + bar_w // 2, bar_y)) == tuple(ev.heat_colours(np.array(
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
    return ev.evaluate(FakeModel(dataset, size), dataset, eval_size=size, batch_size=2, out=out,
                       verbose=False)


def shard_worker(rank, world, port, ann, out):
    """torchrun's process group by hand (gloo), then the evaluation of rank `rank`."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
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
    assert (tmp_path / "sharded" / "results.json").read_text() == \
        (tmp_path / "single" / "results.json").read_text()


# ---------------------------------------------------------------------------------------------
# Weights and the command line
# ---------------------------------------------------------------------------------------------
SMALL = dict(num_classes=5, fusion="asff", width=0.25, depth=0.34)   # the synthetic set's 5
REPO = Path(__file__).resolve().parents[1]


def save_checkpoint(path, model, ema=None, model_args=SMALL, **more) -> str:
    """What train.py's checkpoints hold for evaluation (model_args, config, ...)."""
    torch.save({"model": model.state_dict(), "ema": ema.state_dict() if ema else None, "optimizer": {},
                "config": {"lr": 1e-3}, "model_args": model_args} | more, path)
    return str(path)


def test_checkpoint_loads_its_ema_or_raw_weights_and_a_mismatch_names_the_key(tmp_path):
    head = pytest.importorskip("head")
    torch.manual_seed(0)
    raw, ema = head.Detector(**SMALL).eval(), head.Detector(**SMALL).eval()
    path = save_checkpoint(tmp_path / "a.pt", raw, ema)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ema_flag, expected in ((None, ema), (False, raw)):       # the EMA weights by default
            loaded, saved = ev.load_detector(path, ema_flag)
            torch.testing.assert_close(loaded.eval()(x), expected(x), rtol=0, atol=0)
            assert saved["model_args"] == ev.DETECTOR_DEFAULTS | SMALL
    wrong = save_checkpoint(tmp_path / "b.pt", raw, model_args=SMALL | {"num_classes": 6})
    with pytest.raises(ev.data.DataError, match=r"b\.pt: .* size mismatch for heads\.s32\.pred\.weight: "
                                                r"copying a param with shape torch\.Size\(\[40, .* model is "
                                                r"torch\.Size\(\[44, "):
        ev.load_detector(wrong)
    with pytest.raises(ev.data.UserError, match="holds no EMA weights"):
        ev.load_detector(wrong, ema=True)


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


def test_command_line_evaluates_at_the_checkpoints_size_writes_and_draws(tmp_path, capsys):
    head = pytest.importorskip("head")
    data = pytest.importorskip("data")
    paths = data.make_synthetic(str(tmp_path), n_train=1, n_val=3, image_size=96)
    ckpt = save_checkpoint(tmp_path / "c.pt", head.Detector(**SMALL), eval_size=64,
                           class_names=list("abcde"), cat_ids=[1, 2, 3, 4, 5])
    common = ["--weights", ckpt, "--images", paths["val_images"], "--ann", paths["val_json"]]
    for extra, size in (([], 64), (["--eval-size", "96"], 96)):     # the checkpoint's, or the flag's
        ev.main(common + extra + ["--out", str(tmp_path / f"run{size}"), "--conf", "0.001"])
        metrics = json.loads((tmp_path / f"run{size}" / "metrics.json").read_text())
        assert metrics["eval_size"] == size and metrics["images"] == 3 and set(ev.COCO_STATS) <= set(metrics)
        assert f"at {size} x {size}" in capsys.readouterr().out
    info = json.loads(Path(paths["val_json"]).read_text())          # test-dev: no annotations
    del info["annotations"]
    (tmp_path / "info.json").write_text(json.dumps(info))
    ev.main(common[:4] + ["--ann", str(tmp_path / "info.json"), "--out", str(tmp_path / "td"), "--test-dev"])
    results = json.loads((tmp_path / "td" / "detections_test-dev2017_asff_results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {i["id"] for i in info["images"]}
    ev.main(common + ["--show", "--out", str(tmp_path / "fig")])
    (png,) = (tmp_path / "fig").glob("figure3_*.png")
    assert Image.open(png).size == (488 + 4 * 164, 16 + 488 + 24)     # a square image


def test_an_empty_size_bucket_prints_as_not_applicable():
    metrics = dict.fromkeys(ev.COCO_STATS, 0.5) | {"APl": -1.0}
    header, values = ev.paper_columns(metrics).splitlines()
    assert header.split() == list(ev.PAPER_COLUMNS) and values.split() == ["50.0"] * 5 + ["n/a"]


def test_a_demo_checkpoint_is_evaluated_on_its_own_synthetic_set_without_a_training_set(tmp_path,
                                                                                      monkeypatch):
    head = pytest.importorskip("head")
    data = pytest.importorskip("data")
    made = []
    real = data.make_synthetic

    def only_what_is_asked(root=None, n_train=1024, n_val=64, **more):
        made.append((n_train, n_val))
        return real(str(tmp_path / "cache"), n_train=1, n_val=n_val, image_size=64)
    monkeypatch.setattr(data, "make_synthetic", only_what_is_asked)
    ckpt = save_checkpoint(tmp_path / "c.pt", head.Detector(**SMALL), eval_size=64,
                           config={"synthetic_val": 3, "lr": 1e-3})
    ev.main(["--weights", ckpt, "--out", str(tmp_path / "run")])
    assert made == [(0, 3)]                                   # no training set asked for
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["images"] == 3


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
    common = ["--images", paths["val_images"], "--ann", paths["val_json"], "--eval-size", "64"]
    for classes in (3, 7):                                   # fewer, more than the categories
        config = SMALL | {"num_classes": classes}
        ckpt = save_checkpoint(tmp_path / f"c{classes}.pt", head.Detector(**config), model_args=config)
        with pytest.raises(data.DataError) as error:
            ev.main(["--weights", ckpt] + common)
        assert str(error.value).startswith(f"{ckpt}: {classes} classes, but "
                                           f"{paths['val_json']} has 5 categories")
    with pytest.raises(data.DataError, match=r"random weights: 80 classes"):
        ev.main(common)


def test_flag_contradicting_the_checkpoint_is_refused_naming_both_values(tmp_path):
    head = pytest.importorskip("head")
    ckpt = save_checkpoint(tmp_path / "c.pt", head.Detector(**SMALL), eval_size=64,
                           class_names=list("abcde"), cat_ids=[1, 2, 3, 4, 5])
    for flags, message in ((dict(fusion="sum"), f"--fusion sum contradicts {ckpt}, a model with fusion asff"),
                           (dict(fusion=None), "--fusion none contradicts .* fusion asff"),
                           (dict(width=0.5), "--width 0.5 contradicts .* width 0.25"),
                           (dict(rfb=True), "--rfb True contradicts .* rfb False")):   # train.py's flags
        with pytest.raises(ev.data.UserError, match=message):
            ev.load_detector(ckpt, **flags)
    model, saved = ev.load_detector(ckpt, fusion="asff", num_classes=5)   # agreeing flags: fine
    assert model.num_classes == 5 and saved["eval_size"] == 64 and saved["class_names"] == list("abcde")


def test_help_names_every_flag_with_its_default_and_the_toy_shows_its_boxes(capsys):
    with pytest.raises(SystemExit):
        ev.main(["-h"])
    text = " ".join(capsys.readouterr().out.split())          # argparse wraps lines: unwrap
    flags = re.findall(r"^\s+(--[a-z-]+)", ev.__doc__ and ev.build_parser().format_help(), re.M)
    assert len(flags) > 10 and text.count("(default: ") == len(flags)   # -h's own line has none
    described = {piece.split()[0]: piece for piece in text.split("options:")[1].split(" --")}
    for flag, default in (("nms", "0.6"), ("batch-size", "8"), ("eval-size", "None"), ("raw", "False")):
        assert described[flag].endswith(f"(default: {default})"), described[flag]
    ev.main([])                                             # no arguments: the toy NMS
    toy = capsys.readouterr().out
    assert "four decoded boxes" in toy and toy.count("\n") < 20 and "-h lists the flags" in toy
    inputs, kept = ([float(v) for v in re.findall(r"\d+\.\d+", part)] for part in toy.split("kept by"))
    assert len(inputs) == 4 * 7 and inputs[21:24] == [200.0, 90.0, 30.0]       # the four boxes
    assert kept[2:] == pytest.approx([30, 30, 70, 70, 0.81, 0, 0.9, 34, 30, 74, 70, 0.72, 1, 0.8])


def run_script(tmp_path, *argv):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "ASFF_DEBUG": ""})


def test_user_errors_end_in_one_line_and_status_2(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    cases = ((["--data", str(tmp_path / "coco")], "error: --data", "no such folder"),
             (["--weights", "notes.pt"], "error: notes.pt", "not a checkpoint"),
             (["--weights", "yolov3_asff.pth"], "error: yolov3_asff.pth", "github.com/GOATmessi8/ASFF"),
             (["--eval-size", "200"], "argument --eval-size", "'200': must be a multiple of 32"),
             (["--nms", "1.5"], "argument --nms", "'1.5': must be a number in [0, 1]"),
             (["--siz", "64"], "unrecognized arguments", "--siz 64"),
             (["--device", "gpu0"], "argument --device", "'gpu0': must be cpu, or cuda with a GPU"),
             (["--weights", "notes.pt", "--debug"], "Traceback", "UserError"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:    # the runs side by side
        runs = list(pool.map(lambda case: run_script(tmp_path, *case[0]), cases))
    for (argv, first, second), done in zip(cases, runs, strict=True):
        if "--debug" in argv:
            assert done.returncode == 1 and first in done.stderr and second in done.stderr
            continue
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert first in line and second in line, line


# ---------------------------------------------------------------------------------------------
# prepare_for_inference: eval mode, folded, channels-last - the released model's golden outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["baseline", "asff", "asff-rfb"])
def test_prepared_model_gives_the_golden_outputs(variant):
    golden = pytest.importorskip("golden")
    if not (golden.REFERENCE / "golden").is_dir():
        pytest.skip(f"golden fixtures not found under {golden.REFERENCE}")
    ref, model = golden.golden_reference(variant), golden.golden_model(variant)
    prepared = ev.prepare_for_inference(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())   # a copy
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    convs = [m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(p.requires_grad for p in prepared.parameters()) and not prepared.training
    with torch.inference_mode():
        out = prepared(ref["input"])
    torch.testing.assert_close(out, ref["eval_output"], rtol=1e-4, atol=1e-4)
    if variant != "baseline":
        maps = prepared.fusion_maps(ref["input"])
        for s in (32, 16, 8):
            torch.testing.assert_close(maps[s]["weights"], ref["fusion_weights"][f"s{s}"],
                                       rtol=1e-4, atol=1e-4)


def test_prepare_leaves_a_training_model_alone():
    head = pytest.importorskip("head")
    model = head.Detector(3, fusion="asff", width=0.125, depth=0.33).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ev.prepare_for_inference(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)    # folding draws nothing: resume stays exact


# ---------------------------------------------------------------------------------------------
# tests/bench.py: its report's figures by hand
# ---------------------------------------------------------------------------------------------
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
