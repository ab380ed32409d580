"""Every run config in configs/: it loads, its layout matches the world size its launch line starts, and
the memory report's largest rank fits an Atlas 800T A2 NPU with the planner's headroom (with mindport's
Ascend attention, FlashAttentionScore, and for LoRA configs the report's LoRA accounting of their pet_config).

Headroom: the report counts parameters, gradients, optimizer state and saved activations, not kernel
workspaces, the allocator's fragmentation, or the CANN runtime's and HCCL's buffers (a few GB per
device), so a config must stay within ``MEMORY_BUDGET`` = 85% of 64 GB (54.4 GB), leaving 9.6 GB.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mindport.parallel.state import check_layout
from mindport.plan.cost import ATLAS_800T_A2, kv_bytes_per_token
from mindport.plan.planner import MEMORY_BUDGET
from mindport.train.config import load_yaml
from mindport.train.memory import memory_report

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def world_size(text: str) -> int:
    """Ranks the header's launch line starts: msrun_launcher.sh "CMD" [N ...], run_infer.sh DIR "PROMPT" [TP]."""
    launch = re.search(r'msrun_launcher\.sh "[^"]*"(?: \\\n#)?\s+(\d+)', text)
    if launch:
        return int(launch.group(1))
    infer = re.search(r'run_infer\.sh \S+ "[^"]*" (\d+)', text)
    return int(infer.group(1)) if infer else 1


# what reads a serving (run_mode: predict) config: `mindport plan --config` and the fit test below
SERVING_KEYS = {"run_mode", "model.model_config.preset", "parallel_config.model_parallel", "runner_config.batch_size",
                "runner_config.seq_length"}


def _dotted(doc, prefix="") -> set[str]:
    if not isinstance(doc, dict):
        return {prefix[:-1]}
    return {key for k, v in doc.items() for key in _dotted(v, f"{prefix}{k}.")}


def test_every_family_has_fine_tune_lora_and_inference_configs():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    for family, models in {"telechat2": ["7b", "35b", "115b"], "xverse": ["65b", "moe_a4.2b"],
                           "qwen_moe": ["a2.7b"], "mixtral": ["8x7b", "chinese_8x7b"]}.items():
        for model in models:
            for task in ("finetune", "lora", "infer"):
                assert f"{family}/{task}_{model}.yaml" in names


@pytest.mark.parametrize("path", [p for p in CONFIGS if "run_mode: predict" in p.read_text(encoding="utf-8")],
                         ids=lambda p: p.name)
def test_serving_configs_hold_only_keys_something_reads_and_train_refuses_them(path, capsys):
    import yaml

    from mindport.cli import main

    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert _dotted(doc) <= SERVING_KEYS
    assert main(["train", "--config", str(path)]) == 2
    assert "key 'run_mode' = 'predict'" in capsys.readouterr().err
    assert main(["plan", "--config", str(path), "--json"]) == 0  # decoding at the file's batch and context
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and f"batch_{doc['runner_config']['batch_size']}" in plan["decode_tokens_per_s"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_config_loads_matches_its_world_size_and_fits_64gb(path, tmp_path):
    from mindport import AutoConfig

    text = path.read_text(encoding="utf-8")
    overrides = []
    if "load_checkpoint:" in text:  # the architecture of the checkpoint it names: the preset's
        preset = re.search(r"preset: (\S+)", text).group(1)
        AutoConfig.from_preset(preset).save(str(tmp_path / "config.json"))
        overrides.append(f"load_checkpoint={tmp_path}")
    run = load_yaml(str(path), overrides)
    world = world_size(text)
    check_layout(run.parallel, world, run.model)
    budget = MEMORY_BUDGET * ATLAS_800T_A2.hbm_bytes
    if "run_mode: predict" in text:  # weights + the KV cache of batch_size contexts of seq_length tokens
        weights = memory_report(run.model, run.parallel, 1, run.train.seq_length, "O2")["bytes"]["parameters"]
        kv = run.train.batch_size * run.train.seq_length * kv_bytes_per_token(run.model, run.parallel.model_parallel)
        assert weights + kv <= budget
        return
    stage_firsts = range(0, world, run.parallel.context_parallel * run.parallel.model_parallel)
    peak = max(memory_report(run.model, run.parallel, run.train.batch_size, run.train.seq_length, run.train.amp_level,
                             run.train.recompute, rank=r, pipeline_offset=run.parallel.offset, lora=run.lora,
                             attention="flash")["bytes"]["total"] for r in stage_firsts)
    assert peak <= budget, f"{path}: {peak / 2**30:.1f} GiB"


# CPU runs (the demo's and the tiny layout's): no NPU prediction in their headers
PREDICTED = [p for p in CONFIGS if p.name not in ("demo_train.yaml", "tiny_train.yaml")]


@pytest.mark.parametrize("path", PREDICTED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_header_prediction_is_the_planners_for_the_files_own_layout(path, capsys):
    """The header's one '# Predicted:' line (tokens/s per NPU, MFU and GiB of the largest rank; for a
    serving config weights, contexts that fit and decode rates) is what the current planner computes for
    the file's own layout, rounded as printed: `mindport plan --config FILE --header` (nothing searched)."""
    from mindport.cli import main

    stated = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("# Predicted:")]
    assert len(stated) == 1, f"{path}: expected one '# Predicted:' header line"
    assert main(["plan", "--config", str(path), "--header"]) == 0
    assert capsys.readouterr().out.strip() == stated[0]
