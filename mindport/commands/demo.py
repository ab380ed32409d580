"""``mindport demo``: the main job, end to end on the embedded corpus, on any CPU.

tokenizer (sentencepiece BPE) -> packed data -> O1 pretraining of a small TeleChat2-architecture
model with checkpoints -> a generated continuation from the saved checkpoint -> chat SFT (full or
LoRA) on conversations built from the corpus, loss on the assistant turns -> an answer through the
chat template -> HF export.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

DEFAULT_PROMPT = "The for statement"
DEFAULT_QUESTION = 'Explain the "while" statement.'


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
    p.add_argument("--sft-steps", type=int, default=300, help="chat fine-tuning steps (default 300)")
    p.add_argument("--lora", action="store_true", help="fine-tune LoRA adapters (rank 16, every linear layer) "
                   "on the frozen pretrained model instead of every weight; the adapter is merged for export")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="asked through the chat template after SFT")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args) -> int:
    for key in ("steps", "sft_steps", "batch_size", "seq_len", "max_new_tokens"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: expected a positive integer")
    start = time.perf_counter()
    import numpy as np

    from mindport.corpus import chat_examples, pydoc_topics
    from mindport.models.auto import AutoConfig, AutoModelForCausalLM
    from mindport.tokenizer import Tokenizer, train_sentencepiece
    from mindport.train.data import prepare
    from mindport.train.sft_data import prepare_sft

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    docs = pydoc_topics()

    _say(f"[1/7] tokenizer: sentencepiece BPE, {args.vocab_size} tokens, on the embedded corpus "
         f"(CPython pydoc topics: {len(docs)} documents, {sum(map(len, docs)) / 1e3:.0f} kB)")
    tok = train_sentencepiece(docs, args.vocab_size, os.path.join(out, "tokenizer"))
    sample = docs[0][:60].replace("\n", " ")
    _say(f"      '{sample}' -> {len(tok.encode(sample))} tokens")

    _say(f"[2/7] data: tokenize, append EOS, pack into samples of {args.seq_len} tokens")
    index = prepare(docs, tok, os.path.join(out, "data"), args.seq_len)
    _say(f"      {index['num_tokens']:,} tokens -> {index['num_samples']} samples")

    model_config = AutoConfig.from_preset(args.preset)
    if model_config.vocab_size != tok.vocab_size:
        model_config = model_config.replace(vocab_size=tok.vocab_size)
    _say(f"[3/7] pretrain: {args.preset} architecture ({model_config.num_parameters() / 1e6:.1f}M parameters, "
         f"{model_config.num_layers} layers, H {model_config.hidden_size}, {model_config.num_heads} heads / "
         f"{model_config.num_kv_heads} kv heads), AMP {args.amp}, AdamW, warm-up + cosine LR, "
         f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens")
    result = _train(args, model_config, "run", os.path.join(out, "data"), args.steps, args.lr)

    _say(f"[4/7] checkpoint: {result.checkpoint}")
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    ckpt_tok = Tokenizer.load(result.checkpoint)
    _say("      sample (temperature 0.7, top-k 40, repetition penalty 1.3) from the reloaded checkpoint:\n")
    _stream(model, ckpt_tok, ckpt_tok.encode(args.prompt), args.prompt, args.max_new_tokens, chat=False,
            do_sample=True, temperature=0.7, top_k=40, repetition_penalty=1.3, seed=0)

    records = chat_examples()
    _say(f"[5/7] chat data: {len(records)} conversations about the corpus' topics (a system prompt, a question, "
         f"its topic's first paragraph as the answer; some with a second turn), through the tokenizer's chat "
         f"template; labels only on the assistant turns, packed into samples of {args.seq_len}")
    chat_index = prepare_sft(((f"chat_examples()[{k}]", r["messages"]) for k, r in enumerate(records)), ckpt_tok,
                             os.path.join(out, "chat_data"), args.seq_len, pack=True, source="chat_examples()")
    _say(f"      {chat_index['num_tokens']:,} tokens ({chat_index['num_supervised_tokens']:,} supervised) -> "
         f"{chat_index['num_samples']} samples; {chat_index['truncated_records']} conversations cut to their "
         f"first turns")

    how = "LoRA adapters (rank 16, every linear layer; the pretrained weights frozen)" if args.lora else "every weight"
    _say(f"[6/7] chat SFT: {how}, from {result.checkpoint}, {args.sft_steps} steps")
    sft = _train(args, model_config, "sft", os.path.join(out, "chat_data"), args.sft_steps,
                 3 * args.lr if args.lora else args.lr / 2, load=result.checkpoint, lora=args.lora)

    hf_dir = os.path.join(out, "hf")
    if args.lora:
        from mindport.ckpt_tools.lora_merge import merge_lora

        merge_lora(result.checkpoint, sft.checkpoint, hf_dir, overwrite=True, progress=False)
        chat_model = AutoModelForCausalLM.from_pretrained(result.checkpoint, adapter=sft.checkpoint)
    else:
        chat_model = AutoModelForCausalLM.from_pretrained(sft.checkpoint)
        chat_model.save_pretrained(hf_dir, overwrite=True)
        Tokenizer.load(sft.checkpoint).save(hf_dir)
    messages = [{"role": "system", "content": records[0]["messages"][0]["content"]},
                {"role": "user", "content": args.question}]
    _say(f"[7/7] chat (greedy, through the chat template) with the fine-tuned model:\n\n      user: {args.question}")
    _stream(chat_model, ckpt_tok, ckpt_tok.apply_chat_template(messages, add_generation_prompt=True), "assistant: ",
            args.max_new_tokens * 2, chat=True)
    _say(f"      exported HF format ({'base + merged adapter' if args.lora else 'fine-tuned'}): {hf_dir} "
         f"({', '.join(sorted(os.listdir(hf_dir)))})")
    _say(f"done in {time.perf_counter() - start:.0f} s. Try: mindport generate --load {hf_dir} --chat "
         f"--prompt \"Tell me about the \\\"for\\\" statement.\" --stream")
    return 0


def _train(args, model_config, name: str, data_dir: str, steps: int, lr: float, load: str | None = None,
           lora: bool = False):
    """One training run of the demo into OUT/<name> (replaced); prints the loss summary."""
    import numpy as np

    from mindport.config import LoraConfig
    from mindport.train.config import RunConfig, TrainConfig
    from mindport.train.logger import read_metrics
    from mindport.train.run import train

    run_dir = os.path.join(os.path.abspath(args.out), name)
    shutil.rmtree(run_dir, ignore_errors=True)
    train_config = TrainConfig(
        seed=0, output_dir=run_dir, batch_size=args.batch_size, seq_length=args.seq_len, train_steps=steps,
        learning_rate=lr, min_learning_rate=lr / 20, warmup_steps=max(1, min(20, steps // 10)),
        weight_decay=0.1, grad_clip=1.0, amp_level=args.amp, loss_scale=1024.0 if args.amp == "O2" else 1.0,
        save_steps=max(1, steps // 2), keep_checkpoints=2, log_steps=max(1, steps // 10),
        data_dir=data_dir, load_checkpoint=load)
    adapters = LoraConfig(lora_rank=16, lora_alpha=32.0, target_modules=linear_layers(model_config)) if lora else None
    result = train(RunConfig(model_config, train=train_config, lora=adapters), echo=_say)
    losses = [m["loss"] for m in read_metrics(run_dir)]
    k = max(1, min(20, len(losses) // 4))
    _say(f"      mean loss of the first {k} steps {np.mean(losses[:k]):.3f} -> last {k} steps "
         f"{np.mean(losses[-k:]):.3f} in {result.seconds:.0f} s (uniform guess ln V = "
         f"{np.log(model_config.vocab_size):.3f}); curve: {result.plot}")
    return result


def linear_layers(config) -> tuple[str, ...]:
    """HF module names of every attention and MLP projection of ``config``'s family (q_proj / TeleChat2's
    query, key_value, dense, ...): LoRA on every linear layer."""
    from mindport.models.lora import hf_weights
    from mindport.parallel.sharding import rule_for

    return tuple(sorted({hf.rsplit(".", 2)[-2] for hf, ours in hf_weights(config).items()
                         if hf.endswith(".weight") and rule_for(ours).kind in ("column", "row")}))


def _stream(model, tok, prompt_ids: list[int], shown: str, max_new_tokens: int, chat: bool, **sampling) -> None:
    """Generate from ``prompt_ids``, printing ``shown`` and then the reply as it arrives."""
    import numpy as np

    from mindport.commands.generate import TextStreamer

    sys.stdout.write("      " + shown)
    sys.stdout.flush()
    stops = tok.stop_ids(chat=chat)
    streamer = TextStreamer(tok, stops, lambda s: (sys.stdout.write(s.replace("\n", "\n      ")), sys.stdout.flush()),
                            prompt_ids)
    model.generate(np.asarray([prompt_ids]), max_new_tokens, eos_token_id=stops, streamer=streamer, **sampling)
    streamer.end()
    _say("\n")
