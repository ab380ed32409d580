"""Benchmark the grouped expert matmul (ops/grouped_matmul): C++ kernel vs its FLOP bound.

Default shape: one expert projection of the issue #18 Mixtral step (batch 4 x 256 tokens, top-2:
N = 2048 routed rows, H 512 -> expert width 704, 8 experts). Each case times, compiled (ms.jit),
the forward (2 N K F FLOPs) and forward + backward (value and grad, so the forward is not pruned;
dX and dW: 6 N K F in all), best of N, for
the cpu and reference backends, and divides the FLOPs by MindSpore's own fp32 matmul rate
measured in the same run (1024^3 products): ``*_of_bound`` >= 1 would be the plain matmul's speed.
Group sizes: balanced, and skewed (half the rows in one expert, two experts empty).
Decoding: the forward of 1 and 8 rows spread over 2 and 16 experts, with the rate at which it reads
the visited experts' weights (the kernel must not read the others: equal times at 2 and 16 experts).

    python bench/bench_grouped_matmul.py [--rows 2048] [--k 512] [--f 704] [--experts 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from _timing import best_time

os.environ.setdefault("GLOG_v", "3")


def group_sizes(rows: int, experts: int, skewed: bool) -> np.ndarray:
    if not skewed:
        sizes = np.full(experts, rows // experts)
    else:
        sizes = np.zeros(experts, np.int64)
        sizes[0] = rows // 2
        sizes[3:] = (rows - rows // 2) // (experts - 3)
    sizes[-1] += rows - sizes.sum()
    return sizes.astype(np.int32)


def decode_sizes(rows: int, experts: int) -> np.ndarray:
    """Rows dealt one by one to the experts in turn (1 row: one expert visited)."""
    return np.bincount(np.arange(rows) % experts, minlength=experts).astype(np.int32)


def weighted_sum(fn, cot):
    def loss(x, w, sizes):
        return (fn(x, w, sizes) * cot).sum()

    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--f", type=int, default=704)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import mindspore as ms

    from mindport import dispatch
    from mindport.ops import grouped_matmul  # noqa: F401  (registers the backends)
    from mindport.train.flops import measure_matmul_flops

    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    rate = measure_matmul_flops(1024, seconds=2.0)
    print(f"mindspore_fp32_matmul_gflops: {rate / 1e9:.1f}")
    rng = np.random.default_rng(0)
    n, k, f, e = args.rows, args.k, args.f, args.experts
    x = ms.Tensor(rng.standard_normal((n, k)).astype(np.float32))
    w = ms.Tensor(rng.standard_normal((e, f, k)).astype(np.float32) * 0.05)
    cot = ms.Tensor(rng.standard_normal((n, f)).astype(np.float32))
    flops = 2.0 * n * k * f
    headline = None
    for skewed in (False, True):
        sizes = ms.Tensor(group_sizes(n, e, skewed))
        case = "skewed" if skewed else "balanced"
        for backend in ("cpu", "reference"):
            fn = dispatch.get("grouped_matmul", backend)
            forward, backward = ms.jit(fn), ms.jit(ms.value_and_grad(weighted_sum(fn, cot), (0, 1)))
            t_fwd = best_time(lambda: forward(x, w, sizes).asnumpy(), args.repeats)
            t_both = best_time(lambda: [g.asnumpy() for g in backward(x, w, sizes)[1]], args.repeats)
            print(f"{case}_{backend}_forward_ms: {t_fwd * 1e3:.2f}")
            print(f"{case}_{backend}_forward_backward_ms: {t_both * 1e3:.2f}")
            print(f"{case}_{backend}_forward_of_bound: {flops / t_fwd / rate:.3f}")
            print(f"{case}_{backend}_forward_backward_of_bound: {3 * flops / t_both / rate:.3f}")
            if backend == "cpu" and headline is None:
                headline = 3 * flops / t_both / rate
    forward = ms.jit(dispatch.get("grouped_matmul", "cpu"))
    for rows in (1, 8):
        for experts in (2, 16):
            sizes = decode_sizes(rows, experts)
            sizes_t = ms.Tensor(sizes)
            xd = ms.Tensor(rng.standard_normal((rows, k)).astype(np.float32))
            wd = ms.Tensor(rng.standard_normal((experts, f, k)).astype(np.float32))
            t = best_time(lambda: forward(xd, wd, sizes_t).asnumpy(), args.repeats * 4)
            visited_bytes = 4.0 * f * k * np.count_nonzero(sizes)
            print(f"decode_{rows}rows_{experts}experts_cpu_forward_us: {t * 1e6:.1f}")
            print(f"decode_{rows}rows_{experts}experts_cpu_visited_weight_gbps: {visited_bytes / t / 1e9:.1f}")
    print(f"balanced_cpu_forward_backward_of_bound: {headline:.3f}")


if __name__ == "__main__":
    main()
