"""Continuous batching under tensor parallelism (TP2, msrun): rank 0 schedules and broadcasts each
step's plan, rank 1 follows; the tokens equal one process's and replicated parameters stay identical."""
import json
import os
import subprocess
import sys

import pytest

from testkit.launch import assert_replicas_identical, rank_dumps

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


@pytest.mark.slow
def test_tp2_engine_equals_single_process(tp2_inference, tmp_path):
    hf_dir, run = tp2_inference
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run([sys.executable, WORKER, hf_dir, str(single)], check=True, capture_output=True)
    parallel = run("engine")
    tokens = [json.load(open(os.path.join(directory, "tokens.json"))) for directory in (single, parallel)]
    assert tokens[1] == tokens[0] and all(tokens[0])
    assert assert_replicas_identical(rank_dumps(parallel, 2)) > 0
