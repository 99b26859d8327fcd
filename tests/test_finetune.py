"""train.py --weights: a new run starts from a whole detector, of the file's architecture and any
class count. Every tensor of the file loads as it is, the prediction convs keep their box and
objectness rows and get new class rows; flags that contradict the file, and --weights with
--resume or --backbone, are refused in one line, and a refused start leaves no run folder."""

import json

import pytest
import torch

import data
import train

RUN = ["--batch-size", "2", "--size-min", "64", "--size-max", "64", "--eval-size", "64", "--workers", "0",
       "--log-every", "1", "--warmup", "0", "--lr", "0.01", "--min-lr", "0.001", "--eval-every", "100",
       "--epochs", "1", "--clip-grad", "10", "--threads", "1"]
TINY = RUN + ["--width", "0.125", "--depth", "0.33"]
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


@pytest.fixture(scope="module")
def five(sets, tmp_path_factory):
    """last.pt of a one-step run on the 5 synthetic classes (width 0.125, depth 0.33, no EMA)."""
    out = tmp_path_factory.mktemp("five") / "run"
    train.main(TINY + sets["synthetic"] + ["--max-iters", "1", "--out", str(out)])
    return out / "last.pt"


class Started(Exception):
    """Raised by the first training step, after it recorded the model it was given."""


def first_model(monkeypatch, argv) -> tuple[dict, train.Config]:
    """The model's state as the run's first step receives it (nothing trained yet), and its config."""
    seen = {}

    def record(parts, batches, cfg, *args):
        seen.update({k: v.clone() for k, v in parts.model.state_dict().items()}, cfg=cfg)
        raise Started

    monkeypatch.setattr(train, "train_step", record)
    with pytest.raises(Started):
        train.main(argv)
    return seen, seen.pop("cfg")


def test_weights_load_every_tensor_and_renew_only_class_rows(tmp_path, sets, five, monkeypatch, capsys):
    saved = torch.load(five, weights_only=True)["model"]
    start, _ = first_model(monkeypatch, TINY + sets["subset"] + ["--weights", str(five), "--out",
                                                                 str(tmp_path)])
    assert "6 prediction convs keep their box and objectness rows" in capsys.readouterr().out
    assert start.keys() == saved.keys()
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


def test_weights_take_the_files_architecture(tmp_path, sets, five, monkeypatch):
    """The README's fine-tune: no --width / --depth / --fusion given (a custom set: the defaults
    are the paper's width 1.0), the run is the file's model, and its checkpoint says so."""
    start, cfg = first_model(monkeypatch, RUN + sets["subset"] + ["--weights", str(five), "--out",
                                                                 str(tmp_path / "a")])
    assert (cfg.width, cfg.depth, cfg.fusion, cfg.anchors) == (0.125, 0.33, "asff", "auto")
    saved = torch.load(five, weights_only=True)["model"]
    assert all(torch.equal(start[k], saved[k]) for k in saved if k not in PRED)
    monkeypatch.undo()
    train.main(RUN + sets["synthetic"] + ["--weights", str(five), "--max-iters", "1", "--out",
                                          str(tmp_path / "b")])
    args = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model_args"]
    assert (args["width"], args["depth"], args["num_classes"]) == (0.125, 0.33, 5)


@pytest.mark.parametrize("flags,message", [
    (["--fusion", "sum"], r"--fusion sum contradicts .*last\.pt, a model with fusion asff"),
    (["--width", "0.25"], r"--width 0.25 contradicts .*last\.pt, a model with width 0.125"),
    (["--resume", "FILE"], r"--weights starts a new run .* neither --resume"),
    (["--backbone", "FILE"], r"--weights starts a new run .* nor --backbone")])
def test_a_refused_start_names_both_and_leaves_no_folder(tmp_path, sets, five, monkeypatch, flags, message):
    monkeypatch.setattr(data, "CocoDetection", None)  # refused before the data is read
    flags = [str(five) if f == "FILE" else f for f in flags]
    with pytest.raises(data.UserError, match=message):
        train.main(RUN + sets["subset"] + ["--weights", str(five), *flags, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_broken_weight_file_is_named_in_one_line(tmp_path, sets):
    file = tmp_path / "yolov3.weights"
    file.write_bytes(b"\0" * 64)
    with pytest.raises(data.UserError, match=r"yolov3\.weights"):
        train.main(RUN + sets["subset"] + ["--weights", str(file), "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()
