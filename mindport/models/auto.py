"""HuggingFace-style entry points: ``AutoConfig`` and ``AutoModelForCausalLM``.

A model directory is either HF format (config.json with ``model_type`` + HF tensor
names) or mindport format (config.json holding ``{"mindport_config": {...}}`` +
mindport parameter names, as written by ``mindport convert hf2ms`` and training).
"""
from __future__ import annotations

import os

from mindport.checkpoint.hf_checkpoint import HFCheckpoint, read_json
from mindport.config import MINDPORT_KEY, ConfigError, ModelConfig
from mindport.models import registry
from mindport.models.lora import ADAPTER_CONFIG, load_adapter
from mindport.parallel.layout import LAYOUT_FILE, rank_directory



def _config_path(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, "config.json")
    if os.path.isfile(path) and path.endswith(".json"):
        return path
    raise ConfigError(f"{path}: expected a model directory (with config.json) or a config.json file")


def read_config(path: str, **overrides) -> tuple[ModelConfig, bool]:
    """(config, is_hf_format) of a model directory or config.json."""
    json_path = _config_path(path)
    doc = read_json(json_path)
    if MINDPORT_KEY in doc:
        values = {**doc[MINDPORT_KEY], **overrides}
        return ModelConfig.from_dict(values, json_path), False
    fam = registry.detect(doc, json_path)
    config = fam.config_from_hf(doc, json_path)
    return (config.replace(**overrides) if overrides else config), True


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str, **overrides) -> ModelConfig:
        """The :class:`ModelConfig` of an HF or mindport model directory (or its config.json)."""
        return read_config(path, **overrides)[0]

    @staticmethod
    def from_preset(name: str, **overrides) -> ModelConfig:
        config = registry.find_preset(name)
        return config.replace(**overrides) if overrides else config


class AutoModelForCausalLM:
    @staticmethod
    def from_config(config: ModelConfig):
        from mindport.models.causal_lm import CausalLM

        check_device_dtypes(config)
        return CausalLM(config)

    @staticmethod
    def from_preset(name: str, **overrides):
        return AutoModelForCausalLM.from_config(AutoConfig.from_preset(name, **overrides))

    @staticmethod
    def from_pretrained(path: str, dtype: str | None = None, adapter: str | None = None, **overrides):
        """Build the model of a directory and load its weights (HF or mindport names).

        ``dtype`` ("float32", "float16", "bfloat16") sets parameter and compute dtype;
        default float32, since bf16 matmul is unavailable on CPU (asking for it there fails).
        ``adapter``: a PEFT LoRA adapter directory (:mod:`mindport.models.lora`) attached on top.
        """
        from mindport import dispatch
        from mindport.models.weights import load_into_model

        if dtype:
            dispatch.check_dtype(dtype, "dtype")
            overrides.update(param_dtype=dtype, compute_dtype=dtype)
        for key in ("param_dtype", "compute_dtype"):  # a caller's value is named as the caller's, not the file's
            if key in overrides:
                dispatch.check_dtype(overrides[key], f"key '{key}'")
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            raise ConfigError(f"{path}: a LoRA adapter ({ADAPTER_CONFIG}), not a model: load its base model with "
                              f"adapter={path!r} (--adapter on the command line), or `mindport lora merge` it")
        config, is_hf = read_config(path, **overrides)
        check_device_dtypes(config, _config_path(path))
        model = AutoModelForCausalLM.from_config(config)
        weights_dir, presliced = path, False
        if os.path.isfile(os.path.join(path, LAYOUT_FILE)):  # per-rank shards from `mindport convert`
            weights_dir, presliced = rank_directory(path, model.groups), True
        ckpt = HFCheckpoint(weights_dir)
        try:
            load_into_model(model, ckpt, registry.family(config.family).name_map if is_hf else None, presliced)
        finally:
            ckpt.close()
        model.source_dir = path
        if adapter:
            load_adapter(model, adapter)
        return model


def check_device_dtypes(config: ModelConfig, source: str | None = None) -> None:
    """Fail in one line (naming ``source``, the config's file) if this device cannot compute in the
    config's parameter or compute dtype (bfloat16 on CPU)."""
    from mindport import dispatch

    for key in ("param_dtype", "compute_dtype"):
        dispatch.check_dtype(getattr(config, key), f"{source}: key '{key}'" if source else f"key '{key}'")
