"""Run configuration: a mindformers-shaped YAML file (``model: model_config: ...``,
``parallel_config: ...``, ``optimizer``, ``lr_schedule``, ``runner_config``, ...) read into a
:class:`RunConfig` of the model, layout and training settings (:class:`TrainConfig`, read from the
sections ``optimizer``, ``lr_schedule``, ``runner_config``, ``runner_wrapper``, ``recompute_config``,
``train_dataset`` and top-level keys)."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

from mindport.config import (ConfigError, Loadable, LoraConfig, ModelConfig, ParallelConfig, check_types, fail, one_of,
                             positive)


@dataclass
class TrainConfig(Loadable):
    """Optimiser, schedule and run settings (mindformers' optimizer/lr_schedule/runner_config).

    One optimiser step consumes ``batch_size * grad_accumulation`` samples of ``seq_length`` tokens on each
    data-parallel rank (:attr:`RunConfig.tokens_per_step` counts the whole step).
    """

    seed: int = 0
    output_dir: str = "./output"
    batch_size: int = 1  # samples per micro-batch
    seq_length: int = 256
    train_steps: int = 100  # optimiser steps
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1  # AdamW, decoupled; never applied to norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accumulation: int = 1
    amp_level: str = "O0"  # O0 fp32 | O1 fp16 matmuls | O2 fp16 weights + fp32 master copy + loss scale
    amp_dtype: str = "float16"  # the low precision of O1/O2; bfloat16 matmul needs Ascend
    loss_scale: float = 1.0  # static scale, or the initial one of a dynamic scaler
    loss_scale_type: str = "static"  # static | dynamic (dynamic: overflow skips the step; Ascend/GPU)
    loss_scale_factor: int = 2
    loss_scale_window: int = 1000
    recompute: bool | int = False  # True: every layer; N: the first N layers; False: none
    jit: bool = True  # compile the train step (MoE models always run eagerly)
    save_steps: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_steps: int = 1
    data_dir: str | None = None  # a `mindport data prepare` directory
    data_dirs: list | None = None  # or a weighted mixture of them: [{path, weight}, ...] (mindport.train.mixture)
    load_checkpoint: str | None = None  # initial weights (HF or mindport model directory); None: random init
    peak_tflops: float = 0.0  # MFU denominator; 0: measure MindSpore's fp32 matmul rate at start

    def __post_init__(self) -> None:
        check_types(self)
        positive(self, "batch_size", "seq_length", "train_steps", "grad_accumulation", "keep_checkpoints",
                 "log_steps", "loss_scale_window")
        one_of("amp_level", self.amp_level, ("O0", "O1", "O2"))
        one_of("amp_dtype", self.amp_dtype, ("float16", "bfloat16"))
        one_of("loss_scale_type", self.loss_scale_type, ("static", "dynamic"))
        for key in ("learning_rate", "loss_scale", "eps"):
            if not getattr(self, key) > 0:
                fail(key, getattr(self, key), "a positive number")
        for key in ("min_learning_rate", "weight_decay", "grad_clip"):
            if not getattr(self, key) >= 0:
                fail(key, getattr(self, key), "a non-negative number")
        if self.min_learning_rate > self.learning_rate:
            fail("min_learning_rate", self.min_learning_rate, f"at most learning_rate = {self.learning_rate}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                fail(key, getattr(self, key), "a number in [0, 1)")
        if self.loss_scale_factor < 2:
            fail("loss_scale_factor", self.loss_scale_factor, "an integer >= 2")
        for key in ("seed", "warmup_steps", "save_steps"):
            if getattr(self, key) < 0:
                fail(key, getattr(self, key), "a non-negative integer")
        if self.recompute < 0:
            fail("recompute", self.recompute, "true, false or a number of layers")
        if not self.peak_tflops >= 0:
            fail("peak_tflops", self.peak_tflops, "a non-negative number (0: measure)")
        if not self.output_dir:
            fail("output_dir", self.output_dir, "a directory path")
        if self.data_dirs is not None:
            self._check_mixture()

    def _check_mixture(self) -> None:
        key = "train_dataset.data_dirs"
        if self.data_dir:
            fail(key, self.data_dirs, f"no data_dir beside it (train_dataset.data_dir = {self.data_dir!r}): one or "
                                      f"the other")
        if not isinstance(self.data_dirs, list) or not self.data_dirs:
            fail(key, self.data_dirs, "a non-empty list of {path: DIR, weight: NUMBER}")
        for k, source in enumerate(self.data_dirs):
            if not isinstance(source, dict) or set(source) != {"path", "weight"}:
                fail(f"{key}[{k}]", source, "a mapping with exactly the keys path and weight")
            if not isinstance(source["path"], str) or not source["path"]:
                fail(f"{key}[{k}].path", source["path"], "a `mindport data prepare` directory")
            weight = source["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                fail(f"{key}[{k}].weight", weight, "a positive number")

# YAML sections (mindformers layout) -> TrainConfig keys they may carry (and the UNUSED_KEYS below).
_TRAIN_SECTIONS = {
    "optimizer": {"learning_rate": "learning_rate", "weight_decay": "weight_decay", "eps": "eps",
                  "beta1": "beta1", "beta2": "beta2"},
    "lr_schedule": {"learning_rate": "learning_rate", "lr_end": "min_learning_rate",
                    "warmup_steps": "warmup_steps", "total_steps": "train_steps"},
    "runner_config": {"batch_size": "batch_size", "seq_length": "seq_length", "train_steps": "train_steps",
                      "gradient_accumulation_steps": "grad_accumulation", "grad_clip": "grad_clip",
                      "amp_level": "amp_level", "amp_dtype": "amp_dtype", "loss_scale": "loss_scale",
                      "loss_scale_type": "loss_scale_type", "recompute": "recompute", "jit": "jit",
                      "save_steps": "save_steps", "keep_checkpoints": "keep_checkpoints",
                      "log_steps": "log_steps", "peak_tflops": "peak_tflops"},
    # mindformers' wrapper cell: clipping and the loss-scale update cell
    "runner_wrapper": {"max_grad_norm": "grad_clip", "scale_sense": None},
    "recompute_config": {"recompute": "recompute"},
    "train_dataset": {"data_dir": "data_dir", "data_dirs": "data_dirs"},
}
# runner_wrapper.scale_sense (DynamicLossScaleUpdateCell / FixedLossScaleUpdateCell) -> TrainConfig keys
_SCALE_SENSE = {"loss_scale_value": "loss_scale", "scale_factor": "loss_scale_factor",
                "scale_window": "loss_scale_window", "type": None}
_TOP_LEVEL_TRAIN = {"seed": "seed", "output_dir": "output_dir", "load_checkpoint": "load_checkpoint"}
# mindformers YAML keys mindport accepts but does not use -> the value that matches what mindport does;
# a run setting another value gets one warning line (unused_keys_set). None: any value is fine (a class
# name, or a setting with no effect here).
UNUSED_KEYS: dict[str, Any] = {
    "trainer": None, "context": None, "use_parallel": None, "src_strategy_path_or_dir": "",
    "auto_trans_ckpt": False, "only_save_strategy": False, "resume_training": False,  # mindport: --resume
    "model.arch": None, "model.model_config.type": None,
    "parallel_config.gradient_aggregation_group": 4, "parallel_config.vocab_emb_dp": False,
    "optimizer.type": "AdamW", "lr_schedule.type": "CosineWithWarmUpLR", "train_dataset.type": None,
    "runner_config.epochs": 1, "runner_config.sink_mode": False,  # mindport: train_steps, no data sinking
    "runner_wrapper.type": "MFTrainOneStepCell", "runner_wrapper.use_clip_grad": True,  # mindport: grad_clip > 0
    "recompute_config.select_recompute": False, "recompute_config.parallel_optimizer_comm_recompute": False,
    "recompute_config.mp_comm_recompute": True, "recompute_config.recompute_slice_activation": False,
}


def unused_keys_set(doc: Mapping[str, Any]) -> list[str]:
    """``'key = value'`` for each :data:`UNUSED_KEYS` key that ``doc`` (a run YAML) sets to a value
    other than the one matching what mindport does."""
    out = []
    for dotted, expected in UNUSED_KEYS.items():
        node: Any = doc
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if expected is not None and (node != expected or isinstance(node, bool) != isinstance(expected, bool)):
                out.append(f"{dotted} = {node!r}")
    return out


def _put(values: dict[str, Any], origin: dict[str, str], field: str, value: Any, key: str, source: str) -> None:
    """Set a TrainConfig field, refusing two YAML keys that give it different values (True is not 1)."""
    if field in values and (values[field] != value or isinstance(values[field], bool) != isinstance(value, bool)):
        raise ConfigError(f"{source}: keys '{origin[field]}' = {values[field]!r} and '{key}' = {value!r} both set "
                          f"'{field}': keep one")
    values[field], origin[field] = value, key


def _scale_sense(value: Any, source: str, values: dict[str, Any], origin: dict[str, str]) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key 'runner_wrapper.scale_sense' = {value!r}: expected a mapping")
    for key, sub_value in value.items():
        if key not in _SCALE_SENSE:
            raise ConfigError(f"{source}: unknown key 'runner_wrapper.scale_sense.{key}' (known: "
                              f"{', '.join(sorted(_SCALE_SENSE))})")
        if _SCALE_SENSE[key]:
            _put(values, origin, _SCALE_SENSE[key], sub_value, f"runner_wrapper.scale_sense.{key}", source)
    kind = str(value.get("type", ""))
    if kind:
        _put(values, origin, "loss_scale_type", "dynamic" if "Dynamic" in kind else "static",
             "runner_wrapper.scale_sense.type", source)


def train_config_from_sections(doc: Mapping[str, Any], source: str) -> TrainConfig:
    """A :class:`TrainConfig` from a run YAML's non-model, non-parallel top-level keys."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in doc.items():
        if key in UNUSED_KEYS or (key == "load_checkpoint" and not value):  # mindformers: "" = none
            continue
        if key in _TOP_LEVEL_TRAIN:
            _put(values, origin, _TOP_LEVEL_TRAIN[key], value, key, source)
        elif key in _TRAIN_SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a mapping")
            for sub, sub_value in value.items():
                if f"{key}.{sub}" in UNUSED_KEYS:
                    continue
                if sub not in _TRAIN_SECTIONS[key]:
                    unused = [k.split(".")[1] for k in UNUSED_KEYS if k.startswith(f"{key}.")]
                    raise ConfigError(f"{source}: unknown key '{key}.{sub}' (known: "
                                      f"{', '.join(sorted([*_TRAIN_SECTIONS[key], *unused]))})")
                if key == "runner_wrapper" and sub == "scale_sense":
                    _scale_sense(sub_value, source, values, origin)
                elif _TRAIN_SECTIONS[key][sub]:
                    _put(values, origin, _TRAIN_SECTIONS[key][sub], sub_value, f"{key}.{sub}", source)
        else:
            raise ConfigError(f"{source}: unknown top-level key '{key}'")
    return TrainConfig.from_dict(values, f"{source}: training settings")


@dataclass
class RunConfig:
    """A whole YAML file: model, layout and training (``lora``: ``model.model_config.pet_config``)."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig | None = None
    run_mode: str = "train"  # mindformers' key: train | finetune (the same run here) | predict (serving sizes)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimiser step consumes over all ranks: ``batch_size`` rows per data-parallel rank
        (times ``micro_batch_num`` with pipeline stages), x data_parallel x grad_accumulation x seq_length."""
        p, t = self.parallel, self.train
        rows = t.batch_size * (p.micro_batch_num if p.pipeline_stage > 1 else 1)
        return rows * p.data_parallel * t.grad_accumulation * t.seq_length


# mindformers' run_mode values mindport reads: train and finetune start `mindport train`; predict marks a
# serving config (layout, context length and batch for `mindport plan --config`), which `mindport train` refuses
RUN_MODES = ("train", "finetune", "predict")

# model_config keys that are not the architecture: with load_checkpoint they still come from the YAML
# (everything else comes from the checkpoint, and a YAML value must agree with it)
TRAINING_MODEL_KEYS = ("param_dtype", "compute_dtype", "initializer_range", "router_aux_loss_coef",
                       "router_z_loss_coef", "router_aux_loss_scope", "capacity_factor", "vocab_pad_multiple")


def run_config_from_dict(doc: Mapping[str, Any], source: str) -> RunConfig:
    """Build a :class:`RunConfig` from a mindformers-shaped mapping. With ``load_checkpoint`` the
    architecture is the checkpoint's (``model.model_config`` may be omitted). mindformers keys that
    mindport does not use (``UNUSED_KEYS``) are accepted; set to another value, they get one warning line."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'model: model_config:' section")
    run_mode = doc.get("run_mode", "train")
    if run_mode not in RUN_MODES:
        raise ConfigError(f"{source}: key 'run_mode' = {run_mode!r}: expected one of "
                          f"{', '.join(map(repr, RUN_MODES))}")
    rest = {k: v for k, v in doc.items() if k not in ("model", "parallel_config", "run_mode")}
    train = train_config_from_sections(rest, source)
    model_section = doc.get("model", {} if train.load_checkpoint else None)
    if not isinstance(model_section, Mapping):
        raise ConfigError(f"{source}: key 'model' missing: expected a 'model: model_config:' section (or "
                          f"load_checkpoint)")
    extra = {k for k in model_section if k != "model_config" and f"model.{k}" not in UNUSED_KEYS}
    if extra:
        raise ConfigError(f"{source}: unknown key 'model.{sorted(extra)[0]}' (known: model_config, arch)")
    model_values = model_section.get("model_config", {} if train.load_checkpoint else None)
    if not isinstance(model_values, Mapping):
        raise ConfigError(f"{source}: key 'model.model_config' missing: expected the model's settings there")
    model_values = {k: v for k, v in model_values.items() if f"model.model_config.{k}" not in UNUSED_KEYS}
    lora = _pet_config(model_values.pop("pet_config", None), source)
    if "preset" in model_values:
        model_values = _expand_preset(model_values, source, architecture_only=bool(train.load_checkpoint))
    if train.load_checkpoint:
        model = _checkpoint_model_config(train.load_checkpoint, model_values, source)
    else:
        model = ModelConfig.from_dict(model_values, f"{source}: model.model_config")
    parallel_values = {k: v for k, v in (doc.get("parallel_config") or {}).items()
                       if f"parallel_config.{k}" not in UNUSED_KEYS}
    parallel = ParallelConfig.from_dict(parallel_values, f"{source}: parallel_config")
    parallel.check_training(model, f"{source}: parallel_config")
    if lora is not None:  # a target that matches nothing fails before any work
        from mindport.models.lora import select

        select(model, lora, f"{source}: model.model_config.pet_config")
    unused = unused_keys_set(doc)
    if unused:
        print(f"{source}: warning: mindformers key(s) {', '.join(unused)} accepted but unused by mindport: "
              f"no effect", file=sys.stderr)
    return RunConfig(model, parallel, train, lora, run_mode)


def _pet_config(values: Any, source: str) -> LoraConfig | None:
    """mindformers' ``model_config.pet_config`` (null: full fine-tuning)."""
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: key 'model.model_config.pet_config' = {values!r}: expected a mapping")
    return LoraConfig.from_dict(values, f"{source}: model.model_config.pet_config")


def _expand_preset(values: Mapping[str, Any], source: str, architecture_only: bool) -> dict[str, Any]:
    """``model_config: {preset: NAME, <key>: <value>...}``: the preset's fields, overridden by the keys
    beside it. With ``architecture_only`` (load_checkpoint) the preset's :data:`TRAINING_MODEL_KEYS`
    are left out, so those still come from the YAML or the checkpoint."""
    from mindport.models.registry import find_preset

    values = dict(values)
    name = values.pop("preset")
    try:
        preset = find_preset(name).to_dict()
    except ConfigError as err:
        raise ConfigError(f"{source}: model.model_config: {err}") from None
    if architecture_only:
        preset = {k: v for k, v in preset.items() if k not in TRAINING_MODEL_KEYS}
    return {**preset, **{ModelConfig.ALIASES.get(k, k): v for k, v in values.items()}}


def _checkpoint_model_config(path: str, yaml_values: Mapping[str, Any], source: str) -> ModelConfig:
    """``load_checkpoint``'s architecture with the YAML's :data:`TRAINING_MODEL_KEYS`; any other key the
    YAML states must equal the checkpoint's."""
    from mindport.models.auto import AutoConfig

    if not os.path.exists(path):
        raise ConfigError(f"{source}: key 'load_checkpoint' = {path!r}: no such checkpoint directory")
    checkpoint = AutoConfig.from_pretrained(path)
    known = {f.name for f in fields(ModelConfig)}
    changes = {}
    for key, value in yaml_values.items():
        name = ModelConfig.ALIASES.get(key, key)
        if name not in known:
            raise ConfigError(f"{source}: unknown key 'model.model_config.{key}' (known keys: "
                              f"{', '.join(sorted(known))})")
        if name in TRAINING_MODEL_KEYS:
            changes[name] = value
        elif value != getattr(checkpoint, name) and not (name == "num_kv_heads" and value is None):
            raise ConfigError(f"{source}: key 'model.model_config.{key}' = {value!r}, but load_checkpoint "
                              f"{path!r} has {getattr(checkpoint, name)!r}: the architecture comes from the "
                              f"checkpoint (drop the key or make it agree)")
    try:
        return checkpoint.replace(**changes)
    except ConfigError as err:
        raise ConfigError(f"{source}: model.model_config: {err}") from None


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), plus numbers in exponent form without a dot (``5e-3``,
    ``1E6``) read as floats, as YAML 1.2 and Python read them (YAML 1.1 makes them strings)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_error(where: str, err: yaml.YAMLError, position: bool = True) -> ConfigError:
    """One line: ``FILE:LINE:COLUMN: not valid YAML: the parser's problem``."""
    mark = getattr(err, "problem_mark", None)
    if position and mark is not None:
        where = f"{where}:{mark.line + 1}:{mark.column + 1}"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return ConfigError(f"{where}: not valid YAML: {f'{context}: ' if context else ''}{problem}")


def _coerce(text: str, source: str) -> Any:
    """An override's value: a YAML scalar or flow collection; a string Python's ``float`` reads
    (``5e-3``, ``inf``) is that float."""
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(source, err, position=False) from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(doc: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed by :func:`_coerce`) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: '{item}' is not of the form key.path=value")
        path, text = item.split("=", 1)
        node = doc
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: key '{path}' crosses a non-mapping value at '{key}'")
        node[keys[-1]] = _coerce(text, f"{source} {item}")
    return doc


def load_yaml(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a mindformers-shaped YAML run config, with optional ``key=value`` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.load(f, Loader=_YamlLoader)
        except yaml.YAMLError as err:
            raise _yaml_error(path, err) from None
    return run_config_from_dict(apply_overrides(doc or {}, overrides or []), path)
