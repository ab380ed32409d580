"""Session fixtures shared by every folder; the helpers behind them live in ``testkit`` (importable anywhere)."""
from __future__ import annotations

import os

import pytest

from testkit.hf_models import llama_tiny, save_hf_dir, telechat_from_llama

os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's C++ logging quiet


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (run in CI, deselect with -m 'not slow')")


@pytest.fixture(scope="session", params=["gqa", "mha"])
def telechat_pair(request, tmp_path_factory):
    """(llama model, telechat HF dir) with identical weights; training_seqlen 32."""
    llama = llama_tiny(num_kv_heads=2 if request.param == "gqa" else 4, seed=1)
    hf_config, tensors = telechat_from_llama(llama, training_seqlen=32)
    directory = save_hf_dir(str(tmp_path_factory.mktemp(f"telechat_{request.param}")), hf_config, tensors)
    return llama, directory


@pytest.fixture(scope="session")
def tiny_telechat_hf(tmp_path_factory) -> str:
    """HF directory of a tiny GQA TeleChat2 (built from a seeded Llama), shared by the msrun tests."""
    hf_config, tensors = telechat_from_llama(llama_tiny(num_kv_heads=2, seed=5), training_seqlen=32)
    return save_hf_dir(str(tmp_path_factory.mktemp("tc_hf")), hf_config, tensors)
