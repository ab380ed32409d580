"""Benchmark the MoE routing operators: compiled C++ (cpu backend) vs the composite reference.

Default shape: XVERSE-MoE-A4.2B's router (T=8192 tokens, H=2560, E=64 experts, top-6, renormalised
top-k weights with eps 1e-6), float32 hidden states, PYNATIVE mode.

Measured in one run: the gating+permute op and the unpermute+combine op, forward and
forward+backward, for both backends (warm-up, then best of N); the machine's memory bandwidth
(a large numpy copy on one and on all cores, best of a few); and the bytes each op must move at least, giving a lower
bound on its time. Prints ``name: value`` lines, the headline last. The machine may be shared
with other work: best-of-N timing and a bandwidth probe at start and end limit the noise.

    python bench/bench_moe_routing.py                 # full shape, ~1-2 minutes on 2 cores
    python bench/bench_moe_routing.py --tokens 1024   # quick run
    python bench/bench_moe_routing.py --jit --tokens 1024 --hidden 512 --experts 8 --top-k 2
        # one layer of issue 18's Mixtral training shape, each op compiled as in the training step
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _timing import best_time


def memory_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Bytes per second of a large numpy copy, counting the read and the write.

    Best of a single-threaded copy and a copy split over every core (numpy releases the GIL),
    so the bound is not loosened by a single core's limit when the kernels use all cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    workers = os.cpu_count() or 1
    bounds = np.linspace(0, src.size, workers + 1).astype(int)
    best = float("inf")
    with ThreadPoolExecutor(workers) as pool:
        for threads in (1, workers):
            for _ in range(repeats + 1):  # the first pass also faults the pages in
                t0 = time.perf_counter()
                if threads == 1:
                    np.copyto(dst, src)
                else:
                    list(pool.map(lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]]),
                                  range(workers)))
                best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--capacity", type=int, default=0, help="0 = dropless")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the reference (best is kept)")
    ap.add_argument("--fused-repeats", type=int, default=10, help="timed runs of the fused op (best is kept)")
    ap.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth-probe copy")
    ap.add_argument("--jit", action="store_true", help="time each op compiled (ms.jit), as in a training step")
    args = ap.parse_args()

    import mindspore as ms
    from mindspore import ops

    from mindport import dispatch
    import mindport.ops.moe_routing  # noqa: F401  (registers the backends)
    from mindport.ops.moe_routing import cpu as cpu_backend

    ms.runtime.launch_blocking()  # each PYNATIVE op returns when done, so wall time is op time
    if not cpu_backend.available():
        raise SystemExit("the C++ kernels could not be built; nothing to compare")

    t, h, e, k, cap = args.tokens, args.hidden, args.experts, args.top_k, args.capacity
    n = t * k
    npdt = np.float32 if args.dtype == "float32" else np.float16
    size = np.dtype(npdt).itemsize
    rng = np.random.default_rng(0)
    logits = ms.Tensor(rng.standard_normal((t, e)).astype(np.float32))
    hidden = ms.Tensor(rng.standard_normal((t, h)).astype(npdt))
    cot_w = ms.Tensor(rng.standard_normal((t, k)).astype(np.float32))
    cot_p = ms.Tensor(rng.standard_normal((n, h)).astype(npdt))
    cot_o = ms.Tensor(rng.standard_normal((t, h)).astype(npdt))

    mode = "jit" if args.jit else "PYNATIVE"
    print(f"shape: T={t} H={h} E={e} top_k={k} capacity={cap} dtype={args.dtype} mode={mode}")
    print(f"threads: {os.cpu_count()} cores, MINDPORT_OP_THREADS={os.environ.get('MINDPORT_OP_THREADS', 'all')}")
    print(f"load_average_1min_at_start: {os.getloadavg()[0]:.2f}")

    bw_start = memory_bandwidth(args.copy_mb << 20)

    # minimum traffic: gating+permute reads hidden once and writes permuted; combine reads the
    # expert rows and writes the output; each backward moves the same kind of rows the other way
    # (combine's backward reads grad_out and expert_out and writes grad_expert_out).
    bytes_gp_fwd = (t * h + n * h) * size
    bytes_gp_fb = bytes_gp_fwd + (n * h + t * h) * size
    bytes_c_fwd = (n * h + t * h) * size
    bytes_c_fb = bytes_c_fwd + (t * h + 2 * n * h) * size

    def compiled(fn):
        return ms.jit(fn) if args.jit else fn

    def timed(fn, *inputs):
        def run():
            fn(*inputs)
            ms.runtime.synchronize()  # a compiled graph may return before its kernels finish
        return run

    def ops_of(backend: str):
        """(gating+permute forward, its gradient, combine forward, its gradient) of one backend."""
        gp = dispatch.get("moe_gating_permute", backend=backend)
        comb = dispatch.get("moe_unpermute_combine", backend=backend)

        def gp_fwd(lg, hd):
            return gp(lg, hd, k, True, 1e-6, cap)

        def gp_out(lg, hd):
            wts, _, p, _, _ = gp(lg, hd, k, True, 1e-6, cap)
            return wts, p

        def c_fwd(eo, slots, wts):
            return comb(eo, slots, wts)

        return (compiled(gp_fwd), compiled(ms.grad(gp_out, grad_position=(0, 1), sens_param=True)),
                compiled(c_fwd), compiled(ms.grad(c_fwd, grad_position=(0, 2), sens_param=True)))

    results = {}
    for backend in ("reference", "cpu"):
        repeats = args.repeats if backend == "reference" else args.fused_repeats
        gp_fwd, gp_grad, c_fwd, c_grad = ops_of(backend)
        w, _, perm, slot_rows, _ = gp_fwd(logits, hidden)
        expert_out = perm  # the experts' outputs have the permuted rows' shape and dtype
        results[backend] = {
            "gating_permute_forward": best_time(timed(gp_fwd, logits, hidden), repeats),
            "gating_permute_fwd_bwd": best_time(timed(gp_grad, logits, hidden, (cot_w, cot_p)), repeats),
            "combine_forward": best_time(timed(c_fwd, expert_out, slot_rows, w), repeats),
            "combine_fwd_bwd": best_time(timed(c_grad, expert_out, slot_rows, w, cot_o), repeats),
        }
        del w, perm, slot_rows, expert_out

    # the machine may be shared: probe the bandwidth again and keep the best (a stricter bound)
    bw_end = memory_bandwidth(args.copy_mb << 20)
    bw = max(bw_start, bw_end)
    print(f"memory_bandwidth_GBps: {bw / 1e9:.2f} (start {bw_start / 1e9:.2f}, end {bw_end / 1e9:.2f})")
    for backend, res in results.items():
        for name, sec in res.items():
            print(f"{backend}_{name}_ms: {sec * 1e3:.1f}")
    bounds = {
        "gating_permute_forward": bytes_gp_fwd / bw,
        "gating_permute_fwd_bwd": bytes_gp_fb / bw,
        "combine_forward": bytes_c_fwd / bw,
        "combine_fwd_bwd": bytes_c_fb / bw,
    }
    for name, sec in bounds.items():
        print(f"bandwidth_bound_{name}_ms: {sec * 1e3:.1f}")
    for name in bounds:
        print(f"fused_{name}_vs_bound: {results['cpu'][name] / bounds[name]:.2f}")
    for name in bounds:
        print(f"speedup_{name}: {results['reference'][name] / results['cpu'][name]:.2f}")
    ref, fused = results["reference"], results["cpu"]
    fb = (ref["gating_permute_fwd_bwd"] + ref["combine_fwd_bwd"]) / (
        fused["gating_permute_fwd_bwd"] + fused["combine_fwd_bwd"])
    fwd = (ref["gating_permute_forward"] + ref["combine_forward"]) / (
        fused["gating_permute_forward"] + fused["combine_forward"])
    print(f"fused_vs_reference_fwd_bwd_speedup: {fb:.2f}")
    print(f"fused_vs_reference_forward_speedup: {fwd:.2f}")


if __name__ == "__main__":
    main()
