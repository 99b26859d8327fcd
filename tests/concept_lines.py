"""How much of each module is the paper, and how long its functions are.

    python tests/concept_lines.py            the table: per module, non-blank lines, the lines
                                             that are its paper concept, their share, and the
                                             longest function

The rule, applied to the seven modules the paper maps onto:
- A module is cut into sections by banners: a comment line of 20 or more dashes followed by a
  comment line that is the section's title (one more dashed line may close the banner).
- A section whose title starts with "Plumbing" (command line, file formats, checkpoints,
  logging, drawing helpers that are not a figure of the paper) is not concept; every other
  section is, and so is the module docstring (the paper map) and the text before the first
  banner.
- Import statements and the `if __name__ == "__main__":` block are never concept.
- A function's length is its lines from `def` to its last line, blank lines and its docstring
  not counted (nested functions count inside their parent).
tests/test_structure.py holds the modules to these numbers (issue 12's bars).
"""

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("asff.py", "darknet.py", "head.py", "loss.py", "data.py", "train.py", "evaluate.py")


def is_banner(line: str) -> bool:
    text = line.strip()
    return text.startswith("#") and text.lstrip("# ").startswith("-" * 20) and \
        set(text.lstrip("# ")) <= {"-"}


def section_titles(lines: list[str]) -> list[str]:
    """Per line (0-based), the title of the section it stands in ("" before the first banner)."""
    titles, title = [], ""
    for k, line in enumerate(lines):
        closing = k >= 2 and is_banner(lines[k - 2]) and not is_banner(lines[k - 1])
        if is_banner(line) and not closing and k + 1 < len(lines) and \
                lines[k + 1].strip().startswith("#") and not is_banner(lines[k + 1]):
            title = lines[k + 1].strip().lstrip("# ").strip()
        titles.append(title)
    return titles


def non_concept_lines(tree: ast.Module) -> set[int]:
    """1-based line numbers of imports and of the __main__ block."""
    lines = set()
    for node in tree.body:
        main = isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
        if isinstance(node, (ast.Import, ast.ImportFrom)) or main:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def docstring_lines(node) -> set[int]:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return set(range(body[0].lineno, body[0].end_lineno + 1))
    return set()


def function_lengths(tree: ast.Module, lines: list[str]) -> dict[str, int]:
    """qualified name -> lines of code (blank lines and the docstring left out)."""
    lengths = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    skip = docstring_lines(child)
                    lengths[name] = sum(1 for n in range(child.lineno, child.end_lineno + 1)
                                        if n not in skip and lines[n - 1].strip())
                visit(child, name + ".")

    visit(tree, "")
    return lengths


def count(path: Path) -> dict:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    titles, excluded = section_titles(lines), non_concept_lines(tree)
    non_blank = [n for n, line in enumerate(lines, 1) if line.strip()]
    concept = [n for n in non_blank if n not in excluded
               and not titles[n - 1].lower().startswith("plumbing")]
    lengths = function_lengths(tree, lines)
    longest = max(lengths.items(), key=lambda kv: kv[1], default=("-", 0))
    return {"file": path.name, "lines": len(non_blank), "concept": len(concept),
            "share": len(concept) / max(len(non_blank), 1), "longest": longest[0],
            "longest_lines": longest[1], "functions": lengths}


def table(rows: list[dict]) -> str:
    out = [f"{'module':<13}{'lines':>7}{'concept':>9}{'share':>8}   longest function",
           "-" * 72]
    for r in rows:
        out.append(f"{r['file']:<13}{r['lines']:>7}{r['concept']:>9}{r['share']:>8.0%}   "
                   f"{r['longest']} ({r['longest_lines']})")
    total, concept = sum(r["lines"] for r in rows), sum(r["concept"] for r in rows)
    out.append(f"{'total':<13}{total:>7}{concept:>9}{concept / total:>8.0%}")
    return "\n".join(out)


if __name__ == "__main__":
    rows = [count(ROOT / m) for m in MODULES]
    print(table(rows))
    print(json.dumps({r["file"]: {k: r[k] for k in ("lines", "concept", "longest_lines")}
                      for r in rows}))
    sys.exit(0)
