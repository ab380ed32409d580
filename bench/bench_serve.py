"""Serving: N concurrent chat requests through the real ``openai`` client against ``mindport serve``
(continuous batching) vs the same requests one at a time, on the ~58M-parameter TeleChat2-architecture
model of ``bench_generate.py`` (random weights, a sentencepiece tokenizer trained on pydoc's topics,
TeleChat2's chat template; the output rows of the ids past the tokenizer's vocabulary are zeroed, so
greedy replies are text).

Every request is a greedy streamed chat reply of ``--new`` tokens at most, so both runs generate the
same tokens. One untimed concurrent round first compiles the batch buckets. Prints `name: value`
lines: throughput (completion tokens per second of wall time), time to first token and time per
output token percentiles (per request: (last token - first token) / (tokens - 1)); the headline,
concurrent over one-at-a-time throughput, is last.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from bench_generate import add_shape_arguments, model_config

QUESTIONS = ["What does the for statement do?", "Explain the with statement.", "How are exceptions raised?",
             "What is a generator?", "Describe name binding.", "What does import do?", "When is del useful?",
             "How do classes work?"]


def build_model(args, directory: str) -> str:
    """The benchmark model (seeded random weights) and its tokenizer in ``directory``."""
    import mindspore as ms

    from mindport import AutoModelForCausalLM
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import train_sentencepiece
    from mindport.train.checkpoint import write_safetensors

    known = train_sentencepiece(pydoc_topics(), args.tokenizer_vocab, directory).vocab_size
    ms.set_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args))
    model.config.save(os.path.join(directory, "config.json"))
    weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    weights["lm_head.weight"][known:] = 0  # logit 0 for ids the tokenizer lacks: greedy replies stay in its text
    write_safetensors(os.path.join(directory, "model.safetensors"), weights)
    return directory


def one_request(client, messages: list[dict], new: int) -> dict:
    """Arrival, first-token and last-token times and the token count of one streamed greedy reply."""
    start, stamps = time.perf_counter(), []
    stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=new, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        usage = chunk.usage or usage
    return {"start": start, "first": stamps[0] if stamps else time.perf_counter(),
            "end": stamps[-1] if stamps else time.perf_counter(), "tokens": usage.completion_tokens}


def run_round(client, conversations: list[list[dict]], new: int, all_at_once: bool) -> dict:
    start = time.perf_counter()
    if all_at_once:
        with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:
            results = list(pool.map(lambda m: one_request(client, m, new), conversations))
    else:
        results = [one_request(client, m, new) for m in conversations]
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["first"] - r["start"] for r in results]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    return {"wall": wall, "tokens": tokens, "ttft": ttft, "tpot": tpot}


def report(name: str, result: dict) -> float:
    throughput = result["tokens"] / result["wall"]
    print(f"{name}_wall_s: {result['wall']:.2f}")
    print(f"{name}_completion_tokens: {result['tokens']}")
    print(f"{name}_tokens_per_s: {throughput:.1f}")
    for what in ("ttft", "tpot"):
        for q in (50, 90, 99):
            print(f"{name}_{what}_p{q}_ms: {1000 * np.percentile(result[what], q):.1f}")
    return throughput


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"mindport serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"mindport serve did not answer in {timeout:.0f} s")
            time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_shape_arguments(p)
    p.add_argument("--requests", type=int, default=32, help="concurrent requests")
    p.add_argument("--new", type=int, default=64, help="max_tokens of each reply")
    p.add_argument("--max-len", type=int, default=256, help="the server's context per request")
    p.add_argument("--tokenizer-vocab", type=int, default=4000)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    args.moe = False  # bench_generate's model_config: the dense model
    import openai

    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    print(f"parameters_millions: {model_config(args).num_parameters() / 1e6:.1f}")
    with tempfile.TemporaryDirectory() as directory:
        build_model(args, directory)
        url = f"http://127.0.0.1:{args.port}"
        mindport = os.path.join(os.path.dirname(sys.executable), "mindport")
        proc = subprocess.Popen([mindport, "serve", "--load", directory, "--served-model-name", "bench",
                                 "--port", str(args.port), "--max-batch", str(args.requests),
                                 "--max-len", str(args.max_len)])
        try:
            wait_for(url, proc)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            conversations = [[{"role": "system", "content": "Answer briefly."},  # else TeleChat2's long default
                              {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]
                             for i in range(args.requests)]
            run_round(client, conversations, args.new, all_at_once=True)  # compiles the batch buckets
            alone = report("one_at_a_time", run_round(client, conversations, args.new, all_at_once=False))
            together = report(f"concurrent{args.requests}", run_round(client, conversations, args.new,
                                                                      all_at_once=True))
        finally:
            proc.terminate()
            proc.wait(120)
    print(f"load_average_1min_after: {os.getloadavg()[0]:.2f}")
    print(f"concurrent{args.requests}_over_one_at_a_time_throughput: {together / alone:.2f}")


if __name__ == "__main__":
    main()
