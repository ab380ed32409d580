"""Config loading and the one-line errors bad input must produce."""
import json

import pytest
import yaml

from mindport import AutoConfig, ConfigError, ModelConfig, ParallelConfig
from mindport.train.config import load_yaml

TINY = dict(family="telechat2", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96)
YAML = "configs/telechat2/tiny_train.yaml"


def test_mha_when_kv_heads_absent_and_head_dim_derived():
    cfg = ModelConfig(**TINY)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16


@pytest.mark.parametrize("change, key", [
    (dict(hidden_size=66), "hidden_size"),
    (dict(num_kv_heads=3), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(kv_layout="fused"), "kv_layout"),
    (dict(num_experts=4, moe_top_k=5, moe_intermediate_size=8), "moe_top_k"),
])
def test_invalid_model_values_name_the_key(change, key):
    with pytest.raises(ConfigError, match=f"'{key}' = "):
        ModelConfig(**{**TINY, **change})


def test_yaml_loads_in_mindformers_shape():
    run = load_yaml(YAML)
    assert run.model.num_kv_heads == 2 and run.model.rope_scaling == "telechat_ntk"
    assert run.parallel.world_size == 1
    assert run.train.learning_rate == 1e-3 and run.train.batch_size == 4 and run.train.train_steps == 50


def test_yaml_overrides():
    run = load_yaml(YAML, ["parallel_config.model_parallel=2", "model.model_config.num_layers=4"])
    assert run.parallel.model_parallel == 2 and run.model.num_layers == 4


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["model_config"].update(hiden_size=64), "unknown key 'hiden_size'"),
    (lambda d: d["parallel_config"].update(model_parallel=3), "'num_heads' = 4: expected a multiple of model_parallel = 3"),
    (lambda d: d["parallel_config"].update(data_parallel=0), "'data_parallel' = 0"),
    (lambda d: d["optimizer"].update(momentum=0.9), "unknown key 'optimizer.momentum'"),
    (lambda d: d.update(epochz=1), "unknown top-level key 'epochz'"),
    (lambda d: d["model"]["model_config"].update(num_heads=5), "'hidden_size' = 64"),
    (lambda d: d["model"]["model_config"].update(rms_norm_eps=True), "'rms_norm_eps' = True: expected a number"),
    (lambda d: d["model"]["model_config"].update(num_layers=2.0), "'num_layers' = 2.0: expected an integer"),
    (lambda d: d["model"]["model_config"].update(qkv_bias=1), "'qkv_bias' = 1: expected true or false"),
    (lambda d: d["parallel_config"].update(use_seq_parallel="yes please"), "'use_seq_parallel' = 'yes please'"),
    (lambda d: d["parallel_config"].update(model_parallel=True), "'model_parallel' = True: expected an integer"),
    # layouts the trainer cannot run fail when the YAML loads, before any work
    (lambda d: d["parallel_config"].update(expert_parallel=2), "'expert_parallel' = 2: expected a divisor of "
     "data_parallel = 1"),
    (lambda d: d["parallel_config"].update(pipeline_stage=2, micro_batch_num=2, context_parallel=2),
     "'context_parallel' = 2: training with pipeline_stage > 1 runs without context parallelism"),
    (lambda d: (d["model"]["model_config"].update(num_experts=4, moe_top_k=2, moe_intermediate_size=32),
                d["parallel_config"].update(pipeline_stage=2, micro_batch_num=2)),
     "'pipeline_stage' = 2: MoE models \\(num_experts = 4\\) train without pipeline stages"),
])
def test_bad_yaml_gives_one_clear_error(tmp_path, edit, message):
    doc = yaml.safe_load(open(YAML))
    edit(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml("does/not/exist.yaml")


def test_parallel_layout_product():
    assert ParallelConfig(data_parallel=2, model_parallel=4, pipeline_stage=2, micro_batch_num=2).world_size == 16


@pytest.mark.parametrize("hf, message", [
    ({"model_type": "gpt2"}, "'model_type' = 'gpt2'"),
    ({"model_type": "telechat", "hidden_size": 64, "n_head": 4, "n_layer": 2, "vocab_size": 8}, "'ffn_hidden_size' = 0: expected a positive integer"),
    ({"model_type": "telechat", "hidden_size": 64, "n_head": 6, "n_layer": 2, "vocab_size": 8,
      "ffn_hidden_size": 8}, "'hidden_size' = 64"),
])
def test_bad_hf_config_json(tmp_path, hf, message):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=message) as err:
        AutoConfig.from_pretrained(str(tmp_path))
    assert "config.json" in str(err.value)


def test_presets_match_published_shapes():
    c = AutoConfig.from_preset("telechat2-115b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_hidden_size,
            c.vocab_size) == (96, 8192, 64, 8, 128, 40960, 131072)
    assert 112e9 < c.num_parameters() < 116e9  # "115B" (113.3B by these shapes)
    for name, layers, hidden, heads in [("telechat2-7b", 30, 4096, 32), ("telechat2-3b", 24, 3072, 24),
                                        ("telechat2-35b", 64, 6144, 48)]:
        c = AutoConfig.from_preset(name)
        assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (layers, hidden, heads, heads)


def test_pipeline_offset_from_parallel_config():
    from mindport.parallel.pipeline import stage_layers

    run = load_yaml(YAML, ["model.model_config.num_layers=5", "parallel_config.pipeline_stage=2",
                           "parallel_config.micro_batch_num=2", "parallel_config.offset=[1,0]"])
    assert [list(r) for r in stage_layers(5, 2, run.parallel.offset)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ConfigError, match="key 'offset' = \\[2, 0\\]"):
        load_yaml(YAML, ["model.model_config.num_layers=5", "parallel_config.pipeline_stage=2",
                         "parallel_config.micro_batch_num=2", "parallel_config.offset=[2,0]"])


def test_115b_finetune_config_is_the_published_model_and_fits_64gb_per_npu(tmp_path):
    """The shipped multi-node example: TeleChat2-115B exactly (its model_config agrees with the
    checkpoint's config.json), a valid 64-rank layout, and every rank's estimated training memory under
    an Atlas 800T A2 NPU's 64 GB."""
    from mindport import AutoConfig
    from mindport.train.memory import memory_report
    from mindport.parallel.state import check_layout

    AutoConfig.from_preset("telechat2-115b").save(str(tmp_path / "config.json"))  # the checkpoint's architecture
    run = load_yaml("configs/telechat2/finetune_115b.yaml", [f"load_checkpoint={tmp_path}"])
    assert run.model == AutoConfig.from_preset("telechat2-115b")
    check_layout(run.parallel, 64, run.model)
    peak = max(memory_report(run.model, run.parallel, run.train.batch_size, run.train.seq_length, run.train.amp_level,
                             run.train.recompute, rank=r)["bytes"]["total"] for r in range(64))
    assert peak < 64e9


@pytest.mark.parametrize("text, value", [("5e-3", 5e-3), ("1E-4", 1e-4), ("+2.5e-3", 2.5e-3), ("1e3", 1000.0)])
def test_exponent_floats_without_a_dot_are_numbers_in_overrides_and_files(tmp_path, text, value):
    """YAML 1.1 reads ``5e-3`` as a string; Python's float (and YAML 1.2) read a number."""
    run = load_yaml(YAML, [f"optimizer.weight_decay={text}"])
    assert run.train.weight_decay == value and isinstance(run.train.weight_decay, float)
    path = tmp_path / "e.yaml"
    path.write_text(open(YAML).read().replace("weight_decay: 0.1", f"weight_decay: {text}"))
    assert load_yaml(str(path)).train.weight_decay == value


@pytest.mark.parametrize("text, where, problem", [
    ("model:\n  model_config:\n    vocab_size: 8\n   hidden_size: 4\n", ":4:4: ", "expected <block end>"),
    ("optimizer: {beta1: 0.9\nseed: 0\n", ":2:5: ", "expected ',' or '}'"),
    ("a: b\n\tc: d\n", ":2:1: ", "found character '\\t'"),
])
def test_malformed_yaml_names_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}{where}not valid YAML: ") and problem in message and "\n" not in message


def test_malformed_override_is_one_line():
    with pytest.raises(ConfigError, match=r"^--set parallel_config.offset=\[1,: not valid YAML: .*expected") as err:
        load_yaml(YAML, ["parallel_config.offset=[1,"])
    assert "\n" not in str(err.value)


def test_model_config_may_name_a_preset_and_override_its_keys(tmp_path):
    doc = yaml.safe_load(open(YAML))
    doc["model"]["model_config"] = {"type": "TelechatConfig", "preset": "telechat2-tiny-gqa", "n_kv_heads": 1,
                                    "param_dtype": "float16"}
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = load_yaml(str(path))
    assert run.model == AutoConfig.from_preset("telechat2-tiny-gqa", num_kv_heads=1, param_dtype="float16")
    doc["model"]["model_config"]["preset"] = "telechat2-tiny-gqq"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="model.model_config: preset 'telechat2-tiny-gqq' unknown") as err:
        load_yaml(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unused_mindformers_keys_are_listed_and_warned_about_when_set(tmp_path, capsys):
    from mindport.train.config import UNUSED_KEYS

    assert {"parallel_config.gradient_aggregation_group", "parallel_config.vocab_emb_dp"} <= set(UNUSED_KEYS)
    doc = yaml.safe_load(open(YAML))
    doc["parallel_config"].update(gradient_aggregation_group=4, vocab_emb_dp=False)  # the values mindport matches
    doc["runner_config"]["sink_mode"] = False
    path = tmp_path / "unused.yaml"
    path.write_text(yaml.safe_dump(doc))
    load_yaml(str(path))
    assert capsys.readouterr().err == ""
    load_yaml(str(path), ["parallel_config.vocab_emb_dp=true", "runner_config.sink_mode=true",
                          "parallel_config.gradient_aggregation_group=2"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{path}: warning:")
    for key in ("parallel_config.vocab_emb_dp = True", "runner_config.sink_mode = True",
                "parallel_config.gradient_aggregation_group = 2"):
        assert key in err
