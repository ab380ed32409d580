"""A tiny XVERSE (LLaMA layout) made by transformers, saved with a Metaspace BPE tokenizer: the model
every evaluation test scores, and the transformers model that computes the references."""
from __future__ import annotations

import pytest

from testkit.benchmarks import WINDOW


@pytest.fixture(scope="session")
def tiny_eval_model(tmp_path_factory):
    """(HF model directory with tokenizer files, transformers LlamaForCausalLM with the same weights,
    transformers tokenizer)."""
    from transformers import AutoTokenizer

    from testkit.hf_models import llama_tiny, save_hf_dir
    from testkit.tokenizers import metaspace_bos

    llama = llama_tiny(num_kv_heads=4, seed=3, bias=False, eps=1e-6, vocab=512, max_pos=WINDOW)
    c = llama.config
    config = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
              "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": WINDOW, "rope_theta": 10000.0,
              "bos_token_id": 1, "eos_token_id": 2}
    directory = str(tmp_path_factory.mktemp("eval_model"))
    save_hf_dir(directory, config, {k: v.detach().numpy() for k, v in llama.state_dict().items()})
    metaspace_bos(directory)
    return directory, llama, AutoTokenizer.from_pretrained(directory)
