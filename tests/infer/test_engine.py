"""Continuous batching (mindport.infer.engine): a request's tokens do not depend on what runs beside it
(dense and MoE, against generate() and transformers), slots are freed at once, errors are one line."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from mindport import AutoModelForCausalLM
from mindport.infer.engine import Engine, QueueFull, SamplingParams, TokenEvent
from testkit.hf_models import hf_moe, llama_tiny, save_hf_dir, telechat_from_llama

GREEDY = dict(temperature=0.0)


class Collector:
    """on_event callbacks that record each request's tokens and final event; ``wait`` for all of them."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.final: dict[int, TokenEvent] = {}
        self.expected = 0
        self.done = threading.Condition()

    def __call__(self, event: TokenEvent) -> None:
        with self.done:
            if event.token is not None:
                self.tokens.setdefault(event.request_id, []).append(event.token)
            if event.finish_reason is not None:
                self.final[event.request_id] = event
                self.done.notify_all()

    def submit(self, engine, model, prompt, timeout=None, on_event=None, **params) -> int:
        with self.done:
            self.expected += 1
        return engine.submit(model, prompt, SamplingParams(**params), on_event or self, timeout=timeout)

    def wait(self, seconds: float = 300.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.final) == self.expected, seconds), "requests did not finish"


def run_alone(engine, model, prompt, **params) -> list[int]:
    collector = Collector()
    rid = collector.submit(engine, model, prompt, **params)
    collector.wait()
    return collector.tokens.get(rid, [])


def run_mixed(engine, model, target, others) -> tuple[list[int], list[list[int]]]:
    """``target`` (prompt, params) joins mid-decode, with half of ``others`` already running and the
    rest arriving with it; returns the target's tokens and each other's."""
    collector = Collector()
    half = len(others) // 2
    ids: dict[int, int] = {}
    joined = threading.Event()

    def first_request_event(event: TokenEvent) -> None:
        collector(event)
        if len(collector.tokens.get(event.request_id, [])) == 2 and not joined.is_set():
            joined.set()  # on the engine's thread, between two steps
            ids[-1] = collector.submit(engine, model, target[0], **target[1])
            for k in range(half, len(others)):
                ids[k] = collector.submit(engine, model, others[k][0], **others[k][1])

    ids[0] = collector.submit(engine, model, others[0][0], on_event=first_request_event, **others[0][1])
    for k in range(1, half):
        ids[k] = collector.submit(engine, model, others[k][0], **others[k][1])
    collector.wait()
    assert joined.is_set()
    return collector.tokens[ids[-1]], [collector.tokens[ids[k]] for k in range(len(others))]


def workload(seed: int, count: int = 16):
    """``count`` greedy requests of different prompt lengths and lengths (each leaves at another step)."""
    rng = np.random.default_rng(seed)
    return [(list(map(int, rng.integers(3, 256, int(rng.integers(1, 20))))),
             dict(max_tokens=int(rng.integers(2, 14)), **GREEDY)) for _ in range(count)]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A TeleChat2 tiny model equal to a transformers Llama (the oracle), and its running engine."""
    llama = llama_tiny(num_kv_heads=2, seed=4)
    hf_config, tensors = telechat_from_llama(llama, training_seqlen=64)
    model = AutoModelForCausalLM.from_pretrained(save_hf_dir(str(tmp_path_factory.mktemp("dense")), hf_config, tensors))
    engine = Engine({"base": model}, max_batch=8, max_len=48)
    engine.start()
    yield llama, model, engine
    engine.shutdown()


def test_greedy_dense_is_independent_of_batching_and_equals_transformers(dense):
    import torch

    llama, model, engine = dense
    prompt, max_tokens = [5, 17, 99, 4, 250, 31, 8], 12
    target = (prompt, dict(max_tokens=max_tokens, **GREEDY))
    others = workload(0)
    among, other_tokens = run_mixed(engine, "base", target, others)
    alone = run_alone(engine, "base", prompt, **target[1])
    ours = list(model.generate([prompt], max_new_tokens=max_tokens, eos_token_id=[])[0, len(prompt):])
    with torch.no_grad():
        theirs = llama.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert among == alone == ours == theirs
    for (other_prompt, params), tokens in zip(others, other_tokens):
        assert tokens == run_alone(engine, "base", other_prompt, **params)
    assert engine.stats()["running"] == 0


def test_moe_greedy_is_independent_of_batching(tmp_path):
    _, directory = hf_moe("mixtral", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(directory)
    engine = Engine({"moe": model}, max_batch=4, max_len=40)
    engine.start()
    prompt = [7, 3, 200, 41, 9]
    target = (prompt, dict(max_tokens=10, **GREEDY))
    others = workload(1, count=8)
    among, other_tokens = run_mixed(engine, "moe", target, others)
    assert among == run_alone(engine, "moe", prompt, **target[1])
    assert among == list(model.generate([prompt], max_new_tokens=10, eos_token_id=[])[0, len(prompt):])
    for (other_prompt, params), tokens in zip(others[:3], other_tokens):
        assert tokens == run_alone(engine, "moe", other_prompt, **params)
    engine.shutdown()
