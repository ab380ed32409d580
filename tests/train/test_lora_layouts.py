"""LoRA under msrun: TP2+SP, PP2, DP2+ZeRO, CP2 (ring attention) and DP2 x EP2 (MoE; attention adapters, or routed experts'
adapters living with their experts), and TP2 with routed experts' adapters, train like one process.

Each layout fine-tunes the same base (a saved tiny model) with the same adapters (A drawn per name
from the seed, then sliced) on the same global batches: per-step loss and gradient norm equal the
single-process LoRA run, the ranks' copies of replicated adapter slices are bit-identical, and the
adapter joined from the per-rank checkpoint equals the single-process one.
"""
import os
import pathlib

import numpy as np
import pytest
import yaml

from mindport.train.logger import read_metrics
from testkit import launch
from testkit.train import SEQ, VOCAB

STEPS = 3
GLOBAL_BATCH = 4
LR = 3e-3
# (preset, target_modules, target_parameters)
DENSE = ("telechat2-tiny-gqa", ("query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"), ())
MOE = ("mixtral-tiny", ("q_proj", "k_proj", "v_proj", "o_proj"), ())
MOE_EXPERTS = ("mixtral-tiny", ("v_proj",), ("experts.gate_up_proj", "experts.down_proj"))
# name -> (model, parallel_config, batch_size per data-parallel rank and micro-batch)
LAYOUTS = {
    "tp2_sp": (DENSE, {"model_parallel": 2, "use_seq_parallel": True}, 4),
    "pp2": (DENSE, {"pipeline_stage": 2, "micro_batch_num": 2}, 2),
    "dp2_zero": (DENSE, {"data_parallel": 2, "optimizer_shard": True}, 2),
    "dp2_ep2_moe_zero": (MOE, {"data_parallel": 2, "expert_parallel": 2, "optimizer_shard": True}, 2),
    "dp2_ep2_moe_experts": (MOE_EXPERTS, {"data_parallel": 2, "expert_parallel": 2}, 2),
    "tp2_moe_experts": (MOE_EXPERTS, {"model_parallel": 2}, 4),
    "cp2_ring": (DENSE, {"context_parallel": 2, "context_parallel_algo": "ring"}, 4),
}

# dp2_zero also saves step 2: test_lora_resume_under_zero_continues_the_run resumes a copy of its run from there
SAVES = {"dp2_zero": {"save_steps": 1}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """preset -> a saved base model directory (HF format)."""
    from mindport import AutoModelForCausalLM

    cache = {}

    def get(preset):
        if preset not in cache:
            model = AutoModelForCausalLM.from_preset(preset, vocab_size=VOCAB)
            model.init_weights(1)
            cache[preset] = str(tmp_path_factory.mktemp("base") / preset)
            model.save_pretrained(cache[preset])
        return cache[preset]

    return get


def write_yaml(root, data_dir, base, targets, params, batch, parallel=None, **runner):
    pet = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": list(targets),
           "target_parameters": list(params), "modules_to_save": ["lm_head"]}
    doc = {"seed": 0, "output_dir": str(root / "out"), "load_checkpoint": base,
           "model": {"model_config": {"pet_config": pet}},
           "parallel_config": parallel or {},
           "runner_config": {"batch_size": batch, "seq_length": SEQ, "train_steps": STEPS, **runner},
           "lr_schedule": {"learning_rate": LR, "warmup_steps": 1}, "train_dataset": {"data_dir": data_dir}}
    (root / "run.yaml").write_text(yaml.safe_dump(doc))
    return str(root / "run.yaml")


@pytest.fixture(scope="module")
def references(data_dir, bases, tmp_path_factory):
    from mindport.train.config import load_yaml
    from mindport.train.run import train

    cache = {}

    def run(model):
        if model not in cache:
            root = tmp_path_factory.mktemp("single")
            preset, targets, params = model
            result = train(load_yaml(write_yaml(root, data_dir, bases(preset), targets, params, GLOBAL_BATCH)),
                           progress=False, echo=lambda s: None)
            cache[model] = read_metrics(root / "out"), result.checkpoint
        return cache[model]

    return run


def world_of(parallel):
    return int(np.prod([parallel.get(k, 1) for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                                     "context_parallel")]))


@pytest.fixture(scope="module")
def layout_runs(data_dir, bases, tmp_path_factory):
    """name -> the run directory of that layout's msrun LoRA training, once it has run. The layouts
    share one launch; dp2_zero has its own, as test_lora_resume_under_zero_continues_the_run compares a
    fresh process's steps with it bit for bit."""
    from mindport import cli

    root = tmp_path_factory.mktemp("layouts")
    jobs = {}
    for name, ((preset, targets, params), parallel, batch) in LAYOUTS.items():
        (root / name).mkdir()
        config = write_yaml(root / name, data_dir, bases(preset), targets, params, batch, parallel,
                            **SAVES.get(name, {}))
        world = world_of(parallel)
        jobs[name] = (name if name == "dp2_zero" else f"world{world}", world,
                      [cli.__file__, "train", "--config", config, "--no-progress"])
    run = launch.shared_launches(jobs, str(root))
    return lambda name: pathlib.Path(run(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_trains_like_one_process(name, references, bases, layout_runs, tmp_path):
    from mindport import cli
    from mindport.models.lora import read_adapter

    model, parallel, batch = LAYOUTS[name]
    preset = model[0]
    ref_metrics, ref_ckpt = references(model)
    run_dir = layout_runs(name)
    got = read_metrics(run_dir / "out")
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref_metrics], rtol=1e-5, atol=0,
                                   err_msg=f"{name}: {key}")
    step_dir = os.path.join(run_dir, "out", "checkpoints", f"step_{STEPS:08d}")
    launch.assert_checkpoint_replicas_identical(step_dir)
    _, joined = read_adapter(step_dir)  # the per-rank slices joined
    _, single = read_adapter(ref_ckpt)
    assert sorted(joined) == sorted(single)
    # as in test_train_layouts: a near-cancelling gradient can move a handful of elements by up to 2 lr a step
    for tensor, value in single.items():
        gap = np.abs(joined[tensor] - value)
        off = int((gap > 1e-4 + 1e-4 * np.abs(value)).sum())
        assert off <= max(1, value.size // 10000) and gap.max() <= 2 * LR * STEPS, f"{name}: {tensor}: {off} off"
    # the per-rank checkpoint merges straight into the base, and loads as an adapter, with no reshard step
    from mindport import AutoModelForCausalLM

    assert cli.main(["lora", "merge", "--base", bases(preset), "--adapter", step_dir, "--dst",
                     str(tmp_path / "merged")]) == 0
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))(ids).asnumpy()
    adapted = AutoModelForCausalLM.from_pretrained(bases(preset), adapter=step_dir)(ids).asnumpy()
    np.testing.assert_allclose(merged, adapted, atol=1e-5)
    # ... and exports to a PEFT adapter directory holding the joined tensors under PEFT's names
    from mindport.models.lora import ADAPTER_WEIGHTS
    from mindport.train.checkpoint import read_safetensors

    assert cli.main(["lora", "export", "--src", step_dir, "--dst", str(tmp_path / "peft")]) == 0
    exported = read_safetensors(str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    assert sorted(exported) == sorted(joined) and all(np.array_equal(exported[n], joined[n]) for n in joined)


@pytest.mark.slow
def test_lora_resume_under_zero_continues_the_run(layout_runs, bases, data_dir, tmp_path):
    """DP2 + ZeRO (each rank a slice of the adapters' optimizer state): the DP2 run's checkpoint of step 2
    (a copy of the run without its last checkpoint), resumed for the 3rd step: bit for bit the
    uninterrupted run's losses and grad norms."""
    import shutil

    from mindport import cli

    straight = read_metrics(layout_runs("dp2_zero") / "out")
    (preset, targets, params), parallel, batch = LAYOUTS["dp2_zero"]
    shutil.copytree(layout_runs("dp2_zero") / "out", tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "checkpoints" / f"step_{STEPS:08d}")
    config = write_yaml(tmp_path, data_dir, bases(preset), targets, params, batch, parallel, **SAVES["dp2_zero"])
    launch.msrun(cli.__file__, ["train", "--config", config, "--no-progress", "--resume"], 2, str(tmp_path / "log2"))
    got = read_metrics(tmp_path / "out")
    for key in ("loss", "grad_norm"):
        np.testing.assert_array_equal([m[key] for m in got], [m[key] for m in straight], err_msg=key)
