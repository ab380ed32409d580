"""Tensor-parallel (TP2) greedy generation under msrun equals the single-process tokens, in fp32 and
with each rank's shard quantized to int8 (row-parallel scales agree over tp)."""
import os
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "generate_worker.py")


@pytest.mark.slow
def test_tp2_generation_equals_single_process(tp2_inference, tmp_path):
    hf_dir, run = tp2_inference
    single = str(tmp_path / "single.npz")
    subprocess.run([sys.executable, WORKER, hf_dir, single], check=True, capture_output=True)
    ours, ref = np.load(run("tokens.npz")), np.load(single)
    for name in ("tokens", "int8_tokens"):
        assert np.array_equal(ours[name], ref[name]), name
    np.testing.assert_allclose(ours["int8_logits"], ref["int8_logits"], atol=1e-5, rtol=0)
