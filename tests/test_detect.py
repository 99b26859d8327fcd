"""evaluate.py --detect (your own images and folders) and --export (torch.export): the JSON holds
the model's boxes over --conf for the same input, mapped to image pixels and clipped by hand here;
unreadable files are named and counted, none readable is an error; without --out the outputs land
under runs/; the exported program runs in a fresh process with neither this repository nor its
modules, on an image, and gives the prepared model's boxes."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from data import UserError, open_rgb
from head import Detector

NAMES = ["red circle", "green square", "blue triangle"]
SIZE = 64
ARGS = dict(num_classes=3, fusion="asff", width=0.125, depth=0.33)


def tiny_model(**more) -> Detector:
    torch.manual_seed(0)
    return Detector(**ARGS | more).eval()


def write_checkpoint(path, model, model_args=ARGS) -> str:
    """The parts of a train.py checkpoint that evaluation reads."""
    torch.save({"model": model.state_dict(), "ema": None, "optimizer": {}, "config": {},
                "model_args": model_args, "eval_size": SIZE, "class_names": NAMES, "cat_ids": [3, 17, 42]},
               path)
    return str(path)


def write_images(folder):
    """A non-square PNG, a grayscale JPEG, an EXIF-rotated JPEG and a corrupt file."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 200, 3), np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (70, 70), np.uint8), "L").save(folder / "gray.jpg")
    rotated = Image.fromarray(rng.integers(0, 255, (40, 100, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6                                           # "rotate 90 clockwise to view"
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def boxes_by_hand(model, image: np.ndarray, conf: float) -> torch.Tensor:
    """The boxes over `conf` of the model as evaluation runs it (prepare_for_inference) on the
    plain-resized input, scaled to image pixels and clipped to the image; empty ones dropped."""
    x = ev.preprocess(image, SIZE)[None]                       # (1, 3, SIZE, SIZE)
    with torch.no_grad():
        det = ev.postprocess(ev.prepare_for_inference(model)(x), conf, ev.NMS_THRE)[0]  # input pixels
    H, W = image.shape[:2]
    det[:, [0, 2]] = (det[:, [0, 2]] * W / SIZE).clamp(0, W)
    det[:, [1, 3]] = (det[:, [1, 3]] * H / SIZE).clamp(0, H)
    return det[(det[:, 2] > det[:, 0]) & (det[:, 3] > det[:, 1])]


def test_detect_writes_the_boxes_over_conf_clipped_in_image_pixels(tmp_path, capsys):
    model = tiny_model()
    folder = write_images(tmp_path / "photos")
    out = tmp_path / "out"
    ev.main(["--detect", str(folder), "--weights", write_checkpoint(tmp_path / "c.pt", model),
             "--out", str(out), "--conf", "0.2"])
    printed = capsys.readouterr().out
    assert "broken.jpg" in printed and "1 unreadable file(s) skipped" in printed and "[4/4]" in printed
    rows = json.loads((out / "detections.json").read_text())
    assert rows and min(r["score"] for r in rows) >= 0.2               # what --conf asks for
    for name in ("wide.png", "gray.jpg", "rotated.jpg"):
        image = np.asarray(open_rgb(str(folder / name)))       # upright, RGB
        mine = [r for r in rows if r["file_name"] == str(folder / name)]
        want = boxes_by_hand(model, image, 0.2)
        assert len(mine) == len(want) > 0, name
        got = torch.tensor([r["bbox"] for r in mine])
        x1, y1, x2, y2 = want[:, :4].T
        torch.testing.assert_close(got, torch.stack([x1, y1, x2 - x1, y2 - y1], 1), atol=0.01, rtol=1e-6)
        H, W = image.shape[:2]                                 # inside the image
        assert (got[:, :2] >= 0).all() and (got[:, 0] + got[:, 2] <= W + 0.01).all()
        assert (got[:, 1] + got[:, 3] <= H + 0.01).all()
        assert [r["category"] for r in mine] == [NAMES[int(c)] for c in want[:, 5]]
        assert [r["category_id"] for r in mine] == [[3, 17, 42][int(c)] for c in want[:, 5]]
        assert Image.open(out / f"{name.split('.')[0]}.png").size == image.shape[1::-1]
    assert Image.open(out / "rotated.png").size == (40, 100)   # EXIF applied: 100 tall


def test_without_out_pictures_land_under_runs_and_a_run_that_read_nothing_fails(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_model())
    folder = write_images(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    ev.main(["--detect", str(folder / "wide.png"), "--weights", ckpt])
    ev.main(["--show", str(folder / "wide.png"), "--weights", ckpt])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "photos", "runs"]
    assert (tmp_path / "runs" / "detect" / "detections.json").is_file()
    assert (tmp_path / "runs" / "show" / "figure3_wide.png").is_file()
    with pytest.raises(UserError, match="none of the 1 file"):
        ev.main(["--detect", str(folder / "broken.jpg"), "--weights", ckpt])
    done = subprocess.run([sys.executable, str(ev.Path(ev.__file__)), "--detect", str(folder / "broken.jpg"),
                           "--weights", ckpt], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: none of the 1 file"), done.stderr


def test_detect_names_missing_paths_and_empty_folders(tmp_path):
    model, infer = tiny_model(), ev.Inference(SIZE)
    with pytest.raises(UserError, match=r"nowhere\.jpg: no such file or folder"):
        ev.detect(model, [str(tmp_path / "nowhere.jpg")], NAMES, [3, 17, 42], tmp_path / "o", infer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no image files .* in .*empty"):
        ev.detect(model, [str(tmp_path / "empty")], NAMES, [3, 17, 42], tmp_path / "o", infer)


def test_boxes_are_drawn_in_their_class_colour_and_in_proportion_to_the_image():
    det = torch.tensor([[10.0, 30, 60, 60, 0.9, 2, 0.9]])
    small = ev.draw_boxes(Image.new("RGB", (100, 80)), det, NAMES, 0.5)
    large = ev.draw_boxes(Image.new("RGB", (2000, 1600)), det * torch.tensor([20.0, 20, 20, 20, 1, 1, 1]),
                          NAMES, 0.5)

    def left_edge_width(im, x1, y):                            # coloured pixels across the edge
        return sum(1 for x in range(x1 - 20, x1 + 20) if im.getpixel((x, y)) != (0, 0, 0))
    assert small.getpixel((10, 50)) == ev.PALETTE[2]           # the box in its class's colour
    thin, thick = left_edge_width(small, 10, 50), left_edge_width(large, 200, 1000)
    assert thin >= 2 and thick >= 3 * thin                     # a 20x larger image: thicker lines
    strip = lambda im, y: sum(im.getpixel((x, y)) == ev.PALETTE[2] for x in range(14, 50))  # noqa: E731
    assert strip(small, 27) > 10 and strip(small, 40) == 0     # the label's strip above the box
    top = ev.draw_boxes(Image.new("RGB", (100, 80)), torch.tensor([[10.0, 0, 60, 60, 0.9, 2, 0.9]]),
                        NAMES, 0.5)
    assert strip(top, 5) > 10                                  # at the top edge: inside the box
    assert ev.draw_boxes(Image.new("RGB", (100, 80)), det, NAMES, 0.95).getbbox() is None  # under conf


FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    assert not any(m in sys.modules for m in ("evaluate", "head", "asff", "data"))
    meta = {"meta.json": ""}
    program = torch.export.load(sys.argv[1], extra_files=meta).module()
    meta = json.loads(meta["meta.json"])
    mean, std = (torch.tensor(meta[k])[:, None, None] for k in ("mean", "std"))
    image = Image.open(sys.argv[2]).convert("RGB")
    out = {}
    for side in (meta["eval_size"], 96, 160):   # the test size and two others, multiples of 32
        pixels = np.asarray(image.resize((side, side), Image.BILINEAR), np.float32)
        x = (torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255 - mean) / std
        rows = program(x)[0]                                   # (N, 5+C) decoded
        assert rows.grad_fn is None and not rows.requires_grad
        score, cls = (rows[:, 4:5] * rows[:, 5:]).max(1)       # meta["score"]
        out[side] = rows[score >= meta["conf"]].tolist()
    print(json.dumps({"meta": meta, "rows": out}))
""")


@pytest.mark.parametrize("guided", [False, True])
def test_export_runs_in_a_fresh_process_without_this_repository(tmp_path, guided):
    """The README's use of an exported file: torch.export.load, the settings from meta.json, any
    multiple of 32 as input size - in a process with no asff module and the repository not on
    its path; its rows are those of the model as evaluation runs it on the same pixels."""
    model = tiny_model(guided=guided)
    path = tmp_path / "model.pt2"
    ckpt = write_checkpoint(tmp_path / "c.pt", model, ARGS | {"guided": guided})
    ev.main(["--export", str(path), "--weights", ckpt, "--conf", "0.05"])
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    away = tmp_path / "elsewhere"
    away.mkdir()
    done = subprocess.run([sys.executable, "-I", "-c", FRESH, str(path), str(tmp_path / "a.png")], cwd=away,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["meta"]["class_names"] == NAMES and got["meta"]["eval_size"] == SIZE
    assert got["meta"]["nms"] == ev.NMS_THRE and got["meta"]["conf"] == 0.05
    prepared = ev.prepare_for_inference(model, channels_last=False)
    for side, rows in got["rows"].items():
        pixels = np.asarray(Image.fromarray(image).resize((int(side),) * 2, Image.BILINEAR))
        x = ev.preprocess(pixels, int(side))[None]              # at its own size: normalised only
        with torch.no_grad():
            p = prepared(x)[0]                                  # (N, 5+C) decoded, as evaluation
        want = p[(p[:, 4:5] * p[:, 5:]).max(1).values >= 0.05]
        assert len(rows) == len(want) > 0
        rest = [0, 1, *range(4, want.shape[1])]                 # w, h of untrained boxes: huge
        torch.testing.assert_close(torch.tensor(rows)[:, rest], want[:, rest], atol=2e-3, rtol=1e-3)
