"""Build-on-first-use C kernels for the CPU path, loaded with ctypes.

A kernel module hands its C source, compiler flags and the CPU features it needs to ``build``;
the shared library is compiled with the system C compiler into ``~/.cache/pdserve/native/`` (once
per source and flags: a hash names the file; ~1 s) and loaded. OpenMP threads come from the
libgomp torch has already loaded (same soname), so the kernels share torch's thread pool.

Without the CPU features or a compiler, or if the build fails, ``build`` returns None and logs
why once: callers keep a torch path that computes the same thing.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

log = logging.getLogger(__name__)

AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
AVX512_CPU = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_built: dict[str, ctypes.CDLL | None] = {}


def build(name: str, source: str, flags: list[str], cpu_features: tuple[str, ...],
          declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The compiled library ``name`` (``declare`` sets its argtypes), or None when it cannot run here."""
    if name not in _built:
        try:
            lib = _compile(name, source, flags, cpu_features)
            declare(lib)
            _built[name] = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native CPU kernels %s unavailable (%s); using the torch path", name, e)
            _built[name] = None
    return _built[name]


def _compile(name: str, source: str, flags: list[str], cpu_features: tuple[str, ...]) -> ctypes.CDLL:
    missing = [f for f in cpu_features if f not in cpu_flags()]
    if missing:
        raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    args = ["-O3", "-fopenmp", "-shared", "-fPIC", *flags]
    key = hashlib.sha256("\0".join([source, *args]).encode()).hexdigest()[:16]
    folder = os.path.join(os.path.expanduser("~"), ".cache", "pdserve", "native")
    path = os.path.join(folder, f"{name}_{key}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # build aside, then rename: racing builds are fine
            src, out = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            done = subprocess.run([cc, *args, src, "-o", out], capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:300]}")
            os.replace(out, path)
    return ctypes.CDLL(path)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
