"""data.py against independent references: pixel statistics for the boxes, pycocotools for the
synthetic ground truth, hand numbers for colours, mixup and normalisation, a numerically
integrated Beta(1.5, 1.5) for the mixup ratio."""

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import data
from data import (
    FILL,
    MEAN,
    SIZES,
    STD,
    CocoDetection,
    DataError,
    TrainDataset,
    collate,
    draw_mixup,
    make_synthetic,
    random_size,
    resize_batch,
)
from loss import box_iou

REPO = Path(__file__).resolve().parents[1]
# COCO's 80 category ids: 1..90 without these ten
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_coco(folder, images, annotations, categories=None, name="ann.json"):
    """images: [(file_name, PIL image or None, (W, H))]; annotations: [(id, image, cat, bbox)]."""
    entries = []
    for i, (file_name, image, (w, h)) in enumerate(images):
        if image is not None:
            image.save(folder / file_name)
        entries.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
    anns = [{"id": a, "image_id": im, "category_id": c, "bbox": list(b), "area": b[2] * b[3],
             "iscrowd": 0} for a, im, c, b in annotations]
    categories = categories or [{"id": 1, "name": "thing"}]
    path = folder / name
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return str(folder), str(path)


def rect_image(W, H, boxes, background=FILL):
    """White rectangles (x1, y1, x2, y2) on the fill colour, and their rows [x1..y2, class, 1]."""
    image = Image.new("RGB", (W, H), background)
    for x1, y1, x2, y2 in boxes:
        ImageDraw.Draw(image).rectangle((x1, y1, x2 - 1, y2 - 1), fill=(255, 255, 255))
    rows = np.array([[*b, 0, 1] for b in boxes], np.float64).reshape(-1, 6)
    return image, rows


def white_box(image, region=None):
    """Bounding box (x1, y1, x2, y2) of the white pixels (nearer white than the fill colour)."""
    a = np.asarray(image).astype(float).mean(2)
    mask = a > (255 + np.mean(FILL)) / 2
    if region is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in region)
        keep = np.zeros_like(mask)
        keep[max(y1, 0):y2, max(x1, 0):x2] = True
        mask &= keep
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("cache"), n_train=8, n_val=6, image_size=96)


# ---- COCO reading --------------------------------------------------------------------------


def test_category_mapping_round_trips_coco_80_ids(tmp_path):
    shuffled = random.Random(0).sample(COCO_IDS, len(COCO_IDS))  # file order must not matter
    anns = [(k + 1, 1, c, (k % 10 * 5, k // 10 * 5, 4, 4)) for k, c in enumerate(shuffled)]
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (64, 64)), (64, 64))], anns,
                             [{"id": c, "name": f"c{c}"} for c in shuffled])
    ds = CocoDetection(folder, ann)
    assert len(ds.cat_ids) == 80
    assert (ds.cat_ids[0], ds.cat_ids[11], ds.cat_ids[79]) == (1, 13, 90)  # 12 is a gap
    assert ds.cat_to_class[90] == 79 and ds.cat_to_class[13] == 11
    assert all(ds.cat_ids[ds.cat_to_class[c]] == c for c in COCO_IDS)
    assert ds.class_names[11] == "c13"
    classes = ds.load_targets(0)[:, 4].astype(int)  # annotation k has category shuffled[k]
    assert [ds.cat_ids[k] for k in classes] == shuffled


def test_crowd_excluded_by_default_and_included_on_request(tmp_path):
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (50, 50)), (50, 50))],
                             [(1, 1, 1, (1, 1, 10, 10)), (2, 1, 1, (20, 20, 10, 10))])
    raw = json.loads(open(ann).read())
    raw["annotations"][1]["iscrowd"] = 1
    open(ann, "w").write(json.dumps(raw))
    assert len(CocoDetection(folder, ann).load_targets(0)) == 1
    assert len(CocoDetection(folder, ann, include_crowd=True).load_targets(0)) == 2
    assert len(CocoDetection(folder, ann).coco.getAnnIds()) == 2  # COCOeval still sees both


# ---- augmentation keeps boxes on the pixels ------------------------------------------------


@pytest.mark.parametrize("step", [data.expand, data.ssd_crop, data.hflip, data.random_affine])
def test_each_geometric_step_keeps_boxes_on_the_pixels(step):
    box = (30, 40, 90, 80)
    changed = 0
    for seed in range(8):
        image, rows = rect_image(160, 120, [box])
        T, out, wh = step(np.random.default_rng(seed), rows, (160, 120))
        changed += wh != (160, 120) or not np.allclose(T, np.eye(3))
        M = data.resize_matrix(wh, 320) @ T  # the step, then the final resize (2x or more:
        warped = data.warp(image, M, 320)  # one source pixel off would be 2 pixels here)
        expected = data.move_boxes(data.resize_matrix(wh, 320), out)
        assert len(expected) == 1
        assert np.abs(white_box(warped) - expected[0, :4]).max() <= 1.0, (seed, step.__name__)
    assert changed >= 3  # the step did something on most seeds


def test_hflip_is_an_exact_mirror():  # the box test cannot see a shift that moves both
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    T, _, _ = data.hflip(None, np.zeros((0, 6)), (16, 16))
    mirrored = data.warp(image, T, 16, Image.NEAREST)
    assert np.array_equal(np.asarray(mirrored), np.asarray(image)[:, ::-1])


def test_full_geometry_keeps_every_box_on_its_rectangle():
    boxes = [(10, 10, 60, 50), (100, 70, 150, 110), (120, 8, 136, 24)]
    checked = 0
    for seed in range(30):
        image, rows = rect_image(160, 120, boxes)
        M, out, window = data.geometry(np.random.default_rng(seed), rows, (160, 120), 200)
        plan = data.Plan(data.NO_COLOUR, M, tuple(window), Image.BILINEAR, out)
        warped = data.render([image], 1.0, plan, 200)
        for x1, y1, x2, y2, *_ in out:
            if min(x2 - x1, y2 - y1) < 4:
                continue
            found = white_box(warped, (x1 - 3, y1 - 3, x2 + 3, y2 + 3))
            # 1 px of thresholding, plus a source pixel magnified by up to 3x by the crop: the tip
            # of a rotated corner is less than half covered for about a source pixel
            tolerance = 1 + np.abs(M[:2, :2]).sum(1).max()
            error = found - [x1, y1, x2, y2]
            if min(x1, y1) > 0 and max(x2, y2) < 200:
                assert np.abs(error).max() <= tolerance, seed
            else:  # cut by the border after a rotation: as released, the clipped box of the
                # whole turned rectangle, which holds the visible part but may be loose
                assert (error[:2] >= -tolerance).all() and (error[2:] <= tolerance).all(), seed
            checked += 1
    assert checked > 40


def test_augment_falls_back_to_the_plain_image_when_no_box_survives():
    image, rows = rect_image(100, 80, [(10, 10, 30, 30)])
    for seed in range(5):  # min_size 100: no box can survive at size 100
        plan = data.draw_augmentation(np.random.default_rng(seed), rows, (100, 80), 100, 100)
        plain = data.warp(image, data.resize_matrix((100, 80), 100), 100)
        assert np.array_equal(np.asarray(data.render([image], 1.0, plan, 100)), np.asarray(plain))
        np.testing.assert_allclose(plan.rows[:, :4], [[10, 12.5, 30, 37.5]])  # y scaled 100/80


def test_augment_drops_boxes_not_above_min_size():
    image, rows = rect_image(200, 200, [(10, 10, 110, 110), (150, 150, 154, 154)])  # 4 px
    kept_small = 0
    for seed in range(20):
        out = data.draw_augmentation(np.random.default_rng(seed), rows, (200, 200), 200, 6).rows
        sides = np.minimum(out[:, 2] - out[:, 0], out[:, 3] - out[:, 1])
        fallback = len(out) == 2 and np.allclose(out, rows)  # size 200: the plain resize is 1:1
        assert (sides > 6).all() or fallback, seed
        kept_small += len(out) == 2
    assert kept_small < 10  # the 4 px box survives only when a crop magnifies it past 6 px


def test_affine_translation_uses_width_for_x_and_height_for_y():
    tx, ty = [], []
    for seed in range(200):
        A, _, _ = data.random_affine(np.random.default_rng(seed), np.zeros((0, 6)), (400, 40),
                                     degrees=0, scale=0, shear=0, translate=0.1)
        tx.append(A[0, 2])
        ty.append(A[1, 2])
    assert 30 < np.abs(tx).max() <= 40  # 0.1 * W; swapped (the release) it would be <= 4
    assert np.abs(ty).max() <= 4  # 0.1 * H


def test_colour_distort_hand_numbers():
    pixel = lambda rgb, **kw: np.asarray(data.colour_distort(Image.new("RGB", (2, 2), rgb), **kw))[0, 0]  # noqa: E731, E501
    assert pixel((100, 100, 100), brightness=10, contrast=1.2).tolist() == [132, 132, 132]
    assert pixel((250, 5, 0), brightness=10).tolist() == [255, 15, 10]  # clipped at 255
    np.testing.assert_allclose(pixel((255, 0, 0), hue=18), (255, 153, 0), atol=4)  # 36 degrees
    np.testing.assert_allclose(pixel((255, 0, 0), saturation=0.5), (255, 128, 128), atol=1)
    np.testing.assert_allclose(pixel((200, 100, 50), saturation=0.5), (200, 150, 125), atol=1)
    assert pixel((128, 128, 128), hue=18, saturation=1.5).tolist() == [128, 128, 128]  # gray


# ---- mixup ---------------------------------------------------------------------------------


def test_mixup_ratio_is_beta_1_5_and_partner_uniform_among_others():
    draws = [draw_mixup(np.random.default_rng([0, 0, i]), 2, 5) for i in range(20000)]
    lam = np.sort([d[0] for d in draws])
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 0.0625) < 0.003  # ab/((a+b)^2(a+b+1))
    x = np.linspace(0, 1, 20001)
    cdf = np.cumsum(np.sqrt(x * (1 - x))) * (x[1] - x[0]) * 8 / np.pi  # pdf = x^.5 (1-x)^.5 / B
    empirical = np.arange(1, len(lam) + 1) / len(lam)
    assert np.abs(empirical - np.interp(lam, x, cdf)).max() < 0.014  # KS, alpha ~ 0.001
    assert np.abs(empirical - lam).max() > 0.03  # the same test rejects Uniform(0, 1)
    counts = np.bincount([d[1] for d in draws], minlength=5)
    assert counts[2] == 0 and (np.abs(counts[[0, 1, 3, 4]] / 5000 - 1) < 0.06).all()


def test_mixup_blend_is_the_weighted_sum_and_boxes_carry_ratios():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H 20, W 30
    b = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)  # H 40, W 20
    rows_a = np.array([[1, 1, 5, 5, 0, 1.0]])
    rows_b = np.array([[2, 2, 9, 9, 1, 1.0], [3, 3, 8, 8, 2, 1.0]])
    image = data.mixup(Image.fromarray(a), Image.fromarray(b), 0.3)
    rows = data.mixup_rows(rows_a, rows_b, 0.3)
    expected = np.zeros((40, 30, 3))
    expected[:20, :30] += 0.3 * a
    expected[:40, :20] += 0.7 * b
    assert image.size == (30, 40)
    assert np.abs(np.asarray(image) - expected).max() <= 1
    np.testing.assert_allclose(rows[:, 5], [0.3, 0.7, 0.7])
    np.testing.assert_allclose(rows[:, 4], [0, 1, 2])


def test_training_samples_carry_mixup_ratios_and_switch_off(tiny):
    ds = TrainDataset(CocoDetection(tiny["train_images"], tiny["train_json"]), size=128,
                      augment=False)
    for index in range(len(ds)):
        lam, partner = draw_mixup(np.random.default_rng([0, 0, index]), index, len(ds))
        mix = ds[index][1][:, 5].numpy()
        n_own, n_partner = len(ds.data.load_targets(index)), len(ds.data.load_targets(partner))
        np.testing.assert_allclose(mix, [lam] * n_own + [1 - lam] * n_partner, rtol=1e-6)
    ds.mixup = False
    for index in range(len(ds)):
        target = ds[index][1]
        assert len(target) == len(ds.data.load_targets(index)) and (target[:, 5] == 1).all()


# ---- random shapes, batching, normalisation ------------------------------------------------


def test_random_size_covers_the_set_changes_every_k_and_agrees_across_ranks():
    seen = [random_size(7, it) for it in range(5000)]
    assert set(seen) == set(SIZES) == set(range(320, 609, 32))
    blocks = np.array(seen).reshape(-1, 10)
    assert (blocks == blocks[:, :1]).all()  # constant within each block of 10 iterations
    assert (blocks[1:, 0] != blocks[:-1, 0]).mean() > 0.8  # and redrawn at each block (9/10)
    assert len({random_size(7, it, every=3) for it in range(3)}) == 1
    ranks = []
    for rank in range(2):  # simulated ranks: different global random states, same draws
        random.seed(rank)
        np.random.seed(rank)
        torch.manual_seed(rank)
        ranks.append([random_size(7, it) for it in range(200)])
    assert ranks[0] == ranks[1]
    assert [random_size(8, it) for it in range(200)] != ranks[0]  # the seed matters


def test_collate_normalises_and_resize_batch_scales_boxes():
    image, rows = rect_image(256, 256, [(32, 64, 160, 128)], background=(0, 0, 0))
    sample = (torch.from_numpy(np.array(image)).permute(2, 0, 1),
              torch.tensor([[32, 64, 160, 128, 0, 0.5]]))  # rows [x1, y1, x2, y2, class, mix]
    images, targets = collate([sample, sample])
    np.testing.assert_allclose(targets[0].numpy(), [[0, 96, 96, 128, 64, 0.5]])  # cx, cy, w, h
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.float32
    white = [(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]  # 2.2489, 2.4286, 2.6400
    np.testing.assert_allclose(images[0, :, 70, 40], white, atol=1e-5)
    black = [-m / s for m, s in zip(MEAN, STD, strict=True)]
    np.testing.assert_allclose(images[0, :, 0, 0], black, atol=1e-5)
    small, scaled = resize_batch(images, targets, 160)
    assert small.shape == (2, 3, 160, 160)
    np.testing.assert_allclose(scaled[1].numpy(), [[0, 60, 60, 80, 40, 0.5]])
    assert targets[1][0, 1] == 96  # the input is not changed in place
    mask = small[0, 0].numpy() > (white[0] - MEAN[0] / STD[0]) / 2
    ys, xs = np.nonzero(mask)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                               [20, 40, 100, 80], atol=1)  # (32, 64, 160, 128) * 160 / 256


def test_normalize_resizes_and_standardises():
    image = np.zeros((40, 60, 3), np.uint8) + np.array(FILL, np.uint8)
    image.flags.writeable = False  # as np.asarray(PIL image) gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on a read-only array
        x = data.normalize(image, 32)
    assert x.shape == (3, 32, 32)
    assert x.abs().max() < 0.01  # the mean colour maps to ~0
    assert data.normalize(image, (16, 48)).shape == (3, 16, 48)


def test_samples_reproducible_whatever_the_worker_count(tiny):
    ds = TrainDataset(CocoDetection(tiny["train_images"], tiny["train_json"]), size=96, seed=3)
    a, b = ds[5], ds[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a[0])
    ds.set_epoch(0)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers,
                                             collate_fn=collate)
        batches.append(list(loader))
    for (x0, t0), (x2, t2) in zip(*batches, strict=True):
        assert torch.equal(x0, x2) and all(torch.equal(u, v) for u, v in zip(t0, t2, strict=True))


# ---- the synthetic set ---------------------------------------------------------------------


def test_synthetic_set_is_deterministic_and_cached(tmp_path):
    kwargs = dict(n_train=4, n_val=3, image_size=64, seed=5)
    p1, p2 = make_synthetic(tmp_path / "a", **kwargs), make_synthetic(tmp_path / "b", **kwargs)
    for key in ("train_json", "val_json"):
        assert open(p1[key], "rb").read() == open(p2[key], "rb").read()
    png = "/000002.png"
    assert open(p1["val_images"] + png, "rb").read() == open(p2["val_images"] + png, "rb").read()
    other = make_synthetic(tmp_path / "a", **{**kwargs, "seed": 6})
    assert open(other["train_json"], "rb").read() != open(p1["train_json"], "rb").read()
    stamp = (tmp_path / "a").stat().st_mtime_ns, open(p1["train_json"], "rb").read()
    assert make_synthetic(tmp_path / "a", **kwargs) == p1  # cached: nothing written again
    assert stamp == ((tmp_path / "a").stat().st_mtime_ns, open(p1["train_json"], "rb").read())


def test_synthetic_ground_truth_scores_ap_1_in_cocoeval(tiny):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(tiny["val_json"])
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": 1.0} for a in gt.dataset["annotations"]]
        evaluation = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert len(dets) > 5
    assert evaluation.stats[0] == 1.0 and evaluation.stats[1] == 1.0  # AP, AP50


def test_synthetic_images_match_json_and_have_the_promised_content(tmp_path):
    paths = make_synthetic(tmp_path, n_train=40, n_val=2, image_size=128, seed=1)
    ds = CocoDetection(paths["train_images"], paths["train_json"])
    image, _ = ds.load_image(0)
    assert image.shape == (128, 128, 3) and Image.open(ds.files[0]).format == "PNG"
    rows = np.concatenate([ds.load_targets(i) for i in range(len(ds))])
    sides = np.minimum(rows[:, 2] - rows[:, 0], rows[:, 3] - rows[:, 1])
    assert set(rows[:, 4].astype(int)) == set(range(len(data.SYNTHETIC_CLASSES)))
    assert sides.min() >= 8 and sides.min() < 12 and sides.max() > 0.45 * 128
    spans = [np.ptp(ds.load_targets(i)[:, 2] - ds.load_targets(i)[:, 0]) for i in range(len(ds))
             if len(ds.load_targets(i)) > 1]
    assert max(spans) > 40  # small and large in the same image
    overlaps = 0
    for i in range(len(ds)):
        b = ds.load_targets(i)[:, :4]
        iou = box_iou(torch.from_numpy(b), torch.from_numpy(b)).numpy()
        overlaps += (iou[np.triu_indices(len(b), 1)] > 0).sum()
    assert overlaps > 0  # some occlusion


@pytest.mark.parametrize("shape", [s for _, s, _ in data.SYNTHETIC_CLASSES])
def test_synthetic_shapes_fill_exactly_their_boxes(shape):
    for w, h in [(8, 8), (9, 13), (31, 20), (60, 61)]:
        image = Image.new("RGB", (80, 80))
        data.draw_shape(ImageDraw.Draw(image), shape, (5, 7, w, h), (255, 255, 255))
        ys, xs = np.nonzero(np.asarray(image)[..., 0])
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [5, 7, 5 + w, 7 + h], (w, h)


# ---- bad input -----------------------------------------------------------------------------


def test_missing_image_file_fails_at_start_naming_it(tmp_path):
    folder, ann = write_coco(tmp_path, [("here.png", Image.new("RGB", (8, 8)), (8, 8)),
                                        ("gone.png", None, (8, 8))], [])
    with pytest.raises(DataError, match=r"ann\.json: 1 of 2 .*gone\.png \(image id 2\)"):
        CocoDetection(folder, ann)


def test_corrupt_and_truncated_jpegs_raise_on_load_and_are_skipped_in_training(tmp_path):
    good = Image.new("RGB", (64, 48), (200, 30, 30))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(
        buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    folder, ann = write_coco(tmp_path, [("junk.jpg", None, (64, 48)), ("cut.jpg", None, (64, 48)),
                                        ("good.png", good, (64, 48))],
                             [(1, 1, 1, (1, 1, 9, 9)), (2, 3, 1, (10, 10, 20, 20))])
    ds = CocoDetection(folder, ann)  # readable at start-up: only decoding finds these
    for index, name in ((0, "junk.jpg"), (1, "cut.jpg")):
        with pytest.raises(DataError, match=name):
            ds.load_image(index)
    train = TrainDataset(ds, size=64, mixup=False, augment=False)
    with pytest.warns(UserWarning) as record:
        image, target = train[0]  # junk -> cut -> good
    assert "junk.jpg: cannot read" in str(record[0].message)
    assert "cut.jpg: cannot read" in str(record[1].message)
    assert "2 unreadable so far" in str(record[1].message)
    assert image.float().mean(dim=(1, 2)).tolist() == [200, 30, 30]
    np.testing.assert_allclose(target.numpy(), [[10, 13.3333, 30, 40, 0, 1]], rtol=1e-4)  # y 4/3


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, as OpenCV
    ("P", None, (0, 0, 0)),
    ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
    ("I;16", 1000, (4, 4, 4)),  # 16-bit scaled: 1000 / 257 = 3.9
    ("I;16", 65535, (255, 255, 255)),
])
def test_non_rgb_images_load_as_rgb(tmp_path, mode, value, expected):
    name = "x.jpg" if mode == "CMYK" else "x.png"
    if mode == "I;16":
        image = Image.fromarray(np.full((6, 5), value, np.uint16))
    else:
        image = Image.new(mode, (5, 6), value)
    folder, ann = write_coco(tmp_path, [(name, image, (5, 6))], [])
    array, image_id = CocoDetection(folder, ann).load_image(0)
    assert array.dtype == np.uint8 and array.shape == (6, 5, 3) and image_id == 1
    assert array.flags.writeable  # torch.from_numpy warns on read-only arrays
    np.testing.assert_allclose(array[3, 2], expected, atol=2)


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    raw = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored
    raw[:5, :5] = (255, 0, 0)  # a red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown turned 90 degrees clockwise
    Image.fromarray(raw).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    folder, ann = write_coco(tmp_path, [("photo.jpg", None, (20, 40))], [])
    array, _ = CocoDetection(folder, ann).load_image(0)
    assert array.shape == (40, 20, 3)
    assert array[2, 17, 0] > 200 and array[2, 2, 0] < 50  # the block is now top-right
    folder, ann = write_coco(tmp_path, [("photo.jpg", None, (40, 20))], [], name="raw.json")
    with pytest.raises(DataError, match=r"photo\.jpg: decoded size 20x40"):
        CocoDetection(folder, ann).load_image(0)


def test_zero_negative_and_outside_boxes_are_skipped_or_clipped_with_counts(tmp_path):
    anns = [(1, 1, 1, (5, 5, 10, 10)), (2, 1, 1, (5, 5, 0, 10)), (3, 1, 1, (5, 5, 10, -3)),
            (4, 1, 1, (200, 5, 10, 10)), (5, 1, 1, (-5, 90, 20, 20))]
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (100, 100)), (100, 100))], anns)
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(folder, ann)
    messages = " | ".join(str(w.message) for w in record)
    assert "2 box(es) zero or negative width/height, skipped; annotation ids [2, 3]" in messages
    assert "1 box(es) outside the image, skipped; annotation ids [4]" in messages
    assert "1 box(es) partly outside the image, clipped; annotation ids [5]" in messages
    np.testing.assert_allclose(ds.load_targets(0), [[5, 5, 15, 15, 0, 1], [0, 90, 15, 100, 0, 1]])


def test_unknown_category_raises_naming_file_and_annotation(tmp_path):
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (9, 9)), (9, 9))],
                             [(1, 1, 1, (1, 1, 2, 2)), (7, 1, 99, (1, 1, 2, 2))])
    with pytest.raises(DataError, match=r"ann\.json: annotations\[1\] \(id 7\): category_id 99 is "
                                        "not in 'categories'"):
        CocoDetection(folder, ann)


def test_bad_annotation_files_raise_naming_the_problem(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [}')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        CocoDetection(str(tmp_path), str(tmp_path / "broken.json"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for key in ("images", "annotations"):
        content = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
                   "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
        del content[key]
        (tmp_path / "part.json").write_text(json.dumps(content))
        with pytest.raises(DataError, match=rf"part\.json: no '{key}' list"):
            CocoDetection(str(tmp_path), str(tmp_path / "part.json"))
    info = CocoDetection(str(tmp_path), str(tmp_path / "part.json"), require_annotations=False)
    with pytest.raises(DataError, match="no 'annotations'; cannot train"):
        TrainDataset(info)  # an image-info file (COCO test-dev) is for inference only


def test_image_without_objects_is_valid_training_data(tmp_path):
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (30, 20)), (30, 20))], [])
    ds = TrainDataset(CocoDetection(folder, ann), size=32)
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and target.shape == (0, 6)
    images, targets = resize_batch(*collate([ds[0], ds[0]]), 64)
    assert images.shape == (2, 3, 64, 64) and targets[0].shape == (0, 6)


# ---- every annotation file checked before pycocotools sees it --------------------------------

DELETE = object()


def valid_file(folder):
    """Two 40x30 images (written), two categories, three boxes: a file every check accepts."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30)).save(folder / name)
    return {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 8],
                             "area": 80, "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20],
                             "area": 400, "iscrowd": 0},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4],
                             "area": 16, "iscrowd": 0}]}


def changed(content, path, value):
    """content with the value at path (keys and list positions) replaced, or deleted."""
    content = json.loads(json.dumps(content))
    *parents, last = path
    owner = content
    for key in parents:
        owner = owner[key]
    if value is DELETE:
        del owner[last]
    else:
        owner[last] = value
    return content


NAN, INF = float("nan"), float("inf")
BROKEN = [  # (case, path, new value, what the message must say after "file: ")
    ("images missing", ("images",), DELETE, r"no 'images' list"),
    ("images null", ("images",), None, r"no 'images' list \('images' is null\)"),
    ("categories a dict", ("categories",), {"1": "cat"}, r"no 'categories' list"),
    ("annotations a string", ("annotations",), "none", r"no 'annotations' list"),
    ("no images", ("images",), [], r"the 'images' list is empty"),
    ("no categories", ("categories",), [], r"the 'categories' list is empty"),
    ("image a string", ("images", 1), "b.png", r'images\[1\] is "b.png", not an object'),
    ("image null", ("images", 0), None, r"images\[0\] is null, not an object"),
    ("image without id", ("images", 0, "id"), DELETE, r"images\[0\]: 'id' is missing"),
    ("image without file_name", ("images", 1, "file_name"), DELETE,
     r"images\[1\] \(id 2\): 'file_name' is missing"),
    ("image without width", ("images", 0, "width"), DELETE, r"images\[0\] \(id 1\): 'width' is"
                                                             " missing"),
    ("image without height", ("images", 0, "height"), DELETE, r"\(id 1\): 'height' is missing"),
    ("image id a string", ("images", 0, "id"), "1", r"images\[0\]: 'id' is \"1\", not an int"),
    ("image id a float", ("images", 0, "id"), 1.0, r"images\[0\]: 'id' is 1.0, not an integer"),
    ("image id a bool", ("images", 0, "id"), True, r"images\[0\]: 'id' is true, not an integer"),
    ("image id too large", ("images", 0, "id"), 2**64, r"images\[0\]: 'id' is 1844"),
    ("width a string", ("images", 1, "width"), "40", r"images\[1\] \(id 2\): 'width' is \"40\", "
                                                     r"not a whole number of pixels > 0"),
    ("width a bool", ("images", 1, "width"), True, r"\(id 2\): 'width' is true, not a whole"),
    ("width null", ("images", 1, "width"), None, r"\(id 2\): 'width' is null"),
    ("width a list", ("images", 1, "width"), [40], r"\(id 2\): 'width' is \[40\]"),
    ("width NaN", ("images", 1, "width"), NAN, r"\(id 2\): 'width' is NaN"),
    ("height inf", ("images", 1, "height"), INF, r"\(id 2\): 'height' is Infinity"),
    ("width zero", ("images", 0, "width"), 0, r"\(id 1\): 'width' is 0, not a whole number"),
    ("height negative", ("images", 0, "height"), -30, r"\(id 1\): 'height' is -30"),
    ("width fractional", ("images", 0, "width"), 40.5, r"\(id 1\): 'width' is 40.5"),
    ("file_name a number", ("images", 0, "file_name"), 7, r"'file_name' is 7, not a non-empty"),
    ("file_name empty", ("images", 0, "file_name"), "", r"'file_name' is \"\", not a non-empty"),
    ("duplicate image id", ("images", 1, "id"), 1, r"images\[1\] \(id 1\): duplicate id 1, also "
                                                   r"images\[0\]'s"),
    ("category a list", ("categories", 0), [1, "cat"], r"categories\[0\] is \[1, \"cat\"\]"),
    ("category without id", ("categories", 1, "id"), DELETE, r"categories\[1\]: 'id' is missing"),
    ("category without name", ("categories", 1, "name"), DELETE,
     r"categories\[1\] \(id 2\): 'name' is missing"),
    ("category name null", ("categories", 0, "name"), None, r"\(id 1\): 'name' is null"),
    ("category id a string", ("categories", 0, "id"), "cat", r"categories\[0\]: 'id' is \"cat\""),
    ("duplicate category id", ("categories", 1, "id"), 1, r"categories\[1\] \(id 1\): duplicate "
                                                          r"id 1, also categories\[0\]'s"),
    ("duplicate category name", ("categories", 1, "name"), "cat",
     r"categories\[1\] \(id 2\): duplicate name \"cat\", also categories\[0\]'s"),
    ("annotation null", ("annotations", 2), None, r"annotations\[2\] is null, not an object"),
    ("annotation without id", ("annotations", 1, "id"), DELETE,
     r"annotations\[1\]: 'id' is missing"),
    ("annotation without image_id", ("annotations", 1, "image_id"), DELETE,
     r"annotations\[1\] \(id 2\): 'image_id' is missing"),
    ("annotation without category_id", ("annotations", 1, "category_id"), DELETE,
     r"annotations\[1\] \(id 2\): 'category_id' is missing"),
    ("annotation without bbox", ("annotations", 0, "bbox"), DELETE,
     r"annotations\[0\] \(id 1\): 'bbox' is missing"),
    ("annotation id a string", ("annotations", 0, "id"), "a1", r"annotations\[0\]: 'id' is \"a1\""),
    ("annotation id a bool", ("annotations", 0, "id"), False, r"annotations\[0\]: 'id' is false"),
    ("image_id fractional", ("annotations", 0, "image_id"), 1.5, r"'image_id' is 1.5, not an int"),
    ("category_id null", ("annotations", 0, "category_id"), None, r"'category_id' is null"),
    ("duplicate annotation id", ("annotations", 2, "id"), 1,
     r"annotations\[2\] \(id 1\): duplicate id 1, also annotations\[0\]'s"),
    ("bbox of 3", ("annotations", 1, "bbox"), [5, 5, 20], r"\(id 2\): 'bbox' is \[5, 5, 20\], not"
                                                         r" 4 finite numbers"),
    ("bbox of 5", ("annotations", 1, "bbox"), [5, 5, 20, 20, 1], r"'bbox' is \[5, 5, 20, 20, 1\]"),
    ("bbox with a string", ("annotations", 1, "bbox"), [5, "5", 20, 20], r"'bbox' is \[5, \"5\""),
    ("bbox with a bool", ("annotations", 1, "bbox"), [5, 5, True, 20], r"'bbox' is \[5, 5, true"),
    ("bbox with null", ("annotations", 1, "bbox"), [5, None, 20, 20], r"'bbox' is \[5, null"),
    ("bbox with NaN", ("annotations", 1, "bbox"), [5, 5, NAN, 20], r"'bbox' is \[5, 5, NaN"),
    ("bbox with inf", ("annotations", 1, "bbox"), [5, 5, 20, -INF], r"'bbox' is .*-Infinity\]"),
    ("bbox too large", ("annotations", 1, "bbox"), [5, 5, 10**40, 20], r"'bbox' is \[5, 5, 1000"),
    ("bbox a string", ("annotations", 1, "bbox"), "5,5,20,20", r"'bbox' is \"5,5,20,20\""),
    ("bbox a dict", ("annotations", 1, "bbox"), {"x": 5}, r"'bbox' is \{\"x\": 5\}"),
    ("iscrowd 2", ("annotations", 0, "iscrowd"), 2, r"\(id 1\): 'iscrowd' is 2, not 0 or 1"),
    ("iscrowd a bool", ("annotations", 0, "iscrowd"), True, r"'iscrowd' is true, not 0 or 1"),
    ("iscrowd a string", ("annotations", 0, "iscrowd"), "0", r"'iscrowd' is \"0\", not 0 or 1"),
    ("iscrowd a half", ("annotations", 0, "iscrowd"), 0.5, r"'iscrowd' is 0.5, not 0 or 1"),
    ("area a string", ("annotations", 0, "area"), "80", r"\(id 1\): 'area' is \"80\", not a fin"),
    ("area negative", ("annotations", 0, "area"), -80, r"\(id 1\): 'area' is -80, not >= 0"),
    ("unknown image_id", ("annotations", 2, "image_id"), 99,
     r"annotations\[2\] \(id 3\): image_id 99 is not in 'images'"),
    ("unknown category_id", ("annotations", 2, "category_id"), 3,
     r"annotations\[2\] \(id 3\): category_id 3 is not in 'categories'"),
]


@pytest.mark.parametrize("path, value, problem", [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_broken_entries_raise_naming_file_entry_and_field(tmp_path, path, value, problem):
    content = changed(valid_file(tmp_path), path, value)
    (tmp_path / "broken.json").write_text(json.dumps(content))
    with pytest.raises(DataError) as error:
        CocoDetection(str(tmp_path), str(tmp_path / "broken.json"))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'broken.json'}: "), message  # the file
    assert re.search(problem, message), message  # the problem
    if len(path) > 1:  # the entry, and the field
        assert f"{path[0]}[{path[1]}]" in message and (len(path) == 2 or path[2] in message)


@pytest.mark.parametrize("content, problem", [
    (b"", r"the file is empty"),
    (b" \n\t ", r"the file is empty"),
    (b'{"images": [}', r"not valid JSON \(Expecting value: line 1 column 13"),
    (b'{"images": "\xff\xfe"}', r"not UTF-8 text \(byte 12\)"),
    (b"[" * 100_000, r"not valid JSON \(maximum recursion depth"),
    (b'[{"images": []}]', r"the top level is a list, not an object with 'images'"),
    (b'"images"', r"the top level is a string, not an object"),
    (b"null", r"the top level is null, not an object"),
    (b'{"images": 1e400}', r"no 'images' list \('images' is Infinity\)"),
], ids=["empty", "blank", "not JSON", "not UTF-8", "nested too deeply", "a list", "a string",
        "null", "images infinite"])
def test_unreadable_files_raise_naming_the_file(tmp_path, content, problem):
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(DataError) as error:
        CocoDetection(str(tmp_path), str(tmp_path / "bad.json"))
    assert re.match(re.escape(str(tmp_path / "bad.json")) + ": " + problem, str(error.value))


def test_missing_or_unopenable_annotation_file_raises_naming_the_path(tmp_path):
    for path in (tmp_path / "nowhere.json", tmp_path):  # a missing file, a folder
        with pytest.raises(DataError, match=re.escape(str(path)) + ": cannot read the annotation "
                                            r"file \((No such file|Is a directory)"):
            CocoDetection(str(tmp_path), str(path))


def test_valid_variants_are_accepted(tmp_path):
    """What the checks must not refuse: whole-number float sizes, no area, no iscrowd or 0.0,
    extra keys, a byte-order mark, an image-info file without annotations, negative ids."""
    content = valid_file(tmp_path)
    content["images"][0] |= {"width": 40.0, "license": 3, "coco_url": None}
    del content["annotations"][0]["area"], content["annotations"][1]["iscrowd"]
    content["annotations"][2] |= {"segmentation": [[0, 0, 4, 0, 4, 4]], "id": -3, "iscrowd": 0.0}
    (tmp_path / "ok.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(content).encode())
    ds = CocoDetection(str(tmp_path), str(tmp_path / "ok.json"))
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"]
    np.testing.assert_allclose(ds.load_targets(1), [[5, 5, 25, 25, 1, 1], [0, 0, 4, 4, 0, 1]])
    assert ds.coco.anns[1]["area"] == 80  # w * h where the file gives none (COCOeval needs it)
    assert ds.coco.anns[2]["iscrowd"] == 0 and type(ds.coco.anns[-3]["iscrowd"]) is int
    del content["annotations"]
    (tmp_path / "info.json").write_text(json.dumps(content))
    assert len(CocoDetection(str(tmp_path), str(tmp_path / "info.json"),
                             require_annotations=False)) == 2


def test_ground_truth_for_scoring_is_what_the_loader_kept(tmp_path):
    """Skipped boxes are gone from .coco too, clipped ones clipped there, crowd ones kept as
    iscrowd 1 (COCO's ignore regions); boxes left as they were keep the file's numbers."""
    content = valid_file(tmp_path)
    content["annotations"] += [
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5], "area": 0},      # skip
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [50, 3, 5, 5], "area": 25},    # skip
        {"id": 6, "image_id": 1, "category_id": 2, "bbox": [30.5, 20, 20, 20], "area": 400},
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [2, 2, 30, 20], "area": 600,
         "iscrowd": 1}]
    (tmp_path / "mixed.json").write_text(json.dumps(content))
    with pytest.warns(UserWarning):
        ds = CocoDetection(str(tmp_path), str(tmp_path / "mixed.json"))
    assert sorted(ds.coco.anns) == [1, 2, 3, 6, 7]
    assert ds.coco.anns[6]["bbox"] == [30.5, 20, 9.5, 10] and ds.coco.anns[6]["area"] == 400
    assert ds.coco.anns[7]["iscrowd"] == 1 and ds.coco.anns[1]["bbox"] == [1, 2, 10, 8]
    np.testing.assert_allclose(ds.load_targets(0), [[1, 2, 11, 10, 0, 1], [30.5, 20, 40, 30, 1, 1]])
    assert len(ds.load_targets(1)) == 2  # the crowd box is not trained on by default


# ---- the fast pipeline (issue 18) against the pipeline it replaced -----------------------------
# The pipeline as it was: both images decoded whole, mixed on the whole canvas, colour through
# PIL's HSV round trip on all of it, then the crop window cut out and one general PIL warp.


def old_colour_distort(image, brightness, contrast, hue, saturation):
    if brightness != 0 or contrast != 1:
        lut = np.clip(np.clip(np.arange(256) + brightness, 0, 255) * contrast, 0, 255)
        image = image.point(np.tile(lut.round().astype(np.uint8), 3).tolist())
    if hue != 0:
        h, s, v = image.convert("HSV").split()
        shift = round(hue * 256 / 180)
        image = Image.merge("HSV", (h.point([(i + shift) % 256 for i in range(256)]), s, v))
        image = image.convert("RGB")
    if saturation != 1:
        r, g, b = image.split()
        v = ImageChops.lighter(ImageChops.lighter(r, g), b)
        image = Image.blend(Image.merge("RGB", (v, v, v)), image, saturation)
    return image


def old_warp(image, M, size, resample=Image.BILINEAR, window=None):
    if window is not None:
        x1, y1 = max(0, round(window[0])), max(0, round(window[1]))
        x2, y2 = min(image.width, round(window[2])), min(image.height, round(window[3]))
        image, M = image.crop((x1, y1, x2, y2)), M @ data.translation(x1, y1)
    inverse = tuple(np.linalg.inv(M)[:2].ravel())
    return image.transform((size, size), Image.AFFINE, inverse, resample, fillcolor=FILL)


def old_sample(ds, index):
    """TrainDataset[index] (mixup on) as the old pipeline made it, from the same draws."""
    rng = np.random.default_rng([ds.seed, ds.epoch, index])
    lam, partner = draw_mixup(rng, index, len(ds))
    images = [data.open_rgb(str(ds.data.files[j])) for j in (index, partner)]
    W, H = max(im.width for im in images), max(im.height for im in images)
    canvases = [Image.new("RGB", (W, H)) for _ in images]
    for canvas, im in zip(canvases, images, strict=True):
        canvas.paste(im)
    image = Image.blend(*canvases, 1 - lam)
    rows = data.mixup_rows(ds.data.load_targets(index), ds.data.load_targets(partner), lam)
    distorted = old_colour_distort(image, *data.draw_colour(rng))
    M, out, window = data.geometry(rng, rows, (W, H), ds.size)
    out = out[np.minimum(out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]) > ds.min_size]
    resample = (Image.NEAREST, Image.BILINEAR)[rng.integers(2)]
    if len(rows) and not len(out):
        M = data.resize_matrix((W, H), ds.size)
        return old_warp(image, M, ds.size), data.move_boxes(M, rows)
    return old_warp(distorted, M, ds.size, resample, window), out


def test_fast_pipeline_keeps_the_augmentation_distribution(tmp_path):
    """240 samples of 320x240 JPEGs at 256, old pipeline and new on the same seeds. Boxes: the
    same. Pixels: per sample the per-channel mean and std (the colour shift); their averages and
    spreads over the samples must agree within 3 standard errors of the old statistic at this
    sample size (about 1.4 grey levels for means, 0.8 for stds), and sample by sample within 0.5
    grey levels on average and 1 in rms (a step left out or turned round moves them by 5 or
    more). The new decodes JPEGs at 1/2 where the output is smaller (1 sample in 6 here) and
    resizes bilinearly without rotation by rounding, not truncating: the rest is identical."""
    data._write_split(tmp_path, "jpg", 64, 320, 240, 0, 0, fmt="jpg", max_objects=8)
    ds = TrainDataset(CocoDetection(str(tmp_path / "jpg"), str(tmp_path / "jpg.json")), size=256)
    n, stats, boxes, identical = 240, {"old": [], "new": []}, {"old": [], "new": []}, 0
    for k in range(n):
        ds.set_epoch(k // len(ds))
        old_image, old_rows = old_sample(ds, k % len(ds))
        new_image, new_rows = ds[k % len(ds)]
        pixels = {"old": np.asarray(old_image, np.float64),
                  "new": new_image.permute(1, 2, 0).numpy().astype(np.float64)}
        identical += np.array_equal(pixels["old"], pixels["new"])
        for name, rows in (("old", old_rows), ("new", new_rows.numpy())):
            x = pixels[name]
            stats[name].append(np.concatenate([x.mean((0, 1)), x.std((0, 1))]))  # (6,)
            w, h = rows[:, 2] - rows[:, 0], rows[:, 3] - rows[:, 1]  # box jitter: scale, centre
            boxes[name] += np.stack([np.log(w * h) / 2, rows[:, 0] + w / 2, rows[:, 1] + h / 2], 1).tolist()
    for key in (stats, boxes):
        old, new = np.array(key["old"]), np.array(key["new"])
        se = old.std(0) / np.sqrt(len(old))  # standard error of the old statistic's mean
        assert (np.abs(new.mean(0) - old.mean(0)) <= 3 * se).all(), (new.mean(0), old.mean(0), se)
        assert (np.abs(new.std(0) - old.std(0)) <= 3 * se * np.sqrt(2)).all()  # of its spread
    np.testing.assert_array_equal(boxes["new"], boxes["old"])  # the same draws, the same boxes
    paired = np.array(stats["new"]) - np.array(stats["old"])  # (n, 6) sample by sample
    assert (np.abs(paired.mean(0)) <= 0.5).all() and (np.sqrt((paired**2).mean(0)) <= 1).all()
    assert n // 2 < identical < n  # most samples bit for bit; some decoded small or resized


def test_rotate_hue_gives_pils_hsv_round_trip_values():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 256, 3), np.uint8)
    rgb[0, :, :] = [[v, v, v] for v in range(256)]  # grays, and saturated colours
    rgb[1, :, :] = [[255, v, 0] for v in range(256)]
    image = Image.fromarray(rgb)
    for hue in (-18, -7, 1, 9, 18, 90):
        old = old_colour_distort(image, 0, 1, hue, 1)
        assert np.array_equal(np.asarray(data.rotate_hue(image, hue)), np.asarray(old)), hue


def test_rotate_hue_turns_hsv_hue_and_keeps_saturation_and_value():
    """Against colorsys in float64: hue + 2 * hue degrees (OpenCV's unit), S and V kept. PIL's 8-bit
    HSV rounds the pixel's hue and the shift (half a step of 255 * 6 / 256 grey levels each), S, V."""
    import colorsys
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    for hue in (-18, -7, 1, 9, 90):
        turned = np.asarray(data.rotate_hue(Image.fromarray(rgb), hue)).astype(float)
        expected = np.array([[colorsys.hsv_to_rgb((h + hue / 180) % 1, s, v) for h, s, v in
                              (colorsys.rgb_to_hsv(*(p / 255)) for p in row)] for row in rgb]) * 255
        error = np.abs(turned - expected)
        assert error.max() <= 10 and error.mean() < 2, (hue, error.max(), error.mean())


def test_colour_and_mixup_on_the_window_equal_colour_on_the_whole_image():
    """render cuts the crop window out first: every colour step and the blend go pixel by pixel,
    so the result is the old order's to the bit (here with nearest and a general warp)."""
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (70, 50, 3), np.uint8))
    M = data.random_affine(rng, np.zeros((0, 6)), (80, 70))[0] @ data.translation(-10, -5)
    plan = data.Plan((12.0, 1.3, 11, 0.7), data.resize_matrix((50, 45), 96) @ M, (10, 5, 60, 50),
                     Image.NEAREST, np.zeros((0, 6)))
    whole = old_colour_distort(data.mixup(a, b, 0.3), *plan.colour)
    expected = old_warp(whole, plan.M, 96, Image.NEAREST, plan.window)
    assert np.array_equal(np.asarray(data.render([a, b], 0.3, plan, 96)), np.asarray(expected))


@pytest.mark.parametrize("mirror", [False, True])
def test_scaled_warp_by_resize_is_bilinear_interpolation(mirror):
    """Bilinear with no rotation goes through PIL's resize: where it enlarges, a float64 bilinear
    interpolation at the pixel centres to 1 grey level (resize rounds after each of its two
    passes); outside the image the mean colour."""
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    M = data.translation(10, 6) @ np.diag([1.7, 2.3, 1])  # 85 x 92 px at (10, 6) in 112 x 112
    if mirror:
        M = np.array([[-1, 0, 112], [0, 1, 0], [0, 0, 1]]) @ M
    fast = np.asarray(data.warp(Image.fromarray(rgb), M, 112)).astype(float)
    inverse = np.linalg.inv(M)
    y, x = np.mgrid[7:97, 18:94] + 0.5 if mirror else np.mgrid[7:97, 11:94] + 0.5  # inside
    u, v = (inverse[k, 0] * x + inverse[k, 1] * y + inverse[k, 2] - 0.5 for k in (0, 1))
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    at = lambda i, j: rgb[np.clip(j, 0, 39), np.clip(i, 0, 49)].astype(float)  # noqa: E731
    exact = ((1 - fv) * ((1 - fu) * at(u0, v0) + fu * at(u0 + 1, v0))
             + fv * ((1 - fu) * at(u0, v0 + 1) + fu * at(u0 + 1, v0 + 1)))
    error = fast[y.astype(int), x.astype(int)] - exact
    assert np.abs(error).max() <= 1 + 1e-9 and abs(error.mean()) < 0.1
    assert (fast[:5] == FILL).all() and (fast[99:] == FILL).all()  # above, below the image


def test_jpeg_decodes_at_reduced_scale_and_sizes_are_still_checked(tmp_path):
    rgb = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3),
                                                                       np.uint8)).resize((161, 121)))
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    folder, ann = write_coco(tmp_path, [("a.jpg", None, (161, 121)), ("b.png", None, (161, 121))], [])
    ds = CocoDetection(folder, ann)
    for index in (0, 1):  # JPEG: DCT scaling; PNG: 2 x 2 averages
        half = np.asarray(ds.open(index, reduce=2)).astype(float)
        assert half.shape == (61, 81, 3)  # ceil(121 / 2), ceil(161 / 2)
        expected = np.asarray(Image.fromarray(rgb).reduce(2)).astype(float)
        assert np.abs(half - expected)[:-1, :-1].mean() < 3  # the same picture, smaller
    folder, ann = write_coco(tmp_path, [("a.jpg", None, (160, 121))], [], name="wrong.json")
    with pytest.raises(DataError, match=r"a\.jpg: decoded size 161x121 .* not the 160x121"):
        CocoDetection(folder, ann).open(0, reduce=4)


def test_reduction_keeps_a_source_pixel_per_output_pixel():
    assert data.reduction(np.diag([0.95, 1.27, 1])) == 1
    assert data.reduction(np.diag([0.5, 0.5, 1])) == 2 and data.reduction(np.diag([0.26, 0.2, 1])) == 2
    assert data.reduction(np.diag([0.1, 0.05, 1])) == 8  # at most 1/8 (JPEG's coarsest scale)
    turned = np.array([[0.3, -0.3, 0], [0.3, 0.3, 0], [0, 0, 1]])  # 0.42 along every direction
    assert data.reduction(turned) == 2


# ---- python data.py --check ---------------------------------------------------------------------


def test_check_reads_a_set_as_training_does_and_summarises_it(tmp_path, capsys):
    content = valid_file(tmp_path)
    content["annotations"] += [
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5]},  # skipped
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [30, 20, 20, 20]},  # clipped
        {"id": 6, "image_id": 2, "category_id": 2, "bbox": [2, 2, 9, 9], "iscrowd": 1}]
    content["images"].append({"id": 3, "file_name": "c.png", "width": 20, "height": 50})
    Image.new("RGB", (20, 50)).save(tmp_path / "c.png")
    (tmp_path / "set.json").write_text(json.dumps(content))
    data.main(["--check", "--images", str(tmp_path), "--ann", str(tmp_path / "set.json")])
    printed = capsys.readouterr().out
    assert "3 images (1 without boxes)" in printed and "4 boxes to train on in 2 classes" in printed
    assert "boxes per class: cat 2, dog 2\n" in printed  # by hand: 1, 3 cat; 2, 5 dog; 6 crowd
    assert "  1 box(es) zero or negative width/height, skipped; annotation ids [4]\n" in printed
    assert "  1 box(es) partly outside the image, clipped; annotation ids [5]\n" in printed
    assert "outside the image, skipped" not in printed and "[x1, y1, x2, y2]" not in printed  # 1 of 6
    assert "crowd boxes: 1" in printed and "widths 20-40, heights 30-50 px" in printed
    assert "decoded all 3 images" in printed
    (tmp_path / "c.png").write_bytes(b"not a png")
    data.main(["--check", "--images", str(tmp_path), "--ann", str(tmp_path / "set.json")])
    assert "1 of 3 images unreadable" in capsys.readouterr().out


def test_check_on_a_bad_file_ends_with_one_line_and_status_2(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    content = valid_file(folder)
    content["annotations"][1]["bbox"] = [5, 5, "20", 20]
    (folder / "bad.json").write_text(json.dumps(content))
    done = subprocess.run([sys.executable, str(REPO / "data.py"), "--check", "--images", str(folder),
                           "--ann", str(folder / "bad.json")], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"ASFF_DEBUG": ""})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [f"error: {folder / 'bad.json'}: annotations[1] (id 2): 'bbox' "
                                        '''is [5, 5, "20", 20], not 4 finite numbers [x, y, w, h]''']


def test_check_lists_clipped_ids_and_suspects_corner_boxes(tmp_path, capsys):
    """Seven of eight boxes written as [x1, y1, x2, y2] by mistake: read as [x, y, w, h] they reach
    past the 100 x 80 image, which --check says with their ids, and names the likely cause."""
    corners = [(50, 40, 90, 70), (60, 10, 95, 50), (30, 30, 80, 75), (45, 5, 70, 60),
               (52, 44, 99, 79), (70, 20, 98, 60), (41, 41, 60, 60), (5, 5, 30, 30)]  # the last fits
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (100, 80)), (100, 80))],
                             [(k + 1, 1, 1, box) for k, box in enumerate(corners)])
    with pytest.warns(UserWarning) as said:
        CocoDetection(folder, ann)
    assert re.search(r"7 of 8 boxes reach past their image: are they \[x1, y1", str(said[-1].message))
    data.main(["--check", "--images", folder, "--ann", ann])
    printed = capsys.readouterr().out
    assert "  7 box(es) partly outside the image, clipped; annotation ids [1, 2, 3, 4, 5] ...\n" in printed
    assert "A COCO bbox is [x, y, width, height]" in printed
    folder, ann = write_coco(tmp_path, [("a.png", None, (100, 80))],  # 1 of 2 clipped: no hint
                             [(1, 1, 1, corners[0]), (2, 1, 1, corners[7])], name="half.json")
    data.main(["--check", "--images", folder, "--ann", ann])
    printed = capsys.readouterr().out
    assert "clipped; annotation ids [1]\n" in printed and "[x1, y1, x2, y2]" not in printed


def test_categories_without_a_training_box_are_named_once_on_rank_0(tmp_path, capsys, monkeypatch):
    """One labelling tool exports a category 0 named after the project, with no boxes; a crowd-only
    category has no training box either (crowd boxes are scored, not trained on, by default)."""
    categories = [{"id": 0, "name": "my-project"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    folder, ann = write_coco(tmp_path, [("a.png", Image.new("RGB", (50, 50)), (50, 50))],
                             [(1, 1, 1, (1, 1, 10, 10)), (2, 1, 2, (20, 20, 10, 10))], categories)
    content = json.loads(Path(ann).read_text())
    content["annotations"][1]["iscrowd"] = 1
    Path(ann).write_text(json.dumps(content))
    monkeypatch.delenv("RANK", raising=False)
    TrainDataset(CocoDetection(folder, ann))
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith(f"warning: {ann}: categories without a training box")
    assert said[0].endswith('(id name): 0 "my-project", 2 "dog"')
    TrainDataset(CocoDetection(folder, ann, include_crowd=True))
    assert capsys.readouterr().err.endswith('(id name): 0 "my-project"\n')
    monkeypatch.setenv("RANK", "1")  # other DDP ranks say nothing
    TrainDataset(CocoDetection(folder, ann))
    assert capsys.readouterr().err == ""


def test_validation_split_alone_is_the_one_a_training_set_comes_with(tmp_path):
    kwargs = dict(n_val=3, image_size=64, seed=2)
    alone = make_synthetic(tmp_path / "a", n_train=0, **kwargs)
    full = make_synthetic(tmp_path / "b", n_train=4, **kwargs)
    assert alone["train_images"] is None and alone["train_json"] is None
    assert sorted(p.name for p in Path(alone["root"]).iterdir()) == ["val", "val.json"]  # nothing else
    assert Path(alone["val_json"]).read_bytes() == Path(full["val_json"]).read_bytes()
    images = {split: {p.name: p.read_bytes() for p in Path(paths["val_images"]).iterdir()}
              for split, paths in (("alone", alone), ("full", full))}
    assert images["alone"] == images["full"] and len(images["alone"]) == 3
    assert len(CocoDetection(alone["val_images"], alone["val_json"])) == 3


WORKERS_MAIN = '''
import os, sys
import torch
import data

class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000
    def __getitem__(self, i):
        with open(sys.argv[2], "a") as f:  # the worker's pid, to see that it is gone afterwards
            f.write(f"{os.getpid()}\\n")
        return torch.tensor([i])

LOADERS = []  # the iterator outlives main(), as through a traceback's reference cycle

def main(argv):
    loader = torch.utils.data.DataLoader(Numbers(), batch_size=2, num_workers=2,
                                         worker_init_fn=data.ignore_stop_signals)
    LOADERS.append(iter(loader))
    for k, _ in enumerate(LOADERS[0]):
        if k == 3:
            raise {"user": data.DataError("x.json: bad input, mid-epoch"), "bug": RuntimeError("a bug"),
                   "exit": SystemExit(3)}[sys.argv[1]]

data.exit_on_user_error(main)
'''


@pytest.mark.parametrize("error, status", [("user", 2), ("bug", 1), ("exit", 3)])
def test_an_error_while_loader_workers_run_ends_the_process_and_the_workers(tmp_path, error, status):
    """The workers ignore SIGTERM (ignore_stop_signals), with which Python's exit ends its children
    before joining them: without exit_on_user_error's kill the process waits forever."""
    (tmp_path / "main.py").write_text(WORKERS_MAIN)
    done = subprocess.run([sys.executable, str(tmp_path / "main.py"), error, str(tmp_path / "pids")],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=os.environ | {"PYTHONPATH": str(REPO), "ASFF_DEBUG": ""})
    assert done.returncode == status, done.stderr
    if error == "user":
        assert done.stderr == "error: x.json: bad input, mid-epoch\n"
    assert ("RuntimeError: a bug" in done.stderr) == (error == "bug")
    pids = set(map(int, (tmp_path / "pids").read_text().split()))
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---- files shaped like labelling tools' exports and like COCO's own ------------------------------


def export_like(tool, root):
    """(image folder, annotation file, {file name: expected training rows}, class names) of a small
    export laid out and keyed as `tool` writes it; two images, hand-made boxes."""
    jpeg = lambda path, size: (path.parent.mkdir(parents=True, exist_ok=True),  # noqa: E731
                               Image.new("RGB", size, (90, 120, 150)).save(path, quality=90))
    if tool == "cvat":  # annotations/instances_default.json beside images/; extra keys everywhere
        for name in ("frame_000000.jpg", "frame_000001.jpg"):
            jpeg(root / "images" / name, (64, 48))
        content = {"licenses": [{"name": "", "id": 0, "url": ""}],
                   "info": {"contributor": "", "date_created": "", "version": "", "year": ""},
                   "categories": [{"id": 1, "name": "car", "supercategory": ""},
                                  {"id": 2, "name": "person", "supercategory": ""}],
                   "images": [{"id": k + 1, "width": 64, "height": 48, "file_name": f"frame_00000{k}.jpg",
                               "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0}
                              for k in range(2)],
                   "annotations": [
                       {"id": 1, "image_id": 1, "category_id": 2, "segmentation": [], "area": 120.0,
                        "bbox": [10.5, 4.0, 12.0, 10.0], "iscrowd": 0,
                        "attributes": {"occluded": False, "rotation": 0.0}},
                       {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [], "area": 600.0,
                        "bbox": [30.0, 20.0, 30.0, 20.0], "iscrowd": 0, "attributes": {"occluded": True}}]}
        ann, folder = root / "annotations" / "instances_default.json", root / "images"
        rows = {"frame_000000.jpg": [[10.5, 4, 22.5, 14, 1, 1]], "frame_000001.jpg": [[30, 20, 60, 40, 0, 1]]}
        names = ["car", "person"]
    elif tool == "label-studio":  # result.json beside images/, file names with the sub-folder, ids from 0
        for name in ("1a2b3c-dog.jpg", "4d5e6f-cat.jpg"):
            jpeg(root / "images" / name, (40, 30))
        content = {"images": [{"width": 40, "height": 30, "id": k, "file_name": f"images/{name}"}
                              for k, name in enumerate(("1a2b3c-dog.jpg", "4d5e6f-cat.jpg"))],
                   "categories": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}],
                   "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "segmentation": [],
                                    "bbox": [2, 3, 20, 15], "ignore": 0, "iscrowd": 0, "area": 300},
                                   {"id": 1, "image_id": 1, "category_id": 0, "segmentation": [],
                                    "bbox": [0, 0, 40, 30], "ignore": 0, "iscrowd": 0, "area": 1200}],
                   "info": {"year": 2024, "version": "1.0", "contributor": "Label Studio"}}
        ann, folder = root / "result.json", root
        rows = {"images/1a2b3c-dog.jpg": [[2, 3, 22, 18, 1, 1]],
                "images/4d5e6f-cat.jpg": [[0, 0, 40, 30, 0, 1]]}
        names = ["cat", "dog"]
    elif tool == "roboflow":  # the annotation file inside the image folder; category 0 = the project
        for name in ("img1_jpg.rf.0a1b.jpg", "img2_jpg.rf.2c3d.jpg"):
            jpeg(root / "train" / name, (32, 32))
        content = {"info": {"year": "2024", "description": "Exported from roboflow.com"},
                   "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/",
                                 "name": "CC BY 4.0"}],
                   "categories": [{"id": 0, "name": "pets-xyz", "supercategory": "none"},
                                  {"id": 1, "name": "cat", "supercategory": "pets-xyz"}],
                   "images": [{"id": k, "license": 1, "file_name": name, "height": 32, "width": 32,
                               "date_captured": "2024-01-01T00:00:00+00:00"}
                              for k, name in enumerate(("img1_jpg.rf.0a1b.jpg", "img2_jpg.rf.2c3d.jpg"))],
                   "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [4, 4, 8.5, 10],
                                    "area": 85, "segmentation": [], "iscrowd": 0}]}
        ann, folder = root / "train" / "_annotations.coco.json", root / "train"
        rows = {"img1_jpg.rf.0a1b.jpg": [[4, 4, 12.5, 14, 1, 1]], "img2_jpg.rf.2c3d.jpg": []}
        names = ["pets-xyz", "cat"]
    else:  # COCO's own: polygons, an RLE crowd region, COCO-sized ids, categories with gaps
        for name in ("000000397133.jpg", "000000037777.jpg"):
            jpeg(root / "val2017" / name, (80, 60))
        content = {"info": {"description": "COCO 2017 Dataset"}, "licenses": [{"id": 4, "name": "x"}],
                   "images": [{"license": 4, "file_name": name, "coco_url": "", "height": 60, "width": 80,
                               "date_captured": "2013-11-14 17:02:52", "id": int(name[:12])}
                              for name in ("000000397133.jpg", "000000037777.jpg")],
                   "categories": [{"supercategory": "person", "id": 1, "name": "person"},
                                  {"supercategory": "kitchen", "id": 44, "name": "bottle"}],
                   "annotations": [
                       {"segmentation": [[10, 10, 30, 10, 30, 40, 10, 40]], "area": 600.0, "iscrowd": 0,
                        "image_id": 397133, "bbox": [10.0, 10.0, 20.0, 30.0], "category_id": 44, "id": 82445},
                       {"segmentation": {"counts": [0, 30, 30, 1000], "size": [60, 80]}, "area": 900.0,
                        "iscrowd": 1, "image_id": 397133, "bbox": [40.0, 5.0, 30.0, 30.0], "category_id": 1,
                        "id": 900100397133},
                       {"segmentation": [[1.5, 2.5, 60.2, 2.5, 60.2, 50.0]], "area": 1400.0, "iscrowd": 0,
                        "image_id": 37777, "bbox": [1.5, 2.5, 58.7, 47.5], "category_id": 1, "id": 1234567}]}
        ann, folder = root / "annotations" / "instances_val2017.json", root / "val2017"
        rows = {"000000397133.jpg": [[10, 10, 30, 40, 1, 1]],
                "000000037777.jpg": [[1.5, 2.5, 60.2, 50, 0, 1]]}
        names = ["person", "bottle"]
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(content))
    return str(folder), str(ann), rows, names


@pytest.mark.parametrize("tool", ["cvat", "label-studio", "roboflow", "coco"])
def test_labelling_tool_and_coco_exports_load_and_check(tmp_path, capsys, tool):
    folder, ann, rows, names = export_like(tool, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, clipped or odd in any of them
        ds = CocoDetection(folder, ann)
    assert ds.class_names == names
    assert [Path(f).relative_to(folder).as_posix() for f in ds.files] == list(rows)
    for i, expected in enumerate(rows.values()):
        np.testing.assert_allclose(ds.load_targets(i), np.reshape(expected, (-1, 6)))
        assert ds.load_image(i)[0].shape == (*ds.sizes[i, ::-1], 3)
    n_crowd = int(tool == "coco")  # the RLE region: scored as COCO's ignore region, not trained on
    assert len(ds.coco.getAnnIds()) == sum(map(len, rows.values())) + n_crowd
    assert len(ds.coco.getAnnIds(iscrowd=True)) == n_crowd
    data.main(["--check", "--images", folder, "--ann", ann])
    printed = capsys.readouterr().out
    per_class = np.bincount([int(r[4]) for image in rows.values() for r in image], minlength=2)
    assert f"boxes per class: {names[0]} {per_class[0]}, {names[1]} {per_class[1]}\n" in printed
    assert f"crowd boxes: {n_crowd} " in printed and "decoded all 2 images" in printed
    train = TrainDataset(ds, size=64, seed=0)
    said = capsys.readouterr().err  # the project-named empty category, and only there
    assert ('categories without a training box, which the model learns never to predict (id name): '
            '0 "pets-xyz"' in said) == (tool == "roboflow")
    images, targets = collate([train[0], train[1]])
    assert images.shape == (2, 3, 64, 64) and all(t.shape[1] == 6 for t in targets)


def test_to_input_finishes_a_uint8_batch_as_collate_and_resize_batch_do(tiny):
    """The device-side path (uint8 to the device, normalised and resized there) against a float64
    reference: (x / 255 - mean) / std, bilinear to the size, boxes scaled by size / side."""
    train = TrainDataset(CocoDetection(tiny["train_images"], tiny["train_json"]), size=96)
    batch = [train[i] for i in range(4)]
    images, targets = data.stack_batch(batch)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 96, 96)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (MEAN, STD))
    reference = (images.double() / 255 - mean) / std
    for size in (None, 96, 64, 128):
        x, t = data.to_input(images, targets, size)
        side = size or 96
        expected = torch.nn.functional.interpolate(reference, (side, side), mode="bilinear")
        assert x.dtype == torch.float32 and x.shape == (4, 3, side, side)
        assert (x.double() - expected).abs().max() < 1e-5
        for mine, rows in zip(t, batch, strict=True):
            x1, y1, x2, y2, cls, mix = rows[1].double().unbind(1)
            s = side / 96
            hand = torch.stack([cls, (x1 + x2) / 2 * s, (y1 + y2) / 2 * s, (x2 - x1) * s, (y2 - y1) * s,
                                mix], 1)
            torch.testing.assert_close(mine.double(), hand, rtol=1e-6, atol=1e-4)  # float32 rounding
    x, t = collate(batch)
    assert torch.equal(x, data.to_input(images, targets)[0])  # collate is this path at the same size
