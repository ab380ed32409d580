"""``mindport demo``: the main job on the embedded corpus, runnable on any CPU."""
from __future__ import annotations

import math
import time


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build a small TeleChat2-architecture model and score the embedded corpus")
    p.add_argument("--preset", default="telechat2-demo", help="model preset (default: telechat2-demo)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from mindport import AutoModelForCausalLM
    from mindport.corpus import pydoc_topics

    text = "\n\n".join(pydoc_topics()).encode("utf-8")
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)  # byte-level ids until a tokenizer is trained
    model = AutoModelForCausalLM.from_preset(args.preset)
    cfg = model.config
    print(f"model: {args.preset} ({cfg.num_parameters() / 1e6:.1f}M parameters, {cfg.num_layers} layers, "
          f"H {cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads)")
    print(f"corpus: pydoc_data.topics, {len(tokens):,} byte tokens")
    n = args.batch_size * args.seq_len
    batch = tokens[:n].reshape(args.batch_size, args.seq_len)
    start = time.perf_counter()
    loss = float(model(batch, labels=batch).asnumpy())
    print(f"forward: {time.perf_counter() - start:.2f} s for {n} tokens")
    print(f"loss: {loss:.4f} (uniform guess ln V = {math.log(cfg.vocab_size):.4f})")
    return 0
