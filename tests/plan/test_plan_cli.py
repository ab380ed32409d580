"""``mindport plan``: JSON keys, layout restriction, LoRA and inference modes, --write, --config, errors."""
from __future__ import annotations

import json

import pytest

from mindport.cli import main
from mindport.models.registry import families
from mindport.parallel.state import check_layout
from mindport.plan.planner import MEMORY_BUDGET
from mindport.train.config import load_yaml

PRESETS = [p for fam in families().values() for p in fam.presets if "tiny" not in p and "demo" not in p]
BASE = ["plan", "--model", "telechat2-7b", "--npus", "8", "--seq-length", "4096", "--global-batch", "64"]


def _json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_training_plan_json_ranks_fitting_layouts_by_throughput(capsys):
    out = _json(capsys, BASE)
    assert {"tokens_per_s_per_npu", "mfu", "memory_gib", "fits"} <= set(out) and out["fits"]
    assert out["memory_gib"] * 2**30 <= MEMORY_BUDGET * 64e9
    rates = [c["tokens_per_s_per_npu"] for c in out["candidates"] if c["fits"]]
    assert rates == sorted(rates, reverse=True) and 0 < out["mfu"] < 1
    split = out["memory_split_gib"]
    assert sum(split.values()) == pytest.approx(out["memory_gib"])
    only = _json(capsys, BASE + ["--layout", "tp=2,pp=2"])
    assert all(c["parallel_config"]["model_parallel"] == 2 and c["parallel_config"]["pipeline_stage"] == 2
               for c in only["candidates"])


def test_lora_has_no_base_gradients_or_optimizer_state(capsys):
    full = _json(capsys, BASE + ["--layout", "tp=8"])
    lora = _json(capsys, BASE + ["--layout", "tp=8", "--mode", "lora"])
    assert lora["memory_split_gib"]["gradients"] < 0.05 * full["memory_split_gib"]["gradients"]  # adapters only
    assert lora["memory_split_gib"]["optimizer"] < 0.05 * full["memory_split_gib"]["optimizer"]
    assert lora["tokens_per_s_per_npu"] > full["tokens_per_s_per_npu"]  # no weight gradients, no grad sync


def test_lora_memory_is_the_memory_reports_and_the_pet_config_is_written(capsys, tmp_path):
    """The planner's LoRA memory is memory_report's LoRA accounting (with the 910B's flash attention),
    for the pet_config of a --config YAML, and --write carries that pet_config into the run YAML."""
    from mindport.config import LoraConfig
    from mindport.plan.cost import parallel_config
    from mindport.plan.planner import load_model, plan_training
    from mindport.train.memory import memory_report

    config = load_model("telechat2-7b")
    lora = LoraConfig(lora_rank=8, target_modules=["query"], modules_to_save=["lm_head"])
    plan = plan_training(config, 8, 4096, 64, lora, fixed={"tp": 8})[0]
    report = memory_report(config, parallel_config(plan.layout), plan.layout.micro_batch, 4096, "O2",
                           plan.layout.recompute == "full", lora=lora, attention="flash")
    assert plan.memory["bytes"] == report["bytes"] and report["bytes"]["parameters.frozen"] > 0
    written = tmp_path / "lora.yaml"
    _json(capsys, BASE + ["--layout", "tp=8", "--mode", "lora", "--write", str(written)])
    (tmp_path / "base").mkdir()
    config.save(str(tmp_path / "base" / "config.json"))
    run = load_yaml(str(written), [f"load_checkpoint={tmp_path / 'base'}"])
    assert run.lora is not None and run.lora.lora_rank == 16 and "query" in run.lora.target_modules
    check_layout(run.parallel, 8, run.model)
    custom = tmp_path / "custom.yaml"
    custom.write_text(written.read_text().replace("lora_rank: 16", "lora_rank: 4"))
    assert _json(capsys, ["plan", "--config", str(custom)])["mode"] == "lora"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_gets_an_inference_plan(capsys, preset):
    out = _json(capsys, ["plan", "--model", preset, "--npus", "8", "--seq-length", "4096", "--mode", "infer"])
    assert {"decode_tokens_per_s", "tokens_per_s_per_npu", "mfu", "memory_gib", "fits"} <= set(out)
    assert out["fits"] and out["max_batch"] >= 1 and out["memory_gib"] * 2**30 <= MEMORY_BUDGET * 64e9
    rates = out["decode_tokens_per_s"]
    assert rates["batch_1"] > 0 and rates[f"batch_{out['max_batch']}"] >= rates["batch_1"]


def test_hf_directory_and_config_json(capsys, tmp_path):
    from mindport.models.registry import family, find_preset

    config = find_preset("qwen1.5-moe-a2.7b")
    (tmp_path / "config.json").write_text(json.dumps(family(config.family).config_to_hf(config)))
    argv = ["--npus", "8", "--seq-length", "2048", "--global-batch", "16", "--layout", "tp=8"]
    from_dir = _json(capsys, ["plan", "--model", str(tmp_path)] + argv)
    from_file = _json(capsys, ["plan", "--model", str(tmp_path / "config.json")] + argv)
    from_preset = _json(capsys, ["plan", "--model", "qwen1.5-moe-a2.7b"] + argv)
    assert from_dir["tokens_per_s_per_npu"] == from_file["tokens_per_s_per_npu"] == from_preset["tokens_per_s_per_npu"]


def test_write_emits_a_run_yaml_that_loads_and_plans_back(capsys, tmp_path):
    out_path = tmp_path / "run.yaml"
    best = _json(capsys, BASE + ["--write", str(out_path)])
    run = load_yaml(str(out_path))
    check_layout(run.parallel, 8, run.model)
    assert run.parallel.to_dict() == {**run.parallel.to_dict(), **best["parallel_config"]}
    assert "msrun_launcher.sh" in out_path.read_text() and "preset: telechat2-7b" in out_path.read_text()
    again = _json(capsys, ["plan", "--config", str(out_path)])
    assert again["layout"] == best["layout"]
    assert main(["plan", "--config", str(out_path), "--header"]) == 0  # the written header is the file's own
    assert capsys.readouterr().out.strip() in out_path.read_text().splitlines()


def test_bad_inputs_fail_in_one_line(capsys, tmp_path):
    assert "--layout 'tp=x'" in _error(capsys, BASE + ["--layout", "tp=x"])
    assert "no-such.json" in _error(capsys, ["plan", "--model", str(tmp_path / "no-such.json"), "--npus", "8",
                                             "--seq-length", "64"])
    assert "--config" in _error(capsys, ["plan", "--config", str(tmp_path / "none.yaml")])
    assert "--npus 0" in _error(capsys, ["plan", "--model", "telechat2-7b", "--npus", "0", "--seq-length", "64"])
    assert "--mode infer" in _error(capsys, BASE + ["--mode", "infer", "--write", str(tmp_path / "x.yaml")])
    assert "--header needs --config" in _error(capsys, BASE + ["--header"])
    assert not (tmp_path / "x.yaml").exists()
    assert "no legal layout" in _error(capsys, BASE + ["--layout", "tp=3"])  # 3 divides neither 8 nor the heads


def test_pipeline_splits_with_offsets_are_planned_and_written(tmp_path):
    """The planner also tries moving one layer off the last stage (which runs the head); such a plan's
    memory report and run YAML carry the offsets."""
    from mindport.config import stage_layer_counts
    from mindport.plan.planner import load_model, pipeline_offsets, plan_training, run_yaml

    assert pipeline_offsets(30, 4) == [0, (1, 1, 1, -1)] and stage_layer_counts(30, 4, [1, 1, 1, -1]) == [8, 8, 8, 6]
    plans = plan_training(load_model("telechat2-7b"), 8, 4096, 16, fixed={"tp": 2, "pp": 4})
    moved = next(p for p in plans if p.layout.offset)
    even = next(p for p in plans if not p.layout.offset and p.layout.recompute == moved.layout.recompute
                and p.layout.micro_batch == moved.layout.micro_batch)
    assert moved.cost["step"] != even.cost["step"] and moved.memory["layers"] != even.memory["layers"]
    path = tmp_path / "offset.yaml"
    path.write_text(run_yaml("telechat2-7b", moved, 4096, 8, str(path)))
    run = load_yaml(str(path))
    assert run.parallel.offset == [1, 1, 1, -1]
    check_layout(run.parallel, 8, run.model)
