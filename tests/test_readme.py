"""README.md runs: every command in its ```bash blocks is either what CI runs (.ci/run: the
install and test commands) or is run here in a shortened form - train.py, evaluate.py and the
benchmarks of tests/bench.py with a tiny model at 64 px for one iteration (`SHORT`, `BENCH`), on
the synthetic set, on a fake COCO root for `/coco` (synthetic images under COCO's folder layout
and its 80 category ids) and on fake weight files of the right format for the released
checkpoints, darknet's files and the backbone.
The ```python blocks run as they are. Commands run in README order in one work folder, so a
later command finds what an earlier one wrote (`--resume runs/demo/last.pt`)."""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import asff
import bench
import darknet
import data
import evaluate
import head
import loss
import train
from exercise import EXERCISES
from test_evaluate import COCO_IDS
from test_exercises import copy_repo
from test_head import small_released_state

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TINY = ["--width", "0.125", "--depth", "0.33"]
SHORT = {
    "train": TINY + ["--max-iters", "1", "--batch-size", "2", "--size-min", "64", "--size-max", "64",
                     "--eval-size", "64", "--workers", "0", "--synthetic-train", "8",
                     "--synthetic-val", "4", "--threads", "1", "--log-every", "1"],
    "evaluate": ["--limit", "2", "--size", "64", "--batch", "2", "--threads", "1"],
}
BENCH = {   # tests/bench.py: the flags that shorten each subcommand, and a key of its JSON line
    "loss": (["--batch", "2", "--size", "64", "--objects", "3"], "ms_per_batch"),
    "data": (["--images", "4", "--batches", "2", "--batch-size", "2", "--size", "64"],
             "images_per_s_per_worker"),
    "train": (TINY + ["--steps", "1", "--size-max", "64", "--batch-size", "2", "--threads", "1"],
              "images_per_s"),
    "speed": (TINY + ["--runs", "1", "--warmup", "0", "--speed-sizes", "64", "--threads", "1"],
              "asff_overhead_64"),
    "against": (TINY + ["--sizes", "64", "--runs", "1", "--train-runs", "1", "--train-size", "64",
                        "--threads", "1"], "train_step_ratio"),
}


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def readme_commands() -> list[list[str]]:
    """Every command in document order, as argv: the lines of the bash blocks (continuations
    joined, comments dropped, `a && b` split in two) and the inline code spans of the text that
    start with `python ` or `torchrun `. Repeats are run once."""
    commands, pos = [], 0
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", README + "\n```x\n```", flags=re.S | re.M):
        text = README[pos:block.start()]
        commands += [shlex.split(c) for c in re.findall(r"`((?:python|torchrun) [^`]+)`", text)]
        if block.group(1) == "bash":
            for line in block.group(2).replace("\\\n", " ").splitlines():
                commands += [argv for part in line.split("&&") if (argv := shlex.split(part, True))]
        pos = block.end()
    return [list(c) for c in dict.fromkeys(tuple(c) for c in commands)]


COMMANDS = readme_commands()


def ci_lines() -> list[str]:
    return [line.split("#")[0].replace(" -q", "").split() for line in
            (REPO / ".ci" / "run").read_text().splitlines()]


def test_install_and_test_commands_are_what_ci_runs():
    """The README's two commands (first block) are install + demo and install + test; CI runs
    the same install (requirements-dev.txt includes requirements.txt) and the same tests."""
    first = [shlex.split(p) for p in fenced("bash")[0].replace("&&", "\n").splitlines() if p.strip()]
    assert first == [["pip", "install", "-r", "requirements.txt"], ["python", "train.py"],
                     ["pip", "install", "-r", "requirements-dev.txt"], ["python", "-m", "pytest", "tests"]]
    ci = ci_lines()
    assert ["pip", "install", "-r", "requirements-dev.txt"] in ci
    assert ["python", "-m", "pytest", "tests"] in ci
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    for argv in COMMANDS:
        if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
            assert argv[:3] == ["python", "-m", "pytest"] or argv[-1] in (
                "requirements.txt", "requirements-dev.txt"), argv


# ---------------------------------------------------------------------------------------------
# The work folder: synthetic set, fake COCO, fake weight files
# ---------------------------------------------------------------------------------------------
def fake_coco(root: Path, paths: dict) -> None:
    """COCO's layout with the synthetic images: 80 categories with COCO's ids and names, the
    synthetic classes mapped to the first ids; test-dev = the val images without annotations."""
    categories = [{"id": i, "name": n} for i, n in zip(COCO_IDS, evaluate.COCO_NAMES, strict=True)]
    (root / "annotations").mkdir(parents=True)
    for split, source in (("train", "train"), ("val", "val"), ("test", "val")):
        shutil.copytree(paths[f"{source}_images"], root / f"{split}2017")
        info = json.loads(Path(paths[f"{source}_json"]).read_text())
        info["categories"] = categories
        for ann in info["annotations"]:
            ann["category_id"] = COCO_IDS[ann["category_id"] - 1]
        name = f"instances_{split}2017.json"
        if split == "test":
            del info["annotations"]
            name = "image_info_test-dev2017.json"
        (root / "annotations" / name).write_text(json.dumps(info))


def custom_set(root: Path, paths: dict) -> None:
    """README's `my/train`, `my/train.json`, `my/val`, `my/val.json`: the synthetic set."""
    root.mkdir()
    for split in ("train", "val"):
        shutil.copytree(paths[f"{split}_images"], root / split)
        shutil.copy(paths[f"{split}_json"], root / f"{split}.json")


def quiet_detector(**config) -> head.Detector:
    """A full-size Detector whose prediction and shape convs are zero, so that its outputs stay
    finite with random weights (every box its anchor, every score 0.5)."""
    torch.manual_seed(0)
    model = head.Detector(80, **config)
    for h in model.heads.values():
        torch.nn.init.zeros_(h.pred.weight)
        if h.guided:
            torch.nn.init.zeros_(h.guide.weight)
    return model


def write_weights(path: Path, tiny: bool = False) -> None:
    """A file of the format its README name stands for (tiny: a released ASFF detector of the
    shortened runs' width and depth, for train.py --weights)."""
    name = path.name
    if tiny and name.endswith(".pth") and name != "darknet53_feature_mx.pth":
        torch.save(small_released_state(head.Detector(80, fusion="asff", width=0.125, depth=0.33)), path)
        return
    if name.endswith(".conv.74"):                              # darknet's backbone, tiny model
        backbone = head.Detector(5, width=0.125, depth=0.33).backbone
        darknet.write_darknet_weights(str(path), backbone.darknet_layers())
    elif name == "darknet53_feature_mx.pth":                   # the release's backbone, tiny
        state = small_released_state(head.Detector(5, width=0.125, depth=0.33))
        torch.save({k: v for k, v in state.items() if int(k.split(".")[1]) <= 10}, path)
    elif name.endswith(".weights"):                            # darknet's yolov3.weights
        model = quiet_detector(fusion=None, guided=False, spp=False)
        darknet.write_darknet_weights(str(path), model.darknet_layers())
    else:                                                      # a released detector checkpoint
        config = (dict(fusion=None) if "baseline" in name else
                  dict(fusion="asff", rfb=True) if "star" in name else dict(fusion="asff"))
        torch.save(small_released_state(quiet_detector(**config)), path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """cwd = a fresh folder holding coco/, my/ and the repo copy for the exercises; the
    synthetic set's default size made small (train.py passes its sizes, evaluate.py does not)."""
    ws = tmp_path_factory.mktemp("readme")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASFF_CACHE", str(ws / "cache"))
        mp.chdir(ws)
        mp.setattr(data, "make_synthetic", partial(data.make_synthetic, n_train=8, n_val=4))
        paths = data.make_synthetic()
        fake_coco(ws / "coco", paths)
        custom_set(ws / "my", paths)
        yield {"root": ws, "repo": copy_repo(ws / "repo"), "last": {}}
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Running one command
# ---------------------------------------------------------------------------------------------
WRITTEN: dict[Path, bool] = {}                 # weight files written here -> written tiny?


def localise(args: list[str], ws: Path, tiny: bool = False) -> list[str]:
    """/coco -> the fake COCO root; weight files named by the README written where it says (a
    file written tiny for a shortened train.py run is written again full size for evaluate.py)."""
    args = [str(ws / "coco") + a[len("/coco"):] if a.startswith("/coco") else a for a in args]
    for flag in ("--weights", "--backbone"):
        if flag in args:
            path = Path(args[args.index(flag) + 1])
            if path.parts[0] != "runs" and (not path.exists() or WRITTEN.get(path.resolve()) != tiny):
                write_weights(path, tiny)
                WRITTEN[path.resolve()] = tiny
    return args


def run_train(args: list[str]) -> None:
    if "--plot" in args:                                  # redraws a run's curves, no training
        picture = Path(args[args.index("--plot") + 1]) / "curves.png"
        picture.unlink()
        train.main(args)
        assert picture.stat().st_size > 0
        return
    short = SHORT["train"] + (["--max-iters", "2"] if "--resume" in args else [])
    given = train.parse_config(args)
    train.main(args + short)
    ckpt = torch.load(Path(given.out) / "last.pt", weights_only=True)
    assert ckpt["iteration"] == (2 if given.resume else 1)
    shortened = {a.lstrip("-").replace("-", "_") for a in short if a.startswith("--")}
    for key, value in train.dataclasses.asdict(given).items():   # the README's flags took effect
        if key not in shortened:
            assert ckpt["config"][key] == value, key
    assert (Path(given.out) / "metrics.json").is_file()


def run_evaluate(args: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate.main(args + (SHORT["evaluate"] if args else []))
    printed = out.getvalue()
    if "--show" in args:
        assert "figure3_" in printed
    elif "--detect" in args:
        out = Path(args[args.index("--out") + 1])
        assert "detections.json" in printed and json.loads((out / "detections.json").read_text())
    elif "--export" in args:
        assert Path(args[args.index("--export") + 1]).is_file()
    elif "--test-dev" in args:
        assert "for the COCO test-dev server" in printed
    elif args:
        assert "AP50" in printed and "evaluated 2 images" in printed
    else:
        assert "postprocess" in printed                       # the help and the toy example


def run_bench(args: list[str]) -> None:
    """A benchmark shortened (later flags win); its last line is the JSON object it returns.
    `against REF` runs against this checkout itself."""
    short, key = BENCH[args[0]]
    args = [str(REPO) if args[0] == "against" and a == "../ref" else a for a in args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = bench.main(args + short)
    assert key in summary and json.loads(out.getvalue().strip().splitlines()[-1]) == summary


def run_exercise(args: list[str], work: dict) -> None:
    """In the repo copy: `check` right after `start` fails (the body is a stub), all else works."""
    done = subprocess.run([sys.executable, "tests/exercise.py", *args], cwd=work["repo"],
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    expected = 1 if args[0] == "check" and work["last"].get(args[1]) == "start" else 0
    assert done.returncode == expected, done.stdout[-2000:] + done.stderr[-2000:]
    if args[0] in ("start", "solution", "check"):
        assert args[1] in EXERCISES
        work["last"][args[1]] = args[0]


SCRIPTS = {
    "asff.py": lambda args: asff._demo(),
    "darknet.py": lambda args: darknet._demo(),
    "head.py": lambda args: head._demo(sizes=(64,)),
    "loss.py": lambda args: loss._demo(),
    "data.py": lambda args: data.main(args),
}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:70] for c in COMMANDS])
def test_readme_command_runs(argv, work):
    if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
        pytest.skip("run by CI (.ci/run), see test_install_and_test_commands_are_what_ci_runs")
    if "cuda" in argv and not torch.cuda.is_available():
        pytest.skip("a GPU command; no GPU here")
    assert argv[0] in ("python", "torchrun"), argv
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    name = argv[script]
    args = localise(argv[script + 1:], work["root"], tiny=name == "train.py")
    if name == "train.py":
        run_train(args)
    elif name == "evaluate.py":
        run_evaluate(args)
    elif name == "tests/exercise.py":
        run_exercise(args, work)
    elif name == "tests/bench.py":
        run_bench(args)
    else:
        assert name in SCRIPTS, f"README command {argv} is not run by any test"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            SCRIPTS[name](args)
        assert out.getvalue().strip()


def test_readme_python_examples_run():
    blocks = fenced("python")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
