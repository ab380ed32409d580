"""Weight-only int8 (mindport.models.quantize): transformers' models running torch's per-channel
quantization of the same weights as the oracle, the error against fp32 for every family, memory,
LoRA, and the one-line refusals. (TP2 under msrun: tests/parallel/test_tp_generate.py.)"""
import numpy as np
import pytest

from mindport import AutoModelForCausalLM
from mindport.config import ConfigError, LoraConfig
from mindport.models.quantize import quantize_weights, quantized_bytes
from testkit.hf_models import hf_moe, llama_tiny, save_hf_dir, telechat_from_llama, torch_logits

IDS = np.random.default_rng(0).integers(0, 256, (2, 12))
# max |int8 logits - fp32 logits| <= LOGIT_TOL x max |fp32 logits| (measured 0.7-1.6% on the tiny presets)
LOGIT_TOL = 0.03
TINY = ("telechat2-tiny-gqa", "xverse-tiny", "xverse-moe-tiny", "mixtral-tiny", "qwen-moe-tiny")


def torch_quantize_(model, keep) -> None:
    """Replace every >= 2-D weight of a transformers model whose name contains none of ``keep`` by its
    per-output-channel symmetric int8 round trip, computed by torch.ao's observer and quantize_per_channel
    (a routed experts' fused (E, out, in) parameter: each expert's rows)."""
    import torch
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or any(k in name for k in keep):
                continue
            rows = p.reshape(-1, p.shape[-1])
            observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-127, quant_max=127)
            observer(rows)
            scale, zero = observer.calculate_qparams()
            p.copy_(torch.quantize_per_channel(rows, scale, zero, 0, torch.qint8).dequantize().reshape(p.shape))


@pytest.mark.parametrize("kind", ["telechat2", "mixtral", "qwen2_moe"])
def test_int8_logits_equal_transformers_on_torch_quantized_weights(kind, tmp_path):
    if kind == "telechat2":  # transformers' Llama with TeleChat2's weights (fused key_value: rows permuted)
        theirs = llama_tiny(num_kv_heads=2, seed=3)
        directory = save_hf_dir(str(tmp_path), *telechat_from_llama(theirs, training_seqlen=32))
        ours = AutoModelForCausalLM.from_pretrained(directory, rope_fp16_tables=False)
    else:
        theirs, directory = hf_moe(kind, tmp_path)
        ours = AutoModelForCausalLM.from_pretrained(directory)
    quantize_weights(ours)
    int8 = ours(IDS).asnumpy()
    torch_quantize_(theirs, keep=("embed", "norm", "lm_head", "mlp.gate.", "router", "shared_expert_gate"))
    np.testing.assert_allclose(int8, torch_logits(theirs, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", TINY)
def test_int8_is_within_tolerance_of_fp32_and_decodes_greedily(preset):
    """Every family's tiny preset: logits within LOGIT_TOL of fp32, and the compiled int8 decoder's greedy
    tokens equal the uncached int8 forward's."""
    model = AutoModelForCausalLM.from_preset(preset)
    model.init_weights(0)
    fp32 = model(IDS).asnumpy()
    quantize_weights(model)
    int8 = model(IDS).asnumpy()
    error = np.abs(int8 - fp32).max() / np.abs(fp32).max()
    assert 0 < error <= LOGIT_TOL, error
    prompt = IDS[:1, :6]
    cached = model.generate(prompt, max_new_tokens=3, eos_token_id=[])
    assert np.array_equal(cached, model.generate(prompt, max_new_tokens=3, eos_token_id=[], use_cache=False))


def test_int8_weight_memory_is_a_quarter_of_fp32():
    """The 58M benchmark model (bench/bench_generate.py): int8 weights + fp32 scales / (fp32 bytes / 4)
    is 1 + 4 / in_features per matrix: under 1.01 here (in >= 512)."""
    from mindport.config import ModelConfig

    config = ModelConfig(family="telechat2", vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8,
                         ffn_hidden_size=1408, kv_layout="interleaved", o_bias=True, down_bias=True,
                         rope_scaling="telechat_ntk", training_seqlen=4096, base_seqlen=4096,
                         max_position_embeddings=4096, rope_fp16_tables=False)
    model = AutoModelForCausalLM.from_config(config)
    quantize_weights(model)
    int8, fp32 = quantized_bytes(model)
    assert fp32 == 4 * 8 * (4 * 512 * 512 + 3 * 512 * 1408)  # every attention and MLP matrix, nothing else
    assert 1.0 < int8 / (fp32 / 4) < 1.01


def test_int8_with_a_lora_adapter_quantizes_the_merged_weights():
    from mindport.models.lora import apply_lora

    model = AutoModelForCausalLM.from_preset("mixtral-tiny")
    model.init_weights(0)
    apply_lora(model, LoraConfig(lora_rank=2, lora_alpha=4.0, target_modules=["q_proj", "o_proj"],
                                 target_parameters=["experts.down_proj"]))
    base = model(IDS).asnumpy()
    rng = np.random.default_rng(1)
    for name, param in model.parameters_and_names():
        if "lora_B" in name:
            param.set_data(type(param)(rng.normal(0, 0.2, param.shape).astype(np.float32)).value())
    adapted = model(IDS).asnumpy()
    quantize_weights(model)
    int8 = model(IDS).asnumpy()
    assert model.lora is None and not [n for n, _ in model.parameters_and_names() if "lora" in n]
    assert np.abs(int8 - adapted).max() <= LOGIT_TOL * np.abs(adapted).max() < np.abs(adapted - base).max()


def test_a_quantized_model_refuses_training_saving_and_requantizing(tmp_path):
    from mindport.train.trainer import Trainer
    from testkit.train import run_config

    model = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa")
    with pytest.raises(ValueError, match=r"^quantize: 'int4': expected one of int8$"):
        quantize_weights(model, "int4")
    quantize_weights(model)
    with pytest.raises(ConfigError, match=r"^model: its weights are quantized \(int8\) for inference only"):
        Trainer(model, run_config(str(tmp_path / "run"), str(tmp_path / "data")).train)
    with pytest.raises(ConfigError, match=r"out: this model's weights are quantized \(int8\)"):
        model.save_pretrained(str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^quantize: the model is already quantized \(int8\)$"):
        quantize_weights(model)
