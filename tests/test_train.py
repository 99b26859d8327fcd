"""train.py's promises: the schedule against hand-computed values, weight decay by its effect, the
amp choice by compute capability, exact resume after a signal (in process, and to the process
group with loader workers), the exit status of each stop, a non-finite step stopped before
anything is saved, checkpoints that load with weights_only=True, a run folder never taken over,
one-line refusals of bad flags and files before the data is read, errors that end promptly with
loader workers running, and 2-rank DDP (torchrun, gloo) against one process.

Tiny on purpose (2 shared CPU cores): width 0.125, 64-96 px, a 16-image synthetic set.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import evaluate
import train
from head import Detector
from test_data import export_like

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.125", "--depth", "0.33", "--synthetic-train", "16", "--synthetic-val", "4",
        "--batch-size", "2", "--size-min", "64", "--size-max", "96", "--eval-size", "64",
        "--workers", "0", "--log-every", "1", "--warmup", "0", "--lr", "0.1", "--min-lr", "0.01",
        "--eval-every", "100", "--epochs", "2", "--clip-grad", "10", "--threads", "1"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


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


def at_step(monkeypatch, n: int, action):
    """action() as train_step is entered for the n-th time; the step itself runs afterwards."""
    real, calls = train.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)


def script(tmp_path, body: str) -> Path:
    """A python file that runs train.py's main the way `python train.py` does, after `body`."""
    path = tmp_path / "run_train.py"
    path.write_text(f"import os, sys, time\nsys.path[:0] = [{str(REPO)!r}]\n"
                    "import data, evaluate, train\n"
                    f"{body}\nif __name__ == '__main__':\n"
                    "    data.exit_on_user_error(train.main, sys.argv[1:])\n")
    return path


# --- The schedule, by hand --------------------------------------------------------------------
def test_lr_schedule_paper_values():
    cfg = train.Config(epochs=300, batch_size=16, lr=1e-3, min_lr=1e-5, warmup=4 / 300)
    total, world = 300 * 100, 4                        # 4 GPUs x 16 = the paper's 64 images
    lr = lambda it: train.lr_at(cfg, it, total, world)  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 400)          # linear warm-up over 4 epochs = 400 its
    assert lr(399) == lr(400) == pytest.approx(1e-3)   # the paper's 0.001, where the cosine starts
    assert lr(400 + (total - 401) // 2) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)  # half way
    assert lr(total - 1) == pytest.approx(1e-5)        # the last: 0.00001
    expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.25))
    assert lr(400 + round((total - 401) * 0.25)) == pytest.approx(expected, rel=1e-3)
    assert train.lr_at(cfg, 399, total, 1) == pytest.approx(0.25e-3)   # one GPU of 16: a quarter


def test_released_lr_schedule_values():
    """(it/W)^4 over 5 epochs, flat to 20, a cosine stepped per epoch to 1e-5 at 270, flat after."""
    cfg = train.Config(epochs=300, batch_size=5, schedule="released", scale_lr=False)
    total = 300 * 100
    lr = lambda it: train.lr_at(cfg, it, total, 10)   # noqa: E731
    assert lr(0) == 0.0 and lr(250) == pytest.approx(1e-3 * 0.5 ** 4)
    assert lr(500) == lr(2099) == pytest.approx(1e-3)
    assert lr(2100) == lr(2199) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 250)))
    assert lr(27000) == lr(total - 1) == pytest.approx(1e-5)


def test_sizes_mixup_dropblock_and_evaluations_by_epoch():
    cfg = train.Config(epochs=30, fixed_size_last=1 / 3, size_min=320, size_max=608)
    assert {train.size_at(cfg, it, it // 50) for it in range(1000)} == set(range(320, 609, 32))
    assert {train.size_at(cfg, it, e) for e in (20, 29) for it in range(100)} == {608}
    assert [e for e in range(300) if not train.mixup_on(train.Config(), e)] == list(range(270, 300))
    assert train.dropblock_at(train.Config(), 4) == ({32: 1, 16: 1, 8: 1}, 1.0)
    assert train.dropblock_at(train.Config(), 80) == ({32: 3, 16: 5, 8: 7}, 0.9)
    assert [e for e in range(1, 31) if train.evaluation_due(train.Config(epochs=30, eval_every=7), e)] == \
        [7, 14, 21, 28, 30]


def test_no_weight_decay_on_batchnorm_and_biases():
    """One SGD step with zero gradients: only conv weights move, each by lr * wd * w."""
    model = Detector(5, fusion="asff", width=0.125, depth=0.33)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(train.param_groups(model, 5e-4), lr=1.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name] * (1 - 5e-4) if p.ndim == 4 else before[name], rtol=1e-6,
                                   atol=0, msg=name)


def test_amp_bf16_only_from_compute_capability_8(monkeypatch):
    cuda, cfg = torch.device("cuda", 0), train.Config()
    for capability, dtype in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert train.amp_dtype_for(cfg, cuda) == dtype, capability
    assert train.amp_dtype_for(train.Config(amp="fp16"), cuda) == torch.float16
    assert train.amp_dtype_for(cfg, torch.device("cpu")) is None


# --- Runs in this process ---------------------------------------------------------------------
def test_resume_after_a_signal_mid_epoch_is_bit_identical(tmp_path, monkeypatch, capfd):
    """SIGTERM during step 3 (of 8 per epoch; DropBlock, mixup and augmentation on): the step
    finishes, last.pt is saved, the exit status is 128 + 15; resumed, the run ends with the
    weights, optimizer and EMA of an uninterrupted one, bit for bit."""
    args = TINY + ["--max-iters", "10", "--dropblock", "--mixup", "--augment", "--ema", "0.9"]
    straight = train.main(args + ["--out", str(tmp_path / "straight")])
    at_step(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--out", str(tmp_path / "split")])
    assert stop.value.code == 128 + signal.SIGTERM
    assert load(tmp_path / "split" / "last.pt")["iteration"] == 3
    assert "SIGTERM: stopping" in capfd.readouterr().out
    monkeypatch.undo()
    resumed = train.main(["--resume", str(tmp_path / "split")])
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    a, b = (load(tmp_path / run / "last.pt") for run in ("straight", "split"))
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])


def test_checkpoints_hold_what_evaluate_reads_and_load_weights_only(tmp_path):
    train.main(TINY + ["--max-iters", "2", "--out", str(tmp_path / "r")])
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "r" / name, weights_only=True)
        assert ckpt["iteration"] == ckpt["evaluated_at"] == 2 and ckpt["ema"] is None
        assert ckpt["model_args"] == dict(num_classes=5, fusion="asff", guided=True, spp=True, rfb=False,
                                          dropblock=False, width=0.125, depth=0.33, anchors=None)
        assert ckpt["config"]["width"] == 0.125 and ckpt["eval_size"] == 64 and len(ckpt["cat_ids"]) == 5
    model, saved = evaluate.load_detector(str(tmp_path / "r" / "last.pt"))
    assert saved["class_names"] == ckpt["class_names"]
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    assert not list((tmp_path / "r").glob("*.tmp"))


@pytest.mark.parametrize("bad", ["loss", "weights"])
def test_a_non_finite_step_stops_with_status_1_and_saves_nothing(tmp_path, monkeypatch, capsys, bad):
    """A NaN loss at iteration 9, or weights overflowed by the step at iteration 9 (with a finite
    loss and gradient): exit status 1, a message naming the iteration and the loss terms, and
    last.pt as the end of epoch 1 (iteration 8) left it."""
    out, real_loss, real_step, calls = tmp_path / bad, train.compute_loss, torch.optim.SGD.step, []
    if bad == "loss":
        def loss(*args, **kwargs):                     # NaN in the 9th loss
            calls.append(1)
            return {t: v * math.nan if len(calls) == 9 else v for t, v in real_loss(*args, **kwargs).items()}
        monkeypatch.setattr(train, "compute_loss", loss)
    else:
        def step(optimizer, *args, **kwargs):          # the 9th SGD step overflows a weight
            real_step(optimizer, *args, **kwargs)
            calls.append(1)
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].mul_(math.inf if len(calls) == 9 else 1)
        monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--max-iters", "12", "--out", str(out)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"iteration 8 (epoch 1): non-finite {bad}" in err and "total=" in err
    assert f"{out / 'last.pt'} keeps iteration 8" in err
    ckpt = load(out / "last.pt")
    assert ckpt["iteration"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                          if v.is_floating_point())
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["non_finite"]


def test_a_second_sigint_ends_at_once_and_leaves_the_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C twice in step 10: the second ends the process (130) before the stop's save; last.pt
    stays as the end of epoch 1 wrote it."""
    out = tmp_path / "r"
    at_step(monkeypatch, 10, lambda: [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)])
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--max-iters", "12", "--out", str(out)])
    assert stop.value.code == 128 + signal.SIGINT
    assert load(out / "last.pt")["iteration"] == 8


def test_a_signal_in_an_evaluation_stops_it_saves_and_the_resume_evaluates(tmp_path, monkeypatch):
    """SIGTERM inside the evaluation after epoch 1: it ends at once (status 143), last.pt holds the
    position after the epoch without its evaluation, and --resume runs that evaluation first."""
    real, seen = evaluate.evaluate, []

    def evaluation_signalled(*args, **kwargs):
        seen.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(evaluate, "evaluate", evaluation_signalled)
    args = TINY + ["--eval-every", "1", "--max-iters", "9", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    assert stop.value.code == 128 + signal.SIGTERM and seen == [1]
    ckpt = load(tmp_path / "r" / "last.pt")
    assert (ckpt["iteration"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["evaluated_at"]) == (8, 1, 0, -1)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: seen.append(2) or real(*a, **k))
    train.main(["--resume", str(tmp_path / "r" / "last.pt")])
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert seen == [1, 2, 2] and [r["iteration"] for r in rows if "eval" in r] == [8, 9]


def test_out_of_memory_names_the_size_and_the_batch(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(train, "train_step", oom)
    with pytest.raises(data.UserError, match=r"out of memory at iteration 0: input size (64|96) x \1, "
                                             "batch 2"):
        train.main(TINY + ["--out", str(tmp_path / "r")])


def test_resume_refuses_other_flags_first_even_of_a_finished_run(tmp_path, monkeypatch, capsys):
    train.main(TINY + ["--max-iters", "1", "--out", str(tmp_path / "r")])
    file = str(tmp_path / "r" / "last.pt")
    monkeypatch.setattr(data, "CocoDetection", None)  # nothing below may open the data
    with pytest.raises(data.UserError, match=r"another configuration: width \(checkpoint 0.125, now 0.25\)"):
        train.main(["--resume", file, "--width", "0.25", "--fusion", "sum"])
    assert train.main(["--resume", file]) is None        # finished: nothing to do, nothing changed
    assert "this run is finished (iteration 1" in capsys.readouterr().out
    with pytest.raises(data.UserError, match=r"not a train.py checkpoint"):
        torch.save({"model": {}}, tmp_path / "bare.pt")
        train.main(["--resume", str(tmp_path / "bare.pt")])


def test_a_run_folder_is_never_taken_and_a_failed_start_leaves_none(tmp_path, capsys):
    out = tmp_path / "r"
    train.main(TINY + ["--max-iters", "1", "--out", str(out)])
    before = (out / "last.pt").read_bytes()
    with pytest.raises(data.UserError, match=r"already holds a run \(last.pt, best.pt, log.jsonl"):
        train.main(TINY + ["--max-iters", "1", "--out", str(out)])
    assert (out / "last.pt").read_bytes() == before
    with pytest.raises(data.DataError, match=r"16 training image\(s\), fewer than one step takes \(32"):
        train.main(TINY + ["--batch-size", "32", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag,message", [
    ("--weights", r"--weights .*nowhere.pt: no such file; it takes .*yolov3_asff.pth .*GOATmessi8/ASFF"),
    ("--backbone", r"--backbone .*nowhere.pt: no such file; it takes darknet53.conv.74"),
    ("--resume", r"--resume .*nowhere.pt: no such file")])
def test_a_missing_file_is_refused_before_the_data_is_read(tmp_path, monkeypatch, flag, message):
    monkeypatch.setattr(data, "CocoDetection", None)
    with pytest.raises(data.UserError, match=message):
        train.main(TINY + [flag, str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_bad_flags_end_in_one_line_with_status_2(capsys):
    for bad, says in ((["--size-min", "100"], "--size-min: '100': must be a multiple of 32"),
                      (["--epochs", "0"], "--epochs: '0': must be a whole number >= 1"),
                      (["--ema", "nan"], "--ema: 'nan': must be a number in [0, 1]"),
                      (["--lr", "x"], "--lr: 'x': must be a number >= 0"),
                      (["--epoch", "3"], "unrecognized arguments"),
                      (["--fusion", "max"], "--fusion: invalid choice"),
                      (["--ignore-ratio", "2"], "--ignore-ratio: '2': must be a number in [0, 1]"),
                      (["--nms", "2"], "--nms: '2': must be a number in [0, 1]")):
        with pytest.raises(SystemExit) as stop:
            train.main(bad)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says in err and err.count("\n") == 1, (bad, err)
    with pytest.raises(data.UserError, match="--size-min 320 is over --size-max 256"):
        train.main(["--size-max", "256", "--data", "."])
    with pytest.raises(SystemExit):
        train.main(["-h"])
    text = capsys.readouterr().out
    assert "--eval-size EVAL_SIZE" in text and "[default: 608; the demo: 192]" in text
    assert "--mixup, --no-mixup" in text and "[default: True; the demo: False]" in text


# --- Processes: the command line, signals to the group, workers, torchrun --------------------
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path):
    """`kill -- -PGID` (systemd, SLURM) during step 3 of a run with 2 loader workers: the workers
    ignore it, the main process finishes the step, saves last.pt mid-epoch and exits 143;
    resumed with workers, the run ends with the weights of an uninterrupted one, bit for bit."""
    args = TINY + ["--max-iters", "6", "--mixup", "--augment"]
    straight = train.main(args + ["--out", str(tmp_path / "straight")]).state_dict()
    held, go = tmp_path / "held", tmp_path / "go"
    run_file = script(tmp_path, f"""
real, calls = train.train_step, [0]
def held_step(*args):                        # step 3 returns once the group was signalled
    calls[0] += 1
    if calls[0] == 3:
        open({str(held)!r}, "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
    return real(*args)
train.train_step = held_step""")
    cmd = [sys.executable, str(run_file), *args, "--workers", "2", "--out", str(tmp_path / "split")]
    log = open(tmp_path / "log.txt", "w+")
    run = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True, env=ENV)
    try:
        while not held.exists():
            assert run.poll() is None, (log.seek(0), log.read())[1]
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGTERM)             # the main process and its 2 workers
        go.touch()
        assert run.wait(timeout=300) == 128 + signal.SIGTERM, (log.seek(0), log.read())[1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert load(tmp_path / "split" / "last.pt")["iteration"] == 3
    done = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "split"), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    resumed = load(tmp_path / "split" / "last.pt")["model"]
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())


@pytest.mark.parametrize("where", ["start-up", "mid-epoch", "evaluation"])
def test_an_error_with_workers_running_ends_promptly_in_one_line(tmp_path, where):
    """--workers 2 and an error in the main process: at start-up (categories that differ), in
    the epoch (every training image unreadable), in an evaluation: one line, status 2, no hang
    (the timeout fails the test rather than blocking it)."""
    paths = data.make_synthetic(n_train=16, n_val=4)
    train_json, images = json.loads(Path(paths["train_json"]).read_text()), tmp_path / "images"
    images.mkdir()
    for entry in train_json["images"]:                 # the same names, unreadable bytes
        good = (Path(paths["train_images"]) / entry["file_name"]).read_bytes()
        (images / entry["file_name"]).write_bytes(b"not an image" if where == "mid-epoch" else good)
    if where == "start-up":
        train_json["categories"][0]["name"] = "renamed"
    (tmp_path / "train.json").write_text(json.dumps(train_json))
    body = "" if where != "evaluation" else \
        "def failing(*a, **k): raise data.DataError('val.json: made to fail in the evaluation')\n" \
        "evaluate.evaluate = failing"
    cmd = [sys.executable, str(script(tmp_path, body)), *TINY, "--workers", "2", "--max-iters", "2",
           "--train-images", str(images), "--train-ann", str(tmp_path / "train.json"), "--val-images",
           paths["val_images"], "--val-ann", paths["val_json"], "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=ENV)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert {"start-up": "categories", "mid-epoch": "no readable image", "evaluation": "made to fail"}[where] \
        in lines[0]


RANK_SCRIPT = """
import os, sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
import train
from test_train import with_calibrated_bn
train.build_model = with_calibrated_bn(train.build_model)
model = train.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def with_calibrated_bn(build_model):
    """train.build_model, then BatchNorm statistics measured on 3 random batches (its own
    generator): frozen at their initial 0 / 1 they normalise nothing and the outputs overflow."""
    def build(cfg, num_classes):
        model = build_model(cfg, num_classes)
        for bn in (bns := [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
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


def test_two_ranks_equal_one_process_on_the_same_total_batch(tmp_path, monkeypatch):
    """One SGD step, 2 ranks x 2 images (torchrun, gloo) against 1 process x 4 images, BatchNorm
    frozen (CPU has no SyncBN) and no clipping: the ranks agree bit for bit, and their update is
    the single process's. One step: after it the ignore masks' IoU > 0.7 can flip on rounding."""
    args = TINY + ["--freeze-bn", "--max-iters", "1", "--clip-grad", "0", "--lr", "1e-4", "--min-lr", "1e-4"]
    rank_file = tmp_path / "rank.py"
    rank_file.write_text(RANK_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"),
                                            out=str(tmp_path)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, str(rank_file), *args, "--out", str(tmp_path / "ddp")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0 and "2 process(es)" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    monkeypatch.setattr(train, "build_model", with_calibrated_bn(train.build_model))
    single = train.main(args + ["--batch-size", "4", "--out", str(tmp_path / "single")])
    torch.manual_seed(0)                               # train.py's init, before the step
    init = Detector(5, fusion="asff", width=0.125, depth=0.33).state_dict()
    moved = 0
    for key, value in single.state_dict().items():   # the updates, not the weights
        if value.is_floating_point():
            step, ddp_step = value - init[key], ranks[0][key] - init[key]
            torch.testing.assert_close(ddp_step, step, rtol=1e-3, atol=5e-3 * step.abs().max(), msg=key)
            moved += bool(step.abs().max() > 1e-6)
    assert moved > 50


@pytest.mark.parametrize("tool", ["label-studio", "roboflow", "coco"])
def test_labelling_tool_exports_train_evaluate_and_detect(tmp_path, capsys, tool):
    """Files shaped like a labelling tool's export (ids from 0, file names with a sub-folder, the
    annotation file inside the image folder, an unlabelled category 0) or like COCO's own (an RLE
    crowd region, COCO-sized ids, categories with gaps) through train.py, evaluate.py and --detect;
    their ground truth scored as detections gives AP exactly 1.0."""
    folder, ann, _, names = export_like(tool, tmp_path / "set")
    ds = data.CocoDetection(folder, ann)
    truth = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in ds.coco.dataset["annotations"] if not a.get("iscrowd")]
    assert evaluate.coco_score(ds.coco, truth, verbose=False)["AP"] == pytest.approx(1.0, abs=1e-12)
    out = tmp_path / "run"
    own = ["--train-images", folder, "--train-ann", ann, "--val-images", folder, "--val-ann", ann]
    model = train.main(TINY + own + ["--batch-size", "1", "--max-iters", "2", "--out", str(out)])
    assert model.num_classes == len(names) and load(out / "last.pt")["class_names"] == names
    evaluate.main(["--weights", str(out / "last.pt"), "--images", folder, "--ann", ann,
                   "--out", str(out / "ev")])
    assert set(evaluate.PAPER_COLUMNS) <= set(json.loads((out / "ev" / "metrics.json").read_text()))
    evaluate.main(["--detect", folder, "--weights", str(out / "last.pt"), "--out", str(out / "found")])
    assert isinstance(json.loads((out / "found" / "detections.json").read_text()), list)
    assert len(list((out / "found").glob("*.png"))) == 2


@pytest.mark.parametrize("where", ["step", "evaluation"])
def test_a_signal_to_one_rank_stops_both_at_the_same_point(tmp_path, where):
    """torchrun, 2 ranks (gloo): SIGTERM to rank 1 alone, during step 3 or during the evaluation
    after epoch 1 (4 steps of 2 x 2 images). Both ranks stop at the same point, and rank 0's last.pt
    holds that point: iteration 3, or iteration 4 with its evaluation done."""
    hook = ("real, calls = train.train_step, [0]\n"
            "def step(*args):\n    calls[0] += 1\n"
            "    if calls[0] == 3 and os.environ['RANK'] == '1':\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n    return real(*args)\n"
            "train.train_step = step\n") if where == "step" else (
            "real = evaluate.evaluate\n"
            "def evaluating(*args, **kwargs):\n"
            "    if os.environ['RANK'] == '1':\n        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*args, **kwargs)\n"
            "evaluate.evaluate = evaluating\n")
    run_file = script(tmp_path, "import signal\n" + hook)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = TINY + ["--freeze-bn", "--epochs", "3", "--eval-every", "1", "--out", str(tmp_path / "ddp")]
    done = subprocess.run([*torchrun, str(run_file), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode != 0 and "stopped by SIGTERM at iteration" in done.stdout, done.stderr[-3000:]
    state = load(tmp_path / "ddp" / "last.pt")
    assert state["world_size"] == 2 and state["iteration"] == (3 if where == "step" else 4), state

    assert (state["evaluated_at"] == 4) == (where == "evaluation")
