"""mindport: MindSpore ports of TeleChat2, XVERSE, Mixtral and Qwen-MoE, testable on CPU."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["AutoConfig", "AutoModelForCausalLM", "ModelConfig", "ParallelConfig", "TrainConfig", "ConfigError"]

from mindport.config import ConfigError, ModelConfig, ParallelConfig
from mindport.train.config import TrainConfig


def __getattr__(name: str):
    # The Auto classes import MindSpore (~2.5 s): load them on first use only.
    if name in ("AutoConfig", "AutoModelForCausalLM"):
        from mindport.models import auto

        return getattr(auto, name)
    raise AttributeError(f"module 'mindport' has no attribute {name!r}")
