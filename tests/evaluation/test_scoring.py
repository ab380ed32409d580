"""mindport.evaluation.scoring against transformers on the same weights: log-likelihoods and greedy flags
(torch log-softmax over the same ids, one request at a time, unpadded), lm-eval's rolling windows, and
greedy generation cut at stop strings (transformers' generate)."""
import numpy as np
import pytest

from testkit.benchmarks import WINDOW, torch_loglikelihood


@pytest.fixture(scope="module")
def model(tiny_eval_model):
    from mindport import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_eval_model[0])


def test_loglikelihoods_equal_torch_log_softmax(model, tiny_eval_model):
    from mindport.evaluation.scoring import loglikelihoods

    llama = tiny_eval_model[1]
    rng = np.random.default_rng(0)
    requests = [(rng.integers(3, 512, n).tolist(), rng.integers(3, 512, c).tolist())
                for n, c in ((5, 1), (40, 3), (17, 1), (3, 9), (300, 2))]  # the last is cut to the window
    # greedy continuations, so is_greedy is also tested True
    import torch
    for context in ([7, 8, 9], rng.integers(3, 512, 30).tolist()):
        with torch.no_grad():
            out = llama.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)
        requests.append((context, out[0, len(context):].tolist()))
    got = loglikelihoods(model, requests, batch_size=3)
    expected = [torch_loglikelihood(llama, list(c), list(x)) for c, x in requests]
    assert [g for _, g in got] == [g for _, g in expected]
    assert any(g for _, g in expected) and not all(g for _, g in expected)
    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in expected], rtol=1e-4, atol=1e-4)


def test_rolling_windows_follow_lm_eval():
    from mindport.evaluation.scoring import rolling_windows

    tokens = list(range(10, 21))  # 11 tokens, window 4
    assert rolling_windows(tokens, 1, 4) == [([1], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]),
                                             ([16, 17], [18, 19, 20])]
    assert rolling_windows([5], 1, 4) == [([1], [5])]


def test_rolling_loglikelihoods_sum_the_windows(model, tiny_eval_model):
    from mindport.evaluation.scoring import rolling_loglikelihoods, rolling_windows

    llama = tiny_eval_model[1]
    rng = np.random.default_rng(1)
    sequences = [[1] + rng.integers(3, 512, n).tolist() for n in (12, 600)]  # 600: three windows
    got = rolling_loglikelihoods(model, sequences, batch_size=2)
    expected = [sum(torch_loglikelihood(llama, c, x)[0] for c, x in rolling_windows(s[1:], s[0], WINDOW))
                for s in sequences]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_generate_until_equals_transformers_greedy(model, tiny_eval_model):
    import torch

    from mindport.evaluation.scoring import generate_until
    from mindport.tokenizer import Tokenizer

    directory, llama, hf_tok = tiny_eval_model
    prompts = ["Hello world, the quick", "The for statement iterates; 你好", "On the other hand the lazy dog"]
    expected = []
    for prompt in prompts:
        ids = hf_tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = llama.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        expected.append(hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    stop = expected[1][len(expected[1]) // 2:][:2]  # a stop string inside the second continuation
    until = [[], [stop], ["\n\n"]]
    got = generate_until(model, Tokenizer.load(directory), prompts, until, max_new_tokens=12, batch_size=2)
    assert stop and got[1] == expected[1].split(stop)[0]
    assert got[0] == expected[0] and got[2] == expected[2].split("\n\n")[0]
