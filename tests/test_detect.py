"""evaluate.py --detect (your own images and folders) and --export (torch.export): the JSON holds
exactly the model's boxes for the same input, mapped to image pixels by hand here; unreadable
files are named and counted; the exported program gives the eager model's decoded rows."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from data import UserError, open_rgb
from head import Detector

NAMES = ["red circle", "green square", "blue triangle"]
SIZE = 64


def tiny_model() -> Detector:
    torch.manual_seed(0)
    return Detector(len(NAMES), fusion="asff", width=0.125, depth=0.33).eval()


def write_checkpoint(path, model) -> str:
    """The parts of a train.py checkpoint that evaluation reads."""
    torch.save({"model": model.state_dict(), "ema": None, "optimizer": {},
                "config": {"fusion": "asff", "guided": True, "spp": True, "rfb": False,
                           "dropblock": False, "width": 0.125, "depth": 0.33, "anchors": "auto"},
                "class_names": NAMES, "cat_ids": [3, 17, 42]}, path)
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


def boxes_by_hand(model, image: np.ndarray) -> torch.Tensor:
    """The boxes over CONF_THRE of the model as evaluation runs it (prepare_for_inference) on the
    plain-resized input, scaled to image pixels."""
    model = ev.prepare_for_inference(model)
    x = ev.preprocess(image, SIZE)[None]                       # (1, 3, SIZE, SIZE)
    with torch.no_grad():
        det = ev.postprocess(model(x), ev.CONF_THRE, ev.NMS_THRE)[0]  # (K, 7) input pixels
    H, W = image.shape[:2]
    det[:, [0, 2]] *= W / SIZE
    det[:, [1, 3]] *= H / SIZE
    return det


def test_detect_writes_the_models_boxes_in_image_pixels_and_skips_broken_files(tmp_path, capsys):
    model = tiny_model()
    folder = write_images(tmp_path / "photos")
    out = tmp_path / "out"
    ev.main(["--detect", str(folder), "--weights", write_checkpoint(tmp_path / "c.pt", model),
             "--size", str(SIZE), "--out", str(out), "--conf", "0.2"])
    printed = capsys.readouterr().out
    assert "broken.jpg" in printed and "1 unreadable file(s) skipped" in printed
    assert "[4/4]" in printed                                  # a progress line per file
    rows = json.loads((out / "detections.json").read_text())
    for name in ("wide.png", "gray.jpg", "rotated.jpg"):
        image = np.asarray(open_rgb(str(folder / name)))       # upright, RGB
        mine = [r for r in rows if r["file_name"] == str(folder / name)]
        want = boxes_by_hand(model, image)
        assert len(mine) == len(want) > 0, name
        got = torch.tensor([r["bbox"] for r in mine])
        x1, y1, x2, y2 = want[:, :4].T
        # the JSON rounds to 0.01 px; float32 keeps ~7 digits of the (untrained, huge) boxes
        torch.testing.assert_close(got, torch.stack([x1, y1, x2 - x1, y2 - y1], 1), atol=0.01,
                                   rtol=1e-6)
        assert [r["category"] for r in mine] == [NAMES[int(c)] for c in want[:, 5]]
        assert [r["category_id"] for r in mine] == [[3, 17, 42][int(c)] for c in want[:, 5]]
        assert Image.open(out / f"{name.split('.')[0]}.png").size == image.shape[1::-1]
    assert Image.open(out / "rotated.png").size == (40, 100)   # EXIF applied: 100 tall


def test_detect_names_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.jpg: no such file or folder"):
        ev.image_files([str(tmp_path / "nowhere.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no image files .* in .*empty"):
        ev.image_files([str(tmp_path / "empty")])


def test_labels_of_boxes_that_share_a_corner_do_not_hide_each_other():
    """label_spots by hand: 30 x 10 labels on a 100 x 100 picture. The first box's label goes
    above it; a second box with the same top edge gets the inside of its top, a third the
    inside of its bottom; a box at the picture's top edge has its label inside."""
    boxes = [[20, 40, 60, 90], [20, 40, 70, 80], [20, 40, 50, 95], [5, 0, 40, 30]]
    spots = ev.label_spots(boxes, [(30, 10)] * 4, (100, 100))
    assert spots == [(20, 30), (20, 40), (20, 85), (5, 0)]
    crowded = ev.label_spots([[0, 10, 30, 30]] * 6, [(30, 10)] * 6, (100, 40))
    assert crowded[:4] == [(0, 0), (0, 10), (0, 20), (0, 30)]  # every free spot used, then
    assert crowded[4:] == [(0, 0), (0, 0)]                     # above the box again
    drawn = ev.draw_boxes(Image.new("RGB", (200, 200)), torch.tensor(
        [[40.0, 80, 160, 180, 0.9, 2, 0.9], [40.0, 80, 120, 150, 0.8, 0, 0.8]]), NAMES, 0.5)
    above, inside = drawn.getpixel((41, 78)), drawn.getpixel((41, 83))
    assert above == ev.COLOR_WORDS["blue"] and inside != above and inside != (0, 0, 0)


def test_boxes_are_drawn_in_proportion_to_the_image():
    det = torch.tensor([[10.0, 10, 60, 40, 0.9, 2, 0.9]])
    small = ev.draw_boxes(Image.new("RGB", (100, 80)), det, NAMES, 0.5)
    large = ev.draw_boxes(Image.new("RGB", (2000, 1600)), det * torch.tensor(
        [20.0, 20, 20, 20, 1, 1, 1]), NAMES, 0.5)
    def left_edge_width(im, x1, y):                            # coloured pixels across the edge
        return sum(1 for x in range(x1 - 20, x1 + 20) if im.getpixel((x, y)) != (0, 0, 0))

    assert small.getpixel((10, 36)) == ev.COLOR_WORDS["blue"]  # the box in its class's colour
    thin, thick = left_edge_width(small, 10, 36), left_edge_width(large, 200, 700)  # under labels
    assert thin >= 2 and thick >= 3 * thin                     # a 20x larger image: thicker lines
    edge = ev.draw_boxes(Image.new("RGB", (100, 80)), torch.tensor([[90.0, 40, 99, 70, 0.9, 2, 0.9]]),
                         NAMES, 0.5)                           # a label wider than the room left
    assert any(edge.getpixel((x, y)) == ev.COLOR_WORDS["blue"] for x in range(8) for y in range(40))
    hidden = ev.draw_boxes(Image.new("RGB", (100, 80)), det, NAMES, 0.95)
    assert hidden.getbbox() is None                            # under --conf: not drawn


def assert_close_folded(folded: torch.Tensor, eager: torch.Tensor) -> None:
    """Decoded rows of a BN-folded model against the unfolded one. Folding moves the raw outputs
    by rounding only (held to 1e-3 here); w and h are exp(tw + gw) * A, so they are compared as
    logs, where the two raw terms' errors add (2e-3): as values, an untrained model's boxes run
    into the millions of pixels and the same rounding shows as thousands."""
    rest = [0, 1, *range(4, eager.shape[-1])]
    torch.testing.assert_close(folded[..., rest], eager[..., rest], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(folded[..., 2:4].log(), eager[..., 2:4].log(), atol=2e-3, rtol=0)


def test_export_gives_the_eager_models_outputs(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt2"
    ev.main(["--export", str(path), "--weights", write_checkpoint(tmp_path / "c.pt", model),
             "--size", str(SIZE)])
    program = torch.export.load(str(path)).module()
    prepared = ev.prepare_for_inference(model, channels_last=False, pack=False)   # what export saves
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(program(x), prepared(x), atol=1e-5, rtol=1e-5)
            assert_close_folded(program(x), model(x))


def test_checkpoint_size_and_class_names_reach_detect_and_show(tmp_path, monkeypatch):
    """A checkpoint with train.py's model_args, eval_size, class_names and cat_ids: --detect and
    --show on a user's own image run at its size (no --size) and name its classes."""
    model = tiny_model()
    ckpt = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "ema": None, "optimizer": {}, "config": {},
                "model_args": dict(num_classes=3, fusion="asff", width=0.125, depth=0.33),
                "eval_size": SIZE, "class_names": NAMES, "cat_ids": [3, 17, 42]}, ckpt)
    folder = write_images(tmp_path / "photos")
    image = np.asarray(open_rgb(str(folder / "wide.png")))
    want = boxes_by_hand(model, image)                          # at SIZE, not 608
    ev.main(["--detect", str(folder / "wide.png"), "--weights", str(ckpt), "--out",
             str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(rows) == len(want) > 0
    assert [r["category"] for r in rows] == [NAMES[int(c)] for c in want[:, 5]]
    assert [r["category_id"] for r in rows] == [[3, 17, 42][int(c)] for c in want[:, 5]]
    drawn = {}
    monkeypatch.setattr(ev, "draw_figure3", lambda image, det, maps, names: drawn.update(
        det=det, names=names) or Image.new("RGB", (8, 8)))
    ev.main(["--show", str(folder / "wide.png"), "--weights", str(ckpt), "--out",
             str(tmp_path / "fig"), "--conf", "0.01"])
    assert drawn["names"] == NAMES                              # not "class 0", "class 1", ...
    torch.testing.assert_close(drawn["det"], want[want[:, 4] >= 0.01])
    assert (tmp_path / "fig" / "figure3_wide.png").is_file()
