"""Coursework exercises: re-implement one function of the paper and let its tests grade you.

    python tests/exercise.py list                 the exercises, their functions and tests
    python tests/exercise.py start nms            hide the reference body (saved under .exercise/)
    python tests/exercise.py check nms            run the grading tests against your version
    python tests/exercise.py solution nms         put the reference body back (your attempt
                                                  is kept as .exercise/<file>.attempt-<time>.py)

`start` replaces the function's body, below its signature and docstring, by
`raise NotImplementedError`, so the solution is out of view while you work; the original file
is kept in `.exercise/` (git-ignored) and `git diff` shows only your work. `check` runs the
grading tests named below; they pass with the reference and fail with a stub that raises or
returns zeros (tests/test_exercises.py proves that for every exercise), and it ends with one line,
`exercise nms: PASS (2 passed)` or `exercise nms: FAIL (1 failed, 1 passed)`.
"""

import ast
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / ".exercise"

# name: (file, function qualname, grading tests (pytest selection), what to implement)
EXERCISES = {
    "fusion-weights": ("asff.py", "ASFF.fusion_weights",
                       ["tests/test_asff.py::test_eq2_weights_are_a_softmax_over_levels",
                        "tests/test_asff.py::test_asff_equals_float64_per_position_loop"],
                       "Eq. 2: per-level 1x1 weight branches, concat, 1x1 logits, softmax over levels"),
    "resize": ("asff.py", "Resize.forward",
               ["tests/test_asff.py::test_resizing_follows_section_3_2",
                "tests/test_asff.py::test_any_number_of_levels_retinanet_style"],
               "Sec. 3.2 resizing: max-pools + stride-2 conv down, 1x1 conv + nearest up, fit_to the target"),
    "deform-conv": ("head.py", "deform_conv2d",
                    ["tests/test_head.py::test_deform_conv_with_zero_offsets_is_a_plain_conv",
                     "tests/test_head.py::test_deform_conv_matches_float64_loop_forward_and_backward"],
                    "DCNv1 with deformable groups, bilinear sampling, zeros outside the map"),
    "decode": ("head.py", "decode_level",
               ["tests/test_evaluate.py", "-k", "decode"],
               "raw predictions -> (cx, cy, w, h, obj, cls) in pixels, guided anchors included"),
    "iou-loss": ("loss.py", "iou_loss_form",
                 ["tests/test_loss.py", "-k", "iou"],
                 "the IoU-loss forms: 1 - IoU^2 (released), -ln IoU (UnitBox), 1 - IoU"),
    "assignment": ("loss.py", "assign_targets",
                   ["tests/test_loss.py", "-k", "assign or stride_8 or one_cell or image_edge or "
                    "anchor_free or vectorised"],
                   "best of 9 anchors by shape IoU picks level, cell and slot; anchor-free takeover"),
    "nms": ("evaluate.py", "batched_nms",
            ["tests/test_evaluate.py", "-k", "nms"],
            "per-class NMS batched over classes with the coordinate-offset trick"),
    "mixup": ("data.py", "mixup",
              ["tests/test_data.py", "-k", "mixup"],
              "blend two images on a (max W, max H) canvas: lam * image1 + (1 - lam) * image2"),
}


def function_span(source: str, qualname: str) -> tuple[int, int]:
    """(first body line after the docstring, last line), 1-based, of `qualname` in `source`."""
    tree = ast.parse(source)
    node = tree
    for part in qualname.split("."):
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    body = node.body
    first = body[1] if isinstance(body[0], ast.Expr) and isinstance(
        getattr(body[0], "value", None), ast.Constant) and len(body) > 1 else body[0]
    return first.lineno, node.end_lineno


def start(name: str) -> None:
    file, qualname, _, what = EXERCISES[name]
    path = ROOT / file
    SAVED.mkdir(exist_ok=True)
    if (SAVED / file).exists():
        sys.exit(f"{file} already holds an exercise in progress: `solution` restores it first")
    shutil.copy(path, SAVED / file)
    lines = path.read_text().splitlines(keepends=True)
    first, last = function_span("".join(lines), qualname)
    indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
    stub = f'{indent}raise NotImplementedError("exercise {name}: {what}")\n'
    path.write_text("".join(lines[: first - 1] + [stub] + lines[last:]))
    print(f"{file}: {qualname} is yours to write ({what}).\n"
          f"Grade it with: python tests/exercise.py check {name}")


def grading_counts(report: Path) -> dict[str, int]:
    """passed / failed / errors / skipped from pytest's JUnit XML report."""
    suites = ElementTree.parse(report).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"],
            "skipped": total["skipped"]}


def check(name: str) -> int:
    """Run the grading tests (pytest's own output first), then one line: pass or fail, with counts."""
    tests = EXERCISES[name][2]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        code = subprocess.call([sys.executable, "-m", "pytest", "--junitxml", str(report), *tests],
                               cwd=ROOT)
        counts = grading_counts(report) if report.exists() else {}
    verdict = "PASS" if code == 0 else "FAIL"
    detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or f"pytest exit code {code}"
    print(f"exercise {name}: {verdict} ({detail})")
    return code


def solution(name: str) -> None:
    """Put the reference back; the student's attempt is kept beside it, under .exercise/."""
    file = EXERCISES[name][0]
    if not (SAVED / file).exists():
        sys.exit(f"no exercise in progress in {file}")
    backup = SAVED / f"{Path(file).stem}.attempt-{time.strftime('%Y%m%d-%H%M%S')}.py"
    shutil.copy(ROOT / file, backup)
    shutil.move(SAVED / file, ROOT / file)
    print(f"{file}: reference restored; your attempt is saved as {backup.relative_to(ROOT)}")


def usage_error(argv: list[str]) -> str | None:
    """What is wrong with the command line, or None."""
    commands = ("list", "start", "check", "solution")
    if not argv or argv[0] not in commands:
        return f"unknown command {argv[0]!r}" if argv else "no command given"
    if argv[0] != "list" and len(argv) < 2:
        return f"{argv[0]} needs an exercise name"
    if argv[0] != "list" and argv[1] not in EXERCISES:
        return f"unknown exercise {argv[1]!r}"
    return None


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print("exercises:", ", ".join(EXERCISES))
        return 0
    problem = usage_error(argv)
    if problem:
        print(__doc__)
        print("exercises:", ", ".join(EXERCISES))
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if argv[0] == "list":
        for name, (file, qualname, tests, what) in EXERCISES.items():
            print(f"{name:<15} {file}:{qualname:<22} {what}\n{'':<15} graded by {' '.join(tests)}")
        return 0
    if argv[0] == "check":
        return check(argv[1])
    {"start": start, "solution": solution}[argv[0]](argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
