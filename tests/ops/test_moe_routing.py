"""MoE routing operators: reference vs a numpy oracle, compiled C++ (cpu) vs reference, fallback.

Tolerances: integer outputs and permuted rows must be identical; float outputs and gradients agree
to 1e-6 (absolute, scaled by max(1, |expected|)); float16 results to one float16 rounding step.
"""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest

import mindspore as ms

from mindport import dispatch
from mindport.ops._aot import CXX, CustomKernels
import mindport.ops.moe_routing as mr
from mindport.ops.moe_routing import cpu as cpu_backend

GP, UC = "moe_gating_permute", "moe_unpermute_combine"

# (T, E, H, k, norm_topk_prob, norm_eps, capacity, logits kind, hidden dtype)
CASES = {
    "random_norm_eps0": (16, 8, 32, 2, True, 0.0, 0, "normal", np.float32),
    "random_nonorm": (16, 8, 32, 2, False, 0.0, 0, "normal", np.float32),
    "random_norm_eps1e-6_capacity": (24, 6, 16, 3, True, 1e-6, 5, "normal", np.float32),
    "ties": (20, 6, 16, 3, True, 0.0, 0, "ties", np.float32),
    "ties_capacity_odd_hidden": (20, 6, 37, 3, False, 0.0, 4, "ties", np.float32),
    "k_equals_E": (12, 4, 20, 4, True, 1e-6, 0, "normal", np.float32),
    "fp16_capacity": (16, 8, 32, 2, True, 1e-6, 3, "normal", np.float16),
}


# ----------------------------------------------------------------------------- helpers
def make_inputs(case: str, seed: int = 0):
    t, e, h, k, norm, eps, cap, kind, hdt = CASES[case]
    rng = np.random.default_rng(seed)
    if kind == "ties":
        logits = rng.integers(-2, 3, size=(t, e)).astype(np.float32)  # many exact duplicates
        logits[0] = 0.0  # an all-equal row
        logits[1] = 1.5
    else:
        logits = rng.standard_normal((t, e)).astype(np.float32)
    hidden = rng.standard_normal((t, h)).astype(hdt)
    cot_w = rng.standard_normal((t, k)).astype(np.float32)
    cot_p = rng.standard_normal((t * k, h)).astype(np.float32)
    cot_o = rng.standard_normal((t, h)).astype(np.float32)
    expert_out = rng.standard_normal((t * k, h)).astype(hdt)
    return dict(logits=logits, hidden=hidden, k=k, norm=norm, eps=eps, cap=cap, cot_w=cot_w, cot_p=cot_p,
                cot_o=cot_o, expert_out=expert_out)


def assert_close(actual, expected, tol=1e-6, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    err = float(np.abs(actual - expected).max()) if expected.size else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_fp16_close(actual, expected, what=""):
    """Within one float16 rounding step (summation order may differ before the final rounding)."""
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    ulp = np.spacing(np.abs(b).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(a - b) <= ulp + 1e-7), f"{what}: {np.abs(a - b).max():.3g} exceeds one fp16 ulp"


def run_gating_permute(backend, d, jit=False):
    """Forward outputs and grads (logits, hidden) of sum(w*cot_w) + sum(permuted*cot_p)."""
    fn = dispatch.get(GP, backend=backend)
    k, norm, eps, cap = d["k"], d["norm"], d["eps"], d["cap"]
    cot_w, cot_p = ms.Tensor(d["cot_w"]), ms.Tensor(d["cot_p"])

    def forward(lg, hd):
        return fn(lg, hd, k, norm, eps, cap)

    def loss(lg, hd):
        w, _, p, _, _ = fn(lg, hd, k, norm, eps, cap)
        return (w * cot_w).sum() + (p.astype(ms.float32) * cot_p).sum()

    grad = ms.grad(loss, grad_position=(0, 1))
    if jit:
        forward, grad = ms.jit(forward), ms.jit(grad)
    lg, hd = ms.Tensor(d["logits"]), ms.Tensor(d["hidden"])
    outs = [o.asnumpy() for o in forward(lg, hd)]
    grads = [g.asnumpy() for g in grad(lg, hd)]
    return outs, grads


def run_combine(backend, expert_out, slot_rows, weights, cot_o):
    fn = dispatch.get(UC, backend=backend)
    cot = ms.Tensor(cot_o)

    def loss(eo, sr, w):
        return (fn(eo, sr, w).astype(ms.float32) * cot).sum()

    eo, sr, w = ms.Tensor(expert_out), ms.Tensor(slot_rows), ms.Tensor(weights)
    out = fn(eo, sr, w).asnumpy()
    g_eo, g_w = ms.grad(loss, grad_position=(0, 2))(eo, sr, w)
    return out, g_eo.asnumpy(), g_w.asnumpy()


# ----------------------------------------------------------------------------- numpy oracle
def np_softmax(x):
    x = x.astype(np.float64)
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_weights(logits, experts, norm, eps):
    p = np_softmax(logits)
    w = np.take_along_axis(p, experts, 1)
    return w / (w.sum(-1, keepdims=True) + eps) if norm else w


def np_gating_permute(logits, hidden, k, norm, eps, cap):
    t, e = logits.shape
    p = np_softmax(logits)
    experts = np.zeros((t, k), np.int64)
    for i in range(t):  # descending prob, ties to the lower expert index
        experts[i] = sorted(range(e), key=lambda j: (-p[i, j], j))[:k]
    weights = np_weights(logits, experts, norm, eps)
    n = t * k
    flat = experts.reshape(n)
    rank, seen = np.zeros(n, np.int64), np.zeros(e, np.int64)
    for s in range(n):
        rank[s] = seen[flat[s]]
        seen[flat[s]] += 1
    kept = rank < cap if cap > 0 else np.ones(n, bool)
    counts = np.array([int(np.sum(kept & (flat == x))) for x in range(e)])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot_rows = np.where(kept, offsets[flat] + rank, -1)
    permuted = np.zeros((n, hidden.shape[1]), hidden.dtype)
    for s in range(n):
        if slot_rows[s] >= 0:
            permuted[slot_rows[s]] = hidden[s // k]
    return weights, experts, permuted, slot_rows, counts


def np_combine(expert_out, slot_rows, weights):
    t, k = weights.shape
    out = np.zeros((t, expert_out.shape[1]), np.float64)
    for s in range(t * k):
        if slot_rows[s] >= 0:
            out[s // k] += weights[s // k, s % k] * expert_out[slot_rows[s]].astype(np.float64)
    return out


def np_grad_logits(logits, experts, norm, eps, cot_w, h=1e-6):
    """Central differences in float64 with the expert choice held fixed (tokens are independent)."""
    x = logits.astype(np.float64)
    g = np.zeros_like(x)
    for col in range(x.shape[1]):
        xp, xm = x.copy(), x.copy()
        xp[:, col] += h
        xm[:, col] -= h
        fp = (np_weights(xp, experts, norm, eps) * cot_w).sum(-1)
        fm = (np_weights(xm, experts, norm, eps) * cot_w).sum(-1)
        g[:, col] = (fp - fm) / (2 * h)
    return g


# ----------------------------------------------------------------------------- tests
@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("MINDPORT_BACKEND", raising=False)


requires_cpu = pytest.mark.skipif(not cpu_backend.available(), reason="C++ kernels could not be built here")


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_numpy_oracle(case):
    d = make_inputs(case)
    (w, ex, perm, sr, cnt), (g_lg, g_hd) = run_gating_permute("reference", d)
    nw, nex, nperm, nsr, ncnt = np_gating_permute(d["logits"], d["hidden"], d["k"], d["norm"], d["eps"], d["cap"])
    np.testing.assert_array_equal(ex, nex)
    np.testing.assert_array_equal(sr, nsr)
    np.testing.assert_array_equal(cnt, ncnt)
    np.testing.assert_array_equal(perm, nperm)
    assert ex.dtype == np.int32 and sr.dtype == np.int32 and cnt.dtype == np.int32 and w.dtype == np.float32
    assert perm.dtype == d["hidden"].dtype
    assert_close(w, nw, 1e-6, "weights")
    # gradients: hidden gets the sum of its kept slots' cotangent rows; logits match finite differences.
    # (A cotangent reaching a float16 tensor through a cast is first rounded to float16.)
    dt = d["hidden"].dtype
    cot_p = d["cot_p"].astype(dt).astype(np.float64)
    cot_o = d["cot_o"].astype(dt).astype(np.float64)
    n_ghd = np.zeros(d["hidden"].shape, np.float64)
    for s in range(len(nsr)):
        if nsr[s] >= 0:
            n_ghd[s // d["k"]] += cot_p[nsr[s]]
    if d["hidden"].dtype == np.float16:
        assert_fp16_close(g_hd, n_ghd, "grad hidden")
    else:
        assert_close(g_hd, n_ghd, 1e-6, "grad hidden")
    assert_close(g_lg, np_grad_logits(d["logits"], nex, d["norm"], d["eps"], d["cot_w"]), 1e-5, "grad logits")
    # combine
    out, g_eo, g_w = run_combine("reference", d["expert_out"], sr, w, d["cot_o"])
    n_out = np_combine(d["expert_out"], nsr, w)
    kept = (nsr >= 0).reshape(w.shape)
    rows = d["expert_out"].astype(np.float64)[np.maximum(nsr, 0)].reshape(*w.shape, -1)
    n_gw = np.where(kept, (rows * cot_o[:, None, :]).sum(-1), 0.0)
    n_geo = np.zeros(d["expert_out"].shape, np.float64)
    for s in range(len(nsr)):
        if nsr[s] >= 0:
            n_geo[nsr[s]] = w.reshape(-1)[s] * cot_o[s // d["k"]]
    assert out.dtype == d["expert_out"].dtype
    if out.dtype == np.float16:
        assert_fp16_close(out, n_out, "combine out")
        assert_fp16_close(g_eo, n_geo, "grad expert_out")
    else:
        assert_close(out, n_out, 1e-6, "combine out")
        assert_close(g_eo, n_geo, 1e-6, "grad expert_out")
    assert_close(g_w, n_gw, 1e-6, "grad weights")


@requires_cpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_matches_reference(case):
    d = make_inputs(case)
    (w, ex, perm, sr, cnt), (g_lg, g_hd) = run_gating_permute("reference", d)
    (cw, cex, cperm, csr, ccnt), (cg_lg, cg_hd) = run_gating_permute("cpu", d)
    np.testing.assert_array_equal(cex, ex)
    np.testing.assert_array_equal(csr, sr)
    np.testing.assert_array_equal(ccnt, cnt)
    np.testing.assert_array_equal(cperm, perm)
    for a, b in ((cex, ex), (csr, sr), (ccnt, cnt), (cw, w), (cperm, perm)):
        assert a.dtype == b.dtype
    assert_close(cw, w, 1e-6, "weights")
    assert_close(cg_lg, g_lg, 1e-6, "grad logits")
    if d["hidden"].dtype == np.float16:
        assert cg_hd.dtype == np.float16
        assert_fp16_close(cg_hd, g_hd, "grad hidden")
    else:
        assert_close(cg_hd, g_hd, 1e-6, "grad hidden")
    if d["cap"] > 0:
        assert np.all(ccnt <= d["cap"]) and (csr == -1).any(), "the capacity case must drop slots"
        assert ccnt.sum() == (csr >= 0).sum()
        assert not perm[ccnt.sum():].any(), "rows after the kept total are zero"
    out, g_eo, g_w = run_combine("reference", d["expert_out"], sr, w, d["cot_o"])
    c_out, cg_eo, cg_w = run_combine("cpu", d["expert_out"], sr, w, d["cot_o"])
    assert c_out.dtype == out.dtype and cg_eo.dtype == g_eo.dtype
    if out.dtype == np.float16:
        assert_fp16_close(c_out, out, "combine out")
        assert_fp16_close(cg_eo, g_eo, "grad expert_out")
    else:
        assert_close(c_out, out, 1e-6, "combine out")
        assert_close(cg_eo, g_eo, 1e-6, "grad expert_out")
    assert_close(cg_w, g_w, 1e-6, "grad weights")


@requires_cpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_combine_with_arbitrary_slot_rows(dtype):
    """slot_rows not made by moe_gating_permute (repeated rows, gaps) still match the reference."""
    rng = np.random.default_rng(7)
    t, k, h = 10, 3, 24
    slot_rows = rng.integers(-1, t * k, size=t * k).astype(np.int32)
    slot_rows[:4] = 5  # one row used four times
    weights = rng.standard_normal((t, k)).astype(np.float32)
    expert_out = rng.standard_normal((t * k, h)).astype(dtype)
    cot = rng.standard_normal((t, h)).astype(np.float32)
    ref = run_combine("reference", expert_out, slot_rows, weights, cot)
    got = run_combine("cpu", expert_out, slot_rows, weights, cot)
    for a, b, what in zip(got, ref, ("out", "grad expert_out", "grad weights")):
        if a.dtype == np.float16:
            assert_fp16_close(a, b, what)
        else:
            assert_close(a, b, 1e-6, what)
    bad = slot_rows.copy()
    bad[0] = t * k  # out of range: the kernel refuses instead of reading past the tensor
    with pytest.raises(RuntimeError):
        dispatch.get(UC, backend="cpu")(ms.Tensor(expert_out), ms.Tensor(bad), ms.Tensor(weights)).asnumpy()


@requires_cpu
def test_cpu_matches_reference_inside_jit():
    d = make_inputs("random_norm_eps1e-6_capacity", seed=3)
    ref_outs, ref_grads = run_gating_permute("reference", d)
    for backend in ("reference", "cpu"):
        outs, grads = run_gating_permute(backend, d, jit=True)
        for i in (1, 2, 3, 4):
            np.testing.assert_array_equal(outs[i], ref_outs[i])
        assert_close(outs[0], ref_outs[0], 1e-6, f"{backend} jit weights")
        for g, rg in zip(grads, ref_grads):
            assert_close(g, rg, 1e-6, f"{backend} jit grads")


@requires_cpu
def test_public_wrappers_dispatch_in_pynative_and_jit(monkeypatch):
    """The package-level functions pick the backend per call, and also while a jit graph compiles."""
    d = make_inputs("random_norm_eps0", seed=5)
    lg, hd = ms.Tensor(d["logits"]), ms.Tensor(d["hidden"])
    ramp = ms.Tensor(np.linspace(0.5, 1.5, 32, dtype=np.float32).reshape(32, 1))  # stands in for the experts
    cot = ms.Tensor(d["cot_o"])

    def make():
        def f(lg, hd):
            w, _, p, sr, _ = mr.moe_gating_permute(lg, hd, 2, True, 0.0, 0)
            return (mr.moe_unpermute_combine(p * ramp, sr, w) * cot).sum()

        return ms.jit(ms.value_and_grad(f, grad_position=(0, 1)))

    assert dispatch.choose(GP) == "cpu" and dispatch.choose(UC) == "cpu"
    out_cpu, (glg_cpu, ghd_cpu) = make()(lg, hd)
    monkeypatch.setenv("MINDPORT_BACKEND", "reference")
    assert dispatch.choose(GP) == "reference"
    out_ref, (glg_ref, ghd_ref) = make()(lg, hd)
    assert_close(out_cpu.asnumpy(), out_ref.asnumpy(), 1e-6, "out")
    assert_close(glg_cpu.asnumpy(), glg_ref.asnumpy(), 1e-6, "grad logits")
    assert_close(ghd_cpu.asnumpy(), ghd_ref.asnumpy(), 1e-6, "grad hidden")
    # and in PYNATIVE
    w, _, p, sr, _ = mr.moe_gating_permute(lg, hd, 2, True, 0.0, 0)
    assert_close(mr.moe_unpermute_combine(p, sr, w).asnumpy(), d["hidden"], 1e-6, "k copies recombined")


def test_build_into_fresh_cache(tmp_path, monkeypatch):
    if shutil.which(CXX) is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("MINDPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_backend, "KERNELS", CustomKernels("moe_routing", cpu_backend.SOURCE,
                                                              cpu_backend._make_prims))
    lib = cpu_backend.KERNELS.library.path()
    assert os.path.dirname(lib) == str(tmp_path) and not os.path.exists(lib)
    assert cpu_backend.available()
    assert os.path.exists(lib)
    assert os.listdir(tmp_path) == [os.path.basename(lib)], "no temporary files left behind"
    assert cpu_backend.KERNELS.prims_path == lib
    assert os.path.basename(cpu_backend.SOURCE) == "moe_routing.cc" and os.path.isfile(cpu_backend.SOURCE)
    d = make_inputs("random_nonorm")  # the freshly built library computes
    outs = dispatch.get(GP, backend="cpu")(ms.Tensor(d["logits"]), ms.Tensor(d["hidden"]), 2, False, 0.0, 0)
    np.testing.assert_array_equal(outs[3].asnumpy(), np_gating_permute(d["logits"], d["hidden"], 2, False, 0.0, 0)[3])


def test_no_compiler_falls_back_to_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPORT_CACHE", str(tmp_path))  # nothing prebuilt there
    monkeypatch.setattr(cpu_backend, "KERNELS", CustomKernels("moe_routing", cpu_backend.SOURCE, cpu_backend._make_prims,
                                                              compiler="mindport-no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend"):
        assert cpu_backend.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert cpu_backend.available() is False
        assert dispatch.choose(GP) == "reference" and dispatch.choose(UC) == "reference"
    assert dispatch.get(GP) is dispatch.get(GP, backend="reference")
    with pytest.raises(RuntimeError):
        dispatch.get(GP, backend="cpu")
    d = make_inputs("random_nonorm")
    outs = mr.moe_gating_permute(ms.Tensor(d["logits"]), ms.Tensor(d["hidden"]), 2, False, 0.0, 0)
    assert outs[2].shape == (32, 32)
