"""Configuration dataclasses: model, parallel layout and training.

Every config validates itself once (``__post_init__``) and derives what follows from
its fields, so layers never re-check divisibility. Configs load from mindformers-shaped
YAML (``model: model_config: ...``, ``parallel_config: ...``, ``optimizer``,
``lr_schedule``, ``runner_config``) and model configs from a HuggingFace ``config.json``
through the family registry (:mod:`mindport.models`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration key holds a value mindport cannot use."""


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"key '{key}' = {value!r}: expected {expected}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(name, value, "a positive integer")


def _divides(key: str, value: int, divisor_key: str, divisor: int) -> None:
    if value % divisor:
        _fail(key, value, f"a multiple of {divisor_key} = {divisor}")


_SCALARS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_types(obj: Any) -> None:
    """Fail unless every field of dataclass ``obj`` annotated with scalar types (``int``, ``float``,
    ``bool``, ``str``, optionally ``| None`` or ``bool | int``) holds one of them. YAML reads
    ``yes``/``on`` as True and True == 1, so a boolean is never taken for a number, nor a number
    for a boolean. Other annotations are not checked. Each config's ``__post_init__`` calls it first."""
    for f in fields(obj):
        kinds = [part.strip() for part in str(f.type).split("|")]
        if any(kind not in _SCALARS and kind != "None" for kind in kinds):
            continue
        value = getattr(obj, f.name)
        ok = {"None": value is None, "bool": isinstance(value, bool), "str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}
        if not any(ok[kind] for kind in kinds):
            _fail(f.name, value, " or ".join(_SCALARS.get(kind, "null") for kind in kinds))


def _one_of(key: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


class _Loadable:
    """Shared construction from a plain mapping, rejecting unknown keys by name."""

    ALIASES: dict[str, str] = {}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str | None = None):
        source = source or cls.__name__
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = cls.ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(f"{source}: unknown key '{key}' (known keys: {', '.join(sorted(known))})")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as err:  # a required field is missing
            raise ConfigError(f"{source}: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(_Loadable):
    """Architecture of a decoder-only causal LM (dense or MoE), independent of family.

    Sizes: H hidden_size, n num_heads, n_kv num_kv_heads, hd = H / n, F ffn_hidden_size,
    E num_experts, I moe_intermediate_size.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int = 0  # dense MLP width (unused by MoE layers)
    num_kv_heads: int | None = None  # None: multi-head attention (n_kv = n)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    # attention projections
    kv_layout: str = "separate"  # "separate": k_proj, v_proj; "interleaved": one key_value, rows K0,V0,K1,V1,...
    qkv_bias: bool = False
    o_bias: bool = False
    # dense MLP
    gate_up_bias: bool = False
    down_bias: bool = False
    # rotary embedding
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "none" | "telechat_ntk" (dynamic NTK + mscale)
    training_seqlen: int | None = None  # telechat_ntk: length the model was trained at
    base_seqlen: int | None = None  # telechat_ntk: length alpha is measured against
    rope_fp16_tables: bool = False  # round cos/sin to fp16 as TeleChat2's published code does
    use_logn_attn: bool = False  # opt-in logN query scaling beyond training_seqlen
    # mixture of experts (num_experts == 0: dense MLP)
    num_experts: int = 0
    moe_top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    norm_topk_eps: float = 0.0  # XVERSE-MoE renormalises as w / (sum(w) + 1e-6)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen: shared output scaled by sigmoid(Linear(H -> 1))
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    capacity_factor: float = 0.0  # 0: dropless
    # token ids and dtypes
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    initializer_range: float = 0.02
    # tensor parallelism: the vocabulary is padded to a multiple of vocab_pad_multiple x model_parallel
    # (Megatron's make-vocab-size-divisible-by; mindport.parallel.sharding.vocab_block). Default 1: the
    # padding rows are never stored, so the multiple only sets each rank's logit width; 1 keeps it at
    # ceil(V / tp), under tp wasted columns. Raise it (e.g. 128 / tp) for aligned matmul tiles on Ascend.
    vocab_pad_multiple: int = 1

    ALIASES = {  # mindformers model_config names
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "n_kv_heads": "num_kv_heads",
        "num_key_value_heads": "num_kv_heads",
        "intermediate_size": "ffn_hidden_size",
        "theta": "rope_theta",
        "max_position_embedding": "max_position_embeddings",
        "param_init_type": "param_dtype",
    }

    def __post_init__(self) -> None:
        check_types(self)
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings",
                  "vocab_pad_multiple")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _positive(self, "num_kv_heads")
        _divides("hidden_size", self.hidden_size, "num_heads", self.num_heads)
        _divides("num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
        if self.head_dim % 2:
            _fail("hidden_size", self.hidden_size, "an even head dimension hidden_size / num_heads")
        if not self.rms_norm_eps > 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "a positive number")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "a positive number")
        _one_of("kv_layout", self.kv_layout, ("separate", "interleaved"))
        _one_of("rope_scaling", self.rope_scaling, ("none", "telechat_ntk"))
        _one_of("param_dtype", self.param_dtype, ("float32", "float16", "bfloat16"))
        _one_of("compute_dtype", self.compute_dtype, ("float32", "float16", "bfloat16"))
        if self.rope_scaling == "telechat_ntk" or self.use_logn_attn:
            self.training_seqlen = self.training_seqlen or self.max_position_embeddings
            self.base_seqlen = self.base_seqlen or self.training_seqlen
            _positive(self, "training_seqlen", "base_seqlen")
        if self.num_experts:
            _positive(self, "num_experts", "moe_top_k", "moe_intermediate_size")
            if self.moe_top_k > self.num_experts:
                _fail("moe_top_k", self.moe_top_k, f"at most num_experts = {self.num_experts}")
            if self.capacity_factor < 0:
                _fail("capacity_factor", self.capacity_factor, "0 (dropless) or a positive number")
        elif self.moe_top_k or self.shared_expert_intermediate_size:
            _fail("num_experts", self.num_experts, "a positive count when MoE keys are set")
        else:
            _positive(self, "ffn_hidden_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds."""
        h, hd, n, nkv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        attn = h * n * hd + 2 * h * nkv * hd + n * hd * h
        attn += (n * hd + 2 * nkv * hd) * self.qkv_bias + h * self.o_bias
        if self.is_moe:
            mlp = self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
            mlp += 3 * h * self.shared_expert_intermediate_size + h * self.shared_expert_gate
        else:
            mlp = 3 * h * self.ffn_hidden_size + 2 * self.ffn_hidden_size * self.gate_up_bias + h * self.down_bias
        per_layer = attn + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def save(self, path: str) -> None:
        _atomic_write_text(path, json.dumps({"mindport_config": self.to_dict()}, indent=2) + "\n")


@dataclass
class ParallelConfig(_Loadable):
    """Parallel layout in mindformers' ``parallel_config`` names.

    world = data_parallel x pipeline_stage x context_parallel x model_parallel, with
    model_parallel varying fastest so a tensor-parallel group sits inside one node.
    """

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    offset: Any = 0  # mindformers' per-stage layer offsets: an int for every stage or a list, one per stage
    context_parallel: int = 1
    expert_parallel: int = 1
    micro_batch_num: int = 1
    use_seq_parallel: bool = False
    optimizer_shard: bool = False
    context_parallel_algo: str = "ring"
    moe_token_dispatcher: str = "alltoall"  # expert parallelism: "alltoall" | "allgather"

    def __post_init__(self) -> None:
        check_types(self)
        _positive(self, "data_parallel", "model_parallel", "pipeline_stage", "context_parallel",
                  "expert_parallel", "micro_batch_num")
        _one_of("context_parallel_algo", self.context_parallel_algo, ("ring", "all_gather"))
        _one_of("moe_token_dispatcher", self.moe_token_dispatcher, ("alltoall", "allgather"))
        if self.micro_batch_num < self.pipeline_stage and self.pipeline_stage > 1:
            _fail("micro_batch_num", self.micro_batch_num, f"at least pipeline_stage = {self.pipeline_stage}")
        if self.data_parallel % self.expert_parallel:  # expert-parallel groups sit inside the data-parallel ones
            _fail("expert_parallel", self.expert_parallel, f"a divisor of data_parallel = {self.data_parallel}")
        if self.pipeline_stage > 1 and self.context_parallel > 1:
            raise ConfigError(f"key 'context_parallel' = {self.context_parallel}: training with pipeline_stage > 1 "
                              f"runs without context parallelism")

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.pipeline_stage * self.context_parallel * self.model_parallel

    def check_model(self, model: ModelConfig, source: str = "parallel_config") -> None:
        """Fail before any work when the model cannot be split this way."""
        try:
            self._check_model(model)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def _check_model(self, model: ModelConfig) -> None:
        from mindport.parallel.sharding import vocab_block

        tp = self.model_parallel
        for key in ("num_heads", "num_kv_heads"):
            _divides(key, getattr(model, key), "model_parallel", tp)
        rows = vocab_block(model.vocab_size, tp, model.vocab_pad_multiple)  # the vocabulary is padded, not divided
        if model.vocab_size <= (tp - 1) * rows:
            _fail("vocab_size", model.vocab_size, f"more than {(tp - 1) * rows} (padded to {tp} x {rows} rows with "
                  f"vocab_pad_multiple = {model.vocab_pad_multiple}, every model_parallel rank needs real rows)")
        if model.is_moe:
            _divides("moe_intermediate_size", model.moe_intermediate_size, "model_parallel", tp)
            _divides("shared_expert_intermediate_size", model.shared_expert_intermediate_size, "model_parallel", tp)
        else:
            _divides("ffn_hidden_size", model.ffn_hidden_size, "model_parallel", tp)
        if model.is_moe:
            _divides("num_experts", model.num_experts, "expert_parallel", self.expert_parallel)
        if model.is_moe and self.pipeline_stage > 1:  # the router loss pools every layer's statistics
            raise ConfigError(f"key 'pipeline_stage' = {self.pipeline_stage}: MoE models (num_experts = "
                              f"{model.num_experts}) train without pipeline stages (use expert_parallel / "
                              f"model_parallel)")
        if model.num_layers < self.pipeline_stage:
            _fail("pipeline_stage", self.pipeline_stage, f"at most num_layers = {model.num_layers}")
        from mindport.parallel.pipeline import stage_layer_counts

        stage_layer_counts(model.num_layers, self.pipeline_stage, self.offset)  # raises on a bad offset


@dataclass
class RunConfig:
    """A whole YAML file: model, layout and training."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: "TrainConfig" = None  # mindport.train.config.TrainConfig

    def __post_init__(self) -> None:
        if self.train is None:
            from mindport.train.config import TrainConfig

            self.train = TrainConfig()


# model_config keys that are not the architecture: with load_checkpoint they still come from the YAML
# (everything else comes from the checkpoint, and a YAML value must agree with it)
TRAINING_MODEL_KEYS = ("param_dtype", "compute_dtype", "initializer_range", "router_aux_loss_coef",
                       "router_z_loss_coef", "capacity_factor", "vocab_pad_multiple")


def run_config_from_dict(doc: Mapping[str, Any], source: str) -> RunConfig:
    """Build a :class:`RunConfig` from a mindformers-shaped mapping. With ``load_checkpoint`` the
    architecture is the checkpoint's (``model.model_config`` may be omitted). mindformers keys that
    mindport does not use (``UNUSED_KEYS``) are accepted; set to another value, they get one warning line."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'model: model_config:' section")
    from mindport.train.config import UNUSED_KEYS, train_config_from_sections, unused_keys_set

    rest = {k: v for k, v in doc.items() if k not in ("model", "parallel_config")}
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
    if "preset" in model_values:
        model_values = _expand_preset(model_values, source, architecture_only=bool(train.load_checkpoint))
    if train.load_checkpoint:
        model = _checkpoint_model_config(train.load_checkpoint, model_values, source)
    else:
        model = ModelConfig.from_dict(model_values, f"{source}: model.model_config")
    parallel_values = {k: v for k, v in (doc.get("parallel_config") or {}).items()
                       if f"parallel_config.{k}" not in UNUSED_KEYS}
    parallel = ParallelConfig.from_dict(parallel_values, f"{source}: parallel_config")
    parallel.check_model(model, f"{source}: parallel_config")
    unused = unused_keys_set(doc)
    if unused:
        print(f"{source}: warning: mindformers key(s) {', '.join(unused)} accepted but unused by mindport: "
              f"no effect", file=sys.stderr)
    return RunConfig(model, parallel, train)


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


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
