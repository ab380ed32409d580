"""`mindport train` and `mindport eval` under msrun, on real CPU processes.

Every layout trains the same model (weights drawn per parameter name from the seed, then
sliced) on the same global batches as one process, so per-step losses and gradient norms
agree, the ranks' copies of replicated weights stay bit-identical, and the per-rank checkpoint
merges back into the single-process weights.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mindport.train.logger import read_metrics
from testkit import launch
from testkit.train import SEQ, VOCAB

STEPS = 3
GLOBAL_BATCH = 4
# models: (preset, vocab_size); the odd vocabulary (> the tokenizer's 512) does not divide by model_parallel
DENSE, MOE, MOE_ODD_VOCAB = ("telechat2-tiny-gqa", VOCAB), ("mixtral-tiny", VOCAB), ("mixtral-tiny", VOCAB + 3)
O2_ACC2 = (("amp_level", "O2"), ("loss_scale", 1024.0), ("gradient_accumulation_steps", 2))
ACC2 = (("gradient_accumulation_steps", 2),)
# name -> (model, parallel_config, batch_size per data-parallel rank and micro-batch, runner_config extras,
# data: "text" (pretraining) or "sft" (packed sequences, prompts ignored: supervised counts differ per row))
LAYOUTS = {
    "tp2_sp": (DENSE, {"model_parallel": 2, "use_seq_parallel": True}, 4, (), "text"),
    "pp2": (DENSE, {"pipeline_stage": 2, "micro_batch_num": 2}, 2, (), "text"),
    "pp2_o2_acc2": (DENSE, {"pipeline_stage": 2, "micro_batch_num": 2}, 2, O2_ACC2, "text"),
    "cp2": (DENSE, {"context_parallel": 2}, 4, (), "text"),
    "dp2_zero": (DENSE, {"data_parallel": 2, "optimizer_shard": True}, 2, (), "text"),
    "dp2_ep2_moe_zero": (MOE, {"data_parallel": 2, "expert_parallel": 2, "optimizer_shard": True}, 2, (), "text"),
    # the router's gradient is partial on each tp rank; the vocabulary is padded for the split
    "tp2_moe_odd_vocab": (MOE_ODD_VOCAB, {"model_parallel": 2}, 4, (), "text"),
    "sft_tp2_sp": (DENSE, {"model_parallel": 2, "use_seq_parallel": True}, 4, (), "sft"),
    "sft_dp2": (DENSE, {"data_parallel": 2}, 2, (), "sft"),
    "sft_pp2_acc2": (DENSE, {"pipeline_stage": 2, "micro_batch_num": 2}, 2, ACC2, "sft"),
    "sft_dp2_ep2_moe": (MOE, {"data_parallel": 2, "expert_parallel": 2}, 2, (), "sft"),
}
# dp2_zero also saves step 2: test_resume_under_zero_continues_the_run resumes a copy of its run from there
SAVES = {"dp2_zero": {"save_steps": 1}}
# fp32 layouts agree to rounding; under O2 (fp16 weights and activations) a different split of the
# same sums rounds differently in fp16
RTOL = {(): 1e-5, ACC2: 1e-5, O2_ACC2: 2e-3}  # of the per-step loss and grad norm
LR = 3e-3


def write_yaml(path, data_dir, output_dir, batch, parallel=None, model=DENSE, **runner):
    from mindport import AutoConfig

    preset, vocab_size = model
    config = AutoConfig.from_preset(preset, vocab_size=vocab_size)
    model = {k: v for k, v in config.to_dict().items() if v is not None}
    doc = {"seed": 0, "output_dir": str(output_dir), "model": {"model_config": model},
           "parallel_config": parallel or {},
           "runner_config": {"batch_size": batch, "seq_length": SEQ, "train_steps": STEPS, **runner},
           "lr_schedule": {"learning_rate": LR, "warmup_steps": 1}, "train_dataset": {"data_dir": data_dir}}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def weights_of(directory):
    from mindport.train.checkpoint import read_safetensors

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(read_safetensors(os.path.join(directory, name)))
    return out


def cli_path() -> str:
    from mindport import cli

    return cli.__file__


def msrun_mindport(args, workers, log_dir):
    launch.msrun(cli_path(), args, workers, str(log_dir))
    with open(os.path.join(log_dir, "worker_0.log"), errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def data_dirs(data_dir, sft_dir):
    return {"text": data_dir, "sft": sft_dir}


@pytest.fixture(scope="module")
def references(data_dirs, tmp_path_factory):
    """(model, runner extras, data) -> (metrics, checkpoint) of the single-process run every layout
    must reproduce."""
    from mindport.train.config import load_yaml
    from mindport.train.run import train

    cache = {}

    def run(model, runner=(), data="text"):
        if (model, runner, data) not in cache:
            root = tmp_path_factory.mktemp("single")
            cfg = load_yaml(write_yaml(root / "run.yaml", data_dirs[data], root / "out", GLOBAL_BATCH, model=model,
                                       **dict(runner)))
            result = train(cfg, progress=False, echo=lambda s: None)
            cache[model, runner, data] = read_metrics(root / "out"), result.checkpoint
        return cache[model, runner, data]

    return run


@pytest.fixture(scope="module")
def reference(references):
    return references(DENSE)


@pytest.fixture(scope="module")
def layout_runs(data_dirs, tmp_path_factory):
    """name -> output directory of that layout's `mindport train` under msrun, once it has run. The
    layouts share one launch (one `mindport train` after the other in each process); dp2_zero has its
    own, as test_resume_under_zero_continues_the_run compares a fresh process's steps with it bit for bit."""
    root = tmp_path_factory.mktemp("layouts")
    jobs = {}
    for name, (model, parallel, batch, runner, data) in LAYOUTS.items():
        cfg = write_yaml(root / f"{name}.yaml", data_dirs[data], root / name, batch, parallel, model,
                         **dict(runner), **SAVES.get(name, {}))
        world = int(np.prod([parallel.get(k, 1) for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                                           "context_parallel")]))
        jobs[name] = (name if name == "dp2_zero" else f"world{world}", world,
                      [cli_path(), "train", "--config", cfg, "--no-progress"])
    return launch.shared_launches(jobs, str(root))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process_and_its_checkpoint_merges(name, references, layout_runs, tmp_path, data_dirs):
    from mindport.ckpt_tools.convert import merge

    model, parallel, _, runner, data = LAYOUTS[name]
    ref_metrics, ref_ckpt = references(model, runner, data)
    out = layout_runs(name)
    got = read_metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref_metrics], rtol=RTOL[runner], atol=0,
                                   err_msg=f"{name}: {key}")
    step_dir = os.path.join(out, "checkpoints", f"step_{STEPS:08d}")
    layout = json.load(open(os.path.join(step_dir, "layout.json")))
    assert [layout[k] for k in ("tp", "pp", "ep")] == [parallel.get(k, 1) for k in ("model_parallel", "pipeline_stage",
                                                                                     "expert_parallel")]
    launch.assert_checkpoint_replicas_identical(step_dir)
    merge(step_dir, str(tmp_path / "merged"), progress=False)
    merged, single = weights_of(tmp_path / "merged"), weights_of(ref_ckpt)
    assert sorted(merged) == sorted(single)
    # Three AdamW steps from the same start. An early Adam step moves a weight by ~lr * g / (|g| + eps),
    # so a gradient near zero (a sum that nearly cancels) whose last bits depend on the summation order
    # moves it by anything up to 2 lr (6e-3) per step. In fp32 at most a handful of elements (measured:
    # 0 or 1 of 32768) differ by more than 1e-4, far below the weights' scale of 0.02; a misplaced shard
    # would differ in most of its elements. Under O2, fp16 rounding moves many more, so the merged model
    # is compared by its loss instead.
    if not runner:
        for tensor, value in single.items():
            gap = np.abs(merged[tensor] - value)
            off = int((gap > 1e-4 + 1e-4 * np.abs(value)).sum())
            assert off <= max(1, value.size // 10000) and gap.max() <= 2 * LR * STEPS, \
                f"{name}: {tensor}: {off} of {value.size} elements differ by > 1e-4 (max {gap.max():.2e})"
    else:
        from mindport import AutoModelForCausalLM
        from mindport.train.data import PackedDataset
        from mindport.train.evaluate import evaluate

        dataset = PackedDataset(data_dirs[data])
        ours, ref = (evaluate(AutoModelForCausalLM.from_pretrained(d), dataset, 4, 8).loss
                     for d in (str(tmp_path / "merged"), ref_ckpt))
        assert ours == pytest.approx(ref, rel=1e-3), name


def launcher(cmd: str, workers: int, log_dir) -> str:
    """scripts/msrun_launcher.sh in its 6-argument form; worker 0's log."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "msrun_launcher.sh"), cmd, str(workers),
                           str(launch.free_port()), str(log_dir), "True", "600"], env=env, capture_output=True,
                          text=True, timeout=600)
    with open(os.path.join(log_dir, "worker_0.log"), errors="replace") as f:
        log = f.read()
    assert proc.returncode == 0, log[-3000:]
    return log


@pytest.mark.slow
def test_eval_under_msrun_with_tensor_and_data_parallelism(reference, layout_runs, data_dir, tmp_path):
    import shutil

    from mindport import AutoModelForCausalLM
    from mindport.train.data import PackedDataset
    from mindport.train.evaluate import evaluate

    _, ref_ckpt = reference
    expected = evaluate(AutoModelForCausalLM.from_pretrained(ref_ckpt), PackedDataset(data_dir), 2, 7).loss
    loss_line = re.compile(r"^loss: (\S+)$", re.M)
    # TP2 on the TP2 run's per-rank checkpoint, through the launcher (a quoted path with a space)
    spaced = str(tmp_path / "eval data")
    shutil.copytree(data_dir, spaced)
    tp_ckpt = os.path.join(layout_runs("tp2_sp"), "checkpoints", f"step_{STEPS:08d}")
    log = launcher(f"mindport eval --load {tp_ckpt} --data '{spaced}' --batch-size 2 --max-samples 7 "
                   f"--model-parallel 2", 2, tmp_path / "tp_log")
    assert float(loss_line.search(log).group(1)) == pytest.approx(expected, rel=1e-5)
    # DP2 on the single-process checkpoint: one row per rank, the same global batch of 2
    log = msrun_mindport(["eval", "--load", ref_ckpt, "--data", data_dir, "--batch-size", "1", "--max-samples", "7",
                          "--data-parallel", "2"], 2, tmp_path / "dp_log")
    assert float(loss_line.search(log).group(1)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_resume_under_zero_continues_the_run(layout_runs, data_dir, tmp_path):
    """DP2 with sharded optimizer state: the DP2 run's checkpoint of step 2 (a copy of the run without its
    last checkpoint), resumed for the 3rd step: bit for bit the losses and grad norms of the uninterrupted
    run."""
    import shutil

    straight = read_metrics(layout_runs("dp2_zero"))
    _, parallel, batch, _, _ = LAYOUTS["dp2_zero"]
    shutil.copytree(layout_runs("dp2_zero"), tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "checkpoints" / f"step_{STEPS:08d}")
    cfg = write_yaml(tmp_path / "run.yaml", data_dir, tmp_path / "out", batch, parallel, **SAVES["dp2_zero"])
    log = msrun_mindport(["train", "--config", cfg, "--no-progress", "--resume"], 2, tmp_path / "log2")
    assert "resume: continuing from" in log and "(step 2, 8 samples consumed)" in log
    state = os.listdir(tmp_path / "out" / "checkpoints" / f"step_{STEPS:08d}" / "train_state")
    assert sorted(state) == ["rank_00000.safetensors", "rank_00001.safetensors", "state.json"]
    got = read_metrics(tmp_path / "out")
    for key in ("loss", "grad_norm"):
        np.testing.assert_array_equal([m[key] for m in got], [m[key] for m in straight], err_msg=key)

    # one rank's state file missing: that rank fails to read it, and the other fails with it instead
    # of waiting for it in the first collective
    os.remove(tmp_path / "out" / "checkpoints" / f"step_{STEPS:08d}" / "train_state" / "rank_00001.safetensors")
    more = write_yaml(tmp_path / "more.yaml", data_dir, tmp_path / "out", batch, parallel, train_steps=STEPS + 1)
    with pytest.raises(AssertionError) as failed:
        launch.msrun(cli_path(), ["train", "--config", more, "--no-progress", "--resume"], 2, str(tmp_path / "log3"),
                     timeout=300)
    assert "rank_00001.safetensors" in str(failed.value) and "failed on 1 other rank(s)" in str(failed.value)


def test_resuming_under_another_layout_fails_clearly(reference, data_dir, tmp_path):
    """A per-rank checkpoint resumes only under its layout (here: one process)."""
    import shutil

    from mindport.config import ConfigError
    from mindport.train.config import load_yaml
    from mindport.train.run import train

    _, ref_ckpt = reference
    out = tmp_path / "out"
    shutil.copytree(os.path.dirname(ref_ckpt), out / "checkpoints")
    state_path = out / "checkpoints" / f"step_{STEPS:08d}" / "train_state" / "state.json"
    state = json.load(open(state_path))
    state["parallel"]["model_parallel"] = 2  # as if saved by a TP2 run
    state_path.write_text(json.dumps(state))
    cfg = load_yaml(write_yaml(tmp_path / "run.yaml", data_dir, out, GLOBAL_BATCH, train_steps=STEPS + 1))
    with pytest.raises(ConfigError, match=r"saved under parallel_config key 'model_parallel' = 2, this run has 1"):
        train(cfg, resume=True, progress=False, echo=lambda s: None)


def test_parallel_layout_without_a_launcher_fails_clearly(tmp_path, data_dir):
    from mindport.cli import main

    cfg = write_yaml(tmp_path / "tp.yaml", data_dir, tmp_path / "o", 2, {"model_parallel": 2})
    assert main(["train", "--config", cfg]) == 2


def test_memory_report_printed_when_training_starts(data_dir, tmp_path):
    from mindport.train.config import load_yaml
    from mindport.train.run import train

    cfg = write_yaml(tmp_path / "m.yaml", data_dir, tmp_path / "m", 2)
    lines = []
    train(load_yaml(cfg), stop_after=1, progress=False, echo=lines.append)
    report = "\n".join(lines)
    assert "memory rank 0" in report and "parameters" in report and "activations" in report


@pytest.mark.slow
def test_packed_data_under_context_parallelism_fails_before_any_work(sft_dir, tmp_path):
    cfg = write_yaml(tmp_path / "cp.yaml", sft_dir, tmp_path / "out", 4, {"context_parallel": 2})
    with pytest.raises(AssertionError) as failed:
        launch.msrun(cli_path(), ["train", "--config", cfg, "--no-progress"], 2, str(tmp_path / "log"), timeout=300)
    assert f"{sft_dir}: parallel_config: key 'context_parallel' > 1: data with segments.bin" in str(failed.value)
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
