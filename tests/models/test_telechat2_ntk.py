"""TeleChat2's dynamic NTK + mscale RoPE against an independent numpy implementation."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindport import AutoModelForCausalLM
from mindport.transformer.rope import ntk_scaling, rope_tables
from testkit import numpy_models as ref


@pytest.mark.parametrize("total, alpha, mscale", [(16, 1, 1.0), (32, 1, 1.0), (33, 3, 0.1 * np.log(33 / 32) + 1),
                                                  (64, 3, 0.1 * np.log(2) + 1), (65, 7, 0.1 * np.log(65 / 32) + 1)])
def test_alpha_and_mscale_steps(total, alpha, mscale):
    got_alpha, got_mscale = ntk_scaling(total, training_seqlen=32, base_seqlen=32)
    assert got_alpha == alpha and got_mscale == pytest.approx(mscale, rel=1e-12)


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("total", [20, 32, 48, 200])
def test_tables_equal_reference(fp16, total):
    cfg = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa").config.replace(rope_fp16_tables=fp16)
    cos, sin = rope_tables(cfg, total)
    rcos, rsin = ref.telechat_rope_tables(total, cfg.head_dim, 32, 32, fp16=fp16)
    tol = 0 if fp16 else 1e-5  # fp16 tables bit-identical; fp32 ones differ by fp32 angle rounding
    assert np.abs(cos - rcos).max() <= tol and np.abs(sin - rsin).max() <= tol


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("seq_len", [16, 48, 64])
def test_logits_equal_numpy_reference_beyond_training_seqlen(telechat_pair, fp16, seq_len):
    _, directory = telechat_pair
    hf_config = json.load(open(os.path.join(directory, "config.json")))
    weights = load_file(os.path.join(directory, "model.safetensors"))
    ids = np.random.default_rng(seq_len).integers(0, 256, (2, seq_len))
    expected = ref.forward(hf_config, weights, ids, rope_fp16_tables=fp16)
    model = AutoModelForCausalLM.from_pretrained(directory, rope_fp16_tables=fp16)
    diff = np.abs(model(ids).asnumpy() - expected).max()
    assert diff <= 1e-5, f"max abs diff {diff:.2e}"


def test_tables_of_successive_decode_steps_share_one_computed_table():
    """A decode step asks for one more position each time: the tables are read-only views of one
    table computed once per scaling (cos and sin in float64 were a third of the host's time per token),
    and a row does not depend on how many rows were asked for."""
    cfg = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa").config
    (cos_a, sin_a), (cos_b, sin_b) = rope_tables(cfg, 20, 21), rope_tables(cfg, 22, 23)
    assert np.shares_memory(cos_a, cos_b) and np.shares_memory(sin_a, sin_b)
    assert not cos_a.flags.writeable and not sin_b.flags.writeable
    assert np.array_equal(cos_b[:21], cos_a) and np.array_equal(rope_tables(cfg, 22, 200)[1][:23], sin_b)
