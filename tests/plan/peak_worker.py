"""Peak resident memory of one PYNATIVE training step (forward, loss, backward) of a preset on CPU.

    python peak_worker.py PRESET BATCH SEQ   ->  {"measured": bytes, "activations": bytes}

measured = the resident high-water mark during the step (VmHWM, reset through /proc/self/clear_refs)
minus the resident size before it, after a warm-up step at a tiny shape (as bench/bench_ring_attention.py).
"""
from __future__ import annotations

import json
import sys

import numpy as np


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(preset: str, batch: int, seq: int) -> None:
    import mindspore as ms
    from mindspore import Tensor

    from mindport import AutoConfig, AutoModelForCausalLM, ParallelConfig
    from mindport.train.memory import memory_report

    config = AutoConfig.from_preset(preset)
    model = AutoModelForCausalLM.from_config(config)
    grad = ms.value_and_grad(lambda ids: model(ids, labels=ids), None, model.trainable_params())

    def step(b: int, s: int):
        ids = Tensor(np.random.default_rng(0).integers(0, config.vocab_size, (b, s)), ms.int32)
        return lambda: [g.asnumpy() for g in grad(ids)[1]]

    step(1, 8)()  # warm-up: kernels, caches, the parameter gradients' buffers
    measured_step = step(batch, seq)
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    measured_step()
    report = memory_report(config, ParallelConfig(), batch, seq)["bytes"]
    print(json.dumps({"measured": rss("VmHWM") - base, "activations": report["activations"]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
