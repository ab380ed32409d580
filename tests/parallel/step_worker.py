"""One training step under a parallel layout, launched by msrun; dumps what tests compare.

usage: step_worker.py HF_DIR OUT_DIR '{"data_parallel": 2, "model_parallel": 2, ...}'

Every rank loads its slices of HF_DIR, takes its data-parallel share of a fixed batch,
computes loss and gradients, synchronises them, applies one AdamW step and writes
OUT_DIR/rank{r}.npz: loss (global), grad:/param: entries for its local parameters, and
its coordinates. With no layout argument it runs single-process (the reference).
"""
import json
import os
import sys

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.parallel.comm import ReduceFromGroup
from mindport.parallel.grad_sync import GradientSync
from mindport.parallel.schedules import PipelineSchedule
from mindport.parallel.state import init_parallel

BATCH, SEQ = 4, 16


def fixed_batch(vocab: int) -> np.ndarray:
    ids = np.random.default_rng(1234).integers(0, vocab, (BATCH, SEQ))
    return ids


def main(hf_dir: str, out_dir: str, layout: dict) -> None:
    ms.set_seed(0)
    parallel = ParallelConfig.from_dict(layout)
    groups = init_parallel(parallel)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
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

    def loss_fn(*inputs):
        logits, router_loss, _ = model.forward(*inputs)
        return model.loss(logits, router_loss, label_t)

    if groups.pp.size > 1:
        loss, grads = PipelineSchedule(model, groups, parallel.micro_batch_num).run(ids, labels[rows])
    else:
        loss, grads = ms.value_and_grad(loss_fn, None, optimizer.parameters)(*inputs[:4])
    grads = GradientSync(params, groups)(grads)
    optimizer(grads)
    dump = {f"coord:{k}": np.array(v) for k, v in groups.coords.items()}
    if loss is not None:
        dump["loss"] = ReduceFromGroup(groups.dp)(loss).asnumpy()
    for p, g in zip(params, grads):
        dump[f"grad:{p.name}"] = g.asnumpy()
        dump[f"param:{p.name}"] = p.asnumpy()
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"rank{groups.global_rank}.npz"), **dump)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
