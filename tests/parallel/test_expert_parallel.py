"""MoE under expert and tensor parallelism on real msrun processes (CPU), against the
single-process run on the whole batch: loss, global gradient norm, logits, every gradient and
every parameter after one AdamW step, and replicated parameters bit-identical on every rank.

Every layout runs forward and backward as one ms.jit graph, as the Trainer does (the eager path runs
the same code; tests/train/test_moe_compiled.py compares the two).

- EP2 with each token dispatcher, tiny Mixtral and XVERSE-MoE (with capacity drops).
- TP2, TP2+SP and TP2 x EP2 (4 ranks), tiny Mixtral, Qwen2-MoE (shared expert + sigmoid gate)
  and XVERSE-MoE (shared experts, capacity drops), all with a router loss: the router's and the
  shared gate's gradients are partial on each tp rank and must be summed over tp.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindport import AutoModelForCausalLM, ParallelConfig
from testkit.hf_models import hf_moe
from testkit.launch import assert_layout_equals_single_process, msrun, rank_dumps

WORKER = os.path.join(os.path.dirname(__file__), "step_worker.py")
FAMILIES = ("mixtral", "qwen2_moe", "xverse")
TP_LAYOUTS = {
    "tp2": dict(model_parallel=2),
    "tp2_sp": dict(model_parallel=2, use_seq_parallel=True),
    "tp2_ep2": dict(data_parallel=2, model_parallel=2, expert_parallel=2),
}


def xverse_moe_dir(directory: str, capacity_factor: float) -> str:
    """A mindport-format XVERSE-MoE directory (capacity is a mindport setting, not an HF field)."""
    from mindport.ckpt_tools.convert import hf_to_mindport

    model = AutoModelForCausalLM.from_preset("xverse-moe-tiny", initializer_range=0.15)
    model.save_pretrained(directory + "_hf")
    hf_to_mindport(directory + "_hf", directory)
    path = os.path.join(directory, "config.json")
    doc = json.load(open(path))
    doc["mindport_config"]["capacity_factor"] = capacity_factor
    json.dump(doc, open(path, "w"))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (model directory, single-process dump); one single-process run for all three."""
    mixtral = hf_moe("mixtral", tmp_path_factory.mktemp("mixtral"))[1]
    qwen = hf_moe("qwen2_moe", tmp_path_factory.mktemp("qwen"))[1]
    xverse = xverse_moe_dir(str(tmp_path_factory.mktemp("x") / "xverse"), capacity_factor=1.0)
    model = AutoModelForCausalLM.from_pretrained(xverse)
    ids = np.random.default_rng(1234).integers(0, 256, (4, 16))  # the worker's batch
    assert float(model.forward(*model.prepare(ids))[2][:, -1].sum().asnumpy()) > 0  # the capacity case really drops slots
    assert AutoModelForCausalLM.from_pretrained(qwen).config.shared_expert_gate
    dirs = (mixtral, qwen, xverse)
    out = str(tmp_path_factory.mktemp("single"))
    subprocess.run([sys.executable, WORKER, ",".join(dirs), out], check=True, capture_output=True)
    return {name: (d, dict(np.load(os.path.join(out, str(k), "rank0.npz"))))
            for k, (name, d) in enumerate(zip(FAMILIES, dirs))}


def run_layout(models: dict, families: tuple, layout: dict, tmp_path) -> None:
    """One msrun launch (compiled) for every family in ``families``, each compared with its single process."""
    world = ParallelConfig.from_dict(layout).world_size
    out = str(tmp_path / "out")
    msrun(WORKER, [",".join(models[f][0] for f in families), out, json.dumps(layout), "jit"], world,
          str(tmp_path / "log"))
    for k, family in enumerate(families):
        dumps = rank_dumps(os.path.join(out, str(k)) if len(families) > 1 else out, world)
        assert_layout_equals_single_process(dumps, models[family][1], layout)


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_equals_single_process(models, tmp_path, dispatcher):
    run_layout(models, ("mixtral", "xverse"), dict(data_parallel=2, expert_parallel=2,
                                                   moe_token_dispatcher=dispatcher), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", TP_LAYOUTS)
def test_tensor_parallel_moe_equals_single_process(models, tmp_path, name):
    run_layout(models, FAMILIES, TP_LAYOUTS[name], tmp_path)
