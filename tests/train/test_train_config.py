"""TrainConfig from mindformers-shaped YAML sections, and its one-line errors."""
import pytest
import yaml

from mindport.config import ConfigError, load_yaml


def test_demo_yaml_maps_wrapper_and_recompute_sections():
    run = load_yaml("configs/telechat2/demo_train.yaml")
    t = run.train
    assert (t.amp_level, t.grad_clip, t.loss_scale, t.loss_scale_type) == ("O1", 1.0, 1.0, "static")
    assert (t.train_steps, t.warmup_steps, t.min_learning_rate, t.recompute) == (300, 20, 1e-4, False)
    assert t.data_dir == "./mindport_demo/data" and t.tokens_per_step == 512


def test_dynamic_scale_sense_and_overrides():
    run = load_yaml("configs/telechat2/demo_train.yaml", [
        "runner_wrapper.scale_sense.type=DynamicLossScaleUpdateCell", "runner_wrapper.scale_sense.loss_scale_value=4096",
        "runner_wrapper.scale_sense.scale_window=50", "recompute_config.recompute=true", "load_checkpoint=some/dir"])
    t = run.train
    assert (t.loss_scale_type, t.loss_scale, t.loss_scale_window, t.recompute) == ("dynamic", 4096, 50, True)
    assert t.load_checkpoint == "some/dir"


@pytest.mark.parametrize("override, message", [
    ("runner_config.amp_level=O3", "'amp_level' = 'O3'"),
    ("runner_wrapper.scale_sense.loss_scale_value=0", "'loss_scale' = 0"),
    ("runner_config.loss_scale=8", "keys 'runner_config.loss_scale' = 8 and 'runner_wrapper.scale_sense.loss_scale_value'"),
    ("runner_wrapper.scale_sense.scale_factor=1", "'loss_scale_factor' = 1"),
    ("runner_wrapper.scale_sense.bogus=1", "unknown key 'runner_wrapper.scale_sense.bogus'"),
    ("lr_schedule.lr_end=0.5", "'min_learning_rate' = 0.5"),
    ("optimizer.beta2=1.0", "'beta2' = 1.0"),
    ("recompute_config.recompute=-1", "'recompute' = -1"),
])
def test_bad_training_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml("configs/telechat2/demo_train.yaml", [override])
    assert "\n" not in str(err.value) and "demo_train.yaml" in str(err.value)
