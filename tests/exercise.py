"""Coursework exercises: re-implement one function of the paper and let its tests grade you.

    python tests/exercise.py list                 the exercises, their functions and tests
    python tests/exercise.py start nms            hide the reference body (saved under .exercise/)
    python tests/exercise.py check nms            run the grading tests against your version
    python tests/exercise.py solution nms         put the reference body back

`start` replaces the function's body, below its signature and docstring, by
`raise NotImplementedError`, so the solution is out of view while you work; the original file
is kept in `.exercise/` (git-ignored) and `git diff` shows only your work. `check` runs the
grading tests named below; they pass with the reference and fail with a stub that raises or
returns zeros (tests/test_exercises.py proves that for every exercise).
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

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
               "Sec. 3.2 resizing: max-pools + stride-2 conv down, 1x1 conv + nearest up"),
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
              "blend two images on a (max H, max W) canvas; boxes carry their image's ratio"),
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


def check(name: str) -> int:
    tests = EXERCISES[name][2]
    return subprocess.call([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT)


def solution(name: str) -> None:
    file = EXERCISES[name][0]
    if not (SAVED / file).exists():
        sys.exit(f"no exercise in progress in {file}")
    shutil.move(SAVED / file, ROOT / file)
    print(f"{file}: reference restored")


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("list", "start", "check", "solution") or \
            (argv[0] != "list" and (len(argv) < 2 or argv[1] not in EXERCISES)):
        print(__doc__)
        print("exercises:", ", ".join(EXERCISES))
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
