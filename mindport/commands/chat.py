"""``mindport chat``: a terminal conversation with a model through its chat template.

Each message is sent with the whole conversation so far (system message, earlier user messages and
the model's replies) rendered by the chat template, as ``generate --chat`` renders one message; the
reply streams to stdout. ``/reset`` forgets the conversation, ``/exit`` or the end of input leaves.
When the conversation no longer fits the context (prompt + ``--max-new-tokens`` within
``max_position_embeddings``), its oldest exchanges are dropped.
"""
from __future__ import annotations

import sys

from mindport.commands.generate import (TextStreamer, add_model_arguments, add_sampling_arguments, check_sampling,
                                        generate_reply, load_model, load_tokenizer)

RESET, EXIT = "/reset", "/exit"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (history kept, replies streamed)")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message opening the conversation (default: none, so "
                   "the template's own default applies)")
    add_sampling_arguments(p)
    p.set_defaults(func=run)


def read_message() -> str | None:
    """The next line the user typed (a "> " prompt on a terminal), or None at the end of input."""
    try:
        return input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None


def fit_history(tok, system: list[dict], history: list[dict], message: dict, room: int) -> tuple[list[dict], list[int]]:
    """(history kept, prompt ids): the oldest exchanges of ``history`` dropped until the rendered prompt
    leaves ``room`` tokens of the context for the reply."""
    while True:
        ids = tok.apply_chat_template(system + history + [message], add_generation_prompt=True)
        if len(ids) <= room or not history:
            return history, ids
        history = history[2:]  # one user message and its reply
        print("(the oldest exchange was dropped: the conversation outgrew the context)", file=sys.stderr)


def run(args) -> int:
    check_sampling(args)
    tok = load_tokenizer(args)
    model = load_model(args)
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    room = model.config.max_position_embeddings - args.max_new_tokens
    print(f"mindport chat: {args.load}; {RESET} forgets the conversation, {EXIT} or end of input leaves",
          file=sys.stderr)
    history: list[dict] = []
    while (line := read_message()) is not None and line.strip() != EXIT:
        if line.strip() == RESET:
            history = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        message = {"role": "user", "content": line}
        history, ids = fit_history(tok, system, history, message, room)
        if len(ids) > room:
            print(f"mindport: error: message: {len(ids)} tokens with the template, more than the context "
                  f"({model.config.max_position_embeddings}) leaves beside --max-new-tokens {args.max_new_tokens}",
                  file=sys.stderr)
            continue
        reply = generate_reply(model, TextStreamer(tok, tok.stop_ids(chat=True), prompt_ids=ids), ids, args)
        sys.stdout.write("\n")
        history += [message, {"role": "assistant", "content": reply}]
    return 0
