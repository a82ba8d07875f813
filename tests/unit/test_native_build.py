"""``pdserve.native.build``: a library that cannot be built or cannot run here is None, never an
exception, so callers fall back to their torch path."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from pdserve import native


def test_a_compile_error_gives_none(caplog):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    assert native.build("broken_test_kernel", "this is not C;", [], (), lambda lib: None) is None
    assert "broken_test_kernel unavailable" in caplog.text
    assert native.build("broken_test_kernel", "int f(void) { return 1; }", [], (), lambda lib: None) is None  # cached


def test_a_missing_cpu_feature_gives_none():
    assert native.build("needs_flag_test", "int f(void) { return 1; }", [], ("no_such_cpu_flag",), lambda lib: None) is None


def test_a_small_library_builds_and_runs():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")

    def declare(lib):
        lib.twice.argtypes, lib.twice.restype = [ctypes.c_int], ctypes.c_int

    lib = native.build("twice_test_kernel", "int twice(int x) { return 2 * x; }", [], (), declare)
    assert lib is not None and lib.twice(21) == 42
