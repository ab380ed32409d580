"""The one place that picks an operator's backend.

Each operator name maps to up to three implementations with one signature:

- ``reference``: composite MindSpore ops; the ground truth, runs everywhere.
- ``cpu``: a compiled C++ kernel (``ops.Custom(func_type="aot")``), used on CPU when built.
- ``ascend``: CANN fused kernels. No Ascend NPU was reachable while building mindport,
  so every ``ascend`` backend is UNEXECUTED code: it is kept thin and only chosen when
  MindSpore's device target is Ascend.

Model code calls :func:`get` when a Cell is built, never a backend module directly.
``MINDPORT_BACKEND=reference`` (or ``cpu``/``ascend``) forces one backend for every op
that has it, which tests use to compare backends.
"""
from __future__ import annotations

import os
from typing import Callable

BACKENDS = ("reference", "cpu", "ascend")
_REGISTRY: dict[str, dict[str, Callable]] = {}
_AVAILABLE: dict[str, Callable[[], bool]] = {}


def register(op: str, backend: str, available: Callable[[], bool] | None = None):
    """Decorator: register ``fn`` as ``backend`` of ``op`` (``available`` tells if it can run here)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} for op {op!r}: expected one of {BACKENDS}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        if available is not None:
            _AVAILABLE[f"{op}:{backend}"] = available
        return fn

    return wrap


def device_target() -> str:
    import mindspore as ms

    return ms.get_context("device_target")


def check_dtype(dtype: str, what: str) -> None:
    """Fail in one line if this device cannot compute in ``dtype`` (``what`` names the setting):
    MindSpore's CPU kernels (MatMul, Gather) have no bfloat16."""
    if dtype == "bfloat16" and device_target() == "CPU":
        from mindport.config import ConfigError

        raise ConfigError(f"{what} = 'bfloat16': bf16 matmul does not exist on CPU: expected float32 or "
                          "float16 (bfloat16 runs on Ascend)")


def configure_runtime() -> None:
    """MindSpore runtime settings for this device (a user's own setting wins). MindSpore reads
    them when it runs its first graph, so :mod:`mindport.models.causal_lm` applies them on import
    (and :func:`mindport.train.flops.measure_matmul_flops` before it measures).

    On CPU, graphs run on the calling thread (``MS_DEV_HOST_BLOCKING_RUN=1``): by default
    MindSpore hands each graph to a pipeline thread and the caller spin-waits for it, which on
    a 2-core host takes a core from the kernels (bench/bench_train.py: a training step 3.0 s by
    default, 2.2-2.4 s with this)."""
    if device_target() == "CPU":
        os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")


def _usable(op: str, backend: str) -> bool:
    if backend not in _REGISTRY.get(op, {}):
        return False
    check = _AVAILABLE.get(f"{op}:{backend}")
    return check() if check else True


def choose(op: str, backend: str | None = None) -> str:
    """Name of the backend :func:`get` would return for ``op``."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown operator {op!r} (registered: {', '.join(sorted(_REGISTRY))})")
    wanted = backend or os.environ.get("MINDPORT_BACKEND")
    if wanted:
        if wanted not in BACKENDS:
            raise ValueError(f"MINDPORT_BACKEND={wanted!r}: expected one of {BACKENDS}")
        if _usable(op, wanted):
            return wanted
        if backend:  # asked for explicitly by the caller
            raise RuntimeError(f"operator {op!r} has no usable {wanted!r} backend on this machine")
    target = device_target()
    if target == "Ascend" and _usable(op, "ascend"):
        return "ascend"
    if target == "CPU" and _usable(op, "cpu"):
        return "cpu"
    return "reference"


def get(op: str, backend: str | None = None) -> Callable:
    """The implementation of ``op`` for this device (or the named ``backend``)."""
    return _REGISTRY[op][choose(op, backend)]
