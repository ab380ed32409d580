"""FLOPs per trained token and the machine's matmul rate (the MFU denominator on CPU).

Per token, one training step (forward + backward = 3 x forward) costs

    6 * N_matmul  +  12 * L * (n_heads * head_dim) * S

N_matmul counts the weights that take part in matrix products (every weight except the
embedding table, which is a lookup; MoE: only the top-k experts a token visits, plus the
router). The second term is the attention scores and the weighted sum of values over all S
keys: the reference attention computes the full S x S product and masks it, so no causal
halving is applied (``causal=True`` halves it, as a flash-attention kernel that skips masked blocks
does on Ascend: the planner's count, :mod:`mindport.plan.cost`).
"""
from __future__ import annotations

import time


def matmul_params(config) -> int:
    n = config.num_parameters() - config.vocab_size * config.hidden_size  # minus the embedding lookup table
    if config.is_moe:
        idle = config.num_experts - config.moe_top_k
        n -= config.num_layers * idle * 3 * config.hidden_size * config.moe_intermediate_size
    return n


def train_flops_per_token(config, seq_length: int, causal: bool = False) -> float:
    attn = 12 * config.num_layers * config.num_heads * config.head_dim * seq_length
    return 6.0 * matmul_params(config) + (attn / 2 if causal else attn)


def measure_matmul_flops(n: int = 1024, seconds: float = 0.6) -> float:
    """MindSpore fp32 (n x n) @ (n x n) FLOP/s on this machine, compiled, best of a few runs."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, ops

    from mindport import dispatch

    dispatch.configure_runtime()  # measured under the runtime settings the model runs with
    a = Tensor(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = Tensor(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))

    @ms.jit
    def mm(x, y):
        return ops.matmul(x, y)

    mm(a, b).asnumpy()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        mm(a, b).asnumpy()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best
