"""The coursework exercises grade for real: each exercise's grading tests fail when its function
is a stub that raises or returns zeros (conftest.py installs the stub in a fresh pytest run), and
the start / check / solution cycle of tests/exercise.py hides and restores the reference exactly.
With the reference in place the same tests pass: they are part of this suite."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from exercise import EXERCISES, function_span

REPO = Path(__file__).resolve().parents[1]
STUBS = ("raise", "zeros")


def grade(tests: list[str], cwd: Path, stub: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    env.pop("ASFF_EXERCISE_STUB", None)
    if stub:
        env["ASFF_EXERCISE_STUB"] = stub
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_there_are_at_least_six_exercises_on_distinct_functions():
    assert len(EXERCISES) >= 6
    assert len({(file, qualname) for file, qualname, *_ in EXERCISES.values()}) == len(EXERCISES)
    for name, (file, qualname, _, _) in EXERCISES.items():
        first, last = function_span((REPO / file).read_text(), qualname)
        assert last >= first, name                    # the body to hide exists


@pytest.fixture(scope="module")
def graded_with_stubs(request) -> dict:
    """The grading runs of the stub tests this session selected, all started at once and run
    as many at a time as there are cores (each is one process on one thread):
    {(name, kind): Future of its CompletedProcess}."""
    wanted = [item.callspec.params for item in request.session.items
              if getattr(item, "originalname", None) == "test_grading_tests_fail_on_a_stub"]
    pool = ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 4))
    yield {(p["name"], p["kind"]): pool.submit(grade, EXERCISES[p["name"]][2], REPO,
                                               f"{p['name']}:{p['kind']}") for p in wanted}
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("kind", STUBS)
@pytest.mark.parametrize("name", list(EXERCISES))
def test_grading_tests_fail_on_a_stub(name, kind, graded_with_stubs):
    done = graded_with_stubs[(name, kind)].result()
    # exit code 1: tests ran and failed (2 would be a collection error, 5 nothing collected)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAILURES" in done.stdout and "Error" in done.stdout


def copy_repo(target: Path) -> Path:
    """The tracked source files and tests, to run an exercise on without touching the checkout."""
    target.mkdir()
    for path in [*REPO.glob("*.py"), REPO / "pyproject.toml"]:
        shutil.copy(path, target / path.name)
    shutil.copytree(REPO / "tests", target / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    return target


def test_start_check_solution_cycle(tmp_path):
    """start hides the reference body (the grading tests then fail), solution restores it."""
    repo = copy_repo(tmp_path / "repo")
    original = (repo / "evaluate.py").read_text()
    run = lambda *args: subprocess.run([sys.executable, "tests/exercise.py", *args], cwd=repo,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    assert run("start", "nms").returncode == 0
    started = (repo / "evaluate.py").read_text()
    assert 'raise NotImplementedError("exercise nms' in started and "dead |= overlap" not in started
    assert "def batched_nms(" in started and "def postprocess(" in started   # the rest is kept
    assert run("start", "nms").returncode != 0        # one exercise per file at a time
    (repo / "evaluate.py").write_text(started + "\n# my attempt\n")
    checked = run("check", "nms")
    assert checked.returncode == 1
    verdict = checked.stdout.strip().splitlines()[-1]
    assert verdict.startswith("exercise nms: FAIL (") and " failed" in verdict, verdict
    restored = run("solution", "nms")
    assert restored.returncode == 0
    assert (repo / "evaluate.py").read_text() == original
    backups = list((repo / ".exercise").glob("evaluate.attempt-*.py"))
    assert len(backups) == 1 and backups[0].read_text().endswith("# my attempt\n")
    assert str(backups[0].relative_to(repo)) in restored.stdout
    passed = run("check", "nms")
    assert passed.returncode == 0 and passed.stdout.strip().splitlines()[-1].startswith(
        "exercise nms: PASS (")


@pytest.mark.parametrize("argv, problem", [(["start", "foo"], "unknown exercise 'foo'"),
                                           (["check"], "check needs an exercise name"),
                                           (["begin", "nms"], "unknown command 'begin'")])
def test_exercise_command_names_what_is_wrong(argv, problem):
    done = subprocess.run([sys.executable, "tests/exercise.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"error: {problem}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_exercise_help_prints_the_usage_and_exits_0(flag):
    done = subprocess.run([sys.executable, "tests/exercise.py", flag], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert "python tests/exercise.py list" in done.stdout and all(n in done.stdout for n in EXERCISES)
