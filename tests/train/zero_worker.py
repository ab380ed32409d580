"""Two AdamW steps with optimizer-state sharding (ZeRO-1) under a parallel layout, launched by msrun.

usage: zero_worker.py HF_DIR OUT_DIR ['{"data_parallel": 2, "optimizer_shard": true, ...}' [MODES]]

With a layout, each rank runs the two steps on a freshly loaded model once per mode in MODES
(comma-separated, default ``scatter,synced``), the ways of feeding
:class:`mindport.train.zero.ZeroAdamW`:

- ``scatter``: unsynchronised gradients, reduce-scattered over dp by the optimizer;
- ``synced``: gradients summed by ``GradientSync`` first, each rank cutting out its slices;
- ``jit``: as ``scatter``, with the optimizer's two halves compiled by ``ms.jit`` (GRAPH mode);

and writes OUT_DIR/rank{r}.npz with, per mode and step k: the global loss ``{mode}/s{k}/loss``,
the gradients (``gshard:`` this rank's dp slice of each summed gradient in scatter/jit mode, ``grad:``
the full local gradient in synced mode), the parameters after the step (``param:``), and after the
last step this rank's moment slices (``mshard:``, ``vshard:``) and the gathered moments (``m:``,
``v:``). Without a layout it runs single-process with plain ``nn.AdamWeightDecay`` (the
reference): ``s{k}/loss``, ``s{k}/grad:``, ``s{k}/param:``, ``m:``, ``v:``.
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
from mindport.parallel.state import init_parallel
from mindport.train.zero import ZeroAdamW

BATCH, SEQ, STEPS = 4, 16, 2
# eps 1e-4 as in step_worker.py: a tiny eps makes Adam's first steps ~lr*sign(g), amplifying
# fp32 rounding of near-zero gradients into the comparison.
HYPER = dict(learning_rate=1e-2, weight_decay=0.1, eps=1e-4)


def batch(vocab: int, step: int) -> np.ndarray:
    labels = np.random.default_rng(1234 + step).integers(0, vocab, (BATCH, SEQ))
    labels[0, 3:6] = -100  # ignored tokens on one data-parallel rank only
    return labels


def run(hf_dir: str, groups, mode: str | None, dump: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    params = model.trainable_params()
    prefix = f"{mode}/" if mode else ""
    if mode is None:
        optimizer = nn.AdamWeightDecay(params, **HYPER)
    else:
        optimizer = ZeroAdamW(params, groups, **HYPER, grads_synced=mode == "synced")
    sync = GradientSync(params, groups)
    scatter, update = (optimizer.reduce_grads, optimizer.update) if mode else (None, None)
    if mode == "jit":
        @ms.jit
        def scatter(grads):
            return optimizer.reduce_grads(grads)

        @ms.jit
        def update(shards):
            return optimizer.update(shards)
    dp, dp_i = groups.dp.size, groups.dp.rank
    rows = slice(dp_i * BATCH // dp, (dp_i + 1) * BATCH // dp)
    for k in range(STEPS):
        labels = batch(model.config.vocab_size, k)
        inputs = model.prepare(np.where(labels < 0, 0, labels)[rows])
        label_t = Tensor(labels[rows], ms.int32)

        def loss_fn(*inputs):
            logits, router_loss, _ = model.forward(*inputs)
            return model.loss(logits, router_loss, label_t)

        loss, grads = ms.value_and_grad(loss_fn, None, params)(*inputs[:4])
        dump[f"{prefix}s{k}/loss"] = ReduceFromGroup(groups.dp)(loss).asnumpy()
        if mode in ("scatter", "jit"):
            shards = scatter(ms.mutable(tuple(grads)))
            for p, g in zip(params, shards):
                dump[f"{prefix}s{k}/gshard:{p.name}"] = g.asnumpy()
            update(ms.mutable(tuple(shards)))
        else:
            grads = sync(grads)
            for p, g in zip(params, grads):
                dump[f"{prefix}s{k}/grad:{p.name}"] = g.asnumpy()
            optimizer(grads)
        for p in params:
            dump[f"{prefix}s{k}/param:{p.name}"] = p.asnumpy()
    if mode is None:
        moments = list(optimizer.moments1), list(optimizer.moments2)
    else:
        moments = optimizer.gather("m"), optimizer.gather("v")
        for p, m, v in zip(params, optimizer.moments1, optimizer.moments2):
            dump[f"{prefix}mshard:{p.name}"] = m.asnumpy()
            dump[f"{prefix}vshard:{p.name}"] = v.asnumpy()
    for p, m, v in zip(params, *moments):
        dump[f"{prefix}m:{p.name}"] = m.asnumpy()
        dump[f"{prefix}v:{p.name}"] = v.asnumpy()


def main(hf_dir: str, out_dir: str, layout: dict, modes: list[str]) -> None:
    ms.set_seed(0)
    parallel = ParallelConfig.from_dict(layout)
    groups = init_parallel(parallel)
    dump = {f"coord:{k}": np.array(v) for k, v in groups.coords.items()}
    if not layout:
        run(hf_dir, groups, None, dump)
    else:
        assert parallel.optimizer_shard, "zero_worker runs optimizer-sharded layouts only"
        for mode in modes:
            run(hf_dir, groups, mode, dump)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"rank{groups.global_rank}.npz"), **dump)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {},
         sys.argv[4].split(",") if len(sys.argv) > 4 else ["scatter", "synced"])
