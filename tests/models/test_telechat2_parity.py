"""TeleChat2 logits against transformers' Llama carrying the same weights (fp32, CPU)."""
import numpy as np
import pytest

from testkit.hf_models import torch_logits
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


def test_gradients_match_llama(telechat_pair):
    """Every weight's gradient of the training loss (fused LogSoftmax cross-entropy, the attention
    core's hand-written backward) against torch autograd through transformers' Llama."""
    import mindspore as ms
    import torch
    from mindspore import Tensor

    from mindport.train.trainer import next_token_targets

    llama, directory = telechat_pair
    ids = np.random.default_rng(5).integers(0, 256, (2, 24))
    labels = ids.copy()
    labels[1, :6] = -100
    model = AutoModelForCausalLM.from_pretrained(directory, rope_fp16_tables=False)
    params = model.trainable_params()
    t_ids, cos, sin, mask, _ = model.prepare(ids)

    def loss_fn(targets):
        logits, router_loss, _ = model.forward(t_ids, cos, sin, mask)
        return model.loss_from_targets(logits, router_loss, targets)

    grads = ms.jit(ms.grad(loss_fn, None, params))(Tensor(next_token_targets(labels)))
    ours = {p.name: g.asnumpy() for p, g in zip(params, grads)}

    llama.zero_grad()
    llama(torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.backward()
    theirs = {n: p.grad.numpy() for n, p in llama.named_parameters()}
    c = llama.config
    hd = c.hidden_size // c.num_attention_heads
    pairs = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
             "final_norm.weight": "model.norm.weight"}
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        pairs.update({f"layers.{i}.{ours_name}": hf + name for ours_name, name in (
            ("attn_norm.weight", "input_layernorm.weight"), ("attn.q_proj.weight", "self_attn.q_proj.weight"),
            ("attn.o_proj.weight", "self_attn.o_proj.weight"), ("attn.o_proj.bias", "self_attn.o_proj.bias"),
            ("mlp_norm.weight", "post_attention_layernorm.weight"), ("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
            ("mlp.up_proj.weight", "mlp.up_proj.weight"), ("mlp.down_proj.weight", "mlp.down_proj.weight"),
            ("mlp.down_proj.bias", "mlp.down_proj.bias"))})
        kv = ours.pop(f"layers.{i}.attn.kv_proj.weight").reshape(c.num_key_value_heads, 2, hd, c.hidden_size)
        ours[f"layers.{i}.attn.k"], ours[f"layers.{i}.attn.v"] = kv[:, 0].reshape(-1, c.hidden_size), kv[:, 1].reshape(
            -1, c.hidden_size)
        pairs[f"layers.{i}.attn.k"], pairs[f"layers.{i}.attn.v"] = hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"
    assert set(pairs) == set(ours)
    for name, hf_name in pairs.items():
        scale = np.abs(theirs[hf_name]).max()
        assert np.abs(ours[name] - theirs[hf_name]).max() <= 1e-4 * scale + 1e-7, name
