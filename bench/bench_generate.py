"""Decode speed: mindport KV-cache generation vs transformers' generate and vs our own
no-cache decoding, on one ~58M-parameter TeleChat2-architecture model, in one run.

Prints `name: value` lines; the headline (ours over transformers, batch 1) is last.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mindport import AutoModelForCausalLM
    from mindport.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(family="telechat2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.heads, ffn_hidden_size=args.ffn, kv_layout="interleaved", o_bias=True,
                      down_bias=True, rope_scaling="telechat_ntk", training_seqlen=4096, base_seqlen=4096,
                      max_position_embeddings=4096, rope_fp16_tables=False, eos_token_id=None)
    ours = AutoModelForCausalLM.from_config(cfg)
    theirs = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                          max_position_embeddings=4096, attention_bias=True, mlp_bias=True,
                                          tie_word_embeddings=False)).eval()
    return ours, theirs, cfg


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--nocache-new", type=int, default=16, help="tokens for the (slow) no-cache baseline")
    args = p.parse_args()
    ours, theirs, cfg = build(args)
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    print(f"parameters_millions: {cfg.num_parameters() / 1e6:.1f}")
    rng = np.random.default_rng(0)
    headline = None
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = rng.integers(3, args.vocab, (batch, args.prompt))
        compile_s, _ = time_ours(ours, prompt, args.new)  # first call of these shapes compiles the graphs
        time_ours(ours, prompt, args.nocache_new)
        time_theirs(theirs, prompt, 2)  # torch warm-up
        ours_s, ours_ttft = time_ours(ours, prompt, args.new)
        theirs_s, theirs_ttft = time_theirs(theirs, prompt, args.new)
        nocache_s, _ = time_ours(ours, prompt, args.nocache_new, use_cache=False)
        cached_short, _ = time_ours(ours, prompt, args.nocache_new)
        print(f"batch{batch}_ours_first_call_with_compile_s: {compile_s:.2f}")
        ours_tps, theirs_tps = batch * args.new / ours_s, batch * args.new / theirs_s
        print(f"batch{batch}_ours_tokens_per_s: {ours_tps:.1f}")
        print(f"batch{batch}_transformers_tokens_per_s: {theirs_tps:.1f}")
        print(f"batch{batch}_ours_ttft_s: {ours_ttft:.3f}")
        print(f"batch{batch}_transformers_ttft_s: {theirs_ttft:.3f}")
        print(f"batch{batch}_cache_over_nocache_{args.nocache_new}_tokens: {nocache_s / cached_short:.2f}")
        print(f"batch{batch}_ours_over_transformers: {ours_tps / theirs_tps:.3f}")
        headline = headline or ours_tps / theirs_tps
    print(f"ours_over_transformers_batch1: {headline:.3f}")


if __name__ == "__main__":
    main()
