"""KV-cache generation: cached == uncached, greedy == transformers (MoE compiled too), batched == one by one."""
import numpy as np
import pytest

from testkit.hf_models import hf_moe
from mindport import AutoModelForCausalLM
from mindport.transformer.kv_cache import KVCache


@pytest.fixture(scope="module")
def tiny():
    return AutoModelForCausalLM.from_preset("telechat2-tiny-gqa")


def test_cached_logits_equal_full_forward_at_every_step(tiny):
    ids = np.random.default_rng(0).integers(0, 256, (2, 24))
    full = tiny(ids).asnumpy()
    cache = KVCache(tiny.config, 2, 24)
    prompt = 10
    logits = tiny.forward(*tiny.prepare(ids[:, :prompt]), caches=cache.layers)[0].asnumpy()
    assert np.abs(logits - full[:, :prompt]).max() <= 1e-4
    for t in range(prompt, 24):
        step = tiny.forward(*tiny.prepare(ids[:, t:t + 1], past_len=t), caches=cache.layers)[0].asnumpy()
        assert np.abs(step[:, 0] - full[:, t]).max() <= 1e-4, f"step {t}"


def test_batched_left_padded_equals_one_by_one(tiny):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batched = tiny.generate(prompts, max_new_tokens=8, eos_token_id=[])
    for row, prompt in zip(batched, prompts):
        alone = tiny.generate([prompt], max_new_tokens=8, eos_token_id=[])[0]
        assert list(row[-8:]) == list(alone[-8:])


def test_cache_and_no_cache_generate_the_same(tiny):
    a = tiny.generate([[1, 2, 3]], max_new_tokens=10, eos_token_id=[])
    b = tiny.generate([[1, 2, 3]], max_new_tokens=10, eos_token_id=[], use_cache=False)
    assert np.array_equal(a, b)


def test_sampling_is_seeded_and_respects_top_k(tiny):
    a = tiny.generate([[1, 2, 3]], max_new_tokens=12, do_sample=True, top_k=5, temperature=0.8, seed=7, eos_token_id=[])
    b = tiny.generate([[1, 2, 3]], max_new_tokens=12, do_sample=True, top_k=5, temperature=0.8, seed=7, eos_token_id=[])
    assert np.array_equal(a, b)
    greedy = tiny.generate([[1, 2, 3]], max_new_tokens=1, eos_token_id=[])
    one = tiny.generate([[1, 2, 3]], max_new_tokens=1, do_sample=True, top_k=1, seed=3, eos_token_id=[])
    assert np.array_equal(greedy, one)  # top-k 1 sampling is greedy


def test_stops_per_sequence_on_eos(tiny):
    first = tiny.generate([[1, 2, 3]], max_new_tokens=1, eos_token_id=[])[0, -1]
    out = tiny.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=6, eos_token_id=int(first), pad_token_id=0)
    assert out[0, 3] == first and (out[0, 4:] == 0).all()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_greedy_matches_transformers_generate(tmp_path, kind):
    import torch

    model, directory = hf_moe(kind, tmp_path)
    prompt = np.random.default_rng(1).integers(3, 256, (1, 7))
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0).numpy()
    mindport_model = AutoModelForCausalLM.from_pretrained(directory)
    ours = mindport_model.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert np.array_equal(ours, theirs)
    assert list(mindport_model.compiled_decoders) == [(1, 19)], "MoE decodes with the compiled static-cache step"


@pytest.mark.parametrize("prompt, message", [([[]], "empty"), ([list(range(40))], "longer than max_position"),
                                             ([[300]], "outside the vocabulary")])
def test_bad_prompts(tiny, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("penalty", [0.0, -1.0])
def test_repetition_penalty_must_be_positive(tiny, penalty):
    with pytest.raises(ValueError, match=f"repetition_penalty = {penalty}: expected a positive number"):
        tiny.generate([[1, 2, 3]], max_new_tokens=2, repetition_penalty=penalty)
