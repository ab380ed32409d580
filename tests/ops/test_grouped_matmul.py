"""Grouped expert matmul: reference vs a numpy oracle, the C++ kernel (cpu) vs the reference, in
PYNATIVE and inside jit. Tolerance: 1e-5 relative to max(1, |expected|) (float32 sums in another order).
"""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms

from mindport import dispatch
import mindport.ops.grouped_matmul as gm
from mindport.ops.grouped_matmul import cpu as cpu_backend

OP = "grouped_matmul"

# (N, K, F, group sizes): sum(sizes) < N leaves dropped rows at the end
CASES = {
    "mixed_with_empty_experts": (37, 20, 19, [5, 0, 20, 12]),
    "all_rows_in_one_expert": (24, 16, 33, [0, 0, 24, 0]),
    "capacity_drops": (40, 18, 17, [6, 6, 0, 6, 6]),
    "every_row_dropped": (9, 8, 8, [0, 0, 0]),
}

requires_cpu = pytest.mark.skipif(not cpu_backend.available(), reason="C++ kernels could not be built here")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("MINDPORT_BACKEND", raising=False)


def make_inputs(case: str, seed: int = 0):
    n, k, f, sizes = CASES[case]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((len(sizes), f, k)).astype(np.float32),
            np.array(sizes, np.int32), rng.standard_normal((n, f)).astype(np.float32))


def np_grouped_matmul(x, w, sizes, cot):
    """y, and the gradients of sum(y * cot) wrt x and w."""
    y, dx, dw = np.zeros((x.shape[0], w.shape[1]), np.float64), np.zeros(x.shape), np.zeros(w.shape)
    start = 0
    for e, size in enumerate(sizes):
        rows = slice(start, start + size)
        y[rows] = x[rows] @ w[e].T
        dx[rows] = cot[rows] @ w[e]
        dw[e] = cot[rows].T @ x[rows]
        start += size
    return y, dx, dw


def run(fn, x, w, sizes, cot, jit=False):
    def loss(x, w, s):
        return (fn(x, w, s) * ms.Tensor(cot)).sum()

    forward, grad = fn, ms.grad(loss, (0, 1))
    if jit:
        forward, grad = ms.jit(forward), ms.jit(grad)
    args = ms.Tensor(x), ms.Tensor(w), ms.Tensor(sizes)
    dx, dw = grad(*args)
    return forward(*args).asnumpy(), dx.asnumpy(), dw.asnumpy()


def assert_close(actual, expected, what, tol=1e-5):
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
    assert actual.shape == expected.shape and err <= tol * scale, f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_numpy_oracle(case):
    x, w, sizes, cot = make_inputs(case)
    for got, want, what in zip(run(dispatch.get(OP, "reference"), x, w, sizes, cot), np_grouped_matmul(x, w, sizes, cot),
                               ("y", "dx", "dw")):
        assert_close(got, want, f"{case} {what}")


@requires_cpu
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
def test_cpu_matches_reference(case, jit):
    x, w, sizes, cot = make_inputs(case, seed=1)
    want = run(dispatch.get(OP, "reference"), x, w, sizes, cot, jit)
    got = run(dispatch.get(OP, "cpu"), x, w, sizes, cot, jit)
    for g, r, what in zip(got, want, ("y", "dx", "dw")):
        assert_close(g, r, f"{case} {what}")
    n_kept = int(sizes.sum())
    assert not got[0][n_kept:].any() and not got[1][n_kept:].any(), "rows past the groups stay zero"
    for e in np.flatnonzero(sizes == 0):
        assert not got[2][e].any(), f"empty expert {e} has a zero weight gradient"


# (N, K, F, group sizes) against the kernels' edges: groups of 1, 3, 5, 7 rows (the dot products
# while decoding) and 17, 19 (a partial 12- or 6-row tile); K and F not multiples of 16, 300-600
# (more than one packed K block); sizes summing past N (cut at N).
EDGE_CASES = [(1, 17, 5, [1]), (3, 33, 47, [0, 3]), (17, 31, 18, [17]), (16, 64, 40, [1, 0, 3, 5, 7]),
              (40, 600, 70, [1, 3, 17, 19]), (20, 24, 300, [9, 11]), (300, 20, 24, [300]), (50, 300, 45, [7, 30, 40])]


@pytest.fixture(params=cpu_backend.ISAS)
def isa(request):
    """Each instruction set of the C++ kernels this processor has, forced for the test."""
    if not cpu_backend.force_isa(request.param):
        pytest.skip(f"this processor lacks {request.param}")
    yield request.param
    cpu_backend.force_isa(None)


@requires_cpu
def test_cpu_kernels_of_every_isa_match_numpy(isa):
    rng = np.random.default_rng(2)
    cases = [CASES[name][:3] + (CASES[name][3],) for name in sorted(CASES)] + EDGE_CASES
    for n, k, f, sizes in cases:
        x, w = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((len(sizes), f, k)).astype(np.float32)
        cot = rng.standard_normal((n, f)).astype(np.float32)
        kept = np.diff(np.minimum(np.cumsum([0] + sizes), n))
        got = run(dispatch.get(OP, "cpu"), x, w, np.array(sizes, np.int32), cot)
        for g, r, what in zip(got, np_grouped_matmul(x, w, kept, cot), ("y", "dx", "dw")):
            assert_close(g, r, f"{isa} {n}x{k}->{f} {sizes} {what}")


@requires_cpu
def test_force_isa_names_the_unknown_isa():
    with pytest.raises(ValueError, match="isa 'avx1024': expected one of generic, avx2, avx512"):
        cpu_backend.force_isa("avx1024")


@requires_cpu
def test_cpu_forward_reads_only_the_visited_experts(isa):
    """Decoding: 3 rows over 16 experts; NaN weights in the 13 others must not reach y."""
    rng = np.random.default_rng(3)
    sizes = np.zeros(16, np.int32)
    sizes[[2, 9, 15]] = 1
    x, w = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal((16, 24, 40)).astype(np.float32)
    w[sizes == 0] = np.nan
    y = dispatch.get(OP, "cpu")(ms.Tensor(x), ms.Tensor(w), ms.Tensor(sizes)).asnumpy()
    assert_close(y, np.stack([x[i] @ w[e].T for i, e in enumerate([2, 9, 15])]), "y")


@requires_cpu
def test_public_wrapper_follows_the_forced_backend(monkeypatch):
    x, w, sizes, _ = make_inputs("mixed_with_empty_experts")
    assert dispatch.choose(OP) == "cpu"
    monkeypatch.setenv("MINDPORT_BACKEND", "reference")
    assert dispatch.choose(OP) == "reference"
    y = ms.jit(gm.grouped_matmul)(ms.Tensor(x), ms.Tensor(w), ms.Tensor(sizes)).asnumpy()
    assert_close(y, np_grouped_matmul(x, w, sizes, np.zeros((x.shape[0], w.shape[1])))[0], "y")
