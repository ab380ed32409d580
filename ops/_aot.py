"""C++ operator libraries built on first use (one mechanism for every ``ops/<op>/cpu.py``).

The source is compiled into ``$MINDPORT_CACHE`` (default ``~/.cache/mindport/ops``) under a
name carrying a hash of the source and flags, through a temporary file renamed into place, so
concurrent processes never load a half-written library. A missing compiler or a failed build
warns once and makes :meth:`AotLibrary.available` False, so dispatch falls back to the
reference backend. :class:`CustomKernels` holds a library's ``ops.Custom`` primitives and
:func:`require` is the check a backend makes before it uses them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Callable

from mindspore.ops import constexpr

CXX = os.environ.get("MINDPORT_CXX", "g++")
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")  # headers shared by the operators
CXXFLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", f"-I{INCLUDE_DIR}"]


class AotLibrary:
    """A C++ source built on first use into a cached shared library (generic over name/source/flags).

    ``path()`` is where the library for the current source and flags lives; ``available()`` builds
    it once (thread-safe), warns once on failure and tells whether it exists.
    """

    def __init__(self, name: str, source: str, flags: list[str], compiler: str):
        self.name, self.source, self.flags, self.compiler = name, source, flags, compiler
        self.lock = threading.Lock()
        self.tried, self.lib, self.error = False, None, None

    @staticmethod
    def cache_dir() -> str:
        return os.environ.get("MINDPORT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mindport", "ops")

    def path(self) -> str:
        """Named by a hash of the source, the shared headers and the flags."""
        digest = hashlib.sha256(" ".join(self.flags).encode())
        for name in [self.source] + sorted(os.path.join(INCLUDE_DIR, h) for h in os.listdir(INCLUDE_DIR)):
            with open(name, "rb") as f:
                digest.update(f.read())
        digest = digest.hexdigest()[:16]
        return os.path.join(self.cache_dir(), f"{self.name}-{digest}.so")

    def build(self) -> str:
        target = self.path()
        if os.path.exists(target):
            return target
        compiler = shutil.which(self.compiler)
        if compiler is None:
            raise RuntimeError(f"C++ compiler {self.compiler!r} not found on PATH")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.name}-", suffix=".so.tmp", dir=os.path.dirname(target))
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *self.flags, "-o", tmp, self.source], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                raise RuntimeError(f"{self.compiler} failed: {lines[0] if lines else 'exit code %d' % proc.returncode}")
            os.replace(tmp, target)  # atomic: a concurrent build of the same source just replaces it
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def available(self) -> bool:
        if not self.tried:
            with self.lock:
                if not self.tried:
                    try:
                        self.lib = self.build()
                    except Exception as exc:  # noqa: BLE001 - any build problem means "use the reference"
                        self.lib, self.error = None, exc
                        warnings.warn(f"mindport.ops.{self.name}: C++ CPU kernels unavailable ({exc}); "
                                      "falling back to the reference backend", RuntimeWarning, stacklevel=3)
                    self.tried = True
        return self.lib is not None


class CustomKernels:
    """The ``ops.Custom`` primitives of one C++ library, by name (``kernels["block"]``).

    MindSpore cannot create a Custom primitive while it compiles a jit graph, so
    ``make_prims(library_path)`` runs at import, against the path the library will have, and the
    primitives are shared by every shape. :meth:`available` builds the library once and makes the
    primitives again if the build landed elsewhere (``$MINDPORT_CACHE`` changed since import); if
    they cannot be made it warns once and is False.
    """

    def __init__(self, name: str, source: str, make_prims: Callable[[str], dict], compiler: str = CXX):
        self.library = AotLibrary(name, source, CXXFLAGS, compiler)
        self.make_prims = make_prims
        self.prims: dict = {}
        self.prims_path: str | None = None
        self.failed = False
        try:
            self._make(self.library.path())
        except Exception:  # noqa: BLE001 - e.g. MS_CUSTOM_AOT_WHITE_LIST refuses the cache dir; available() retries
            pass

    def _make(self, path: str) -> None:
        self.prims, self.prims_path = self.make_prims(path), path

    def available(self) -> bool:
        if self.failed or not self.library.available():
            return False
        if self.prims_path != self.library.lib:
            try:
                self._make(self.library.lib)
            except Exception as exc:  # noqa: BLE001 - any failure means "use the reference"
                self.failed, self.library.error = True, exc
                warnings.warn(f"mindport.ops.{self.library.name}: C++ CPU kernels unavailable ({exc}); "
                              "falling back to the reference backend", RuntimeWarning, stacklevel=2)
                return False
        return True

    def __getitem__(self, name: str):
        return self.prims[name]


@constexpr(reuse_result=False)
def require(module: str, op_name: str) -> bool:
    """Build the ``KERNELS`` of backend ``module`` if needed and fail with a clear error if they are
    unavailable (plain Python: it runs in the interpreter, also while a jit graph is compiled)."""
    kernels = sys.modules[module].KERNELS
    if not kernels.available():
        raise RuntimeError(f"{op_name}: the {kernels.library.name} C++ kernels are not available: "
                           f"{kernels.library.error}")
    return True
