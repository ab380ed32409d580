"""The tiny TeleChat2 that the TP2 inference tests share, and its one msrun launch."""
from __future__ import annotations

import json
import os

import pytest

from testkit.hf_models import llama_tiny, save_hf_dir, telechat_from_llama
from testkit.launch import shared_launches

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="session")
def tp2_inference(tmp_path_factory):
    """(HF dir of a tiny GQA TeleChat2, ``run``): ``run("tokens.npz")`` (generate_worker.py) and
    ``run("engine")`` (engine_worker.py) under TP2, both in one launch, return their outputs."""
    hf_config, tensors = telechat_from_llama(llama_tiny(num_kv_heads=2, seed=9), training_seqlen=32)
    root = tmp_path_factory.mktemp("tp2_inference")
    hf_dir = save_hf_dir(str(root / "hf"), hf_config, tensors)
    (root / "engine").mkdir()
    layout = json.dumps({"model_parallel": 2})
    return hf_dir, shared_launches({
        "tokens.npz": ("tp2", 2, [os.path.join(HERE, "generate_worker.py"), hf_dir, str(root / "tokens.npz"), layout]),
        "engine": ("tp2", 2, [os.path.join(HERE, "engine_worker.py"), hf_dir, str(root / "engine"), layout]),
    }, str(root))
