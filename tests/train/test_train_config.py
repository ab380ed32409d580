"""TrainConfig from mindformers-shaped YAML sections, and its one-line errors."""
import pytest
import yaml

from mindport.config import ConfigError
from mindport.train.config import load_yaml


def test_demo_yaml_maps_wrapper_and_recompute_sections():
    run = load_yaml("configs/telechat2/demo_train.yaml")
    t = run.train
    assert (t.amp_level, t.grad_clip, t.loss_scale, t.loss_scale_type) == ("O1", 1.0, 1.0, "static")
    assert (t.train_steps, t.warmup_steps, t.min_learning_rate, t.recompute) == (300, 20, 1e-4, False)
    assert t.data_dir == "./mindport_demo/data" and run.tokens_per_step == 512


def test_tokens_per_step_counts_every_data_parallel_rank_and_micro_batch():
    run = load_yaml("configs/telechat2/demo_train.yaml", ["parallel_config.data_parallel=2"])
    assert run.tokens_per_step == 2 * 512  # trainer.py reads batch_size rows on each dp rank
    run = load_yaml("configs/telechat2/demo_train.yaml", ["parallel_config.pipeline_stage=2",
                                                          "parallel_config.micro_batch_num=4"])
    assert run.tokens_per_step == 4 * 512  # batch_size rows per micro-batch


def test_dynamic_scale_sense_and_overrides():
    run = load_yaml("configs/telechat2/demo_train.yaml", [
        "runner_wrapper.scale_sense.type=DynamicLossScaleUpdateCell", "runner_wrapper.scale_sense.loss_scale_value=4096",
        "runner_wrapper.scale_sense.scale_window=50", "recompute_config.recompute=true"])
    t = run.train
    assert (t.loss_scale_type, t.loss_scale, t.loss_scale_window, t.recompute) == ("dynamic", 4096, 50, True)


@pytest.mark.parametrize("override, message", [
    ("runner_config.amp_level=O3", "'amp_level' = 'O3'"),
    ("runner_wrapper.scale_sense.loss_scale_value=0", "'loss_scale' = 0"),
    ("runner_config.loss_scale=8", "keys 'runner_config.loss_scale' = 8 and 'runner_wrapper.scale_sense.loss_scale_value'"),
    ("runner_wrapper.scale_sense.scale_factor=1", "'loss_scale_factor' = 1"),
    ("runner_wrapper.scale_sense.bogus=1", "unknown key 'runner_wrapper.scale_sense.bogus'"),
    ("lr_schedule.lr_end=0.5", "'min_learning_rate' = 0.5"),
    ("optimizer.beta2=1.0", "'beta2' = 1.0"),
    ("recompute_config.recompute=-1", "'recompute' = -1"),
    # YAML 1.1 reads yes/no/on/off as booleans, and True == 1: a boolean is no number
    ("runner_wrapper.max_grad_norm=yes", "'grad_clip' = True: expected a number"),
    ("runner_config.grad_clip=on", "'runner_config.grad_clip' = True and 'runner_wrapper.max_grad_norm' = 1.0"),
    ("optimizer.weight_decay=off", "'weight_decay' = False"),
    ("optimizer.beta1=no", "'beta1' = False"),
    ("optimizer.eps=true", "'eps' = True"),
    ("runner_config.peak_tflops=yes", "'peak_tflops' = True"),
    ("seed=yes", "'seed' = True: expected an integer"),
    ("seed=1.5", "'seed' = 1.5"),
    ("runner_config.save_steps=on", "'save_steps' = True"),
    ("output_dir=7", "'output_dir' = 7: expected a string"),
])
def test_bad_training_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml("configs/telechat2/demo_train.yaml", [override])
    assert "\n" not in str(err.value) and "demo_train.yaml" in str(err.value)


YAML = "configs/telechat2/tiny_train.yaml"


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A model directory (config.json is all load_yaml reads) holding tiny_train.yaml's architecture."""
    load_yaml(YAML).model.save(str(tmp_path / "config.json"))
    return str(tmp_path)


@pytest.mark.parametrize("override, yaml_value, checkpoint_value", [
    ("model.model_config.num_layers=4", "4", "2"),
    ("model.model_config.num_heads=8", "8", "4"),
    ("model.model_config.ffn_hidden_size=128", "128", "96"),
    ("model.model_config.intermediate_size=128", "128", "96"),  # mindformers' alias names the key as written
    ("model.model_config.rope_scaling=none", "'none'", "'telechat_ntk'"),
])
def test_load_checkpoint_architecture_disagreeing_with_the_yaml_fails(checkpoint_dir, override, yaml_value,
                                                                      checkpoint_value):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_yaml(YAML, [f"load_checkpoint={checkpoint_dir}", override])
    message = str(err.value)
    assert message.startswith(f"{YAML}: key '{key}' = {yaml_value}, but load_checkpoint '{checkpoint_dir}' has "
                              f"{checkpoint_value}") and "\n" not in message


def test_load_checkpoint_gives_the_architecture_and_the_yaml_the_training_keys(checkpoint_dir, tmp_path):
    doc = yaml.safe_load(open(YAML))
    doc["model"] = {"model_config": {"compute_dtype": "float16", "router_aux_loss_coef": 0.01}}
    doc["load_checkpoint"] = checkpoint_dir
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(doc))
    expected = load_yaml(YAML).model
    run = load_yaml(str(path))
    assert run.model == expected.replace(compute_dtype="float16", router_aux_loss_coef=0.01)
    del doc["model"]  # model_config omitted altogether
    path.write_text(yaml.safe_dump(doc))
    assert load_yaml(str(path)).model == expected
    assert load_yaml(YAML, [f"load_checkpoint={checkpoint_dir}"]).model == expected  # agreeing keys are fine
    with pytest.raises(ConfigError, match="key 'load_checkpoint' = 'no/such/dir': no such checkpoint directory"):
        load_yaml(str(path), ["load_checkpoint=no/such/dir"])
