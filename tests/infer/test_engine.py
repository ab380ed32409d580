"""Continuous batching (mindport.infer.engine): a request's tokens do not depend on what runs beside it
(dense and MoE, against generate() and transformers), slots are freed at once, errors are one line."""
from __future__ import annotations

import threading
import time

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


def workload(seed: int, count: int = 16, longest: int = 16):
    """``count`` greedy requests of different prompt lengths (<= ``longest``: few prefill graphs) and
    lengths (each leaves at another step)."""
    rng = np.random.default_rng(seed)
    return [(list(map(int, rng.integers(3, 256, int(rng.integers(1, longest + 1))))),
             dict(max_tokens=int(rng.integers(2, 14)), **GREEDY)) for _ in range(count)]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A TeleChat2 tiny model equal to a transformers Llama (the oracle), and its running engine."""
    llama = llama_tiny(num_kv_heads=2, seed=4)
    hf_config, tensors = telechat_from_llama(llama, training_seqlen=24)  # longer rows switch to NTK RoPE
    directory = save_hf_dir(str(tmp_path_factory.mktemp("dense")), hf_config, tensors)
    model = AutoModelForCausalLM.from_pretrained(directory)
    engine = Engine({"base": model}, max_batch=8, max_len=48)
    engine.start()
    yield llama, model, engine, directory
    engine.shutdown()


def test_greedy_dense_is_independent_of_batching_and_equals_transformers(dense):
    import torch

    llama, model, engine, _ = dense
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
    longest = max(range(len(others)), key=lambda k: len(others[k][0]) + others[k][1]["max_tokens"])
    other_prompt, params = others[longest]
    assert len(other_prompt) + params["max_tokens"] > 24 + 1, "a row decodes past training_seqlen (dynamic NTK)"
    alone = model.generate([other_prompt], max_new_tokens=params["max_tokens"], eos_token_id=[])
    assert other_tokens[longest] == list(alone[0, len(other_prompt):])
    assert engine.stats()["running"] == 0


def test_row_inputs_equal_prepare_of_each_row_alone(dense):
    """Each row's RoPE tables (TeleChat2's NTK from its own total length) and causal mask, host side."""
    from mindport.infer.decoder import CompiledDecoder
    from mindport.transformer.attention import MASK_VALUE

    model = dense[1]
    decoder = CompiledDecoder(model, 4, 48)
    ids = np.random.default_rng(3).integers(3, 256, (3, 8))
    starts, lengths = np.array([0, 20, 37]), np.array([8, 1, 3])  # totals 8, 21, 40: NTK alpha 1, 1, 3
    _, cos, sin, mask, _ = (t.asnumpy() if t is not None else None for t in decoder.row_inputs(ids, starts, lengths))
    for i, (start, real) in enumerate(zip(starts, lengths)):
        _, ref_cos, ref_sin, ref_mask, _ = model.prepare(ids[i:i + 1, :real], past_len=int(start))
        assert np.array_equal(cos[i, :, :real], ref_cos.asnumpy()[0])
        assert np.array_equal(sin[i, :, :real], ref_sin.asnumpy()[0])
        assert np.array_equal(mask[i, :, :real, :start + real], ref_mask.asnumpy()[0])
        assert (mask[i, :, :real, start + real:] == MASK_VALUE).all()


def test_moe_greedy_is_independent_of_batching(tmp_path):
    _, directory = hf_moe("mixtral", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(directory)
    engine = Engine({"moe": model}, max_batch=4, max_len=40)
    engine.start()
    prompt = [7, 3, 200, 41, 9]
    target = (prompt, dict(max_tokens=10, **GREEDY))
    others = workload(1, count=8, longest=8)
    among, other_tokens = run_mixed(engine, "moe", target, others)
    assert among == run_alone(engine, "moe", prompt, **target[1])
    assert among == list(model.generate([prompt], max_new_tokens=10, eos_token_id=[])[0, len(prompt):])
    for (other_prompt, params), tokens in zip(others[:3], other_tokens):
        assert tokens == run_alone(engine, "moe", other_prompt, **params)
    engine.shutdown()


def test_sampling_is_per_request_seeded_and_independent_of_batching(dense):
    _, model, engine, _ = dense
    prompt, params = [9, 8, 7, 6], dict(max_tokens=10, temperature=0.9, top_p=0.8, seed=11)
    among, _ = run_mixed(engine, "base", (prompt, params), workload(2, count=6))
    assert among == run_alone(engine, "base", prompt, **params)
    ours = model.generate([prompt], max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8, seed=11,
                          eos_token_id=[])
    assert among == list(ours[0, len(prompt):])
    assert among != run_alone(engine, "base", prompt, **dict(params, seed=12))


def test_cancel_timeout_stop_queue_full_and_shutdown(dense):
    _, model, _, _ = dense
    first = model.generate([[6, 7]], max_new_tokens=1, eos_token_id=[])[0, -1]  # before the engine's thread
    expected = list(model.generate([[1, 2]], max_new_tokens=3, eos_token_id=[])[0, 2:])  # runs graphs
    engine = Engine({"base": model}, max_batch=1, max_queue=1, max_len=48)
    collector = Collector()
    ids = {}

    def late_event(event):  # on the engine's thread: cancel the long request once this one timed out
        collector(event)
        engine.cancel(ids["long"])

    def long_event(event):  # on its second token, a request arrives that cannot get the only row
        collector(event)
        if len(collector.tokens[event.request_id]) == 2 and event.token is not None:
            ids["late"] = collector.submit(engine, "base", [4, 5], timeout=0.05, on_event=late_event, max_tokens=2)
            time.sleep(0.1)  # the late request's deadline passes before the next step boundary

    ids["long"] = collector.submit(engine, "base", [1, 2, 3], on_event=long_event, max_tokens=40, **GREEDY)
    with pytest.raises(QueueFull, match="max_queue = 1"):
        engine.submit("base", [4], SamplingParams(max_tokens=2), collector)
    engine.start()
    collector.wait()
    long, late = ids["long"], ids["late"]
    assert collector.final[late].finish_reason == "timeout" and late not in collector.tokens
    stopped = collector.submit(engine, "base", [6, 7], max_tokens=5, stop_token_ids=frozenset({int(first)}),
                               **GREEDY)
    collector.wait()
    assert collector.final[long].finish_reason == "cancelled"
    assert 2 <= collector.final[long].completion_tokens < 40
    assert collector.final[stopped].finish_reason == "stop" and collector.tokens[stopped] == [first]
    assert collector.final[stopped].prompt_tokens == 2 and collector.final[stopped].completion_tokens == 1

    def broken(event):
        collector(event)
        raise RuntimeError("a callback bug")

    collector.submit(engine, "base", [1], on_event=broken, max_tokens=2)
    collector.wait()
    assert run_alone(engine, "base", [1, 2], max_tokens=3, **GREEDY) == expected
    engine.shutdown()
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit("base", [1], SamplingParams(max_tokens=2), collector)


@pytest.mark.parametrize("model, prompt, params, message", [
    ("nope", [1], {}, r"model 'nope': unknown: expected one of \['base'\]"),
    ("base", [], {}, "prompt: empty"),
    ("base", [1, 256], {}, r"prompt: token id 256 outside the vocabulary \[0, 256\)"),
    ("base", [1] * 40, dict(max_tokens=9), r"prompt \(40\) \+ max_tokens exceeds the context of 48 tokens"),
    ("base", [1], dict(max_tokens=0), "max_tokens = 0: expected an integer >= 1"),
    ("base", [1], dict(temperature=-1.0), "temperature = -1.0: expected a finite number >= 0"),
    ("base", [1], dict(top_p=0.0), "top_p = 0.0: expected 0 < top_p <= 1"),
    ("base", [1], dict(seed=-3), "seed = -3: expected None or an integer >= 0"),
])
def test_bad_requests_are_one_line_value_errors(dense, model, prompt, params, message):
    engine = dense[2]
    with pytest.raises(ValueError, match=message):
        engine.submit(model, prompt, SamplingParams(**{"max_tokens": 2, **params}), lambda event: None)


def test_engine_settings_are_checked(tmp_path):
    _, directory = hf_moe("mixtral", tmp_path)  # plain RoPE: max_position_embeddings 64 is a hard limit
    model = AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(ValueError, match="max_len = 65: expected 2 <= max_len <= max_position_embeddings = 64"):
        Engine({"moe": model}, max_len=65)
    with pytest.raises(ValueError, match="max_batch = 0, max_queue = 4: expected max_batch >= 1"):
        Engine({"moe": model}, max_batch=0, max_queue=4)
    assert Engine({"moe": model}).max_len == 64


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(dense, monkeypatch):
    engine = dense[2]
    healthy = engine._run
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost\nsecond line")
        return healthy(*args, **kwargs)

    monkeypatch.setattr(engine, "_run", fail_once)
    collector = Collector()
    broken = collector.submit(engine, "base", [1, 2], max_tokens=3, **GREEDY)
    collector.wait()
    assert collector.final[broken].finish_reason == "error"
    assert collector.final[broken].error == "RuntimeError: device lost"
    assert len(run_alone(engine, "base", [1, 2], max_tokens=3, **GREEDY)) == 3
    assert engine.stats()["running"] == 0


def test_base_and_lora_adapter_by_name(dense, tmp_path):
    from mindspore import Tensor

    from mindport.config import LoraConfig
    from mindport.models.lora import apply_lora, save_adapter

    _, base, _, directory = dense
    tuned = AutoModelForCausalLM.from_pretrained(directory)
    apply_lora(tuned, LoraConfig(lora_rank=4, lora_alpha=8.0, target_modules=["query", "dense"]))
    rng = np.random.default_rng(0)
    for _, p in tuned.parameters_and_names():  # B starts at zero: make the adapter matter
        if p.requires_grad:
            p.set_data(Tensor(p.asnumpy() + 0.3 * rng.standard_normal(p.shape).astype(np.float32)))
    save_adapter(tuned, str(tmp_path / "adapter"))
    tuned = AutoModelForCausalLM.from_pretrained(directory, adapter=str(tmp_path / "adapter"))
    engine = Engine({"base": base, "tuned": tuned}, max_batch=8, max_len=48)
    engine.start()
    collector = Collector()
    prompts = [[3, 4, 5], [60, 61, 62]]  # one length: generate() compiles one decoder
    ids = {(name, k): collector.submit(engine, name, prompt, max_tokens=8, **GREEDY)
           for k, prompt in enumerate(prompts) for name in ("tuned", "base")}
    collector.wait()
    engine.shutdown()
    for k, prompt in enumerate(prompts):
        alone = tuned.generate([prompt], max_new_tokens=8, eos_token_id=[])
        assert collector.tokens[ids["tuned", k]] == list(alone[0, len(prompt):])
        assert collector.tokens[ids["base", k]] == run_alone(dense[2], "base", prompt, max_tokens=8, **GREEDY)
    assert any(collector.tokens[ids["tuned", k]] != collector.tokens[ids["base", k]] for k in range(2))
