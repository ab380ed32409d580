"""`mindport train` under msrun with data_parallel 2 takes the same steps as one process on the
same global batches: per-step losses and final weights agree."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from train_helpers import SEQ, tiny_model_config

_spec = importlib.util.spec_from_file_location("launch", os.path.join(os.path.dirname(__file__), "..", "parallel",
                                                                      "launch.py"))
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)


def write_yaml(path, data_dir, output_dir, batch, dp):
    model = {k: v for k, v in tiny_model_config().to_dict().items() if v is not None}
    doc = {"seed": 0, "output_dir": output_dir, "model": {"model_config": model},
           "parallel_config": {"data_parallel": dp},
           "runner_config": {"batch_size": batch, "seq_length": SEQ, "train_steps": 3},
           "lr_schedule": {"learning_rate": 3e-3, "warmup_steps": 1}, "train_dataset": {"data_dir": data_dir}}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_dp2_training_equals_single_process(data_dir, tmp_path):
    from mindport import cli

    single = write_yaml(tmp_path / "single.yaml", data_dir, str(tmp_path / "single"), batch=4, dp=1)
    subprocess.run([sys.executable, cli.__file__, "train", "--config", single, "--no-progress"], check=True,
                   capture_output=True)
    dp2 = write_yaml(tmp_path / "dp2.yaml", data_dir, str(tmp_path / "dp2"), batch=2, dp=2)
    launch.msrun(cli.__file__, ["train", "--config", dp2, "--no-progress"], 2, str(tmp_path / "log"))
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "dp2")
    assert len(ref) == len(got) == 3
    assert np.allclose(got, ref, rtol=1e-5, atol=0), (got, ref)
    assert os.path.isdir(tmp_path / "dp2" / "rank_1")  # other ranks keep their own logs


def test_unsupported_layout_for_train_command_fails_clearly(tmp_path, data_dir):
    from mindport.cli import main

    cfg = write_yaml(tmp_path / "tp.yaml", data_dir, str(tmp_path / "o"), batch=2, dp=1)
    doc = yaml.safe_load(open(cfg))
    doc["parallel_config"] = {"model_parallel": 2}
    (tmp_path / "tp.yaml").write_text(yaml.safe_dump(doc))
    assert main(["train", "--config", cfg]) == 2


def test_memory_report_printed_when_training_starts(data_dir, tmp_path):
    from mindport.config import load_yaml
    from mindport.train.run import train

    cfg = write_yaml(tmp_path / "m.yaml", data_dir, str(tmp_path / "m"), batch=2, dp=1)
    lines = []
    train(load_yaml(cfg), stop_after=1, progress=False, echo=lines.append)
    report = "\n".join(lines)
    assert "memory rank 0" in report and "parameters" in report and "activations" in report
