"""EP2 (experts split over 2 data-parallel ranks) with each token dispatcher, tiny Mixtral and
XVERSE-MoE (with and without capacity drops): loss, gradients and post-step parameters equal the
single-process run on the whole batch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindport import AutoModelForCausalLM
from mindport.parallel.sharding import shard_slices
from testkit.hf_models import hf_moe
from testkit.launch import assert_close, msrun

WORKER = os.path.join(os.path.dirname(__file__), "step_worker.py")

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
    mixtral = hf_moe("mixtral", tmp_path_factory.mktemp("mixtral"))[1]
    xverse = xverse_moe_dir(str(tmp_path_factory.mktemp("x") / "xverse"), capacity_factor=1.0)
    model = AutoModelForCausalLM.from_pretrained(xverse)
    ids = np.random.default_rng(1234).integers(0, 256, (4, 16))  # the worker's batch
    assert float(model.forward(*model.prepare(ids))[2].asnumpy()) > 0  # the capacity case really drops slots
    refs = {}
    for name, directory in (("mixtral", mixtral), ("xverse", xverse)):
        out = str(tmp_path_factory.mktemp(f"{name}_single"))
        subprocess.run([sys.executable, WORKER, directory, out], check=True, capture_output=True)
        refs[name] = (directory, dict(np.load(os.path.join(out, "rank0.npz"))))
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "xverse"])
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_equals_single_process(models, tmp_path, family, dispatcher):
    directory, ref = models[family]
    layout = dict(data_parallel=2, expert_parallel=2, moe_token_dispatcher=dispatcher)
    out = str(tmp_path / "out")
    msrun(WORKER, [directory, out, json.dumps(layout)], 2, str(tmp_path / "log"))
    for rank in range(2):
        dump = dict(np.load(os.path.join(out, f"rank{rank}.npz")))
        assert_close(dump["loss"], ref["loss"], f"rank {rank} loss")
        for key in (k for k in dump if k.startswith(("grad:", "param:"))):
            name = key.split(":", 1)[1]
            index = shard_slices(name, ref[key].shape, ep_rank=rank, ep_size=2)
            assert_close(dump[key], ref[key][index], f"rank {rank} {key}")
