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

``--breakdown`` (issue 18) also times the pieces of one step on each side, each compiled on ours
(``ms.jit`` of the same cells) and eager on theirs, best of ``--repeats``: forward + backward of the
attention blocks, of the MoE (or MLP) layers and, for MoE, of their experts' matmuls, routing, combine
and router statistics; embedding + final norm + head + loss; gradient clipping; the optimizer update.
Each piece gets its matmul FLOPs and its fraction of the side's matmul rate, and the pieces' sum is
printed beside the measured step, so nothing is hidden.

Lines are ``name: value``; the last one is the headline. The machine may be shared: run it
twice and keep the quieter result.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from _timing import SIDES, best_time, each_side_in_own_process

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


def bench_ours(config, batch: int, seq: int, warmup: int, steps: int, level: str, lora: int):
    """(seconds per step, compile + warm-up seconds, the trainer)."""
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
    return (time.perf_counter() - start) / steps, warm, trainer


def bench_theirs(config, batch: int, seq: int, warmup: int, steps: int, lora: int):
    """(seconds per step, the model, its optimizer)."""
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
    return (time.perf_counter() - start) / steps, model, opt


def piece_flops(config, batch: int, seq: int) -> dict[str, float]:
    """Matmul FLOPs of one step's pieces (forward + backward: 6 per weight and token, plus the
    attention scores and values), summing to ``train_flops_per_token`` x tokens."""
    tokens, h, layers = batch * seq, config.hidden_size, config.num_layers
    attn_weights = h * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    flops = {"attention": tokens * layers * (6.0 * attn_weights + 12.0 * config.num_heads * config.head_dim * seq),
             "embedding_head_loss": 6.0 * tokens * h * config.vocab_size}
    flops[MLP] = flops_per_token(config, seq) * tokens - flops["attention"] - flops["embedding_head_loss"]
    if config.is_moe:
        flops["moe_experts"] = 6.0 * tokens * layers * config.moe_top_k * 3 * h * config.moe_intermediate_size
        flops["moe_routing"] = 6.0 * tokens * layers * h * config.num_experts
    return flops


MLP = "mlp_layers"  # MoE layers (their output; router statistics apart) or dense MLPs
TOP_PIECES = ("attention", MLP, "router_stats", "embedding_head_loss", "grad_clip", "optimizer")  # sum to a step
SUB_PIECES = ("moe_experts", "moe_routing", "moe_combine")  # parts of mlp_layers


def breakdown_ours(trainer, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Seconds per step of each piece of our step, each an ``ms.jit`` graph of the model's own cells
    (forward + backward through ``value_and_grad`` against a random output gradient; per-layer pieces
    timed on layer 0, times the layers)."""
    import mindspore as ms
    from mindspore import Tensor, ops

    from mindport.parallel.grad_sync import sum_of_squares
    from mindport.train.trainer import next_token_targets
    from mindport.transformer.moe import load_balancing, z_loss

    model, config = trainer.model, trainer.model.config
    rng = np.random.default_rng(1)

    def normal(*shape):
        return Tensor(rng.standard_normal(shape, dtype=np.float32))

    def fwd_bwd(loss_fn, cells, *args, inputs=0) -> float:
        params = [p for c in cells for p in c.trainable_params()] or None
        step = ms.jit(ms.value_and_grad(loss_fn, inputs, params))
        return best_time(lambda: step(*args)[0].asnumpy(), repeats)

    ids = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    _, cos, sin, mask, _ = model.prepare(ids)
    layer, layers = model.layers[str(model.layer_ids[0])], len(model.layer_ids)
    h, t = config.hidden_size, batch * seq
    x, dy = normal(batch, seq, h), normal(batch, seq, h)

    def inner(a, b):
        """sum(a * b), reduced along the last axis first: MindSpore's CPU ReduceSum over every axis takes
        ~3.6 ms on (2048, 512), ten times its last axis' ~0.4 ms, and would be counted as the piece's."""
        return (a * b).reshape(-1, a.shape[-1]).sum(-1).sum()

    # MindSpore compiles a function from its source: named functions, not multi-line lambdas
    def attention(x):
        return inner(x + layer.attn(layer.attn_norm(x), cos, sin, mask), dy)

    def mlp(x):
        out = layer.mlp(layer.mlp_norm(x))
        return inner(x + (out[0] if config.is_moe else out), dy)  # MoE: its output, not its statistics

    out = {"attention": layers * fwd_bwd(attention, [layer.attn_norm, layer.attn], x),
           MLP: layers * fwd_bwd(mlp, [layer.mlp_norm, layer.mlp], x)}
    if config.is_moe:
        moe, k = layer.mlp, config.moe_top_k
        dispatcher = moe.token_dispatcher
        tokens, d_rows, d_weights, d_tokens = normal(t, h), normal(t * k, h), normal(t, k), normal(t, h)

        def routing(tokens):
            rows, _, plan = dispatcher.dispatch(tokens, moe.router(tokens).astype(ms.float32))
            return inner(rows, d_rows) + inner(plan[0], d_weights)

        def router_logits(tokens):
            return moe.router(tokens).astype(ms.float32)

        logits = ms.jit(router_logits)(tokens)
        rows, counts, (weights, experts, slot_rows, _) = ms.jit(dispatcher.dispatch)(tokens, logits)

        def expert_matmuls(rows, counts):
            return inner(moe.experts(rows, counts), d_rows)

        def combine(rows, weights):
            return inner(dispatcher.unpermute_combine(rows, slot_rows, weights), d_tokens)

        def router_stats(logits):
            fraction, probability, _ = load_balancing(logits, experts, config.num_experts)
            return config.num_experts * (fraction * probability).sum() + z_loss(logits)

        out["moe_routing"] = layers * fwd_bwd(routing, [moe.router], tokens)
        out["moe_experts"] = layers * fwd_bwd(expert_matmuls, [moe.experts], rows, counts)
        out["moe_combine"] = layers * fwd_bwd(combine, [], rows, weights, inputs=(0, 1))
        out["router_stats"] = layers * fwd_bwd(router_stats, [], logits)
    targets = Tensor(next_token_targets(ids))

    def embedding_head_loss(x, ids):
        logits = model.lm_head(model.final_norm(x))
        return model.loss_fn.from_targets(logits, targets) + inner(model.embed(ids), dy)

    out["embedding_head_loss"] = fwd_bwd(embedding_head_loss, [model.embed, model.final_norm, model.lm_head], x,
                                         Tensor(ids))
    grads = tuple(normal(*p.shape) for p in trainer.params)
    clip = float(trainer.config.grad_clip)

    @ms.jit
    def grad_clip(grads):
        norm = trainer.grad_norm(ops.stack([sum_of_squares(g) for g in grads]))
        coef = clip / ops.maximum(norm, clip)
        return norm, tuple(g * coef for g in grads)

    out["grad_clip"] = best_time(lambda: grad_clip(grads)[0].asnumpy(), repeats)
    optimizer = trainer.optimizer

    @ms.jit
    def update(grads, lr):  # the parameters are written in place; the step count is the output
        return ops.depend(optimizer.step + 0.0, optimizer.update(grads, lr))

    lr = Tensor(1e-4, ms.float32)
    out["optimizer"] = best_time(lambda: update(grads, lr).asnumpy(), repeats)
    return out


def breakdown_theirs(model, opt, config, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Seconds per step of each piece of transformers' step in eager torch (forward + backward against
    a random output gradient; per-layer pieces timed on layer 0, times the layers). The experts'
    loop applies the routing weights and scatters back itself: no separate combine."""
    import torch


    inner, trained = model.model, [p for p in model.parameters() if p.requires_grad]
    layer, layers = inner.layers[0], len(inner.layers)
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, config.vocab_size, (batch, seq)))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    position, mask = captured["position_embeddings"], captured.get("attention_mask")
    h, t = config.hidden_size, batch * seq
    x, dy = torch.randn(batch, seq, h, requires_grad=True), torch.randn(batch, seq, h)

    def fwd_bwd(loss_fn, *args) -> float:
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(*args).backward()
        return best_time(run, repeats)

    out = {"attention": layers * fwd_bwd(lambda x: ((x + layer.self_attn(
        layer.input_layernorm(x), position_embeddings=position, attention_mask=mask)[0]) * dy).sum(), x)}
    out[MLP] = layers * fwd_bwd(lambda x: ((x + layer.mlp(layer.post_attention_layernorm(x))) * dy).sum(), x)
    if config.is_moe:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        moe, k = layer.mlp, config.moe_top_k
        tokens, d_weights, d_tokens = torch.randn(t, h, requires_grad=True), torch.randn(t, k), torch.randn(t, h)
        out["moe_routing"] = layers * fwd_bwd(lambda x: (moe.gate(x)[1] * d_weights).sum(), tokens)
        with torch.no_grad():
            _, weights, experts = moe.gate(tokens)
        weights.requires_grad_(True)
        out["moe_experts"] = layers * fwd_bwd(lambda x, w: (moe.experts(x, experts, w) * d_tokens).sum(),
                                              tokens, weights)
        logits = tuple(torch.randn(t, config.num_experts, requires_grad=True) for _ in range(layers))
        out["router_stats"] = fwd_bwd(lambda: load_balancing_loss_func(logits, config.num_experts, k))
    labels = ids
    out["embedding_head_loss"] = fwd_bwd(lambda x: model.loss_function(
        model.lm_head(inner.norm(x)), labels, config.vocab_size) + (inner.embed_tokens(ids) * dy).sum(), x)
    for p in trained:
        p.grad = torch.randn_like(p)
    out["grad_clip"] = best_time(lambda: torch.nn.utils.clip_grad_norm_(trained, 1.0), repeats)
    out["optimizer"] = best_time(opt.step, repeats)
    return out


def run_side(args, config) -> dict:
    """This process's side of the comparison: its framework's matmul rate and step time."""
    if args.side == "ours":
        peak = ms_matmul_rate()
        step, warm, trainer = bench_ours(config, args.batch, args.seq, args.warmup, args.steps, args.amp, args.lora)
        result = {"peak": peak, "step": step, "warm": warm, "rss": peak_rss()}
        if args.breakdown:
            result["pieces"] = breakdown_ours(trainer, args.batch, args.seq, args.repeats)
        return result
    peak = torch_matmul_rate()
    step, model, opt = bench_theirs(config, args.batch, args.seq, args.warmup, args.steps, args.lora)
    result = {"peak": peak, "step": step, "rss": peak_rss()}
    if args.breakdown:
        result["pieces"] = breakdown_theirs(model, opt, config, args.batch, args.seq, args.repeats)
    return result


def print_breakdown(sides: dict, flops: dict[str, float]) -> None:
    """Per piece: its GFLOP, then each side's milliseconds per step and fraction of its matmul rate;
    then each side's sum of the top pieces against its measured step."""
    for piece in TOP_PIECES[:2] + SUB_PIECES + TOP_PIECES[2:]:
        if piece in flops:
            print(f"{piece}_gflop: {flops[piece] / 1e9:.2f}")
        for side, framework in (("ours", "mindspore"), ("theirs", "torch")):
            seconds = sides[side]["pieces"].get(piece)
            if seconds is None:
                continue
            print(f"{side}_{piece}_ms: {seconds * 1e3:.1f}")
            if flops.get(piece):
                fraction = flops[piece] / seconds / sides[side]["peak"]
                print(f"{side}_{piece}_fraction_of_{framework}_matmul: {fraction:.3f}")
    for side in SIDES:
        total = sum(sides[side]["pieces"].get(piece, 0.0) for piece in TOP_PIECES)  # dense: no router_stats
        print(f"{side}_pieces_sum_ms: {total * 1e3:.1f}")
        print(f"{side}_step_ms: {sides[side]['step'] * 1e3:.1f}")
        print(f"{side}_step_minus_pieces_ms: {(sides[side]['step'] - total) * 1e3:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--amp", default="O0", choices=("O0", "O1"), help="our precision level (theirs: fp32)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank on every linear layer (0: full)")
    p.add_argument("--moe", action="store_true", help="Mixtral (H 512, 4 layers, 8 experts top-2, width 704)")
    p.add_argument("--breakdown", action="store_true", help="also time the pieces of a step on each side")
    p.add_argument("--repeats", type=int, default=5, help="--breakdown: best of this many runs per piece")
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
    if args.breakdown:
        print_breakdown(sides, piece_flops(config, args.batch, args.seq))
    if args.lora:  # the FLOP count above is full fine-tuning's (frozen weights get no weight gradients)
        print(f"lora_rank: {args.lora}")
        print(f"lora_theirs_over_ours_step_time: {sides['theirs']['step'] / sides['ours']['step']:.3f}")
    else:
        print(f"ours_over_theirs_fraction: {fractions['ours'] / fractions['theirs']:.3f}")


if __name__ == "__main__":
    main()
