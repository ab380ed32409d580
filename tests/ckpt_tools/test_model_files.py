"""Export fidelity: every conversion, training checkpoint and save_pretrained carries the tokenizer,
generation_config.json, remote code and other non-weight files, and an HF export's config.json is
the source's (keys and values verbatim: XVERSE's auto_map and hidden_act, Qwen2-MoE's null
bos/eos and its intermediate_size)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from testkit.checkpoints import KINDS
from testkit.hf_models import torch_logits
from mindport.ckpt_tools import convert
from mindport.checkpoint.model_files import SOURCE_CONFIG

QUIET = dict(progress=False)
WEIGHTS = (".safetensors", ".safetensors.index.json", ".bin")


def model_files(directory: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file that is not a weight file or config.json."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if not name.endswith(WEIGHTS) and rel != "config.json":
                with open(os.path.join(root, name), "rb") as f:
                    found[rel] = f.read()
    return found


def config_json(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("kind", KINDS)
def test_every_conversion_carries_the_model_files_and_config_json(hf_dirs, tmp_path, kind):
    """hf2ms -> split (pp 2) -> merge -> ms2hf: the HF export holds the source's files byte for byte
    and its config.json; every mindport directory on the way holds them plus the source config."""
    src = hf_dirs.with_model_files(kind)
    ms, ranks, merged, hf = (str(tmp_path / d) for d in ("ms", "ranks", "merged", "hf"))
    convert.hf_to_mindport(src, ms, **QUIET)
    convert.split(ms, ranks, pp=2, **QUIET)
    convert.merge(ranks, merged, **QUIET)
    convert.mindport_to_hf(merged, hf, **QUIET)
    carried = model_files(src)
    assert "tokenizer.json" in carried and "generation_config.json" in carried and "docs/README.md" in carried
    for mindport_dir in (ms, ranks, merged):
        files = model_files(mindport_dir)
        assert json.loads(files.pop(SOURCE_CONFIG)) == config_json(src), mindport_dir
        assert {k: v for k, v in files.items() if k != "layout.json"} == carried, mindport_dir
    assert model_files(hf) == carried
    assert config_json(hf) == config_json(src)


def test_ms2hf_changes_only_the_dtype_key(hf_dirs, tmp_path):
    src = hf_dirs.with_model_files("qwen2_moe")
    source = config_json(src)
    assert source["bos_token_id"] is None and source["intermediate_size"] == 96  # what the issue saw change
    ms, hf = str(tmp_path / "ms"), str(tmp_path / "hf")
    convert.hf_to_mindport(src, ms, **QUIET)
    convert.mindport_to_hf(ms, hf, dtype="bf16", **QUIET)
    assert config_json(hf) == {**source, "dtype": "bfloat16"}


@pytest.mark.parametrize("kind", ["xverse", "qwen2_moe"])
def test_save_pretrained_of_a_loaded_model_keeps_its_directory(hf_dirs, tmp_path, kind):
    from mindport import AutoModelForCausalLM

    src = hf_dirs.with_model_files(kind)
    ms = str(tmp_path / "ms")
    convert.hf_to_mindport(src, ms, **QUIET)
    for loaded_from in (src, ms):
        out = str(tmp_path / f"out_{os.path.basename(loaded_from)}")
        AutoModelForCausalLM.from_pretrained(loaded_from).save_pretrained(out)
        assert model_files(out) == model_files(src)
        assert config_json(out) == config_json(src)


def test_save_pretrained_of_a_preset_model_writes_the_family_config(tmp_path):
    from mindport import AutoModelForCausalLM

    out = str(tmp_path / "out")
    AutoModelForCausalLM.from_preset("mixtral-tiny").save_pretrained(out)
    assert config_json(out)["model_type"] == "mixtral" and config_json(out)["torch_dtype"] == "float32"
    assert sorted(model_files(out)) == ["generation_config.json"]


@pytest.mark.parametrize("kind", ["xverse", "qwen2_moe", "telechat"])
def test_export_of_a_fine_tuned_checkpoint_loads_in_transformers(hf_dirs, tmp_path, kind):
    """hf2ms -> two training steps from it (load_checkpoint) -> ms2hf of the checkpoint: config.json
    and every non-weight file are the source's, transformers' AutoTokenizer encodes as the source's,
    and transformers' AutoModelForCausalLM (XVERSE through its remote code) has the fine-tuned
    model's logits. (TeleChat2's remote code is a stand-in here: mindport reads its export back.)"""
    from transformers import AutoModelForCausalLM as HFModel
    from transformers import AutoTokenizer

    from mindport import AutoConfig, AutoModelForCausalLM
    from mindport.train.config import RunConfig
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import Tokenizer
    from mindport.train.config import TrainConfig
    from mindport.train.data import prepare
    from mindport.train.run import train

    src = hf_dirs.with_model_files(kind)
    ms, data, run_dir, hf = (str(tmp_path / d) for d in ("ms", "data", "run", "hf"))
    convert.hf_to_mindport(src, ms, **QUIET)
    prepare(pydoc_topics()[:2], Tokenizer.load(src), data, 16)
    train_config = TrainConfig(seed=0, output_dir=run_dir, batch_size=2, seq_length=16, train_steps=2,
                               learning_rate=1e-2, warmup_steps=0, data_dir=data, load_checkpoint=ms,
                               peak_tflops=1.0)
    result = train(RunConfig(AutoConfig.from_pretrained(ms), train=train_config), progress=False,
                   echo=lambda s: None)
    convert.mindport_to_hf(result.checkpoint, hf, **QUIET)

    assert config_json(hf) == config_json(src)
    source_files, exported_files = model_files(src), model_files(hf)
    assert sorted(exported_files) == sorted(source_files)
    for name, data_bytes in source_files.items():  # the run re-writes tokenizer_config.json (same settings)
        assert name == "tokenizer_config.json" or exported_files[name] == data_bytes, name
    text = "The for statement is used to iterate"
    encoded = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)(text).input_ids
    assert encoded == AutoTokenizer.from_pretrained(src, trust_remote_code=True)(text).input_ids
    ids = np.array([encoded])
    tuned = AutoModelForCausalLM.from_pretrained(result.checkpoint)(ids).asnumpy()
    if kind == "telechat":
        exported = AutoModelForCausalLM.from_pretrained(hf)(ids).asnumpy()
        original = AutoModelForCausalLM.from_pretrained(src)(ids).asnumpy()
    else:
        model = HFModel.from_pretrained(hf, trust_remote_code=True).eval()
        assert type(model).__name__ == config_json(src)["architectures"][0]
        exported = torch_logits(model, ids)
        original = torch_logits(HFModel.from_pretrained(src, trust_remote_code=True).eval(), ids)
    np.testing.assert_allclose(exported, tuned, atol=1e-4, rtol=1e-4)
    assert np.abs(exported - original).max() > 1e-3  # the export holds the fine-tuned weights


def test_hf_config_changes_only_what_the_config_changes(hf_dirs):
    """Keys whose value the mindport config now implies differently are rewritten, nothing else."""
    from mindport.checkpoint.model_files import hf_config
    from mindport.models.registry import family

    source = config_json(hf_dirs.with_model_files("xverse"))
    fam = family("xverse")
    config = fam.config_from_hf(source, "config.json")
    assert hf_config(source, fam, config, "float32") == source  # no dtype key in the source: none added
    deeper = hf_config(source, fam, config.replace(num_layers=3), "bfloat16")
    assert deeper == {**source, "num_hidden_layers": 3}
