"""``mindport generate``: text in, text out, streamed to stdout as tokens are produced."""
from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a saved model (streams to stdout)")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template "
                   "(the tokenizer's, else the model family's published one); the reply stops at its end of turn")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt (default: "
                   "none, so the template's own default applies, e.g. TeleChat2's and Qwen1.5's system prompts)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    add_sampling_arguments(p)
    p.add_argument("--model-parallel", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes (launch with msrun, e.g. scripts/run_infer.sh)")
    p.set_defaults(func=run)


def add_model_arguments(p) -> None:
    """The model to load (:func:`load_model`): --load, --adapter, --tokenizer, --dtype, --quantize."""
    p.add_argument("--load", required=True, help="model directory (checkpoint, mindport or HF format)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format or a LoRA training checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: the model directory)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="parameter and compute dtype (default float32; bfloat16 needs Ascend)")
    add_quantize_argument(p)


def add_quantize_argument(p) -> None:
    from mindport.constants import QUANTIZATIONS

    p.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                   help="weight-only int8 of every attention, MLP and expert projection (per-output-channel "
                        "scales, dequantized at matmul time): a quarter of their memory (mindport.models.quantize)")


def add_sampling_arguments(p) -> None:
    """Decoding settings, checked by :func:`check_sampling`."""
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


class TextStreamer:
    """Writes the text of the per-step token ids from ``model.generate`` as it becomes final
    (:class:`mindport.tokenizer.StreamDecoder`), up to the first stop id; ``end()`` writes what is
    held back. The pieces add up to ``tokenizer.decode(prompt_ids + reply)`` after the prompt's text."""

    def __init__(self, tokenizer, stop_ids, write=None, prompt_ids=()):
        from mindport.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.stop_ids = list(stop_ids)
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.finished = False

    def __call__(self, tokens) -> None:
        token = int(tokens[0])
        if self.finished or token in self.stop_ids:
            self.end()
            return
        piece = self.decoder.push(token)
        if piece:
            self.write(piece)

    def end(self) -> None:
        if not self.finished:
            self.finished = True
            piece = self.decoder.flush()
            if piece:
                self.write(piece)

    def text(self) -> str:
        return self.decoder.reply


def check_sampling(args) -> None:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    if not args.temperature > 0:
        raise ValueError(f"--temperature {args.temperature}: expected a positive number (use --greedy for argmax)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k}: expected 0 (off) or a positive integer")
    if not args.repetition_penalty > 0:
        raise ValueError(f"--repetition-penalty {args.repetition_penalty}: expected a positive number (1.0: off)")
    if not os.path.isdir(args.load):
        raise FileNotFoundError(f"{args.load}: no such model directory")


def load_tokenizer(args):
    """The tokenizer of ``--tokenizer`` or the model directory; the model family's published chat
    template applies when it has none."""
    from mindport.models.auto import AutoConfig
    from mindport.tokenizer import Tokenizer

    return Tokenizer.load(args.tokenizer or args.load, family=AutoConfig.from_pretrained(args.load).family)


def load_model(args):
    """The model of ``--load`` (+ ``--adapter``) in ``--dtype``, quantized as ``--quantize`` says (this
    process's shard under tensor parallelism)."""
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.models.quantize import quantize_weights

    model = AutoModelForCausalLM.from_pretrained(args.load, dtype=args.dtype, adapter=args.adapter)
    if args.quantize:
        quantize_weights(model, args.quantize)
    return model


def generate_reply(model, streamer: TextStreamer, ids: list[int], args) -> str:
    """Decode a reply to prompt ``ids`` with the sampling settings of ``args``, up to the first of
    ``streamer``'s stop ids, writing its text through ``streamer`` as it becomes final; returns the text."""
    import numpy as np

    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"{args.load}: the tokenizer produced id {max(ids)}, outside the model's vocabulary "
                         f"({model.config.vocab_size}); pass the model's own tokenizer with --tokenizer")
    model.generate(np.asarray([ids]), args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_token_id=streamer.stop_ids or None, seed=args.seed, streamer=streamer)
    streamer.end()
    return streamer.text()


def run(args) -> int:
    if not args.prompt.strip():
        raise ValueError("--prompt: empty (give some text to continue)")
    check_sampling(args)
    tok = load_tokenizer(args)
    if args.chat:  # the template writes its own special tokens
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        ids = tok.apply_chat_template(system + [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt: encodes to no tokens")
    rank = 0
    if args.model_parallel > 1:  # every rank holds 1/N of each layer; rank 0 prints
        from mindport.config import ParallelConfig
        from mindport.parallel.state import init_parallel

        rank = init_parallel(ParallelConfig(model_parallel=args.model_parallel)).global_rank
    model = load_model(args)
    stream = args.stream and rank == 0  # other ranks compute the same tokens silently
    # a chat reply also ends at the template's end-of-turn token
    streamer = TextStreamer(tok, tok.stop_ids(chat=args.chat), None if stream else (lambda s: None), ids)
    prompt_text = "" if args.chat else streamer.decoder.prompt_text  # printed text = decode(prompt ids + reply)
    if stream:
        streamer.write(prompt_text)
    reply = generate_reply(model, streamer, ids, args)
    if stream:
        sys.stdout.write("\n")
    elif rank == 0:
        print(prompt_text + reply)
    return 0
