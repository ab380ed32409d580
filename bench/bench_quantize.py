"""Weight-only int8 against fp32 decoding (``mindport.models.quantize``): greedy decode tokens/s of
bench_generate.py's ~58M-parameter TeleChat2-architecture model (``--moe``: its Mixtral), the same
random weights in fp32 and quantized, both in this process, timed alternately (best of
``--repeats``), plus the weight memory of the quantized projections.

Prints `name: value` lines; the headline (int8 over fp32 tokens/s, batch 1) is last.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from bench_generate import add_shape_arguments, model_config, time_ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_shape_arguments(p)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--moe", action="store_true", help="bench_generate.py's Mixtral (8 experts top-2)")
    args = p.parse_args()

    import mindspore as ms

    from mindport import AutoModelForCausalLM
    from mindport.models.quantize import quantize_weights, quantized_bytes

    config = model_config(args)
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    print(f"parameters_millions: {config.num_parameters() / 1e6:.1f}")
    ms.set_seed(0)
    fp32 = AutoModelForCausalLM.from_config(config)
    int8 = AutoModelForCausalLM.from_config(config)
    for (_, a), (_, b) in zip(fp32.parameters_and_names(), int8.parameters_and_names()):
        b.set_data(a.value())
    quantize_weights(int8)
    weights, as_fp32 = quantized_bytes(int8)
    print(f"quantized_weights_fp32_mib: {as_fp32 / 2**20:.1f}")
    print(f"quantized_weights_int8_with_scales_mib: {weights / 2**20:.1f}")
    print(f"int8_over_quarter_fp32: {weights / (as_fp32 / 4):.4f}")
    rng = np.random.default_rng(0)
    headline = None
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = rng.integers(3, args.vocab, (batch, args.prompt))
        for model in (fp32, int8):  # the first call of a shape compiles
            time_ours(model, prompt, args.new)
        best = {"fp32": float("inf"), "int8": float("inf")}
        for _ in range(args.repeats):
            for name, model in (("fp32", fp32), ("int8", int8)):
                best[name] = min(best[name], time_ours(model, prompt, args.new)[0])
        tps = {name: batch * args.new / seconds for name, seconds in best.items()}
        print(f"batch{batch}_fp32_tokens_per_s: {tps['fp32']:.1f}")
        print(f"batch{batch}_int8_tokens_per_s: {tps['int8']:.1f}")
        print(f"batch{batch}_int8_over_fp32: {tps['int8'] / tps['fp32']:.3f}")
        headline = headline or tps["int8"] / tps["fp32"]
    print(f"load_average_1min_end: {os.getloadavg()[0]:.2f}")
    print(f"int8_over_fp32_batch1: {headline:.3f}")


if __name__ == "__main__":
    main()
