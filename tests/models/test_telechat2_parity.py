"""TeleChat2 logits against transformers' Llama carrying the same weights (fp32, CPU)."""
import numpy as np
import pytest

from conftest import torch_logits
from mindport import AutoModelForCausalLM

TOL = 1e-4


@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_logits_match_llama_up_to_training_seqlen(telechat_pair, seq_len):
    llama, directory = telechat_pair
    ids = np.random.default_rng(seq_len).integers(0, 256, (2, seq_len))
    model = AutoModelForCausalLM.from_pretrained(directory, rope_fp16_tables=False)
    diff = np.abs(model(ids).asnumpy() - torch_logits(llama, ids)).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"


def test_loss_matches_llama(telechat_pair):
    import torch

    llama, directory = telechat_pair
    ids = np.random.default_rng(3).integers(0, 256, (2, 20))
    labels = ids.copy()
    labels[0, :5] = -100  # ignored positions
    model = AutoModelForCausalLM.from_pretrained(directory, rope_fp16_tables=False)
    ours = float(model(ids, labels=labels).asnumpy())
    with torch.no_grad():
        theirs = float(llama(torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss)
    assert abs(ours - theirs) <= 1e-5


def test_fp16_rope_tables_are_on_by_default_and_change_logits(telechat_pair):
    llama, directory = telechat_pair
    ids = np.random.default_rng(4).integers(0, 256, (1, 32))
    rounded = AutoModelForCausalLM.from_pretrained(directory)
    assert rounded.config.rope_fp16_tables
    exact = AutoModelForCausalLM.from_pretrained(directory, rope_fp16_tables=False)
    gap = np.abs(rounded(ids).asnumpy() - exact(ids).asnumpy()).max()
    assert 1e-6 < gap < 1e-2  # fp16 table rounding is visible but small
