"""MoE under expert and tensor parallelism on real msrun processes (CPU), against the
single-process run on the whole batch: loss, global gradient norm, logits, every gradient and
every parameter after one AdamW step, and replicated parameters bit-identical on every rank.

Every layout runs forward and backward as one ms.jit graph, as the Trainer does (the eager path runs
the same code; tests/train/test_moe_compiled.py compares the two).

- EP2 with each token dispatcher, tiny Mixtral and XVERSE-MoE (with capacity drops).
- TP2, TP2+SP and TP2 x EP2 (4 ranks), tiny Mixtral, Qwen2-MoE (shared expert + sigmoid gate)
  and XVERSE-MoE (shared experts, capacity drops), all with a router loss: the router's and the
  shared gate's gradients are partial on each tp rank and must be summed over tp.

Two msrun launches: the world-2 layouts (both EP2 dispatchers, TP2, TP2+SP) in one, TP2 x EP2.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindport import AutoModelForCausalLM, ParallelConfig
from testkit.hf_models import hf_moe
from testkit import launch
from testkit.launch import assert_layout_equals_single_process, rank_dumps

WORKER = os.path.join(os.path.dirname(__file__), "step_worker.py")
FAMILIES = ("mixtral", "qwen2_moe", "xverse")
EP_FAMILIES = ("mixtral", "xverse")
# name -> (families, layout)
LAYOUTS = {
    "ep2_alltoall": (EP_FAMILIES, dict(data_parallel=2, expert_parallel=2, moe_token_dispatcher="alltoall")),
    "ep2_allgather": (EP_FAMILIES, dict(data_parallel=2, expert_parallel=2, moe_token_dispatcher="allgather")),
    "tp2": (FAMILIES, dict(model_parallel=2)),
    "tp2_sp": (FAMILIES, dict(model_parallel=2, use_seq_parallel=True)),
    "tp2_ep2": (FAMILIES, dict(data_parallel=2, model_parallel=2, expert_parallel=2)),
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


@pytest.fixture(scope="module")
def layout_runs(models, tmp_path_factory):
    """name -> its output directory (OUT/k/ for the k-th family) once its compiled steps have run."""
    runs = {name: (",".join(models[f][0] for f in families), layout) for name, (families, layout) in LAYOUTS.items()}
    return launch.layout_runs(WORKER, runs, str(tmp_path_factory.mktemp("layouts")), "jit")


def assert_layout_equals(models: dict, layout_runs, name: str) -> None:
    """Every family's ranks under layout ``name`` against its single process."""
    families, layout = LAYOUTS[name]
    for k, family in enumerate(families):
        dumps = rank_dumps(os.path.join(layout_runs(name), str(k)), ParallelConfig.from_dict(layout).world_size)
        assert_layout_equals_single_process(dumps, models[family][1], layout)


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_equals_single_process(models, layout_runs, dispatcher):
    assert_layout_equals(models, layout_runs, f"ep2_{dispatcher}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "tp2_sp", "tp2_ep2"])
def test_tensor_parallel_moe_equals_single_process(models, layout_runs, name):
    assert_layout_equals(models, layout_runs, name)
