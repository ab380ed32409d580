"""Context-parallel forward + backward, launched by msrun; dumps what test_context_parallel compares.

usage: cp_worker.py HF_DIR OUT_DIR SEQ_LENS '{"context_parallel": 2, ...}'

SEQ_LENS is a comma-separated list of total sequence lengths. For each length and for each
context_parallel_algo ("ring", "all_gather") every rank takes its zigzag share of a fixed batch
(:func:`mindport.parallel.context.context_parallel_batch`), runs the model forward and backward,
sums gradients over cp (GradientSync) and writes OUT_DIR/rank{r}.npz with, per "{seq}:{algo}:":
loss (global), grad:{name}, attn{i} (each layer's attention core output), and direct:{backend}:
out/dq/dk/dv of ContextParallelAttention called on fixed random q/k/v with each block-operator
backend ("cpu", "reference") and compiled with ms.jit ("jit", cpu backend). Without a layout it
runs single-process (the reference) with the full sequences.
"""
import json
import os
import sys
from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.parallel.comm import ReduceFromGroup
from mindport.parallel.grad_sync import GradientSync
from mindport.parallel.state import init_parallel

BATCH = 2
ALGOS = ("ring", "all_gather")
BACKENDS = ("cpu", "reference")


def fixed_batch(vocab: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seq).integers(0, vocab, (BATCH, seq))
    labels = ids.copy()
    labels[0, seq // 3: seq // 3 + 5] = -100  # ignored tokens somewhere in the middle
    return ids, labels


def fixed_qkv(seq: int, heads: int, kv_heads: int, dim: int):
    rng = np.random.default_rng(1000 + seq)
    q = rng.standard_normal((BATCH, heads, seq, dim)).astype(np.float32)
    k = rng.standard_normal((BATCH, kv_heads, seq, dim)).astype(np.float32)
    v = rng.standard_normal((BATCH, kv_heads, seq, dim)).astype(np.float32)
    cot = rng.standard_normal((BATCH, heads, seq, dim)).astype(np.float32)
    return q, k, v, cot


class Recorder(nn.Cell):
    """Wraps an attention core and keeps its outputs (PYNATIVE)."""

    def __init__(self, inner, store: list):
        super().__init__()
        self.inner = inner
        self.store = store

    def construct(self, q, k, v, mask, scale):
        out = self.inner(q, k, v, mask, scale)
        self.store.append(out)
        return out


def main(hf_dir: str, out_dir: str, seqs: list[int], layout: dict) -> None:
    ms.set_seed(0)
    parallel = ParallelConfig.from_dict(layout)
    from mindport.parallel.context import (ContextParallelAttention, check_sequence_length, context_parallel_batch,
                                           zigzag_split)

    for seq in seqs:  # a bad sequence length fails here, before any communication or model work
        check_sequence_length(seq, parallel.context_parallel)
    groups = init_parallel(parallel)
    cp, cp_rank = groups.cp.size, groups.cp.rank
    batches = {}
    for seq in seqs:
        ids, labels = fixed_batch(256, seq)
        batches[seq] = (ids, labels, context_parallel_batch(ids, cp, cp_rank, labels) if cp > 1 else None)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    config = model.config
    params = model.trainable_params()
    dump = {f"coord:{k}": np.array(v) for k, v in groups.coords.items()}
    for seq in seqs:
        ids, labels, share = batches[seq]
        algos = ALGOS if cp > 1 else ("single",)
        for algo in algos:
            key = f"{seq}:{algo}:"
            store: list = []
            for layer in model.layers.values() if hasattr(model.layers, "values") else model.layers:
                core = layer.attn.attend
                if cp > 1:
                    algo_groups = replace(groups, config=replace(groups.config, context_parallel_algo=algo))
                    core = ContextParallelAttention(config, algo_groups)
                elif isinstance(core, Recorder):
                    core = core.inner
                layer.attn.attend = Recorder(core, store)
            if cp > 1:
                inputs = share.model_inputs(model)[:4]
                targets = Tensor(share.targets, ms.int32)

                def loss_fn(*inputs):
                    logits, router_loss, _ = model.forward(*inputs)
                    return model.loss_from_targets(logits, router_loss, targets)
            else:
                inputs = model.prepare(ids)[:4]
                label_t = Tensor(labels, ms.int32)

                def loss_fn(*inputs):
                    logits, router_loss, _ = model.forward(*inputs)
                    return model.loss(logits, router_loss, label_t)

            loss, grads = ms.value_and_grad(loss_fn, None, params)(*inputs)
            grads = GradientSync(params, groups)(grads)
            dump[key + "loss"] = ReduceFromGroup(groups.cp)(loss).asnumpy()
            for p, g in zip(params, grads):
                dump[key + "grad:" + p.name] = g.asnumpy()
            for i, out in enumerate(store):
                dump[key + f"attn{i}"] = out.asnumpy()

            # the attention core alone on random q/k/v (all heads: independent of tensor parallelism)
            q, k, v, cot = fixed_qkv(seq, config.num_heads, config.num_kv_heads, config.head_dim)
            if cp > 1:
                q, k, v, cot = (zigzag_split(x, cp, cp_rank, axis=2) for x in (q, k, v, cot))
            scale = 1.0 / np.sqrt(config.head_dim)
            for backend in BACKENDS + ("jit",) if cp > 1 else ("reference",):
                os.environ["MINDPORT_BACKEND"] = "cpu" if backend == "jit" else backend
                if cp > 1:
                    core = ContextParallelAttention(config, replace(groups, config=replace(
                        groups.config, context_parallel_algo=algo)))
                    mask = Tensor(np.zeros((1, 1, 1, 1), np.float32))
                else:
                    from mindport.transformer.kernels import attention_reference as core

                    causal = np.tril(np.ones((seq, seq), bool))
                    mask = Tensor(np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None])
                cot_t = Tensor(cot)

                def attn_loss(q_, k_, v_):
                    return (core(q_, k_, v_, mask, scale) * cot_t).sum()

                def attn(q_, k_, v_):
                    return core(q_, k_, v_, mask, scale)

                grad_fn = ms.grad(attn_loss, (0, 1, 2))

                def out_and_grads(q_, k_, v_):
                    return attn(q_, k_, v_), grad_fn(q_, k_, v_)

                if backend == "jit":  # the same core compiled (GRAPH mode), one graph
                    out_and_grads = ms.jit(out_and_grads)
                out, (dq, dk, dv) = out_and_grads(Tensor(q), Tensor(k), Tensor(v))
                for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                    dump[key + f"direct:{backend}:{name}"] = x.asnumpy()
            os.environ.pop("MINDPORT_BACKEND", None)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"rank{groups.global_rank}.npz"), **dump)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")],
         json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
