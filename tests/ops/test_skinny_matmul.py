"""Skinny matmul (every Linear's x W^T): the C++ kernel (cpu) vs a numpy oracle, forward and gradients,
in PYNATIVE and inside jit; inputs the backend does not give it run MatMul exactly. Tolerance: 1e-5
relative to max(1, |expected|) (float32 sums in another order).
"""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms

from mindport import dispatch
from mindport.ops._aot import require
from mindport.ops.skinny_matmul import SKINNY_MATMUL, skinny_matmul
from mindport.ops.skinny_matmul import cpu as cpu_backend
from mindport.ops.skinny_matmul.cpu import FASTER_ROWS, MAX_ROWS

requires_cpu = pytest.mark.skipif(not cpu_backend.available(), reason="C++ kernels could not be built here")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("MINDPORT_BACKEND", raising=False)


def run(fn, x, w, cot, jit=False):
    """y = fn(x, w) and the gradients of sum(y * cot) wrt x and w."""
    def loss(x, w):
        return (fn(x, w) * ms.Tensor(cot)).sum()

    forward, grad = fn, ms.grad(loss, (0, 1))
    if jit:
        forward, grad = ms.jit(forward), ms.jit(grad)
    dx, dw = grad(ms.Tensor(x), ms.Tensor(w))
    return forward(ms.Tensor(x), ms.Tensor(w)).asnumpy(), dx.asnumpy(), dw.asnumpy()


def assert_close(actual, expected, what, tol=1e-5):
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
    assert actual.shape == expected.shape and err <= tol * scale, f"{what}: max abs error {err:.3g}"


@requires_cpu
@pytest.mark.parametrize("m, k, n", [(1, 37, 29), (3, 64, 33), (1, 200, 1029), (MAX_ROWS, 512, 1025)],
                         ids=["one_row_tails", "odd_rows", "one_row_threaded_tails", "max_rows_threaded"])
@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
def test_cpu_matches_numpy_oracle(m, k, n, jit):
    """The kernel itself (the backend hands it only FASTER_ROWS rows): K not a multiple of the vector
    width, N not a multiple of the rows streamed together (the loop's tail), and products large enough
    to be split over the kept threads (at M = 1 too, with a tail in the last chunk)."""
    rng = np.random.default_rng(m)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    cot = rng.standard_normal((m, n)).astype(np.float32)
    x64, w64, cot64 = x.astype(np.float64), w.astype(np.float64), cot.astype(np.float64)
    require(cpu_backend.__name__, SKINNY_MATMUL)
    got = run(cpu_backend.KERNELS["forward"], x, w, cot, jit)
    for g, want, what in zip(got, (x64 @ w64.T, cot64 @ w64, cot64.T @ x64), ("y", "dx", "dw")):
        assert_close(g, want, f"{what} (M={m})")


@requires_cpu
@pytest.mark.parametrize("m, dtype", [(FASTER_ROWS + 1, np.float32), (1, np.float16)], ids=["more_rows", "float16"])
def test_inputs_the_kernel_is_not_given_run_matmul(m, dtype):
    rng = np.random.default_rng(0)
    x, w = ms.Tensor(rng.standard_normal((m, 24)).astype(dtype)), ms.Tensor(rng.standard_normal((40, 24)).astype(dtype))
    assert dispatch.choose(SKINNY_MATMUL) == "cpu"
    got = ms.jit(skinny_matmul)(x, w).asnumpy()
    assert got.dtype == dtype and np.array_equal(got, dispatch.get(SKINNY_MATMUL, "reference")(x, w).asnumpy())
