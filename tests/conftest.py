"""Test-session hooks: the thread count, the seeds of the fitting tests, the exercise stubs.

ASFF_TEST_THREADS=<n>: every test starts on n torch threads (torch.set_num_threads; the count
is put back after it). No test may depend on the count, so the suite must pass with 1 and 2:
    ASFF_TEST_THREADS=1 python -m pytest tests
    ASFF_TEST_THREADS=2 python -m pytest tests
Tests that need a count set it themselves (the golden fixtures' count, train.py's --threads 1).
Without the variable the count is torch's default.

ASFF_TEST_SEEDS=<s1,s2,...>: tests that take a `seed` argument (the fitting tests of
test_loss.py) run once per seed; default 0. To try others:
    ASFF_TEST_SEEDS=0,1,2,3 python -m pytest tests/test_loss.py -k "minimal or learns"

The suite runs on the CPU, on any machine: CUDA_VISIBLE_DEVICES is emptied for it and for the
processes it starts, since train.py and evaluate.py take a GPU when they see one and the exact
resume checks and 2-rank gloo runs assume the CPU. ASFF_TEST_CUDA=1 leaves the GPUs visible.

ASFF_EXERCISE_STUB=<exercise>:<raise|zeros> (for the coursework exercises, tests/exercise.py
and tests/test_exercises.py): the exercise's function is replaced before any test module
imports it: `raise` by a stub that raises NotImplementedError, `zeros` by one that returns zeros
shaped like the real result. test_exercises.py runs each exercise's grading tests that way and
asserts that they fail. Without the variable nothing is replaced.
"""

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

if not os.environ.get("ASFF_TEST_CUDA"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""         # before anything asks torch for a GPU


@pytest.fixture(autouse=True)
def torch_thread_count():
    """ASFF_TEST_THREADS torch threads for each test (see the module docstring)."""
    threads = os.environ.get("ASFF_TEST_THREADS")
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    yield
    torch.set_num_threads(before)


def pytest_generate_tests(metafunc):
    """A test with a `seed` argument runs once per seed of ASFF_TEST_SEEDS (default 0)."""
    if "seed" in metafunc.fixturenames:
        seeds = os.environ.get("ASFF_TEST_SEEDS", "0")
        metafunc.parametrize("seed", [int(s) for s in seeds.split(",")])


def zeros_like(value):
    """A value of the same type and shape with every number set to zero (images black)."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, np.ndarray):
        return np.zeros_like(value)
    if isinstance(value, Image.Image):
        return Image.new(value.mode, value.size)
    if isinstance(value, dict):
        return {k: zeros_like(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):              # NamedTuple
        return type(value)(*(zeros_like(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(zeros_like(v) for v in value)
    if isinstance(value, (int, float)):
        return type(value)(0)
    return value


def stub(original, kind: str, name: str):
    def raising(*args, **kwargs):
        raise NotImplementedError(f"exercise {name}: stub")

    def zeroing(*args, **kwargs):
        return zeros_like(original(*args, **kwargs))

    return {"raise": raising, "zeros": zeroing}[kind]


def pytest_configure(config):
    spec = os.environ.get("ASFF_EXERCISE_STUB")
    if not spec:
        return
    from exercise import EXERCISES
    name, kind = spec.split(":")
    file, qualname = EXERCISES[name][:2]
    owner = importlib.import_module(file.removesuffix(".py"))
    *path, attr = qualname.split(".")
    for part in path:                                   # a method: patch it on its class
        owner = getattr(owner, part)
    setattr(owner, attr, stub(getattr(owner, attr), kind, name))
