"""Training-step efficiency on CPU: mindport (MindSpore) vs transformers' Llama (torch), same shape
(``--moe``: a Mixtral of the issue #18 shape vs transformers' MixtralForCausalLM).

Each side's achieved FLOP/s is (6 N + attention FLOPs) per token x tokens per second over the
timed steps (forward, backward, AdamW update; fp32), and is divided by that framework's own
fp32 matmul rate measured in the same run (1024^3 products, best of several). The headline is
our fraction over theirs: >= 1 means mindport keeps MindSpore's matmul units as busy as
transformers keeps torch's. Each side runs in its own process, one after the other: MindSpore's
runtime threads outlive a run and would slow torch down in the same process (measured: torch's
step 2.34 s alone, 2.81 s after MindSpore had trained in that process).

    python bench/bench_train.py [--steps 5] [--warmup 2] [--batch 4] [--seq 256] [--moe]

``--lora R`` (issue 17) trains LoRA adapters of rank R on every linear layer of a frozen base
instead (ours: mindport's pet_config; theirs: peft's ``get_peft_model`` on the Llama); each side
also reports its process's peak resident memory, and the headline becomes theirs / ours step time.
Compare with a run without ``--lora`` for LoRA against full fine-tuning.

Lines are ``name: value``; the last one is the headline. The machine may be shared: run it
twice and keep the quieter result.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from _timing import SIDES, each_side_in_own_process

os.environ.setdefault("GLOG_v", "3")

SHAPE = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, ffn_hidden_size=1408)
MOE_SHAPE = dict(vocab_size=8000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, num_experts=8,
                 moe_top_k=2, moe_intermediate_size=704)


def flops_per_token(config, seq: int) -> float:
    from mindport.train.flops import train_flops_per_token

    return train_flops_per_token(config, seq)


def ms_matmul_rate() -> float:
    from mindport.train.flops import measure_matmul_flops

    return measure_matmul_flops(1024, seconds=2.0)


def torch_matmul_rate(seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * 1024**3 / best


OUR_LINEAR = ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]  # TeleChat2's names
THEIR_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Llama's


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_ours(config, batch: int, seq: int, warmup: int, steps: int, level: str, lora: int) -> tuple[float, float]:
    """(seconds per step, compile + warm-up seconds)."""
    import mindspore as ms

    from mindport import AutoModelForCausalLM
    from mindport.config import LoraConfig
    from mindport.models.lora import apply_lora
    from mindport.train.config import TrainConfig
    from mindport.train.data import Batch
    from mindport.train.trainer import Trainer

    ms.set_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        apply_lora(model, LoraConfig(lora_rank=lora, lora_alpha=2.0 * lora, target_modules=OUR_LINEAR))
    trainer = Trainer(model, TrainConfig(batch_size=batch, seq_length=seq, train_steps=warmup + steps,
                                         amp_level=level, warmup_steps=1, learning_rate=1e-4))
    data = np.random.default_rng(0).integers(0, config.vocab_size, (warmup + steps, batch, seq)).astype(np.int32)
    start = time.perf_counter()
    for k in range(warmup):
        trainer.train_step([Batch(data[k], data[k])])
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(warmup, warmup + steps):
        trainer.train_step([Batch(data[k], data[k])])
    return (time.perf_counter() - start) / steps, warm


def bench_theirs(config, batch: int, seq: int, warmup: int, steps: int, lora: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  max_position_embeddings=seq, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if config.is_moe:
        cfg = transformers.MixtralConfig(**common, intermediate_size=config.moe_intermediate_size,
                                         num_local_experts=config.num_experts, num_experts_per_tok=config.moe_top_k,
                                         output_router_logits=True, router_aux_loss_coef=config.router_aux_loss_coef)
        model = transformers.MixtralForCausalLM(cfg).train()
    else:
        cfg = transformers.LlamaConfig(**common, intermediate_size=config.ffn_hidden_size)
        model = transformers.LlamaForCausalLM(cfg).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=THEIR_LINEAR))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (warmup + steps, batch, seq)))

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for k in range(warmup):
        step(data[k])
    start = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(data[k])
    return (time.perf_counter() - start) / steps


def run_side(args, config) -> dict:
    """This process's side of the comparison: its framework's matmul rate and step time."""
    if args.side == "ours":
        peak = ms_matmul_rate()
        step, warm = bench_ours(config, args.batch, args.seq, args.warmup, args.steps, args.amp, args.lora)
        return {"peak": peak, "step": step, "warm": warm, "rss": peak_rss()}
    peak = torch_matmul_rate()
    step = bench_theirs(config, args.batch, args.seq, args.warmup, args.steps, args.lora)
    return {"peak": peak, "step": step, "rss": peak_rss()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--amp", default="O0", choices=("O0", "O1"), help="our precision level (theirs: fp32)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank on every linear layer (0: full)")
    p.add_argument("--moe", action="store_true", help="Mixtral (H 512, 4 layers, 8 experts top-2, width 704)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in a child process
    args = p.parse_args()

    from mindport import AutoConfig

    if args.moe:
        config = AutoConfig.from_preset("mixtral-tiny").replace(**MOE_SHAPE, max_position_embeddings=args.seq)
    else:
        config = AutoConfig.from_preset("telechat2-demo").replace(
            **SHAPE, training_seqlen=args.seq, base_seqlen=args.seq, max_position_embeddings=args.seq)
    if args.side:
        print(json.dumps(run_side(args, config)))
        return
    sides = each_side_in_own_process(__file__)
    import torch

    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq)
    if args.moe:
        print(f"model: Mixtral architecture, {config.num_parameters() / 1e6:.1f}M parameters ({config.num_layers} "
              f"layers, H {config.hidden_size}, {config.num_experts} experts top-{config.moe_top_k} of width "
              f"{config.moe_intermediate_size}, vocab {config.vocab_size}); transformers' Mixtral on the torch side")
    else:
        print(f"model: TeleChat2 architecture, {config.num_parameters() / 1e6:.1f}M parameters "
              f"({config.num_layers} layers, H {config.hidden_size}, {config.num_heads} heads, FFN "
              f"{config.ffn_hidden_size}, vocab {config.vocab_size}); Llama of the same shape on the torch side")
    print(f"tokens_per_step: {tokens}")
    print(f"flops_per_token: {fpt:.4g}")
    print(f"torch_threads: {torch.get_num_threads()}")
    fractions = {}
    for side, framework in (("ours", "mindspore"), ("theirs", "torch")):
        r = sides[side]
        rate = fpt * tokens / r["step"]
        fractions[side] = rate / r["peak"]
        print(f"{framework}_fp32_matmul_gflops: {r['peak'] / 1e9:.1f}")
        if "warm" in r:
            print(f"{side}_compile_and_warmup_s: {r['warm']:.1f}")
        print(f"{side}_step_s: {r['step']:.3f}")
        print(f"{side}_tokens_per_s: {tokens / r['step']:.0f}")
        print(f"{side}_gflops: {rate / 1e9:.1f}")
        print(f"{side}_fraction_of_{framework}_matmul: {fractions[side]:.3f}")
        print(f"{side}_peak_rss_mib: {r['rss'] / 2**20:.0f}")
    if args.lora:  # the FLOP count above is full fine-tuning's (frozen weights get no weight gradients)
        print(f"lora_rank: {args.lora}")
        print(f"lora_theirs_over_ours_step_time: {sides['theirs']['step'] / sides['ours']['step']:.3f}")
    else:
        print(f"ours_over_theirs_fraction: {fractions['ours'] / fractions['theirs']:.3f}")


if __name__ == "__main__":
    main()
