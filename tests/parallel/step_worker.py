"""One training step under a parallel layout, launched by msrun; dumps what tests compare.

usage: step_worker.py MODEL_DIRS OUT_DIR '{"data_parallel": 2, "model_parallel": 2, ...}' [jit]

MODEL_DIRS is one model directory, or several joined by ',' (one msrun launch for several
models; the k-th writes to OUT_DIR/k/). For each, every rank loads its slices, takes its
data-parallel share of a fixed batch, computes loss and gradients, synchronises them, applies
one AdamW step and writes rank{r}.npz: loss (global), the global gradient norm (GradNorm),
logits (all V columns, without pipeline stages), grad:/param: entries for its local parameters,
and its coordinates (coord:dp/pp/cp/tp/ep). With no layout it runs single-process (the reference);
with ``jit`` the forward and backward run as one ms.jit graph.
"""
import json
import os
import sys

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.parallel.comm import ReduceFromGroup
from mindport.parallel.grad_sync import GradientSync, GradNorm, sum_of_squares
from mindport.parallel.schedules import PipelineSchedule
from mindport.parallel.state import init_parallel
from mindport.train.data import Batch

BATCH, SEQ = 4, 16


def fixed_batch(vocab: int) -> np.ndarray:
    ids = np.random.default_rng(1234).integers(0, vocab, (BATCH, SEQ))
    return ids


def step(model_dir: str, out_dir: str, parallel: ParallelConfig, groups, jit: bool) -> None:
    ms.set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    labels = fixed_batch(model.config.vocab_size)
    labels[0, 3:6] = -100  # ignored tokens on one data-parallel rank only
    dp, dp_i = groups.dp.size, groups.dp.rank
    rows = slice(dp_i * BATCH // dp, (dp_i + 1) * BATCH // dp)
    ids = np.where(labels < 0, 0, labels)[rows]
    inputs = model.prepare(ids)
    label_t = Tensor(labels[rows], ms.int32)
    params = model.trainable_params()
    # eps 1e-4: with a tiny eps, Adam's first step is ~lr*sign(g) and amplifies fp32 rounding
    # of near-zero gradients; this keeps the post-step comparison about the parallel layout.
    optimizer = nn.AdamWeightDecay(params, learning_rate=1e-2, weight_decay=0.1, eps=1e-4)
    dump = {f"coord:{k}": np.array(v) for k, v in groups.coords.items()}
    dump["coord:ep"] = np.array(groups.ep.rank)

    def loss_fn(*inputs):
        logits, router_loss, _ = model.forward(*inputs)
        return model.loss(logits, router_loss, label_t)

    if groups.pp.size > 1:
        loss, grads = PipelineSchedule(model, groups, parallel.micro_batch_num).run(Batch(ids, labels[rows]))
    else:
        dump["logits"] = model.full_logits(model.forward(*inputs[:4])[0]).asnumpy()
        grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
        loss, grads = (ms.jit(grad_fn) if jit else grad_fn)(*inputs[:4])
    grads = GradientSync(params, groups)(grads)
    norm = GradNorm([p.name for p in params], groups)(ops.stack([sum_of_squares(g) for g in grads]))
    dump["grad_norm"] = norm.asnumpy()
    optimizer(grads)
    if loss is not None:
        dump["loss"] = ReduceFromGroup(groups.dp)(loss).asnumpy()
    for p, g in zip(params, grads):
        dump[f"grad:{p.name}"] = g.asnumpy()
        dump[f"param:{p.name}"] = p.asnumpy()
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"rank{groups.global_rank}.npz"), **dump)


def main(model_dirs: list[str], out_dir: str, layout: dict, jit: bool) -> None:
    parallel = ParallelConfig.from_dict(layout)
    groups = init_parallel(parallel)
    for k, model_dir in enumerate(model_dirs):
        step(model_dir, out_dir if len(model_dirs) == 1 else os.path.join(out_dir, str(k)), parallel, groups, jit)


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {},
         sys.argv[4:] == ["jit"])
