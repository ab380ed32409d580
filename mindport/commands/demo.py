"""``mindport demo``: the main job, end to end on the embedded corpus, on any CPU.

tokenizer (sentencepiece BPE) -> packed data -> O1 training of a small TeleChat2-architecture
model with checkpoints -> a generated continuation from the saved checkpoint -> HF export.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

DEFAULT_PROMPT = "The for statement"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tokenizer and a small TeleChat2 model on the embedded corpus, "
                                    "generate, export (a few minutes on 2 CPU cores)")
    p.add_argument("--out", default="./mindport_demo", help="output directory (default ./mindport_demo; its "
                                                             "tokenizer/, data/, run/ and hf/ are replaced)")
    p.add_argument("--preset", default="telechat2-demo", help="model preset (default telechat2-demo)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--amp", default="O1", choices=("O0", "O1", "O2"), help="mixed precision level (default O1)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args) -> int:
    for key in ("steps", "batch_size", "seq_len", "max_new_tokens"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: expected a positive integer")
    start = time.perf_counter()
    import numpy as np

    from mindport.train.config import RunConfig
    from mindport.corpus import pydoc_topics
    from mindport.models.auto import AutoConfig, AutoModelForCausalLM
    from mindport.tokenizer import Tokenizer, train_sentencepiece
    from mindport.train.config import TrainConfig
    from mindport.train.data import prepare
    from mindport.train.run import train

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    docs = pydoc_topics()

    _say(f"[1/5] tokenizer: sentencepiece BPE, {args.vocab_size} tokens, on the embedded corpus "
         f"(CPython pydoc topics: {len(docs)} documents, {sum(map(len, docs)) / 1e3:.0f} kB)")
    tok = train_sentencepiece(docs, args.vocab_size, os.path.join(out, "tokenizer"))
    sample = docs[0][:60].replace("\n", " ")
    _say(f"      '{sample}' -> {len(tok.encode(sample))} tokens")

    _say(f"[2/5] data: tokenize, append EOS, pack into samples of {args.seq_len} tokens")
    index = prepare(docs, tok, os.path.join(out, "data"), args.seq_len)
    _say(f"      {index['num_tokens']:,} tokens -> {index['num_samples']} samples")

    model_config = AutoConfig.from_preset(args.preset)
    if model_config.vocab_size != tok.vocab_size:
        model_config = model_config.replace(vocab_size=tok.vocab_size)
    run_dir = os.path.join(out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    train_config = TrainConfig(
        seed=0, output_dir=run_dir, batch_size=args.batch_size, seq_length=args.seq_len, train_steps=args.steps,
        learning_rate=args.lr, min_learning_rate=args.lr / 20, warmup_steps=max(1, min(20, args.steps // 10)),
        weight_decay=0.1, grad_clip=1.0, amp_level=args.amp, loss_scale=1024.0 if args.amp == "O2" else 1.0,
        save_steps=max(1, args.steps // 2), keep_checkpoints=2, log_steps=max(1, args.steps // 15),
        data_dir=os.path.join(out, "data"))
    _say(f"[3/5] train: {args.preset} architecture ({model_config.num_parameters() / 1e6:.1f}M parameters, "
         f"{model_config.num_layers} layers, H {model_config.hidden_size}, {model_config.num_heads} heads / "
         f"{model_config.num_kv_heads} kv heads), AMP {args.amp}, AdamW, warm-up + cosine LR, "
         f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens")
    result = train(RunConfig(model_config, train=train_config), echo=_say)
    from mindport.train.logger import read_metrics

    losses = [m["loss"] for m in read_metrics(run_dir)]
    k = max(1, min(20, len(losses) // 4))
    _say(f"      mean loss of the first {k} steps {np.mean(losses[:k]):.3f} -> last {k} steps "
         f"{np.mean(losses[-k:]):.3f} in {result.seconds:.0f} s (uniform guess ln V = "
         f"{np.log(model_config.vocab_size):.3f}); curve: {result.plot}")

    _say(f"[4/5] checkpoint: {result.checkpoint}")
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    from mindport.commands.generate import TextStreamer

    ckpt_tok = Tokenizer.load(result.checkpoint)
    _say("      sample (temperature 0.7, top-k 40, repetition penalty 1.3) from the reloaded checkpoint:\n")
    sys.stdout.write("      " + args.prompt)
    sys.stdout.flush()
    prompt_ids = ckpt_tok.encode(args.prompt)
    streamer = TextStreamer(ckpt_tok, ckpt_tok.stop_ids(),
                            lambda s: (sys.stdout.write(s.replace("\n", "\n      ")), sys.stdout.flush()), prompt_ids)
    model.generate(np.asarray([prompt_ids]), args.max_new_tokens, do_sample=True,
                   temperature=0.7, top_k=40, repetition_penalty=1.3, eos_token_id=ckpt_tok.stop_ids(), seed=0,
                   streamer=streamer)
    streamer.end()
    _say("\n")

    hf_dir = os.path.join(out, "hf")
    model.save_pretrained(hf_dir, overwrite=True)
    ckpt_tok.save(hf_dir)
    _say(f"[5/5] exported HF format: {hf_dir} ({', '.join(sorted(os.listdir(hf_dir)))})")
    _say(f"done in {time.perf_counter() - start:.0f} s. Try: mindport generate --load {hf_dir} --prompt "
         f"\"{args.prompt}\" --stream")
    return 0
