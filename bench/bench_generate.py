"""Decode speed: mindport KV-cache generation vs transformers' generate and vs our own
no-cache decoding, on one ~58M-parameter TeleChat2-architecture model (``--moe``: a Mixtral with
8 experts top-2 of width ``--ffn`` against transformers' MixtralForCausalLM), in one run. Each side
runs in its own process, one after the other (MindSpore's runtime threads slow torch down in a
shared process).

Prints `name: value` lines; the headline (ours over transformers, batch 1) is last.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from _timing import SIDES, each_side_in_own_process


def model_config(args):
    from mindport import AutoConfig
    from mindport.config import ModelConfig

    if args.moe:
        return AutoConfig.from_preset("mixtral-tiny").replace(
            vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
            num_kv_heads=args.heads, num_experts=8, moe_top_k=2, moe_intermediate_size=args.ffn,
            max_position_embeddings=4096, eos_token_id=None)
    return ModelConfig(family="telechat2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.heads, ffn_hidden_size=args.ffn, kv_layout="interleaved", o_bias=True,
                       down_bias=True, rope_scaling="telechat_ntk", training_seqlen=4096, base_seqlen=4096,
                       max_position_embeddings=4096, rope_fp16_tables=False, eos_token_id=None)


def build_theirs(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    if args.moe:
        return MixtralForCausalLM(MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                                                num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                                num_key_value_heads=args.heads, num_local_experts=8,
                                                num_experts_per_tok=2, max_position_embeddings=4096,
                                                tie_word_embeddings=False)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                        max_position_embeddings=4096, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=False)).eval()


def time_ours(model, prompt, new, use_cache=True):
    start = time.perf_counter()
    first = []
    model.generate(prompt, max_new_tokens=new, eos_token_id=[], use_cache=use_cache,
                   streamer=lambda t: first.append(time.perf_counter()) if not first else None)
    end = time.perf_counter()
    return end - start, first[0] - start


def time_theirs(model, prompt, new):
    import torch

    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, ttft


def run_side(args) -> dict:
    """This process's side: per batch size, its timings (the other side runs in another process)."""
    rng = np.random.default_rng(0)
    out = {}
    if args.side == "ours":
        from mindport import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(model_config(args))
    else:
        model = build_theirs(args)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = rng.integers(3, args.vocab, (batch, args.prompt))
        if args.side == "ours":
            compile_s, _ = time_ours(model, prompt, args.new)  # first call of these shapes compiles the graphs
            time_ours(model, prompt, args.nocache_new)
            total, ttft = time_ours(model, prompt, args.new)
            nocache_s, _ = time_ours(model, prompt, args.nocache_new, use_cache=False)
            cached_short, _ = time_ours(model, prompt, args.nocache_new)
            out[batch] = {"compile": compile_s, "total": total, "ttft": ttft, "nocache_ratio": nocache_s / cached_short}
        else:
            time_theirs(model, prompt, 2)  # warm-up
            total, ttft = time_theirs(model, prompt, args.new)
            out[batch] = {"total": total, "ttft": ttft}
    return out


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark model's shape (default: the 58.5M TeleChat2-shaped model), read by :func:`model_config`."""
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_shape_arguments(p)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--nocache-new", type=int, default=16, help="tokens for the (slow) no-cache baseline")
    p.add_argument("--moe", action="store_true", help="Mixtral, 8 experts top-2 of width --ffn")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in a child process
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    print(f"parameters_millions: {model_config(args).num_parameters() / 1e6:.1f}")
    sides = each_side_in_own_process(__file__)
    headline = None
    for batch in args.batches.split(","):
        ours, theirs = sides["ours"][batch], sides["theirs"][batch]
        ours_tps, theirs_tps = int(batch) * args.new / ours["total"], int(batch) * args.new / theirs["total"]
        print(f"batch{batch}_ours_first_call_with_compile_s: {ours['compile']:.2f}")
        print(f"batch{batch}_ours_tokens_per_s: {ours_tps:.1f}")
        print(f"batch{batch}_transformers_tokens_per_s: {theirs_tps:.1f}")
        print(f"batch{batch}_ours_ttft_s: {ours['ttft']:.3f}")
        print(f"batch{batch}_transformers_ttft_s: {theirs['ttft']:.3f}")
        print(f"batch{batch}_cache_over_nocache_{args.nocache_new}_tokens: {ours['nocache_ratio']:.2f}")
        print(f"batch{batch}_ours_over_transformers: {ours_tps / theirs_tps:.3f}")
        headline = headline or ours_tps / theirs_tps
    print(f"ours_over_transformers_batch1: {headline:.3f}")


if __name__ == "__main__":
    main()
