"""Continuous batching under tensor parallelism (TP2, msrun): rank 0 schedules and broadcasts each
step's plan, rank 1 follows; the tokens equal one process's and replicated parameters stay identical."""
import json
import os
import subprocess
import sys

import pytest

from testkit.hf_models import llama_tiny, save_hf_dir, telechat_from_llama
from testkit.launch import assert_replicas_identical, msrun, rank_dumps

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


@pytest.mark.slow
def test_tp2_engine_equals_single_process(tmp_path):
    hf_config, tensors = telechat_from_llama(llama_tiny(num_kv_heads=2, seed=9), training_seqlen=32)
    hf_dir = save_hf_dir(str(tmp_path / "hf"), hf_config, tensors)
    single, parallel = tmp_path / "single", tmp_path / "tp2"
    single.mkdir(), parallel.mkdir()
    subprocess.run([sys.executable, WORKER, hf_dir, str(single)], check=True, capture_output=True)
    msrun(WORKER, [hf_dir, str(parallel), json.dumps({"model_parallel": 2})], 2, str(tmp_path / "log"))
    tokens = [json.load(open(directory / "tokens.json")) for directory in (single, parallel)]
    assert tokens[1] == tokens[0] and all(tokens[0])
    assert assert_replicas_identical(rank_dumps(str(parallel), 2)) > 0
