"""Tensor-parallel (TP2) greedy generation under msrun equals the single-process tokens, in fp32 and
with each rank's shard quantized to int8 (row-parallel scales agree over tp)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from testkit.hf_models import llama_tiny, save_hf_dir, telechat_from_llama
from testkit.launch import msrun

WORKER = os.path.join(os.path.dirname(__file__), "generate_worker.py")


@pytest.mark.slow
def test_tp2_generation_equals_single_process(tmp_path):
    hf_config, tensors = telechat_from_llama(llama_tiny(num_kv_heads=2, seed=9), training_seqlen=32)
    hf_dir = save_hf_dir(str(tmp_path / "hf"), hf_config, tensors)
    single, parallel = str(tmp_path / "single.npz"), str(tmp_path / "tp2.npz")
    subprocess.run([sys.executable, WORKER, hf_dir, single], check=True, capture_output=True)
    msrun(WORKER, [hf_dir, parallel, json.dumps({"model_parallel": 2})], 2, str(tmp_path / "log"))
    ours, ref = np.load(parallel), np.load(single)
    for name in ("tokens", "int8_tokens"):
        assert np.array_equal(ours[name], ref[name]), name
    np.testing.assert_allclose(ours["int8_logits"], ref["int8_logits"], atol=1e-5, rtol=0)
