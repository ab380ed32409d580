"""Benchmark context parallelism (ring attention) and its block operator on CPU.

Measured in one run (fp32, PYNATIVE, batch 1, the ``telechat2-demo`` preset with random weights:
4 layers, H 256, 8 query heads, 4 kv heads, head dim 32; ``--preset`` picks another):

1. Peak activation memory per rank at a fixed total sequence S, context_parallel 1, 2 and 4
   (cp > 1: real msrun processes, K/V travelling over the emulated point-to-point ring; cp 1: the
   same code, where the ring is one causal block of the same C++ kernel), for
   - one training step of the whole model (forward + backward + loss over the rank's zigzag
     share, all gradients), the figure context parallelism is for, and
   - the attention core alone (forward + backward of one layer's attention on random q/k/v),
     where the ring's per-step temporaries (block outputs, hop buffers) weigh most.
   Peak = the resident high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the
   resident size before the step, in a fresh process per configuration after a warm-up at a tiny
   size: inputs and parameters excluded; saved activations, input gradients, K/V blocks in flight
   and every temporary counted. MindSpore's CPU memory pool keeps the blocks it frees (nothing
   returns them), so the attention core is measured first and the model step after it: the model
   figure leaves out the parameter gradients (allocated by its warm-up, then reused) and may reuse
   up to the attention core's peak (a few % of it).
   Also measured: the all-gather algorithm (holds the full-sequence K/V by design) and the model
   without context parallelism as it runs today (composite attention: S x S scores).
2. Wall time (slowest rank, best of a few steps) of the ring over the single process computing the
   same thing with the same kernel. The machine has 2 cores: each rank gets max(1, 2 // cp) kernel
   threads (cp 4 oversubscribes the cores) and a ring hop on CPU is two AllReduce calls over TCP,
   so this bounds the emulated ring's overhead; it is not a device figure.
3. The C++ block kernel (cpu backend) against the composite reference backend (forward, explicit
   backward; causal block) and against the model's fp32 composite attention core
   (``mindport.transformer.kernels.attention_reference``, forward + autodiff backward).

Prints ``name: value`` lines, the headline last.

    .venv/bin/python bench/bench_ring_attention.py                          # S 2048, ~8 min on 2 shared cores
    .venv/bin/python bench/bench_ring_attention.py --seq 1024 --block 512   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from _timing import best_time

HERE = os.path.abspath(__file__)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ worker (one rank)
def worker(args) -> None:
    import mindspore as ms
    from mindspore import Tensor, ops

    from mindport import AutoConfig, AutoModelForCausalLM, ParallelConfig
    from mindport.parallel.context import ContextParallelAttention, PairRing, context_parallel_batch, zigzag_split
    from mindport.parallel.state import init_parallel, single_process

    cp, algo, s = args.cp, args.algo, args.seq
    parallel = ParallelConfig(context_parallel=cp, context_parallel_algo="ring" if algo == "composite" else algo)
    groups = init_parallel(parallel) if cp > 1 else single_process()
    rank = groups.cp.rank
    config = AutoConfig.from_preset(args.preset)
    model = AutoModelForCausalLM.from_config(config)
    n, nkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    scale = 1.0 / np.sqrt(d)
    layers = model.layers.values() if hasattr(model.layers, "values") else model.layers
    if algo == "composite":  # the model as it runs without context parallelism: scores materialised
        from mindport.transformer.kernels import attention_reference as core
    else:
        core = ContextParallelAttention(config, groups)  # cp 1: one causal block of the same kernel
        for layer in layers:
            layer.attn.attend = ContextParallelAttention(config, groups)
    params = model.trainable_params()

    def model_step_fn(total):
        ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, total))
        share = context_parallel_batch(ids, cp, rank)
        # composite: the causal mask of the whole sequence (cp 1: the zigzag share is the sequence)
        inputs = (model.prepare(ids) if algo == "composite" else share.model_inputs(model))[:4]
        targets = Tensor(share.targets, ms.int32)

        def loss_fn(*inputs):
            logits, router_loss, _ = model.forward(*inputs)
            return model.loss_from_targets(logits, router_loss, targets)

        grad = ms.value_and_grad(loss_fn, None, params)
        return lambda: [g.asnumpy() for g in grad(*inputs)[1]]

    def attn_step_fn(total):
        rng = np.random.default_rng(0)
        q, k, v, cot = (Tensor(zigzag_split(rng.standard_normal((1, h, total, d)).astype(np.float32), cp, rank, 2))
                        for h in (n, nkv, nkv, n))
        if algo == "composite":
            causal = np.where(np.tril(np.ones((total, total), bool)), 0.0, np.finfo(np.float32).min)
            mask = Tensor(causal.astype(np.float32)[None, None])
        else:
            mask = Tensor(np.zeros((1, 1, 1, 1), np.float32))
        grad = ms.grad(lambda q_, k_, v_: (core(q_, k_, v_, mask, scale) * cot).sum(), (0, 1, 2))
        return (lambda: [g.asnumpy() for g in grad(q, k, v)]), (k, v)

    barrier = (lambda: ops.AllReduce(group=groups.cp.name)(Tensor(np.ones(1, np.float32))).asnumpy()) \
        if cp > 1 else (lambda: None)

    def measure(step):
        """(peak resident growth, seconds) of one call; the pool keeps what it frees, so every
        measured step must need more than anything run before it in this process."""
        barrier()
        base = rss("VmRSS")
        ok = reset_peak()
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        return (rss("VmHWM") - base if ok else float("nan")), seconds

    def timed(step):
        barrier()
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    # Each step is warmed up at a tiny size first (libraries, kernels, groups, first-call caches):
    # the attention core, then the model, whose warm-up also allocates the parameter gradients, so
    # the model figure is its activations (the pool reuses the warm-up's gradient buffers).
    tiny = 2 * cp * 4
    attn_step_fn(tiny)[0]()
    attn_step, (k, v) = attn_step_fn(s)
    attn_peak, first = measure(attn_step)
    attn_time = min([first] + [timed(attn_step) for _ in range(args.repeats - 1)])
    model_step_fn(tiny)()
    model_step = model_step_fn(s)
    model_peak, first = measure(model_step)
    model_time = min(first, timed(model_step))
    hop = float("nan")
    if cp > 1 and algo == "ring":  # one ring hop of a K/V block (kv heads, local length)
        ring = PairRing(groups.cp)
        kv = ops.cat((k, v), 1)
        barrier()
        hop = best_time(lambda: ring.start(kv).asnumpy(), 3)
    result = dict(rank=rank, attn_peak=attn_peak, model_peak=model_peak, attn_time=attn_time, model_time=model_time,
                  hop=hop)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------ orchestration
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(args, cp: int, algo: str) -> list[dict]:
    out = tempfile.mkdtemp(prefix=f"bench_ring_cp{cp}_{algo}_")
    cmd_args = ["--as-rank", "--cp", str(cp), "--algo", algo, "--out", out, "--seq", str(args.seq),
                "--preset", args.preset, "--repeats", str(args.repeats)]
    cores = os.cpu_count() or 1
    env = dict(os.environ, MINDPORT_OP_THREADS=str(max(1, cores // cp)), GLOG_v="3")
    if cp == 1:
        cmd = [sys.executable, HERE, *cmd_args]
    else:
        bin_dir = os.path.dirname(sys.executable)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        cmd = [os.path.join(bin_dir, "msrun"), f"--worker_num={cp}", f"--local_worker_num={cp}",
               f"--master_port={free_port()}", f"--log_dir={os.path.join(out, 'log')}", "--join=True", HERE,
               *cmd_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"cp {cp} {algo} failed (logs kept in {out}):\n{proc.stderr[-3000:]}")
    ranks = []
    for r in range(cp):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    shutil.rmtree(out, ignore_errors=True)
    return ranks


def kernel_speed(args) -> dict[str, float]:
    import mindspore as ms
    from mindspore import Tensor

    from mindport import AutoConfig, dispatch
    from mindport.ops import ring_attention  # noqa: F401 - registers the operators
    from mindport.transformer.kernels import attention_reference

    config = AutoConfig.from_preset(args.preset)
    n, nkv, d, s = config.num_heads, config.num_kv_heads, config.head_dim, args.block
    rng = np.random.default_rng(0)
    q, k, v, cot = (Tensor(rng.standard_normal((1, h, s, d)).astype(np.float32)) for h in (n, nkv, nkv, n))
    scale = 1.0 / np.sqrt(d)
    res = {}
    for backend in ("cpu", "reference"):
        fwd, grad = dispatch.get("ring_block_attention", backend), dispatch.get("ring_block_attention_grad", backend)
        out, lse = fwd(q, k, v, scale, True)
        zero = Tensor(np.zeros(lse.shape, np.float32))
        f = lambda: fwd(q, k, v, scale, True)[0].asnumpy()  # noqa: E731
        b = lambda: grad(q, k, v, out, lse, cot, zero, scale, True)[0].asnumpy()  # noqa: E731
        f(), b()
        res[f"{backend}_forward"] = best_time(f, args.repeats)
        res[f"{backend}_backward"] = best_time(b, args.repeats)
    causal = np.where(np.tril(np.ones((s, s), bool)), 0.0, np.finfo(np.float32).min).astype(np.float32)
    mask = Tensor(causal[None, None])
    att = lambda: attention_reference(q, k, v, mask, scale).asnumpy()  # noqa: E731
    att_grad = ms.grad(lambda q_, k_, v_: (attention_reference(q_, k_, v_, mask, scale) * cot).sum(), (0, 1, 2))
    att_fb = lambda: [g.asnumpy() for g in att_grad(q, k, v)]  # noqa: E731
    cpu_fb = ms.grad(lambda q_, k_, v_: (dispatch.get("ring_block_attention", "cpu")(q_, k_, v_, scale, True)[0]
                                         * cot).sum(), (0, 1, 2))
    cpu_fb_run = lambda: [g.asnumpy() for g in cpu_fb(q, k, v)]  # noqa: E731
    att(), att_fb(), cpu_fb_run()
    res["composite_attention_forward"] = best_time(att, args.repeats)
    res["composite_attention_fwd_bwd"] = best_time(att_fb, args.repeats)
    res["cpu_fwd_bwd"] = best_time(cpu_fb_run, args.repeats)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="total sequence length of the context-parallel runs")
    parser.add_argument("--block", type=int, default=1024, help="block length of the kernel speed runs")
    parser.add_argument("--preset", default="telechat2-demo", help="model preset (random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--algo", default="ring", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_rank:
        worker(args)
        return

    from mindport import AutoConfig

    config = AutoConfig.from_preset(args.preset)
    cores = os.cpu_count() or 1
    print(f"model: {args.preset} (random weights): {config.num_layers} layers, H {config.hidden_size}, "
          f"N {config.num_heads}, Nkv {config.num_kv_heads}, D {config.head_dim}, F {config.ffn_hidden_size}, "
          f"V {config.vocab_size}; batch 1, total sequence {args.seq}, fp32, PYNATIVE")
    print(f"cores: {cores}; C++ kernel threads per rank: max(1, {cores} // cp)")
    print(f"load_average_1min_at_start: {os.getloadavg()[0]:.2f}")
    mb = 2 ** 20
    configs = ((1, "ring"), (2, "ring"), (4, "ring"), (2, "all_gather"), (4, "all_gather"), (1, "composite"))
    runs = {}
    for cp, algo in configs:
        ranks = run_config(args, cp, algo)
        runs[(cp, algo)] = {key: max(r[key] for r in ranks) for key in ranks[0] if key != "rank"}  # slowest rank
    label = {(cp, algo): "no_cp_composite" if algo == "composite" else f"{algo}_cp{cp}" for cp, algo in configs}
    base = runs[(1, "ring")]
    for what in ("model", "attn"):
        name = "model_step" if what == "model" else "attention_core"
        for key, r in runs.items():
            print(f"{name}_{label[key]}_peak_activation_MB_per_rank: {r[what + '_peak'] / mb:.1f}")
        for key, r in runs.items():
            if key != (1, "ring"):
                print(f"{name}_{label[key]}_peak_over_ring_cp1: {r[what + '_peak'] / base[what + '_peak']:.3f}")
    for what in ("model", "attn"):
        name = "model_step" if what == "model" else "attention_core"
        for key, r in runs.items():
            print(f"{name}_{label[key]}_fwd_bwd_ms: {r[what + '_time'] * 1e3:.0f}")
    for cp in (2, 4):
        r = runs[(cp, "ring")]
        print(f"ring_cp{cp}_hop_ms: {r['hop'] * 1e3:.1f} (one K/V block; {3 * cp - 2} hops per forward + backward)")
        print(f"ring_cp{cp}_attention_time_over_single_process: {r['attn_time'] / base['attn_time']:.2f}")
        print(f"ring_cp{cp}_model_step_time_over_single_process: {r['model_time'] / base['model_time']:.2f}")

    k = kernel_speed(args)
    for name, sec in k.items():
        print(f"block{args.block}_{name}_ms: {sec * 1e3:.1f}")
    print(f"cpp_vs_reference_block_forward_speedup: {k['reference_forward'] / k['cpu_forward']:.2f}")
    print(f"cpp_vs_reference_block_backward_speedup: {k['reference_backward'] / k['cpu_backward']:.2f}")
    print(f"cpp_vs_composite_attention_fwd_bwd_speedup: {k['composite_attention_fwd_bwd'] / k['cpu_fwd_bwd']:.2f}")
    print(f"load_average_1min_at_end: {os.getloadavg()[0]:.2f}")
    print(f"model_step_ring_cp4_peak_activation_per_rank_over_cp1: "
          f"{runs[(4, 'ring')]['model_peak'] / base['model_peak']:.3f}")


if __name__ == "__main__":
    main()
