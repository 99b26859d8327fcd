"""A run's curves.png (evaluate.write_curves, which train.py calls at the end of a run): drawn from
a log.jsonl written here by hand in train.py's row format - its size, a curve in every panel, a
changed loss value changing its own panel only, a resumed run's repeated iterations, a cut-off last
line skipped and counted, bad input named in one line."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate as ev
from data import UserError
from loss import TERMS

CURVE = (31, 119, 180)                          # the colour write_curves draws with


def progress(iteration: int, scale: float = 1.0) -> dict:
    """A progress row as train.py logs it: losses falling as 1/iteration."""
    terms = {t: scale * (k + 1) * 100 / iteration for k, t in enumerate(TERMS)}
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
    message = ev.write_curves(folder)
    assert message.startswith(f"wrote {folder / 'curves.png'}: ")
    return np.asarray(Image.open(folder / "curves.png").convert("RGB"))


def panel(pixels: np.ndarray, k: int) -> np.ndarray:
    """Panel k of the 3 x 3 grid: the loss terms, the learning rate, AP, AP50."""
    row, col = divmod(k, 3)
    h, w = ev.PANEL_H, ev.PANEL_W
    return pixels[row * h:(row + 1) * h, col * w:(col + 1) * w]


def has(pixels: np.ndarray, colour) -> bool:
    return bool((pixels == colour).all(-1).any())


def test_size_a_curve_in_every_panel_and_one_changed_value_changes_its_panel_only(tmp_path):
    before = drawn(write(tmp_path / "a", run_rows()))
    assert before.shape == (3 * ev.PANEL_H, 3 * ev.PANEL_W, 3) == (798, 1200, 3)
    for k in range(9):
        assert has(panel(before, k), CURVE), k
        assert has(panel(before, k), (0, 0, 0)), k                # title and tick labels
    rows = run_rows()
    changed = next(r for r in rows if r.get("iteration") == 100 and "obj" in r)
    changed["obj"] *= 3
    after = drawn(write(tmp_path / "b", rows))
    differ = (before != after).any(-1)
    assert differ.any()
    obj = TERMS.index("obj")
    assert all(panel(differ, k).any() == (k == obj) for k in range(9))


def test_a_run_without_an_evaluation_says_so(tmp_path):
    pixels = drawn(write(tmp_path, run_rows(evals=False)))
    assert ev.write_curves(tmp_path).endswith("21 progress rows, 0 evaluations")
    for k in (7, 8):                                          # AP, AP50: text, no curve
        assert not has(panel(pixels, k), CURVE) and has(panel(pixels, k), (0, 0, 0))
    assert has(panel(pixels, 6), CURVE)                 # the learning rate is there


def test_a_resumed_run_follows_the_iterations(tmp_path):
    """The first process logged to 120 and 125 after its last.pt at 100 (then crashed); the
    resumed one logs 101, 110, ... again with other values: its rows replace them, as one clean
    log would (125 is gone)."""
    first = run_rows(range(10, 121, 10)) + [progress(125)]
    again = [progress(101, 0.5)] + [progress(it, 0.5) for it in range(110, 201, 10)]
    again.insert(next(i for i, r in enumerate(again) if r["iteration"] == 150) + 1, evaluation(3, 150))
    again.append(evaluation(4, 200))
    resumed = first + [{"resumed": 100, "config": {}}] + again
    steps, evals, bad = ev.read_log(write(tmp_path / "resumed", resumed) / "log.jsonl")
    assert [r["x"] for r in steps] == [1, *range(10, 101, 10), 101, *range(110, 201, 10)]
    assert steps[-1]["obj"] == progress(200, 0.5)["obj"] and bad == 0
    assert [(r["x"], r["AP"]) for r in evals] == [(1, 0.1), (2, 0.2), (3, 0.1 * 3), (4, 0.4)]
    clean = [r for r in first if r.get("iteration", 0) <= 100] + again
    assert np.array_equal(drawn(tmp_path / "resumed"), drawn(write(tmp_path / "clean", clean)))


def test_a_cut_off_last_line_is_skipped_and_counted(tmp_path):
    whole = drawn(write(tmp_path / "whole", run_rows()))
    folder = write(tmp_path / "cut", run_rows(), tail='[1, 2]\n{"epoch": 4, "iteration": 21')
    assert ev.write_curves(folder).endswith("; skipped 2 malformed line(s) of log.jsonl")
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
    with pytest.raises(UserError, match="^" + re.escape(f"{named}: {expected}")):
        ev.write_curves(folder)
    assert not (folder / "curves.png").exists()
