"""train.py: the schedule against hand-computed values, weight-decay groups by their effect,
exact resume (also after SIGTERM to the whole process group with loader workers), non-finite
loss and overflowing steps stopped before anything is saved, config refusal, checkpoint files
that are not one, the shortened demo end to end, and 2-rank DDP (torchrun, gloo) against a
single process on the same total batch.

Tiny on purpose (2 shared CPU cores): width 0.125, 64-96 px, a 16-image synthetic set.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import evaluate
import train
from head import Detector

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.125", "--depth", "0.33", "--synthetic-train", "16", "--synthetic-val", "4",
        "--batch-size", "2", "--size-min", "64", "--size-max", "96", "--eval-size", "64",
        "--workers", "0", "--log-every", "1", "--warmup", "0", "--lr", "0.1", "--min-lr", "0.01",
        "--eval-every", "100", "--epochs", "2", "--clip-grad", "10", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def synthetic_cache(tmp_path_factory):
    """One synthetic set for the module (made by the first run, reused by the others)."""
    old = os.environ.get("ASFF_CACHE")
    os.environ["ASFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["ASFF_CACHE"]
    else:
        os.environ["ASFF_CACHE"] = old


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def signal_at_step(monkeypatch, n: int):
    """SIGTERM to this process as train_step is entered for the n-th time (caught by
    train.main's handler); the step itself runs. -> (the real train_step, its call count)"""
    real, calls = train.train_step, {"n": 0}

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_then_signal)
    return real, calls


# ---------------------------------------------------------------------------------------------
# The schedule, by hand
# ---------------------------------------------------------------------------------------------
def test_lr_schedule_paper_values():
    cfg = train.Config(epochs=300, batch_size=16, lr=1e-3, min_lr=1e-5, warmup=4 / 300)
    per_epoch, world = 100, 4                         # 4 GPUs x 16 = the paper's 64 images
    total = 300 * per_epoch
    lr = lambda it: train.lr_at(cfg, it, total, world)  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 400)          # linear warm-up over 4 epochs = 400 its
    assert lr(399) == pytest.approx(1e-3)              # warm-up end: the paper's 0.001
    assert lr(400) == pytest.approx(1e-3)              # cosine starts at the top
    mid = 400 + (total - 1 - 400) / 2
    assert lr(int(mid)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)   # half way: the mean
    assert lr(total - 1) == pytest.approx(1e-5)        # last iteration: 0.00001
    last_epoch = [lr(it) for it in range(total - per_epoch, total)]
    assert max(last_epoch) < 1e-5 * 1.01 and min(last_epoch) == pytest.approx(1e-5)
    # linear scaling: one GPU of 16 images gets a quarter of the rate
    assert train.lr_at(cfg, 399, total, 1) == pytest.approx(0.25e-3)
    expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.25))
    assert lr(400 + round((total - 401) * 0.25)) == pytest.approx(expected, rel=1e-3)


def test_released_lr_schedule_values():
    """--schedule released (docs/released-code.md, schedule): (it/W)^4 over 5 epochs, flat to 20,
    cosine stepped per epoch to 1e-5 at epoch 270, flat after; --no-scale-lr: the flat 1e-3 of 5
    per GPU."""
    cfg = train.Config(epochs=300, batch_size=5, schedule="released", scale_lr=False)
    per_epoch = 100
    total = 300 * per_epoch
    lr = lambda it: train.lr_at(cfg, it, total, 10)   # noqa: E731 - 10 GPUs: no scaling
    assert lr(0) == 0.0
    assert lr(250) == pytest.approx(1e-3 * 0.5 ** 4)   # half way through the 500-it burn-in
    assert lr(500) == lr(2000) == lr(2099) == pytest.approx(1e-3)    # epochs 5..20 flat
    epoch_21 = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 250))
    assert lr(2100) == lr(2199) == pytest.approx(epoch_21)           # one value per epoch
    assert lr(14500) == pytest.approx((1e-3 + 1e-5) / 2)             # epoch 145: mid cosine
    assert lr(27000) == lr(total - 1) == pytest.approx(1e-5)         # epochs 270..300
    scaled = train.Config(epochs=300, batch_size=16, schedule="released")
    assert train.lr_at(scaled, 2000, total, 4) == pytest.approx(1e-3)  # 4 x 16 = 64: factor 1


def test_fixed_size_in_the_last_epochs_and_random_before():
    cfg = train.Config(epochs=30, fixed_size_last=10 / 300 * 10, size_min=320, size_max=608)
    before = {train.size_at(cfg, it, epoch=it // 50) for it in range(0, 1000)}
    assert before == set(range(320, 609, 32))                        # epochs 0..19: random
    assert {train.size_at(cfg, it, epoch=e) for e in (20, 29) for it in range(100)} == {608}
    assert train.size_at(train.Config(epochs=30), 5, 29) in range(320, 609, 32)  # default: random


def test_flags_reach_the_model_the_optimizer_and_the_loss(monkeypatch):
    """--anchors, --decay-all and --iou-form change what they name; bad choices are refused."""
    cfg = train.parse_config(["--width", "0.125", "--depth", "0.33", "--anchors", "yolov3"])
    model = train.build_model(cfg, 5)
    assert model.anchors[8].tolist() == [373.0, 326.0] and model.guided
    assert train.build_model(train.parse_config([]), 5).anchors[8].tolist() == [121.0, 240.0]
    groups = train.param_groups(model, 5e-4, decay_all=True)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    seen = []
    monkeypatch.setattr(train, "compute_loss",
                        lambda *a, **k: seen.append(k["iou_form"]) or {t: torch.tensor(float("nan"))
                                                                       for t in train.TERMS})
    batch = iter(bench.random_batches(1, 1, 64, 5))
    with pytest.raises(train.NonFiniteLoss):
        parts = train.Parts(model, model, None, None, None, torch.device("cpu"))
        train.train_step(parts, batch, 64, train.parse_config(["--iou-form=-ln(iou)"]))
    assert seen == ["-ln(iou)"]
    for bad in (["--schedule", "fast"], ["--anchors", "big"], ["--iou-form", "giou"]):
        with pytest.raises(SystemExit):
            train.parse_config(bad)


def test_benchmark_prints_a_table_and_a_json_line(capsys):
    """tests/bench.py train --steps N: N timed steps after one untimed; the JSON line states what
    was timed (and is what bench.main returns)."""
    summary = bench.main(["train", "--steps", "2", "--width", "0.125", "--depth", "0.33",
                          "--size-max", "64", "--batch-size", "2", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result == summary
    assert result["batch"] == 2 and result["size"] == 64 and result["steps_timed"] == 2
    assert result["fusion"] == "asff" and result["width"] == 0.125       # not the demo's model
    s = result["s_per_step"]          # 4 decimals, images_per_s 3: their rounding, no more
    assert abs(result["images_per_s"] - 2 / s) <= 2 * 5e-5 / (s * (s - 5e-5)) + 5e-4
    assert sum(line.split()[0].isdigit() for line in lines[:-1]) == 3       # steps 0, 1, 2


def test_mixup_off_exactly_in_the_last_epochs():
    cfg = train.Config(epochs=300)                     # Sec. 3.4: off for the last 30 of 300
    assert [e for e in range(300) if not train.mixup_on(cfg, e)] == list(range(270, 300))
    cfg = train.Config(epochs=10, mixup_off=0.3)       # a short run keeps the proportion
    assert [train.mixup_on(cfg, e) for e in range(10)] == [True] * 7 + [False] * 3
    assert not any(train.mixup_on(train.Config(mixup=False), e) for e in range(300))


def test_dropblock_schedule_as_released():
    cfg = train.Config(epochs=300)
    assert train.dropblock_at(cfg, 4) == ({32: 1, 16: 1, 8: 1}, 1.0)      # off until epoch 5
    assert train.dropblock_at(cfg, 5) == ({32: 1, 16: 3, 8: 5}, 0.9)
    assert train.dropblock_at(cfg, 80) == ({32: 3, 16: 5, 8: 7}, 0.9)
    assert train.dropblock_at(cfg, 299) == ({32: 7, 16: 7, 8: 7}, 0.9)


def test_no_weight_decay_on_batchnorm_and_biases():
    """One SGD step with zero gradients: only decayed tensors move, each by lr * wd * w."""
    model = Detector(5, fusion="asff", width=0.125, depth=0.33)
    with torch.no_grad():                              # non-zero BN weights/biases to be seen
        for p in model.parameters():
            p.add_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(train.param_groups(model, 5e-4), lr=1.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    checked = {"bn": 0, "bias": 0, "conv": 0}
    for name, p in model.named_parameters():
        owner, leaf = name.rsplit(".", 1)
        if owner in bn or leaf == "bias":
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)
            checked["bn" if owner in bn else "bias"] += 1
        else:                                          # conv weights, the deformable one too
            assert p.ndim == 4, name
            torch.testing.assert_close(p, before[name] * (1 - 5e-4))
            checked["conv"] += 1
    assert min(checked.values()) > 10, checked


def test_pretrained_backbone_from_either_file(tmp_path):
    """--backbone: darknet's binary (darknet53.conv.74 layout) or the release's backbone-only
    .pth fill the backbone exactly and nothing else."""
    from darknet import write_darknet_weights
    from head import released_key_map
    torch.manual_seed(1)
    source = Detector(5, fusion="asff", width=0.125, depth=0.33)
    write_darknet_weights(str(tmp_path / "darknet53.conv.74"), source.backbone.darknet_layers())
    ours = source.state_dict()
    released = {k: ours[v] for k, v in released_key_map(source).items() if v.startswith("backbone.")}
    torch.save(released, tmp_path / "darknet53_feature_mx.pth")
    for name in ("darknet53.conv.74", "darknet53_feature_mx.pth"):
        cfg = train.Config(width=0.125, depth=0.33, backbone=str(tmp_path / name))
        torch.manual_seed(0)
        model = train.build_model(cfg, 5).state_dict()
        for key, value in ours.items():
            if key.startswith("backbone.") and not key.endswith("num_batches_tracked"):
                assert torch.equal(model[key], value), (name, key)
        assert not torch.equal(model["heads.s8.pred.weight"], ours["heads.s8.pred.weight"])


# ---------------------------------------------------------------------------------------------
# Start-up checks of the data, before any training; the end-of-run picture
# ---------------------------------------------------------------------------------------------
def custom_flags(paths):
    return ["--train-images", paths["train_images"], "--train-ann", paths["train_json"],
            "--val-images", paths["val_images"], "--val-ann", paths["val_json"]]


def test_start_up_refuses_too_few_images_and_other_categories(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(train.data.DataError) as error:  # 3 images, 2 x 2 per optimizer step
        train.main(TINY + ["--synthetic-train", "3", "--accumulate", "2", "--out", str(out)])
    assert re.fullmatch(r".*/train\.json: 3 training image\(s\), fewer than one optimizer step "
                        r"takes \(4 = batch size x accumulate x processes\); .*", str(error.value))
    paths = train.data.make_synthetic(str(tmp_path), n_train=4, n_val=2, image_size=64)
    original = Path(paths["train_json"]).read_text()
    empty = json.loads(original) | {"images": [], "annotations": []}
    Path(paths["train_json"]).write_text(json.dumps(empty))
    with pytest.raises(train.data.DataError, match=r"train\.json: the 'images' list is empty"):
        train.main(TINY + custom_flags(paths) + ["--out", str(out)])
    Path(paths["train_json"]).write_text(original)
    val = json.loads(Path(paths["val_json"]).read_text())
    val["categories"] = [c | {"name": "lime square"} if c["id"] == 2 else c
                         for c in val["categories"] if c["id"] != 5] + [{"id": 9, "name": "star"}]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != 5]
    Path(paths["val_json"]).write_text(json.dumps(val))
    with pytest.raises(train.data.DataError) as error:
        train.main(TINY + custom_flags(paths) + ["--out", str(out)])
    assert str(error.value) == (
        f"{paths['val_json']}: the categories are not those of {paths['train_json']}: only in "
        "validation: 9 'star'; only in training: 5 'magenta cross'; id 2 is 'lime square' in "
        "validation, 'green square' in training")
    assert not (out / "log.jsonl").exists()                  # nothing trained


def test_demo_picture_skips_an_unreadable_validation_image(tmp_path):
    paths = train.data.make_synthetic(str(tmp_path), n_train=1, n_val=6, image_size=64)
    val = train.data.CocoDetection(paths["val_images"], paths["val_json"])
    few = [3 <= len(val.load_targets(i)) <= 5 for i in range(len(val))]
    first, second = ([i for i in range(len(val)) if few[i]] +     # images with 3-5 objects
                     [i for i in range(len(val)) if not few[i]])[:2]  # first, then the others
    expected = val.load_image(second)[0]
    Path(val._files[first]).write_bytes(b"not a png")
    said = []
    image = train.demo_image(val, said.append)
    assert (image == expected).all() and len(said) == 1
    assert said[0].startswith("figure3_demo.png: skipped an unreadable validation image: ")
    assert Path(val._files[first]).name in said[0]
    for path in val._files:
        Path(path).write_bytes(b"")
    said.clear()
    assert train.demo_image(val, said.append, tries=3) is None and len(said) == 3


# ---------------------------------------------------------------------------------------------
# Whole runs (in process)
# ---------------------------------------------------------------------------------------------
def test_demo_shortened_runs_end_to_end(tmp_path, monkeypatch):
    """`python train.py --max-iters 5` (the demo's model and sizes; a smaller synthetic set),
    and mixup switched by the schedule as the loop runs."""
    seen = []
    original = train.data.TrainDataset.__getitem__

    def spy(self, index):
        seen.append((self.epoch, self.mixup))
        return original(self, index)

    monkeypatch.setattr(train.data.TrainDataset, "__getitem__", spy)
    out = tmp_path / "demo"
    model = train.main(["--out", str(out), "--max-iters", "5", "--synthetic-train", "8",
                        "--synthetic-val", "4", "--epochs", "4", "--batch-size", "4",
                        "--mixup", "--mixup-off", "0.5", "--threads", "1"])
    assert {e: m for e, m in seen} == {0: True, 1: True, 2: False}   # 2 steps per epoch
    for name in ("last.pt", "best.pt", "metrics.json", "log.jsonl", "figure3_demo.png", "curves.png"):
        assert (out / name).is_file(), name
    drawn = (out / "curves.png").read_bytes()                  # as --plot draws it from the log
    assert train.main(["--plot", str(out)]) is None and (out / "curves.png").read_bytes() == drawn
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
    assert metrics["iterations"] == 5 and metrics["wall_time_s"] > 0
    ckpt = load(out / "last.pt")
    assert ckpt["iteration"] == 5 and ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 1
    assert ckpt["config"]["width"] == train.DEMO["width"]          # the demo's model
    assert set(ckpt) >= {"model", "optimizer", "scaler", "ema", "rng", "config"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    # the settings evaluate.py reads: the Detector's arguments, the test size, the class names
    assert ckpt["model_args"] == dict(num_classes=5, fusion="asff", guided=True, spp=True,
                                      rfb=False, dropblock=False, width=0.25, depth=0.33,
                                      anchors=None)
    names = [c["name"] for c in json.loads(Path(train.data.make_synthetic()["val_json"]).read_text())
             ["categories"]]
    assert (ckpt["eval_size"], ckpt["class_names"], ckpt["cat_ids"]) == (192, names, [1, 2, 3, 4, 5])
    loaded, saved = evaluate.load_detector(str(out / "last.pt"))     # no model flags needed
    assert saved["eval_size"] == 192 and saved["class_names"] == names
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in loaded.state_dict().items())


def test_resume_is_bit_identical(tmp_path):
    """6 iterations straight == 3, stop, resume, 3 more; across an epoch end, with DropBlock
    (torch RNG), mixup and augmentation on."""
    args = TINY + ["--synthetic-train", "8", "--dropblock", "--mixup", "--augment", "--ema", "0.9",
                   "--max-iters"]
    train.main(args + ["6", "--out", str(tmp_path / "straight")])
    train.main(args + ["3", "--out", str(tmp_path / "split")])
    first = load(tmp_path / "split" / "last.pt")
    assert first["iteration"] == 3 and first["batch_in_epoch"] == 3
    train.main(args + ["6", "--out", str(tmp_path / "split"),
                       "--resume", str(tmp_path / "split" / "last.pt")])
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert a["iteration"] == b["iteration"] == 6 and a["epoch"] == 1
    changed = 0
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        changed += not torch.equal(a["model"][key], first["model"][key])
    assert changed > 50                               # the last 3 steps did change the weights
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    for key in a["ema"]:                              # the EMA, under its own key, resumes too
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert not torch.equal(a["ema"]["heads.s8.pred.weight"], a["model"]["heads.s8.pred.weight"])


def test_ema_update_by_hand():
    """e <- d e + (1 - d) w with d = decay (1 - exp(-n / 2000)); integer buffers are copied."""
    model, ema = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        ema.weight.fill_(1.0)
    model.num_batches_tracked.fill_(7)
    train.ema_update(ema, model, 0.99, 1000)
    d = 0.99 * (1 - math.exp(-0.5))
    torch.testing.assert_close(ema.weight, torch.full((2,), d * 1 + (1 - d) * 3))
    assert ema.num_batches_tracked.item() == 7


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, monkeypatch):
    """--batch-size 2 --accumulate 2 takes the same SGD step as --batch-size 4 (BatchNorm frozen,
    the same 4 images, the same learning rate: per_step = batch x accumulate)."""
    monkeypatch.setattr(train, "build_model", with_calibrated_bn(train.build_model))
    args = TINY + ["--freeze-bn", "--max-iters", "1", "--clip-grad", "0", "--lr", "1e-4",
                   "--min-lr", "1e-4"]
    big = train.main(args + ["--batch-size", "4", "--out", str(tmp_path / "big")]).state_dict()
    small = train.main(args + ["--batch-size", "2", "--accumulate", "2", "--out",
                               str(tmp_path / "small")]).state_dict()
    torch.manual_seed(0)
    init = Detector(5, fusion="asff", width=0.125, depth=0.33).state_dict()
    moved = 0
    for key, value in big.items():
        if value.is_floating_point():
            step, acc_step = value - init[key], small[key] - init[key]
            torch.testing.assert_close(acc_step, step, rtol=1e-3, atol=5e-3 * step.abs().max(),
                                       msg=key)
            moved += bool(step.abs().max() > 1e-6)
    assert moved > 50


def test_sigterm_saves_last_checkpoint_mid_epoch(tmp_path, monkeypatch, capsys):
    """SIGTERM during iteration 2 (of 4 per epoch): the step finishes, last.pt is written at
    iteration 3 with its data position, and the run returns normally."""
    signal_at_step(monkeypatch, 3)
    before = signal.getsignal(signal.SIGTERM)
    train.main(TINY + ["--synthetic-train", "8", "--out", str(tmp_path)])
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["iteration"] == 3 and ckpt["epoch"] == 0 and ckpt["batch_in_epoch"] == 3
    said = capsys.readouterr().out
    assert "stopped by signal at iteration 3" in said
    assert f"wrote {tmp_path / 'curves.png'}: 3 progress rows, 0 evaluations" in said
    assert signal.getsignal(signal.SIGTERM) is before          # the handler is given back


def test_out_of_memory_names_the_size_and_batch(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    with pytest.raises(train.data.UserError, match=r"input size 64 x 64, batch 2 per process"):
        train.main(TINY + ["--size-min", "64", "--size-max", "64", "--out", str(tmp_path)])


def test_resume_refuses_another_config(tmp_path):
    train.main(TINY + ["--max-iters", "1", "--out", str(tmp_path)])
    with pytest.raises(train.data.UserError) as e:
        train.main(TINY + ["--max-iters", "2", "--out", str(tmp_path), "--width", "0.25",
                           "--fusion", "sum", "--resume", str(tmp_path / "last.pt")])
    message = str(e.value)
    assert "fusion" in message and "width" in message and "'asff'" in message
    assert "max_iters" not in message and "depth" not in message


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    """NaN in the loss at iteration 6 (epoch 2 of 4-step epochs): the run stops naming it,
    and last.pt still holds epoch 1's weights, loadable and finite."""
    calls = {"n": 0}
    real = train.compute_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:                            # iteration 6 (the 7th step)
            losses["obj"] = losses["obj"] * float("nan")
            losses["total"] = losses["total"] + losses["obj"]
        return losses

    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--synthetic-train", "8", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "non-finite loss at iteration 6" in printed and "obj=nan" in printed
    assert f"{tmp_path / 'last.pt'} keeps the weights of iteration 4" in printed
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["epoch"] == 1
    model = Detector(5, fusion="asff", width=0.125, depth=0.33)
    model.load_state_dict(ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("at,saved", [(3, None), (7, 4)])
def test_an_overflowing_step_stops_before_its_weights_are_saved(tmp_path, monkeypatch, capsys, at,
                                                                saved):
    """The SGD step of iteration `at` (the last of epoch 1 or 2 of 4 steps) overflows the weights
    while its loss and gradient are finite: the run stops before the epoch's last.pt, which keeps
    the last good weights (iteration 4) or, before any epoch ended, does not exist; the message
    names only that file."""
    real = train.lr_at
    # lr 3e38 (float32's largest is 3.4e38) and no clipping: every gradient element above 1.2
    # overflows (the untrained model's gradient norm is in the thousands); lr 1e-3 elsewhere
    monkeypatch.setattr(train, "lr_at", lambda cfg, it, *a: 3e38 if it == at else real(cfg, it, *a))
    with pytest.raises(SystemExit):
        train.main(TINY + ["--synthetic-train", "8", "--out", str(tmp_path), "--clip-grad", "0",
                           "--lr", "1e-3", "--min-lr", "1e-3"])
    printed = capsys.readouterr().out
    assert f"non-finite weights at iteration {at}" in printed and "after the SGD step" in printed
    last = tmp_path / "last.pt"
    if saved is None:
        assert not last.exists() and str(last) not in printed
        assert "no checkpoint of this run was written yet" in printed
        return
    assert f"{last} keeps the weights of iteration {saved}" in printed
    ckpt = load(last)
    assert ckpt["iteration"] == saved
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_stop_after_the_final_step_saves_the_next_epoch_position(tmp_path, monkeypatch, capsys):
    """SIGTERM during the last of 8 steps (2 epochs of 4): last.pt says epoch 2, batch 0, not
    epoch 1, batch 4; resumed, the run steps no more, evaluates and writes metrics.json."""
    _, calls = signal_at_step(monkeypatch, 8)
    args = TINY + ["--synthetic-train", "8", "--out", str(tmp_path)]
    train.main(args)
    ckpt = load(tmp_path / "last.pt")
    assert (ckpt["iteration"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (8, 2, 0)
    assert "stopped by signal at iteration 8" in capsys.readouterr().out
    assert not (tmp_path / "metrics.json").exists()
    train.main(args + ["--resume", str(tmp_path / "last.pt")])
    assert calls["n"] == 8                                     # no step after the resume
    resumed = load(tmp_path / "last.pt")
    assert (resumed["iteration"], resumed["epoch"], resumed["evaluated_at"]) == (8, 2, 8)
    assert json.loads((tmp_path / "metrics.json").read_text())["iterations"] == 8
    for key, value in ckpt["model"].items():
        assert torch.equal(resumed["model"][key], value), key


GROUP_SCRIPT = """
import os, sys, time
sys.path[:0] = [{repo!r}]
import data, train
real, calls = train.train_step, [0]

def held_step(*args, **kwargs):
    # step 3 returns only once the test has signalled the process group: the signal comes
    # mid-epoch however fast or slow this machine is
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 3:
        open({held!r}, "w").close()
        deadline = time.time() + 300
        while not os.path.exists({go!r}) and time.time() < deadline:
            time.sleep(0.02)
    return out

if __name__ == "__main__":                   # not in loader workers started by spawn
    train.train_step = held_step
    data.exit_on_user_error(train.main, sys.argv[1:])
"""


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds              # a hang guard, not a measurement
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "no held step"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path):
    """`kill -- -PGID` (systemd, SLURM) during step 3 of a run with 2 loader workers: the workers
    ignore it, the main process finishes the step and saves last.pt mid-epoch; resumed, the run
    ends with the weights of an uninterrupted run, bit for bit."""
    args = TINY + ["--max-iters", "6"]
    straight = train.main(args + ["--out", str(tmp_path / "straight")]).state_dict()
    held, go = tmp_path / "held", tmp_path / "go"
    script = tmp_path / "group.py"
    script.write_text(GROUP_SCRIPT.format(repo=str(REPO), held=str(held), go=str(go)))
    log = open(tmp_path / "log.txt", "w+")
    run = subprocess.Popen([sys.executable, str(script), *args, "--workers", "2", "--out",
                            str(tmp_path / "split")], cwd=REPO, stdout=log, stderr=log,
                           start_new_session=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        wait_for(held, run)
        os.killpg(run.pid, signal.SIGTERM)             # the main process and its 2 workers
        go.touch()
        assert run.wait(timeout=300) == 0, (log.seek(0), log.read()[-3000:])[1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    log.seek(0)
    assert "stopped by signal at iteration 3" in log.read()
    stopped = load(tmp_path / "split" / "last.pt")
    assert (stopped["iteration"], stopped["epoch"], stopped["batch_in_epoch"]) == (3, 0, 3)
    resumed = train.main(args + ["--out", str(tmp_path / "split"), "--resume",
                                 str(tmp_path / "split" / "last.pt")]).state_dict()
    moved = 0
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
        moved += not torch.equal(stopped["model"][key], value)
    assert moved > 50                                   # the steps after the resume counted


# ---------------------------------------------------------------------------------------------
# Checkpoint files that are not what they should be: one line naming the file and the problem
# ---------------------------------------------------------------------------------------------
def bad_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """name: (file, what the message must say)."""
    files = {"text": ("notes.pt", b"not a checkpoint\n"), "empty": ("empty.pt", b""),
             "bare": ("bare.pt", None), "missing": ("missing.pt", None)}
    out = {}
    for name, (file, content) in files.items():
        path = tmp_path / file
        if name == "bare":                     # a plain state dict: weights, no training state
            torch.save(Detector(5, fusion="asff", width=0.125, depth=0.33).state_dict(), path)
        elif content is not None:
            path.write_bytes(content)
        out[name] = path
    return {"text": (out["text"], "not a checkpoint"), "empty": (out["empty"], "empty file"),
            "bare": (out["bare"], "a state dict without a training state"),
            "missing": (out["missing"], "no such file")}


def test_resume_of_a_bad_file_names_it_before_the_data_is_opened(tmp_path, monkeypatch):
    def no_data(*args):
        raise AssertionError("the data was opened before the --resume file was checked")

    monkeypatch.setattr(train, "open_data", no_data)
    for name, (path, problem) in bad_files(tmp_path).items():
        with pytest.raises(train.data.UserError) as e:
            train.main(TINY + ["--out", str(tmp_path / "run"), "--resume", str(path)])
        assert str(path) in str(e.value) and problem in str(e.value), (name, str(e.value))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_weights_and_backbone_of_a_bad_file_name_it(tmp_path):
    files = bad_files(tmp_path)
    for name in ("text", "empty", "missing"):
        path, problem = files[name]
        with pytest.raises(train.data.UserError) as e:
            evaluate.main(["--weights", str(path), "--size", "64"])
        assert str(path) in str(e.value) and problem in str(e.value), (name, str(e.value))
        with pytest.raises(train.data.UserError) as e:
            train.build_model(train.Config(width=0.125, depth=0.33, backbone=str(path)), 5)
        assert str(path) in str(e.value) and problem in str(e.value), (name, str(e.value))
    darknet = tmp_path / "darknet53.conv.74"                # darknet's binary layout: too short
    darknet.write_bytes(b"not weights")
    with pytest.raises(train.data.UserError, match=r"darknet53\.conv\.74"):
        train.build_model(train.Config(width=0.125, depth=0.33, backbone=str(darknet)), 5)


def test_the_command_line_prints_one_line_and_exits_2_on_a_bad_file(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    done = subprocess.run([sys.executable, "train.py", "--resume", str(empty), "--out",
                           str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"error: {empty}: empty file, not a checkpoint"


# ---------------------------------------------------------------------------------------------
# Run folders, progress lines, the command line and its errors
# ---------------------------------------------------------------------------------------------
def test_resume_writes_into_the_checkpoints_folder_and_a_finished_run_stays_as_it_is(
        tmp_path, monkeypatch, capsys):
    """--resume alone continues with the checkpoint's settings in its folder (not the default
    runs/demo/), its log appended to; the stop message names that folder; --out writes
    elsewhere; resuming a finished run says so and changes no file."""
    monkeypatch.chdir(tmp_path)                    # where a default --out would land
    train.main(TINY + ["--max-iters", "1", "--out", "r1"])
    real, _ = signal_at_step(monkeypatch, 1)
    capsys.readouterr()
    train.main(["--resume", "r1/last.pt", "--max-iters", "3"])
    assert "saved r1/last.pt (continue with --resume r1/last.pt)" in capsys.readouterr().out
    assert load("r1/last.pt")["iteration"] == 2 and not Path("runs").exists()
    records = [json.loads(line) for line in Path("r1/log.jsonl").read_text().splitlines()]
    assert [r.get("started", r.get("resumed")) for r in records if "config" in r] == [0, 1]
    monkeypatch.setattr(train, "train_step", real)
    train.main(["--resume", "r1/last.pt", "--max-iters", "3", "--out", "r2"])
    assert load("r2/last.pt")["iteration"] == 3 and load("r1/last.pt")["iteration"] == 2
    before = {p.name: p.read_bytes() for p in Path("r2").iterdir()}
    capsys.readouterr()
    assert train.main(["--resume", "r2/last.pt"]) is None          # --max-iters 3 is its own
    assert "r2/last.pt: this run is finished (iteration 3" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in Path("r2").iterdir()} == before


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    """Named with what to do, nothing touched; --exist-ok replaces the run: a fresh log."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "1", "--out", str(out)])
    before = (out / "last.pt").read_bytes()
    with pytest.raises(train.data.UserError) as e:
        train.main(TINY + ["--max-iters", "2", "--out", str(out)])
    assert str(e.value) == (f"{out} already holds a run (last.pt, best.pt, log.jsonl, metrics.json, "
                            f"figure3_demo.png, curves.png): continue it with --resume "
                            f"{out / 'last.pt'}, give "
                            "a new --out, or --exist-ok to replace it")
    assert (out / "last.pt").read_bytes() == before
    capsys.readouterr()
    train.main(TINY + ["--max-iters", "2", "--out", str(out), "--exist-ok"])
    assert "--exist-ok: removed the previous run's last.pt" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("config" in r for r in log) == 1 and log[0]["started"] == 0
    assert load(out / "last.pt")["iteration"] == 2


def test_progress_lines_at_iteration_1_and_a_signal_acknowledged_at_once(tmp_path, monkeypatch,
                                                                           capsys):
    """With --log-every 10 the first line still comes after iteration 1 (speed and ETA), then
    the last; SIGTERM is acknowledged as it arrives, before the step under way ends."""
    train.main(TINY + ["--max-iters", "3", "--log-every", "10", "--out", str(tmp_path / "a")])
    lines = [line for line in capsys.readouterr().out.splitlines() if " iter " in line]
    assert [line.split(" iter ")[1].split()[0] for line in lines] == ["1/3", "3/3"]
    assert re.search(r"\| [0-9.]+ img/s \| ETA [0-9.]+ min \|", lines[0])
    real, said = train.train_step, []

    def signal_inside_the_step(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)       # handled here, between two bytecodes
        said.append(capsys.readouterr().out)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", signal_inside_the_step)
    train.main(TINY + ["--max-iters", "3", "--out", str(tmp_path / "b")])
    assert "SIGTERM: stopping after this step, then saving last.pt" in said[0]
    assert len(said) == 1 and "stopped by signal at iteration 1" in capsys.readouterr().out


def test_help_shows_defaults_the_demo_values_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "or on the built-in synthetic shapes. options:" in text
    assert "[default: 608; the demo: 192]" in text                         # --eval-size
    assert "examples:" in text and "--no-mixup --no-augment" in text       # the demo's flags
    assert "[default: asff]" in text and "[default: none]" in text


def test_abbreviations_and_bad_values_are_refused(capsys):
    for argv, message in ((["--epoch", "3"], "unrecognized arguments: --epoch 3"),
                          (["--max-iter", "3"], "unrecognized arguments: --max-iter 3"),
                          (["--fusion", "mean"], "invalid choice: 'mean'")):
        with pytest.raises(SystemExit) as e:
            train.parse_config(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    for argv, message in ((["--size-max", "200"], "--size-max 200: input sizes are multiples of "
                                                  "32 (the coarsest stride), e.g. 192 or 224"),
                          (["--size-min", "100"], "--size-min 100: input sizes are multiples"),
                          (["--eval-size", "16"], "--eval-size 16: input sizes are multiples"),
                          (["--size-min", "256", "--size-max", "224"], "--size-min over --size-max"),
                          (["--batch-size", "0", "--nms", "1.5"], "out of range: --batch-size 0: 1 "
                                                                  "or more; --nms 1.5: in [0, 1]"),
                          (["--train-ann", "a.json"], "a custom set needs all of")):
        with pytest.raises(train.data.UserError) as e:
            train.parse_config(argv)
        assert message in str(e.value), str(e.value)


def test_user_errors_end_in_one_line_without_a_traceback(tmp_path):
    """`python train.py ...` with a mistake: exit status 2, one line on stderr naming the
    flag or file and the problem; --debug adds the traceback."""
    paths = train.data.make_synthetic(str(tmp_path / "set"), n_train=4, n_val=2, image_size=64)
    bad_json = tmp_path / "train.json"
    bad_json.write_text('{"images": [')
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    missing = json.loads(Path(paths["train_json"]).read_text())
    missing["images"][0]["file_name"] = "gone.png"
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    custom = ["--train-images", paths["train_images"], "--val-images", paths["val_images"],
              "--val-ann", paths["val_json"], "--train-ann"]
    cases = [(["--data", "/nonexistent"], "--data /nonexistent: no such folder"),
             (custom + [str(bad_json)], f"{bad_json}: "),
             (custom + [str(tmp_path / "missing.json")], "image files are missing"),
             (["--resume", str(text)], f"{text}: not a checkpoint"),
             (["--size-max", "200"], "--size-max 200: input sizes are multiples of 32"),
             (["--fusion", "mean"], "invalid choice: 'mean'"),
             (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
             (["--resume", str(text), "--debug"], "Traceback")]
    runs = [subprocess.Popen([sys.executable, "train.py", *argv, "--out", str(tmp_path / "run")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ | {"OMP_NUM_THREADS": "1"}) for argv, _ in cases]
    for (argv, message), run in zip(cases, runs, strict=True):
        out, err = run.communicate(timeout=300)
        assert run.returncode in (1, 2) and message in err, (argv, out, err)
        if "--debug" not in argv:
            assert run.returncode == 2 and len(err.strip().splitlines()) == 1, (argv, err)
            assert "Traceback" not in out + err
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# torchrun, 2 ranks on CPU (gloo)
# ---------------------------------------------------------------------------------------------
def with_calibrated_bn(build_model):
    """train.build_model, then BatchNorm running statistics measured on 3 random batches (its
    own generator: the global RNG stays as train.py left it). Frozen at their initial 0 / 1 the
    statistics normalise nothing, and the untrained network's outputs overflow exp()."""
    def build(cfg, num_classes):
        model = build_model(cfg, num_classes)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None                         # a plain average over the batches
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(3):
                model.train()(torch.randn(4, 3, 96, 96, generator=generator))
        for bn in bns:
            bn.momentum = 0.1
        return model
    return build


RANK_SCRIPT = """
import os, sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
import train
from test_train import with_calibrated_bn
train.build_model = with_calibrated_bn(train.build_model)
model = train.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def torchrun(tmp_path, args: list[str]) -> dict[str, dict]:
    """train.py's main under `torchrun --nproc_per_node=2` (gloo); each rank's final weights."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=170,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    return {r: load(tmp_path / f"rank{r}.pt") for r in (0, 1)}


def test_two_ranks_hold_identical_weights(tmp_path):
    """3 DDP steps with BatchNorm training: the parameters agree bit for bit on both ranks
    (running statistics are per rank on CPU, which has no SyncBN)."""
    ranks = torchrun(tmp_path, TINY + ["--max-iters", "3"])
    names = {n for n, _ in Detector(5, fusion="asff", width=0.125, depth=0.33).named_parameters()}
    for key in names:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_two_ranks_equal_one_process_on_the_same_total_batch(tmp_path, monkeypatch):
    """One SGD step, 2 ranks x 2 images vs 1 process x 4 images, BatchNorm frozen (eval mode,
    as CPU has no SyncBN) and no clipping (which would hide a wrong gradient scale). One step:
    after it the ignore masks' IoU > 0.7 decisions can flip on float rounding."""
    args = TINY + ["--freeze-bn", "--max-iters", "1", "--clip-grad", "0", "--lr", "1e-4",
                   "--min-lr", "1e-4"]
    ranks = torchrun(tmp_path, args)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    monkeypatch.setattr(train, "build_model", with_calibrated_bn(train.build_model))
    single = train.main(args + ["--batch-size", "4", "--out", str(tmp_path / "single")])
    torch.manual_seed(0)                               # train.py's init, before the step
    init = Detector(5, fusion="asff", width=0.125, depth=0.33).state_dict()
    moved = 0
    for key, value in single.state_dict().items():   # compare the updates, not the weights
        if value.is_floating_point():
            step, ddp_step = value - init[key], ranks[0][key] - init[key]
            torch.testing.assert_close(ddp_step, step, rtol=1e-3, atol=5e-3 * step.abs().max(),
                                       msg=key)
            moved += bool(step.abs().max() > 1e-6)
    assert moved > 50                                  # the step moved the weights
