"""README.md runs as written.

- Every command in its ```bash blocks (and every inline `python ...` span) is either what CI runs
  (.ci/run: the install and test commands) or is run here, in README order in one work folder so
  that a later command finds what an earlier one wrote (`--resume runs/demo/last.pt`):
  train.py, evaluate.py and tests/bench.py shortened (a tiny run at 64 px, later flags win), on
  the synthetic set, on a fake COCO root for `/coco` (synthetic images under COCO's layout and
  its 80 category ids) and on fake weight files of the right format for the released
  checkpoints, darknet's files and the backbone; the concept scripts exactly as typed.
- "Use your own data": its five commands run as written, one after the other, in fresh
  processes, on a tiny COCO-format set, starting from a demo checkpoint.
- The ```python blocks run as they are; the links resolve; every weight file has a source.
"""

import contextlib
import importlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import bench
import darknet
import data
import evaluate
import head
import train
from exercise import EXERCISES
from test_exercises import copy_repo
from test_head import small_released_state

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TINY = ["--width", "0.125", "--depth", "0.33"]
SHORT_RUN = ["--max-iters", "1", "--batch-size", "2", "--size-min", "64", "--size-max", "64",
             "--eval-size", "64", "--workers", "0", "--log-every", "1"]
SHORT = {
    "train": TINY + SHORT_RUN + ["--synthetic-train", "8", "--synthetic-val", "4"],
    "evaluate": ["--eval-size", "64", "--batch-size", "2"],
}
BENCH = {   # tests/bench.py: the flags that shorten each subcommand, and a key of its JSON line
    "loss": (["--batch", "2", "--size", "64", "--objects", "3"], "ms_per_batch"),
    "data": (["--images", "4", "--batches", "2", "--batch-size", "2", "--size", "64"],
             "images_per_s_per_worker"),
    "train": (TINY + ["--steps", "1", "--size-max", "64", "--batch-size", "2", "--threads", "1"],
              "images_per_s"),
    "speed": (TINY + ["--runs", "1", "--warmup", "0", "--speed-sizes", "64", "--threads", "1"],
              "asff_overhead_64"),
}
WEIGHT_FILES = ("yolov3_asff.pth", "yolov3_baseline.pth", "yolov3_asff_star.pth",
                "yolov3_asff_star_800.pth", "darknet53_feature_mx.pth", "darknet53.conv.74",
                "yolov3.weights")
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80
TORCH_CPU = ["pip", "install", "torch", "--index-url", "https://download.pytorch.org/whl/cpu"]


def fenced(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def section(title: str) -> str:
    """The README's text under the `## title` heading, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def commands_of(text: str) -> list[list[str]]:
    """Every command of `text` in order, as argv: the lines of the bash blocks (continuations
    joined, comments dropped, `a && b` split in two) and the inline code spans of the prose that
    start with `python ` or `torchrun `. Repeats are kept once."""
    commands, pos = [], 0
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text + "\n```x\n```", flags=re.S | re.M):
        prose = text[pos:block.start()]
        commands += [shlex.split(c) for c in re.findall(r"`((?:python|torchrun) [^`]+)`", prose)]
        if block.group(1) == "bash":
            for line in block.group(2).replace("\\\n", " ").splitlines():
                commands += [argv for part in line.split("&&") if (argv := shlex.split(part, True))]
        pos = block.end()
    return [list(c) for c in dict.fromkeys(tuple(c) for c in commands)]


OWN_DATA = commands_of("```bash\n" + fenced("bash", section("Use your own data"))[0] + "```\n")
COMMANDS = [c for c in commands_of(README) if c not in OWN_DATA]    # those run end to end below


def ci_lines() -> list[list[str]]:
    return [line.split("#")[0].replace(" -q", "").split() for line in
            (REPO / ".ci" / "run").read_text().splitlines()]


def test_install_and_test_commands_are_what_ci_runs():
    """The README's two commands (first block) are install + demo and install + test; CI runs
    the same install (requirements-dev.txt includes requirements.txt) and the same tests. The
    only other pip command is the CPU-only torch, from PyTorch's own CPU index."""
    first = [shlex.split(p) for p in fenced("bash")[0].replace("&&", "\n").splitlines() if p.strip()]
    assert first == [["pip", "install", "-r", "requirements.txt"], ["python", "train.py"],
                     ["pip", "install", "-r", "requirements-dev.txt"], ["python", "-m", "pytest", "tests"]]
    ci = ci_lines()
    assert ["pip", "install", "-r", "requirements-dev.txt"] in ci
    assert ["python", "-m", "pytest", "tests"] in ci
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    assert f"`{' '.join(TORCH_CPU)}`" in README
    for argv in COMMANDS:
        if argv[0] == "pip" and argv != TORCH_CPU:
            assert argv[-1] in ("requirements.txt", "requirements-dev.txt"), argv


def local_links(markdown: str) -> list[tuple[str, str]]:
    """(path, anchor) of each markdown link that is not a web address, code left out."""
    prose = re.sub(r"^```.*?^```|`[^`]*`", "", markdown, flags=re.S | re.M)
    return re.findall(r"\]\((?!https?://)([^)#\s]*)(?:#([^)\s]+))?\)", prose)


def test_readme_is_the_companion_and_links_resolve():
    """At most 400 lines; the measurements and the bad-input table are in docs/ and linked;
    every relative link of the README and docs/ names a file that exists, and its #anchor a
    heading of that file (GitHub's rule: lower case, punctuation dropped, spaces to dashes)."""
    assert len(README.splitlines()) <= 400
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert {"docs/measurements.md", "docs/data.md"} <= {p.relative_to(REPO).as_posix() for p in pages}
    assert ("docs/measurements.md", "") in local_links(README) and ("docs/data.md", "") in local_links(README)
    for page in pages:
        for target, anchor in local_links(page.read_text()):
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.name}: link to {target} that does not exist"
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name}: #{anchor} is no heading of {path.name}"


def test_readme_links_the_paper_the_authors_code_and_every_weight_file():
    assert "https://arxiv.org/abs/1911.09516" in README
    assert "https://github.com/ruinmessi/ASFF" in README
    rows = {row.split("|")[1].strip(" `"): row for row in section("Weight files").splitlines()
            if row.startswith("| `")}
    for name in WEIGHT_FILES:
        assert name in rows, f"no row for {name} in the README's weight-file table"
        assert re.search(r"\]\(https://[^)]+\)", rows[name]), f"no download link for {name}"
    mentioned = set(re.findall(r"[\w.]+\.(?:pth|weights|conv\.74)\b", README))
    assert mentioned <= set(WEIGHT_FILES) | {"last.pt"}, mentioned - set(WEIGHT_FILES)


def test_reading_order_and_files_tables_name_what_exists():
    """Each `name` of the reading-order and files tables is an attribute (`Class.method` too) of
    a module that its row names."""
    rows = [row.split("|")[1:-1] for title in ("Reading order beside the paper", "Files")
            for row in section(title).splitlines() if re.match(r"\|[^|]*\|[^|]*`\w+\.py`|\| `\w+\.py`", row)]
    assert len(rows) >= 15
    for cells in rows:
        modules = [importlib.import_module(f) for f in re.findall(r"`(\w+)\.py`", " ".join(cells[:2]))]
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", cells[-1]):
            if not name.endswith(".py"):
                assert any(has_path(m, name) for m in modules), f"{name} is in none of {cells[:2]}"


def has_path(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


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
    """A full-size Detector whose prediction and shape convs (the heads' `pred`, `guide`) are
    zero, so that its outputs stay finite with random weights (every box its anchor, every score
    0.5)."""
    torch.manual_seed(0)
    model = head.Detector(80, **config)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in ("pred", "guide"):
            torch.nn.init.zeros_(module.weight)
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


def given_flags(args: list[str]) -> dict:
    """`--name value`, `--name` and `--no-name` of a command line as Config field -> value."""
    flags, i = {}, 0
    while i < len(args):
        name, _, value = args[i].lstrip("-").partition("=")
        if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        key = name.replace("-", "_")
        if value:
            flags[key] = value
        elif key.startswith("no_"):
            flags[key[3:]] = False
        else:
            flags[key] = True
        i += 1
    return flags


def same_setting(text, saved) -> bool:
    """A flag's text against the value its run saved in the checkpoint's config."""
    if isinstance(text, bool) or saved is None:
        return text == saved or (text == "none" and saved is None)
    return type(saved)(text) == saved


def run_train(args: list[str]) -> None:
    short = SHORT["train"] + (["--max-iters", "2"] if "--resume" in args else [])
    train.main(args + short)
    flags = given_flags(args)
    out = Path(flags.get("out") or (Path(flags["resume"]).parent if "resume" in flags else "runs/demo"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == (2 if "resume" in flags else 1)
    shortened = given_flags(short)
    for key, value in flags.items():                      # the README's flags took effect
        if key not in shortened and key != "resume":
            assert same_setting(value, ckpt["config"][key]), (key, value, ckpt["config"][key])
    assert (out / "metrics.json").is_file()


def run_evaluate(args: list[str]) -> None:
    if "--curves" in args:                                # redraws a run's curves
        picture = Path(args[args.index("--curves") + 1]) / "curves.png"
        picture.unlink()
        evaluate.main(args)
        assert picture.stat().st_size > 0
        return
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate.main(args + SHORT["evaluate"])
    printed = out.getvalue()
    folder = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if "--show" in args:
        assert [p for p in folder.glob("figure3_*.png") if p.name != "figure3_demo.png"], printed
    elif "--detect" in args:
        assert json.loads((folder / "detections.json").read_text()) is not None
    elif "--export" in args:
        assert Path(args[args.index("--export") + 1]).is_file()
    elif "--test-dev" in args:
        assert (folder / "detections_test-dev2017_asff_results.json").is_file()
    else:
        assert "AP50" in printed, printed


def run_bench(args: list[str]) -> None:
    """A benchmark shortened (later flags win); its last line is the JSON object it returns."""
    short, key = BENCH[args[0]]
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


def run_script(name: str, args: list[str], monkeypatch) -> None:
    """`python NAME ARGS` as typed, in this process (runpy, as __main__); head.py's FLOP table
    at 64 px only, where its demo takes the sizes (full size takes a minute)."""
    demo = getattr(head, "_demo", None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        if name == "head.py" and not args and demo and "sizes" in demo.__code__.co_varnames:
            demo(sizes=(64,))
        else:
            monkeypatch.setattr(sys, "argv", [name, *args])
            runpy.run_path(str(REPO / name), run_name="__main__")
    assert out.getvalue().strip(), f"python {name} printed nothing"


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:70] for c in COMMANDS])
def test_readme_command_runs(argv, work, monkeypatch):
    if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
        pytest.skip("run by CI (.ci/run), see test_install_and_test_commands_are_what_ci_runs")
    if "cuda" in argv and not torch.cuda.is_available():
        pytest.skip("a GPU command; no GPU here")
    assert argv[0] in ("python", "torchrun"), argv
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    name, args = argv[script], argv[script + 1:]
    if name == "train.py":
        run_train(localise(args, work["root"], tiny=True))
    elif name == "evaluate.py" and args:
        run_evaluate(localise(args, work["root"]))
    elif name == "tests/exercise.py":
        run_exercise(args, work)
    elif name == "tests/bench.py":
        run_bench(args)
    else:
        assert (REPO / name).is_file() and name in ("asff.py", "darknet.py", "head.py", "loss.py",
                                                    "data.py", "evaluate.py"), argv
        run_script(name, args, monkeypatch)


def test_readme_python_examples_run():
    blocks = [block for block in fenced("python") if "sys.argv" not in block]   # those take files:
    assert blocks                                                   # the walk-through runs them
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# ---------------------------------------------------------------------------------------------
# "Use your own data", end to end
# ---------------------------------------------------------------------------------------------
OWN_SHORT = {"train.py": SHORT_RUN, "evaluate.py": ["--batch-size", "2"], "data.py": []}


def test_own_data_commands_run_as_written_from_the_demo_checkpoint(tmp_path):
    """The five commands, each in a fresh `python` process as a user types them, on a tiny
    COCO-format set, the fine-tune starting from a demo checkpoint (`python train.py`, cut to two
    steps at 64 px): they exit 0, the fine-tune keeps the demo's architecture and learns the
    set's classes, and each writes what the README says."""
    paths = data.make_synthetic(tmp_path / "synthetic", n_train=8, n_val=4)
    custom_set(tmp_path / "my", paths)
    env = os.environ | {"ASFF_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
                        "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def run(argv: list[str]) -> str:
        done = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (
            " ".join(argv) + "\n" + done.stdout[-2000:] + done.stderr[-2000:])
        return done.stdout

    run(["python", "train.py", *SHORT_RUN, "--max-iters", "2", "--synthetic-train", "8",
         "--synthetic-val", "4", "--out", "runs/demo"])
    demo = torch.load(tmp_path / "runs/demo/last.pt", weights_only=True)
    assert [argv[1] for argv in OWN_DATA] == ["data.py", "train.py", "evaluate.py", "evaluate.py",
                                              "evaluate.py"]
    assert OWN_DATA[1][OWN_DATA[1].index("--weights") + 1] == "runs/demo/last.pt"
    printed = [run(argv + OWN_SHORT[argv[1]]) for argv in OWN_DATA]
    mine = torch.load(tmp_path / "runs/mine/last.pt", weights_only=True)
    names = [c["name"] for c in json.loads(Path(paths["train_json"]).read_text())["categories"]]
    assert mine["class_names"] == names
    for key in ("width", "depth", "fusion"):
        assert mine["model_args"][key] == demo["model_args"][key], key
    detections = json.loads((tmp_path / "runs/mine/detections/detections.json").read_text())
    assert detections is not None
    assert "AP50" in printed[3]
    assert (tmp_path / "runs/mine/model.pt2").stat().st_size > 0
    (exported,) = [block for block in fenced("python") if "torch.export.load" in block]
    away = tmp_path / "elsewhere"                                   # no asff file, no PYTHONPATH
    away.mkdir()
    (away / "run_exported.py").write_text(exported)
    image = sorted((tmp_path / "my" / "val").iterdir())[0]
    done = subprocess.run([sys.executable, "-I", "run_exported.py", str(tmp_path / "runs/mine/model.pt2"),
                           str(image)], cwd=away, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines():                           # name score [x1, y1, x2, y2]
        found = re.fullmatch(r"(.+) (\d\.\d{3}) \[([-\d., ]+)\]", line)
        assert found and found.group(1) in names and float(found.group(2)) >= 0.3, line
