"""Requests through the continuous-batching engine under a parallel layout (msrun): rank 0 schedules,
the other ranks follow; rank 0 writes the tokens, every rank its parameters.

usage: engine_worker.py MODEL_DIR OUT_DIR ['{"model_parallel": 2}']
"""
import json
import os
import sys
import threading

import numpy as np

from mindport import AutoModelForCausalLM, ParallelConfig
from mindport.infer.engine import Engine, SamplingParams
from mindport.parallel.state import init_parallel

REQUESTS = [([5, 6, 7, 8, 9], dict(max_tokens=8, temperature=0.0)),
            ([11, 12], dict(max_tokens=5, temperature=0.0)),
            ([40, 41, 42], dict(max_tokens=7, temperature=0.0)),  # join while the first two decode
            ([3, 1, 4, 1, 5, 9, 2, 6], dict(max_tokens=6, temperature=0.8, top_p=0.9, seed=5))]


def serve(engine: Engine) -> dict[int, list[int]]:
    """Two requests first, the other two submitted from the first one's second token."""
    tokens: dict[int, list[int]] = {}
    finished = threading.Semaphore(0)

    def on_event(event):
        if event.token is not None:
            tokens.setdefault(event.request_id, []).append(event.token)
        if event.request_id == 0 and len(tokens[0]) == 2 and event.token is not None:
            for prompt, params in REQUESTS[2:]:
                engine.submit("base", prompt, SamplingParams(**params), on_event)
        if event.finish_reason is not None:
            finished.release()

    engine.start()
    for prompt, params in REQUESTS[:2]:
        engine.submit("base", prompt, SamplingParams(**params), on_event)
    for _ in REQUESTS:
        finished.acquire()
    engine.shutdown()
    return tokens


def main(model_dir: str, out_dir: str, layout: dict) -> None:
    groups = init_parallel(ParallelConfig.from_dict(layout))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine = Engine({"base": model}, max_batch=4, max_len=32)
    dump = {f"coord:{k}": np.array(v) for k, v in groups.coords.items()}
    if groups.global_rank == 0:
        tokens = serve(engine)
        with open(os.path.join(out_dir, "tokens.json"), "w") as f:
            json.dump([tokens[i] for i in range(len(REQUESTS))], f)
    else:
        engine.run_follower()
    for name, param in model.parameters_and_names():
        dump[f"param:{name}"] = param.asnumpy()
    np.savez(os.path.join(out_dir, f"rank{groups.global_rank}.npz"), **dump)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
