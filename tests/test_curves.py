"""train.py's curves.png (write_curves, `python train.py --plot RUN_DIR`): drawn from a log.jsonl
written here by hand - its size, a curve in every panel, a changed loss value changing its own
panel only, a resumed run's repeated iterations, a cut-off last line skipped and counted, bad
input named in one line; the round tick values by hand. (A real run's curves.png: test_train.py,
the shortened demo and the stop by signal.)"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train

REPO = Path(__file__).resolve().parents[1]


def progress(iteration: int, scale: float = 1.0) -> dict:
    """A progress row as train.report_progress writes it: losses falling as 1/iteration."""
    terms = {t: scale * (k + 1) * 100 / iteration for k, t in enumerate(train.TERMS)}
    return {"epoch": iteration // 50, "iteration": iteration, **terms, "grad_norm": 3.0,
            "lr": 0.01 * min(iteration / 20, 1), "size": 64, "images_per_s": 9.5, "time": 0.1 * iteration}


def evaluation(epoch: int, iteration: int) -> dict:
    return {"epoch": epoch, "iteration": iteration,
            "eval": {"AP": 0.1 * epoch, "AP50": 0.2 * epoch, "AP75": 0.05 * epoch}}


def write(folder: Path, rows: list, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


def run_rows(iterations=range(10, 201, 10), evals=True) -> list[dict]:
    rows = [{"started": 0, "config": {"epochs": 4}}, progress(1)]
    for it in iterations:
        rows.append(progress(it))
        if evals and it % 50 == 0:
            rows.append(evaluation(it // 50, it))
    return rows


def drawn(folder: Path) -> np.ndarray:
    message = train.write_curves(folder)
    assert message.startswith(f"wrote {folder / 'curves.png'}: ")
    return np.asarray(Image.open(folder / "curves.png").convert("RGB"))


def panel(pixels: np.ndarray, k: int) -> np.ndarray:
    """Panel k of the 3 x 3 grid: the loss terms, the learning rate, AP, AP50."""
    row, col = divmod(k, 3)
    h, w = train.PANEL_H, train.PANEL_W
    return pixels[row * h:(row + 1) * h, col * w:(col + 1) * w]


def has(pixels: np.ndarray, colour) -> bool:
    return bool((pixels == colour).all(-1).any())


def test_size_a_curve_in_every_panel_and_one_changed_value_changes_its_panel_only(tmp_path):
    before = drawn(write(tmp_path / "a", run_rows()))
    assert before.shape == (3 * train.PANEL_H, 3 * train.PANEL_W, 3) == (798, 1200, 3)
    for k in range(9):
        assert has(panel(before, k), train.CURVE), k
        assert has(panel(before, k), (0, 0, 0)), k                # title and tick labels
    rows = run_rows()
    changed = next(r for r in rows if r.get("iteration") == 100 and "obj" in r)
    changed["obj"] *= 3
    after = drawn(write(tmp_path / "b", rows))
    differ = (before != after).any(-1)
    assert differ.any()
    obj = train.TERMS.index("obj")
    assert all(panel(differ, k).any() == (k == obj) for k in range(9))


def test_a_run_without_an_evaluation_says_so(tmp_path):
    pixels = drawn(write(tmp_path, run_rows(evals=False)))
    assert train.write_curves(tmp_path).endswith("21 progress rows, 0 evaluations")
    for k in (7, 8):                                          # AP, AP50: text, no curve
        assert not has(panel(pixels, k), train.CURVE) and has(panel(pixels, k), (0, 0, 0))
    assert has(panel(pixels, 6), train.CURVE)                 # the learning rate is there


def test_a_resumed_run_follows_the_iterations(tmp_path):
    """The first process logged to 120 and 125 after its last.pt at 100 (then crashed); the
    resumed one logs 101, 110, ... again with other values: its rows replace them, as one clean
    log would (125 is gone)."""
    first = run_rows(range(10, 121, 10)) + [progress(125)]
    again = [progress(101, 0.5)] + [progress(it, 0.5) for it in range(110, 201, 10)]
    again.insert(next(i for i, r in enumerate(again) if r["iteration"] == 150) + 1, evaluation(3, 150))
    again.append(evaluation(4, 200))
    resumed = first + [{"resumed": 100, "config": {}}] + again
    steps, evals, bad = train.read_log(write(tmp_path / "resumed", resumed) / "log.jsonl")
    assert [r["iteration"] for r in steps] == [1, *range(10, 101, 10), 101, *range(110, 201, 10)]
    assert steps[-1]["obj"] == progress(200, 0.5)["obj"] and bad == 0
    assert [(r["iteration"], r["epoch"]) for r in evals] == [(50, 1), (100, 2), (150, 3), (200, 4)]
    clean = [r for r in first if r.get("iteration", 0) <= 100] + again
    assert np.array_equal(drawn(tmp_path / "resumed"), drawn(write(tmp_path / "clean", clean)))


def test_a_cut_off_last_line_is_skipped_and_counted(tmp_path):
    whole = drawn(write(tmp_path / "whole", run_rows()))
    folder = write(tmp_path / "cut", run_rows(), tail='[1, 2]\n{"epoch": 4, "iteration": 21')
    assert train.write_curves(folder).endswith("; skipped 2 malformed line(s) of log.jsonl")
    assert np.array_equal(drawn(folder), whole)


@pytest.mark.parametrize("case", ["no folder", "no log", "empty log", "no progress row"])
def test_bad_input_is_a_user_error_naming_the_file(tmp_path, case):
    folder = tmp_path / "run"
    if case != "no folder":
        folder.mkdir()
    if case == "empty log":
        (folder / "log.jsonl").write_text("")
    if case == "no progress row":
        write(folder, [{"started": 0, "config": {}}], tail='{"epoch": 0, "iter')
    named = folder if case == "no folder" else folder / "log.jsonl"
    expected = {"no folder": "no such folder", "no log": "no such file", "empty log": "empty",
                "no progress row": "no progress row (1 malformed line(s) skipped); "}[case]
    with pytest.raises(train.data.UserError, match="^" + re.escape(f"{named}: {expected}")):
        train.write_curves(folder)
    assert not (folder / "curves.png").exists()


def test_the_plot_flag_draws_without_training_and_names_a_missing_folder(tmp_path):
    folder = write(tmp_path / "run", run_rows())
    done = subprocess.run([sys.executable, "train.py", "--plot", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {folder / 'curves.png'}: 21 progress rows, 4 evaluations\n"
    assert Image.open(folder / "curves.png").size == (1200, 798)
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png", "log.jsonl"]
    done = subprocess.run([sys.executable, "train.py", "--plot", str(tmp_path / "none")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == (f"error: {tmp_path / 'none'}: no such folder (a train.py run folder "
                           "holds log.jsonl)\n")


def test_round_ticks_by_hand():
    assert train.ticks(0, 960) == [0, 200, 400, 600, 800]
    assert train.ticks(-0.02, 0.51) == pytest.approx([0, 0.2, 0.4])    # 0.1 apart: 6 steps
    assert train.ticks(3, 4) == pytest.approx([3, 3.2, 3.4, 3.6, 3.8, 4])
    values = lambda lo, hi: [round(10 ** t, 9) for t in train.log_ticks(math.log10(lo), math.log10(hi))]
    assert values(3, 1970) == [10, 100, 1000]                 # powers of ten: 3 or more
    assert values(20, 1970) == [20, 50, 100, 200, 500, 1000]  # else 1, 2, 5 x 10^k
    assert values(1.4, 7.5) == [2, 5]
    assert values(3.1, 4.1) == pytest.approx([3.2, 3.4, 3.6, 3.8, 4.0])   # else linear
