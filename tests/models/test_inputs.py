"""Bad model inputs fail in one line before any graph runs: a dtype this device cannot compute in
(bfloat16 on CPU) for the Python API, `generate`, `eval` and `train`; labels shaped unlike
input_ids; token ids outside the vocabulary."""
import json
import os

import numpy as np
import pytest

from mindport import AutoModelForCausalLM
from mindport.cli import main
from mindport.config import ConfigError

PRESET = "telechat2-tiny-gqa"  # vocab_size 256
BF16_ON_CPU = "= 'bfloat16': bf16 matmul does not exist on CPU: expected float32 or float16"


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_preset(PRESET)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(float32 model dir with a sentencepiece tokenizer, the same weights with a bfloat16 config,
    a prepared data directory of 4 samples of 64 ids < 256)."""
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import train_sentencepiece
    from mindport.train.checkpoint import write_safetensors

    root = tmp_path_factory.mktemp("inputs")
    model = AutoModelForCausalLM.from_preset(PRESET, vocab_size=400)
    weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    fp32, bf16, data = (str(root / name) for name in ("fp32", "bf16", "data"))
    for directory, config in ((fp32, model.config),
                              (bf16, model.config.replace(param_dtype="bfloat16", compute_dtype="bfloat16"))):
        os.makedirs(directory)
        config.save(os.path.join(directory, "config.json"))
        write_safetensors(os.path.join(directory, "model.safetensors"), weights)
    train_sentencepiece(pydoc_topics()[:8], 400, fp32)
    os.makedirs(data)
    (np.arange(4 * 64) % 256).astype(np.uint16).tofile(os.path.join(data, "tokens.bin"))
    with open(os.path.join(data, "index.json"), "w") as f:
        json.dump({"format": "mindport-packed-v1", "seq_length": 64, "num_samples": 4, "dtype": "uint16",
                   "vocab_size": 256, "eos_token_id": 2}, f)
    return fp32, bf16, data


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mindport: error: "), lines
    return lines[0]


def test_bfloat16_on_cpu_fails_in_one_line_everywhere(capsys, tmp_path, model_dirs):
    fp32, bf16, data = model_dirs
    for key in ("param_dtype", "compute_dtype"):
        with pytest.raises(ConfigError, match=f"^key '{key}' {BF16_ON_CPU}"):
            AutoModelForCausalLM.from_preset(PRESET, **{key: "bfloat16"})
    with pytest.raises(ConfigError, match=f"^dtype {BF16_ON_CPU}"):
        AutoModelForCausalLM.from_pretrained(fp32, dtype="bfloat16")
    with pytest.raises(ConfigError, match=f"^key 'param_dtype' {BF16_ON_CPU}"):  # the caller's value, not the file's
        AutoModelForCausalLM.from_pretrained(fp32, param_dtype="bfloat16")

    line = _one_line_error(capsys, ["generate", "--load", fp32, "--prompt", "x", "--dtype", "bfloat16"])
    assert f"dtype {BF16_ON_CPU}" in line
    line = _one_line_error(capsys, ["eval", "--load", bf16, "--data", data])
    assert f"{os.path.join(bf16, 'config.json')}: key 'param_dtype' {BF16_ON_CPU}" in line
    line = _one_line_error(capsys, ["train", "--config", "configs/telechat2/tiny_train.yaml",
                                    "--set", f"train_dataset.data_dir={data}", "--set", f"output_dir={tmp_path}",
                                    "--set", "model.model_config.compute_dtype=bfloat16"])
    assert f"key 'compute_dtype' {BF16_ON_CPU}" in line
    line = _one_line_error(capsys, ["train", "--config", "configs/telechat2/tiny_train.yaml",
                                    "--set", f"train_dataset.data_dir={data}", "--set", f"output_dir={tmp_path}/amp",
                                    "--set", "runner_config.amp_level=O1", "--set", "runner_config.amp_dtype=bfloat16"])
    assert f"key 'runner_config.amp_dtype' {BF16_ON_CPU}" in line


def test_labels_shaped_unlike_input_ids_fail_in_one_line(model):
    ids = np.arange(16).reshape(2, 8)
    with pytest.raises(ValueError, match=r"^labels: shape \(2, 7\): expected the shape of input_ids \(2, 8\)$"):
        model(ids, labels=ids[:, :7])
    with pytest.raises(ValueError, match=r"^labels: shape \(16,\): expected the shape of input_ids \(2, 8\)$"):
        model(ids, labels=ids.reshape(-1))


def test_out_of_vocabulary_ids_fail_in_one_line(model):
    ids = np.arange(16).reshape(2, 8)
    for bad in (256, -1):
        wrong = ids.copy()
        wrong[1, 3] = bad
        with pytest.raises(ValueError, match=rf"^input_ids: id {bad} at position \(1, 3\): expected 0 <= id < "
                                             r"vocab_size = 256$"):
            model(wrong)
    labels = ids.copy()
    labels[0, 5] = 300
    with pytest.raises(ValueError, match=r"^labels: id 300 at position \(0, 5\): expected -100 \(ignored\) or 0 "
                                         r"<= id < vocab_size = 256$"):
        model(ids, labels=labels)
    labels[0, 5] = -100  # ignored positions stay allowed
    assert np.isfinite(float(model(ids, labels=labels).asnumpy()))
