"""Ring-attention block operator and LSE merge: C++ (cpu) vs the composite reference, forward and
backward, causal and full blocks, GQA/MQA/MHA; the reference vs float64 numpy; the ring identity
(blocks merged by LSE == one block over all keys, gradient shares summed == full gradient).

Tolerance: 1e-6, absolute, scaled by max(1, max |expected|).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import mindspore as ms

from mindport import dispatch
import mindport.ops.ring_attention as ra
from mindport.ops._aot import CustomKernels
from mindport.ops.ring_attention import cpu as cpu_backend

BLOCK, GRAD, MERGE, MERGE_GRAD = ra.BLOCK, ra.BLOCK_GRAD, ra.MERGE, ra.MERGE_GRAD
SCALE = 0.3

# (B, N, Nkv, Sq, Sk, D, causal): tile edges (32 query rows, 64 key rows) fall inside most shapes
CASES = {
    "causal_gqa": (2, 4, 2, 48, 48, 16, True),
    "causal_prefix_gqa": (2, 4, 2, 40, 100, 16, True),  # Sq < Sk: bottom-right aligned diagonal
    "causal_mqa": (1, 4, 1, 64, 64, 8, True),
    "full_gqa": (2, 4, 2, 40, 70, 16, False),
    "full_mha_odd": (1, 3, 3, 33, 17, 12, False),
    "causal_gqa_threaded": (1, 4, 2, 256, 256, 32, True),  # large enough for the kernels' threads
}


def assert_close(actual, expected, what="", tol=1e-6):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.0e} * {scale:.3g}"


def make(case, seed=0):
    b, n, nkv, sq, sk, d, causal = CASES[case]
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(q=f(b, n, sq, d), k=f(b, nkv, sk, d), v=f(b, nkv, sk, d), dout=f(b, n, sq, d), dlse=f(b, n, sq),
                causal=causal)


def t(x):
    return ms.Tensor(x)


def numpy_block(q, k, v, scale, causal):
    """float64 oracle: out, lse."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, 1), np.repeat(v, g, 1)
    s = np.einsum("bnid,bnjd->bnij", q, k) * scale
    sq, sk = s.shape[-2:]
    if causal:
        s = np.where(np.arange(sk)[None] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    m = s.max(-1, keepdims=True)
    lse = m + np.log(np.exp(s - m).sum(-1, keepdims=True))
    return np.exp(s - lse) @ v, lse[..., 0]


def run_block(backend, d):
    """Forward, explicit backward (given dout/dlse) and autodiff gradients of one backend."""
    fwd, grad = dispatch.get(BLOCK, backend), dispatch.get(GRAD, backend)
    q, k, v, dout, dlse = (t(d[x]) for x in ("q", "k", "v", "dout", "dlse"))
    causal = d["causal"]
    out, lse = fwd(q, k, v, SCALE, causal)
    explicit = grad(q, k, v, out, lse, dout, dlse, SCALE, causal)

    def loss(q_, k_, v_):
        o, l = fwd(q_, k_, v_, SCALE, causal)
        return (o * dout).sum() + (l * dlse).sum()

    auto = ms.grad(loss, (0, 1, 2))(q, k, v)
    return [x.asnumpy() for x in (out, lse, *explicit, *auto)]


NAMES = ["out", "lse", "dq", "dk", "dv", "autodiff dq", "autodiff dk", "autodiff dv"]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    if not cpu_backend.available():
        pytest.skip(f"C++ kernels unavailable: {cpu_backend.KERNELS.library.error}")


@pytest.mark.parametrize("case", CASES)
def test_block_cpu_equals_reference(case):
    d = make(case)
    ref, cpu = run_block("reference", d), run_block("cpu", d)
    for name, a, b in zip(NAMES, cpu, ref):
        assert_close(a, b, f"{case} {name}")
    for i in range(3):  # the reference's explicit backward is its own autodiff
        assert_close(ref[2 + i], ref[5 + i], f"{case} reference explicit vs autodiff {NAMES[2 + i]}")


@pytest.mark.parametrize("case", ["causal_prefix_gqa", "full_mha_odd"])
def test_reference_equals_float64_numpy(case):
    d = make(case)
    out, lse = dispatch.get(BLOCK, "reference")(t(d["q"]), t(d["k"]), t(d["v"]), SCALE, d["causal"])
    want_out, want_lse = numpy_block(d["q"], d["k"], d["v"], SCALE, d["causal"])
    assert_close(out.asnumpy(), want_out, "out")
    assert_close(lse.asnumpy(), want_lse, "lse")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_blocks_merged_by_lse_equal_one_block(backend):
    """The ring's identity: full block over keys [0, a) merged with the causal block over the rest
    equals one causal block over all keys; gradient shares from the merged out/lse sum to the
    gradient of the single block."""
    fwd, grad, merge = dispatch.get(BLOCK, backend), dispatch.get(GRAD, backend), dispatch.get(MERGE, backend)
    rng = np.random.default_rng(3)
    b, n, nkv, s, d, a = 2, 4, 2, 32, 16, 40  # queries = the last 32 of 72 keys
    q = t(rng.standard_normal((b, n, s, d)).astype(np.float32))
    k = t(rng.standard_normal((b, nkv, a + s, d)).astype(np.float32))
    v = t(rng.standard_normal((b, nkv, a + s, d)).astype(np.float32))
    dout = t(rng.standard_normal((b, n, s, d)).astype(np.float32))
    zero = t(np.zeros((b, n, s), np.float32))
    whole_o, whole_l = fwd(q, k, v, SCALE, True)
    o1, l1 = fwd(q, k[:, :, :a], v[:, :, :a], SCALE, False)
    o2, l2 = fwd(q, k[:, :, a:], v[:, :, a:], SCALE, True)
    o, l = merge(o1, l1, o2, l2)
    assert_close(o.asnumpy(), whole_o.asnumpy(), "merged out")
    assert_close(l.asnumpy(), whole_l.asnumpy(), "merged lse")
    dq, dk, dv = grad(q, k, v, whole_o, whole_l, dout, zero, SCALE, True)
    gq1, gk1, gv1 = grad(q, k[:, :, :a], v[:, :, :a], o, l, dout, zero, SCALE, False)
    gq2, gk2, gv2 = grad(q, k[:, :, a:], v[:, :, a:], o, l, dout, zero, SCALE, True)
    assert_close((gq1 + gq2).asnumpy(), dq.asnumpy(), "dq shares")
    assert_close(np.concatenate([gk1.asnumpy(), gk2.asnumpy()], 2), dk.asnumpy(), "dk shares")
    assert_close(np.concatenate([gv1.asnumpy(), gv2.asnumpy()], 2), dv.asnumpy(), "dv shares")


def merge_inputs(seed=0):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 37)
    o1, o2 = (rng.standard_normal(shape + (16,)).astype(np.float32) for _ in range(2))
    l1 = (rng.standard_normal(shape) * 3).astype(np.float32)
    l2 = (rng.standard_normal(shape) * 3).astype(np.float32)
    l1[0, 0] += 500.0  # exp would overflow without the shift
    l2[0, 1] = -np.inf  # an empty block on one side
    l2[1, 2, :5] = l1[1, 2, :5]  # exact ties
    dout = rng.standard_normal(shape + (16,)).astype(np.float32)
    dlse = rng.standard_normal(shape).astype(np.float32)
    return o1, l1, o2, l2, dout, dlse


def run_merge(backend, args):
    merge, merge_grad = dispatch.get(MERGE, backend), dispatch.get(MERGE_GRAD, backend)
    o1, l1, o2, l2, dout, dlse = (t(x) for x in args)
    o, l = merge(o1, l1, o2, l2)
    explicit = merge_grad(o1, l1, o2, l2, dout, dlse)

    def loss(a, b, c, e):
        oo, ll = merge(a, b, c, e)
        return (oo * dout).sum() + (ll * dlse).sum()

    auto = ms.grad(loss, (0, 1, 2, 3))(o1, l1, o2, l2)
    return [x.asnumpy() for x in (o, l, *explicit, *auto)]


def test_merge_cpu_equals_reference_and_is_stable():
    args = merge_inputs()
    ref, cpu = run_merge("reference", args), run_merge("cpu", args)
    names = ["out", "lse", "dout1", "dlse1", "dout2", "dlse2", "auto dout1", "auto dlse1", "auto dout2", "auto dlse2"]
    for name, a, b in zip(names, cpu, ref):
        assert np.all(np.isfinite(a)), f"cpu {name} not finite"
        assert_close(a, b, name)
    for i in range(4):
        assert_close(ref[2 + i], ref[6 + i], f"reference explicit vs autodiff {names[2 + i]}")
    o1, l1, o2, l2 = (np.asarray(x, np.float64) for x in args[:4])
    lse = np.logaddexp(l1, l2)
    want = np.exp(l1 - lse)[..., None] * o1 + np.nan_to_num(np.exp(l2 - lse))[..., None] * o2
    assert_close(cpu[0], want, "out vs float64")
    assert_close(cpu[1], lse, "lse vs float64")


def test_cpu_backend_in_graph_mode_equals_pynative():
    d = make("causal_prefix_gqa")
    fwd = dispatch.get(BLOCK, "cpu")
    q, k, v, dout, dlse = (t(d[x]) for x in ("q", "k", "v", "dout", "dlse"))

    def loss(q_, k_, v_):
        o, l = fwd(q_, k_, v_, SCALE, True)
        return (o * dout).sum() + (l * dlse).sum()

    eager = ms.grad(loss, (0, 1, 2))(q, k, v)
    graph = ms.jit(ms.grad(loss, (0, 1, 2)))(q, k, v)
    for a, b in zip(graph, eager):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_float16_inputs_keep_their_dtype():
    d = make("causal_gqa")
    q, k, v = (t(d[x].astype(np.float16)) for x in ("q", "k", "v"))
    out, lse = ra.block_attention(q, k, v, SCALE, True)
    assert out.dtype == ms.float16 and lse.dtype == ms.float32
    want, _ = numpy_block(d["q"].astype(np.float16), d["k"].astype(np.float16), d["v"].astype(np.float16), SCALE, True)
    assert_close(out.asnumpy(), want, "fp16 out", tol=2e-3)


def test_causal_block_needs_no_more_queries_than_keys():
    d = make("full_mha_odd")  # Sq 33 > Sk 17
    with pytest.raises(ValueError, match="Sq <= Sk"):
        dispatch.get(BLOCK, "cpu")(t(d["q"]), t(d["k"]), t(d["v"]), SCALE, True)


def test_missing_compiler_falls_back_to_reference(monkeypatch, tmp_path):
    broken = CustomKernels("ring_attention_nocxx", cpu_backend.SOURCE, cpu_backend._make_prims,
                           compiler="no-such-compiler-mindport")
    monkeypatch.setenv("MINDPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_backend, "KERNELS", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.choose(BLOCK) == "reference"
        assert dispatch.choose(MERGE) == "reference"
    assert sum("falling back to the reference" in str(w.message) for w in caught) == 1
