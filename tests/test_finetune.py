"""train.py --weights: a new run starts from a whole detector of any class count. Tensors of the
file load as they are, the prediction convs keep their box and objectness rows and get new
class rows; another architecture, or --weights with --resume, is refused by name."""

import json

import pytest
import torch

import data
import train

TINY = ["--width", "0.125", "--depth", "0.33", "--batch-size", "2", "--size-min", "64",
        "--size-max", "64", "--eval-size", "64", "--workers", "0", "--log-every", "1",
        "--warmup", "0", "--lr", "0.01", "--min-lr", "0.001", "--eval-every", "100", "--epochs", "1",
        "--clip-grad", "10", "--threads", "1"]
PRED = {f"heads.s{s}.pred.{p}" for s in (8, 16, 32) for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The synthetic set (5 classes) and its 3-class subset as a custom COCO-format set."""
    paths = data.make_synthetic(n_train=8, n_val=4)
    folder = tmp_path_factory.mktemp("subset")
    for split in ("train", "val"):
        ann = json.loads(open(paths[f"{split}_json"]).read())
        ann["categories"] = [c for c in ann["categories"] if c["id"] <= 3]
        ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] <= 3]
        (folder / f"{split}.json").write_text(json.dumps(ann))
    subset = ["--train-images", paths["train_images"], "--train-ann", str(folder / "train.json"),
              "--val-images", paths["val_images"], "--val-ann", str(folder / "val.json")]
    return {"synthetic": ["--synthetic-train", "8", "--synthetic-val", "4"], "subset": subset}


class Started(Exception):
    """Raised by the first training step, after it recorded the model it was given."""


def first_model(monkeypatch, argv) -> dict:
    """The model's state as the run's first step receives it (nothing trained yet)."""
    seen = {}

    def record(parts, *args, **kwargs):
        seen.update({k: v.clone() for k, v in parts.model.state_dict().items()})
        raise Started

    monkeypatch.setattr(train, "train_step", record)
    with pytest.raises(Started):
        train.main(argv)
    return seen


def test_weights_loads_every_tensor_and_renews_only_class_rows(tmp_path, sets, monkeypatch, capsys):
    train.main(TINY + sets["synthetic"] + ["--max-iters", "1", "--out", str(tmp_path / "five")])
    file = tmp_path / "five" / "last.pt"
    saved = torch.load(file, weights_only=True)["model"]                 # 5 classes, no EMA
    start = first_model(monkeypatch, TINY + sets["subset"] + ["--weights", str(file), "--out",
                                                              str(tmp_path / "three")])
    assert "6 prediction convs keep their box and objectness rows" in capsys.readouterr().out
    for key, value in start.items():
        if key in PRED:
            rows, old = value.view(4, 5 + 3, -1), saved[key].view(4, 5 + 5, -1)
            assert torch.equal(rows[:, :5], old[:, :5]), key                 # box + objectness
            if key.endswith("bias"):                                         # new class rows:
                assert torch.equal(rows[:, 5:], torch.zeros_like(rows[:, 5:])), key  # init 0
            else:
                assert not torch.equal(rows[:, 5:], old[:, 5:8]), key        # MSRA draws
        else:
            assert torch.equal(value, saved[key]), key


def test_weights_of_the_same_classes_load_whole(tmp_path, sets, monkeypatch):
    train.main(TINY + sets["subset"] + ["--max-iters", "1", "--out", str(tmp_path / "a")])
    file = tmp_path / "a" / "last.pt"
    saved = torch.load(file, weights_only=True)["model"]
    start = first_model(monkeypatch, TINY + sets["subset"] + ["--weights", str(file), "--out",
                                                              str(tmp_path / "b")])
    assert all(torch.equal(start[k], saved[k]) for k in saved)


def test_weights_refuses_another_architecture_and_goes_without_resume(tmp_path, sets):
    train.main(TINY + sets["synthetic"] + ["--max-iters", "1", "--out", str(tmp_path / "r")])
    file = str(tmp_path / "r" / "last.pt")
    with pytest.raises(data.UserError, match=r"last\.pt: another architecture .*fusion \(file "
                                             r"'asff', this run 'sum'\)"):
        train.main(TINY + sets["subset"] + ["--weights", file, "--fusion", "sum", "--out",
                                            str(tmp_path / "s")])
    with pytest.raises(SystemExit):
        train.parse_config(["--weights", file, "--resume", file])


def test_darknet_weights_for_another_layout_name_the_file(tmp_path, sets):
    """yolov3.weights hold the original YOLOv3 layout: an ASFF run is refused in one error."""
    file = tmp_path / "yolov3.weights"
    file.write_bytes(b"\0" * 64)
    with pytest.raises(data.UserError, match=r"yolov3\.weights: darknet's layout is the original YOLOv3"):
        train.main(TINY + sets["subset"] + ["--weights", str(file), "--out", str(tmp_path / "d")])
