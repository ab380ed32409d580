"""Configuration dataclasses: model, parallel layout and training.

Every config validates itself once (``__post_init__``) and derives what follows from
its fields, so layers never re-check divisibility. The run YAML (mindformers' shape) is read
above this module (:mod:`mindport.train.config`), model configs from a HuggingFace
``config.json`` through the family registry (:mod:`mindport.models`). The helpers :func:`fail`,
:func:`positive`, :func:`one_of`, :func:`check_types` and :class:`Loadable` serve every config.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from mindport.dtypes import SAFETENSORS_CODES
from mindport.errors import ConfigError

ROUTER_AUX_LOSS_SCOPES = ("global_batch", "micro_batch")
MINDPORT_KEY = "mindport_config"  # config.json of a mindport model directory: {MINDPORT_KEY: {...}}


def fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"key '{key}' = {value!r}: expected {expected}")


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(name, value, "a positive integer")


def _divides(key: str, value: int, divisor_key: str, divisor: int) -> None:
    if value % divisor:
        fail(key, value, f"a multiple of {divisor_key} = {divisor}")


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
            fail(f.name, value, " or ".join(_SCALARS.get(kind, "null") for kind in kinds))


def one_of(key: str, value: Any, choices) -> None:
    if value not in choices:
        fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


class Loadable:
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
class ModelConfig(Loadable):
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
    # "global_batch": routed fractions f summed over data/context-parallel ranks before the loss (Qwen's
    # global-batch balancing); "micro_batch": each rank's own f (transformers' load_balancing_loss_func per batch)
    router_aux_loss_scope: str = "global_batch"
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
        positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings",
                 "vocab_pad_multiple")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        positive(self, "num_kv_heads")
        _divides("hidden_size", self.hidden_size, "num_heads", self.num_heads)
        _divides("num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
        if self.head_dim % 2:
            fail("hidden_size", self.hidden_size, "an even head dimension hidden_size / num_heads")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", self.rms_norm_eps, "a positive number")
        if not self.rope_theta > 0:
            fail("rope_theta", self.rope_theta, "a positive number")
        one_of("kv_layout", self.kv_layout, ("separate", "interleaved"))
        one_of("rope_scaling", self.rope_scaling, ("none", "telechat_ntk"))
        one_of("param_dtype", self.param_dtype, tuple(SAFETENSORS_CODES))
        one_of("compute_dtype", self.compute_dtype, tuple(SAFETENSORS_CODES))
        if self.rope_scaling == "telechat_ntk" or self.use_logn_attn:
            self.training_seqlen = self.training_seqlen or self.max_position_embeddings
            self.base_seqlen = self.base_seqlen or self.training_seqlen
            positive(self, "training_seqlen", "base_seqlen")
        if self.num_experts:
            positive(self, "num_experts", "moe_top_k", "moe_intermediate_size")
            if self.moe_top_k > self.num_experts:
                fail("moe_top_k", self.moe_top_k, f"at most num_experts = {self.num_experts}")
            if self.capacity_factor < 0:
                fail("capacity_factor", self.capacity_factor, "0 (dropless) or a positive number")
            if self.router_aux_loss_scope not in ROUTER_AUX_LOSS_SCOPES:
                fail("router_aux_loss_scope", self.router_aux_loss_scope, " or ".join(ROUTER_AUX_LOSS_SCOPES))
        elif self.moe_top_k or self.shared_expert_intermediate_size:
            fail("num_experts", self.num_experts, "a positive count when MoE keys are set")
        else:
            positive(self, "ffn_hidden_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds."""
        return sum(math.prod(shape) for shape in parameter_shapes(self).values())

    def save(self, path: str) -> None:
        _atomic_write_text(path, json.dumps({MINDPORT_KEY: self.to_dict()}, indent=2) + "\n")


# --------------------------------------------------------------------------- parameter shapes
# The name and shape of every parameter a config builds, computed without building the model. It
# mirrors the cells in ``mindport/transformer`` (layers, attention, mlp, moe) and the order in which
# they register parameters; a test checks it against the real model of every family's tiny preset.

Shape = tuple[int, ...]


def _linear(shapes: dict[str, Shape], prefix: str, in_features: int, out_features: int, bias: bool) -> None:
    shapes[f"{prefix}.weight"] = (out_features, in_features)  # (out, in), as HF stores it
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)


def parameter_shapes(config: ModelConfig) -> dict[str, Shape]:
    """mindport parameter name -> shape, in the model's parameter order."""
    h, d = config.hidden_size, config.head_dim
    n, nkv = config.num_heads, config.num_kv_heads
    shapes: dict[str, Shape] = {"embed.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (h,)
        _linear(shapes, p + "attn.q_proj", h, n * d, config.qkv_bias)
        if config.kv_layout == "interleaved":
            _linear(shapes, p + "attn.kv_proj", h, 2 * nkv * d, config.qkv_bias)
        else:
            _linear(shapes, p + "attn.k_proj", h, nkv * d, config.qkv_bias)
            _linear(shapes, p + "attn.v_proj", h, nkv * d, config.qkv_bias)
        _linear(shapes, p + "attn.o_proj", n * d, h, config.o_bias)
        shapes[p + "mlp_norm.weight"] = (h,)
        if config.is_moe:
            e, width = config.num_experts, config.moe_intermediate_size
            _linear(shapes, p + "mlp.router", h, e, False)
            shapes[p + "mlp.experts.gate_proj"] = (e, width, h)  # stacked experts, no ".weight"
            shapes[p + "mlp.experts.up_proj"] = (e, width, h)
            shapes[p + "mlp.experts.down_proj"] = (e, h, width)
            shared = config.shared_expert_intermediate_size
            if shared:
                _linear(shapes, p + "mlp.shared.gate_proj", h, shared, False)
                _linear(shapes, p + "mlp.shared.up_proj", h, shared, False)
                _linear(shapes, p + "mlp.shared.down_proj", shared, h, False)
                if config.shared_expert_gate:
                    _linear(shapes, p + "mlp.shared_gate", h, 1, False)
        else:
            f = config.ffn_hidden_size
            _linear(shapes, p + "mlp.gate_proj", h, f, config.gate_up_bias)
            _linear(shapes, p + "mlp.up_proj", h, f, config.gate_up_bias)
            _linear(shapes, p + "mlp.down_proj", f, h, config.down_bias)
    shapes["final_norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def vocab_block(vocab_size: int, tp_size: int, multiple: int = 1) -> int:
    """Rows of the padded vocabulary per tp rank: V padded to a multiple of ``multiple`` x tp,
    split evenly (V itself without tensor parallelism: padding exists only for the split)."""
    if tp_size == 1:
        return vocab_size
    step = multiple * tp_size
    return -(-vocab_size // step) * step // tp_size


def stage_layer_counts(num_layers: int, pipeline_stage: int, offset=None) -> list[int]:
    """Layers per pipeline stage (:mod:`mindport.parallel.pipeline` explains the rule)."""
    base = num_layers // pipeline_stage
    if offset is None or offset == 0:
        counts = [base] * pipeline_stage
        extra = num_layers - base * pipeline_stage
        middle = list(range(1, pipeline_stage - 1)) or list(range(pipeline_stage))
        for k in range(extra):
            counts[middle[k % len(middle)]] += 1
        return counts
    offsets = [offset] * pipeline_stage if isinstance(offset, int) else list(offset)
    if len(offsets) != pipeline_stage:
        raise ConfigError(f"key 'offset' = {offset!r}: expected {pipeline_stage} entries (one per pipeline stage)")
    counts = [base + o for o in offsets]
    if sum(counts) != num_layers or min(counts) < 1:
        raise ConfigError(f"key 'offset' = {offset!r}: gives stage sizes {counts}, expected positive sizes "
                          f"adding up to num_layers = {num_layers}")
    return counts


@dataclass
class ParallelConfig(Loadable):
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
        positive(self, "data_parallel", "model_parallel", "pipeline_stage", "context_parallel",
                 "expert_parallel", "micro_batch_num")
        one_of("context_parallel_algo", self.context_parallel_algo, ("ring", "all_gather"))
        one_of("moe_token_dispatcher", self.moe_token_dispatcher, ("alltoall", "allgather"))
        if self.micro_batch_num < self.pipeline_stage and self.pipeline_stage > 1:
            fail("micro_batch_num", self.micro_batch_num, f"at least pipeline_stage = {self.pipeline_stage}")
        if self.data_parallel % self.expert_parallel:  # expert-parallel groups sit inside the data-parallel ones
            fail("expert_parallel", self.expert_parallel, f"a divisor of data_parallel = {self.data_parallel}")

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.pipeline_stage * self.context_parallel * self.model_parallel

    def check_model(self, model: ModelConfig, source: str = "parallel_config") -> None:
        """Fail before any work when the model cannot be split this way."""
        try:
            self._check_model(model)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def check_training(self, model: ModelConfig, source: str = "parallel_config") -> None:
        """Fail before any work when training cannot run this layout (loading, converting and
        generating can: :meth:`check_model`)."""
        self.check_model(model, source)
        if self.pipeline_stage > 1 and self.context_parallel > 1:
            raise ConfigError(f"{source}: key 'context_parallel' = {self.context_parallel}: training with "
                              f"pipeline_stage > 1 runs without context parallelism")
        if model.is_moe and self.pipeline_stage > 1:  # the router loss pools every layer's statistics
            raise ConfigError(f"{source}: key 'pipeline_stage' = {self.pipeline_stage}: MoE models (num_experts = "
                              f"{model.num_experts}) train without pipeline stages (use expert_parallel / "
                              f"model_parallel)")

    def _check_model(self, model: ModelConfig) -> None:
        tp = self.model_parallel
        for key in ("num_heads", "num_kv_heads"):
            _divides(key, getattr(model, key), "model_parallel", tp)
        rows = vocab_block(model.vocab_size, tp, model.vocab_pad_multiple)  # the vocabulary is padded, not divided
        if model.vocab_size <= (tp - 1) * rows:
            fail("vocab_size", model.vocab_size, f"more than {(tp - 1) * rows} (padded to {tp} x {rows} rows with "
                 f"vocab_pad_multiple = {model.vocab_pad_multiple}, every model_parallel rank needs real rows)")
        if model.is_moe:
            _divides("moe_intermediate_size", model.moe_intermediate_size, "model_parallel", tp)
            _divides("shared_expert_intermediate_size", model.shared_expert_intermediate_size, "model_parallel", tp)
        else:
            _divides("ffn_hidden_size", model.ffn_hidden_size, "model_parallel", tp)
        if model.is_moe:
            _divides("num_experts", model.num_experts, "expert_parallel", self.expert_parallel)
        if model.num_layers < self.pipeline_stage:
            fail("pipeline_stage", self.pipeline_stage, f"at most num_layers = {model.num_layers}")
        stage_layer_counts(model.num_layers, self.pipeline_stage, self.offset)  # raises on a bad offset


@dataclass
class LoraConfig(Loadable):
    """LoRA (mindformers' ``pet_config``; PEFT's ``LoraConfig`` fields under mindformers' names).

    W x + (alpha / r) B A dropout(x) for every adapted Linear, A (r, in), B (out, r). ``target_modules``
    names HF modules as PEFT does: a list of names, each matching a module whose name equals it or ends
    with ``.name``, or one regular expression matched against whole module names. ``modules_to_save``
    (same matching) are trained whole (e.g. ``embed_tokens``, ``lm_head``). ``target_parameters`` names
    routed experts' fused parameters as transformers 5 and PEFT do (``experts.gate_up_proj``,
    ``experts.down_proj``; a name equals a parameter's or ends it after a dot): one adapter per expert.
    """

    ALIASES = {"r": "lora_rank"}

    pet_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")  # list of HF module names, or one regex string
    modules_to_save: Any = ()
    target_parameters: Any = ()  # HF parameter names of fused routed experts (PEFT's target_parameters)

    def __post_init__(self) -> None:
        check_types(self)
        one_of("pet_type", self.pet_type, ("lora",))
        positive(self, "lora_rank")
        if not self.lora_alpha > 0:
            fail("lora_alpha", self.lora_alpha, "a positive number")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", self.lora_dropout, "a number in [0, 1)")
        for key in ("target_modules", "modules_to_save", "target_parameters"):
            value = getattr(self, key)
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
                fail(key, value, "a list of module names or one regular expression")
            if key != "target_modules" or not isinstance(value, str):
                setattr(self, key, tuple(names))
        if not self.target_modules and not self.target_parameters:
            fail("target_modules", self.target_modules, "at least one module name (or target_parameters)")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
